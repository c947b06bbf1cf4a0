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
from collections.abc import Mapping
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
    stats: StreamStats = field(default_factory=StreamStats)
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

    def _take_window(self) -> str:
        """The text to check (released context + unchecked text); the buffer moves into the context."""
        window = self._tail + self._buffer
        self._tail = window[-self.context_chars :] if self.context_chars else ""
        self.stats.released_chars += len(self._buffer)
        self._buffer = ""
        return window

    def _release(self) -> list[T]:
        items, self._held = self._held, []
        return items

    def _judge(self, decision: Decision) -> bool:
        self.stats.checks += 1
        if decision.action.passes:
            return True
        if self._stopped is None:
            self._stopped = decision
        self._held = []
        self._buffer = ""
        return False

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
                self._pending.append(asyncio.ensure_future(self._acheck(self._take_window())))
            return [item]
        if self._stopped is not None:
            return []
        self._add(item, text)
        if self._ready() and self._judge(await self._acheck(self._take_window())):
            return self._release()
        return []

    async def aflush(self) -> list[T]:
        """End of stream: check what is still unchecked; return held items if they pass."""
        if self._stopped is None and self._buffer:
            window = self._take_window()
            if self.stream_first:
                self._pending.append(asyncio.ensure_future(self._acheck(window)))
            elif self._judge(await self._acheck(window)):
                return self._release()
        if self._pending:
            results = await asyncio.gather(*self._pending)
            self._pending.clear()
            for decision in results:
                self._judge(decision)
        return []

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
                self._judge(self._check(self._take_window()))
            return [item]
        if self._ready() and self._judge(self._check(self._take_window())):
            return self._release()
        return []

    def flush(self) -> list[T]:
        """Blocking twin of :meth:`aflush`."""
        if self._stopped is not None or not self._buffer:
            return []
        passed = self._judge(self._check(self._take_window()))
        return self._release() if passed and not self.stream_first else []


_EMPTY = Verdict(risk_score=0.0)
