"""PNG plots of a calibration (extra ``plots``: matplotlib). Uses matplotlib's object API (``Figure``), never
pyplot, so no GUI backend is touched and nothing global changes.

- ``score_distribution.png``: the risk-score histogram of each severity tier (or label), with the chosen
  base thresholds of each strictness as vertical lines.
- ``threshold_<strictness>.png``: precision and recall against the threshold on the validation split, the
  target as a horizontal line and the chosen threshold marked.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

from .calibrate import CalibrationResult, tiers_of
from .metrics import threshold_curve
from .runner import EvalRecord

__all__ = ["PLOTS_HINT", "matplotlib_available", "plot_score_distribution", "plot_threshold", "save_plots"]

PLOTS_HINT = "matplotlib is not installed: pip install 'flexguard-integrations[plots]'"
_TIER_COLOURS = ("#2e7d32", "#9e9d24", "#f9a825", "#ef6c00", "#c62828")
_LABEL_COLOURS = {"safe": "#1565c0", "unsafe": "#6a1b9a"}
_STRICT_STYLES = {"strict": ":", "moderate": "--", "loose": "-."}


def matplotlib_available() -> bool:
    """True when matplotlib can be imported."""
    return importlib.util.find_spec("matplotlib") is not None


def plot_score_distribution(
    records: Sequence[EvalRecord], results: Sequence[CalibrationResult], path: str | Path
) -> Path:
    """Histogram of the scores per tier (or label), chosen thresholds marked; saved as PNG."""
    from matplotlib.figure import Figure

    groups = tiers_of(records)
    fig = Figure(figsize=(8, 4.5), dpi=110)
    ax = fig.add_subplot()
    bins = [i * 5 for i in range(21)]
    for name, scores in groups.items():
        head = name.split(" ", 1)[0]
        colour = _TIER_COLOURS[int(head)] if head.isdigit() else _LABEL_COLOURS.get(name, "grey")
        ax.hist(scores, bins=bins, histtype="step", linewidth=2, color=colour, label=f"{name} (n={len(scores)})")
    for r in results:
        if r.base is not None:
            ax.axvline(
                r.base.threshold,
                color="black",
                linestyle=_STRICT_STYLES.get(r.strictness, "-"),
                linewidth=1,
                label=f"{r.strictness} threshold {r.base.threshold:g}",
            )
    ax.set_xlim(0, 100)
    ax.set_xlabel("risk score")
    ax.set_ylabel("texts")
    ax.set_title("Risk score by severity tier")
    ax.legend(fontsize="small")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    return out


def plot_threshold(result: CalibrationResult, path: str | Path) -> Path:
    """Precision and recall against the threshold, the target line and the chosen point; saved as PNG."""
    from matplotlib.figure import Figure

    points = list(reversed(threshold_curve(result.scores, result.labels)))  # lowest threshold first
    xs = [p.threshold for p in points]
    fig = Figure(figsize=(8, 4.5), dpi=110)
    ax = fig.add_subplot()
    prec = [(p.threshold, p.precision) for p in points if p.precision is not None]
    rec = [(p.threshold, p.recall) for p in points if p.recall is not None]
    fpr = [(p.threshold, p.fpr) for p in points if p.fpr is not None]
    if prec:
        ax.step([x for x, _ in prec], [y for _, y in prec], where="post", label="precision", color="#1565c0")
    if rec:
        ax.step([x for x, _ in rec], [y for _, y in rec], where="post", label="recall", color="#c62828")
    if fpr and result.target.metric == "fpr":
        ax.step([x for x, _ in fpr], [y for _, y in fpr], where="post", label="FPR", color="#6a1b9a")
    ax.axhline(result.target.value, color="grey", linestyle="--", linewidth=1, label=f"target {result.target}")
    if result.base is not None:
        c = result.base
        ax.axvline(c.threshold, color="black", linewidth=1)
        for value, colour in ((c.confusion.precision, "#1565c0"), (c.confusion.recall, "#c62828")):
            if value is not None:
                ax.plot([c.threshold], [value], marker="o", markersize=8, color=colour)
        ax.annotate(
            f"chosen {c.threshold:g}",
            xy=(c.threshold, 0.02),
            xytext=(4, 0),
            textcoords="offset points",
            fontsize="small",
        )
    ax.set_xlim(0, 100 if not xs else max(100.0, *xs))
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("threshold (flag when score >= threshold)")
    ax.set_ylabel("rate")
    ax.set_title(f"{result.strictness}: precision and recall vs threshold (positive = {result.positive})")
    ax.legend(fontsize="small", loc="lower left")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    return out


def save_plots(records: Sequence[EvalRecord], results: Sequence[CalibrationResult], out_dir: str | Path) -> list[Path]:
    """All plots of a calibration into ``out_dir``; ImportError (with the install hint) without matplotlib."""
    if not matplotlib_available():
        raise ImportError(PLOTS_HINT)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [plot_score_distribution(records, results, out / "score_distribution.png")]
    paths += [plot_threshold(r, out / f"threshold_{r.strictness}.png") for r in results]
    return paths
