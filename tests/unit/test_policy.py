"""StrictnessPolicy: exhaustive, pure (no I/O)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flexguard_integrations import (
    Action,
    Category,
    GuardUnavailableError,
    PolicyError,
    StrictnessPolicy,
    Surface,
    Verdict,
)
from flexguard_integrations.policy import PRESETS

DESIGN_EXAMPLE = """
preset: moderate
on_error: block
thresholds:
  JAILBREAK: 30
  SEXUAL: 61
surfaces:
  tool_call:   {preset: strict}
  retrieved:   {action: redact}
rules:
  - when: {min_score: 81}
    then: block
  - when: {categories: [PRIVACY]}
    then: redact
  - when: {min_score: 41, max_score: 60}
    then: {reroute: human_review}
"""


def v(score: float, *cats: Category, refusal: bool | None = None) -> Verdict:
    return Verdict(risk_score=score, categories=cats, refusal=refusal)


@pytest.fixture
def design(tmp_path: Path) -> StrictnessPolicy:
    path = tmp_path / "policy.yaml"
    path.write_text(DESIGN_EXAMPLE)
    return StrictnessPolicy.from_yaml(path)


@pytest.mark.parametrize(("preset", "threshold"), [("strict", 21), ("moderate", 41), ("loose", 61)])
def test_preset_boundaries(preset: str, threshold: float) -> None:
    p = StrictnessPolicy.from_preset(preset)
    assert p.decide(v(threshold - 0.01)).action is Action.ALLOW
    assert p.decide(v(threshold)).action is Action.BLOCK  # over means risk >= threshold
    assert p.decide(v(100)).action is Action.BLOCK
    assert p.decide(v(0)).action is Action.ALLOW


def test_qwen_tiers_reproduce_qwen_modes() -> None:
    controversial = v(50.0)
    assert StrictnessPolicy.from_preset("strict").decide(controversial).action is Action.BLOCK
    assert StrictnessPolicy.from_preset("loose").decide(controversial).action is Action.ALLOW
    assert StrictnessPolicy.from_preset("moderate").decide(controversial).action is Action.BLOCK


def test_design_example_loads_and_decides(design: StrictnessPolicy) -> None:
    assert design.name == "policy"
    # JAILBREAK has its own lower threshold
    d = design.decide(v(35, Category.JAILBREAK))
    assert d.action is Action.BLOCK and d.threshold == 30 and d.rule == "action"
    # SEXUAL is looser
    assert design.decide(v(55, Category.SEXUAL)).action is Action.ALLOW
    # the lowest applicable threshold wins when several categories apply
    assert design.decide(v(45, Category.SEXUAL, Category.VIOLENCE)).action is Action.REROUTE
    # rules in order: min_score 81 first
    d = design.decide(v(90, Category.PRIVACY))
    assert d.action is Action.BLOCK and d.rule == "rules[0]"
    d = design.decide(v(70, Category.PRIVACY))
    assert d.action is Action.REDACT and d.rule == "rules[1]"
    d = design.decide(v(50, Category.VIOLENCE))
    assert d.action is Action.REROUTE and d.route == "human_review" and d.rule == "rules[2]"
    # no rule matches -> surface action, default block
    d = design.decide(v(70, Category.VIOLENCE))
    assert d.action is Action.BLOCK and d.rule == "action"


def test_surface_overrides(design: StrictnessPolicy) -> None:
    # tool_call runs strict: 25 is over there, under elsewhere
    assert design.decide(v(25), Surface.TOOL_CALL).action is Action.BLOCK
    assert design.decide(v(25), Surface.PROMPT).action is Action.ALLOW
    # retrieved: over threshold and no rule matches -> the surface's action
    d = design.decide(v(70, Category.VIOLENCE), Surface.RETRIEVED)
    assert d.action is Action.REDACT and d.rule == "surfaces.retrieved.action"
    # rules still come first on that surface
    assert design.decide(v(95), "retrieved").action is Action.BLOCK


def test_surface_rules_run_before_global_rules() -> None:
    p = StrictnessPolicy.from_dict(
        {
            "rules": [{"when": {"min_score": 41}, "then": "block"}],
            "surfaces": {"response": {"rules": [{"when": {"min_score": 41}, "then": "flag"}]}},
        }
    )
    assert p.decide(v(60), Surface.RESPONSE).action is Action.FLAG
    assert p.decide(v(60), Surface.PROMPT).action is Action.BLOCK


def test_rule_conditions_refusal_surfaces_and_names() -> None:
    p = StrictnessPolicy.from_dict(
        {
            "preset": "strict",
            "rules": [
                {"name": "refused", "when": {"refusal": True}, "then": "allow"},
                {"when": {"surfaces": ["tool_result"]}, "then": "flag"},
                {"when": {"categories": "VIO"}, "then": "reroute:security"},
            ],
        }
    )
    d = p.decide(v(30, refusal=True), Surface.RESPONSE)
    assert d.action is Action.ALLOW and d.rule == "rules[0] refused"
    assert p.decide(v(30), Surface.TOOL_RESULT).action is Action.FLAG
    d = p.decide(v(30, Category.VIOLENCE))
    assert d.action is Action.REROUTE and d.route == "security"
    assert p.decide(v(30, Category.ILLEGAL)).action is Action.BLOCK


def test_explicit_base_threshold_and_surface_threshold() -> None:
    p = StrictnessPolicy.from_dict({"threshold": 70, "surfaces": {"prompt": {"threshold": 10}}})
    assert p.decide(v(65), Surface.RESPONSE).action is Action.ALLOW
    assert p.decide(v(15), Surface.PROMPT).action is Action.BLOCK
    p2 = StrictnessPolicy.from_dict({"thresholds": {"VIO": 90}, "surfaces": {"tool_call": {"thresholds": {"VIO": 5}}}})
    assert p2.decide(v(80, Category.VIOLENCE)).action is Action.ALLOW
    assert p2.decide(v(6, Category.VIOLENCE), Surface.TOOL_CALL).action is Action.BLOCK


def test_default_action_can_be_flag() -> None:
    p = StrictnessPolicy.from_dict({"action": "flag"})
    d = p.decide(v(99))
    assert d.action is Action.FLAG and d.allowed


# ---------------------------------------------------------------- on_error


def test_on_error_block_is_default_and_says_guard_unavailable() -> None:
    d = StrictnessPolicy().decide(Verdict.failed("connection refused"))
    assert d.action is Action.BLOCK and not d.fail_open
    assert "guard unavailable" in d.reason and "connection refused" in d.reason
    assert d.rule == "on_error"


def test_on_error_allow_is_marked_fail_open() -> None:
    d = StrictnessPolicy(on_error="allow").decide(Verdict.failed("timeout"))
    assert d.action is Action.ALLOW and d.fail_open
    assert "FAIL-OPEN" in d.reason and "guard unavailable" in d.reason


def test_on_error_raise() -> None:
    with pytest.raises(GuardUnavailableError, match="timeout") as info:
        StrictnessPolicy(on_error="raise").decide(Verdict.failed("timeout"))
    assert info.value.decision is not None and info.value.decision.action is Action.BLOCK


def test_on_error_per_surface() -> None:
    p = StrictnessPolicy.from_dict({"on_error": "block", "surfaces": {"retrieved": {"on_error": "allow"}}})
    assert p.decide(Verdict.failed("x"), Surface.RETRIEVED).fail_open
    assert p.decide(Verdict.failed("x"), Surface.PROMPT).action is Action.BLOCK


# ---------------------------------------------------------------- loading and validation


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"thresholds": {"WEAPONS": 30}}, "thresholds: unknown category 'WEAPONS'"),
        ({"preset": "medium"}, "preset"),
        ({"on_error": "ignore"}, "on_error"),
        ({"threshold": 140}, "threshold"),
        ({"thresholds": {"VIO": -1}}, "must be within 0-100"),
        ({"surfaces": {"chat": {}}}, "unknown surface 'chat'"),
        ({"surfaces": {"prompt": {"colour": "red"}}}, "surfaces.prompt.colour: unknown key"),
        ({"rules": [{"when": {"min_score": 50}, "then": "nuke"}]}, "rules.0.then: unknown action 'nuke'"),
        ({"rules": [{"when": {"min_score": 50}, "then": "reroute"}]}, "reroute needs a route name"),
        (
            {"rules": [{"when": {"min_score": 80, "max_score": 20}, "then": "block"}]},
            "greater than max_score",
        ),
        ({"rules": [{"when": {"categories": ["VIO", "ZZZ"]}, "then": "block"}]}, "unknown category 'ZZZ'"),
        ({"rules": [{"when": {"min_score": 50}}]}, "rules.0.then"),
        ({"tresholds": {}}, "tresholds: unknown key"),
        # YAML's yes / on / true are booleans, which pydantic took for 1.0 (and false for 0.0)
        ({"threshold": True}, "threshold: expected a number from 0 to 100, not true"),
        ({"thresholds": {"VIO": True}}, "threshold for VIOLENCE must be a number from 0 to 100, not true"),
        ({"surfaces": {"tool_call": {"threshold": False}}}, "surfaces.tool_call.threshold: expected a number"),
        ({"surfaces": {"prompt": {"thresholds": {"JAIL": False}}}}, "threshold for JAILBREAK must be a number"),
        ({"rules": [{"when": {"min_score": True}, "then": "flag"}]}, "rules.0.when.min_score: expected a number"),
        # a rule that can never match
        ({"rules": [{"when": {"categories": []}, "then": "allow"}]}, "categories: [] matches no verdict"),
        ({"rules": [{"when": {"surfaces": []}, "then": "allow"}]}, "surfaces: [] matches no check"),
        # one surface under two spellings: one set of overrides was dropped without a word
        (
            {"surfaces": {"tool_call": {"preset": "strict"}, "TOOL_CALL": {"on_error": "allow"}}},
            "'tool_call' and 'TOOL_CALL' both name the surface tool_call; give it once",
        ),
    ],
)
def test_validation_errors_name_the_key(data: dict[str, object], message: str) -> None:
    with pytest.raises(PolicyError, match="invalid policy") as info:
        StrictnessPolicy.from_dict(data)
    assert message in str(info.value)


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("preset: strict\nthresholds:\n  VIO: [30\n")
    with pytest.raises(PolicyError, match=r"bad\.yaml: malformed YAML at line \d+"):
        StrictnessPolicy.from_yaml(path)


def test_a_surface_under_two_spellings_in_a_yaml_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "surfaces.yaml"
    path.write_text(
        "surfaces:\n  tool_call: {preset: strict, on_error: block}\n  TOOL_CALL: {on_error: allow}\n", encoding="utf-8"
    )
    with pytest.raises(PolicyError, match=r"surfaces\.yaml.*'tool_call' and 'TOOL_CALL' both name the surface"):
        StrictnessPolicy.load(path)


def test_a_key_given_twice_in_a_yaml_file_is_an_error(tmp_path: Path) -> None:
    # PyYAML alone keeps the last value: the first threshold would vanish without a word
    path = tmp_path / "twice.yaml"
    path.write_text("preset: moderate\nthresholds:\n  VIO: 30\n  SEX: 61\n  VIO: 60\n", encoding="utf-8")
    with pytest.raises(
        PolicyError, match=r"twice\.yaml.*line 5.*'VIO' is given twice in one mapping \(first at line 3"
    ):
        StrictnessPolicy.load(path)
    path.write_text("preset: strict\non_error: allow\npreset: loose\n", encoding="utf-8")
    with pytest.raises(PolicyError, match="'preset' is given twice"):
        StrictnessPolicy.load(path)


def test_yaml_merge_keys_may_be_overridden(tmp_path: Path) -> None:
    path = tmp_path / "merge.yaml"
    path.write_text("surfaces:\n  tool_call: &base {preset: strict}\n  prompt:\n    <<: *base\n    preset: loose\n")
    policy = StrictnessPolicy.load(path)
    assert policy.surfaces[Surface.PROMPT].preset == "loose"
    # an anchored mapping merged from a mapping loaded before it: PyYAML rewrites it in place, which is no
    # duplicate of the file's own keys
    path.write_text(
        "preset: moderate\nsurfaces:\n  tool_call:\n    thresholds: &t\n"
        "      <<: {JAILBREAK: 30, SEXUAL: 61}\n      SEXUAL: 50\nthresholds:\n  <<: *t\n",
        encoding="utf-8",
    )
    policy = StrictnessPolicy.load(path)
    assert policy.thresholds == {Category.JAILBREAK: 30.0, Category.SEXUAL: 50.0}
    assert policy.surfaces[Surface.TOOL_CALL].thresholds == policy.thresholds


def test_a_key_given_twice_on_one_line_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "flow.yaml"
    path.write_text("preset: moderate\nthresholds: {VIO: 30, VIO: 60}\n", encoding="utf-8")
    with pytest.raises(PolicyError, match=r"line 2, column 23: key 'VIO' is given twice .*first at line 2, column 14"):
        StrictnessPolicy.load(path)


def test_yaml_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- strict\n- loose\n")
    with pytest.raises(PolicyError, match="must be a mapping"):
        StrictnessPolicy.from_yaml(path)


def test_load_accepts_every_form(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("preset: loose\n")
    assert StrictnessPolicy.load(None).preset == "moderate"
    assert StrictnessPolicy.load("STRICT").preset == "strict"
    assert StrictnessPolicy.load(str(path)).preset == "loose"
    assert StrictnessPolicy.load(path).preset == "loose"
    assert StrictnessPolicy.load({"preset": "strict"}).preset == "strict"
    p = StrictnessPolicy(preset="loose")
    assert StrictnessPolicy.load(p) is p
    with pytest.raises(PolicyError, match="neither a preset"):
        StrictnessPolicy.load("medium")
    with pytest.raises(PolicyError, match="cannot read policy file"):
        StrictnessPolicy.load(str(tmp_path / "missing.yaml"))
    with pytest.raises(PolicyError, match="unknown preset"):
        StrictnessPolicy.from_preset("paranoid")


def test_native_names_in_policies() -> None:
    p = StrictnessPolicy.from_dict({"thresholds": {"Violent": 10, "INF": 90}})
    assert p.thresholds == {Category.VIOLENCE: 10, Category.PRIVACY: 90}
    p = StrictnessPolicy.from_dict({"thresholds": {"Violent": 10, "pii": 95}})
    assert p.thresholds == {Category.VIOLENCE: 10, Category.PRIVACY: 95}
    # two names for one category: neither value is dropped silently
    with pytest.raises(PolicyError, match="'INF' and 'pii' both name the category PRIVACY"):
        StrictnessPolicy.from_dict({"thresholds": {"Violent": 10, "INF": 90, "pii": 95}})


def test_round_trip_to_dict(design: StrictnessPolicy) -> None:
    assert StrictnessPolicy.from_dict(design.to_dict()) == design


def test_policy_is_immutable() -> None:
    p = StrictnessPolicy()
    with pytest.raises(Exception, match="frozen"):
        p.preset = "strict"  # type: ignore[misc]


# ---------------------------------------------------------------- properties

scores = st.floats(min_value=0, max_value=100, allow_nan=False)
cats = st.lists(st.sampled_from([c for c in Category if c is not Category.OTHER]), max_size=3, unique=True)
surfaces = st.sampled_from(list(Surface))


@given(scores, cats, surfaces, st.sampled_from(sorted(PRESETS)))
def test_allow_iff_under_threshold_without_rules(
    score: float, cs: list[Category], surface: Surface, preset: str
) -> None:
    p = StrictnessPolicy(preset=preset)  # type: ignore[arg-type]
    d = p.decide(v(score, *cs), surface)
    assert (d.action is Action.ALLOW) == (score < PRESETS[preset])
    assert d.action in (Action.ALLOW, Action.BLOCK)
    assert not d.fail_open


@given(scores, cats, surfaces)
def test_stricter_preset_never_allows_what_a_looser_one_blocks(
    score: float, cs: list[Category], surface: Surface
) -> None:
    order = ["strict", "moderate", "loose"]
    actions = [StrictnessPolicy(preset=p).decide(v(score, *cs), surface).action for p in order]  # type: ignore[arg-type]
    blocked = [a is Action.BLOCK for a in actions]
    assert blocked == sorted(blocked, reverse=True)


@given(scores, cats, surfaces, st.sampled_from(["block", "allow"]))
def test_error_verdicts_never_allowed_silently(
    score: float, cs: list[Category], surface: Surface, on_error: str
) -> None:
    d = StrictnessPolicy(on_error=on_error).decide(Verdict.failed("down"), surface)  # type: ignore[arg-type]
    assert d.action is (Action.BLOCK if on_error == "block" else Action.ALLOW)
    assert d.fail_open == (on_error == "allow")


@given(scores, cats, st.dictionaries(st.sampled_from(["VIO", "ILG", "SEX", "INF", "JAIL"]), scores, max_size=3))
def test_threshold_for_is_min_over_categories(score: float, cs: list[Category], th: dict[str, float]) -> None:
    p = StrictnessPolicy.from_dict({"thresholds": th})
    t = p.threshold_for(v(score, *cs))
    expected = min((p.category_threshold(c) for c in cs), default=41.0)
    assert t == expected
    assert p.is_over(v(score, *cs)) == (score >= expected)
