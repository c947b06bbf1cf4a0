"""Moderating a stream as it is produced: hold text back until a check has passed it.

Framework-agnostic; the LangChain and LlamaIndex streaming wrappers drive it. Items (chunks of whatever
type the wrapped stream yields) are held with their text. When the held text reaches ``chunk_chars`` at a
sentence end (or twice that anywhere), it is checked together with the last ``context_chars`` of the
text already released (as NeMo Guardrails' ``chunk_size`` / ``context_size``), with the prompt as context.
A passing check releases the held items; anything else stops the stream with that decision, and nothing
after the last passed check is ever released.

``stream_first=True`` releases items before their check (lower latency) and stops the stream at the first
failed check: text that was already released has leaked. It is documented as leaky and off by default.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .verdict import Action, Decision, Surface, Verdict

if TYPE_CHECKING:
    from .guard import Guard
    from .policy import StrictnessPolicy

T = TypeVar("T")
_SENTENCE_END = re.compile(r"[.!?。！？…;:\n]['\")\]”’]*\s*$")


@dataclass
class StreamStats:
    """What the moderation cost: checks made and the most text held back at once."""

    checks: int = 0
    max_held_chars: int = 0
    max_held_items: int = 0
    released_chars: int = 0


@dataclass
class StreamModerator(Generic[T]):
    """Hold-back buffer for one stream. Use :meth:`apush` / :meth:`aflush` (or the sync twins)."""

    guard: Guard
    prompt: str = ""
    surface: Surface = Surface.RESPONSE
    policy: StrictnessPolicy | Mapping[str, Any] | str | Path | None = None
    chunk_chars: int = 200
    context_chars: int = 50
    stream_first: bool = False
    redact_item: Callable[[str], T] | None = None
    """Builds the item that replaces held text on REDACT (e.g. ``AIMessageChunk(content=text)``); without
    it a REDACT ends the stream like a block."""
    on_decision: Callable[[Decision], None] | None = None
    """Called with every check's decision (events, metadata)."""
    stats: StreamStats = field(default_factory=StreamStats)
    decisions: list[Decision] = field(default_factory=list)
    _held: list[T] = field(default_factory=list)
    _buffer: str = ""
    _tail: str = ""
    _stopped: Decision | None = None
    _pending: list[asyncio.Task[Decision]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.chunk_chars < 1:
            raise ValueError("chunk_chars must be at least 1")
        self.context_chars = max(0, self.context_chars)

    @property
    def stopped(self) -> Decision | None:
        """The decision that ended the stream, if one did."""
        return self._stopped

    @property
    def held_chars(self) -> int:
        """Characters received but not yet checked."""
        return len(self._buffer)

    def _add(self, item: T, text: str) -> None:
        self._buffer += text
        if not self.stream_first:
            self._held.append(item)
        self.stats.max_held_chars = max(self.stats.max_held_chars, len(self._buffer))
        self.stats.max_held_items = max(self.stats.max_held_items, len(self._held))

    def _ready(self) -> bool:
        n = len(self._buffer)
        if n >= 2 * self.chunk_chars:
            return True
        return n >= self.chunk_chars and bool(_SENTENCE_END.search(self._buffer))

    def _take_window(self) -> tuple[str, str]:
        """(window to check, the released context it starts with); the buffer moves into the context."""
        context = self._tail
        window = context + self._buffer
        self._tail = window[-self.context_chars :] if self.context_chars else ""
        self.stats.released_chars += len(self._buffer)
        self._buffer = ""
        return window, context

    def _release(self) -> list[T]:
        items, self._held = self._held, []
        return items

    def _stop(self, decision: Decision) -> None:
        if self._stopped is None:
            self._stopped = decision
        self._held = []
        self._buffer = ""

    def _judge(self, decision: Decision, context: str = "") -> list[T] | None:
        """Items to release for a checked window (None when the stream must stop)."""
        self.stats.checks += 1
        self.decisions.append(decision)
        if self.on_decision is not None:
            self.on_decision(decision)
        if decision.action.passes:
            return self._release()
        redacted = decision.redacted_text
        if (
            decision.action is Action.REDACT
            and redacted is not None
            and self.redact_item is not None
            and not self.stream_first
            and redacted.startswith(context)
        ):
            # only the new text is replaced: the released context before it is kept as it was
            new_text = redacted[len(context) :]
            self._held = []
            self._tail = (context + new_text)[-self.context_chars :] if self.context_chars else ""
            return [self.redact_item(new_text)] if new_text else []
        self._stop(decision)
        return None

    def _empty(self) -> Decision:
        return Decision(action=Action.ALLOW, verdict=_EMPTY, reason="nothing to check", surface=self.surface)

    # ----------------------------------------------------------------- async

    async def _acheck(self, text: str) -> Decision:
        if not text.strip():
            return self._empty()
        if self.prompt.strip():
            return await self.guard.acheck(self.prompt, response=text, surface=self.surface, policy=self.policy)
        return await self.guard.acheck(text, surface=self.surface, policy=self.policy)

    def _collect_finished(self) -> None:
        for task in [t for t in self._pending if t.done()]:
            self._pending.remove(task)
            self._judge(task.result())

    async def apush(self, item: T, text: str) -> list[T]:
        """Add one streamed item; return the items that may be released now (possibly none)."""
        if self.stream_first:
            self._collect_finished()
            if self._stopped is not None:
                return []
            self._add(item, text)
            if self._ready():
                window, _ = self._take_window()
                self._pending.append(asyncio.ensure_future(self._acheck(window)))
            return [item]
        if self._stopped is not None:
            return []
        self._add(item, text)
        if not self._ready():
            return []
        window, context = self._take_window()
        return self._judge(await self._acheck(window), context) or []

    async def aflush(self) -> list[T]:
        """End of stream: check what is still unchecked; return held items if they pass."""
        released: list[T] = []
        if self._stopped is None and self._buffer:
            window, context = self._take_window()
            if self.stream_first:
                self._pending.append(asyncio.ensure_future(self._acheck(window)))
            else:
                released = self._judge(await self._acheck(window), context) or []
        if self._pending:
            results = await asyncio.gather(*self._pending)
            self._pending.clear()
            for decision in results:
                self._judge(decision)
        return released

    async def aclose(self) -> None:
        """Cancel checks still running (a consumer that stops early leaves nothing behind)."""
        for task in self._pending:
            task.cancel()
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        self._pending.clear()

    # ----------------------------------------------------------------- sync

    def _check(self, text: str) -> Decision:
        if not text.strip():
            return self._empty()
        if self.prompt.strip():
            return self.guard.check(self.prompt, response=text, surface=self.surface, policy=self.policy)
        return self.guard.check(text, surface=self.surface, policy=self.policy)

    def push(self, item: T, text: str) -> list[T]:
        """Blocking twin of :meth:`apush` (in ``stream_first`` mode the check runs after the release)."""
        if self._stopped is not None:
            return []
        self._add(item, text)
        if self.stream_first:
            if self._ready():
                window, _ = self._take_window()
                self._judge(self._check(window))
            return [item]
        if not self._ready():
            return []
        window, context = self._take_window()
        return self._judge(self._check(window), context) or []

    def flush(self) -> list[T]:
        """Blocking twin of :meth:`aflush`."""
        if self._stopped is not None or not self._buffer:
            return []
        window, context = self._take_window()
        released = self._judge(self._check(window), context) or []
        return [] if self.stream_first else released


_EMPTY = Verdict(risk_score=0.0)
