"""Evaluation, threshold calibration and corpus moderation over labelled data (``flexguard eval`` /
``calibrate`` / ``moderate``). See ``docs/evaluation.md``.

The metrics (:mod:`.metrics`) are pure functions; :mod:`.data` reads JSONL / CSV / Parquet; :mod:`.runner`
runs a guard over rows with bounded concurrency and a resumable output; :mod:`.calibrate` chooses thresholds
and writes policy YAML; :mod:`.plots` draws PNGs (extra ``plots``); :mod:`.moderate` moderates a corpus.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# lazy, so `flexguard --help` (which registers the eval commands) imports nothing heavy. The function
# `calibrate` is not re-exported: its name is taken by the submodule (`from .calibrate import calibrate`).
_EXPORTS: dict[str, str] = {
    "CalibrationResult": ".calibrate",
    "Target": ".calibrate",
    "ThresholdChoice": ".calibrate",
    "choose_threshold": ".calibrate",
    "parse_target": ".calibrate",
    "Columns": ".data",
    "DataError": ".data",
    "Example": ".data",
    "read_examples": ".data",
    "Confusion": ".metrics",
    "auroc": ".metrics",
    "average_precision": ".metrics",
    "confusion": ".metrics",
    "threshold_curve": ".metrics",
    "ModerationSummary": ".moderate",
    "moderate_file": ".moderate",
    "EvalRecord": ".runner",
    "EvalReport": ".runner",
    "build_report": ".runner",
    "evaluate": ".runner",
    "format_report": ".runner",
    "load_records": ".runner",
}

__all__ = [
    "CalibrationResult",
    "Columns",
    "Confusion",
    "DataError",
    "EvalRecord",
    "EvalReport",
    "Example",
    "ModerationSummary",
    "Target",
    "ThresholdChoice",
    "auroc",
    "average_precision",
    "build_report",
    "choose_threshold",
    "confusion",
    "evaluate",
    "format_report",
    "load_records",
    "moderate_file",
    "parse_target",
    "read_examples",
    "threshold_curve",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from .calibrate import CalibrationResult, Target, ThresholdChoice, choose_threshold, parse_target
    from .data import Columns, DataError, Example, read_examples
    from .metrics import Confusion, auroc, average_precision, confusion, threshold_curve
    from .moderate import ModerationSummary, moderate_file
    from .runner import EvalRecord, EvalReport, build_report, evaluate, format_report, load_records
