"""Threshold calibration: choose, per strictness and per category, the threshold that meets a target.

A target is ``recall=0.95``, ``precision=0.9`` or ``fpr=0.05``. On the validation split, for each strictness
(its positive class: severity ≥ 1 / 2 / 3, or the binary label) :func:`choose_threshold` picks:

- ``recall >= r``: the **highest** threshold whose recall is at least ``r`` (the fewest false alarms that
  still catch the share asked for);
- ``precision >= p``: the **lowest** threshold whose precision is at least ``p`` (the most caught);
- ``fpr <= f``: the **lowest** threshold whose false positive rate is at most ``f``.

Candidate thresholds are the distinct scores of the split (a text is over when ``score >= threshold``, so
the chosen threshold is the lowest score still flagged), plus one just above the highest score (flag
nothing) while that stays within 0–100. When no candidate meets the target, the closest one is chosen and
the result says ``met: false``.

The base threshold is chosen on every row of the split. A per-category threshold for category C is chosen
on the rows whose verdict names C (the rows the policy will apply it to), when there are at least
``min_support`` of them with both classes present; other categories keep the base threshold. Rows whose
verdict failed have no score and are left out.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import ConfigurationError
from ..policy import StrictnessPolicy
from ..verdict import Category
from .data import MIN_SEVERITY, STRICTNESS
from .metrics import Confusion, ThresholdPoint, confusion, threshold_curve
from .runner import EvalRecord

__all__ = [
    "CalibrationResult",
    "Target",
    "ThresholdChoice",
    "calibrate",
    "choose_threshold",
    "parse_target",
    "split_records",
    "write_policies",
]

Metric = Literal["recall", "precision", "fpr"]


@dataclass(frozen=True, slots=True)
class Target:
    """What the threshold must achieve: ``recall >= value``, ``precision >= value`` or ``fpr <= value``."""

    metric: Metric
    value: float

    def __str__(self) -> str:
        op = "<=" if self.metric == "fpr" else ">="
        return f"{self.metric} {op} {self.value:g}"

    def met_by(self, point: ThresholdPoint) -> bool:
        """True when ``point`` meets the target (an undefined ratio never does)."""
        got = getattr(point, self.metric)
        if got is None:
            return False
        return bool(got <= self.value + 1e-12) if self.metric == "fpr" else bool(got >= self.value - 1e-12)


def parse_target(text: str) -> Target:
    """``recall=0.95`` / ``precision=0.9`` / ``fpr=0.05`` (also ``recall>=0.95``, ``fpr<=5%``)."""
    raw = text.strip().lower().replace(" ", "")
    for sep in (">=", "<=", "="):
        if sep in raw:
            name, _, value = raw.partition(sep)
            break
    else:
        raise ConfigurationError(f"bad target {text!r}; write recall=0.95, precision=0.9 or fpr=0.05")
    if name not in ("recall", "precision", "fpr"):
        raise ConfigurationError(f"unknown target metric {name!r}; expected recall, precision or fpr")
    try:
        number = float(value[:-1]) / 100 if value.endswith("%") else float(value)
    except ValueError:
        raise ConfigurationError(f"bad target value {value!r} in {text!r}; expected a number in 0-1") from None
    if not 0.0 <= number <= 1.0 or math.isnan(number):
        raise ConfigurationError(f"target value {number:g} must be within 0 and 1")
    metric: Metric = "recall" if name == "recall" else ("precision" if name == "precision" else "fpr")
    return Target(metric, number)


@dataclass(frozen=True, slots=True)
class ThresholdChoice:
    """The chosen threshold and the metrics it gives on the rows it was chosen on."""

    threshold: float
    met: bool
    confusion: Confusion

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        c = self.confusion
        r = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in c.as_dict().items()}
        return {"threshold": self.threshold, "met": self.met, **r}


def _nothing_point(scores: Sequence[float], labels: Sequence[bool]) -> ThresholdPoint | None:
    top = max(scores)
    above = math.floor(top) + 1.0
    if above > 100.0:
        return None
    n_pos = sum(1 for y in labels if y)
    return ThresholdPoint(above, Confusion(tp=0, fp=0, tn=len(labels) - n_pos, fn=n_pos))


def choose_threshold(scores: Sequence[float], labels: Sequence[bool], target: Target) -> ThresholdChoice | None:
    """The threshold meeting ``target`` on these rows (see the module docstring); None when it cannot be
    defined (no rows; no positives for recall or precision; no negatives for fpr)."""
    if not scores:
        return None
    n_pos = sum(1 for y in labels if y)
    if target.metric in ("recall", "precision") and n_pos == 0:
        return None
    if target.metric == "fpr" and n_pos == len(labels):
        return None
    points = threshold_curve(scores, labels)  # highest threshold first
    nothing = _nothing_point(scores, labels)
    if nothing is not None:
        points = [nothing, *points]
    ok = [p for p in points if target.met_by(p)]
    if target.metric == "recall":
        if ok:
            best = ok[0]  # highest threshold meeting the recall
        else:
            best = points[-1]  # unreachable only through ties at the lowest score: flag everything
        return ThresholdChoice(best.threshold, bool(ok), best.confusion)
    if ok:
        best = ok[-1]  # lowest threshold meeting precision / fpr: the most recall
        return ThresholdChoice(best.threshold, True, best.confusion)
    if target.metric == "precision":
        defined = [p for p in points if p.precision is not None]
        top = max(p.precision or 0.0 for p in defined)
        best = [p for p in defined if (p.precision or 0.0) >= top - 1e-12][-1]
    else:
        best = points[0]  # fpr: the highest threshold is the least flagging
    return ThresholdChoice(best.threshold, False, best.confusion)


# ===================================================================== splitting


def _bucket(key: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_records(
    records: Sequence[EvalRecord], val_fraction: float = 0.7, *, seed: int = 0
) -> tuple[list[EvalRecord], list[EvalRecord]]:
    """(validation, test): a ``split`` column decides when the data has one; otherwise a stable hash of the id
    puts ``val_fraction`` of the rows in validation (the same rows on every run with the same seed)."""
    if not 0.0 < val_fraction <= 1.0:
        raise ConfigurationError(f"the validation fraction must be in (0, 1], got {val_fraction:g}")
    if any(r.split is not None for r in records):
        val = [r for r in records if r.split != "test"]
        test = [r for r in records if r.split == "test"]
        return val, test
    val, test = [], []
    for r in records:
        (val if _bucket(r.key, seed) < val_fraction else test).append(r)
    return val, test


# ===================================================================== calibration


@dataclass
class CategoryChoice:
    """A per-category outcome: a threshold, or why the base threshold is kept."""

    category: Category
    rows: int
    positives: int
    choice: ThresholdChoice | None
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "category": self.category.value,
            "rows": self.rows,
            "positives": self.positives,
            "choice": self.choice.as_dict() if self.choice else None,
            "note": self.note,
        }


@dataclass
class CalibrationResult:
    """The calibration of one strictness: the base choice, the per-category ones, the policy and its metrics."""

    strictness: str
    positive: str
    target: Target
    base: ThresholdChoice | None
    categories: list[CategoryChoice]
    policy: StrictnessPolicy
    validation: Confusion
    test: Confusion | None
    n_validation: int
    n_test: int
    base_scope: str = ""
    scores: list[float] = field(default_factory=list, repr=False)
    labels: list[bool] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (without the raw scores)."""

        def conf(c: Confusion | None) -> dict[str, Any] | None:
            if c is None:
                return None
            return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in c.as_dict().items()}

        return {
            "strictness": self.strictness,
            "positive": self.positive,
            "target": str(self.target),
            "base": self.base.as_dict() if self.base else None,
            "base_chosen_on": self.base_scope,
            "categories": [c.as_dict() for c in self.categories],
            "policy": self.policy.to_dict(),
            "validation": conf(self.validation),
            "test": conf(self.test),
            "n_validation": self.n_validation,
            "n_test": self.n_test,
        }


def _choice_if_supported(
    rows: Sequence[EvalRecord], level: str, target: Target, min_rows: int
) -> ThresholdChoice | None:
    if len(rows) < min_rows:
        return None
    return choose_threshold([r.score for r in rows], [r.positive(level) for r in rows], target)


def _policy_confusion(records: Sequence[EvalRecord], policy: StrictnessPolicy, level: str) -> Confusion:
    labels = [r.positive(level) for r in records]
    predicted = [(not r.ok) or policy.is_over(r.verdict, r.surface) for r in records]
    return confusion(labels, predicted)


def calibrate(
    validation: Sequence[EvalRecord],
    target: Target,
    *,
    test: Sequence[EvalRecord] = (),
    strictness: Sequence[str] = STRICTNESS,
    min_support: int = 30,
    per_category: bool = True,
) -> list[CalibrationResult]:
    """Choose the thresholds of each strictness on ``validation``; report the policy's metrics on both splits."""
    ok = [r for r in validation if r.ok]
    if not ok:
        raise ConfigurationError("no verdicts to calibrate on: every row of the validation split failed")
    binary = all(r.severity is None for r in validation)
    results: list[CalibrationResult] = []
    for level in strictness:
        if level not in MIN_SEVERITY:
            raise ConfigurationError(f"unknown strictness {level!r}; expected one of {', '.join(STRICTNESS)}")
        cats: list[CategoryChoice] = []
        if per_category:
            named = sorted({c for r in ok for c in r.verdict.categories}, key=lambda c: list(Category).index(c))
            for cat in named:
                rows = [r for r in ok if cat in r.verdict.categories]
                pos = sum(1 for r in rows if r.positive(level))
                if len(rows) < min_support:
                    note = f"only {len(rows)} rows name it, fewer than min_support {min_support}"
                    cats.append(CategoryChoice(cat, len(rows), pos, None, note))
                    continue
                if pos == 0 or pos == len(rows):
                    note = f"all {len(rows)} rows that name it are {'unsafe' if pos else 'safe'}"
                    cats.append(CategoryChoice(cat, len(rows), pos, None, note))
                    continue
                choice = choose_threshold([r.score for r in rows], [r.positive(level) for r in rows], target)
                cats.append(CategoryChoice(cat, len(rows), pos, choice, "" if choice else "undefined"))
        # the base threshold is chosen on the rows it will govern: those naming no category with its own
        # threshold (disjoint groups that each meet the target meet it together); too few -> all rows
        own = {c.category for c in cats if c.choice is not None}
        base_rows = [r for r in ok if not own & set(r.verdict.categories)]
        scope = "rows without an own-threshold category"
        base = _choice_if_supported(base_rows, level, target, min_support if own else 1)
        if base is None:
            base_rows, scope = list(ok), "all rows"
            base = choose_threshold([r.score for r in ok], [r.positive(level) for r in ok], target)
        scores = [r.score for r in base_rows]
        labels = [r.positive(level) for r in base_rows]
        data: dict[str, Any] = {"preset": level}
        if base is not None:
            data["threshold"] = base.threshold
        thresholds = {c.category.value: c.choice.threshold for c in cats if c.choice is not None}
        if thresholds:
            data["thresholds"] = thresholds
        policy = StrictnessPolicy.from_dict(data, source=f"calibrated {level}")
        results.append(
            CalibrationResult(
                strictness=level,
                positive="label" if binary else f"severity>={MIN_SEVERITY[level]}",
                target=target,
                base=base,
                categories=cats,
                policy=policy,
                validation=_policy_confusion(validation, policy, level),
                test=_policy_confusion(test, policy, level) if test else None,
                n_validation=len(validation),
                n_test=len(test),
                base_scope=f"{scope} ({len(base_rows)})",
                scores=scores,
                labels=labels,
            )
        )
    return results


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def policy_yaml(result: CalibrationResult, *, source: str = "") -> str:
    """The policy YAML of one strictness, with a comment header saying how it was chosen."""
    import yaml

    v = result.validation
    lines = [
        f"# Calibrated by `flexguard calibrate`{' on ' + source if source else ''}",
        f"# strictness {result.strictness} (positive = {result.positive}); target {result.target}",
        f"# validation split: {result.n_validation} rows -> precision {_fmt(v.precision)}, recall "
        f"{_fmt(v.recall)}, FPR {_fmt(v.fpr)} (guard errors count as flagged)",
    ]
    if result.test is not None:
        t = result.test
        lines.append(
            f"# test split: {result.n_test} rows -> precision {_fmt(t.precision)}, recall {_fmt(t.recall)}, "
            f"FPR {_fmt(t.fpr)}"
        )
    if result.base is not None and not result.base.met:
        lines.append(f"# WARNING: no threshold meets {result.target} on the validation split; closest chosen")
    if result.base is None:
        lines.append(
            f"# WARNING: {result.target} cannot be measured on the validation split (no positive or no negative "
            f"rows under {result.positive}); the preset's threshold is kept"
        )
    for c in result.categories:
        if c.choice is None:
            lines.append(f"# {c.category.value}: base threshold kept ({c.note})")
    pol = result.policy
    data: dict[str, Any] = {"preset": result.strictness, "threshold": pol.base_threshold()}
    if pol.thresholds:
        data["thresholds"] = {c.value: t for c, t in pol.thresholds.items()}
    body = yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
    return "\n".join(lines) + "\n" + body


def write_policies(results: Sequence[CalibrationResult], out_dir: str | Path, *, source: str = "") -> list[Path]:
    """Write ``OUT_DIR/<strictness>.yaml`` for each result and ``OUT_DIR/calibration.json``; the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for result in results:
        path = out / f"{result.strictness}.yaml"
        path.write_text(policy_yaml(result, source=source), encoding="utf-8")
        paths.append(path)
    summary = out / "calibration.json"
    summary.write_text(
        json.dumps({"source": source, "results": [r.as_dict() for r in results]}, indent=2) + "\n",
        encoding="utf-8",
    )
    paths.append(summary)
    return paths


def load_calibrated(directory: str | Path) -> dict[str, StrictnessPolicy]:
    """The policies of a calibration directory (``strict.yaml``, ...); presets for the missing ones."""
    d = Path(directory)
    if not d.is_dir():
        raise ConfigurationError(f"{d}: not a directory of calibrated policies")
    out: dict[str, StrictnessPolicy] = {}
    for level in STRICTNESS:
        path = d / f"{level}.yaml"
        out[level] = StrictnessPolicy.from_yaml(path) if path.is_file() else StrictnessPolicy.from_preset(level)
    return out


def format_calibration(results: Sequence[CalibrationResult]) -> str:
    """A plain-text summary of the chosen thresholds and the metrics they give."""
    lines: list[str] = []
    for r in results:
        base = f"{r.base.threshold:g}" if r.base else "preset"
        met = "" if r.base is None or r.base.met else "  (target NOT met: closest threshold chosen)"
        lines.append(f"{r.strictness} (positive = {r.positive}): threshold {base}{met}  [chosen on {r.base_scope}]")
        for c in r.categories:
            if c.choice is not None:
                flag = "" if c.choice.met else " (target not met)"
                lines.append(f"    {c.category.value}: {c.choice.threshold:g}{flag}  ({c.rows} rows)")
            else:
                lines.append(f"    {c.category.value}: base kept ({c.note})")
        v = r.validation
        lines.append(
            f"    validation ({r.n_validation}): precision {_fmt(v.precision)}  recall {_fmt(v.recall)}  "
            f"FPR {_fmt(v.fpr)}  F1 {_fmt(v.f1)}"
        )
        if r.test is not None:
            t = r.test
            lines.append(
                f"    test       ({r.n_test}): precision {_fmt(t.precision)}  recall {_fmt(t.recall)}  "
                f"FPR {_fmt(t.fpr)}  F1 {_fmt(t.f1)}"
            )
    return "\n".join(lines)


def tiers_of(records: Sequence[EvalRecord]) -> Mapping[str, list[float]]:
    """Scores grouped by severity tier (or by label for binary data), for the distribution plot."""
    from .data import TIERS

    groups: dict[str, list[float]] = {}
    for r in records:
        if not r.ok:
            continue
        if r.severity is not None:
            name = f"{r.severity} {TIERS[r.severity]}"
        else:
            name = "unsafe" if r.label else "safe"
        groups.setdefault(name, []).append(r.score)
    return dict(sorted(groups.items()))
