"""Testing helpers: FakeGuardServer, a vLLM/SGLang-compatible HTTP server that emulates FlexGuard and Qwen3Guard.

Stdlib-only at import time; see :mod:`flexguard_integrations.testing.server` for endpoints, formats and faults.
"""

from __future__ import annotations

from .faults import FaultPlan
from .lexicon import ScriptedVerdict, judge
from .server import DEFAULT_MODELS, FakeGuardServer, RecordedRequest

__all__ = ["DEFAULT_MODELS", "FakeGuardServer", "FaultPlan", "RecordedRequest", "ScriptedVerdict", "judge"]
