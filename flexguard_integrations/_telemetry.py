"""Optional OpenTelemetry spans: used when opentelemetry is installed, a no-op otherwise."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

_tracer: Any = None
_checked = False


def _get_tracer() -> Any:
    global _tracer, _checked
    if not _checked:
        _checked = True
        try:
            from opentelemetry import trace
        except ImportError:
            _tracer = None
        else:
            from . import __version__

            _tracer = trace.get_tracer("flexguard_integrations", __version__)
    return _tracer


@contextlib.contextmanager
def span(name: str, **attributes: Any) -> Iterator[Any]:
    """A span named ``name`` with ``flexguard.*`` attributes, or nothing when OpenTelemetry is absent."""
    tracer = _get_tracer()
    if tracer is None:
        yield None
        return
    with tracer.start_as_current_span(name) as current:
        for key, value in attributes.items():
            if value is not None:
                current.set_attribute(f"flexguard.{key}", value)
        yield current


def record_decision(current: Any, decision: Any) -> None:
    """Attach a decision's outcome to a span (no-op without OpenTelemetry)."""
    if current is None:
        return
    current.set_attribute("flexguard.action", decision.action.value)
    current.set_attribute("flexguard.risk_score", float(decision.verdict.risk_score))
    current.set_attribute("flexguard.fail_open", bool(decision.fail_open))
    if decision.verdict.error:
        current.set_attribute("flexguard.error", decision.verdict.error)
