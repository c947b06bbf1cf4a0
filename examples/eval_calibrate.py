"""Evaluate a guard on labelled data and calibrate thresholds, against the EMULATED guard server.

Run: python examples/eval_calibrate.py [OUT_DIR]   (default: a temporary directory)

It builds a synthetic FlexBench-like set (severity tiers 0-4, categories) whose guard scores are scripted on
FakeGuardServer, then does what `flexguard eval` and `flexguard calibrate --target recall=0.9` do, through
the Python API: verdicts saved to a resumable JSONL, metrics per strictness, thresholds per strictness and
category written as policy YAML, plots (when matplotlib is installed). With a real guard, replace the
server by your vLLM / SGLang URL and the synthetic set by your labelled data.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
from pathlib import Path

from flexguard_integrations import Guard, StrictnessPolicy
from flexguard_integrations.eval import Target, build_report, evaluate, format_report, read_examples
from flexguard_integrations.eval.calibrate import calibrate, format_calibration, split_records, write_policies
from flexguard_integrations.eval.plots import PLOTS_HINT, matplotlib_available, save_plots
from flexguard_integrations.testing import FakeGuardServer

MODEL = "Tommy-DING/FlexGuard-Qwen3-8B"
TIER_MEAN = (8, 30, 50, 70, 90)  # where the (emulated) guard's scores centre for each severity tier
CATEGORIES = ("VIOLENCE", "ILLEGAL", "PRIVACY", "JAILBREAK")
SHIFT = {"JAILBREAK": -12}  # this guard under-scores jailbreaks: they need a lower threshold of their own


def synthetic_set(server: FakeGuardServer, path: Path, n: int = 400, seed: int = 7) -> Path:
    """Write a labelled JSONL and script the server's score for every text."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            tier = i % 5
            cat = CATEGORIES[rng.randrange(len(CATEGORIES))]
            edgy = tier == 0 and rng.random() < 0.25  # benign, but close to a category: the guard names it
            score = (28 if edgy else TIER_MEAN[tier]) + SHIFT.get(cat, 0) + rng.gauss(0, 9)
            score = max(0, min(100, round(score)))
            named = [cat] if tier > 0 or edgy else []
            text = f"synthetic sample {i}"
            server.add_rule(text, kind="exact", score=score, categories=named)
            row = {"id": f"s{i}", "text": text, "severity": tier, "category": cat if tier > 0 else None}
            f.write(json.dumps(row) + "\n")
    return path


def main(out_dir: Path) -> None:
    with FakeGuardServer((MODEL,)) as server:
        data = synthetic_set(server, out_dir / "labelled.jsonl")
        examples = read_examples(data)
        with Guard.from_endpoint(server.base_url, MODEL, concurrency=16) as guard:
            # `flexguard eval`: one verdict per row, saved as it arrives (resume=True continues a run)
            records = evaluate(guard, examples, out_dir / "verdicts.jsonl", overwrite=True)
    print("== evaluation with the preset thresholds (strict 21, moderate 41, loose 61)")
    print(format_report(build_report(records)))

    # `flexguard calibrate --target recall=0.9`: choose on 70% of the rows, report on the other 30%
    validation, test = split_records(records, 0.7)
    results = calibrate(validation, Target("recall", 0.9), test=test, min_support=20)
    print("\n== calibrated thresholds (target recall >= 0.9)")
    print(format_calibration(results))
    paths = write_policies(results, out_dir / "policies", source=str(data))
    print("\n== " + str(paths[1]))
    print(paths[1].read_text())
    policy = StrictnessPolicy.from_yaml(paths[1])  # the core loads what calibrate writes
    print(f"loaded: base threshold {policy.base_threshold():g}, per category "
          f"{ {c.value: t for c, t in policy.thresholds.items()} }")  # fmt: skip
    if matplotlib_available():
        for png in save_plots(validation, results, out_dir / "policies"):
            print(f"plot: {png}")
    else:
        print(f"plots skipped: {PLOTS_HINT}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        target = Path(sys.argv[1])
        target.mkdir(parents=True, exist_ok=True)
        main(target)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
