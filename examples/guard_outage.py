"""When the guard server goes down: fail-closed decisions, the circuit breaker, and logs that stay readable.

Run: python examples/guard_outage.py. It uses the EMULATED guard server (FakeGuardServer) and makes it fail.

- Fail-closed (the default, ``on_error: block``): a check the guard cannot answer is blocked, never allowed.
- ``circuit_breaker=CircuitBreaker(...)``: after N consecutive failures, checks fail at once instead of
  waiting for timeouts and retries; one probe goes through after ``reset_timeout`` seconds.
- Logs: one "guard unavailable" WARNING per ``unavailable_log_interval`` seconds, then a line saying how many
  went unlogged when the guard answers again. ``Guard.stats`` counts every one.
- Fail-open (``on_error: allow``) is marked on every decision and logged every time.
"""

import logging
import sys
import time

from flexguard_integrations import CircuitBreaker, Guard
from flexguard_integrations.testing import FakeGuardServer

logging.basicConfig(level=logging.WARNING, format="  log %(levelname)s: %(message)s", stream=sys.stdout)
MODEL = "Qwen/Qwen3Guard-Gen-8B"

with FakeGuardServer() as server:
    breaker = CircuitBreaker(failure_threshold=3, reset_timeout=0.5)
    # unavailable_log_interval: at most one "guard unavailable" line per 0.5 s here (default 5 s)
    with Guard.from_endpoint(
        server.base_url, MODEL, max_retries=0, circuit_breaker=breaker, cache=False, unavailable_log_interval=0.5
    ) as guard:
        print("guard up:", guard.check("What is the capital of France?").action.value)

        server.fail_next(3, fault="503")  # 3 failures in a row open the circuit: no more requests are sent
        started = time.perf_counter()
        decisions = [guard.check(f"Question number {i}") for i in range(200)]
        per_check_us = (time.perf_counter() - started) / len(decisions) * 1e6
        blocked = sum(d.blocked for d in decisions)
        print(f"guard down: {blocked} of {len(decisions)} blocked, {per_check_us:.0f} µs per check,", end=" ")
        print("breaker", breaker.state)
        print("  first:", decisions[0].reason)
        print("  last: ", decisions[-1].reason)

        time.sleep(0.6)  # after reset_timeout, one probe goes through; the server answers and the circuit closes
        print("guard back:", guard.check("And the capital of Italy?").action.value, "| breaker", breaker.state)
        print("stats:", guard.stats.checks, "checks,", guard.stats.guard_errors, "without a verdict")

    # fail-open: only where a missed check is acceptable; every such decision says so, and is logged
    with Guard.from_endpoint(server.base_url, MODEL, policy={"on_error": "allow"}, max_retries=0, cache=False) as lax:
        server.fail_next(2, fault="503")
        for text in ("Summarise this page", "Translate this page"):
            d = lax.check(text)
            print(f"fail-open: {d.action.value}, fail_open={d.fail_open}")
