"""Regressions from the core review: FlexGuard mixed labelled/bare lines, grapheme-safe cuts, threshold aliases."""

from __future__ import annotations

import itertools
import unicodedata

import pytest
import regex
from hypothesis import given
from hypothesis import strategies as st

from flexguard_integrations import Action, Category, PolicyError, StrictnessPolicy
from flexguard_integrations.models import FlexGuardModel
from flexguard_integrations.segment import chunk_text, safe_boundary

# ---------------------------------------------------------------- FlexGuard: bare category, labelled score


@pytest.mark.parametrize(
    ("tail", "cats", "natives"),
    [
        ("\nJAIL\nRISK_SCORE: 35", (Category.JAILBREAK,), ("JAIL",)),
        ("\nVIO, ILG\n\nRISK_SCORE: 87", (Category.VIOLENCE, Category.ILLEGAL), ("VIO", "ILG")),
        ("\nVIO\n**RISK_SCORE:** 87", (Category.VIOLENCE,), ("VIO",)),
        ("\nVIO\nRISK_SCORE: 87/100\n", (Category.VIOLENCE,), ("VIO",)),
    ],
)
def test_flexguard_bare_category_line_before_a_labelled_score(
    tail: str, cats: tuple[Category, ...], natives: tuple[str, ...]
) -> None:
    v = FlexGuardModel().parse_output("<think>\nstep1..step8\n</think>" + tail)
    assert v.ok
    assert v.categories == cats and v.native_categories == natives


@pytest.mark.parametrize(
    "line", ["JAIL", "VIO ILG", "SAFE", "WEAPONS", "VIO, WEAPONS", "The text asks for nothing harmful.", "None"]
)
def test_flexguard_labelled_score_reads_the_category_line_as_the_bare_path_does(line: str) -> None:
    model = FlexGuardModel()
    bare = model.parse_output(f"<think>s</think>\n{line}\n35")
    labelled = model.parse_output(f"<think>s</think>\n{line}\nRISK_SCORE: 35")
    assert labelled.ok and bare.ok
    assert labelled.categories == bare.categories
    assert labelled.native_categories == bare.native_categories


def test_flexguard_labelled_category_line_still_wins() -> None:
    v = FlexGuardModel().parse_output("<think>s</think>\nCATEGORY: VIO\nnote\nRISK_SCORE: 87")
    assert v.categories == (Category.VIOLENCE,)
    v = FlexGuardModel().parse_output("<think>s</think>\nRISK_SCORE: 87")
    assert v.ok and v.categories == ()


@pytest.mark.parametrize("score", ["RISK_SCORE: 70", "70"])
def test_flexguard_codes_on_several_lines_above_the_score_all_count(score: str) -> None:
    """Keeping only the last code line let a looser per-category threshold decide alone (fail-open)."""
    v = FlexGuardModel().parse_output(f"<think>s</think>\nVIO\nJAIL\n{score}")
    assert v.categories == (Category.VIOLENCE, Category.JAILBREAK) and v.native_categories == ("VIO", "JAIL")
    policy = StrictnessPolicy.from_dict({"preset": "moderate", "thresholds": {"JAILBREAK": 90}})
    assert policy.decide(v, "prompt").action is Action.BLOCK  # VIOLENCE at the preset's 41
    # a prose line stops the walk: only the codes right above the score count
    v = FlexGuardModel().parse_output(f"<think>s</think>\nI think this is violent.\nJAIL\n{score}")
    assert v.categories == (Category.JAILBREAK,)


def test_flexguard_per_category_threshold_applies_with_a_labelled_score() -> None:
    policy = StrictnessPolicy.from_dict({"preset": "moderate", "thresholds": {"JAILBREAK": 30}})
    v = FlexGuardModel().parse_output("<think>s</think>\nJAIL\nRISK_SCORE: 35")
    d = policy.decide(v, "prompt")
    assert d.action is Action.BLOCK and d.threshold == 30.0


# ---------------------------------------------------------------- segmentation: grapheme clusters

# each entry is exactly one extended grapheme cluster, and no two of them merge when concatenated
_THAI = ["น้ำ", "ทำ", "จำ", "คำ", "ก", "ม", "ກຳ", "ນ້ຳ"]
_HANGUL_NFD = [unicodedata.normalize("NFD", s) for s in "한국어문장입니다가각"]
_HANGUL_OLD = ["\ua960\ud7b0\ud7cb", "\u1100\ud7b0", "\ua97c\u1161\ud7fb", "\u1112\u1161\u11ff"]
_HANGUL_MIXED = ["가\u11a8", "각\u11a8", "가\u1161\u11a8", "\u1100\u1100\u1161", "\u1100가"]  # LV+T, LVT+T, L+LV...
_INDIC = ["क्ष", "त्रि", "ক্ষ", "স্ত্রী", "ગ્ર", "ସ୍ତ", "స్త్రీ", "ന്ത്ര", "क्\u200dष", "क़्ष", "य", "क्\u200c", "ൎക"]  # GB9c, GB9b
_CRLF = ["\r\n"]
_PLAIN = ["a", "b", " ", ".", "\n", "한", "1"]
CLUSTERS = _THAI + _HANGUL_NFD + _HANGUL_OLD + _HANGUL_MIXED + _INDIC + _CRLF + _PLAIN


def _bounds(clusters: list[str]) -> set[int]:
    return {0, *itertools.accumulate(len(c) for c in clusters)}


@pytest.mark.parametrize("cluster", _THAI + _HANGUL_NFD + _HANGUL_OLD + _HANGUL_MIXED + _INDIC + _CRLF)
def test_safe_boundary_never_cuts_inside_the_cluster(cluster: str) -> None:
    text = "x" + cluster + "y"
    for i in range(len(text) + 1):
        assert safe_boundary(text, i) in {0, 1, 1 + len(cluster), len(text)}, (cluster, i)


def test_safe_boundary_still_cuts_between_clusters() -> None:
    for clusters in (_THAI, _HANGUL_NFD, ["가", "나", "다"], ["a\r\n", "b"], _INDIC):
        text = "".join(clusters)
        for b in _bounds(clusters):
            assert safe_boundary(text, b) == b


@given(
    st.lists(st.sampled_from(CLUSTERS), min_size=1, max_size=400),
    st.integers(min_value=8, max_value=120),
    st.integers(min_value=0, max_value=40),
)
def test_chunk_cuts_fall_between_clusters(clusters: list[str], size: int, overlap: int) -> None:
    text = "".join(clusters)
    bounds = _bounds(clusters)
    for i in range(len(text) + 1):
        assert safe_boundary(text, i) in bounds
    chunks = chunk_text(text, size, 0)
    assert "".join(chunks) == text
    assert set(itertools.accumulate(len(c) for c in chunks)) <= bounds
    for c in chunk_text(text, size, overlap):  # overlapping chunks start and end on cluster boundaries too
        assert any(text.startswith(c, b) and b + len(c) in bounds for b in bounds)


# Devanagari and Bengali consonants, viramas, a nukta, vowel signs (spacing and not), ZWJ, and separators
_INDIC_ALPHABET = (
    "कषतरयজকകര" + "\u094d\u09cd\u0d4d" + "\u093c" + "\u093f\u0940\u0947\u09bf" + "\u200c\u200d\u0d4e" + " a."
)


@given(st.text(alphabet=_INDIC_ALPHABET, max_size=60))
def test_indic_cuts_agree_with_a_unicode_grapheme_segmenter(text: str) -> None:
    # the regex module's \X implements UAX #29 with GB9c: every cut we make is one of its cluster boundaries
    bounds = _bounds(regex.findall(r"\X", text))
    for i in range(len(text) + 1):
        assert safe_boundary(text, i) in bounds, (text, i)


@pytest.mark.parametrize("unit", ["क्", "\u0301", "\U0001f1e6"])
def test_a_crafted_endless_cluster_is_cut_at_the_code_point_not_walked_to_its_start(unit: str) -> None:
    # a run of linked consonants, of marks or of regional indicators is one "cluster" in the rules: looking
    # back over all of it at every cut made chunking a crafted text quadratic (seconds per 100 kB)
    text = "a" + unit * 20_000
    index = len(text) - 7
    assert index - 64 <= safe_boundary(text, index) <= index
    chunks = chunk_text(text, 2000, 0)
    assert "".join(chunks) == text and max(map(len, chunks)) <= 2000


def test_reviewer_examples_cut_between_clusters() -> None:
    for clusters, size in (
        (["น้ำ", "ทำ", "จำ", "คำ"] * 40, 101),
        ([unicodedata.normalize("NFD", s) for s in "한국어문장입니다" * 30], 100),
        ((["a"] * 49 + ["\r\n"]) * 10, 50),
    ):
        text = "".join(clusters)
        cuts = set(itertools.accumulate(len(c) for c in chunk_text(text, size, 0)))
        assert cuts <= _bounds(clusters)


# ---------------------------------------------------------------- policy: two names for one category


@pytest.mark.parametrize(
    "data",
    [
        {"thresholds": {"VIO": 30, "violence": 60}},
        {"thresholds": {"JAILBREAK": 30, "Jailbreak": 30}},
        {"thresholds": {"PII": 10, "INF": 20}},
        {"surfaces": {"tool_call": {"thresholds": {"sexual": 50, "SEX": 61}}}},
    ],
)
def test_two_threshold_names_for_one_category_are_an_error(data: dict[str, object]) -> None:
    keys = [str(k) for k in next(iter(_find_thresholds(data)))]
    with pytest.raises(PolicyError, match="invalid policy") as info:
        StrictnessPolicy.from_dict(data)
    message = str(info.value)
    assert all(repr(k) in message for k in keys), message


def test_distinct_threshold_names_still_load() -> None:
    p = StrictnessPolicy.from_dict(
        {"thresholds": {"VIO": 30, "sexual": 61}, "surfaces": {"tool_call": {"thresholds": {"JAIL": 10}}}}
    )
    assert p.thresholds == {Category.VIOLENCE: 30.0, Category.SEXUAL: 61.0}
    assert p.category_threshold(Category.JAILBREAK, "tool_call") == 10.0
    assert StrictnessPolicy.from_dict(p.to_dict()) == p


def _find_thresholds(data: dict[str, object]) -> list[dict[str, object]]:
    found: list[dict[str, object]] = []
    for key, value in data.items():
        if key == "thresholds" and isinstance(value, dict):
            found.append(value)
        elif isinstance(value, dict):
            found.extend(_find_thresholds(value))
    return found
