"""Fail-closed behaviour under every server fault, retries, and bad input (FakeGuardServer, 127.0.0.1)."""

from __future__ import annotations

import asyncio
import time

import pytest

from flexguard_integrations import (
    Action,
    Guard,
    GuardConnectionError,
    GuardInputError,
    GuardUnavailableError,
)
from flexguard_integrations import guard as guard_module
from flexguard_integrations.testing import FakeGuardServer, FaultPlan
from tests.conftest import FLEX, QWEN, closed_port_url

BENIGN = "What is a good name for a cat?"
HARMFUL = "Explain how to build a bomb to kill people."


def chat_requests(srv: FakeGuardServer) -> int:
    return sum(1 for r in srv.requests if r.path.endswith("/chat/completions"))


def test_unreachable_server_fails_closed_by_default() -> None:
    with Guard.from_endpoint(closed_port_url(), QWEN, timeout=2) as guard:
        d = guard.check(BENIGN)
    assert d.action is Action.BLOCK and not d.fail_open
    assert "guard unavailable" in d.reason
    assert d.verdict.error and "connect" in d.verdict.error


async def test_unreachable_server_raise_chains_the_cause() -> None:
    async with Guard.from_endpoint(closed_port_url(), FLEX, policy={"on_error": "raise"}, max_retries=1) as guard:
        with pytest.raises(GuardUnavailableError) as info:
            await guard.acheck(BENIGN)
    assert isinstance(info.value.__cause__, GuardConnectionError)
    assert info.value.decision is not None and info.value.decision.action is Action.BLOCK


def test_503_with_retry_after_is_retried_then_succeeds() -> None:
    with FakeGuardServer(faults=FaultPlan(retry_after=0.3)) as srv:
        srv.fail_next(2, fault="503")
        with Guard.from_endpoint(srv.base_url, QWEN, timeout=10) as guard:
            started = time.monotonic()
            d = guard.check(BENIGN)
            elapsed = time.monotonic() - started
        assert chat_requests(srv) == 3
    assert d.action is Action.ALLOW and d.verdict.ok
    assert elapsed >= 0.6  # Retry-After honoured twice


@pytest.mark.parametrize("fault", ["502", "504", "reset"])
def test_transient_faults_are_retried(fault: str) -> None:
    with FakeGuardServer() as srv:
        srv.fail_next(1, fault=fault)
        with Guard.from_endpoint(srv.base_url, FLEX) as guard:
            d = guard.check(BENIGN)
        assert chat_requests(srv) == 2
    assert d.action is Action.ALLOW


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("400_overflow", None),  # handled by re-splitting; see below
        ("401", "credentials"),
        ("html", "non-JSON"),
        ("empty", "empty body"),
        ("bad_shape", "no choices"),
        ("malformed", "guard answer"),
        ("truncated", "finish_reason=length"),
    ],
)
def test_non_retryable_faults_fail_closed_with_a_clear_error(fault: str, message: str | None) -> None:
    with FakeGuardServer() as srv:
        srv.add_rule("trigger", fault=fault)
        with Guard.from_endpoint(srv.base_url, QWEN) as guard:
            d = guard.check("please trigger the fault")
        attempts = chat_requests(srv)
    assert d.action is Action.BLOCK
    assert d.verdict.error is not None
    if message is not None:
        assert message in d.verdict.error
        assert attempts == 1  # never retried


@pytest.mark.parametrize("model", [QWEN, FLEX])
def test_hang_is_bounded_by_the_deadline(model: str) -> None:
    with FakeGuardServer() as srv:
        srv.fail_next(5, fault="hang")
        with Guard.from_endpoint(srv.base_url, model, timeout=0.8) as guard:
            started = time.monotonic()
            d = guard.check(BENIGN)
            elapsed = time.monotonic() - started
    assert d.action is Action.BLOCK and "guard unavailable" in d.reason
    assert elapsed < 0.8 + 0.5


@pytest.mark.parametrize("transport", ["httpx", "aiohttp"])
async def test_a_hung_server_costs_each_check_its_deadline_queued_or_not(
    transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guard bounds a request with asyncio.timeout unless the transport bounds it itself (aiohttp's total
    timeout) and nothing queues; either way every check ends, fail-closed, within its deadline."""
    pytest.importorskip("aiohttp")
    timers: list[float | None] = []
    real = guard_module._timeout_cm

    def counting(delay: float | None) -> object:
        timers.append(delay)
        return real(delay)

    monkeypatch.setattr(guard_module, "_timeout_cm", counting)
    timeout = 0.6
    with FakeGuardServer(faults=FaultPlan(p_hang=1.0, hang_seconds=5.0)) as srv:
        async with Guard.from_endpoint(
            srv.base_url, QWEN, timeout=timeout, concurrency=1, cache=False, transport=transport
        ) as guard:

            async def timed(text: str) -> tuple[float, Action]:
                t0 = time.monotonic()
                d = await guard.acheck(text)
                assert d.verdict.error is not None and not d.fail_open
                return time.monotonic() - t0, d.action

            alone = await timed(BENIGN)
            uncontended_timers = len(timers)
            queued = await asyncio.gather(*(timed(f"{BENIGN} {i}") for i in range(3)))  # 2 of 3 wait for the slot
    for elapsed, action in [alone, *queued]:
        assert action is Action.BLOCK
        assert elapsed < timeout + 0.4
    # the aiohttp transport's own total timeout bounds an uncontended request: no asyncio.timeout for it
    assert uncontended_timers == (0 if transport == "aiohttp" else 1)
    assert len(timers) - uncontended_timers >= 2  # checks that had to queue are bounded by Guard's timer


async def test_fault_mix_every_check_decided_within_deadline_and_nothing_unsafe_allowed() -> None:
    plan = FaultPlan(p_503=0.20, p_hang=0.10, p_malformed=0.05, retry_after=None)
    texts = [HARMFUL if i % 2 else f"Tell me a fun fact about the number {i}." for i in range(200)]
    with FakeGuardServer(faults=plan, seed=7) as srv:
        async with Guard.from_endpoint(srv.base_url, QWEN, timeout=1.5, concurrency=64, cache=False) as guard:
            # a client with as many checks in flight as the transport carries (httpx: 16): the deadline covers
            # queueing too, so an unbounded burst would time out in the queue, fail-closed but uninformative
            slots = asyncio.Semaphore(guard.concurrency)

            async def timed(text: str) -> tuple[float, object]:
                async with slots:
                    t0 = time.monotonic()
                    d = await guard.acheck(text)
                    return time.monotonic() - t0, d

            results = await asyncio.gather(*(timed(t) for t in texts))
        injected = srv.stats
    assert len(results) == 200
    assert max(elapsed for elapsed, _ in results) < 1.5 + 0.5
    decisions = [d for _, d in results]
    for text, d in zip(texts, decisions, strict=True):
        if text == HARMFUL:
            assert d.action is Action.BLOCK  # type: ignore[attr-defined]
    benign_ok = sum(1 for t, d in zip(texts, decisions, strict=True) if t != HARMFUL and d.action is Action.ALLOW)  # type: ignore[attr-defined]
    assert benign_ok > 50  # retries recover most transient faults
    failed = [d for d in decisions if d.verdict.error is not None]  # type: ignore[attr-defined]
    assert all(d.action is Action.BLOCK and not d.fail_open for d in failed)  # type: ignore[attr-defined]
    assert sum(v for k, v in injected.items() if "fault" in k) > 20


async def test_fail_open_under_faults_is_always_marked() -> None:
    plan = FaultPlan(p_malformed=0.5)
    with FakeGuardServer(faults=plan, seed=3) as srv:
        async with Guard.from_endpoint(srv.base_url, FLEX, policy={"on_error": "allow"}, cache=False) as guard:
            ds = await guard.abatch([BENIGN] * 40)
    opened = [d for d in ds if d.verdict.error is not None]  # type: ignore[union-attr]
    assert opened and all(d.fail_open and d.action is Action.ALLOW for d in opened)  # type: ignore[union-attr]
    assert all(not d.fail_open for d in ds if d.verdict.error is None)  # type: ignore[union-attr]


# ---------------------------------------------------------------- bad input


@pytest.fixture
def guard(server: FakeGuardServer) -> Guard:
    return Guard.from_endpoint(server.base_url, QWEN)


@pytest.mark.parametrize(
    ("value", "message"),
    [("", "empty"), ("   \n\t", "empty"), (None, "must be a str, got NoneType"), (42, "got int"),
     (b"bytes", "decode it to str first"), (["a"], "got list")],
)  # fmt: skip
def test_bad_texts_are_clear_errors(guard: Guard, value: object, message: str) -> None:
    with pytest.raises(GuardInputError, match=message):
        guard.check(value)  # type: ignore[arg-type]


def test_oversized_text_names_the_limit(guard: Guard) -> None:
    big = "a" * (10 * 1024 * 1024)
    with pytest.raises(GuardInputError, match=r"10,485,760 characters, over the limit of 2,000,000"):
        guard.check(big)


async def test_lone_surrogates_and_control_characters_are_checked(server: FakeGuardServer) -> None:
    async with Guard.from_endpoint(server.base_url, QWEN) as guard:
        d1 = await guard.acheck("broken \ud800 surrogate and a bomb to kill")
        d2 = await guard.acheck("bell\x07 nul\x00 escape\x1b[31m text")
    assert d1.verdict.ok and d1.action is Action.BLOCK
    assert d2.verdict.ok and d2.action is Action.ALLOW
    assert "\ufffd" in (server.requests[-2].moderated_text or "")


def test_bad_history_is_rejected(guard: Guard) -> None:
    with pytest.raises(GuardInputError, match="history turns"):
        guard.check("hi", history=[("system", "x")])  # type: ignore[list-item]


@pytest.mark.parametrize(
    ("history", "message"),
    [
        ([("user",)], "history turns must be"),  # these raised bare ValueError / TypeError from unpacking
        ([("user", "a", "b")], "history turns must be"),
        ([5], "history turns must be"),
        ("user: hi", "history must be a list"),
        (7, "history must be a list"),
        ({"role": "user", "content": "hi"}, "history must be a list"),
    ],
)
@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_malformed_history_is_a_guard_input_error(guard: Guard, history: object, message: str, mode: str) -> None:
    async def check() -> object:
        if mode == "sync":
            return guard.check("hi", history=history)  # type: ignore[arg-type]
        return await guard.acheck("hi", history=history)  # type: ignore[arg-type]

    with pytest.raises(GuardInputError, match=message):
        await check()


def test_bad_batch_item(guard: Guard) -> None:
    with pytest.raises(GuardInputError, match="batch items"):
        guard.batch([3.14])  # type: ignore[list-item]
    out = guard.batch(["ok text", ""], return_exceptions=True)
    assert isinstance(out[1], GuardInputError)


@pytest.mark.parametrize("retries", [0, 1, 2, 3])
def test_max_retries_counts_retries_not_attempts(retries: int) -> None:
    with FakeGuardServer() as srv:
        srv.fail_next(10, fault="503")
        with Guard.from_endpoint(srv.base_url, QWEN, max_retries=retries, timeout=20) as guard:
            d = guard.check(BENIGN)
        assert chat_requests(srv) == retries + 1
    assert d.action is Action.BLOCK and "503" in (d.verdict.error or "")
