"""``flexguard eval`` and ``flexguard calibrate`` end to end against FakeGuardServer (scripted scores)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from flexguard_integrations.cli import main
from flexguard_integrations.policy import StrictnessPolicy
from flexguard_integrations.testing import FakeGuardServer
from flexguard_integrations.verdict import Category

FLEX = "Tommy-DING/FlexGuard-Qwen3-8B"
ENV_VARS = ("FLEXGUARD_BASE_URL", "FLEXGUARD_MODEL", "FLEXGUARD_API_KEY", "FLEXGUARD_POLICY", "FLEXGUARD_FAMILY",
            "FLEXGUARD_TIMEOUT")  # fmt: skip

# (text, scripted score, scripted categories, severity, labelled category)
ROWS: list[tuple[str, int, list[str], int, str | None]] = [
    ("eval row benign one", 3, [], 0, None),
    ("eval row benign two", 10, [], 0, None),
    ("eval row benign three", 25, [], 0, None),  # a strict false positive
    ("eval row low one", 30, ["ILLEGAL"], 1, "ILLEGAL"),
    ("eval row low two", 15, [], 1, "ILLEGAL"),  # missed even by strict
    ("eval row moderate one", 45, ["ILLEGAL"], 2, "ILLEGAL"),
    ("eval row moderate two", 55, ["PRIVACY"], 2, "PRIVACY"),
    ("eval row high one", 70, ["VIOLENCE"], 3, "VIOLENCE"),
    ("eval row high two", 58, ["VIOLENCE"], 3, "VIOLENCE"),  # missed by loose
    ("eval row extreme one", 95, ["VIOLENCE"], 4, "VIOLENCE"),
]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def scripted() -> Iterator[FakeGuardServer]:
    with FakeGuardServer((FLEX,)) as srv:
        for text, score, cats, _, _ in ROWS:
            srv.add_rule(text, kind="exact", score=score, categories=cats)
        yield srv


def write_data(path: Path, rows: list[tuple[str, int, list[str], int, str | None]] = ROWS) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i, (text, _, _, sev, cat) in enumerate(rows):
            f.write(json.dumps({"id": f"e{i}", "text": text, "severity": sev, "category": cat}) + "\n")
    return path


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def ep(srv: FakeGuardServer) -> list[str]:
    return ["--base-url", srv.base_url, "--model", FLEX, "--no-progress"]


# ===================================================================== eval


def test_eval_reports_hand_checked_metrics(
    scripted: FakeGuardServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_data(tmp_path / "d.jsonl")
    out = tmp_path / "v.jsonl"
    code, stdout, _ = run(["eval", str(data), "--out", str(out), "--json", *ep(scripted)], capsys)
    assert code == 0
    rep = json.loads(stdout)
    assert (rep["n"], rep["errors"], rep["labels"]) == (10, 0, "severity")
    by = {s["strictness"]: s for s in rep["strictness"]}
    # strict: flag >= 21 -> 25, 30, 45, 55, 70, 58, 95; positives severity >= 1 (7 rows)
    #   TP 6 (all but "low two" at 15), FP 1 ("benign three" 25), FN 1, TN 2
    assert (by["strict"]["tp"], by["strict"]["fp"], by["strict"]["fn"], by["strict"]["tn"]) == (6, 1, 1, 2)
    assert by["strict"]["precision"] == pytest.approx(6 / 7, abs=1e-4)
    # moderate: flag >= 41 -> 45, 55, 70, 58, 95; positives severity >= 2 (5 rows) -> perfect
    assert (by["moderate"]["tp"], by["moderate"]["fp"], by["moderate"]["fn"]) == (5, 0, 0)
    assert by["moderate"]["auroc"] == 1.0
    # loose: flag >= 61 -> 70, 95; positives severity >= 3 (70, 58, 95) -> TP 2, FN 1 (58), FP 0
    assert (by["loose"]["tp"], by["loose"]["fp"], by["loose"]["fn"]) == (2, 0, 1)
    assert by["loose"]["recall"] == pytest.approx(2 / 3, abs=1e-4)
    # loose AUROC: positives 70, 58, 95 vs negatives 3, 10, 25, 30, 15, 45, 55 -> every pair ordered -> 1.0
    assert by["loose"]["auroc"] == 1.0
    cats = {c["category"]: c for c in rep["categories"]}
    # ILLEGAL labelled on 3 rows; named on 2 of them ("low two" named nothing)
    assert (cats["ILLEGAL"]["labelled"], cats["ILLEGAL"]["tp"], cats["ILLEGAL"]["fn"]) == (3, 2, 1)
    assert cats["VIOLENCE"]["recall_by_strictness"]["loose"] == pytest.approx(2 / 3, abs=1e-4)
    # raw verdicts saved, one per row, in input order
    saved = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in saved] == [f"e{i}" for i in range(10)]
    assert saved[9]["verdict"]["risk_score"] == 95.0
    assert saved[9]["verdict"]["native_label"]
    # re-analysis from the saved verdicts: no server needed, same numbers
    code, again, _ = run(["eval", str(out), "--from-verdicts", "--json"], capsys)
    assert code == 0
    assert json.loads(again)["strictness"] == rep["strictness"]


def test_eval_table_output_and_errors_counted(
    scripted: FakeGuardServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_data(tmp_path / "d.jsonl")
    scripted.clear_rules()  # the first matching rule wins: the fault goes first
    scripted.add_rule("eval row benign two", kind="exact", fault="malformed")
    for text, score, cats, _, _ in ROWS:
        scripted.add_rule(text, kind="exact", score=score, categories=cats)
    code, stdout, _ = run(["eval", str(data), "--out", str(tmp_path / "v.jsonl"), *ep(scripted)], capsys)
    assert code == 1  # done, with a guard error
    assert "guard errors: 1 (counted as predicted unsafe" in stdout
    assert "strictness" in stdout
    assert "AUROC" in stdout
    assert "verdicts saved to" in stdout


def test_eval_resume_checks_only_the_missing_rows(
    scripted: FakeGuardServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_data(tmp_path / "d.jsonl")
    out = tmp_path / "v.jsonl"
    assert run(["eval", str(data), "--out", str(out), "--limit", "4", *ep(scripted)], capsys)[0] == 0
    assert len(out.read_text().splitlines()) == 4
    # simulate a kill while the 5th line was being written
    with open(out, "a", encoding="utf-8") as f:
        f.write('{"id": "e4", "row": 5, "verd')
    n_requests = len(scripted.requests)
    code, _, err = run(["eval", str(data), "--out", str(out), *ep(scripted)], capsys)
    assert code == 2
    assert "--resume" in err  # the output exists: refuse to overwrite silently
    code, _, _ = run(["eval", str(data), "--out", str(out), "--resume", *ep(scripted)], capsys)
    assert code == 0
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert ids == [f"e{i}" for i in range(10)]
    model_requests = [r for r in scripted.requests[n_requests:] if r.path.endswith("/chat/completions")]
    assert len(model_requests) == 6  # e4..e9 only


def test_eval_resume_refuses_output_of_other_data(
    scripted: FakeGuardServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "v.jsonl"
    out.write_text(json.dumps({"id": "zzz", "row": 1, "verdict": {"risk_score": 1.0}}) + "\n", encoding="utf-8")
    data = write_data(tmp_path / "d.jsonl")
    code, _, err = run(["eval", str(data), "--out", str(out), "--resume", *ep(scripted)], capsys)
    assert code == 2
    assert "not in the data" in err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "a", "label": 0}\n{"text": "b", "label": "perhaps"}\n', "row 2: unknown label 'perhaps'"),
        ('{"text": "a", "label": 0}\n{"text": "b"\n', "row 2: not valid JSON"),
        ('{"body": "a", "label": 0}\n', "row 1: missing field 'text' or 'prompt'"),
    ],
)
def test_eval_bad_data_names_the_row(
    scripted: FakeGuardServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, message: str
) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text(content, encoding="utf-8")
    code, _, err = run(["eval", str(data), "--out", str(tmp_path / "v.jsonl"), *ep(scripted)], capsys)
    assert code == 2
    assert f"bad.jsonl: {message}" in err
    assert not scripted.requests  # nothing was checked


def test_eval_csv_missing_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "bad.csv"
    data.write_text("id,body,label\n1,hi,0\n", encoding="utf-8")
    code, _, err = run(["eval", str(data), "--base-url", "http://127.0.0.1:9/v1", "--model", FLEX], capsys)
    assert code == 2
    assert "missing column 'text' or 'prompt'" in err


# ===================================================================== calibrate


def test_calibrate_writes_loadable_policies_and_plots(
    scripted: FakeGuardServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    data = write_data(tmp_path / "d.jsonl")
    cal = tmp_path / "cal"
    argv = ["calibrate", str(data), "--target", "recall=1.0", "--out-dir", str(cal), "--val-fraction", "1",
            "--min-support", "3", *ep(scripted)]  # fmt: skip
    code, stdout, _ = run(argv, capsys)
    assert code == 0, stdout
    # known answers (recall 1 -> the lowest positive score of each class, highest such threshold):
    #   strict positives (sev >= 1) score 30, 15, 45, 55, 70, 58, 95 -> 15
    #   moderate positives (sev >= 2) 45, 55, 70, 58, 95 -> 45
    #   loose positives (sev >= 3) 70, 58, 95 -> 58
    expected = {"strict": 15.0, "moderate": 45.0, "loose": 58.0}
    for level, threshold in expected.items():
        pol = StrictnessPolicy.from_yaml(cal / f"{level}.yaml")
        assert pol.preset == level
        assert pol.base_threshold() == threshold, level
    # VIOLENCE is named on 3 rows (70, 58, 95), all severity 3: one class under every strictness -> no own threshold
    # ILLEGAL is named on 2 rows (< min support 3) -> no own threshold
    assert StrictnessPolicy.from_yaml(cal / "loose.yaml").thresholds == {}
    for png in ("score_distribution.png", "threshold_strict.png", "threshold_moderate.png", "threshold_loose.png"):
        assert (cal / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert "plots: " in stdout
    assert (cal / "verdicts.jsonl").is_file()
    # evaluate the calibrated policies: recall 1.0 everywhere
    code, stdout, _ = run(["eval", str(cal / "verdicts.jsonl"), "--from-verdicts", "--policies", str(cal),
                           "--json"], capsys)  # fmt: skip
    assert code == 0
    assert all(s["recall"] == 1.0 for s in json.loads(stdout)["strictness"])


def test_calibrate_per_category_threshold(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # VIOLENCE-named rows: safe at 40/50/60, unsafe at 70/80/90 -> its own threshold 70 under moderate,
    # while unnamed rows (safe 5-20, unsafe 30-35) put the base at 30
    rows: list[tuple[str, int, list[str], int, str | None]] = []
    for i, s in enumerate((5, 10, 15, 20)):
        rows.append((f"cal plain safe {i}", s, [], 0, None))
    for i, s in enumerate((30, 35)):
        rows.append((f"cal plain unsafe {i}", s, [], 2, None))
    for i, s in enumerate((40, 50, 60)):
        rows.append((f"cal violence safe {i}", s, ["VIOLENCE"], 0, "VIOLENCE"))
    for i, s in enumerate((70, 80, 90)):
        rows.append((f"cal violence unsafe {i}", s, ["VIOLENCE"], 2, "VIOLENCE"))
    with FakeGuardServer((FLEX,)) as srv:
        for text, score, cats, _, _ in rows:
            srv.add_rule(text, kind="exact", score=score, categories=cats)
        data = write_data(tmp_path / "d.jsonl", rows)
        cal = tmp_path / "cal"
        code, stdout, _ = run(["calibrate", str(data), "--target", "recall=1", "--out-dir", str(cal),
                               "--val-fraction", "1", "--min-support", "6", "--strictness", "moderate",
                               "--no-plots", *ep(srv)], capsys)  # fmt: skip
    assert code == 0, stdout
    pol = StrictnessPolicy.from_yaml(cal / "moderate.yaml")
    assert pol.base_threshold() == 30.0
    assert pol.thresholds == {Category.VIOLENCE: 70.0}
    assert not (cal / "strict.yaml").exists()
    assert "plots: skipped (--no-plots)" in stdout


def test_calibrate_without_matplotlib_still_writes_yaml(
    scripted: FakeGuardServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from flexguard_integrations.eval import plots

    monkeypatch.setattr(plots, "matplotlib_available", lambda: False)
    data = write_data(tmp_path / "d.jsonl")
    cal = tmp_path / "cal"
    code, stdout, _ = run(["calibrate", str(data), "--target", "precision=0.99", "--out-dir", str(cal),
                           *ep(scripted)], capsys)  # fmt: skip
    assert code in (0, 1)
    assert "plots: skipped (matplotlib is not installed: pip install 'flexguard-integrations[plots]')" in stdout
    assert (cal / "moderate.yaml").is_file()
    assert not list(cal.glob("*.png"))
    StrictnessPolicy.from_yaml(cal / "moderate.yaml")


def test_calibrate_bad_target_fails_before_checking(
    scripted: FakeGuardServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_data(tmp_path / "d.jsonl")
    code, _, err = run(["calibrate", str(data), "--target", "f1=0.9", *ep(scripted)], capsys)
    assert code == 2
    assert "unknown target metric 'f1'" in err
    assert not scripted.requests
