"""Fault injection for FakeGuardServer: which failure (if any) a model request gets, and how long it waits.

A :class:`FaultPlan` holds per-request probabilities for each fault kind plus a latency model. The server
draws from one ``random.Random(seed)``, exactly one uniform number per model request (plus one latency draw
when a random latency is configured), so a run with the same seed and the same request order injects the
same faults. Faults only touch the model endpoints (``/v1/chat/completions``, ``/v1/completions``).

Fault kinds (the names also used by ``add_rule(fault=...)`` and ``fail_next(fault=...)``):

- ``503``: engine busy, error body in the server's style (``Retry-After`` header when ``retry_after`` is set)
- ``502`` / ``504``: a gateway's HTML error page (what a proxy in front of vLLM returns)
- ``hang``: never answer (until the client disconnects or the server stops), or answer normally after
  ``hang_seconds`` when that is set
- ``reset``: abort the TCP connection (RST) without answering
- ``malformed``: 200 with a completion whose text is prose that no parser can read
- ``truncated``: 200, ``finish_reason: "length"``, text cut (FlexGuard think block never closed; Qwen3Guard
  ``Safety: Uns``)
- ``400_overflow``: the context-length 400 in the server's style
- ``401``: ``{"error": "Unauthorized"}``
- ``html``: 200 ``text/html`` page instead of JSON
- ``empty``: 200 with an empty body
- ``bad_shape``: 200 JSON that is not a completion (``{"result": "ok"}``)
- ``slow``: sleep 0.5 s, then answer normally
- ``trickle``: the normal answer, its headers at once and its body one byte every 0.2 s (a read timeout that
  restarts at every byte never fires: only a total deadline ends the check)
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, fields

__all__ = ["FAULT_ORDER", "FaultPlan", "Latency", "sample_latency"]

#: A latency model: fixed seconds, ("fixed", s), ("uniform", a, b), ("lognormal", mu, sigma), or a callable.
Latency = float | int | tuple[object, ...] | Callable[[random.Random], float] | None

#: (FaultPlan field, fault name), in the order the cumulative draw walks them.
FAULT_ORDER: tuple[tuple[str, str], ...] = (
    ("p_503", "503"),
    ("p_502", "502"),
    ("p_504", "504"),
    ("p_hang", "hang"),
    ("p_reset", "reset"),
    ("p_malformed", "malformed"),
    ("p_truncated", "truncated"),
    ("p_400_overflow", "400_overflow"),
    ("p_401", "401"),
    ("p_html", "html"),
    ("p_empty", "empty"),
    ("p_bad_shape", "bad_shape"),
)


@dataclass(frozen=True)
class FaultPlan:
    """Per-request fault probabilities (each 0–1, summing to at most 1) and a latency model."""

    p_503: float = 0.0
    retry_after: float | None = None
    p_502: float = 0.0
    p_504: float = 0.0
    p_hang: float = 0.0
    hang_seconds: float | None = None
    p_reset: float = 0.0
    p_malformed: float = 0.0
    p_truncated: float = 0.0
    p_400_overflow: float = 0.0
    p_401: float = 0.0
    p_html: float = 0.0
    p_empty: float = 0.0
    p_bad_shape: float = 0.0
    latency: Latency = None

    def __post_init__(self) -> None:
        total = 0.0
        for name, _ in FAULT_ORDER:
            p = getattr(self, name)
            if isinstance(p, bool) or not isinstance(p, (int, float)) or math.isnan(p) or not 0.0 <= p <= 1.0:
                raise ValueError(f"FaultPlan.{name} must be a probability in [0, 1], got {p!r}")
            total += float(p)
        if total > 1.0 + 1e-9:
            raise ValueError(f"FaultPlan probabilities sum to {total:.3f} > 1")
        if self.retry_after is not None and self.retry_after < 0:
            raise ValueError("retry_after must be >= 0")
        if self.hang_seconds is not None and self.hang_seconds < 0:
            raise ValueError("hang_seconds must be >= 0")
        _validate_latency(self.latency)

    @functools.cached_property
    def any_fault(self) -> bool:
        """True when at least one fault probability is non-zero."""
        return any(getattr(self, name) > 0.0 for name, _ in FAULT_ORDER)

    def pick(self, u: float) -> str | None:
        """The fault selected by the uniform draw ``u`` in [0, 1), or None."""
        acc = 0.0
        for name, fault in FAULT_ORDER:
            acc += getattr(self, name)
            if u < acc:
                return fault
        return None

    def describe(self) -> str:
        """A short human summary of the non-default settings."""
        parts = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if getattr(self, f.name) != f.default]
        return ", ".join(parts) or "no faults"


def _validate_latency(latency: Latency) -> None:
    if latency is None or callable(latency):
        return
    if isinstance(latency, bool):
        raise ValueError("latency must be seconds, a ('kind', ...) tuple or a callable")
    if isinstance(latency, (int, float)):
        if latency < 0 or math.isnan(latency):
            raise ValueError("latency must be >= 0")
        return
    if isinstance(latency, tuple) and latency:
        kind = latency[0]
        args = latency[1:]
        expected = {"fixed": 1, "uniform": 2, "lognormal": 2}
        if kind not in expected or len(args) != expected[kind]:
            raise ValueError(
                f"latency tuple must be ('fixed', s), ('uniform', a, b) or ('lognormal', mu, sigma), got {latency!r}"
            )
        if not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
            raise ValueError(f"latency parameters must be numbers, got {latency!r}")
        return
    raise ValueError(f"latency must be seconds, a ('kind', ...) tuple or a callable, got {latency!r}")


def sample_latency(latency: Latency, rng: random.Random) -> float:
    """Seconds to wait for one request under ``latency`` (0.0 for None); never negative."""
    if latency is None:
        return 0.0
    if callable(latency):
        value = float(latency(rng))
    elif isinstance(latency, (int, float)):
        value = float(latency)
    else:
        kind = latency[0]
        args = [float(a) for a in latency[1:]]  # type: ignore[arg-type]
        if kind == "fixed":
            value = args[0]
        elif kind == "uniform":
            value = rng.uniform(args[0], args[1])
        else:
            value = rng.lognormvariate(args[0], args[1])
    if math.isnan(value) or value < 0:
        return 0.0
    return value
