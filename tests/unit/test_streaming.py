"""StreamModerator: pipelined checks, in-order release, stops, cancellation, and the blocking twins.

The guard is a scripted stand-in (the moderator only calls ``acheck`` / ``check``): each check waits for a
per-window gate the test opens, so the order in which checks finish is under the test's control. The
end-to-end behaviour against the emulated guard server is covered in tests/integration (LangChain
``guarded`` and LlamaIndex ``GuardedQueryEngine`` streams).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from flexguard_integrations import Action, Decision, Surface, Verdict
from flexguard_integrations.streaming import StreamModerator

# three windows of 10 characters each (chunk_chars=10, each ends a sentence)
WINDOWS = ["aaaa aaaa.", "bbbb bbbb.", "cccc cccc."]
ITEMS = [piece for w in WINDOWS for piece in (w[:5], w[5:])]


def _decision(action: Action, redacted: str | None = None) -> Decision:
    score = 0.0 if action.passes else 90.0
    return Decision(
        action=action,
        verdict=Verdict(risk_score=score),
        reason="scripted",
        redacted_text=redacted,
        surface=Surface.RESPONSE,
    )


class ScriptedGuard:
    """Answers each check with the action scripted for the window's first letter, once its gate opens."""

    def __init__(self, actions: dict[str, Action] | None = None, redacted: dict[str, str] | None = None) -> None:
        self.actions = actions or {}
        self.redacted = redacted or {}
        self.seen: list[str] = []  # texts checked, in the order the checks started
        self.cancelled: list[str] = []
        self.answered: list[str] = []
        self.agates: dict[str, asyncio.Event] = {}
        self.gates: dict[str, threading.Event] = {}
        self.open_all = False

    @staticmethod
    def key(text: str) -> str:
        new = text.rstrip()[-10:]  # the window's own text (after the context)
        return new[0]

    def _answer(self, text: str) -> Decision:
        k = self.key(text)
        return _decision(self.actions.get(k, Action.ALLOW), self.redacted.get(k))

    def agate(self, k: str) -> asyncio.Event:
        return self.agates.setdefault(k, asyncio.Event())

    def gate(self, k: str) -> threading.Event:
        return self.gates.setdefault(k, threading.Event())

    async def acheck(self, prompt: str, *, response: str | None = None, **_: Any) -> Decision:
        text = response if response is not None else prompt
        self.seen.append(text)
        k = self.key(text)
        try:
            if not self.open_all:
                await self.agate(k).wait()
        except asyncio.CancelledError:
            self.cancelled.append(k)
            raise
        self.answered.append(k)
        return self._answer(text)

    def check(self, prompt: str, *, response: str | None = None, **_: Any) -> Decision:
        text = response if response is not None else prompt
        self.seen.append(text)
        if not self.open_all:
            assert self.gate(self.key(text)).wait(10), "gate never opened"
        return self._answer(text)


def _moderator(guard: ScriptedGuard, **kw: Any) -> StreamModerator[str]:
    kw.setdefault("chunk_chars", 10)
    kw.setdefault("context_chars", 0)
    return StreamModerator(guard, **kw)  # type: ignore[arg-type]


async def _wait_for(cond: Any, what: str) -> None:
    for _ in range(2000):
        if cond():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


class Source:
    """An async (and sync) source of ITEMS that records how far it was pulled and whether it was closed."""

    def __init__(self, items: list[str], stall_after: int | None = None) -> None:
        self.items = items
        self.pulled = 0
        self.closed = False
        self.stall_after = stall_after
        self.resume = threading.Event()
        self.aresume = asyncio.Event()

    def go_on(self) -> None:
        self.resume.set()
        self.aresume.set()

    async def agen(self) -> AsyncIterator[str]:
        try:
            for i, item in enumerate(self.items):
                if self.stall_after is not None and i == self.stall_after:
                    await self.aresume.wait()
                self.pulled = i + 1
                yield item
        finally:
            self.closed = True

    def gen(self) -> Iterator[str]:
        try:
            for i, item in enumerate(self.items):
                if self.stall_after is not None and i == self.stall_after:
                    assert self.resume.wait(10)
                self.pulled = i + 1
                yield item
        finally:
            self.closed = True


# ----------------------------------------------------------------------------- async


async def test_checks_run_while_the_stream_keeps_being_pulled() -> None:
    guard = ScriptedGuard()
    mod = _moderator(guard)
    src = Source(ITEMS)
    out: list[str] = []

    async def consume() -> None:
        async for item in mod.amoderate(src.agen(), str):
            out.append(item)

    task = asyncio.ensure_future(consume())
    # no gate is open: all three checks start and the source is pulled to the end, nothing is released
    await _wait_for(lambda: len(guard.seen) == 3, "three checks in flight")
    assert src.pulled == len(ITEMS)
    assert out == []
    assert mod.in_flight == 3
    assert mod.held_chars == 30
    # the last window passes first: still nothing, release is in stream order
    guard.agate("c").set()
    guard.agate("b").set()
    await asyncio.sleep(0.05)
    assert out == []
    guard.agate("a").set()
    await asyncio.wait_for(task, 5)
    assert out == ITEMS
    assert mod.stats.checks == 3 and mod.stats.max_in_flight == 3
    assert mod.stats.max_held_items == len(ITEMS)
    assert src.closed


async def test_passed_text_goes_out_while_the_source_is_stalled() -> None:
    guard = ScriptedGuard()
    guard.open_all = True
    mod = _moderator(guard)
    src = Source(ITEMS, stall_after=2)  # stalls right after the first window
    gen = mod.amoderate(src.agen(), str)
    first = await asyncio.wait_for(gen.__anext__(), 5)
    second = await asyncio.wait_for(gen.__anext__(), 5)
    assert [first, second] == ITEMS[:2]
    assert src.pulled == 2  # released without the source yielding anything more
    src.go_on()
    rest = [item async for item in gen]
    assert rest == ITEMS[2:]


async def test_a_failed_window_stops_the_stream_and_cancels_later_checks() -> None:
    guard = ScriptedGuard(actions={"b": Action.BLOCK})
    mod = _moderator(guard)
    src = Source(ITEMS)
    out: list[str] = []

    async def consume() -> None:
        async for item in mod.amoderate(src.agen(), str):
            out.append(item)

    task = asyncio.ensure_future(consume())
    await _wait_for(lambda: len(guard.seen) == 3, "three checks in flight")
    guard.agate("b").set()  # the block is known before window a is decided
    await asyncio.sleep(0.05)
    assert out == []
    guard.agate("a").set()
    await asyncio.wait_for(task, 5)
    assert out == ITEMS[:2]  # window a only
    assert mod.stopped is not None and mod.stopped.action is Action.BLOCK
    assert guard.cancelled == ["c"]  # the check after the block was cancelled, not left running
    assert [d.action for d in mod.decisions] == [Action.ALLOW, Action.BLOCK]
    assert src.closed
    assert not [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]


async def test_max_pending_grows_the_next_window_instead_of_waiting() -> None:
    guard = ScriptedGuard()
    mod = _moderator(guard, max_pending=1)
    src = Source(ITEMS)
    out: list[str] = []

    async def consume() -> None:
        async for item in mod.amoderate(src.agen(), str):
            out.append(item)

    task = asyncio.ensure_future(consume())
    await _wait_for(lambda: src.pulled == len(ITEMS), "the whole source pulled")
    assert len(guard.seen) == 1  # one check in flight; the rest of the text waits in the buffer
    assert mod.held_chars == 30
    guard.open_all = True
    guard.agate("a").set()
    await asyncio.wait_for(task, 5)
    assert out == ITEMS
    # windows b and c were checked together, as one larger window
    assert [s[0] for s in guard.seen] == ["a", "b"] and guard.seen[1] == WINDOWS[1] + WINDOWS[2]
    assert mod.stats.max_in_flight == 1


async def test_redact_replaces_only_that_window() -> None:
    guard = ScriptedGuard(actions={"b": Action.REDACT}, redacted={"b": "[REDACTED]"})
    guard.open_all = True
    mod = _moderator(guard, redact_item=lambda text: f"<{text}>")
    out = [item async for item in mod.amoderate(Source(ITEMS).agen(), str)]
    assert out == [*ITEMS[:2], "<[REDACTED]>", *ITEMS[4:]]
    assert mod.stopped is None


async def test_consumer_stopping_early_cancels_checks_and_closes_the_source() -> None:
    guard = ScriptedGuard()
    mod = _moderator(guard)
    src = Source(ITEMS)
    guard.agate("a").set()
    gen = mod.amoderate(src.agen(), str)
    assert await asyncio.wait_for(gen.__anext__(), 5) == ITEMS[0]
    await gen.aclose()
    assert src.closed
    assert mod.in_flight == 0
    assert sorted(guard.cancelled) == ["b", "c"]
    assert not [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]


async def test_a_source_error_reaches_the_consumer() -> None:
    guard = ScriptedGuard()
    guard.open_all = True
    mod = _moderator(guard)

    async def broken() -> AsyncIterator[str]:
        yield ITEMS[0]
        raise RuntimeError("model stream died")

    with pytest.raises(RuntimeError, match="model stream died"):
        [item async for item in mod.amoderate(broken(), str)]


async def test_stream_first_releases_at_once_and_stops_at_the_failed_check() -> None:
    guard = ScriptedGuard(actions={"a": Action.BLOCK})
    mod = _moderator(guard, stream_first=True)
    src = Source(ITEMS, stall_after=3)
    gen = mod.amoderate(src.agen(), str)
    got = [await asyncio.wait_for(gen.__anext__(), 5) for _ in range(3)]
    assert got == ITEMS[:3]  # released before any check answered (leaky by design)
    guard.agate("a").set()
    await _wait_for(lambda: guard.answered == ["a"], "the block")
    src.go_on()
    rest = [item async for item in gen]
    assert rest == []  # nothing after the failed check
    assert mod.stopped is not None


def _chars(items: list[str]) -> int:
    return sum(len(i) for i in items)


@pytest.mark.parametrize("mode", ["async", "sync"])
@pytest.mark.parametrize(
    ("actions", "stream_first", "released", "checked"),
    [
        ({}, False, ITEMS, 30),  # everything passes
        ({"b": Action.BLOCK}, False, ITEMS[:2], 30),  # window a only; window c's check had started (cancelled)
        ({"b": Action.REDACT}, False, [*ITEMS[:2], "[REDACTED]", *ITEMS[4:]], 30),  # the redacted text, not b's
        ({"a": Action.BLOCK}, True, ITEMS[:2], 10),  # stream_first: what went out before the stop was known
    ],
)
async def test_stats_count_what_was_checked_and_what_was_released(
    mode: str, actions: dict[str, Action], stream_first: bool, released: list[str], checked: int
) -> None:
    # released_chars counted the characters taken into checks: a stream blocked at once reported them released
    guard = ScriptedGuard(actions=actions, redacted={"b": "[REDACTED]"})
    guard.open_all = True
    mod = _moderator(guard, redact_item=lambda text: text, stream_first=stream_first)
    if stream_first:  # one item at a time, each check answered before the next push
        out: list[str] = []
        for item in ITEMS[:2]:
            out += await mod.apush(item, item) if mode == "async" else mod.push(item, item)
        out += await mod.aflush() if mode == "async" else mod.flush()
        out += await mod.apush(ITEMS[2], ITEMS[2]) if mode == "async" else mod.push(ITEMS[2], ITEMS[2])
        await mod.aclose() if mode == "async" else mod.close()
    elif mode == "async":
        out = [item async for item in mod.amoderate(Source(ITEMS).agen(), str)]
    else:
        out = list(mod.moderate(Source(ITEMS).gen(), str))
    assert out == released
    assert mod.stats.released_chars == _chars(released)
    assert mod.stats.checked_chars == checked


def test_arguments_are_validated() -> None:
    with pytest.raises(ValueError, match="max_pending"):
        _moderator(ScriptedGuard(), max_pending=0)
    with pytest.raises(ValueError, match="chunk_chars"):
        _moderator(ScriptedGuard(), chunk_chars=0)
    with pytest.raises(ValueError, match=r"^first_chunk_chars must be an integer of at least 1 .*got 0"):
        _moderator(ScriptedGuard(), first_chunk_chars=0)


# a short first sentence, then a long one: the first window closes at the first sentence end past
# first_chunk_chars, the next at the first past chunk_chars
SENTENCES = ["Hi there", " friend.", " This is a longer", " sentence that goes", " on and on.", " And the end."]
SMALL_FIRST = ["Hi there friend.", " This is a longer sentence that goes on and on.", " And the end."]
FIRST_LIKE_OTHERS = ["Hi there friend. This is a longer sentence that goes on and on.", " And the end."]


@pytest.mark.parametrize(
    ("first", "windows"),
    [(10, SMALL_FIRST), (None, FIRST_LIKE_OTHERS), (500, FIRST_LIKE_OTHERS)],  # capped at chunk_chars
)
async def test_the_first_window_is_first_chunk_chars(first: int | None, windows: list[str]) -> None:
    guard = ScriptedGuard()
    guard.open_all = True
    mod = _moderator(guard, chunk_chars=40, first_chunk_chars=first)
    assert [item async for item in mod.amoderate(_agen(SENTENCES), str)] == SENTENCES
    assert guard.seen == windows


@pytest.mark.parametrize(("first", "windows"), [(10, SMALL_FIRST), (None, FIRST_LIKE_OTHERS)])
def test_sync_the_first_window_is_first_chunk_chars(first: int | None, windows: list[str]) -> None:
    guard = ScriptedGuard()
    guard.open_all = True
    mod = _moderator(guard, chunk_chars=40, first_chunk_chars=first)
    assert list(mod.moderate(iter(SENTENCES), str)) == SENTENCES
    assert sorted(guard.seen) == sorted(windows)  # worker threads may start two checks in either order


async def test_a_small_first_window_releases_the_first_sentence_before_the_rest_arrives() -> None:
    guard = ScriptedGuard()
    guard.open_all = True
    mod = _moderator(guard, chunk_chars=40, first_chunk_chars=10)
    src = Source(SENTENCES, stall_after=2)  # the model stalls after its first sentence
    gen = mod.amoderate(src.agen(), str)
    assert [await asyncio.wait_for(gen.__anext__(), 5) for _ in range(2)] == SENTENCES[:2]
    assert src.pulled == 2
    src.go_on()
    assert [item async for item in gen] == SENTENCES[2:]
    assert guard.seen == SMALL_FIRST


async def _agen(items: list[str]) -> AsyncIterator[str]:
    for item in items:
        yield item


async def test_item_by_item_api_never_waits_for_a_check() -> None:
    guard = ScriptedGuard()
    mod = _moderator(guard)
    released: list[str] = []
    for item in ITEMS[:4]:
        released += await asyncio.wait_for(mod.apush(item, item), 1)  # would time out if it awaited a check
    await asyncio.sleep(0)
    assert released == [] and mod.in_flight == 2
    guard.agate("a").set()
    await asyncio.sleep(0.01)
    released += await mod.apush(ITEMS[4], ITEMS[4])  # window a went out at the next push
    assert released == ITEMS[:2]
    guard.open_all = True
    guard.agate("b").set()
    released += await mod.apush(ITEMS[5], ITEMS[5])
    released += await asyncio.wait_for(mod.aflush(), 5)
    assert released == ITEMS
    await mod.aclose()


# ----------------------------------------------------------------------------- sync


def _flexguard_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("flexguard-stream")]


def test_sync_checks_run_in_threads_while_the_stream_keeps_being_pulled() -> None:
    guard = ScriptedGuard()
    mod = _moderator(guard)
    src = Source(ITEMS)
    out: list[str] = []
    done = threading.Event()

    def consume() -> None:
        out.extend(mod.moderate(src.gen(), str))
        done.set()

    threading.Thread(target=consume).start()
    for _ in range(2000):
        if len(guard.seen) == 3:
            break
        threading.Event().wait(0.005)
    assert len(guard.seen) == 3 and src.pulled == len(ITEMS) and out == []
    guard.gate("c").set()
    guard.gate("b").set()
    assert not done.wait(0.05) and out == []
    guard.gate("a").set()
    assert done.wait(5)
    assert out == ITEMS
    assert src.closed
    for t in _flexguard_threads():
        t.join(5)
    assert _flexguard_threads() == []


def test_sync_block_stops_and_releases_nothing_after_it() -> None:
    guard = ScriptedGuard(actions={"b": Action.BLOCK})
    guard.open_all = True
    mod = _moderator(guard)
    src = Source(ITEMS, stall_after=4)
    out = []
    for item in mod.moderate(src.gen(), str):
        out.append(item)
    assert out == ITEMS[:2]
    assert mod.stopped is not None and mod.stopped.action is Action.BLOCK
    # no check thread outlives the stream (the executor names its workers flexguard-stream_N)
    assert [t.name for t in threading.enumerate() if t.name.startswith("flexguard-stream_")] == []
    src.go_on()  # the producer thread wakes, sees the stop and closes the source
    for _ in range(1000):
        if src.closed:
            break
        threading.Event().wait(0.005)
    assert src.closed
    assert src.pulled <= 5  # it did not run on to the end of the stream


def test_sync_passed_text_goes_out_while_the_source_is_stalled() -> None:
    guard = ScriptedGuard()
    guard.open_all = True
    mod = _moderator(guard)
    src = Source(ITEMS, stall_after=2)
    gen = mod.moderate(src.gen(), str)
    assert [next(gen), next(gen)] == ITEMS[:2]
    assert src.pulled == 2
    src.go_on()
    assert list(gen) == ITEMS[2:]


def test_sync_source_error_reaches_the_consumer() -> None:
    guard = ScriptedGuard()
    guard.open_all = True

    def broken() -> Iterator[str]:
        yield ITEMS[0]
        raise RuntimeError("model stream died")

    with pytest.raises(RuntimeError, match="model stream died"):
        list(_moderator(guard).moderate(broken(), str))


def test_sync_checks_see_the_callers_context() -> None:
    """contextvars (policy_scope, tracing) follow each check into its worker thread."""
    import contextvars

    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    seen: list[str] = []

    class CtxGuard(ScriptedGuard):
        def check(self, prompt: str, *, response: str | None = None, **kw: Any) -> Decision:
            seen.append(var.get())
            return super().check(prompt, response=response, **kw)

    guard = CtxGuard()
    guard.open_all = True
    var.set("caller")
    assert list(_moderator(guard).moderate(iter(ITEMS), str)) == ITEMS
    assert seen == ["caller"] * 3
