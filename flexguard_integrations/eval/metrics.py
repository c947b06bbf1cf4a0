"""Classification metrics over labelled guard verdicts. Pure functions on plain sequences; no numpy.

Definitions (``docs/evaluation.md`` has the same text):

- A text is **predicted unsafe** at threshold ``t`` when ``score >= t`` (the policy's rule). A verdict the
  guard could not give (an error) is predicted unsafe at every threshold (fail-closed); the evaluation
  report counts such rows separately.
- ``precision = TP / (TP + FP)``, ``recall = TP / (TP + FN)``, ``F1 = 2PR / (P + R)``,
  ``FPR = FP / (FP + TN)``. A ratio whose denominator is 0 is reported as ``None`` (undefined), never as
  a made-up 0 or 1.
- **AUROC** is the Mann–Whitney statistic: over every (positive, negative) pair, the fraction where the
  positive has the higher score, a tie counting one half. Computed with average ranks in O(n log n).
- **AUPRC** is **average precision** (the step-wise area, as in scikit-learn's
  ``average_precision_score``): ``AP = Σ_k (R_k − R_{k−1}) · P_k`` over the distinct score values taken as
  thresholds from the highest down, where ``P_k`` / ``R_k`` are precision and recall when every text with
  ``score >= s_k`` is flagged (tied scores enter together). No interpolation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "Confusion",
    "ThresholdPoint",
    "auroc",
    "average_precision",
    "confusion",
    "threshold_curve",
]


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


@dataclass(frozen=True, slots=True)
class Confusion:
    """A 2×2 confusion table (positive = unsafe) and the ratios read from it."""

    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0

    @property
    def n(self) -> int:
        """Number of texts counted."""
        return self.tp + self.fp + self.tn + self.fn

    @property
    def positives(self) -> int:
        """Texts labelled unsafe."""
        return self.tp + self.fn

    @property
    def negatives(self) -> int:
        """Texts labelled safe."""
        return self.fp + self.tn

    @property
    def precision(self) -> float | None:
        """TP / (TP + FP); None when nothing was predicted unsafe."""
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float | None:
        """TP / (TP + FN); None when nothing is labelled unsafe."""
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def f1(self) -> float | None:
        """2PR / (P + R) = 2TP / (2TP + FP + FN); None when there are no positives, labelled or predicted."""
        return _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    @property
    def fpr(self) -> float | None:
        """FP / (FP + TN); None when nothing is labelled safe."""
        return _ratio(self.fp, self.fp + self.tn)

    @property
    def accuracy(self) -> float | None:
        """(TP + TN) / n."""
        return _ratio(self.tp + self.tn, self.n)

    def __add__(self, other: Confusion) -> Confusion:
        return Confusion(self.tp + other.tp, self.fp + other.fp, self.tn + other.tn, self.fn + other.fn)

    def as_dict(self) -> dict[str, int | float | None]:
        """Counts and ratios, JSON-ready."""
        return {
            "n": self.n,
            "tp": self.tp,
            "fp": self.fp,
            "tn": self.tn,
            "fn": self.fn,
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "fpr": self.fpr,
        }


def confusion(labels: Sequence[bool], predicted: Sequence[bool]) -> Confusion:
    """The confusion table of ``predicted`` (True = unsafe) against ``labels`` (True = unsafe)."""
    if len(labels) != len(predicted):
        raise ValueError(f"labels and predictions differ in length ({len(labels)} != {len(predicted)})")
    tp = fp = tn = fn = 0
    for y, p in zip(labels, predicted, strict=True):
        if p:
            if y:
                tp += 1
            else:
                fp += 1
        elif y:
            fn += 1
        else:
            tn += 1
    return Confusion(tp, fp, tn, fn)


def _check(scores: Sequence[float], labels: Sequence[bool]) -> None:
    if len(scores) != len(labels):
        raise ValueError(f"scores and labels differ in length ({len(scores)} != {len(labels)})")


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve as the Mann–Whitney U statistic divided by (#positives · #negatives).

    Equal to the probability that a random unsafe text scores higher than a random safe one, ties counting
    one half. None when either class is empty.
    """
    _check(scores, labels)
    n_pos = sum(1 for y in labels if y)
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    rank_sum_pos = 0.0
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        avg_rank = (i + j) / 2 + 1  # 1-based average rank of the tie group
        rank_sum_pos += avg_rank * sum(1 for k in order[i : j + 1] if labels[k])
        i = j + 1
    u = rank_sum_pos - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


@dataclass(frozen=True, slots=True)
class ThresholdPoint:
    """The metrics when every text with ``score >= threshold`` is flagged."""

    threshold: float
    confusion: Confusion

    @property
    def precision(self) -> float | None:
        """See :attr:`Confusion.precision`."""
        return self.confusion.precision

    @property
    def recall(self) -> float | None:
        """See :attr:`Confusion.recall`."""
        return self.confusion.recall

    @property
    def fpr(self) -> float | None:
        """See :attr:`Confusion.fpr`."""
        return self.confusion.fpr

    @property
    def f1(self) -> float | None:
        """See :attr:`Confusion.f1`."""
        return self.confusion.f1


def threshold_curve(scores: Sequence[float], labels: Sequence[bool]) -> list[ThresholdPoint]:
    """One point per distinct score, from the highest threshold down (each flags ``score >= threshold``)."""
    _check(scores, labels)
    n_pos = sum(1 for y in labels if y)
    n_neg = len(labels) - n_pos
    pairs = sorted(zip(scores, labels, strict=True), key=lambda p: -p[0])
    points: list[ThresholdPoint] = []
    tp = fp = 0
    i = 0
    while i < len(pairs):
        s = pairs[i][0]
        while i < len(pairs) and pairs[i][0] == s:
            if pairs[i][1]:
                tp += 1
            else:
                fp += 1
            i += 1
        points.append(ThresholdPoint(s, Confusion(tp=tp, fp=fp, tn=n_neg - fp, fn=n_pos - tp)))
    return points


def average_precision(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """AUPRC as average precision: ``Σ (R_k − R_{k−1}) · P_k`` over distinct thresholds; None without positives."""
    _check(scores, labels)
    n_pos = sum(1 for y in labels if y)
    if n_pos == 0:
        return None
    ap = 0.0
    prev_recall = 0.0
    for point in threshold_curve(scores, labels):
        recall = point.confusion.tp / n_pos
        precision = point.precision or 0.0  # always defined here: at least one text is flagged
        ap += (recall - prev_recall) * precision
        prev_recall = recall
    return ap
