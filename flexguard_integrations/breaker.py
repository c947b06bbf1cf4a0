"""A circuit breaker, so a dead guard costs microseconds per check instead of a full timeout.

Closed: requests flow and consecutive failures are counted. After ``failure_threshold`` consecutive
failures it opens: checks fail at once (the verdict's error says the circuit is open) and the policy's
``on_error`` decides, as for any guard failure. After ``reset_timeout`` seconds one half-open probe is let
through: success closes the circuit, failure opens it again for another ``reset_timeout``.

Only failures that say the server is unhealthy count (connection errors, timeouts, 5xx, a 2xx that is not a
chat completion); a request the server rejected (4xx) or a context-length error does not, and neither does a
completion whose text cannot be read as a verdict: what the guard writes depends on the text it was given,
so a few crafted texts could otherwise open the circuit for every other check. A 413 (a body over a
proxy's size limit) counts as neither: the proxy answered it without asking the guard behind it, so it
proves nothing about the guard's health. A half-open probe answered by a 413 lets the next request probe.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Literal

from .errors import GuardBadRequestError

State = Literal["closed", "open", "half_open"]


@dataclass
class CircuitBreaker:
    """Thread-safe consecutive-failure breaker with a half-open probe."""

    failure_threshold: int = 5
    reset_timeout: float = 10.0
    _state: State = field(default="closed", init=False)
    _failures: int = field(default=0, init=False)
    _opened_at: float = field(default=0.0, init=False)
    _probing: bool = field(default=False, init=False)
    _probe_id: int = field(default=0, init=False)  # numbers the half-open probes: a token only its holder has
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    opened_count: int = field(default=0, init=False)
    short_circuited: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if self.reset_timeout <= 0:
            raise ValueError("reset_timeout must be positive")

    @property
    def state(self) -> State:
        """closed, open or half_open (open turns half_open once ``reset_timeout`` has passed)."""
        with self._lock:
            if self._state == "open" and time.monotonic() - self._opened_at >= self.reset_timeout:
                return "half_open"
            return self._state

    def _closed(self) -> bool:
        return self._state == "closed"

    @property
    def is_closed(self) -> bool:
        """True while requests flow freely (read without the lock: a hint for planning, not a permit)."""
        return self._state == "closed"

    def before_request(self) -> str | None:
        """None to send the request; otherwise why it must not be sent (the circuit is open)."""
        return self.admit()[0]

    def admit(self) -> tuple[str | None, int]:
        """(None, probe) to send the request, (why not, 0) otherwise. ``probe`` is 0, or, when this request is
        the half-open probe, a token (≥ 1) that identifies it.

        Pass it back as ``probe=`` to :meth:`abandon` and :meth:`record_failure`: only the probe's holder hands
        the probe back or fails it. Another request ending (cancelled, failed) while the probe is in flight,
        even one that held an earlier probe, must not let a second probe out.
        """
        if self._closed():  # the common case, read without the lock: one str compare per check
            return None, 0
        with self._lock:
            if self._closed():  # another thread closed it meanwhile
                return None, 0
            waited = time.monotonic() - self._opened_at
            if waited >= self.reset_timeout and not self._probing:
                self._state = "half_open"
                self._probing = True
                self._probe_id += 1
                return None, self._probe_id
            self.short_circuited += 1
            left = max(0.0, self.reset_timeout - waited)
            why = f"circuit breaker open after {self._failures} consecutive guard failures; next probe in {left:.1f} s"
            return why, 0

    def _holds(self, probe: int) -> bool:
        """(Under the lock) ``probe`` is the token of the probe in flight; ``True``: a caller that does not track
        tokens (the behaviour before tokens)."""
        if probe is True:
            return self._probing
        return self._probing and bool(probe) and probe == self._probe_id

    def record_success(self) -> None:
        """A request got an answer: close the circuit."""
        if self._state == "closed" and not self._failures:  # nothing to reset (the common case, lock-free)
            return
        with self._lock:
            self._failures = 0
            self._state = "closed"
            self._probing = False

    def record_failure(self, exc: BaseException, *, probe: int = True) -> None:
        """A request failed; open the circuit when the threshold is reached (or a probe failed).

        A 4xx answer proves the server is alive, so it counts as a success for the breaker; a 413 comes from a
        proxy in front of the guard and counts as no outcome (:meth:`abandon`, with ``probe``).
        """
        if isinstance(exc, GuardBadRequestError):
            if exc.status_code == 413:
                self.abandon(probe=probe)
            else:
                self.record_success()
            return
        with self._lock:
            self._failures += 1
            holder = self._holds(probe)
            if holder or self._failures >= self.failure_threshold:
                if self._state != "open":
                    self.opened_count += 1
                self._state = "open"
                self._opened_at = time.monotonic()
                if holder:  # another request's failure leaves the probe in flight: no second probe meanwhile
                    self._probing = False

    def abandon(self, *, probe: int = True) -> None:
        """A request ended without an outcome (cancelled): when it holds the half-open probe in flight
        (``probe``: the token :meth:`admit` gave it), let another probe through later; any other request
        changes nothing."""
        if not probe:
            return
        with self._lock:
            if self._holds(probe):
                self._probing = False
