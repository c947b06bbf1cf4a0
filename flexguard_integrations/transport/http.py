"""The default transport: OpenAI-compatible HTTP over httpx, async and sync twins side by side.

Plain httpx rather than the openai SDK on the hot path (DESIGN.md, "Talking to the guard server"): one
POST per check, a pool sized for the configured concurrency, tenacity retries on transient failures, and
one total deadline per check that covers every attempt and every backoff.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import httpx
from tenacity import AsyncRetrying, RetryCallState, Retrying, retry_if_exception

from .. import __version__
from ..errors import GuardConnectionError, GuardTimeoutError, GuardTransportError
from .base import RetryPolicy, decode_completion, encode_body, error_from_response, normalise_base_url, remaining

T = TypeVar("T")
logger = logging.getLogger("flexguard_integrations")

HTTPX_MAX_USEFUL_CONCURRENCY = 16
"""httpx's connection pool scans every connection on each request start and end: past about 16
connections in flight throughput falls (benchmarks/httpx_pool.py). The httpx transport caps its pool and
the Guard's in-flight checks there; the aiohttp transport has no such cap."""
_JSON = {"content-type": "application/json", "accept": "application/json"}


def _map_httpx_error(exc: httpx.HTTPError, what: str) -> GuardTransportError:
    if isinstance(exc, httpx.TimeoutException):
        return GuardTimeoutError(f"guard server did not answer {what} before the deadline ({type(exc).__name__})")
    if isinstance(exc, httpx.ConnectError):
        return GuardConnectionError(f"cannot connect to the guard server for {what}: {exc or type(exc).__name__}")
    return GuardConnectionError(f"connection to the guard server failed during {what}: {exc or type(exc).__name__}")


class HTTPTransport:
    """OpenAI-compatible HTTP transport for vLLM, SGLang or a router in front of them.

    ``api_key`` is sent as a Bearer header and never appears in a repr or a log. ``verify`` takes a bool,
    a CA bundle path or an ``ssl.SSLContext``. ``headers`` are added to every request (gateway auth, a
    tenant header...).
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        headers: Mapping[str, str] | None = None,
        concurrency: int = 64,
        retry: RetryPolicy | None = None,
        verify: bool | str | ssl.SSLContext = True,
        trust_env: bool = True,
        connect_timeout: float = 5.0,
    ) -> None:
        self.base_url, self.root_url = normalise_base_url(base_url)
        self.retry = retry or RetryPolicy()
        self.concurrency = max(1, int(concurrency))
        if type(self) is HTTPTransport and self.concurrency > HTTPX_MAX_USEFUL_CONCURRENCY:
            logger.info(
                "httpx transport: %d connections asked, %d used (httpx's pool slows down beyond that); "
                "use transport='aiohttp' for more checks in flight",
                self.concurrency,
                HTTPX_MAX_USEFUL_CONCURRENCY,
            )
            self.concurrency = HTTPX_MAX_USEFUL_CONCURRENCY
        self._headers = {"user-agent": f"flexguard-integrations/{__version__}", **_JSON, **(headers or {})}
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"
        self._verify = verify
        self._trust_env = trust_env
        self._connect_timeout = connect_timeout
        self._limits = httpx.Limits(
            max_connections=self.concurrency,
            max_keepalive_connections=self.concurrency,
            keepalive_expiry=30.0,
        )
        self._chat_url = self.base_url + "/chat/completions"
        self._models_url = self.base_url + "/models"
        self._sync: httpx.Client | None = None
        self._sync_lock = threading.Lock()
        self._async: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
            weakref.WeakKeyDictionary()
        )

    def __repr__(self) -> str:
        auth = ", api_key=***" if "authorization" in self._headers else ""
        return f"HTTPTransport({self.base_url!r}{auth}, concurrency={self.concurrency})"

    # ----------------------------------------------------------------- clients

    def _timeout(self, deadline: float) -> httpx.Timeout:
        left = max(remaining(deadline), 0.001)
        return httpx.Timeout(left, connect=min(left, self._connect_timeout))

    def _sync_client(self) -> httpx.Client:
        if self._sync is None:
            with self._sync_lock:
                if self._sync is None:
                    self._sync = httpx.Client(
                        headers=self._headers,
                        limits=self._limits,
                        verify=self._verify,
                        trust_env=self._trust_env,
                    )
        return self._sync

    def _async_client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        client = self._async.get(loop)
        if client is None:
            client = httpx.AsyncClient(
                headers=self._headers, limits=self._limits, verify=self._verify, trust_env=self._trust_env
            )
            self._async[loop] = client
        return client

    # ----------------------------------------------------------------- retries

    def _stop(self, deadline: float) -> Callable[[RetryCallState], bool]:
        def stop(state: RetryCallState) -> bool:
            if state.attempt_number >= self.retry.max_retries:
                return True
            return remaining(deadline) <= (state.upcoming_sleep or 0.0) + 0.005

        return stop

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        # attempt 1 of the retry loop is the client's second attempt overall
        return self.retry.wait(state.attempt_number + 1, exc)

    def _first_wait_fits(self, exc: GuardTransportError, deadline: float) -> float | None:
        if not exc.retryable or self.retry.max_retries < 1:
            return None
        delay = self.retry.wait(1, exc)
        return delay if remaining(deadline) > delay + 0.005 else None

    # ----------------------------------------------------------------- async

    async def _apost(
        self, url: str, payload: bytes, deadline: float, headers: Mapping[str, str] | None
    ) -> dict[str, Any]:
        if remaining(deadline) <= 0:
            raise GuardTimeoutError("guard check deadline passed before the request was sent")
        try:
            resp = await self._async_client().post(
                url, content=payload, headers=headers, timeout=self._timeout(deadline)
            )
        except httpx.HTTPError as exc:
            raise _map_httpx_error(exc, "a check") from exc
        if resp.status_code != 200:
            raise error_from_response(resp.status_code, resp.headers, resp.content)
        return decode_completion(resp.content, resp.headers.get("content-type"))

    async def acomplete(
        self, body: Mapping[str, Any], *, deadline: float, headers: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        payload = encode_body(body)
        try:  # fast path: most checks succeed on the first attempt, without retry machinery
            return await self._apost(self._chat_url, payload, deadline, headers)
        except GuardTransportError as exc:
            delay = self._first_wait_fits(exc, deadline)
            if delay is None:
                raise
        await asyncio.sleep(delay)
        retrying = AsyncRetrying(
            retry=retry_if_exception(RetryPolicy.retryable),
            wait=self._wait,
            stop=self._stop(deadline),
            reraise=True,
        )
        return await retrying(self._apost, self._chat_url, payload, deadline, headers)

    async def amodels(self, *, deadline: float) -> list[dict[str, Any]]:
        try:
            resp = await self._async_client().get(self._models_url, timeout=self._timeout(deadline))
        except httpx.HTTPError as exc:
            raise _map_httpx_error(exc, "GET /v1/models") from exc
        return _models_from(resp)

    async def aget(self, path: str, *, deadline: float) -> httpx.Response:
        """GET a path under the server root (``/health``...); used by diagnostics."""
        try:
            return await self._async_client().get(self.root_url + path, timeout=self._timeout(deadline))
        except httpx.HTTPError as exc:
            raise _map_httpx_error(exc, f"GET {path}") from exc

    async def aclose(self) -> None:
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        for owner, client in list(self._async.items()):
            if owner is loop:
                await client.aclose()
                del self._async[owner]
        self.close()

    # ----------------------------------------------------------------- sync

    def _post(self, url: str, payload: bytes, deadline: float, headers: Mapping[str, str] | None) -> dict[str, Any]:
        if remaining(deadline) <= 0:
            raise GuardTimeoutError("guard check deadline passed before the request was sent")
        try:
            resp = self._sync_client().post(url, content=payload, headers=headers, timeout=self._timeout(deadline))
        except httpx.HTTPError as exc:
            raise _map_httpx_error(exc, "a check") from exc
        if resp.status_code != 200:
            raise error_from_response(resp.status_code, resp.headers, resp.content)
        return decode_completion(resp.content, resp.headers.get("content-type"))

    def complete(
        self, body: Mapping[str, Any], *, deadline: float, headers: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        payload = encode_body(body)
        try:
            return self._post(self._chat_url, payload, deadline, headers)
        except GuardTransportError as exc:
            delay = self._first_wait_fits(exc, deadline)
            if delay is None:
                raise
        time.sleep(delay)
        retrying = Retrying(
            retry=retry_if_exception(RetryPolicy.retryable),
            wait=self._wait,
            stop=self._stop(deadline),
            reraise=True,
        )
        return retrying(self._post, self._chat_url, payload, deadline, headers)

    def models(self, *, deadline: float) -> list[dict[str, Any]]:
        try:
            resp = self._sync_client().get(self._models_url, timeout=self._timeout(deadline))
        except httpx.HTTPError as exc:
            raise _map_httpx_error(exc, "GET /v1/models") from exc
        return _models_from(resp)

    def get(self, path: str, *, deadline: float) -> httpx.Response:
        """GET a path under the server root (``/health``...); used by diagnostics."""
        try:
            return self._sync_client().get(self.root_url + path, timeout=self._timeout(deadline))
        except httpx.HTTPError as exc:
            raise _map_httpx_error(exc, f"GET {path}") from exc

    def post_json(self, path: str, body: Mapping[str, Any], *, deadline: float) -> httpx.Response:
        """POST JSON to a path under the server root (``/tokenize``); used by diagnostics."""
        try:
            return self._sync_client().post(self.root_url + path, json=dict(body), timeout=self._timeout(deadline))
        except httpx.HTTPError as exc:
            raise _map_httpx_error(exc, f"POST {path}") from exc

    def close(self) -> None:
        with self._sync_lock:
            if self._sync is not None:
                self._sync.close()
                self._sync = None


def _models_from(resp: httpx.Response) -> list[dict[str, Any]]:
    if resp.status_code != 200:
        raise error_from_response(resp.status_code, resp.headers, resp.content)
    try:
        data = resp.json()
    except ValueError:
        from ..errors import GuardResponseError

        raise GuardResponseError("GET /v1/models did not answer JSON") from None
    items = data.get("data") if isinstance(data, dict) else None
    return [m for m in items if isinstance(m, dict)] if isinstance(items, list) else []
