"""The default transport: OpenAI-compatible HTTP over httpx, async and sync twins side by side.

Plain httpx rather than the openai SDK on the hot path (DESIGN.md, "Talking to the guard server"): one
POST per check, a pool sized for the configured concurrency, tenacity retries on transient failures, and
one total deadline per check that covers every attempt and every backoff.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from typing import Any, Generic, TypeVar

import httpcore
import httpx
from tenacity import AsyncRetrying, RetryCallState, Retrying, retry_if_exception

from .. import __version__
from ..errors import ConfigurationError, GuardConnectionError, GuardTimeoutError, GuardTransportError
from .base import (
    RetryPolicy,
    close_at_loop_shutdown,
    decode_completion,
    encode_body,
    env_proxy_for,
    error_from_response,
    normalise_base_url,
    prune_closed_loops,
    remaining,
    split_credentials,
    ssl_verify,
)

T = TypeVar("T")

HTTPX_POOL_CONNECTIONS = 4
"""Connections per httpcore pool. httpcore's pool scans all its connections (and polls each idle one) at every
request start and end, so a request costs more the bigger the pool: one pool of 64 connections does a third
of what 16 pools of 4 do (docs/performance.md). The transport splits ``concurrency`` connections over
pools of at most this many and sends each request to the least busy one."""
_JSON = {"content-type": "application/json", "accept": "application/json"}
_DEADLINE = threading.local()
"""The deadline (``time.monotonic()``) of the blocking request this thread is sending, if any."""


def _map_httpx_error(exc: httpx.HTTPError, what: str) -> GuardTransportError:
    if isinstance(exc, httpx.TimeoutException):
        return GuardTimeoutError(f"guard server did not answer {what} before the deadline ({type(exc).__name__})")
    detail = str(exc) or type(exc).__name__  # some httpx errors carry no message
    if isinstance(exc, httpx.ConnectError):
        return GuardConnectionError(f"cannot connect to the guard server for {what}: {detail}")
    return GuardConnectionError(f"connection to the guard server failed during {what}: {detail}")


class HTTPTransport:
    """OpenAI-compatible HTTP transport for vLLM, SGLang or a router in front of them.

    ``api_key`` is sent as a Bearer header and never appears in a repr or a log; so are ``user:password@``
    credentials in ``base_url``, which become a Basic authorization header (on both the async and the
    blocking path) and are removed from the URL. ``verify`` takes a bool,
    a CA bundle path (file or directory) or an ``ssl.SSLContext``. ``headers`` are added to every request
    (gateway auth, a tenant header...). With ``trust_env`` the proxy the environment gives for the server
    (``HTTP(S)_PROXY`` / ``ALL_PROXY`` / ``NO_PROXY``) is resolved once, here, and ``SSL_CERT_FILE`` /
    ``SSL_CERT_DIR`` apply when ``verify`` is True.

    Requests go straight to httpx's connection-pool transports (``httpx.AsyncHTTPTransport`` /
    ``httpx.HTTPTransport``, the layer an ``httpx.AsyncClient`` sends through). A guard request needs none
    of the client's per-request work (URL merging, cookies, auth and redirect flows, event hooks): it is
    about a fifth of a raw ``AsyncClient.post``'s client time (docs/performance.md). The ``concurrency``
    connections are split over small pools of :data:`HTTPX_POOL_CONNECTIONS` (one set per event loop, one
    for blocking calls), each request going to the pool with the fewest requests in flight: a single httpx
    pool's cost per request grows with its size, so many checks in flight would otherwise slow every one.
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
        base_url, basic = split_credentials(base_url)
        if basic is not None and (api_key or any(k.lower() == "authorization" for k in headers or {})):
            raise ConfigurationError(
                "base_url carries user:password credentials and api_key or an authorization header is set too: "
                "give one of them"
            )
        self.base_url, self.root_url = normalise_base_url(base_url)
        self.retry = retry or RetryPolicy()
        self.concurrency = max(1, int(concurrency))
        self._headers = {"user-agent": f"flexguard-integrations/{__version__}", **_JSON, **(headers or {})}
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"
        elif basic is not None:
            self._headers["authorization"] = basic
        self._request_headers = httpx.Headers(self._headers)
        self._verify = ssl_verify(verify)
        self._ssl: ssl.SSLContext | None = None
        self._ssl_lock = threading.Lock()
        self._trust_env = trust_env
        self._proxy = env_proxy_for(self.base_url) if trust_env else None
        self._connect_timeout = connect_timeout
        self._shard_count = -(-self.concurrency // HTTPX_POOL_CONNECTIONS)
        per_pool = -(-self.concurrency // self._shard_count)
        self._limits = httpx.Limits(max_connections=per_pool, max_keepalive_connections=per_pool, keepalive_expiry=30.0)
        self._chat_url = self.base_url + "/chat/completions"
        self._models_url = self.base_url + "/models"
        self._chat = httpx.URL(self._chat_url)
        self._sync: _Pools[httpx.HTTPTransport] | None = None
        self._sync_lock = threading.Lock()
        self._async: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Pools[httpx.AsyncHTTPTransport]] = (
            weakref.WeakKeyDictionary()
        )  # each loop's pools; their keeper closes them when the loop shuts down (close_at_loop_shutdown)

    def __repr__(self) -> str:
        auth = ", auth=***" if "authorization" in self._headers else ""
        return f"HTTPTransport({self.base_url!r}{auth}, concurrency={self.concurrency})"

    # ----------------------------------------------------------------- connection pools and requests

    def _pool_options(self) -> dict[str, Any]:
        return {
            "verify": self._ssl_context(),
            "trust_env": self._trust_env,
            "limits": self._limits,
            "proxy": self._proxy,
        }

    def _ssl_context(self) -> ssl.SSLContext:
        """One SSL context for all the pools, built at the first request: httpx would build one per pool,
        loading the CA bundle each time (tens of milliseconds per pool)."""
        with self._ssl_lock:
            if self._ssl is None:
                self._ssl = httpx.create_ssl_context(verify=self._verify, trust_env=self._trust_env)
            return self._ssl

    def _sync_pools(self) -> _Pools[httpx.HTTPTransport]:
        if self._sync is None:
            with self._sync_lock:
                if self._sync is None:
                    options = self._pool_options()
                    self._sync = _Pools(
                        [_bound_by_deadline(httpx.HTTPTransport(**options)) for _ in range(self._shard_count)]
                    )
        return self._sync

    def _async_pools(self) -> _Pools[httpx.AsyncHTTPTransport]:
        loop = asyncio.get_running_loop()
        pools = self._async.get(loop)
        if pools is None:
            prune_closed_loops(self._async)
            options = self._pool_options()
            pools = _Pools([httpx.AsyncHTTPTransport(**options) for _ in range(self._shard_count)])
            pools.keeper = close_at_loop_shutdown(_closer(pools.pools))  # not pools.aclose: no reference cycle
            self._async[loop] = pools
        return pools

    def _request(
        self,
        method: str,
        url: httpx.URL | str,
        deadline: float,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Request:
        """One request with every timeout set from what is left of ``deadline``."""
        left = max(remaining(deadline), 0.001)
        timeout = {"connect": min(left, self._connect_timeout), "read": left, "write": left, "pool": left}
        if headers:
            merged = self._request_headers.copy()
            merged.update(headers)
        else:
            merged = self._request_headers
        return httpx.Request(method, url, headers=merged, content=content, extensions={"timeout": timeout})

    async def _asend(self, request: httpx.Request, what: str) -> httpx.Response:
        """Send and read the whole answer; httpx errors become the transport error family."""
        pools = self._async_pools()
        i = pools.take()  # no await between choosing the pool and counting the request in: no lock needed
        try:
            resp = await pools.pools[i].handle_async_request(request)
            try:
                await resp.aread()
            finally:
                await resp.aclose()
        except httpx.HTTPError as exc:
            raise _map_httpx_error(exc, what) from exc
        finally:
            pools.release(i)
        return resp

    def _send(self, request: httpx.Request, what: str, deadline: float) -> httpx.Response:
        """Blocking twin of :meth:`_asend`. httpx's timeouts apply to each socket operation, so a server that
        trickles its answer would outlast them; every socket operation of this request is bounded by what is
        left of ``deadline`` instead (:class:`_DeadlineBackend`)."""
        pools = self._sync_pools()
        with pools.lock:
            i = pools.take()
        outer = getattr(_DEADLINE, "value", None)
        _DEADLINE.value = deadline
        try:
            resp = pools.pools[i].handle_request(request)
            try:
                resp.read()
            finally:
                resp.close()
        except httpx.HTTPError as exc:
            raise _map_httpx_error(exc, what) from exc
        finally:
            _DEADLINE.value = outer
            with pools.lock:
                pools.release(i)
        return resp

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
        target = self._chat if url == self._chat_url else url
        resp = await self._asend(self._request("POST", target, deadline, payload, headers), "a check")
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
        return _models_from(await self._asend(self._request("GET", self._models_url, deadline), "GET /v1/models"))

    async def aget(self, path: str, *, deadline: float) -> httpx.Response:
        """GET a path under the server root (``/health``...); used by diagnostics."""
        return await self._asend(self._request("GET", self.root_url + path, deadline), f"GET {path}")

    async def aclose(self) -> None:
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        for owner, pools in list(self._async.items()):
            if owner is loop:
                del self._async[owner]
                # directly, not through the keeper: the loop's shutdown may be closing the keeper right now
                # (this aclose running in an async generator it closes); closing a pool twice is harmless
                await pools.aclose()
        self.close()

    # ----------------------------------------------------------------- sync

    def _post(self, url: str, payload: bytes, deadline: float, headers: Mapping[str, str] | None) -> dict[str, Any]:
        if remaining(deadline) <= 0:
            raise GuardTimeoutError("guard check deadline passed before the request was sent")
        target = self._chat if url == self._chat_url else url
        resp = self._send(self._request("POST", target, deadline, payload, headers), "a check", deadline)
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
        return _models_from(self._send(self._request("GET", self._models_url, deadline), "GET /v1/models", deadline))

    def get(self, path: str, *, deadline: float) -> httpx.Response:
        """GET a path under the server root (``/health``...); used by diagnostics."""
        return self._send(self._request("GET", self.root_url + path, deadline), f"GET {path}", deadline)

    def post_json(self, path: str, body: Mapping[str, Any], *, deadline: float) -> httpx.Response:
        """POST JSON to a path under the server root (``/tokenize``); used by diagnostics."""
        request = self._request("POST", self.root_url + path, deadline, encode_body(body))
        return self._send(request, f"POST {path}", deadline)

    def close(self) -> None:
        with self._sync_lock:
            pools, self._sync = self._sync, None
        if pools is not None:
            for pool in pools.pools:
                pool.close()


P = TypeVar("P")


class _Pools(Generic[P]):
    """Connection pools and the requests in flight on each: :meth:`take` picks the least busy pool."""

    __slots__ = ("busy", "keeper", "lock", "pools")

    def __init__(self, pools: list[P]) -> None:
        self.pools = pools
        self.busy = [0] * len(pools)
        self.lock = threading.Lock()  # blocking calls only; an event loop's pools are touched by one thread
        self.keeper: AsyncGenerator[None, None] | None = None
        """An event loop's pools: what closes them when the loop shuts down (close_at_loop_shutdown)."""

    async def aclose(self) -> None:
        """Close every pool (async pools; the blocking ones are closed by ``HTTPTransport.close``)."""
        await _closer(self.pools)()

    def take(self) -> int:
        """Index of the pool with the fewest requests in flight, counted in (the caller counts it out)."""
        busy = self.busy
        i = busy.index(min(busy)) if len(busy) > 1 else 0
        busy[i] += 1
        return i

    def release(self, i: int) -> None:
        """Count out a request :meth:`take` counted in on pool ``i``."""
        self.busy[i] -= 1


def _closer(pools: list[Any]) -> Callable[[], Awaitable[None]]:
    """What closes these async pools (it holds the list, not the :class:`_Pools` that owns the keeper)."""

    async def close() -> None:
        for pool in pools:
            await pool.aclose()

    return close


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


def _left(timeout: float | None, expired: type[Exception]) -> float | None:
    """``timeout`` cut to what is left of this thread's request deadline; ``expired`` raised when none is left."""
    deadline: float | None = getattr(_DEADLINE, "value", None)
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise expired("the guard check's deadline passed during the request")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A blocking socket stream whose every read and write ends by the request's deadline."""

    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        tls = self._stream.start_tls(ssl_context, server_hostname, _left(timeout, httpcore.ConnectTimeout))
        return _DeadlineStream(tls)

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's blocking network backend with every connection's socket operations bounded by the deadline
    of the request that uses them (a connection outlives requests: the bound is read at each operation)."""

    def __init__(self, backend: httpcore.NetworkBackend) -> None:
        self._backend = backend

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.NetworkStream:
        stream = self._backend.connect_tcp(
            host, port, _left(timeout, httpcore.ConnectTimeout), local_address, socket_options
        )
        return _DeadlineStream(stream)

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Any = None
    ) -> httpcore.NetworkStream:
        stream = self._backend.connect_unix_socket(path, _left(timeout, httpcore.ConnectTimeout), socket_options)
        return _DeadlineStream(stream)

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


def _bound_by_deadline(transport: httpx.HTTPTransport) -> httpx.HTTPTransport:
    """Give a blocking httpx transport's connection pool the :class:`_DeadlineBackend`.

    httpx does not take a network backend, so it is set on the pool it built (httpcore's ``ConnectionPool`` and
    its proxy subclasses keep it as ``_network_backend`` and hand it to every connection they open). If a future
    httpcore moves it, a check's deadline is no longer bounded on the blocking path: that is an error here,
    not a silent downgrade.
    """
    pool = getattr(transport, "_pool", None)
    backend = getattr(pool, "_network_backend", None)
    if not isinstance(backend, httpcore.NetworkBackend):
        raise GuardTransportError(
            f"httpcore {httpcore.__version__} keeps no _network_backend on its pool: the blocking transport "
            "cannot bound a check by its deadline"
        )
    pool._network_backend = _DeadlineBackend(backend)  # type: ignore[union-attr]
    return transport
