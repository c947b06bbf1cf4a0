"""The fast transport: the async path on aiohttp (extra ``fast``), the sync path on httpx.

httpx loses throughput as concurrency rises (reference/performance.md §5: ~950 req/s at concurrency 64
on a 2-core machine, against ~8,000 for aiohttp). Same contract as :class:`HTTPTransport`: one total
deadline per check, tenacity retries on transient failures, the same error mapping.
"""

from __future__ import annotations

import asyncio
import json
import weakref
from collections.abc import AsyncGenerator, Mapping
from typing import Any

from ..errors import ConfigurationError, GuardConnectionError, GuardTimeoutError
from .base import close_at_loop_shutdown, decode_completion, error_from_response, prune_closed_loops, remaining
from .http import HTTPTransport


class AiohttpTransport(HTTPTransport):
    """HTTPTransport whose async requests go through ``aiohttp.ClientSession``.

    ``bounds_deadline`` is True: every attempt runs under aiohttp's *total* timeout (what is left of the
    check's deadline) and retries stop at the deadline, so :class:`~flexguard_integrations.Guard` skips its
    own ``asyncio.timeout`` around an async request that does not queue (httpx's timeouts are per
    operation: a server that trickles its answer could outlast the deadline, so HTTPTransport is not).
    """

    bounds_deadline = True

    def __init__(self, base_url: str, **kwargs: Any) -> None:
        try:
            import aiohttp  # noqa: F401
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ConfigurationError(
                "the aiohttp transport needs the 'fast' extra: pip install 'flexguard-integrations[fast]'"
            ) from exc
        super().__init__(base_url, **kwargs)
        # each loop's session, with the keeper that closes it when the loop shuts down (close_at_loop_shutdown)
        self._sessions: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[Any, AsyncGenerator[None, None]]] = (
            weakref.WeakKeyDictionary()
        )
        # the session of the loop that asked last (most programs run one loop; the weak-key lookup costs a
        # weakref per request)
        self._last: tuple[weakref.ref[asyncio.AbstractEventLoop], Any] | None = None
        # the session runs with trust_env=False: aiohttp's re-reads the proxy environment (and ~/.netrc) on
        # every request, which costs more than the request itself on loopback. HTTPTransport resolved the
        # proxy for this server once (self._proxy).

    def __repr__(self) -> str:
        return super().__repr__().replace("HTTPTransport", "AiohttpTransport", 1)

    def _session(self) -> Any:
        import aiohttp

        loop = asyncio.get_running_loop()
        last = self._last  # one read: another thread's loop may replace it
        if last is not None and last[0]() is loop and not last[1].closed:
            return last[1]
        entry = self._sessions.get(loop)
        if entry is None or entry[0].closed:
            prune_closed_loops(self._sessions)
            # the SSL context the httpx pools use too: the same CA store for acheck() and check()
            connector = aiohttp.TCPConnector(limit=self.concurrency, ssl=self._ssl_context(), keepalive_timeout=30.0)
            session = aiohttp.ClientSession(headers=self._headers, connector=connector, trust_env=False)
            entry = (session, close_at_loop_shutdown(session.close))
            self._sessions[loop] = entry
        session = entry[0]
        self._last = (weakref.ref(loop), session)
        return session

    async def _apost(
        self, url: str, payload: bytes, deadline: float, headers: Mapping[str, str] | None
    ) -> dict[str, Any]:
        import aiohttp

        left = remaining(deadline)
        if left <= 0:
            raise GuardTimeoutError("guard check deadline passed before the request was sent")
        timeout = aiohttp.ClientTimeout(total=left, connect=min(left, self._connect_timeout))
        try:
            async with self._session().post(
                url, data=payload, headers=headers, timeout=timeout, proxy=self._proxy
            ) as resp:
                body = await resp.read()
                status = resp.status
                # a 200 needs only its content type; an error answer is read whole (Retry-After...)
                content_type = resp.headers.get("content-type")
                resp_headers = {k.lower(): v for k, v in resp.headers.items()} if status != 200 else None
        except TimeoutError as exc:
            raise GuardTimeoutError("guard server did not answer a check before the deadline") from exc
        except aiohttp.ClientConnectorError as exc:
            raise GuardConnectionError(f"cannot connect to the guard server for a check: {exc}") from exc
        except aiohttp.ClientError as exc:
            raise GuardConnectionError(
                f"connection to the guard server failed during a check: {str(exc) or type(exc).__name__}"
            ) from exc
        if resp_headers is not None:
            raise error_from_response(status, resp_headers, body)
        return decode_completion(body, content_type)

    async def amodels(self, *, deadline: float) -> list[dict[str, Any]]:
        import aiohttp

        left = max(remaining(deadline), 0.001)
        try:
            async with self._session().get(
                self._models_url, timeout=aiohttp.ClientTimeout(total=left), proxy=self._proxy
            ) as resp:
                body = await resp.read()
                if resp.status != 200:
                    raise error_from_response(resp.status, {k.lower(): v for k, v in resp.headers.items()}, body)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise GuardConnectionError(f"GET /v1/models failed: {str(exc) or type(exc).__name__}") from exc
        try:
            data = json.loads(body)
        except ValueError:
            return []
        items = data.get("data") if isinstance(data, dict) else None
        return [m for m in items if isinstance(m, dict)] if isinstance(items, list) else []

    async def aclose(self) -> None:
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        for owner, (session, _) in list(self._sessions.items()):
            if owner is loop:
                del self._sessions[owner]
                # directly, not through the keeper: the loop's shutdown may be closing the keeper right now
                # (this aclose running in an async generator it closes); closing a session twice is harmless
                await session.close()
        self._last = None
        await super().aclose()
