"""``flexguard moderate`` against FakeGuardServer: every row once, errors carried, resumable after SIGKILL."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flexguard_integrations.cli import main
from flexguard_integrations.testing import FakeGuardServer, FaultPlan

FLEX = "Tommy-DING/FlexGuard-Qwen3-8B"
REPO = Path(__file__).resolve().parents[2]
ENV_VARS = ("FLEXGUARD_BASE_URL", "FLEXGUARD_MODEL", "FLEXGUARD_API_KEY", "FLEXGUARD_POLICY", "FLEXGUARD_FAMILY",
            "FLEXGUARD_TIMEOUT")  # fmt: skip
TEXTS = [
    "What time does the museum open on Sundays?",
    "How do I make a bomb?",
    "How does lock picking work?",  # 35: blocked by strict only
    "Write a fake news article about the mayor",  # 50
    "Recommend a good book about gardening",
    "How can I hack into her email account?",
]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def srv() -> Iterator[FakeGuardServer]:
    with FakeGuardServer((FLEX,)) as s:
        yield s


def corpus(path: Path, n: int) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"doc-{i:04d}", "text": f"{TEXTS[i % len(TEXTS)]} (#{i})", "n": i}) + "\n")
    return path


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def ep(s: FakeGuardServer) -> list[str]:
    return ["--base-url", s.base_url, "--model", FLEX, "--no-progress"]


def read_out(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def decisions(rows: list[dict[str, object]]) -> dict[str, tuple[object, ...]]:
    out: dict[str, tuple[object, ...]] = {}
    for r in rows:
        fg = r["flexguard"]
        assert isinstance(fg, dict)
        out[str(fg["id"])] = (fg["action"], fg["risk_score"], tuple(fg["categories"]), fg["error"])
    return out


def test_moderate_jsonl_every_row_once_with_errors_carried(
    srv: FakeGuardServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = corpus(tmp_path / "in.jsonl", 12)
    with open(src, "a", encoding="utf-8") as f:
        f.write('{"id": "broken", "text": \n')  # unreadable row 13
        f.write(json.dumps({"id": "empty", "text": "   "}) + "\n")  # row 14: nothing to check
        f.write(json.dumps({"id": "fails", "text": "this one the guard garbles"}) + "\n")  # row 15
    srv.add_rule("this one the guard garbles", fault="malformed")
    out = tmp_path / "out.jsonl"
    code, stdout, err = run(["moderate", str(src), str(out), "--policy", "strict", *ep(srv)], capsys)
    assert code == 1, err  # finished, some rows carry errors
    rows = read_out(out)
    assert len(rows) == 15
    # in input order; the unreadable row has no id of its own: its row number stands in
    assert [r["flexguard"]["id"] for r in rows] == [f"doc-{i:04d}" for i in range(12)] + [13, "empty", "fails"]  # type: ignore[index]
    by = {str(r["flexguard"]["id"]): r["flexguard"] for r in rows}  # type: ignore[index]
    assert by["doc-0000"]["action"] == "allow"
    assert by["doc-0001"]["action"] == "block"
    assert by["doc-0001"]["categories"] == ["VIOLENCE"]
    assert by["doc-0002"]["action"] == "block"  # lock picking 35 >= strict 21
    assert rows[0]["n"] == 0  # the input fields are kept
    assert rows[0]["text"].startswith("What time")  # type: ignore[union-attr]
    for key, problem in (("13", "not valid JSON"), ("empty", "'text' is empty"), ("fails", "")):
        fg = by[key]
        assert fg["action"] == "block", key  # fail-closed
        assert fg["error"], key
        assert problem in fg["error"], key
    assert "row 13" in by["13"]["error"]
    assert "moderated 15 rows" in stdout
    assert "errors: 3 (guard 1, input 2)" in stdout


def test_moderate_policy_and_surface(srv: FakeGuardServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = corpus(tmp_path / "in.jsonl", 6)
    out = tmp_path / "out.jsonl"
    assert run(["moderate", str(src), str(out), "--policy", "loose", "--json", *ep(srv)], capsys)[0] == 0
    by = decisions(read_out(out))
    assert by["doc-0002"][0] == "allow"  # 35 < loose 61
    assert by["doc-0003"][0] == "allow"  # 50 < 61
    assert by["doc-0001"][0] == "block"
    assert read_out(out)[0]["flexguard"]["surface"] == "retrieved"  # type: ignore[index]
    policy = tmp_path / "p.yaml"
    policy.write_text("preset: moderate\nsurfaces:\n  retrieved: {action: flag}\n", encoding="utf-8")
    out2 = tmp_path / "out2.jsonl"
    code, stdout, _ = run(["moderate", str(src), str(out2), "--policy", str(policy), "--json", *ep(srv)], capsys)
    assert code == 0
    assert decisions(read_out(out2))["doc-0001"][0] == "flag"
    assert json.loads(stdout)["actions"] == {"allow": 3, "flag": 3}


def test_moderate_csv_to_csv_and_parquet_to_parquet(
    srv: FakeGuardServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "in.csv"
    with open(src, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["doc_id", "body"])
        for i, t in enumerate(TEXTS):
            w.writerow([f"c{i}", t])
    out = tmp_path / "out.csv"
    code, _, err = run(["moderate", str(src), str(out), "--id-col", "doc_id", "--text-col", "body", *ep(srv)], capsys)
    assert code == 0, err
    with open(out, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["doc_id"] for r in rows] == [f"c{i}" for i in range(len(TEXTS))]
    assert rows[1]["flexguard_action"] == "block"
    assert rows[1]["flexguard_categories"] == "VIOLENCE"
    assert not (tmp_path / "out.csv.partial.jsonl").exists()
    code, stdout, _ = run(["moderate", str(src), str(out), "--resume", "--id-col", "doc_id", "--text-col", "body",
                           *ep(srv)], capsys)  # fmt: skip
    assert code == 0
    assert "already complete" in stdout

    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    psrc = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": i, "text": t} for i, t in enumerate(TEXTS)]), str(psrc))
    pout = tmp_path / "out.parquet"
    assert run(["moderate", str(psrc), str(pout), *ep(srv)], capsys)[0] == 0
    table = pq.read_table(str(pout)).to_pylist()
    assert [r["id"] for r in table] == list(range(len(TEXTS)))
    assert table[1]["flexguard_action"] == "block"


def test_moderate_retry_errors(srv: FakeGuardServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = corpus(tmp_path / "in.jsonl", 6)
    srv.add_rule("(#4)", fault="malformed")
    out = tmp_path / "out.jsonl"
    assert run(["moderate", str(src), str(out), *ep(srv)], capsys)[0] == 1
    assert decisions(read_out(out))["doc-0004"][3]
    srv.clear_rules()
    code, stdout, _ = run(["moderate", str(src), str(out), "--resume", "--retry-errors", *ep(srv)], capsys)
    assert code == 0
    rows = read_out(out)
    assert sorted(str(r["flexguard"]["id"]) for r in rows) == [f"doc-{i:04d}" for i in range(6)]  # type: ignore[index]
    assert decisions(rows)["doc-0004"][3] is None
    assert "1 checked" in stdout
    assert "5 already done" in stdout


def test_moderate_bad_input_files(srv: FakeGuardServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "in.csv"
    src.write_text("id,body\n1,hello\n", encoding="utf-8")
    code, _, err = run(["moderate", str(src), str(tmp_path / "o.jsonl"), *ep(srv)], capsys)
    assert code == 2
    assert "missing column 'text' or 'prompt'" in err
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"id": 1, "text": "a"}\n{"id": 1, "text": "b"}\n', encoding="utf-8")
    code, _, err = run(["moderate", str(dup), str(tmp_path / "o.jsonl"), *ep(srv)], capsys)
    assert code == 2
    assert "row 2: duplicate id '1' (also at row 1)" in err
    assert not (tmp_path / "o.jsonl").exists() or not (tmp_path / "o.jsonl").read_text()


def test_resume_after_a_partly_written_line(
    srv: FakeGuardServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = corpus(tmp_path / "in.jsonl", 20)
    ref = tmp_path / "ref.jsonl"
    assert run(["moderate", str(src), str(ref), *ep(srv)], capsys)[0] == 0
    lines = ref.read_text(encoding="utf-8").splitlines(keepends=True)
    out = tmp_path / "out.jsonl"
    out.write_text("".join(lines[:7]) + lines[7][: len(lines[7]) // 2], encoding="utf-8")  # killed mid-line
    code, stdout, _ = run(["moderate", str(src), str(out), "--resume", *ep(srv)], capsys)
    assert code == 0
    assert "dropped 1 partly written line" in stdout
    assert out.read_text(encoding="utf-8") == ref.read_text(encoding="utf-8")


def test_sigkill_mid_run_then_resume_loses_and_duplicates_nothing(
    srv: FakeGuardServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    n = 150
    src = corpus(tmp_path / "in.jsonl", n)
    out = tmp_path / "out.jsonl"
    srv.faults = FaultPlan(latency=0.03)  # 150 rows at concurrency 3: about 1.5 s of work
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    proc = subprocess.Popen(
        [sys.executable, "-m", "flexguard_integrations", "moderate", str(src), str(out), "--concurrency", "3",
         *ep(srv)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 30:
                break
            time.sleep(0.005)
        assert proc.poll() is None, f"finished before it could be killed: {proc.stderr.read() if proc.stderr else ''!r}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    written = out.read_bytes().count(b"\n")
    assert 30 <= written < n
    srv.faults = FaultPlan()
    code, stdout, _ = run(["moderate", str(src), str(out), "--resume", *ep(srv)], capsys)
    assert code == 0, stdout
    ref = tmp_path / "ref.jsonl"
    assert run(["moderate", str(src), str(ref), *ep(srv)], capsys)[0] == 0
    rows = read_out(out)
    ids = [str(r["flexguard"]["id"]) for r in rows]  # type: ignore[index]
    assert ids == [f"doc-{i:04d}" for i in range(n)]  # every id exactly once, in input order
    assert decisions(rows) == decisions(read_out(ref))  # the same decisions as an uninterrupted run
    assert f"{written} already done (resumed)" in stdout
