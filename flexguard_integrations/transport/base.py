"""What every transport shares: the Transport protocol, server error mapping and the retry policy.

Error bodies differ by server (reference/apis.md §6–7): vLLM sends ``{"error": {...}}``, SGLang a flat
``{"object": "error", ...}``, and vLLM's API-key middleware a bare ``{"error": "Unauthorized"}``. They all
become one exception family (:mod:`flexguard_integrations.errors`).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import ssl
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Protocol, runtime_checkable

from ..errors import (
    ContextLengthExceededError,
    GuardAuthenticationError,
    GuardBadRequestError,
    GuardOverloadedError,
    GuardResponseError,
    GuardServerError,
    GuardTransportError,
)

_orjson: Any
try:  # the 'fast' extra: orjson encodes a request body ~10x and decodes an answer ~4x faster than json
    import orjson as _orjson
except ImportError:  # pragma: no cover - depends on the environment
    _orjson = None

_HTML_TITLE = re.compile(r"<title>(.*?)</title>", re.IGNORECASE | re.DOTALL)
_MAPPING = (dict, Mapping)
"""For isinstance: decoded JSON is a dict, and the exact-type check skips the ABC machinery."""

_CONTEXT_PATTERNS = re.compile(
    r"maximum context length|longer than the model'?s context length|context length|too many tokens"
    r"|max_model_len|exceeds? (?:the )?(?:model'?s )?(?:maximum )?(?:context|limit)",
    re.IGNORECASE,
)


@runtime_checkable
class Transport(Protocol):
    """How a chat-completion request reaches a guard server. ``deadline`` is a ``time.monotonic()`` value."""

    async def acomplete(
        self, body: Mapping[str, Any], *, deadline: float, headers: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """POST a chat completion; return the validated response body."""
        ...

    def complete(
        self, body: Mapping[str, Any], *, deadline: float, headers: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """Blocking twin of :meth:`acomplete`."""
        ...

    async def amodels(self, *, deadline: float) -> list[dict[str, Any]]:
        """The served models (``GET /v1/models`` ``data``)."""
        ...

    def models(self, *, deadline: float) -> list[dict[str, Any]]:
        """Blocking twin of :meth:`amodels`."""
        ...

    async def aclose(self) -> None:
        """Release connections (async)."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter on transient failures, bounded by attempts and the deadline.

    Retried: connection errors, timeouts, 502/503/504 (``Retry-After`` honoured). Never retried: 4xx,
    other 5xx, answers that are not completions.
    """

    max_retries: int = 2
    backoff: float = 0.1
    """First backoff in seconds; doubles each retry."""
    max_backoff: float = 2.0
    jitter: float = 0.1

    def wait(self, attempt: int, exc: BaseException | None) -> float:
        """Seconds to sleep after failed attempt number ``attempt`` (1-based)."""
        delay = min(self.backoff * (2 ** (attempt - 1)), self.max_backoff) + random.uniform(0, self.jitter)
        retry_after: object = getattr(exc, "retry_after", None)
        if isinstance(retry_after, int | float) and retry_after > 0:
            delay = max(delay, float(retry_after))
        return float(delay)

    @staticmethod
    def retryable(exc: BaseException) -> bool:
        """True for failures a retry may fix."""
        return isinstance(exc, GuardTransportError) and exc.retryable


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_fields(body: bytes) -> tuple[str | None, str | None, str | None]:
    """(message, type, param) from any of the known error shapes, or from raw text."""
    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text) if text else None
    except ValueError:
        data = None
    if isinstance(data, Mapping):
        err = data.get("error")
        if isinstance(err, Mapping):  # vLLM / OpenAI
            return _s(err.get("message")), _s(err.get("type")), _s(err.get("param"))
        if isinstance(err, str):  # vLLM 401 {"error": "Unauthorized"}
            return err, None, None
        if "message" in data or data.get("object") == "error":  # SGLang flat shape
            return _s(data.get("message")), _s(data.get("type")), _s(data.get("param"))
        if "detail" in data:  # FastAPI / gateways
            return _s(data.get("detail")), None, None
    if text:
        title = _HTML_TITLE.search(text) if text.startswith("<") else None
        if title is not None and title.group(1).strip():  # a proxy's error page: its title says it all
            return re.sub(r"\s+", " ", title.group(1)).strip()[:200], None, None
        snippet = re.sub(r"\s+", " ", text)[:200]
        return snippet, None, None
    return None, None, None


def _s(value: Any) -> str | None:
    return None if value is None else str(value)


def error_from_response(status: int, headers: Mapping[str, str], body: bytes) -> GuardTransportError:
    """Map a non-2xx HTTP answer to the exception family."""
    message, etype, param = _error_fields(body)
    detail = message or "(no body)"
    kw: dict[str, Any] = {"status_code": status, "error_type": etype, "param": param}
    if status in (401, 403):
        return GuardAuthenticationError(
            f"guard server refused the credentials (HTTP {status}): {detail}; check FLEXGUARD_API_KEY", **kw
        )
    if status in (502, 503, 504):
        retry_after = parse_retry_after(headers.get("retry-after"))
        return GuardOverloadedError(
            f"guard server overloaded or unavailable (HTTP {status}): {detail}", retry_after=retry_after, **kw
        )
    if status == 400 and (param in ("input_tokens", "input_text") or (message and _CONTEXT_PATTERNS.search(message))):
        return ContextLengthExceededError(f"text too long for the guard model's context: {detail}", **kw)
    if status == 413:  # a proxy's body limit (nginx client_max_body_size) or the server's own: smaller pieces fit
        return ContextLengthExceededError(
            f"request too large for the guard server or a proxy in front of it (HTTP 413): {detail}", **kw
        )
    if 400 <= status < 500:
        return GuardBadRequestError(f"guard server rejected the request (HTTP {status}): {detail}", **kw)
    return GuardServerError(f"guard server error (HTTP {status}): {detail}", **kw)


def encode_body(body: Mapping[str, Any]) -> bytes:
    """A request body as compact UTF-8 JSON (with orjson when it is installed, else the json module)."""
    if _orjson is not None:
        try:
            return bytes(_orjson.dumps(body))
        except TypeError:  # orjson is stricter (non-str keys, huge ints...): json says what is wrong
            pass
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _loads(body: bytes) -> Any:
    if _orjson is not None:
        return _orjson.loads(body)  # JSONDecodeError is a ValueError
    return json.loads(body)


def decode_completion(body: bytes, content_type: str | None = None) -> dict[str, Any]:
    """Parse a 2xx body and check it is a (chat) completion with ``choices[0]``; GuardResponseError if not."""
    if not body.strip():
        raise GuardResponseError("guard server answered 200 with an empty body")
    try:
        data = _loads(body)
    except ValueError:
        kind = content_type.split(";")[0] if content_type else "unknown content type"
        snippet = re.sub(r"\s+", " ", body[:80].decode("utf-8", "replace"))
        raise GuardResponseError(
            f"guard server answered 200 with non-JSON ({kind}): {snippet!r}; is the URL a vLLM/SGLang /v1 endpoint?"
        ) from None
    check_completion_shape(data)
    return data  # type: ignore[no-any-return]


def check_completion_shape(data: Any) -> None:
    """Raise GuardResponseError unless ``data`` looks like a chat completion or completion."""
    if not isinstance(data, _MAPPING):
        raise GuardResponseError(f"guard answer is JSON {type(data).__name__}, not a completion object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], _MAPPING):
        keys = ", ".join(list(data)[:6]) or "none"
        raise GuardResponseError(f"guard answer has no choices (keys: {keys}); not a chat completion")
    choice = choices[0]
    if not isinstance(choice.get("message"), _MAPPING) and not isinstance(choice.get("text"), str):
        raise GuardResponseError("guard answer's first choice has neither a message nor text")


def prune_closed_loops(per_loop: MutableMapping[Any, Any]) -> None:
    """Drop the entries of event loops that are closed, from a mapping keyed by loop.

    Values (an aiohttp session, httpcore connections, an asyncio.Semaphore that has waited) hold their loop,
    so a weak-key mapping alone never lets go of them: every ``asyncio.run()`` that ended without
    ``aclose()`` would leave its loop and connections behind. A closed loop can run nothing, so its entry is
    only garbage (its sockets are closed when it is collected).
    """
    for loop in [loop for loop in list(per_loop) if loop.is_closed()]:
        per_loop.pop(loop, None)


def close_at_loop_shutdown(close: Callable[[], Awaitable[None]]) -> AsyncGenerator[None, None]:
    """Have the running event loop's shutdown await ``close()``; call from a coroutine of that loop.

    Returns a started async generator whose ``finally`` awaits ``close()``. The loop tracks it (its first
    iteration runs the loop's async-generator hook), so ``asyncio.run``, ``asyncio.Runner`` and
    ``loop.shutdown_asyncgens()`` close it while the loop still runs: connections a program never closed
    are shut down properly rather than dropped with the loop (aiohttp then logs "Unclosed client
    session" for each). Keep a reference as long as the resource lives (the loop holds only a weak one).
    ``close()`` must be safe to call twice: to close early, call it directly rather than through the keeper
    (the loop's shutdown closes every generator at once, and a second ``aclose()`` of a generator being
    closed raises RuntimeError). Dropped while its loop runs, asyncio schedules its close; dropped after the
    loop closed without that shutdown, nothing runs.
    """

    async def keeper() -> AsyncGenerator[None, None]:
        try:
            yield
        finally:
            await close()

    gen = keeper()
    try:
        gen.__anext__().send(None)  # runs to the yield (no await before it), so no await is needed here
    except StopIteration:  # it yielded: started, and registered with the loop
        return gen
    raise AssertionError("the keeper suspended before its yield")  # pragma: no cover - cannot happen


def remaining(deadline: float) -> float:
    """Seconds left until ``deadline`` (never negative)."""
    return max(0.0, deadline - time.monotonic())


def ssl_verify(verify: bool | str | os.PathLike[str] | ssl.SSLContext) -> bool | ssl.SSLContext:
    """``verify`` as the transports take it: a bool, or an SSLContext (a CA bundle file or directory loaded).

    A path that does not exist is a configuration error here, at construction, not a TLS failure at the
    first check.
    """
    if isinstance(verify, bool | ssl.SSLContext):
        return verify
    from ..errors import ConfigurationError

    path = os.fspath(verify)
    if os.path.isdir(path):
        return ssl.create_default_context(capath=path)
    if not os.path.isfile(path):
        raise ConfigurationError(f"verify={path!r}: no CA bundle file or directory at that path")
    try:
        return ssl.create_default_context(cafile=path)
    except ssl.SSLError as exc:
        raise ConfigurationError(f"verify={path!r} is not a readable PEM CA bundle: {exc}") from exc


def env_proxy_for(url: str) -> str | None:
    """The proxy the environment (HTTP_PROXY / HTTPS_PROXY / ALL_PROXY / NO_PROXY) gives for ``url``, or None.

    Both transports resolve it once, for their one server, rather than on every request.
    """
    import urllib.request
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    if not host or urllib.request.proxy_bypass(host):
        return None
    proxies = urllib.request.getproxies()
    return proxies.get(parts.scheme) or proxies.get("all")


def redact_url(url: str) -> str:
    """``url`` without ``user:password@`` credentials (for reprs, logs and messages)."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    if sep and "@" in netloc:
        netloc = netloc.rsplit("@", 1)[1]
    return f"{scheme}{sep}{netloc}{slash}{path}"


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:?//")


def shown_url(url: str) -> str:
    """``url`` as an error message may show it, even when it is malformed: everything before the last ``@``
    (user, password, an API key, whatever characters they hold) but a scheme becomes ``***@``, and the query
    string and fragment (``?api_key=...``) are dropped."""
    if "@" in url:
        scheme = _SCHEME.match(url)
        url = (scheme.group(0) if scheme else "") + "***@" + url.rsplit("@", 1)[1]
    return url.split("?", 1)[0].split("#", 1)[0]


def split_credentials(url: str) -> tuple[str, str | None]:
    """(``url`` without ``user:password@``, a ``Basic`` authorization value for them or None)."""
    import base64
    from urllib.parse import unquote

    _, sep, rest = url.partition("://")
    netloc = rest.partition("/")[0]
    if not sep or "@" not in netloc:
        return url, None
    userinfo = netloc.rsplit("@", 1)[0]
    user, _, password = userinfo.partition(":")
    token = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode("ascii")
    return redact_url(url), f"Basic {token}"


def normalise_base_url(base_url: str) -> tuple[str, str]:
    """(API base ending in /v1, server root). Accepts ``http://host:8000``, ``.../v1`` or ``.../v1/``."""
    from ..errors import ConfigurationError

    url = base_url.strip().rstrip("/")
    if not re.match(r"^https?://[^/\s]+", url):
        raise ConfigurationError(
            f"guard base_url must start with http:// or https://, got {shown_url(base_url)!r} "
            "(credentials and query string hidden)"
        )
    if re.search(r"/v\d+$", url):
        return url, url.rsplit("/", 1)[0]
    if re.match(r"^https?://[^/]+$", url):
        return url + "/v1", url
    return url, url.rsplit("/", 1)[0]
