"""Circuit breaker: a dead guard costs microseconds, not a timeout; decisions still follow on_error."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from flexguard_integrations import Action, CircuitBreaker, Guard
from flexguard_integrations.errors import GuardBadRequestError, GuardConnectionError
from flexguard_integrations.testing import FakeGuardServer
from tests.conftest import QWEN, closed_port_url

TEXT = "Is it going to rain tomorrow?"


def chat_requests(srv: FakeGuardServer) -> int:
    return sum(1 for r in srv.requests if r.path.endswith("/chat/completions"))


def test_breaker_state_machine() -> None:
    b = CircuitBreaker(failure_threshold=2, reset_timeout=0.2)
    assert b.before_request() is None and b.state == "closed"
    b.record_failure(GuardConnectionError("x"))
    assert b.state == "closed"
    b.record_failure(GuardConnectionError("x"))
    assert b.state == "open" and b.opened_count == 1
    why = b.before_request()
    assert why is not None and "circuit breaker open after 2 consecutive" in why
    time.sleep(0.25)
    assert b.state == "half_open"
    assert b.before_request() is None  # the one probe
    assert b.before_request() is not None  # others wait for the probe
    b.record_failure(GuardConnectionError("still down"))  # a failed probe re-opens at once
    assert b.state == "open" and b.before_request() is not None
    time.sleep(0.25)
    assert b.before_request() is None
    b.record_success()
    assert b.state == "closed" and b.before_request() is None


def test_4xx_proves_the_server_is_alive() -> None:
    b = CircuitBreaker(failure_threshold=2, reset_timeout=1)
    b.record_failure(GuardConnectionError("x"))
    b.record_failure(GuardBadRequestError("bad request"))
    b.record_failure(GuardConnectionError("x"))
    assert b.state == "closed"


def test_a_proxys_413_is_no_outcome_for_the_breaker() -> None:
    # a 413 comes from a proxy in front of the guard: it proves the proxy alive, not the guard
    too_large = GuardBadRequestError("HTTP 413: Request Entity Too Large", status_code=413)
    b = CircuitBreaker(failure_threshold=2, reset_timeout=0.05)
    b.record_failure(GuardConnectionError("x"))
    b.record_failure(too_large)  # does not reset the count of consecutive failures
    b.record_failure(GuardConnectionError("x"))
    assert b.state == "open"
    time.sleep(0.06)
    assert b.before_request() is None  # the half-open probe
    b.record_failure(too_large)  # answered by the proxy: the circuit stays half-open, not closed
    assert b.state == "half_open"
    assert b.before_request() is None  # and the next request is the probe
    assert b.before_request() is not None  # only one probe at a time
    b.record_failure(GuardConnectionError("the guard behind the proxy is down"))
    assert b.state == "open"


async def test_a_413_from_the_proxy_does_not_close_the_circuit_on_a_dead_guard() -> None:
    # the guard behind the proxy is down (503s); only the proxy answers the long check's first request (413)
    text = "Calm words about tea. " * 200  # ~4.4 kB: over the proxy's limit, then split into pieces that fit
    breaker = CircuitBreaker(failure_threshold=5, reset_timeout=0.05)
    with FakeGuardServer(max_body_bytes=2000) as srv:
        srv.fail_next(100, "503")
        async with Guard.from_endpoint(
            srv.base_url, QWEN, max_model_len=32768, cache=False, max_retries=0, circuit_breaker=breaker
        ) as guard:
            for _ in range(5):
                assert not (await guard.acheck(TEXT)).verdict.ok
            assert breaker.state == "open"
            await asyncio.sleep(0.06)
            d = await guard.acheck(text)  # the probe meets the 413; a piece that fits probes the guard: 503
        assert srv.stats["too_large"] >= 1  # the probes too large for the proxy (each halving of the text)
    assert not d.verdict.ok and d.action is Action.BLOCK and not d.fail_open
    assert breaker.state == "open"  # a 413 closed it before, and the pieces then all went to the dead guard
    assert srv.stats["status_503"] == 6  # five to open the circuit, one piece as the probe


@pytest.mark.parametrize("mode", ["async", "sync"])
@pytest.mark.parametrize("on_error", ["block", "allow"])
async def test_the_first_long_check_after_an_outage_is_checked_whole(mode: str, on_error: str) -> None:
    # a long check's pieces all went at once while the circuit was half-open: one was the probe, the others
    # were refused as "circuit open", so a guard that had recovered blocked the check (or let most of it
    # through unchecked under on_error=allow). Now the first piece probes alone and the rest follow it.
    text = "Calm words about tea. " * 200  # ~4.4 kB, over the proxy's 2 kB limit: re-split into pieces
    breaker = CircuitBreaker(failure_threshold=5, reset_timeout=0.05)
    with FakeGuardServer(max_body_bytes=2000) as srv:
        srv.fail_next(5, "503")
        async with Guard.from_endpoint(
            srv.base_url,
            QWEN,
            max_model_len=32768,
            cache=False,
            max_retries=0,
            circuit_breaker=breaker,
            policy={"on_error": on_error},
        ) as guard:
            for _ in range(5):
                assert not (await guard.acheck(TEXT)).verdict.ok
            assert breaker.state == "open"
            await asyncio.sleep(0.06)  # the guard is back
            d = await guard.acheck(text) if mode == "async" else guard.check(text)
    assert d.verdict.ok and d.verdict.chunks > 1 and d.action is Action.ALLOW and not d.fail_open, d.reason
    assert breaker.state == "closed" and breaker.short_circuited == 0


@pytest.mark.parametrize("mode", ["async", "sync"])
async def test_a_half_open_check_whose_first_piece_is_cached_probes_with_the_next(mode: str) -> None:
    # the cached first piece sent no probe, so the other pieces all went at once and all but one were refused
    start = "Calm words about tea and gardens in the spring. " * 120  # the first piece of both texts

    def doc(tail: str) -> str:
        return start + f"Then {tail} about the weather and the sea. " * 240

    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=0.05)
    with FakeGuardServer() as srv:
        async with Guard.from_endpoint(
            srv.base_url, QWEN, max_model_len=4096, max_retries=0, circuit_breaker=breaker, policy={"on_error": "allow"}
        ) as guard:
            assert (await guard.acheck(doc("notes"))).verdict.chunks > 2  # its pieces are cached
            srv.fail_next(1, "503")
            assert not (await guard.acheck(TEXT)).verdict.ok
            await asyncio.sleep(0.06)  # the guard is back
            text = doc("more notes")
            d = await guard.acheck(text) if mode == "async" else guard.check(text)
    assert d.verdict.ok and not d.fail_open and d.verdict.chunks > 2, d.reason
    assert breaker.short_circuited == 0 and breaker.state == "closed"


async def test_a_long_check_while_the_guard_is_still_down_sends_one_probe() -> None:
    text = "Calm words about tea. " * 200
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=0.05)
    with FakeGuardServer() as srv:
        srv.fail_next(100, "503")
        async with Guard.from_endpoint(
            srv.base_url, QWEN, max_model_len=4096, cache=False, max_retries=0, circuit_breaker=breaker
        ) as guard:
            assert not (await guard.acheck(TEXT)).verdict.ok
            await asyncio.sleep(0.06)
            d = await guard.acheck(text + text + text + text)  # several chunks at max_model_len 4096
        assert srv.stats["status_503"] == 2  # the outage, then one probe: the other pieces are not sent
    assert d.verdict.chunks > 1 and d.action is Action.BLOCK and not d.fail_open
    assert breaker.state == "open"


def test_abandoned_probe_lets_another_through() -> None:
    b = CircuitBreaker(failure_threshold=1, reset_timeout=0.05)
    b.record_failure(GuardConnectionError("x"))
    time.sleep(0.06)
    assert b.before_request() is None
    b.abandon()  # e.g. the probing caller was cancelled
    assert b.before_request() is None


def test_bad_breaker_settings() -> None:
    with pytest.raises(ValueError, match="failure_threshold"):
        CircuitBreaker(failure_threshold=0)
    with pytest.raises(ValueError, match="reset_timeout"):
        CircuitBreaker(reset_timeout=0)


@pytest.mark.parametrize(
    ("on_error", "action", "fail_open"), [("block", Action.BLOCK, False), ("allow", Action.ALLOW, True)]
)
def test_dead_guard_short_circuits_and_follows_on_error(on_error: str, action: Action, fail_open: bool) -> None:
    breaker = CircuitBreaker(failure_threshold=3, reset_timeout=60)
    with Guard.from_endpoint(
        closed_port_url(), QWEN, policy={"on_error": on_error}, max_retries=0, circuit_breaker=breaker, cache=False
    ) as guard:
        for _ in range(3):
            guard.check(TEXT)
        assert breaker.state == "open"
        decisions = [guard.check(TEXT) for _ in range(200)]
    assert breaker.short_circuited == 200  # none of them attempted a connection
    assert all(d.action is action and d.fail_open is fail_open for d in decisions)
    assert "circuit breaker open" in (decisions[0].verdict.error or "")


async def test_half_open_probe_closes_the_circuit_when_the_guard_is_back() -> None:
    breaker = CircuitBreaker(failure_threshold=2, reset_timeout=0.3)
    with FakeGuardServer() as srv:
        srv.fail_next(2, fault="503")
        async with Guard.from_endpoint(
            srv.base_url, QWEN, max_retries=0, circuit_breaker=breaker, cache=False
        ) as guard:
            assert (await guard.acheck(TEXT)).action is Action.BLOCK
            assert (await guard.acheck(TEXT)).action is Action.BLOCK
            assert breaker.state == "open"
            n = chat_requests(srv)
            blocked = await guard.acheck(TEXT)
            assert blocked.action is Action.BLOCK and "circuit breaker open" in (blocked.verdict.error or "")
            assert chat_requests(srv) == n  # nothing was sent
            await asyncio.sleep(0.35)
            probe = await guard.acheck(TEXT)
            assert probe.action is Action.ALLOW and breaker.state == "closed"
            assert chat_requests(srv) == n + 1


def test_unreadable_answers_do_not_open_the_breaker() -> None:
    # the server answered: what the guard wrote depends on the text it was given, so unreadable answers are
    # fail-closed verdicts but no sign of a dead server (they used to open the circuit after N of them)
    breaker = CircuitBreaker(failure_threshold=2, reset_timeout=60)
    with FakeGuardServer() as srv:
        srv.fail_next(3, fault="malformed")
        with Guard.from_endpoint(srv.base_url, QWEN, circuit_breaker=breaker, cache=False) as guard:
            unreadable = [guard.check(TEXT) for _ in range(3)]
            assert breaker.state == "closed" and breaker.opened_count == 0
            after = guard.check(TEXT)
        assert chat_requests(srv) == 4  # every check was sent
    assert all(d.action is Action.BLOCK and not d.fail_open and d.verdict.error for d in unreadable)
    assert after.verdict.ok and after.action is Action.ALLOW


@pytest.mark.parametrize("on_error", ["allow", "block"])
async def test_crafted_texts_cannot_open_the_breaker_for_everyone(on_error: str) -> None:
    # texts that make the guard ramble past max_tokens (finish_reason=length) are each decided by on_error;
    # they used to open the circuit, after which every other user's check went unchecked (allow) or refused
    breaker = CircuitBreaker(failure_threshold=5, reset_timeout=60)
    with FakeGuardServer() as srv:
        srv.add_rule("zz-ramble-zz", fault="truncated")
        async with Guard.from_endpoint(
            srv.base_url, QWEN, policy={"on_error": on_error}, circuit_breaker=breaker, cache=False
        ) as guard:
            crafted = await asyncio.gather(*(guard.acheck(f"zz-ramble-zz {i}") for i in range(10)))
            victim = await guard.acheck("How do I build a pipe bomb to kill people?")
    assert breaker.state == "closed" and breaker.opened_count == 0
    assert all(d.verdict.error and "length" in d.verdict.error for d in crafted)
    assert victim.verdict.ok and victim.action is Action.BLOCK and not victim.fail_open


def test_a_half_open_probe_whose_answer_breaks_the_parser_closes_the_circuit() -> None:
    # the parser raising on a probe's answer left the probe taken for good: no check was ever sent again
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=0.05)
    with FakeGuardServer() as srv:
        srv.fail_next(1, fault="503")
        with Guard.from_endpoint(srv.base_url, QWEN, circuit_breaker=breaker, cache=False, max_retries=0) as guard:
            assert not guard.check(TEXT).verdict.ok and breaker.state == "open"
            time.sleep(0.06)
            real = guard.model.parse_completion

            def broken(completion: object) -> object:
                raise RuntimeError("parser bug")

            guard.model.parse_completion = broken  # type: ignore[assignment,method-assign]
            probe = guard.check(TEXT)
            guard.model.parse_completion = real  # type: ignore[method-assign]
            after = guard.check(TEXT)
        assert chat_requests(srv) == 3
    assert probe.action is Action.BLOCK and "RuntimeError: parser bug" in (probe.verdict.error or "")
    assert breaker.state == "closed" and after.verdict.ok


def test_breaker_is_off_by_default_and_on_with_true(server: FakeGuardServer) -> None:
    with Guard.from_endpoint(server.base_url, QWEN) as guard:
        assert guard.breaker is None
    with Guard.from_endpoint(server.base_url, QWEN, circuit_breaker=True) as guard:
        assert guard.breaker is not None and guard.breaker.failure_threshold == 5


# ---------------------------------------------------------------- only the probe's holder hands it back


async def _until(condition: Any, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


async def test_a_cancelled_check_that_was_not_the_probe_does_not_free_the_probe() -> None:
    """A check admitted while the circuit was closed, cancelled after another check took the half-open probe,
    must not hand that probe back: a second probe would go out while the first is still in flight."""
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=0.05)
    with FakeGuardServer() as srv:
        srv.add_rule("hanging text", fault="hang")
        async with Guard.from_endpoint(srv.base_url, QWEN, cache=False, timeout=30, circuit_breaker=breaker) as g:
            earlier = asyncio.create_task(g.acheck("hanging text, admitted while closed"))
            await _until(lambda: len(srv.requests) >= 1)
            breaker.record_failure(ConnectionError("down"), probe=False)  # another check failed: open
            await asyncio.sleep(0.1)
            probe = asyncio.create_task(g.acheck("hanging text, the probe"))
            await _until(lambda: len(srv.requests) >= 2)
            assert breaker.state == "half_open"
            earlier.cancel()
            with pytest.raises(asyncio.CancelledError):
                await earlier
            refused = await g.acheck("a third check while the probe is in flight")
            assert refused.verdict.error is not None and "circuit breaker open" in refused.verdict.error
            assert len([r for r in srv.requests if r.path.endswith("/chat/completions")]) == 2
            probe.cancel()
            with pytest.raises(asyncio.CancelledError):
                await probe
            assert breaker.before_request() is None  # the probe's own cancellation hands it back


def test_abandon_without_the_probe_changes_nothing() -> None:
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=0.01)
    breaker.record_failure(ConnectionError("down"))
    time.sleep(0.02)
    why, probe = breaker.admit()
    assert why is None and probe
    assert breaker.admit()[0] is not None  # one probe at a time
    breaker.abandon(probe=0)
    assert breaker.admit()[0] is not None  # still one probe in flight
    breaker.abandon(probe=probe)
    why, second = breaker.admit()
    assert why is None and second and second != probe


def test_a_failure_of_another_request_leaves_the_probe_in_flight() -> None:
    """A request admitted while closed that fails (a timeout) during the half-open probe re-opens the circuit,
    but the probe is still in flight: no second probe goes out, even after another reset_timeout."""
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=0.01)
    _, earlier = breaker.admit()  # admitted while closed
    assert earlier == 0
    breaker.record_failure(ConnectionError("down"), probe=earlier)
    time.sleep(0.02)
    why, probe = breaker.admit()
    assert why is None and probe
    breaker.record_failure(TimeoutError(), probe=earlier)  # the earlier request times out
    time.sleep(0.02)
    assert breaker.admit()[0] is not None
    breaker.record_failure(TimeoutError(), probe=probe)  # the probe itself fails: the next one may go later
    time.sleep(0.02)
    assert breaker.admit()[0] is None


def test_a_holder_of_an_earlier_probe_cannot_free_the_current_one() -> None:
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=0.01)
    breaker.record_failure(ConnectionError("down"))
    time.sleep(0.02)
    _, first = breaker.admit()
    breaker.record_success()  # another request got an answer: closed (the first probe is still in flight)
    breaker.record_failure(ConnectionError("down again"))
    time.sleep(0.02)
    _, current = breaker.admit()
    assert current and current != first
    breaker.abandon(probe=first)  # the first probe is cancelled now
    assert breaker.admit()[0] is not None  # the current probe is still the only one
