"""The evaluation examples run against FakeGuardServer, finish cleanly and show what they promise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from flexguard_integrations.policy import StrictnessPolicy
from flexguard_integrations.verdict import Category

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_example(name: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEXGUARD_")}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_eval_calibrate_example(tmp_path: Path) -> None:
    out = run_example("eval_calibrate.py", str(tmp_path))
    assert "strictness  threshold" in out
    assert "calibrated thresholds (target recall >= 0.9)" in out
    for level in ("strict", "moderate", "loose"):
        pol = StrictnessPolicy.from_yaml(tmp_path / "policies" / f"{level}.yaml")
        assert pol.preset == level
    # the emulated guard under-scores jailbreaks: calibration gives them a lower threshold than violence
    moderate = StrictnessPolicy.from_yaml(tmp_path / "policies" / "moderate.yaml")
    assert moderate.thresholds[Category.JAILBREAK] == min(moderate.thresholds.values())
    if "plots skipped" not in out:
        assert (tmp_path / "policies" / "score_distribution.png").is_file()


def test_eval_moderate_example() -> None:
    out = run_example("eval_moderate.py")
    assert "first run: 25 rows written" in out
    assert "25 already done (resumed)" in out
    assert "indexing 30 of 60 documents" in out
    assert "'text' is empty" in out
