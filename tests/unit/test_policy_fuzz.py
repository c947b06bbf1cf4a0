"""Fuzzing the policy loader: any input gives a valid policy or a PolicyError, never another exception."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexguard_integrations import PolicyError, StrictnessPolicy, Surface, Verdict
from flexguard_integrations.verdict import Category

KEYS = ["preset", "threshold", "on_error", "thresholds", "surfaces", "rules", "action", "name", "bogus"]
names = st.sampled_from(
    ["strict", "moderate", "loose", "block", "allow", "raise", "flag", "redact", "VIO", "PII", "weapons",
     "prompt", "tool_call", "retrieved", "chat", "reroute:x", "reroute", "", "JAILBREAK"]
)  # fmt: skip
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-50, 150), st.floats(allow_nan=True), names, st.text(max_size=8)
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.one_of(names, st.text(max_size=5)), inner, max_size=3)
    ),
    max_leaves=12,
)
policies = st.dictionaries(st.sampled_from(KEYS), values, max_size=6)


@given(policies)
@settings(max_examples=400, deadline=None)
def test_from_dict_never_crashes(data: dict[str, Any]) -> None:
    try:
        policy = StrictnessPolicy.from_dict(data)
    except PolicyError as exc:
        assert "invalid policy" in str(exc)  # noqa: PT017
        return
    # a policy that loads is usable on every surface and round-trips
    for surface in Surface:
        policy.decide(Verdict(risk_score=50, categories=(Category.VIOLENCE,)), surface)
    assert StrictnessPolicy.from_dict(policy.to_dict()) == policy


@given(st.text(max_size=200))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_from_yaml_never_crashes(tmp_path: Path, text: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        StrictnessPolicy.from_yaml(path)
    except PolicyError as exc:
        assert str(path) in str(exc)  # noqa: PT017


@given(policies)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_yaml_dump_of_random_policies(tmp_path: Path, data: dict[str, Any]) -> None:
    path = tmp_path / "q.yaml"
    try:
        path.write_text(yaml.safe_dump(data), encoding="utf-8")
    except yaml.YAMLError:
        return
    with contextlib.suppress(PolicyError):
        StrictnessPolicy.from_yaml(path)
