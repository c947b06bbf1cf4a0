"""Guard: a guard model + a transport + a strictness policy + a cache + a concurrency limit.

``check`` / ``acheck`` / ``batch`` / ``abatch`` turn texts into :class:`Decision` objects; ``verdict`` /
``averdict`` stop at the :class:`Verdict`. The async methods never block the event loop; the sync ones
are real twins on a blocking HTTP client, not wrappers around an event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from . import _telemetry
from .breaker import CircuitBreaker
from .cache import CacheStats, VerdictCache
from .errors import (
    ConfigurationError,
    ContextLengthExceededError,
    GuardInputError,
    GuardTransportError,
    GuardUnavailableError,
)
from .models.base import GuardInput, GuardModel, Role, create_model
from .policy import StrictnessPolicy
from .redact import SpanRedactor, apply_redactions, group_sentences
from .segment import chunk_text, split_sentences
from .transport.base import RetryPolicy, Transport, prune_closed_loops, remaining
from .verdict import Action, Decision, Surface, Verdict

logger = logging.getLogger("flexguard_integrations")

T = TypeVar("T")
PolicySpec = StrictnessPolicy | Mapping[str, Any] | str | Path | None
History = Sequence[tuple[Role, str]] | Sequence[Mapping[str, str]] | None


class _LogThrottle:
    """At most one line per ``interval`` seconds about a repeating event; the next line counts those held back.

    A dead guard fails every check: at thousands of checks per second, one WARNING each would bury the logs
    (and cost more than the check). ``interval`` 0 lets every line through.
    """

    __slots__ = ("_lock", "_next", "clock", "held", "interval")

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self.held = 0
        """Lines held back since the last one let through."""
        self._next = float("-inf")
        self._lock = threading.Lock()

    def admit(self, count: bool = True) -> int | None:
        """None: hold this line back (counted when ``count``). Otherwise log it now: the number held back
        before it (then reset). Lines of every kind share the interval."""
        with self._lock:
            now = self.clock()
            if now < self._next:
                if count:
                    self.held += 1
                return None
            held, self.held = self.held, 0
            self._next = now + self.interval
            return held


_GUARD_OPTIONS = frozenset(
    {
        "cache", "max_model_len", "max_text_chars", "chunk_overlap", "chars_per_token", "max_redact_segments",
        "span_redactor", "session_header", "circuit_breaker", "unavailable_log_interval",
    }
)  # fmt: skip
"""Keyword options of ``Guard.__init__`` that the ``from_endpoint`` / ``local`` constructors pass through."""

_POLICY_SCOPE: contextvars.ContextVar[PolicySpec] = contextvars.ContextVar("flexguard_policy_scope", default=None)

_POOL_WORKER = threading.local()
"""``owner``: the pool token of the Guard whose worker pool this thread belongs to (unset elsewhere)."""


def _mark_pool_worker(token: object) -> None:
    """Initializer of a Guard's worker threads: work they hand to the same pool runs in place instead."""
    _POOL_WORKER.owner = token


_PREP_LOCK = threading.Lock()
_prep_pool: ThreadPoolExecutor | None = None


def _new_prep_pool_in_child() -> None:
    """After a fork: the parent's preparation thread does not exist in the child (waiting on its queue would
    hang every long check there), and its lock may have been held by another thread at the fork."""
    global _PREP_LOCK, _prep_pool
    _PREP_LOCK = threading.Lock()
    _prep_pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_prep_pool_in_child)


def _prep_executor(replacing: ThreadPoolExecutor | None = None) -> ThreadPoolExecutor:
    """The preparation thread's executor: created at first use, or anew when ``replacing`` (shut down) is still
    the current one."""
    global _prep_pool
    with _PREP_LOCK:
        if _prep_pool is None or (replacing is not None and _prep_pool is replacing):
            _prep_pool = ThreadPoolExecutor(1, thread_name_prefix="flexguard-prepare")
        return _prep_pool


async def _off_loop(deadline: float, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` (pure computation) in the process's one preparation thread, awaited until ``deadline``
    (TimeoutError after it), in the caller's context (context variables, as ``asyncio.to_thread``).

    One thread for the process, not the loop's default executor: Python code in several threads at once holds
    the GIL in turns, and the event loop, which gives it up at every socket call, waits behind each of them (a
    2 MB text in 63 chunks stalled the loop up to 350 ms with the default executor, up to 47 ms with one
    thread). Every Guard and event loop of the process shares it, so a long text's preparation can make
    another's wait: the wait counts towards the check's deadline. A cancelled (or timed-out) caller's work
    that has not started is dropped. An executor found shut down is replaced; during interpreter shutdown,
    when no executor takes work any more, ``fn`` runs here.
    """
    pool = _prep_pool or _prep_executor()
    ctx = contextvars.copy_context()
    loop = asyncio.get_running_loop()
    try:
        future = loop.run_in_executor(pool, ctx.run, fn, *args)
    except RuntimeError:  # "cannot schedule new futures after shutdown": this executor was shut down
        try:
            future = loop.run_in_executor(_prep_executor(replacing=pool), ctx.run, fn, *args)
        except RuntimeError as exc:  # "... after interpreter shutdown": no executor takes work any more
            logger.debug("preparing a long text on the event loop: %s", exc)
            return ctx.run(fn, *args)
    async with _timeout_cm(max(remaining(deadline), 0.0)):
        return await future


@contextlib.contextmanager
def policy_scope(policy: PolicySpec) -> Iterator[None]:
    """Within this block (and the tasks it starts), checks that pass no ``policy=`` use ``policy``.

    The per-call switch for code that cannot pass arguments through: a LlamaIndex query engine, a
    postprocessor deep in a pipeline, a tenant's request handler::

        with policy_scope("strict"):
            engine.query("...")
    """
    token = _POLICY_SCOPE.set(policy)
    try:
        yield
    finally:
        _POLICY_SCOPE.reset(token)


def scoped_policy(default: PolicySpec = None) -> PolicySpec:
    """The enclosing :func:`policy_scope`'s policy, else ``default`` (integrations: per call beats config)."""
    scoped = _POLICY_SCOPE.get()
    return scoped if scoped is not None else default


DEFAULT_MAX_MODEL_LEN = 32768
_DISCOVERY_MIN_CHARS = 1024  # shorter texts never need the model's context length
_OFF_LOOP_CHARS = 8192
"""Above this many characters (text, context and history), a check's CPU-bound preparation (neutralising the
text for the request, chunking, sentence splitting) runs in the preparation thread (:func:`_off_loop`): its
worst case is about 1 µs a character (``neutralize`` on look-alike turn lines), which would stall every other
task on the event loop. Below it, a thread hop (tens of µs) would cost more than the work."""
_MAX_SPLIT_DEPTH = 8
_MIN_413_CHARS = 1024  # a request this small that a proxy still finds too large is not split further
_TOO_LARGE_TTL = 600.0  # seconds a body size refused with a 413 shapes later checks

_timeout_cm = asyncio.timeout  # a module attribute, so that tests can count the timers a check starts


@dataclass(frozen=True, slots=True)
class CheckRequest:
    """One item of a batch: the text, an optional response, surface, history and policy."""

    text: str
    response: str | None = None
    surface: Surface | str | None = None
    history: History = None
    policy: PolicySpec = None


@dataclass(frozen=True, slots=True)
class GuardStats:
    """Counters of one Guard since it was created."""

    checks: int
    guard_errors: int
    fail_open: int
    cache: CacheStats | None


class Guard:
    """Check texts with a guard model and decide what to do with them.

    Build one with :meth:`from_endpoint` (or :meth:`from_env`, :meth:`from_openai_client`) and share it:
    it is safe to use from many tasks and threads, and its connection pool is sized by ``concurrency``.

    ``timeout`` is one total deadline per check: retries, backoff, the chunks of a long text and a REDACT's
    sentence checks and re-check included. Whatever has no verdict by then is decided by ``on_error``.
    """

    def __init__(
        self,
        model: GuardModel,
        transport: Transport,
        *,
        model_name: str,
        policy: PolicySpec = "moderate",
        timeout: float = 30.0,
        concurrency: int = 16,
        cache: VerdictCache | bool | int = True,
        max_model_len: int | None = None,
        max_text_chars: int = 2_000_000,
        chunk_overlap: int = 200,
        chars_per_token: float = 1.0,
        max_redact_segments: int = 64,
        span_redactor: SpanRedactor | None = None,
        session_header: str = "x-session-id",
        circuit_breaker: CircuitBreaker | bool | None = None,
        unavailable_log_interval: float = 5.0,
    ) -> None:
        if timeout <= 0:
            raise ConfigurationError(f"timeout must be positive, got {timeout!r}")
        if concurrency < 1:
            raise ConfigurationError(f"concurrency must be at least 1, got {concurrency!r}")
        if max_text_chars < 1:
            raise ConfigurationError("max_text_chars must be at least 1")
        if unavailable_log_interval < 0:
            raise ConfigurationError(f"unavailable_log_interval must be >= 0, got {unavailable_log_interval!r}")
        self.model = model
        self.transport = transport
        self.model_name = model_name
        self.policy = StrictnessPolicy.load(policy)
        self.timeout = float(timeout)
        # never keep more checks in flight than the transport has connections for
        self.concurrency = min(int(concurrency), int(getattr(transport, "concurrency", concurrency)))
        if cache is True:
            self.cache: VerdictCache | None = VerdictCache()
        elif cache is False or cache is None:
            self.cache = None
        elif isinstance(cache, VerdictCache):
            self.cache = cache
        else:
            self.cache = VerdictCache(int(cache))
        self.max_model_len = max_model_len
        self.max_text_chars = max_text_chars
        self.chunk_overlap = chunk_overlap
        self.chars_per_token = chars_per_token
        self.max_redact_segments = max_redact_segments
        self.span_redactor = span_redactor
        self.session_header = session_header
        if circuit_breaker is True:
            self.breaker: CircuitBreaker | None = CircuitBreaker()
        elif isinstance(circuit_breaker, CircuitBreaker):
            self.breaker = circuit_breaker
        else:
            self.breaker = None
        self._discovered_len: int | None = None
        # (UTF-8 bytes of the texts, when) of the smallest request a proxy refused with a 413: for a while,
        # later checks plan their chunks under it instead of re-learning the limit with a refused request each
        self._too_large: tuple[int, float] | None = None
        self._policies: dict[Any, StrictnessPolicy] = {}
        self._sems: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
            weakref.WeakKeyDictionary()
        )
        # the semaphore of the loop that asked last: most programs run one loop, and the weak-key lookup
        # costs a weakref per check
        self._last_sem: tuple[weakref.ref[asyncio.AbstractEventLoop], asyncio.Semaphore] | None = None
        self._thread_sem = threading.BoundedSemaphore(self.concurrency)
        self._executor: ThreadPoolExecutor | None = None
        self._pool_token = object()  # marks this Guard's worker threads (_map runs nested work in place)
        self._lock = threading.Lock()
        self._checks = 0
        self._errors = 0
        self._fail_open = 0
        # "guard unavailable" warnings: one per interval, the next one counting those held back. Fail-open
        # decisions are never held back: each lets a text through unchecked.
        self._unavailable_log = _LogThrottle(unavailable_log_interval)

    # ================================================================= constructors

    @classmethod
    def from_endpoint(
        cls,
        base_url: str,
        model: str,
        family: str | None = None,
        policy: PolicySpec = "moderate",
        timeout: float = 30.0,
        *,
        api_key: str | None = None,
        headers: Mapping[str, str] | None = None,
        concurrency: int = 16,
        max_retries: int = 2,
        verify: bool | str | Any = True,
        trust_env: bool = True,
        transport: str | Transport = "httpx",
        **options: Any,
    ) -> Guard:
        """A Guard for a vLLM / SGLang endpoint (``base_url`` like ``http://localhost:8000/v1``).

        ``family`` is inferred from the model name when omitted. Family options go through ``options``
        (``scoring="logprobs"`` for Qwen3Guard; ``prompt_template=`` / ``response_template=`` /
        ``max_new_tokens=`` for FlexGuard) next to Guard options (``cache``, ``max_model_len``...).
        ``transport`` is ``"httpx"`` (default), ``"aiohttp"`` (the ``fast`` extra) or a Transport.
        """
        guard_opts = {k: options.pop(k) for k in list(options) if k in _GUARD_OPTIONS}
        guard_model = create_model(family, model, **options)
        retry = RetryPolicy(max_retries=max_retries)
        tr: Transport
        if isinstance(transport, str):
            kind = transport.strip().lower()
            common: dict[str, Any] = {
                "api_key": api_key, "headers": headers, "concurrency": concurrency, "retry": retry,
                "verify": verify, "trust_env": trust_env,
            }  # fmt: skip
            if kind == "httpx":
                from .transport.http import HTTPTransport

                tr = HTTPTransport(base_url, **common)
            elif kind == "aiohttp":
                from .transport.aiohttp import AiohttpTransport

                tr = AiohttpTransport(base_url, **common)
            else:
                raise ConfigurationError(f"unknown transport {transport!r}; expected 'httpx' or 'aiohttp'")
        else:
            tr = transport
        return cls(
            guard_model, tr, model_name=model, policy=policy, timeout=timeout, concurrency=concurrency,
            **guard_opts,
        )  # fmt: skip

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Guard:
        """A Guard configured from ``FLEXGUARD_BASE_URL``, ``FLEXGUARD_MODEL``, ``FLEXGUARD_API_KEY``,
        ``FLEXGUARD_POLICY`` (and optionally ``FLEXGUARD_FAMILY``, ``FLEXGUARD_TIMEOUT``)."""
        env = os.environ if env is None else env
        base_url = overrides.pop("base_url", None) or env.get("FLEXGUARD_BASE_URL")
        model = overrides.pop("model", None) or env.get("FLEXGUARD_MODEL")
        if not base_url:
            raise ConfigurationError(
                "FLEXGUARD_BASE_URL is not set; point it at a vLLM or SGLang server, "
                "e.g. export FLEXGUARD_BASE_URL=http://localhost:8000/v1"
            )
        if not model:
            raise ConfigurationError(
                "FLEXGUARD_MODEL is not set; give the served model name, e.g. Qwen/Qwen3Guard-Gen-8B"
            )
        kwargs: dict[str, Any] = {
            "family": env.get("FLEXGUARD_FAMILY") or None,
            "policy": env.get("FLEXGUARD_POLICY") or "moderate",
            "api_key": env.get("FLEXGUARD_API_KEY") or None,
        }
        if env.get("FLEXGUARD_TIMEOUT"):
            try:
                kwargs["timeout"] = float(env["FLEXGUARD_TIMEOUT"])
            except ValueError:
                raise ConfigurationError(
                    f"FLEXGUARD_TIMEOUT must be a number of seconds, got {env['FLEXGUARD_TIMEOUT']!r}"
                ) from None
        kwargs.update(overrides)
        return cls.from_endpoint(base_url, model, **kwargs)

    @classmethod
    def from_openai_client(
        cls,
        client: Any,
        model: str,
        family: str | None = None,
        policy: PolicySpec = "moderate",
        timeout: float = 30.0,
        **options: Any,
    ) -> Guard:
        """A Guard that sends requests through a user's ``openai.OpenAI`` and/or ``openai.AsyncOpenAI``.

        The SDK's own retries are turned off (on copies of the clients); ``max_retries`` (default 2) retries
        happen within the check's deadline, as on the other transports.
        """
        from .transport.base import RetryPolicy
        from .transport.openai_client import OpenAITransport

        retry = RetryPolicy(max_retries=int(options.pop("max_retries", 2)))
        clients = client if isinstance(client, tuple) else (client,)
        transport = OpenAITransport(*clients, retry=retry)
        return cls.from_endpoint(
            "http://unused.invalid/v1", model, family, policy, timeout, transport=transport, **options
        )

    @classmethod
    def local(
        cls,
        model: str | os.PathLike[str] = "Qwen/Qwen3Guard-Gen-0.6B",
        family: str | None = None,
        policy: PolicySpec = "moderate",
        *,
        device: str = "cpu",
        max_batch_size: int = 8,
        **options: Any,
    ) -> Guard:
        """A Guard that runs the guard model in this process with transformers (extra ``local``), no server.

        ``model`` is a hub name (downloaded once into the Hugging Face cache) or a local directory. Checks
        run on one worker thread, never on the event loop; concurrent checks are batched into one forward
        pass (``max_batch_size``, ``batch_window=`` seconds). Other options: ``torch_dtype`` (default
        ``"auto"``), ``revision``, ``trust_remote_code``, ``model_kwargs`` for the model; family options
        (``scoring="logprobs"``...) and Guard options (``timeout``, default 120 s on a CPU, ``cache``...).
        """
        from .transport.local import LocalTransport, require_local_extra

        require_local_extra()
        guard_keys = {"timeout", "concurrency", *_GUARD_OPTIONS}
        local_keys = {"torch_dtype", "batch_window", "revision", "trust_remote_code", "model_kwargs"}
        guard_opts: dict[str, Any] = {k: options.pop(k) for k in list(options) if k in guard_keys}
        local_opts = {k: options.pop(k) for k in list(options) if k in local_keys}
        guard_opts.setdefault("timeout", 120.0)
        name = os.fspath(model)
        guard_model = create_model(family, name, **options)  # before loading weights: fail fast on bad options
        transport = LocalTransport(name, device=device, max_batch_size=max_batch_size, **local_opts)
        return cls(guard_model, transport, model_name=name, policy=policy, **guard_opts)

    def __repr__(self) -> str:
        return (
            f"Guard(model={self.model_name!r}, family={self.model.family!r}, policy={self.policy.label!r}, "
            f"transport={self.transport!r})"
        )

    def __deepcopy__(self, memo: dict[int, Any]) -> Guard:
        """A Guard is a client (connection pools, worker threads, a cache): a deep copy of an object that
        holds one (a LlamaIndex postprocessor, a guarded runnable, a middleware) shares it."""
        return self

    # ================================================================= lifecycle

    def close(self) -> None:
        """Close the blocking client and the worker threads."""
        self.transport.close()
        with self._lock:
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)
                self._executor = None

    async def aclose(self) -> None:
        """Close the clients (the async one of the running loop included)."""
        await self.transport.aclose()
        self.close()

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Guard:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def stats(self) -> GuardStats:
        """Checks made, guard errors, fail-open decisions and cache counters."""
        return GuardStats(self._checks, self._errors, self._fail_open, self.cache.stats if self.cache else None)

    # ================================================================= inputs

    def _resolve_policy(self, policy: PolicySpec) -> StrictnessPolicy:
        """The policy for one call: the argument, else the enclosing :func:`policy_scope`, else the Guard's."""
        if policy is None:
            policy = _POLICY_SCOPE.get()
        if policy is None:
            return self.policy
        if isinstance(policy, StrictnessPolicy):
            return policy
        if isinstance(policy, str | Path):
            key = str(policy)
            cached = self._policies.get(key)
            if cached is None:
                cached = StrictnessPolicy.load(policy)
                self._policies[key] = cached
            return cached
        return StrictnessPolicy.load(policy)

    def _validate(self, value: Any, name: str) -> str:
        if not isinstance(value, str):
            hint = "; decode it to str first" if isinstance(value, bytes | bytearray) else ""
            raise GuardInputError(f"{name} must be a str, got {type(value).__name__}{hint}")
        if not value.strip():
            raise GuardInputError(f"{name} is empty; there is nothing to check")
        if len(value) > self.max_text_chars:
            raise GuardInputError(
                f"{name} has {len(value):,} characters, over the limit of {self.max_text_chars:,} "
                f"(Guard(max_text_chars=...)); split it or raise the limit"
            )
        return value

    def _prepare(
        self, text: Any, response: Any, surface: Surface | str | None, history: History
    ) -> tuple[GuardInput, Surface]:
        turns: tuple[tuple[Role, str], ...] = ()
        if history:
            if not isinstance(history, list | tuple):
                raise GuardInputError(
                    f"history must be a list of (role, text) turns or role/content dicts, not {type(history).__name__}"
                )
            parsed: list[tuple[Role, str]] = []
            for turn in history:
                role: Any = None
                content: Any = None
                if isinstance(turn, Mapping):
                    role, content = turn.get("role"), turn.get("content")
                elif isinstance(turn, list | tuple) and len(turn) == 2:
                    role, content = turn
                if role not in ("user", "assistant") or not isinstance(content, str):
                    raise GuardInputError(
                        f"history turns must be (role, text) with role 'user' or 'assistant'; got {turn!r}"[:200]
                    )
                parsed.append(("user" if role == "user" else "assistant", content))
            turns = tuple(parsed)
        if response is not None:
            if not isinstance(text, str):
                raise GuardInputError(f"prompt must be a str, got {type(text).__name__}")
            surf = Surface.parse(surface) if surface is not None else Surface.RESPONSE
            if surf.mode != "response":
                raise GuardInputError(
                    f"surface {surf.value!r} gets prompt moderation; pass its text alone, without response="
                )
            resp = self._validate(response, "response")
            return GuardInput(resp, "response", context=text, history=turns), surf
        surf = Surface.parse(surface) if surface is not None else Surface.PROMPT
        body = self._validate(text, "text")
        return GuardInput(body, surf.mode, history=turns), surf

    def _headers(self, session_id: str | None) -> dict[str, str] | None:
        return {self.session_header: session_id} if session_id else None

    def _cache_key(self, inp: GuardInput, surface: Surface) -> tuple[Any, ...]:
        return (
            self.model_name,
            self.model.family,
            self.model.template_version,
            surface.value,
            *inp.cache_key(),
        )

    def _chunk_chars(self, max_model_len: int) -> int:
        overhead_tokens = self.model.prompt_overhead_chars // 3
        budget = max_model_len - self.model.max_new_tokens - overhead_tokens
        return max(256, int(budget * self.chars_per_token))

    def _finish(self, verdict: Verdict, surface: Surface, started: float) -> Verdict:
        """Stamp a verdict this Guard just created (and nobody else holds) with model, surface and latency.

        Frozen dataclasses set their own fields this way in ``__init__``; it saves a ``dataclasses.replace``
        (a few µs) on every check.
        """
        stamp = object.__setattr__
        stamp(verdict, "model", self.model_name)
        stamp(verdict, "family", self.model.family)
        stamp(verdict, "surface", surface)
        stamp(verdict, "latency_ms", (time.perf_counter() - started) * 1000.0)
        return verdict

    def _probe_first(self) -> bool:
        """True when a check's pieces must not all go at once: the circuit is not closed, so only one request
        (the half-open probe) may be sent, and the others would be refused as "circuit open" although the
        probe may find the guard back."""
        return self.breaker is not None and not self.breaker.is_closed

    def _body_limited(self, limit: int, inp: GuardInput) -> int:
        """``limit`` (a chunk size, in characters) lowered for ``inp`` under the body size a proxy refused, when
        one did within the last ``_TOO_LARGE_TTL`` seconds.

        A proxy limits bytes, not characters. Requests of half the refused size got through (the re-split sent
        them), so a text from there up is planned in requests of at most that half (:func:`_piece_chars`)."""
        learned = self._too_large
        if learned is None:
            return limit
        too_large, when = learned
        if time.monotonic() - when > _TOO_LARGE_TTL:  # the proxy's limit may have been raised since
            self._too_large = None
            return limit
        half = too_large // 2
        if _total_bytes(inp) < half:
            return limit
        return min(limit, _piece_chars(half, inp))

    def _resplit_limit(self, inp: GuardInput, exc: ContextLengthExceededError, depth: int) -> int | None:
        """The chunk size for re-checking ``inp`` after ``exc``; a proxy's 413 is remembered for later checks."""
        half = _half_limit(inp, exc, depth)
        if half is not None and exc.status_code == 413:
            size = _total_bytes(inp)
            with self._lock:  # rare (a 413): pieces refused at once in worker threads log one warning per size
                learned = self._too_large
                if learned is None or size <= learned[0]:
                    self._too_large = (size, time.monotonic())
            if learned is None or size < learned[0]:
                logger.warning(
                    "a proxy in front of the guard refused a request with %d bytes of text as too large (HTTP "
                    "413); for the next %d minutes, longer texts are checked in pieces of at most %d bytes. Raise "
                    "the proxy's body limit (nginx: client_max_body_size) to check long texts in fewer requests",
                    size,
                    _TOO_LARGE_TTL // 60,
                    size // 2,
                )
        return half

    def _plan_chunks(self, inp: GuardInput, limit: int | None) -> tuple[list[str], GuardInput]:
        """The pieces to check. ``limit`` None: the text fits as is (nothing is split or trimmed)."""
        if limit is None:
            return [inp.text], inp
        pieces = chunk_text(inp.text, limit, min(self.chunk_overlap, limit // 4))
        return pieces, self._fit_context(inp, limit)

    def _fit_context(self, inp: GuardInput, limit: int) -> GuardInput:
        """Keep context and history within half the chunk budget (their most recent part is kept)."""
        trimmed = _kept_context(inp, limit)
        if trimmed is not inp:
            logger.debug("context trimmed to %d characters to fit the guard model's context", limit // 2)
        return trimmed

    # ================================================================= async core

    def _sem(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        last = self._last_sem  # one read: another thread's loop may replace it
        if last is not None and last[0]() is loop:
            return last[1]
        sem = self._sems.get(loop)
        if sem is None:
            prune_closed_loops(self._sems)
            sem = asyncio.Semaphore(self.concurrency)
            self._sems[loop] = sem
        self._last_sem = (weakref.ref(loop), sem)
        return sem

    async def _acall(
        self, inp: GuardInput, surface: Surface, deadline: float, headers: Mapping[str, str] | None
    ) -> tuple[Verdict, BaseException | None]:
        """One request for one chunk; ContextLengthExceededError propagates to the splitter."""
        key = self._cache_key(inp, surface) if self.cache is not None else None
        if key is not None and self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                return replace(hit, cached=True, latency_ms=0.0), None
        started = time.perf_counter()
        probe = 0  # the half-open probe's token when this request is the probe (only its holder hands it back)
        if self.breaker is not None:
            why, probe = self.breaker.admit()
            if why is not None:
                return self._finish(Verdict.failed(why), surface, started), None
        try:
            if _total_chars(inp) > _OFF_LOOP_CHARS:
                body = await _off_loop(deadline, self.model.request_body, inp, self.model_name)
            else:
                body = self.model.request_body(inp, self.model_name)
        except TimeoutError as exc:  # the preparation thread was busy with other long texts until the deadline
            if self.breaker is not None:
                self.breaker.abandon(probe=probe)  # no request was sent: nothing is known about the guard's health
            err = f"guard check exceeded its {self.timeout:g} s deadline while its text was prepared (no request sent)"
            return self._finish(Verdict.failed(err), surface, started), exc
        except BaseException:
            if self.breaker is not None:
                self.breaker.abandon(probe=probe)
            raise
        sem = self._sem()
        try:
            if getattr(self.transport, "bounds_deadline", False) is True and not sem.locked():
                # no queueing (acquiring cannot wait) and the transport bounds the whole request, retries
                # included, by the deadline itself: asyncio.timeout's timer would only cost time
                async with sem:
                    completion = await self.transport.acomplete(body, deadline=deadline, headers=headers)
            else:
                async with _timeout_cm(remaining(deadline) + 0.05), sem:  # queueing counts too
                    completion = await self.transport.acomplete(body, deadline=deadline, headers=headers)
        except ContextLengthExceededError as exc:
            self._breaker_failure(exc, probe)
            raise
        except GuardTransportError as exc:
            self._breaker_failure(exc, probe)
            return self._finish(Verdict.failed(str(exc)), surface, started), exc
        except TimeoutError as exc:
            self._breaker_failure(exc, probe)
            err = f"guard check exceeded its {self.timeout:g} s deadline"
            return self._finish(Verdict.failed(err), surface, started), exc
        except BaseException:
            if self.breaker is not None:
                self.breaker.abandon(probe=probe)
            raise
        return self._parsed(completion, key, surface, started), None

    async def _asplit(
        self,
        inp: GuardInput,
        surface: Surface,
        deadline: float,
        headers: Mapping[str, str] | None,
        limit: int | None,
        depth: int = 0,
    ) -> list[tuple[Verdict, BaseException | None]]:
        if limit is not None and _total_chars(inp) > _OFF_LOOP_CHARS:
            started = time.perf_counter()
            try:
                pieces, inp = await _off_loop(deadline, self._plan_chunks, inp, limit)
            except TimeoutError as exc:
                err = f"guard check exceeded its {self.timeout:g} s deadline while its text was split (no request sent)"
                return [(self._finish(Verdict.failed(err), surface, started), exc)]
        else:
            pieces, inp = self._plan_chunks(inp, limit)
        if len(pieces) == 1:
            return await self._aone(inp, pieces[0], surface, deadline, headers, depth)
        first: list[tuple[Verdict, BaseException | None]] = []
        while pieces and self._probe_first():  # one piece at a time until one has probed (a cached one does not)
            first += await self._aone(inp, pieces[0], surface, deadline, headers, depth)
            pieces = pieces[1:]
        groups = await asyncio.gather(*(self._aone(inp, p, surface, deadline, headers, depth) for p in pieces))
        return first + [item for group in groups for item in group]

    async def _aone(
        self,
        inp: GuardInput,
        piece: str,
        surface: Surface,
        deadline: float,
        headers: Mapping[str, str] | None,
        depth: int,
    ) -> list[tuple[Verdict, BaseException | None]]:
        """Check one piece of ``inp``; a piece the server finds too long is split in two and checked again."""
        sub = inp if piece is inp.text else replace(inp, text=piece)
        try:
            return [await self._acall(sub, surface, deadline, headers)]
        except ContextLengthExceededError as exc:
            return await self._ahalve(sub, exc, surface, deadline, headers, depth)

    async def _ahalve(
        self,
        inp: GuardInput,
        exc: ContextLengthExceededError,
        surface: Surface,
        deadline: float,
        headers: Mapping[str, str] | None,
        depth: int,
    ) -> list[tuple[Verdict, BaseException | None]]:
        """The server found ``inp`` too long: check it in halves, or fail when it cannot be split further."""
        half = self._resplit_limit(inp, exc, depth)
        if half is None:
            return [(Verdict.failed(str(exc), surface=surface), exc)]
        return await self._asplit(inp, surface, deadline, headers, half, depth + 1)

    async def _alimit(self, inp: GuardInput, deadline: float) -> int | None:
        """The chunk size for this text, or None when it is short enough to send whole."""
        if _total_chars(inp) <= _DISCOVERY_MIN_CHARS:
            return None
        limit = self._body_limited(self._chunk_chars(await self._adiscover_len(deadline)), inp)
        return None if _fits(inp, limit) else limit

    async def _adiscover_len(self, deadline: float) -> int:
        if self.max_model_len:
            return self.max_model_len
        if self._discovered_len is None:
            until = min(deadline, time.monotonic() + 5.0)
            try:
                # bounded here too: httpx's timeouts are per socket operation, so a trickling answer outlasts them
                async with _timeout_cm(remaining(until)):
                    models = await self.transport.amodels(deadline=until)
                self._discovered_len = _pick_max_len(models, self.model_name)
            except (GuardTransportError, TimeoutError) as exc:
                logger.info(
                    "could not read max_model_len from /v1/models (%s); assuming %d",
                    exc or "no answer before the check's deadline",
                    DEFAULT_MAX_MODEL_LEN,
                )
                self._discovered_len = DEFAULT_MAX_MODEL_LEN
        return self._discovered_len

    async def _averdicts(
        self, inp: GuardInput, surface: Surface, headers: Mapping[str, str] | None, deadline: float | None = None
    ) -> list[tuple[Verdict, BaseException | None]]:
        """The verdicts of ``inp`` (one per chunk) within ``deadline`` (default: ``timeout`` from now)."""
        if deadline is None:
            deadline = time.monotonic() + self.timeout
        if _total_chars(inp) <= _DISCOVERY_MIN_CHARS:  # the common case: one request, nothing to plan
            try:  # what _aone does, one coroutine fewer
                return [await self._acall(inp, surface, deadline, headers)]
            except ContextLengthExceededError as exc:  # the server's context is smaller still
                return await self._ahalve(inp, exc, surface, deadline, headers, 0)
        limit = await self._alimit(inp, deadline)
        return await self._asplit(inp, surface, deadline, headers, limit)

    # ================================================================= sync core

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    self.concurrency,
                    thread_name_prefix="flexguard",
                    initializer=_mark_pool_worker,
                    initargs=(self._pool_token,),
                )
            return self._executor

    def _map(self, fn: Callable[[T], Any], items: Sequence[T]) -> list[Any]:
        """``fn`` over ``items`` on the worker pool, in order. A worker of this pool runs them itself: waiting
        on its own pool could deadlock it. Any other thread (the caller's, batch()'s, a stream checker's)
        gets the pool's concurrency."""
        if len(items) <= 1 or getattr(_POOL_WORKER, "owner", None) is self._pool_token:
            return [fn(item) for item in items]
        return list(self._pool().map(fn, items))

    def _call(
        self, inp: GuardInput, surface: Surface, deadline: float, headers: Mapping[str, str] | None
    ) -> tuple[Verdict, BaseException | None]:
        key = self._cache_key(inp, surface) if self.cache is not None else None
        if key is not None and self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                return replace(hit, cached=True, latency_ms=0.0), None
        started = time.perf_counter()
        probe = 0  # the half-open probe's token when this request is the probe (only its holder hands it back)
        if self.breaker is not None:
            why, probe = self.breaker.admit()
            if why is not None:
                return self._finish(Verdict.failed(why), surface, started), None
        try:
            body = self.model.request_body(inp, self.model_name)
            if not self._thread_sem.acquire(timeout=max(remaining(deadline), 0.0)):
                raise TimeoutError
            try:
                completion = self.transport.complete(body, deadline=deadline, headers=headers)
            finally:
                self._thread_sem.release()
        except ContextLengthExceededError as exc:
            self._breaker_failure(exc, probe)
            raise
        except GuardTransportError as exc:
            self._breaker_failure(exc, probe)
            return self._finish(Verdict.failed(str(exc)), surface, started), exc
        except TimeoutError as exc:
            self._breaker_failure(exc, probe)
            err = f"guard check exceeded its {self.timeout:g} s deadline"
            return self._finish(Verdict.failed(err), surface, started), exc
        except BaseException:
            if self.breaker is not None:
                self.breaker.abandon(probe=probe)
            raise
        return self._parsed(completion, key, surface, started), None

    def _breaker_failure(self, exc: BaseException, probe: int) -> None:
        if self.breaker is not None:
            self.breaker.record_failure(exc, probe=probe)

    def _parsed(self, completion: dict[str, Any], key: Any, surface: Surface, started: float) -> Verdict:
        """The verdict of a chat completion. The server answered, so the breaker counts a success even when the
        answer cannot be read: what the guard writes depends on the text it was given (a think block cut off
        at ``max_tokens``), and a few crafted texts must not open the circuit for every other check."""
        if self.breaker is not None:
            self.breaker.record_success()
        try:
            parsed = self.model.parse_completion(completion)
        except Exception as exc:  # a parser bug, or a custom family's: an error verdict, never an escape
            logger.warning("the %s parser raised on a guard answer", self.model.family, exc_info=True)
            parsed = Verdict.failed(f"the guard answer could not be read ({type(exc).__name__}: {exc})")
        verdict = self._finish(parsed, surface, started)
        if verdict.error is None and key is not None and self.cache is not None:
            self.cache.put(key, verdict)
        return verdict

    def _split(
        self,
        inp: GuardInput,
        surface: Surface,
        deadline: float,
        headers: Mapping[str, str] | None,
        limit: int | None,
        depth: int = 0,
    ) -> list[tuple[Verdict, BaseException | None]]:
        pieces, inp = self._plan_chunks(inp, limit)

        def one(piece: str) -> list[tuple[Verdict, BaseException | None]]:
            sub = inp if piece is inp.text else replace(inp, text=piece)
            try:
                return [self._call(sub, surface, deadline, headers)]
            except ContextLengthExceededError as exc:
                half = self._resplit_limit(sub, exc, depth)
                if half is None:
                    return [(Verdict.failed(str(exc), surface=surface), exc)]
                return self._split(sub, surface, deadline, headers, half, depth + 1)

        first: list[tuple[Verdict, BaseException | None]] = []
        while len(pieces) > 1 and self._probe_first():  # as in _asplit: one at a time until one has probed
            first += one(pieces[0])
            pieces = pieces[1:]
        groups = self._map(one, pieces)
        return first + [item for group in groups for item in group]

    def _discover_len(self, deadline: float) -> int:
        if self.max_model_len:
            return self.max_model_len
        if self._discovered_len is None:
            try:
                models = self.transport.models(deadline=min(deadline, time.monotonic() + 5.0))
                self._discovered_len = _pick_max_len(models, self.model_name)
            except GuardTransportError as exc:
                logger.info(
                    "could not read max_model_len from /v1/models (%s); assuming %d",
                    exc,
                    DEFAULT_MAX_MODEL_LEN,
                )
                self._discovered_len = DEFAULT_MAX_MODEL_LEN
        return self._discovered_len

    def _verdicts(
        self, inp: GuardInput, surface: Surface, headers: Mapping[str, str] | None, deadline: float | None = None
    ) -> list[tuple[Verdict, BaseException | None]]:
        """Blocking twin of :meth:`_averdicts`."""
        if deadline is None:
            deadline = time.monotonic() + self.timeout
        limit: int | None = None
        if _total_chars(inp) > _DISCOVERY_MIN_CHARS:
            limit = self._body_limited(self._chunk_chars(self._discover_len(deadline)), inp)
            if _fits(inp, limit):
                limit = None
        return self._split(inp, surface, deadline, headers, limit)

    # ================================================================= combining

    @staticmethod
    def _worst_verdict(results: Sequence[tuple[Verdict, BaseException | None]]) -> Verdict:
        verdicts = [v for v, _ in results]
        failed = [v for v in verdicts if v.error is not None]
        worst = failed[0] if failed else max(verdicts, key=lambda v: v.risk_score)
        if len(verdicts) == 1:
            return worst
        cats = tuple(dict.fromkeys(c for v in verdicts if v.error is None for c in v.categories))
        latency = max((v.latency_ms or 0.0) for v in verdicts)
        return replace(worst, chunks=len(verdicts), categories=worst.categories or cats, latency_ms=latency)

    def _decide_all(
        self,
        results: Sequence[tuple[Verdict, BaseException | None]],
        policy: StrictnessPolicy,
        surface: Surface,
    ) -> Decision:
        """Decide each chunk; the most severe decision wins (a fail-open pass never hides a block)."""
        best: Decision | None = None
        unchecked: list[Decision] = []  # chunks let through without a verdict (fail-open)
        for verdict, exc in results:
            try:
                decision = policy.decide(verdict, surface)
            except GuardUnavailableError as err:
                raise err from exc
            if decision.fail_open:
                unchecked.append(decision)
            if best is None or _rank(decision) > _rank(best):
                best = decision
        assert best is not None
        if len(results) > 1:
            best = replace(best, verdict=replace(best.verdict, chunks=len(results)))
            if unchecked and best.action.passes and not best.fail_open:
                # the text passes, but part of it was never checked: the decision must say so
                best = replace(
                    best,
                    fail_open=True,
                    reason=f"{best.reason}; FAIL-OPEN: {len(unchecked)} of {len(results)} chunks allowed without "
                    f"a verdict ({unchecked[0].reason})",
                )
        return best

    def _unchecked(self, exc: GuardInputError, surface: Surface, policy: PolicySpec) -> Decision:
        """The decision for a text the guard cannot take (too large, say), for integrations that decide per item
        instead of raising: ``on_error`` decides, and a fail-open decision is counted and logged as FAIL-OPEN
        like any other (``stats``)."""
        decision = self._resolve_policy(policy).decide(Verdict.failed(str(exc), surface=surface), surface)
        return self._record(decision) if decision.fail_open else decision

    def _record(self, decision: Decision) -> Decision:
        with self._lock:
            self._checks += 1
            if decision.verdict.error is not None:
                self._errors += 1
            if decision.fail_open:
                self._fail_open += 1
        if decision.fail_open:
            logger.warning(
                "FAIL-OPEN: text allowed without a verdict on surface %s: %s",
                decision.surface.value if decision.surface else "?",
                decision.reason,
            )
        elif decision.verdict.error is not None:
            held = self._unavailable_log.admit()
            if held is not None:
                logger.warning(
                    "guard unavailable, decision %s: %s%s",
                    decision.action.value,
                    decision.reason,
                    f" [and {held} more since the last such warning, not logged one by one]" if held else "",
                )
        else:
            # the guard answered: say how many went unlogged (once the interval allows a line: a flapping
            # guard gets one line per interval, not two per failure)
            if (
                self._unavailable_log.held
                and not decision.verdict.cached
                and (held := self._unavailable_log.admit(count=False))
            ):
                logger.warning(
                    "guard answering again; %d decisions made without a verdict since the last warning were "
                    "not logged one by one (Guard.stats counts them all)",
                    held,
                )
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("decision %s: %s", decision.action.value, decision.reason)
        return decision

    # ================================================================= redaction

    def _redaction_plan(self, inp: GuardInput) -> list[str]:
        return group_sentences(split_sentences(inp.text), self.max_redact_segments)

    def _apply_redactions(
        self, policy: StrictnessPolicy, surface: Surface, segments: Sequence[str], seg_verdicts: Sequence[Verdict]
    ) -> tuple[str, str, list[Verdict | None]]:
        """(redacted text, the same with bare markers for the re-check, the verdict behind each redaction)."""
        flagged: list[Verdict | None] = [v if policy.is_over(v, surface) else None for v in seg_verdicts]
        shown = apply_redactions(segments, flagged, span_redactor=self.span_redactor)
        checked = apply_redactions(segments, flagged, span_redactor=self.span_redactor, labelled=False)
        return shown, checked, flagged

    def _after_redaction(
        self,
        decision: Decision,
        redacted: str,
        flagged: Sequence[Verdict | None],
        recheck: Sequence[tuple[Verdict, BaseException | None]],
        policy: StrictnessPolicy,
        surface: Surface,
    ) -> Decision:
        n = sum(1 for f in flagged if f is not None)
        again = self._decide_all(recheck, policy, surface)  # on_error: raise raises here
        if again.action is Action.ALLOW or again.action is Action.FLAG:
            if again.fail_open:  # the redacted text passes without (all of) its re-check: say so
                return replace(
                    decision,
                    redacted_text=redacted,
                    fail_open=True,
                    reason=f"{decision.reason}; redacted {n} of {len(flagged)} sentences; re-check FAIL-OPEN "
                    f"({again.reason})",
                )
            return replace(
                decision,
                redacted_text=redacted,
                reason=f"{decision.reason}; redacted {n} of {len(flagged)} sentences; re-check passed",
            )
        if again.verdict.error is not None:  # no verdict on the redacted text (deadline gone...): on_error blocks
            return replace(
                decision,
                verdict=again.verdict,  # the failed re-check: counted and logged as a guard error
                action=again.action,
                route=None,
                redacted_text=None,
                rule=f"{again.rule} (redaction re-check)",
                reason=f"{decision.reason}; the re-check after redacting {n} of {len(flagged)} sentences got no "
                f"verdict: {again.reason}",
            )
        return replace(
            decision,
            action=Action.BLOCK,
            route=None,
            redacted_text=None,
            rule=f"{decision.rule} (redaction re-check)",
            reason=f"{decision.reason}; still over the threshold after redacting {n} of {len(flagged)} "
            f"sentences ({again.reason}) -> block",
        )

    async def _aredact(
        self,
        decision: Decision,
        inp: GuardInput,
        policy: StrictnessPolicy,
        surface: Surface,
        headers: Any,
        deadline: float,
    ) -> Decision:
        """Sentences, then the re-check, all within the check's own ``deadline``."""
        if _total_chars(inp) > _OFF_LOOP_CHARS:
            started = time.perf_counter()
            try:
                segments = await _off_loop(deadline, self._redaction_plan, inp)
            except TimeoutError as exc:  # as when every sentence's check fails: all of it redacted, on_error decides
                err = f"guard check exceeded its {self.timeout:g} s deadline while its text was split into sentences"
                failed = self._finish(Verdict.failed(err), surface, started)
                redacted, _, flagged = self._apply_redactions(policy, surface, [inp.text], [failed])
                return self._after_redaction(decision, redacted, flagged, [(failed, exc)], policy, surface)
        else:
            segments = self._redaction_plan(inp)
        seg_results = await asyncio.gather(
            *(self._averdicts(replace(inp, text=s), surface, headers, deadline) for s in segments if s.strip())
        )
        seg_verdicts = _align(segments, [self._worst_verdict(r) for r in seg_results])
        redacted, checked, flagged = self._apply_redactions(policy, surface, segments, seg_verdicts)
        recheck = await self._averdicts(replace(inp, text=checked), surface, headers, deadline)
        return self._after_redaction(decision, redacted, flagged, recheck, policy, surface)

    def _redact(
        self,
        decision: Decision,
        inp: GuardInput,
        policy: StrictnessPolicy,
        surface: Surface,
        headers: Any,
        deadline: float,
    ) -> Decision:
        """Blocking twin of :meth:`_aredact`."""
        segments = self._redaction_plan(inp)
        live = [s for s in segments if s.strip()]
        seg_results = self._map(lambda s: self._verdicts(replace(inp, text=s), surface, headers, deadline), live)
        seg_verdicts = _align(segments, [self._worst_verdict(r) for r in seg_results])
        redacted, checked, flagged = self._apply_redactions(policy, surface, segments, seg_verdicts)
        recheck = self._verdicts(replace(inp, text=checked), surface, headers, deadline)
        return self._after_redaction(decision, redacted, flagged, recheck, policy, surface)

    # ================================================================= public API

    async def averdict(
        self,
        text: str,
        response: str | None = None,
        *,
        surface: Surface | str | None = None,
        history: History = None,
        session_id: str | None = None,
    ) -> Verdict:
        """The guard's verdict on a text (the worst chunk for long texts), without applying a policy."""
        inp, surf = self._prepare(text, response, surface, history)
        return self._worst_verdict(await self._averdicts(inp, surf, self._headers(session_id)))

    def verdict(
        self,
        text: str,
        response: str | None = None,
        *,
        surface: Surface | str | None = None,
        history: History = None,
        session_id: str | None = None,
    ) -> Verdict:
        """Blocking twin of :meth:`averdict`."""
        inp, surf = self._prepare(text, response, surface, history)
        return self._worst_verdict(self._verdicts(inp, surf, self._headers(session_id)))

    async def acheck(
        self,
        text: str,
        response: str | None = None,
        *,
        surface: Surface | str | None = None,
        policy: PolicySpec = None,
        history: History = None,
        session_id: str | None = None,
    ) -> Decision:
        """Check a text and decide. ``acheck(text)`` moderates a prompt; ``acheck(prompt, response=text)``
        moderates a response with its prompt as context. ``surface`` picks per-surface rules (and the
        moderation mode when no response is given); ``policy`` overrides the Guard's policy for this call.
        """
        inp, surf = self._prepare(text, response, surface, history)
        pol = self._resolve_policy(policy)
        headers = self._headers(session_id)
        deadline = time.monotonic() + self.timeout  # one for the whole check: chunks and redaction included
        with _telemetry.span("flexguard.check", surface=surf, model=self.model_name) as current:
            results = await self._averdicts(inp, surf, headers, deadline)
            decision = self._decide_all(results, pol, surf)
            if decision.action is Action.REDACT:
                decision = await self._aredact(decision, inp, pol, surf, headers, deadline)
            _telemetry.record_decision(current, decision)
        return self._record(decision)

    def check(
        self,
        text: str,
        response: str | None = None,
        *,
        surface: Surface | str | None = None,
        policy: PolicySpec = None,
        history: History = None,
        session_id: str | None = None,
    ) -> Decision:
        """Blocking twin of :meth:`acheck`."""
        inp, surf = self._prepare(text, response, surface, history)
        pol = self._resolve_policy(policy)
        headers = self._headers(session_id)
        deadline = time.monotonic() + self.timeout  # one for the whole check: chunks and redaction included
        with _telemetry.span("flexguard.check", surface=surf, model=self.model_name) as current:
            results = self._verdicts(inp, surf, headers, deadline)
            decision = self._decide_all(results, pol, surf)
            if decision.action is Action.REDACT:
                decision = self._redact(decision, inp, pol, surf, headers, deadline)
            _telemetry.record_decision(current, decision)
        return self._record(decision)

    @staticmethod
    def _item(item: str | CheckRequest | Mapping[str, Any] | tuple[str, str]) -> CheckRequest:
        if isinstance(item, CheckRequest):
            return item
        if isinstance(item, str):
            return CheckRequest(item)
        if isinstance(item, tuple) and len(item) == 2:
            return CheckRequest(item[0], response=item[1])
        if isinstance(item, Mapping):
            try:
                return CheckRequest(**item)
            except TypeError as exc:
                raise GuardInputError(f"bad batch item {dict(item)!r}: {exc}"[:300]) from exc
        raise GuardInputError(
            f"batch items must be str, (prompt, response), dict or CheckRequest; got {type(item).__name__}"
        )

    async def abatch(
        self,
        items: Iterable[str | CheckRequest | Mapping[str, Any] | tuple[str, str]],
        *,
        surface: Surface | str | None = None,
        policy: PolicySpec = None,
        return_exceptions: bool = False,
    ) -> list[Decision | BaseException]:
        """Check many texts concurrently (bounded by ``concurrency``); results keep the input order."""
        reqs = [self._item(i) for i in items]
        slots = asyncio.Semaphore(self.concurrency)

        async def run(r: CheckRequest) -> Decision:
            # each item's deadline starts when it gets a slot, so a long batch does not time out in the queue
            async with slots:
                return await self.acheck(
                    r.text, r.response, surface=r.surface or surface, policy=r.policy or policy, history=r.history
                )

        return list(await asyncio.gather(*(run(r) for r in reqs), return_exceptions=return_exceptions))

    def batch(
        self,
        items: Iterable[str | CheckRequest | Mapping[str, Any] | tuple[str, str]],
        *,
        surface: Surface | str | None = None,
        policy: PolicySpec = None,
        return_exceptions: bool = False,
    ) -> list[Decision | BaseException]:
        """Blocking twin of :meth:`abatch`, on a pool of ``concurrency`` threads."""
        reqs = [self._item(i) for i in items]
        if policy is None:  # worker threads do not inherit the caller's policy_scope
            policy = _POLICY_SCOPE.get()

        def run(r: CheckRequest) -> Decision | BaseException:
            try:
                return self.check(
                    r.text,
                    r.response,
                    surface=r.surface or surface,
                    policy=r.policy or policy,
                    history=r.history,
                )
            except Exception as exc:
                if return_exceptions:
                    return exc
                raise

        if len(reqs) <= 1:
            return [run(r) for r in reqs]
        with ThreadPoolExecutor(min(self.concurrency, len(reqs)), thread_name_prefix="flexguard-batch") as pool:
            return list(pool.map(run, reqs))


def _total_chars(inp: GuardInput) -> int:
    return len(inp.text) + len(inp.context) + sum(len(t) for _, t in inp.history)


def _total_bytes(inp: GuardInput) -> int:
    """UTF-8 bytes of the request's texts (what a proxy's body limit counts, the JSON envelope aside)."""
    size = _utf8_len(inp.text) + _utf8_len(inp.context)
    return size + sum(_utf8_len(t) for _, t in inp.history)


def _kept_context(inp: GuardInput, limit: int) -> GuardInput:
    """``inp`` with its context and history within half of ``limit`` characters (their most recent part)."""
    budget = limit // 2
    ctx_len = len(inp.context) + sum(len(t) for _, t in inp.history)
    if ctx_len <= budget:
        return inp
    context = inp.context[-budget:] if len(inp.context) > budget else inp.context
    left = budget - len(context)
    kept: list[tuple[Role, str]] = []
    for role, content in reversed(inp.history):
        if left <= 0:
            break
        kept.append((role, content[-left:]))
        left -= len(content)
    return replace(inp, context=context, history=tuple(reversed(kept)))


def _piece_chars(budget: int, inp: GuardInput) -> int:
    """The largest chunk size (characters of text) whose requests stay within ``budget`` bytes: a piece of the
    text at its own bytes per character, plus the context and history ``_fit_context`` keeps with it, counted
    in the bytes of what it keeps (the prompt first, then the most recent history: possibly denser than the
    average). Found by bisection; 32 at the least."""
    density = _utf8_len(inp.text) / len(inp.text) if inp.text else 1.0

    def fits(limit: int) -> bool:
        kept = _kept_context(inp, limit)
        context_bytes = _utf8_len(kept.context) + sum(_utf8_len(t) for _, t in kept.history)
        return density * limit + context_bytes <= budget

    low, high = 32, max(32, int(budget / density))
    if fits(high):
        return high
    while high - low > 1:  # fits(low) or low is the floor; fits(high) is False
        mid = (low + high) // 2
        if fits(mid):
            low = mid
        else:
            high = mid
    return low


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _fits(inp: GuardInput, limit: int) -> bool:
    """True when the text fits one chunk and its context fits the context budget (half a chunk)."""
    return len(inp.text) <= limit and _total_chars(inp) - len(inp.text) <= limit // 2


def _half_limit(inp: GuardInput, exc: ContextLengthExceededError, depth: int) -> int | None:
    """The chunk size for re-checking an input the server found too long, or None when it is split no further.

    Halves the whole request (text, context and history: ``_fit_context`` keeps the context within half a
    chunk), so a short answer to a long prompt gets its prompt trimmed instead of failing. A 413 (a body over a
    proxy's limit) on an input under ``_MIN_413_CHARS`` is not split: what still does not fit at that size is
    the proxy's limit, not the text, and halving further would only multiply requests that all fail.
    """
    total = _total_chars(inp)
    if depth >= _MAX_SPLIT_DEPTH or total < 64 or (exc.status_code == 413 and total < _MIN_413_CHARS):
        return None
    return max(32, total // 2)


def _rank(decision: Decision) -> tuple[int, int, float]:
    # the most severe action; among equals a real verdict beats a fail-open pass (which _decide_all then
    # marks fail-open), then the higher risk
    return (decision.action.severity, 0 if decision.fail_open else 1, decision.verdict.risk_score)


def _align(segments: Sequence[str], verdicts: Sequence[Verdict]) -> list[Verdict]:
    """Give blank segments a harmless verdict so segments and verdicts line up."""
    it = iter(verdicts)
    out: list[Verdict] = []
    for seg in segments:
        out.append(next(it) if seg.strip() else Verdict(risk_score=0.0))
    return out


def _pick_max_len(models: Sequence[Mapping[str, Any]], name: str) -> int:
    chosen = next((m for m in models if m.get("id") == name), models[0] if models else None)
    value = chosen.get("max_model_len") if chosen else None
    if isinstance(value, int) and value > 0:
        return value
    logger.info("/v1/models gave no max_model_len for %s; assuming %d", name, DEFAULT_MAX_MODEL_LEN)
    return DEFAULT_MAX_MODEL_LEN
