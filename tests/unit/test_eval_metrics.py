"""Metrics and threshold selection against values computed by hand on small fixtures.

Definitions checked here (docs/evaluation.md): flagged when ``score >= threshold``; AUROC as the Mann–Whitney
pair count (ties count 1/2) divided by #pos × #neg; AUPRC as average precision
``Σ (R_k − R_{k−1}) · P_k`` over the distinct scores taken as thresholds from the top (no interpolation).
"""

from __future__ import annotations

import pytest

from flexguard_integrations.errors import ConfigurationError
from flexguard_integrations.eval.calibrate import Target, choose_threshold, parse_target
from flexguard_integrations.eval.metrics import (
    Confusion,
    auroc,
    average_precision,
    confusion,
    threshold_curve,
)

# The fixture: 4 unsafe (1) and 4 safe (0) texts, with two ties (80 and 40) across the classes.
SCORES = [90.0, 80.0, 80.0, 60.0, 40.0, 40.0, 20.0, 10.0]
LABELS = [True, True, False, True, False, True, False, False]


def test_confusion_at_the_moderate_threshold() -> None:
    # flagged at 41: 90(+) 80(+) 80(-) 60(+)  -> TP 3, FP 1; not flagged: 40(-) 40(+) 20(-) 10(-) -> FN 1, TN 3
    c = confusion(LABELS, [s >= 41 for s in SCORES])
    assert c == Confusion(tp=3, fp=1, tn=3, fn=1)
    assert c.precision == pytest.approx(0.75)  # 3 / (3 + 1)
    assert c.recall == pytest.approx(0.75)  # 3 / (3 + 1)
    assert c.f1 == pytest.approx(0.75)  # 2·3 / (2·3 + 1 + 1) = 6/8
    assert c.fpr == pytest.approx(0.25)  # 1 / (1 + 3)


def test_confusion_at_the_strict_threshold() -> None:
    # flagged at 21: 90 80 80 60 40 40 -> TP 4, FP 2; 20 10 -> TN 2, FN 0
    c = confusion(LABELS, [s >= 21 for s in SCORES])
    assert (c.tp, c.fp, c.tn, c.fn) == (4, 2, 2, 0)
    assert c.precision == pytest.approx(4 / 6)  # 0.6667
    assert c.recall == pytest.approx(1.0)
    assert c.f1 == pytest.approx(0.8)  # 2·4 / (8 + 2 + 0) = 8/10
    assert c.fpr == pytest.approx(0.5)  # 2 / 4


def test_undefined_ratios_are_none() -> None:
    c = confusion([False, False], [False, False])
    assert c.precision is None  # nothing flagged
    assert c.recall is None  # nothing unsafe
    assert c.f1 is None
    assert c.fpr == 0.0
    assert confusion([True], [True]).fpr is None  # nothing safe


def test_auroc_by_mann_whitney_pair_count() -> None:
    # pairs (positive, negative); negatives are 80, 40, 20, 10:
    #   pos 90: beats all 4                         -> 4
    #   pos 80: ties 80 (1/2), beats 40, 20, 10     -> 3.5
    #   pos 60: loses to 80, beats 40, 20, 10       -> 3
    #   pos 40: loses to 80, ties 40 (1/2), beats 20, 10 -> 2.5
    # U = 4 + 3.5 + 3 + 2.5 = 13; AUROC = 13 / (4 · 4) = 0.8125
    assert auroc(SCORES, LABELS) == pytest.approx(0.8125)


def test_auprc_as_average_precision() -> None:
    # thresholds from the top (tied scores enter together); n_pos = 4
    #   t=90: TP 1 FP 0 -> P 1,   R 0.25 -> ΔR·P = 0.25 · 1   = 0.25
    #   t=80: TP 2 FP 1 -> P 2/3, R 0.50 -> 0.25 · 2/3         = 0.16667
    #   t=60: TP 3 FP 1 -> P 3/4, R 0.75 -> 0.25 · 3/4         = 0.1875
    #   t=40: TP 4 FP 2 -> P 2/3, R 1.00 -> 0.25 · 2/3         = 0.16667
    #   t=20, t=10: recall unchanged     -> 0
    # AP = 1/4 + 1/6 + 3/16 + 1/6 = 37/48 = 0.770833
    assert average_precision(SCORES, LABELS) == pytest.approx(37 / 48)


def test_auc_edge_cases() -> None:
    assert auroc([1.0, 2.0], [True, True]) is None  # no negatives
    assert average_precision([1.0, 2.0], [False, False]) is None  # no positives
    assert auroc([10.0, 90.0], [False, True]) == 1.0  # perfectly separated
    assert auroc([90.0, 10.0], [False, True]) == 0.0  # perfectly reversed
    assert auroc([50.0, 50.0], [False, True]) == 0.5  # one tie
    assert average_precision([10.0, 90.0], [False, True]) == 1.0
    with pytest.raises(ValueError, match="differ in length"):
        auroc([1.0], [True, False])


def test_threshold_curve_points() -> None:
    pts = threshold_curve(SCORES, LABELS)
    assert [p.threshold for p in pts] == [90, 80, 60, 40, 20, 10]
    assert [(p.confusion.tp, p.confusion.fp) for p in pts] == [(1, 0), (2, 1), (3, 1), (4, 2), (4, 3), (4, 4)]


# ------------------------------------------------------------------------------------------ threshold choice


@pytest.mark.parametrize(
    ("target", "threshold", "met"),
    [
        # recall at 90/80/60/40 = .25/.5/.75/1: the highest threshold with recall >= .75 is 60
        (Target("recall", 0.75), 60.0, True),
        # recall 1 needs 40 (the lowest positive)
        (Target("recall", 1.0), 40.0, True),
        # precision at 90/80/60/40/20/10 = 1, 2/3, 3/4, 2/3, 4/7, 1/2: the lowest threshold with P >= .75 is 60
        (Target("precision", 0.75), 60.0, True),
        # P >= .8 only at 90
        (Target("precision", 0.8), 90.0, True),
        # FPR at 91/90/80/60/40 = 0, 0, .25, .25, .5: the lowest threshold with FPR <= .25 is 60
        (Target("fpr", 0.25), 60.0, True),
        # FPR 0: the lowest such threshold is 90
        (Target("fpr", 0.0), 90.0, True),
    ],
)
def test_choose_threshold_on_the_fixture(target: Target, threshold: float, met: bool) -> None:
    choice = choose_threshold(SCORES, LABELS, target)
    assert choice is not None
    assert choice.threshold == threshold
    assert choice.met is met


def test_choose_threshold_separable_data_has_one_right_answer() -> None:
    # safe texts score 5..30, unsafe 55..95: every target is met exactly at the lowest unsafe score, 55
    scores = [5.0, 12.0, 20.0, 30.0, 55.0, 70.0, 95.0]
    labels = [False, False, False, False, True, True, True]
    for target in (Target("recall", 1.0), Target("precision", 1.0), Target("fpr", 0.0)):
        choice = choose_threshold(scores, labels, target)
        assert choice is not None
        assert (choice.threshold, choice.met) == (55.0, True), target
        assert (choice.confusion.precision, choice.confusion.recall, choice.confusion.fpr) == (1.0, 1.0, 0.0)


def test_choose_threshold_when_the_target_cannot_be_met() -> None:
    # the top score is a safe text at 100: precision can never exceed 1/2, and FPR 0 needs a threshold > 100
    scores = [100.0, 50.0]
    labels = [False, True]
    choice = choose_threshold(scores, labels, Target("precision", 0.9))
    assert choice is not None
    assert (choice.threshold, choice.met) == (50.0, False)  # best precision reachable: 1/2 at 50
    choice = choose_threshold(scores, labels, Target("fpr", 0.0))
    assert choice is not None
    assert (choice.threshold, choice.met) == (100.0, False)  # the highest threshold allowed


def test_flag_nothing_is_a_candidate_below_100() -> None:
    # all safe texts score above every unsafe one: FPR 0 means flagging nothing, one above the top score
    choice = choose_threshold([80.0, 20.0], [False, True], Target("fpr", 0.0))
    assert choice is not None
    assert (choice.threshold, choice.met, choice.confusion.tp) == (81.0, True, 0)


def test_choose_threshold_undefined() -> None:
    assert choose_threshold([], [], Target("recall", 0.9)) is None
    assert choose_threshold([10.0], [False], Target("recall", 0.9)) is None  # no positives
    assert choose_threshold([10.0], [True], Target("fpr", 0.1)) is None  # no negatives


def test_parse_target() -> None:
    assert parse_target("recall=0.95") == Target("recall", 0.95)
    assert parse_target("precision>=0.9") == Target("precision", 0.9)
    assert parse_target("FPR<=5%") == Target("fpr", 0.05)
    assert str(parse_target("fpr=0.1")) == "fpr <= 0.1"
    for bad in ("recall", "f1=0.9", "recall=high", "recall=1.5"):
        with pytest.raises(ConfigurationError):
            parse_target(bad)
