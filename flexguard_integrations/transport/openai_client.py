"""A transport over a user's own ``openai`` client, for teams that already configure one (extra ``openai``).

Slower than the default httpx transport (the SDK adds about 0.8 ms per call, reference/performance.md
§5) but it reuses the client's base URL, key, proxies and hooks. The transport sends through copies of the
clients with the SDK's own retries off and retries itself with the Guard's :class:`RetryPolicy`, so retries,
``Retry-After`` waits and backoff all fit in the check's one deadline; each attempt gets what is left of it as
its timeout. The SDK's timeouts apply to each socket operation, so a server that trickles its answer byte by
byte would outlast them: the blocking path reads the answer as a stream (``with_streaming_response``) and
gives up at the deadline between two reads (``acheck()`` is bounded by the Guard's own timer).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from ..errors import (
    ConfigurationError,
    GuardConnectionError,
    GuardTimeoutError,
    GuardTransportError,
)
from .base import (
    RetryPolicy,
    check_completion_shape,
    decode_completion,
    error_from_response,
    redact_url,
    remaining,
)

T = TypeVar("T")


def _map_openai_error(exc: Exception) -> GuardTransportError:
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return GuardTimeoutError(f"guard server did not answer before the deadline ({type(exc).__name__})")
    if isinstance(exc, openai.APIConnectionError):
        return GuardConnectionError(f"cannot reach the guard server through the openai client: {exc}")
    if isinstance(exc, openai.APIStatusError):
        headers = {k.lower(): v for k, v in exc.response.headers.items()}
        return error_from_response(exc.status_code, headers, exc.response.content)
    return GuardTransportError(f"openai client failed: {type(exc).__name__}: {exc}")


def _read_by(response: Any, deadline: float) -> bytes:
    """The body of a streamed SDK response, read until ``deadline`` at the latest (checked between reads)."""
    chunks: list[bytes] = []
    for chunk in response.iter_bytes():
        chunks.append(chunk)
        if remaining(deadline) <= 0:
            raise GuardTimeoutError("the guard server's answer was still arriving at the check's deadline")
    return b"".join(chunks)


class OpenAITransport:
    """Send guard requests through ``openai.OpenAI`` (sync) and/or ``openai.AsyncOpenAI`` (async)."""

    def __init__(self, client: Any = None, async_client: Any = None, *, retry: RetryPolicy | None = None) -> None:
        try:
            import openai
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ConfigurationError(
                "the openai transport needs the 'openai' extra: pip install 'flexguard-integrations[openai]'"
            ) from exc
        sync, aclient = None, None
        for c in (client, async_client):
            if c is None:
                continue
            if isinstance(c, openai.AsyncOpenAI):
                aclient = c
            elif isinstance(c, openai.OpenAI):
                sync = c
            else:
                raise ConfigurationError(
                    f"expected an openai.OpenAI or openai.AsyncOpenAI client, got {type(c).__name__}"
                )
        if sync is None and aclient is None:
            raise ConfigurationError("OpenAITransport needs an openai.OpenAI or openai.AsyncOpenAI client")
        # copies sharing the user's connection pools, with the SDK's retries off: ours fit in the deadline
        self._sync = sync.with_options(max_retries=0) if sync is not None else None
        self._async = aclient.with_options(max_retries=0) if aclient is not None else None
        self.retry = retry or RetryPolicy()

    def __repr__(self) -> str:
        client = self._async or self._sync
        return f"OpenAITransport({redact_url(str(getattr(client, 'base_url', '?')))!r})"

    def _next_wait(self, exc: GuardTransportError, attempt: int, deadline: float) -> float | None:
        """Seconds to wait before retrying after failed attempt ``attempt`` (1-based), or None: give up."""
        if not exc.retryable or attempt > self.retry.max_retries:
            return None
        delay = self.retry.wait(attempt, exc)
        return delay if remaining(deadline) > delay + 0.005 else None

    def _retrying(self, send: Callable[[], T], deadline: float) -> T:
        attempt = 1
        while True:
            try:
                return send()
            except GuardTransportError as exc:
                delay = self._next_wait(exc, attempt, deadline)
                if delay is None:
                    raise
            time.sleep(delay)
            attempt += 1

    async def _aretrying(self, send: Callable[[], Awaitable[T]], deadline: float) -> T:
        attempt = 1
        while True:
            try:
                return await send()
            except GuardTransportError as exc:
                delay = self._next_wait(exc, attempt, deadline)
                if delay is None:
                    raise
            await asyncio.sleep(delay)
            attempt += 1

    @staticmethod
    def _kwargs(body: Mapping[str, Any], deadline: float, headers: Mapping[str, str] | None) -> dict[str, Any]:
        kwargs = dict(body)
        kwargs["timeout"] = max(remaining(deadline), 0.001)
        if headers:
            kwargs["extra_headers"] = dict(headers)
        return kwargs

    @staticmethod
    def _dump(result: Any) -> dict[str, Any]:
        data = result.model_dump() if hasattr(result, "model_dump") else result
        check_completion_shape(data)
        return data  # type: ignore[no-any-return]

    async def acomplete(
        self, body: Mapping[str, Any], *, deadline: float, headers: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        if self._async is None:
            raise ConfigurationError("acheck() needs an openai.AsyncOpenAI client; pass one to from_openai_client")
        client = self._async

        async def send() -> dict[str, Any]:
            if remaining(deadline) <= 0:
                raise GuardTimeoutError("guard check deadline passed before the request was sent")
            try:
                result = await client.chat.completions.create(**self._kwargs(body, deadline, headers))
            except Exception as exc:
                raise _map_openai_error(exc) from exc
            return self._dump(result)

        return await self._aretrying(send, deadline)

    def complete(
        self, body: Mapping[str, Any], *, deadline: float, headers: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        if self._sync is None:
            raise ConfigurationError("check() needs an openai.OpenAI client; pass one to from_openai_client")
        client = self._sync

        def send() -> dict[str, Any]:
            if remaining(deadline) <= 0:
                raise GuardTimeoutError("guard check deadline passed before the request was sent")
            try:
                # streamed, so the deadline is checked between reads: the SDK's timeouts are per read
                with client.chat.completions.with_streaming_response.create(
                    **self._kwargs(body, deadline, headers)
                ) as response:
                    raw = _read_by(response, deadline)
                    content_type = response.headers.get("content-type")
            except GuardTransportError:
                raise
            except Exception as exc:
                raise _map_openai_error(exc) from exc
            return decode_completion(raw, content_type)

        return self._retrying(send, deadline)

    async def amodels(self, *, deadline: float) -> list[dict[str, Any]]:
        if self._async is None:
            return self.models(deadline=deadline)
        try:
            page = await self._async.models.list(timeout=max(remaining(deadline), 0.001))
        except Exception as exc:
            raise _map_openai_error(exc) from exc
        return [m.model_dump() for m in page.data]

    def models(self, *, deadline: float) -> list[dict[str, Any]]:
        if self._sync is None:
            return []
        try:
            page = self._sync.models.list(timeout=max(remaining(deadline), 0.001))
        except Exception as exc:
            raise _map_openai_error(exc) from exc
        return [m.model_dump() for m in page.data]

    async def aclose(self) -> None:
        """The user's clients are the user's to close."""

    def close(self) -> None:
        """The user's clients are the user's to close."""
