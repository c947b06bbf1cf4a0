"""A transport over a user's own ``openai`` client, for teams that already configure one (extra ``openai``).

Slower than the default httpx transport (the SDK adds about 0.8 ms per call, reference/performance.md
§5) but it reuses the client's base URL, key, proxies and hooks. The SDK's own retries apply (its
``max_retries``); each attempt is bounded by what is left of the check's deadline.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import (
    ConfigurationError,
    GuardConnectionError,
    GuardTimeoutError,
    GuardTransportError,
)
from .base import check_completion_shape, error_from_response, remaining


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


class OpenAITransport:
    """Send guard requests through ``openai.OpenAI`` (sync) and/or ``openai.AsyncOpenAI`` (async)."""

    def __init__(self, client: Any = None, async_client: Any = None) -> None:
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
        self._sync = sync
        self._async = aclient

    def __repr__(self) -> str:
        client = self._async or self._sync
        return f"OpenAITransport({str(getattr(client, 'base_url', '?'))!r})"

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
        if remaining(deadline) <= 0:
            raise GuardTimeoutError("guard check deadline passed before the request was sent")
        try:
            result = await self._async.chat.completions.create(**self._kwargs(body, deadline, headers))
        except Exception as exc:
            raise _map_openai_error(exc) from exc
        return self._dump(result)

    def complete(
        self, body: Mapping[str, Any], *, deadline: float, headers: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        if self._sync is None:
            raise ConfigurationError("check() needs an openai.OpenAI client; pass one to from_openai_client")
        if remaining(deadline) <= 0:
            raise GuardTimeoutError("guard check deadline passed before the request was sent")
        try:
            result = self._sync.chat.completions.create(**self._kwargs(body, deadline, headers))
        except Exception as exc:
            raise _map_openai_error(exc) from exc
        return self._dump(result)

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
