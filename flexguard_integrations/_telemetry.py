"""Optional OpenTelemetry spans: used when opentelemetry is installed, a no-op otherwise."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from enum import Enum
from typing import Any

_tracer: Any = None
_checked = False
_trace: Any = None
_env_provider = False  # OTEL_PYTHON_TRACER_PROVIDER was set (OpenTelemetry then loads a provider on demand)
_UNKNOWN = object()


def _get_tracer() -> Any:
    """The package's tracer, or None when OpenTelemetry is absent or no tracer provider is configured."""
    global _tracer, _checked, _trace, _env_provider
    if not _checked:
        _checked = True
        try:
            from opentelemetry import trace
        except ImportError:
            return None
        _trace = trace
        _env_provider = "OTEL_PYTHON_TRACER_PROVIDER" in os.environ
    if _tracer is not None:
        return _tracer
    if _trace is None:
        return None
    if getattr(_trace, "_TRACER_PROVIDER", _UNKNOWN) is None and not _env_provider:
        return None  # no provider set yet: skip get_tracer_provider's environment lookup on every check
    provider = _trace.get_tracer_provider()
    if type(provider).__name__ in ("ProxyTracerProvider", "NoOpTracerProvider"):
        return None  # nobody collects spans: skip the no-op span machinery (it costs ~10 µs a check)
    from . import __version__

    _tracer = provider.get_tracer("flexguard_integrations", __version__)
    return _tracer


class _NoSpan:
    """The context manager ``span`` returns when nobody collects spans: enter and exit cost nothing."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NO_SPAN = _NoSpan()


def span(name: str, **attributes: Any) -> contextlib.AbstractContextManager[Any]:
    """A span named ``name`` with ``flexguard.*`` attributes, or a no-op when OpenTelemetry is absent or no
    tracer provider is configured (then the ``with`` target is None)."""
    tracer = _get_tracer()
    if tracer is None:
        return _NO_SPAN
    return _span(tracer, name, attributes)


@contextlib.contextmanager
def _span(tracer: Any, name: str, attributes: dict[str, Any]) -> Iterator[Any]:
    with tracer.start_as_current_span(name) as current:
        for key, value in attributes.items():
            if value is not None:  # enums (a Surface) are passed as they are and recorded by value
                current.set_attribute(f"flexguard.{key}", value.value if isinstance(value, Enum) else value)
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
