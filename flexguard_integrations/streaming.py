"""Moderating a stream as it is produced: hold text back until a check has passed it.

Framework-agnostic; the LangChain and LlamaIndex streaming wrappers drive it. Items (chunks of whatever
type the wrapped stream yields) are held with their text. When the held text reaches ``chunk_chars`` at a
sentence end (or twice that anywhere), it becomes a *window*: it is checked together with the last
``context_chars`` of the text before it (as NeMo Guardrails' ``chunk_size`` / ``context_size``), with the
prompt as context. The first window is smaller (``first_chunk_chars``, 50 by default): nothing reaches the
reader before the first check has passed, so its size sets the time to first token.

Checks are pipelined: a window's check runs in the background (an asyncio task, or a worker thread for the
blocking twins) while the wrapped stream keeps being pulled, so a slow guard never pauses the stream. At most
``max_pending`` checks run at once; while that many are in flight, new text keeps accumulating into the next
(larger) window instead of waiting. Windows are released strictly in order: a window's items go out once its
own check and every earlier window's check have passed. A window that does not pass stops the stream with
that decision: nothing from it or after it is ever released, the checks of later windows are cancelled and
the wrapped stream is closed.

:meth:`StreamModerator.amoderate` / :meth:`StreamModerator.moderate` wrap a whole stream: the source is
pulled by a producer (a task, or a thread for the blocking twin) so that passed text is released the moment
its check returns, even while the source is between items. :meth:`~StreamModerator.apush` /
:meth:`~StreamModerator.push` drive it item by item instead (passed text then goes out at the next push or
at the flush).

``stream_first=True`` releases items before their check (lower latency) and stops the stream at the first
failed check: text that was already released has leaked. It is documented as leaky and off by default.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import queue
import re
import threading
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterable, Callable, Generator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .verdict import Action, Decision, Surface, Verdict

if TYPE_CHECKING:
    from .guard import Guard
    from .policy import StrictnessPolicy

T = TypeVar("T")
_SENTENCE_END = re.compile(r"[.!?。！？…;:\n]['\")\]”’]*\s*$")


def check_window_sizes(chunk_chars: int, first_chunk_chars: int | None, prefix: str = "") -> None:
    """ValueError naming the option (``prefix`` + its name, as the caller spells it) unless the sizes are valid.

    The streaming wrappers call it when they are built, so a bad size fails there, not at the first stream.
    """
    if not isinstance(chunk_chars, int) or chunk_chars < 1:
        raise ValueError(f"{prefix}chunk_chars must be an integer of at least 1, got {chunk_chars!r}")
    if first_chunk_chars is not None and (not isinstance(first_chunk_chars, int) or first_chunk_chars < 1):
        raise ValueError(
            f"{prefix}first_chunk_chars must be an integer of at least 1 (or None: the first window like the "
            f"others), got {first_chunk_chars!r}"
        )


@dataclass
class StreamStats:
    """What the moderation cost: checks made, the most text held back at once, the most checks in flight.

    ``checked_chars`` counts the stream's characters sent to checks (each once; the earlier context a window
    starts with is not counted again), ``released_chars`` the characters of the text released to the
    reader (the redacted text where a window was redacted; with ``stream_first``, everything received
    before the stream stopped).
    """

    checks: int = 0
    max_held_chars: int = 0
    max_held_items: int = 0
    checked_chars: int = 0
    released_chars: int = 0
    max_in_flight: int = 0


@dataclass
class _Window(Generic[T]):
    """One checked stretch of the stream: its items (empty under ``stream_first``) and its running check."""

    check: asyncio.Future[Decision] | concurrent.futures.Future[Decision]
    items: list[T]
    context: str
    chars: int


@dataclass
class StreamModerator(Generic[T]):
    """Hold-back buffer for one stream.

    Drive it with :meth:`amoderate` / :meth:`moderate` (wrap a whole stream), or item by item with
    :meth:`apush` + :meth:`aflush` + :meth:`aclose` (blocking twins :meth:`push`, :meth:`flush`, :meth:`close`).
    """

    guard: Guard
    prompt: str = ""
    surface: Surface = Surface.RESPONSE
    policy: StrictnessPolicy | Mapping[str, Any] | str | Path | None = None
    chunk_chars: int = 200
    context_chars: int = 50
    first_chunk_chars: int | None = 50
    """Size of the first window (capped at ``chunk_chars``; None: the same as the others). The reader sees
    nothing before the first window's check has passed, so a small one cuts the time to first token; later
    windows are ``chunk_chars`` and give the guard more text at once."""
    stream_first: bool = False
    redact_item: Callable[[str], T] | None = None
    """Builds the item that replaces held text on REDACT (e.g. ``AIMessageChunk(content=text)``); without
    it a REDACT ends the stream like a block."""
    on_decision: Callable[[Decision], None] | None = None
    """Called with every check's decision (events, metadata), in stream order."""
    max_pending: int = 4
    """Checks allowed in flight at once; beyond it, text accumulates into the next window (nothing waits)."""
    stats: StreamStats = field(default_factory=StreamStats)
    decisions: list[Decision] = field(default_factory=list)
    _held: list[T] = field(default_factory=list)
    _buffer: str = ""
    _tail: str = ""
    _stopped: Decision | None = None
    _taken: int = 0
    _windows: deque[_Window[T]] = field(default_factory=deque)
    _cancelled: list[asyncio.Future[Decision]] = field(default_factory=list)
    _executor: concurrent.futures.ThreadPoolExecutor | None = None

    def __post_init__(self) -> None:
        check_window_sizes(self.chunk_chars, self.first_chunk_chars)
        if self.max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self.context_chars = max(0, self.context_chars)

    @property
    def stopped(self) -> Decision | None:
        """The decision that ended the stream, if one did."""
        return self._stopped

    @property
    def held_chars(self) -> int:
        """Characters received but not yet released (``stream_first``: not yet checked)."""
        return len(self._buffer) + sum(w.chars for w in self._windows)

    @property
    def in_flight(self) -> int:
        """Checks running now."""
        return len(self._windows)

    # ----------------------------------------------------------------- pure bookkeeping

    def _add(self, item: T, text: str) -> None:
        self._buffer += text
        if not self.stream_first:
            self._held.append(item)
        self.stats.max_held_chars = max(self.stats.max_held_chars, self.held_chars)
        held_items = len(self._held) + sum(len(w.items) for w in self._windows)
        self.stats.max_held_items = max(self.stats.max_held_items, held_items)

    def _ready(self, ended: bool = False) -> bool:
        """Whether the held text makes a window now (``ended``: whatever is left, at the end of the stream)."""
        if self._stopped is not None or len(self._windows) >= self.max_pending:
            return False
        n = len(self._buffer)
        if ended:
            return n > 0
        size = self.chunk_chars
        if not self._taken and self.first_chunk_chars is not None:
            size = min(size, self.first_chunk_chars)
        if n >= 2 * size:
            return True
        return n >= size and bool(_SENTENCE_END.search(self._buffer))

    def _take_window(self) -> tuple[str, str, list[T], int]:
        """(text to check, the earlier context it starts with, its items, its new characters)."""
        context = self._tail
        chars = len(self._buffer)
        self._taken += 1
        window = context + self._buffer
        self._tail = window[-self.context_chars :] if self.context_chars else ""
        self.stats.checked_chars += chars
        self._buffer = ""
        items, self._held = self._held, []
        return window, context, items, chars

    def _queue(
        self,
        check: asyncio.Future[Decision] | concurrent.futures.Future[Decision],
        taken: tuple[str, str, list[T], int],
    ) -> None:
        _, context, items, chars = taken
        self._windows.append(_Window(check, items, context, chars))
        self.stats.max_in_flight = max(self.stats.max_in_flight, len(self._windows))

    def _stop(self, decision: Decision) -> None:
        if self._stopped is None:
            self._stopped = decision
        self._held = []
        self._buffer = ""
        self._cancel_windows()

    def _cancel_windows(self) -> None:
        for window in self._windows:
            window.check.cancel()
            if isinstance(window.check, asyncio.Future):
                self._cancelled.append(window.check)
        self._windows.clear()

    def _judge(self, window: _Window[T], decision: Decision) -> list[T] | None:
        """Items to release for a checked window (None when the stream must stop)."""
        self.stats.checks += 1
        self.decisions.append(decision)
        released = self._outcome(window, decision)
        if self.on_decision is not None:  # after a stop is recorded, so the listener sees it
            self.on_decision(decision)
        return released

    def _outcome(self, window: _Window[T], decision: Decision) -> list[T] | None:
        if decision.action.passes:
            if not self.stream_first:
                self.stats.released_chars += window.chars
            return window.items
        redacted = decision.redacted_text
        context = window.context
        if (
            decision.action is Action.REDACT
            and redacted is not None
            and self.redact_item is not None
            and not self.stream_first
            and redacted.startswith(context)
        ):
            # only the new text is replaced: the released context before it is kept as it was
            new_text = redacted[len(context) :]
            if not self._windows:  # no later window took the unredacted text as its context yet
                self._tail = (context + new_text)[-self.context_chars :] if self.context_chars else ""
            self.stats.released_chars += len(new_text)
            return [self.redact_item(new_text)] if new_text else []
        self._stop(decision)
        return None

    def _with_first(self, item: T, text: str, released: list[T]) -> list[T]:
        """What a push releases: with ``stream_first`` the pushed item too (unless the stream has stopped)."""
        if not self.stream_first or self._stopped is not None:
            return released
        self.stats.released_chars += len(text)
        return [item, *released]

    def _release_done(self) -> list[T]:
        """Judge finished checks at the head of the queue, in order; return what they release."""
        released: list[T] = []
        while self._windows and self._windows[0].check.done():
            window = self._windows.popleft()
            items = self._judge(window, window.check.result())
            if items is None:
                break
            released += items
        return released

    def _empty(self) -> Decision:
        return Decision(action=Action.ALLOW, verdict=_EMPTY, reason="nothing to check", surface=self.surface)

    # ----------------------------------------------------------------- async

    async def _acheck(self, text: str) -> Decision:
        if not text.strip():
            return self._empty()
        if self.prompt.strip():
            return await self.guard.acheck(self.prompt, response=text, surface=self.surface, policy=self.policy)
        return await self.guard.acheck(text, surface=self.surface, policy=self.policy)

    def _astart(self, ended: bool = False, on_done: Callable[[Any], None] | None = None) -> None:
        """Start the check of the held text if it makes a window now."""
        if self._ready(ended):
            taken = self._take_window()
            task = asyncio.ensure_future(self._acheck(taken[0]))
            if on_done is not None:
                task.add_done_callback(on_done)
            self._queue(task, taken)

    async def _reap(self) -> None:
        """Wait for the checks cancelled by a stop, so no task outlives the stream."""
        if self._cancelled:
            cancelled, self._cancelled = self._cancelled, []
            await asyncio.gather(*cancelled, return_exceptions=True)

    async def apush(self, item: T, text: str) -> list[T]:
        """Add one streamed item; return the items that may be released now (possibly none). Never waits
        for a check: a full window's check starts in the background and its items go out at a later push."""
        if self._stopped is not None:
            return []
        self._add(item, text)
        released = self._release_done()
        self._astart()
        await self._reap()
        return self._with_first(item, text, released)

    async def adrain(self) -> AsyncGenerator[T, None]:
        """End of stream: check what is still unchecked and yield held items as their checks pass."""
        while True:
            self._astart(ended=True)
            if self._stopped is not None or not self._windows:
                break
            head = self._windows[0].check
            assert isinstance(head, asyncio.Future)
            await asyncio.wait([head])
            for item in self._release_done():
                yield item
        await self._reap()

    async def aflush(self) -> list[T]:
        """End of stream: like :meth:`adrain`, returning everything released at once."""
        return [item async for item in self.adrain()]

    async def aclose(self) -> None:
        """Cancel checks still running (a consumer that stops early leaves nothing behind)."""
        self._cancel_windows()
        await self._reap()

    async def amoderate(self, source: AsyncIterable[T], text_of: Callable[[T], str]) -> AsyncGenerator[T, None]:
        """Moderate a whole stream: yield the items of ``source`` that passed, in order, each as soon as its
        check (and every earlier one) has passed.

        ``source`` is pulled by a producer task and closed (``aclose``) when the stream ends, fails a check or
        the consumer stops early; checks still running then are cancelled. After a failed check
        :attr:`stopped` holds the decision (the caller emits its refusal). An error raised by ``source`` is
        re-raised here.
        """
        events: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

        def on_done(_: Any) -> None:
            events.put_nowait((_CHECKED, None))

        async def produce() -> None:
            try:
                async for item in source:
                    events.put_nowait((_ITEM, item))
                events.put_nowait((_END, None))
            except Exception as exc:  # handed to the consumer, which re-raises it
                events.put_nowait((_ERROR, exc))
            finally:
                aclose = getattr(source, "aclose", None)
                if aclose is not None:
                    await aclose()

        producer = asyncio.ensure_future(produce())
        ended = False
        try:
            while True:
                released = self._release_done()
                self._astart(ended, on_done)
                for out in released:
                    yield out
                if self._stopped is not None or (ended and not self._windows):
                    return
                kind, value = await events.get()
                if kind == _ITEM:
                    text = text_of(value)
                    self._add(value, text)
                    if self.stream_first:  # released at once, checked afterwards
                        self.stats.released_chars += len(text)
                        yield value
                elif kind == _END:
                    ended = True
                elif kind == _ERROR:
                    raise value
        finally:
            producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)
            await self.aclose()

    # ----------------------------------------------------------------- sync

    def _check(self, text: str) -> Decision:
        if not text.strip():
            return self._empty()
        if self.prompt.strip():
            return self.guard.check(self.prompt, response=text, surface=self.surface, policy=self.policy)
        return self.guard.check(text, surface=self.surface, policy=self.policy)

    def _start(self, ended: bool = False, on_done: Callable[[Any], None] | None = None) -> None:
        """Blocking-side twin of :meth:`_astart`: the check runs in a worker thread."""
        if not self._ready(ended):
            return
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=self.max_pending, thread_name_prefix="flexguard-stream"
            )
        taken = self._take_window()
        ctx = contextvars.copy_context()  # policy_scope and tracing context follow the check into the thread
        future = self._executor.submit(ctx.run, self._check, taken[0])
        if on_done is not None:
            future.add_done_callback(on_done)
        self._queue(future, taken)

    def push(self, item: T, text: str) -> list[T]:
        """Blocking twin of :meth:`apush` (the check runs in a worker thread; nothing waits for it)."""
        if self._stopped is not None:
            return []
        self._add(item, text)
        released = self._release_done()
        self._start()
        return self._with_first(item, text, released)

    def drain(self) -> Generator[T, None, None]:
        """Blocking twin of :meth:`adrain`."""
        while True:
            self._start(ended=True)
            if self._stopped is not None or not self._windows:
                return
            head = self._windows[0].check
            assert isinstance(head, concurrent.futures.Future)
            concurrent.futures.wait([head])
            yield from self._release_done()

    def flush(self) -> list[T]:
        """Blocking twin of :meth:`aflush`."""
        return list(self.drain())

    def close(self) -> None:
        """Blocking twin of :meth:`aclose`: cancel queued checks and wait for the ones already running (a
        thread cannot be interrupted; each ends within its check's deadline, and its result is dropped), so
        no worker thread outlives the stream."""
        self._cancel_windows()
        self._cancelled.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def moderate(self, source: Iterable[T], text_of: Callable[[T], str]) -> Generator[T, None, None]:
        """Blocking twin of :meth:`amoderate`: ``source`` is pulled (and finally closed) by a producer thread."""
        events: queue.SimpleQueue[tuple[int, Any]] = queue.SimpleQueue()
        quit_ = threading.Event()

        def produce() -> None:
            try:
                for item in source:
                    if quit_.is_set() or self._stopped is not None:
                        return
                    events.put((_ITEM, item))
                events.put((_END, None))
            except Exception as exc:  # handed to the consumer, which re-raises it
                events.put((_ERROR, exc))
            finally:
                close = getattr(source, "close", None)
                if close is not None:
                    close()

        producer = threading.Thread(
            target=contextvars.copy_context().run, args=(produce,), name="flexguard-stream-source", daemon=True
        )
        producer.start()
        ended = False
        try:
            while True:
                released = self._release_done()
                self._start(ended, lambda _: events.put((_CHECKED, None)))
                yield from released
                if self._stopped is not None or (ended and not self._windows):
                    return
                kind, value = events.get()
                if kind == _ITEM:
                    text = text_of(value)
                    self._add(value, text)
                    if self.stream_first:  # released at once, checked afterwards
                        self.stats.released_chars += len(text)
                        yield value
                elif kind == _END:
                    ended = True
                elif kind == _ERROR:
                    raise value
        finally:
            quit_.set()  # the producer stops at its next item (it may be waiting on the source now)
            self.close()


_ITEM, _END, _ERROR, _CHECKED = range(4)
_EMPTY = Verdict(risk_score=0.0)
