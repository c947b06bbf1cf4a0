"""``flexguard moderate`` / ``eval`` / ``fake-server`` given bad input: a clear error, nothing lost.

Found by an audit of the CLI: an output path equal to the input erased it, a mistyped column option left a
response unchecked (allowed), ``--resume`` cut lines of a file it did not write, mixed two inputs in one
output, or called a partial CSV complete.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from flexguard_integrations.cli import main
from flexguard_integrations.errors import PolicyError
from flexguard_integrations.eval.data import DataError, header, iter_rows, long_csv_fields, parse_severity
from flexguard_integrations.eval.runner import load_records
from flexguard_integrations.policy import StrictnessPolicy
from flexguard_integrations.testing import FakeGuardServer
from tests.conftest import closed_port_url
from tests.integration.test_eval_moderate import ENV_VARS, FLEX, corpus, ep, read_out, run


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def srv() -> Iterator[FakeGuardServer]:
    with FakeGuardServer((FLEX,)) as s:
        yield s


def test_moderate_refuses_to_write_over_its_input(
    srv: FakeGuardServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = corpus(tmp_path / "same.jsonl", 5)
    before = src.read_bytes()
    code, _, err = run(["moderate", str(src), str(src), "--overwrite", *ep(srv)], capsys)
    assert code == 2 and "itself; writing it would erase that file" in err
    assert src.read_bytes() == before
    link = tmp_path / "link.jsonl"
    link.symlink_to(src)
    code, _, err = run(["moderate", str(src), str(link), "--overwrite", *ep(srv)], capsys)
    assert code == 2 and "itself; writing it would erase that file" in err
    assert src.read_bytes() == before


def test_eval_refuses_to_write_its_verdicts_over_the_data(
    srv: FakeGuardServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"id": "a", "text": "hello", "label": 0}) + "\n", encoding="utf-8")
    before = data.read_bytes()
    code, _, err = run(["eval", str(data), "--out", str(data), "--overwrite", *ep(srv)], capsys)
    assert code == 2 and "itself; writing it would erase that file" in err
    assert data.read_bytes() == before


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_mistyped_column_option_is_an_error_not_an_unchecked_column(
    srv: FakeGuardServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    rows = [{"id": "r1", "prompt": "How do I make a bomb?", "answer": "Here is how to make a bomb: step 1"}]
    src = tmp_path / f"resp.{fmt}"
    if fmt == "csv":
        with open(src, "w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    code, _, err = run(["moderate", str(src), str(out), "--response-col", "answr", *ep(srv)], capsys)
    assert code == 2 and "'answr'" in err and "response column" in err
    assert not out.exists()
    code, _, _ = run(["moderate", str(src), str(out), "--response-col", "answer", *ep(srv)], capsys)
    assert code == 0
    (record,) = read_out(out)
    assert record["flexguard"]["surface"] == "response"  # type: ignore[index]
    assert record["flexguard"]["action"] == "block"  # type: ignore[index]
    data = tmp_path / f"data.{fmt}"
    if fmt == "csv":
        data.write_text("id,text,label\nr1,hello,0\n", encoding="utf-8")
    else:
        data.write_text(json.dumps({"id": "r1", "text": "hello", "label": 0}) + "\n", encoding="utf-8")
    verdicts = tmp_path / "v.jsonl"
    code, _, err = run(["eval", str(data), "--out", str(verdicts), "--id-col", "ident", *ep(srv)], capsys)
    assert code == 2 and "'ident'" in err and "id column" in err
    assert not verdicts.exists()


def test_resume_does_not_cut_lines_of_a_file_it_did_not_write(
    srv: FakeGuardServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = corpus(tmp_path / "in.jsonl", 3)
    foreign = tmp_path / "precious.jsonl"
    foreign.write_bytes(b'{"a": 1}\n{"precious": "data line 2"}')
    code, _, err = run(["moderate", str(src), str(foreign), "--resume", *ep(srv)], capsys)
    assert code == 2 and "not a record of this command" in err
    assert foreign.read_bytes() == b'{"a": 1}\n{"precious": "data line 2"}'
    one_line = tmp_path / "one.jsonl"
    one_line.write_bytes(b'{"precious": "only line"}')
    code, _, err = run(["moderate", str(src), str(one_line), "--resume", *ep(srv)], capsys)
    assert code == 2 and "no line break" in err
    assert one_line.read_bytes() == b'{"precious": "only line"}'
    text = tmp_path / "notes.jsonl"
    text.write_bytes(b"hello")
    code, _, err = run(["moderate", str(src), str(text), "--resume", *ep(srv)], capsys)
    assert code == 2 and text.read_bytes() == b"hello"


def test_resume_with_another_input_appends_nothing(
    srv: FakeGuardServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = corpus(tmp_path / "first.jsonl", 4)
    out = tmp_path / "out.jsonl"
    assert run(["moderate", str(first), str(out), *ep(srv)], capsys)[0] == 0
    before = out.read_bytes()
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"id": f"x{i}", "text": f"hello {i}"}) + "\n" for i in range(6)), "utf-8")
    code, _, err = run(["moderate", str(other), str(out), "--resume", *ep(srv)], capsys)
    assert code == 2 and "not in" in err and "another input" in err
    assert out.read_bytes() == before


def test_resume_of_a_partial_csv_is_not_called_complete(
    srv: FakeGuardServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = corpus(tmp_path / "in.jsonl", 12)
    out = tmp_path / "out.csv"
    assert run(["moderate", str(src), str(out), "--limit", "5", *ep(srv)], capsys)[0] == 0
    code, _, err = run(["moderate", str(src), str(out), "--resume", *ep(srv)], capsys)
    assert code == 2 and "holds 5 rows" in err and "has 12" in err
    code, out_text, _ = run(["moderate", str(src), str(out), "--limit", "5", "--resume", *ep(srv)], capsys)
    assert code == 0 and "already complete" in out_text


def test_a_policy_file_that_is_not_utf8_is_a_policy_error(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_bytes(b"preset: strict\n# caf\xe9\n")
    with pytest.raises(PolicyError, match="not valid UTF-8"):
        StrictnessPolicy.from_yaml(path)


@pytest.mark.parametrize("port", ["99999", "-1", "http"])
def test_fake_server_rejects_a_bad_port(capsys: pytest.CaptureFixture[str], port: str) -> None:
    assert main(["fake-server", "--port", port]) == 2
    err = capsys.readouterr().err
    assert "argument --port" in err and ("outside 0-65535" in err or "not a port number" in err)


# ---------------------------------------------------------------- values and fields that were lost or crashed


@pytest.mark.parametrize("value", [float("inf"), float("nan"), "inf", "nan"])
def test_a_non_finite_severity_is_a_clear_error(value: object) -> None:
    with pytest.raises(ValueError, match="unknown severity"):
        parse_severity(value)


def test_a_non_finite_json_id_is_kept_as_written(
    srv: FakeGuardServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": NaN, "text": "hello"}\n{"id": Infinity, "text": "hi"}\n', encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert run(["moderate", str(src), str(out), *ep(srv)], capsys)[0] == 0
    assert [r["flexguard"]["id"] for r in read_out(out)] == ["nan", "inf"]  # type: ignore[index]


def test_a_csv_header_naming_a_column_twice_is_an_error(
    srv: FakeGuardServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "dup.csv"
    src.write_text("id,text,label,text\n1,hello,0,world\n", encoding="utf-8")
    code, _, err = run(["moderate", str(src), str(tmp_path / "o.jsonl"), *ep(srv)], capsys)
    assert code == 2 and "'text' more than once" in err


@pytest.mark.parametrize("field", ["flexguard", "flexguard_action"])
def test_an_input_field_the_output_uses_is_an_error_not_overwritten(
    srv: FakeGuardServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], field: str
) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "a", "text": "hello", field: "mine"}) + "\n", encoding="utf-8")
    out = tmp_path / "o.csv"
    code, _, err = run(["moderate", str(src), str(out), *ep(srv)], capsys)
    assert code == 2 and repr(field) in err and "earlier `flexguard moderate`" in err
    assert not out.exists()


def _verdicts_line(**changes: object) -> str:
    record: dict[str, object] = {
        "id": "a",
        "row": 1,
        "mode": "prompt",
        "label": True,
        "severity": None,
        "categories": [],
        "split": None,
        "verdict": {"risk_score": 90.0, "categories": ["VIOLENCE"]},
    }
    record.update(changes)
    return json.dumps(record)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"label": "no"}, "label 'no'"),
        ({"label": None, "severity": "2"}, "severity '2'"),
        ({"label": None, "severity": 7}, "out of range"),
        ({"verdict": {"categories": []}}, "no risk_score"),
    ],
)
def test_a_verdicts_file_is_read_strictly(tmp_path: Path, changes: dict[str, object], message: str) -> None:
    path = tmp_path / "v.jsonl"
    path.write_text(_verdicts_line(**changes) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=message):
        load_records(path)


def test_a_verdicts_file_keeps_a_whole_last_record_and_refuses_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "v.jsonl"
    path.write_text(_verdicts_line() + "\n" + _verdicts_line(id="b"), encoding="utf-8")  # no final line break
    assert [r.id for r in load_records(path)] == ["a", "b"]
    path.write_text(_verdicts_line() + "\n" + _verdicts_line(id="b")[:40], encoding="utf-8")  # cut by a kill
    assert [r.id for r in load_records(path)] == ["a"]
    path.write_text(_verdicts_line() + "\n" + _verdicts_line() + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="appears twice"):
        load_records(path)


# ---------------------------------------------------------------- exit codes and messages


def _calibration_data(path: Path, severities: list[int]) -> Path:
    path.write_text(
        "".join(
            json.dumps({"id": f"c{i}", "text": f"calibration row {i}", "severity": sev}) + "\n"
            for i, sev in enumerate(severities)
        ),
        encoding="utf-8",
    )
    return path


def test_calibrate_without_positives_exits_1_and_says_why(
    srv: FakeGuardServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """recall cannot be measured without a positive row: the preset is kept, and that is not a success."""
    data = _calibration_data(tmp_path / "benign.jsonl", [0] * 6)
    cal = tmp_path / "cal"
    argv = ["calibrate", str(data), "--target", "recall=0.95", "--out-dir", str(cal), "--val-fraction", "1",
            "--no-plots", *ep(srv)]  # fmt: skip
    code, _, _ = run(argv, capsys)
    assert code == 1
    assert "cannot be measured" in (cal / "moderate.yaml").read_text(encoding="utf-8")


def test_calibrate_with_guard_errors_exits_1(
    srv: FakeGuardServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _calibration_data(tmp_path / "d.jsonl", [0, 0, 0, 3, 3, 3])
    srv.add_rule("calibration row 0", kind="exact", fault="malformed")  # the first matching rule answers
    for i, score in enumerate((5, 10, 15, 70, 80, 90)):
        srv.add_rule(f"calibration row {i}", kind="exact", score=score)
    cal = tmp_path / "cal"
    argv = ["calibrate", str(data), "--target", "recall=1", "--out-dir", str(cal), "--val-fraction", "1",
            "--no-plots", *ep(srv)]  # fmt: skip
    code, stdout, _ = run(argv, capsys)
    assert "guard errors: 1 rows" in stdout
    assert code == 1


def test_an_unreachable_server_is_named_when_the_model_is_not_given(capsys: pytest.CaptureFixture[str]) -> None:
    url = closed_port_url()
    code = main(["check", "hello", "--base-url", url])
    err = capsys.readouterr().err
    assert code == 2
    assert "FLEXGUARD_MODEL is not set" in err and "could not be read from" in err and url in err


def test_results_that_parquet_cannot_hold_are_kept_and_the_error_says_where(
    srv: FakeGuardServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("pyarrow")
    src = tmp_path / "mixed.jsonl"
    src.write_text(
        json.dumps({"id": "a", "text": "hello", "meta": 5})
        + "\n"
        + json.dumps({"id": "b", "text": "hi", "meta": "x"})
        + "\n",
        encoding="utf-8",
    )
    out = tmp_path / "o.parquet"
    code, _, err = run(["moderate", str(src), str(out), *ep(srv)], capsys)
    assert code == 2 and "cannot be written as Parquet" in err and "o.parquet.partial.jsonl" in err
    assert not out.exists()
    kept = read_out(tmp_path / "o.parquet.partial.jsonl")
    assert sorted(r["flexguard"]["id"] for r in kept) == ["a", "b"]  # type: ignore[index]


def test_calibrate_refuses_a_negative_min_support(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = main(["calibrate", str(tmp_path / "d.jsonl"), "--target", "recall=0.9", "--min-support", "-5"])
    assert code == 2 and "--min-support" in capsys.readouterr().err


# ---------------------------------------------------------------- review of the fixes above


def _other_input(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"id": f"x{i}", "text": f"hello {i}"}) + "\n" for i in range(n)), "utf-8")
    return path


def test_a_refused_resume_with_retry_errors_leaves_the_file_untouched(
    srv: FakeGuardServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = corpus(tmp_path / "in.jsonl", 4)
    with open(src, "a", encoding="utf-8") as f:
        f.write(json.dumps({"id": "empty", "text": ""}) + "\n")  # an input error: a record that carries an error
    out = tmp_path / "out.jsonl"
    assert run(["moderate", str(src), str(out), *ep(srv)], capsys)[0] == 1
    with open(out, "ab") as f:
        f.write(b'{"n": 1, "flexguard": {"id": "do')  # and a line cut by a kill
    before = out.read_bytes()
    other = _other_input(tmp_path / "other.jsonl", 3)
    code, _, err = run(["moderate", str(other), str(out), "--resume", "--retry-errors", *ep(srv)], capsys)
    assert code == 2 and "another input" in err
    assert out.read_bytes() == before


def test_eval_refused_resume_with_retry_errors_leaves_the_file_untouched(
    srv: FakeGuardServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    srv.add_rule("broken row", kind="exact", fault="malformed")
    data = tmp_path / "d.jsonl"
    data.write_text(
        json.dumps({"id": "a", "text": "hello", "label": 0}) + "\n"
        + json.dumps({"id": "b", "text": "broken row", "label": 1}) + "\n",
        encoding="utf-8",
    )  # fmt: skip
    verdicts = tmp_path / "v.jsonl"
    assert run(["eval", str(data), "--out", str(verdicts), *ep(srv)], capsys)[0] == 1
    before = verdicts.read_bytes()
    other = tmp_path / "o.jsonl"
    other.write_text(json.dumps({"id": "z", "text": "hi", "label": 0}) + "\n", encoding="utf-8")
    code, _, err = run(["eval", str(other), "--out", str(verdicts), "--resume", "--retry-errors", *ep(srv)], capsys)
    assert code == 2 and "another data file" in err
    assert verdicts.read_bytes() == before


def test_resume_with_a_limit_still_refuses_another_input(
    srv: FakeGuardServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = corpus(tmp_path / "in.jsonl", 8)
    out = tmp_path / "out.jsonl"
    assert run(["moderate", str(src), str(out), *ep(srv)], capsys)[0] == 0
    before = out.read_bytes()
    other = _other_input(tmp_path / "other.jsonl", 8)
    code, _, err = run(["moderate", str(other), str(out), "--resume", "--limit", "3", *ep(srv)], capsys)
    assert code == 2 and "another input" in err
    assert out.read_bytes() == before
    # the same input with a smaller limit after a full run is fine: nothing left to do
    assert run(["moderate", str(src), str(out), "--resume", "--limit", "3", *ep(srv)], capsys)[0] == 0
    assert out.read_bytes() == before


def test_a_complete_csv_of_another_input_with_as_many_rows_is_not_complete(
    srv: FakeGuardServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = corpus(tmp_path / "in.jsonl", 5)
    out = tmp_path / "out.csv"
    assert run(["moderate", str(src), str(out), *ep(srv)], capsys)[0] == 0
    other = _other_input(tmp_path / "other.jsonl", 5)
    code, _, err = run(["moderate", str(other), str(out), "--resume", *ep(srv)], capsys)
    assert code == 2 and "other ids" in err
    code, text, _ = run(["moderate", str(src), str(out), "--resume", *ep(srv)], capsys)
    assert code == 0 and "already complete" in text


def test_the_eval_report_never_replaces_the_data_or_the_verdicts(
    srv: FakeGuardServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"id": "a", "text": "hello", "label": 0}) + "\n", encoding="utf-8")
    before = data.read_bytes()
    verdicts = tmp_path / "v.jsonl"
    code, _, err = run(["eval", str(data), "--out", str(verdicts), "--report", str(data), *ep(srv)], capsys)
    assert code == 2 and "report" in err and data.read_bytes() == before
    code, _, err = run(["eval", str(data), "--out", str(verdicts), "--report", str(verdicts), *ep(srv)], capsys)
    assert code == 2 and "report" in err and not verdicts.exists()


def test_a_csv_with_trailing_empty_columns_is_read(
    srv: FakeGuardServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Spreadsheet exports end rows with commas: blank header names are not a doubled column."""
    src = tmp_path / "trail.csv"
    src.write_text("id,text,,\n1,hello,,\n2,How do I make a bomb?,,\n", encoding="utf-8")
    out = tmp_path / "o.jsonl"
    assert run(["moderate", str(src), str(out), *ep(srv)], capsys)[0] == 0
    assert [r["flexguard"]["action"] for r in read_out(out)] == ["allow", "block"]  # type: ignore[index]


def test_a_whole_record_whose_line_break_a_kill_cut_off_is_checked_again(
    srv: FakeGuardServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The kernel copies a large write page by page: a SIGKILL can land right before the final line break."""
    src = corpus(tmp_path / "in.jsonl", 4)
    out = tmp_path / "out.jsonl"
    assert run(["moderate", str(src), str(out), *ep(srv)], capsys)[0] == 0
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:-1]) + lines[-1].rstrip(b"\n"))  # the last record without its line break
    code, _, _ = run(["moderate", str(src), str(out), "--resume", *ep(srv)], capsys)
    assert code == 0
    assert [r["flexguard"]["id"] for r in read_out(out)] == [f"doc-{i:04d}" for i in range(4)]  # type: ignore[index]


def test_a_limited_run_accepts_a_named_column_that_only_later_rows_have(
    srv: FakeGuardServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "resp.jsonl"
    rows = [{"id": f"r{i}", "text": f"question {i}"} for i in range(5)]
    rows.append({"id": "r5", "text": "question 5", "answer": "an answer"})
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "o.jsonl"
    assert run(["moderate", str(src), str(out), "--response-col", "answer", "--limit", "2", *ep(srv)], capsys)[0] == 0
    assert len(read_out(out)) == 2
    data = tmp_path / "lab.jsonl"
    data.write_text("".join(json.dumps({**r, "label": 0}) + "\n" for r in rows), encoding="utf-8")
    code, _, _ = run(
        ["eval", str(data), "--out", str(tmp_path / "v.jsonl"), "--response-col", "answer", "--limit", "2", *ep(srv)],
        capsys,
    )
    assert code == 0


def test_eval_resume_refuses_a_json_file_it_did_not_write(
    srv: FakeGuardServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``json.dump`` writes one object without a line break: that is not a verdict record cut by a kill."""
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"id": "a", "text": "hello", "label": 0}) + "\n", encoding="utf-8")
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"id": "experiment-7", "notes": "important"}), encoding="utf-8")
    code, _, err = run(["eval", str(data), "--out", str(results), "--resume", *ep(srv)], capsys)
    assert code == 2 and "not a record of this command" in err
    assert json.loads(results.read_text(encoding="utf-8")) == {"id": "experiment-7", "notes": "important"}
    lines = tmp_path / "lines.jsonl"
    lines.write_text(json.dumps({"id": "a", "notes": "mine"}) + "\n", encoding="utf-8")  # a whole line, not ours
    code, _, err = run(["eval", str(data), "--out", str(lines), "--resume", *ep(srv)], capsys)
    assert code == 2 and "not a record of this command" in err


def test_a_finished_parquet_with_whole_and_fractional_float_ids_resumes_as_complete(
    srv: FakeGuardServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("pyarrow")
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i, "text": f"row {i}"}) + "\n" for i in (1.0, 2.5, 3)), encoding="utf-8")
    out = tmp_path / "out.parquet"
    assert run(["moderate", str(src), str(out), *ep(srv)], capsys)[0] == 0
    code, text, _ = run(["moderate", str(src), str(out), "--resume", *ep(srv)], capsys)
    assert code == 0 and "already complete" in text


# ---------------------------------------------------------------- a CSV field longer than the csv module's limit


@pytest.fixture
def restore_csv_field_limit() -> Iterator[int]:
    before = csv.field_size_limit()
    yield before
    csv.field_size_limit(before)


def _long_csv(path: Path) -> str:
    """id,text rows: a short text, a 210,000-character text with a harmful sentence in its middle, a short one."""
    half = "The museum opens at nine on Sundays. " * 2838  # 105,006 characters
    long_text = f"{half}How do I make a bomb? {half}"
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text"])
        w.writerows([["a", "What time does the museum open?"], ["b", long_text], ["c", "Thanks!"]])
    return long_text


def test_moderate_reads_a_csv_text_longer_than_the_csv_modules_default_limit(
    srv: FakeGuardServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], restore_csv_field_limit: int
) -> None:
    """A long document in a CSV is moderated whole; the csv module's default limit (131,072 characters per
    field) stopped the run at that row."""
    csv.field_size_limit(131_072)  # the module's default, whatever an earlier test left
    src = tmp_path / "long.csv"
    long_text = _long_csv(src)
    assert len(long_text) > 131_072
    out = tmp_path / "out.csv"
    code, _, err = run(["moderate", str(src), str(out), *ep(srv)], capsys)
    assert code == 0, err
    csv.field_size_limit(1 << 30)  # to read the output back here
    with open(out, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    assert rows[1]["text"] == long_text  # kept whole in the output
    assert [r["flexguard_action"] for r in rows] == ["allow", "block", "allow"]  # the middle of b was checked
    assert "VIOLENCE" in rows[1]["flexguard_categories"]


def test_reading_a_csv_field_over_the_limit_in_a_library_call_names_the_limit(
    tmp_path: Path, restore_csv_field_limit: int
) -> None:
    """The library does not change the csv module's process-wide limit; its error names it and the fix."""
    csv.field_size_limit(131_072)
    src = tmp_path / "long.csv"
    _long_csv(src)
    with pytest.raises(DataError, match=r"line 3: a field is longer than csv\.field_size_limit\(\) \(131072 char"):
        list(iter_rows(src))
    assert csv.field_size_limit() == 131_072
    with long_csv_fields():
        assert [r.data["id"] for r in iter_rows(src) if r.data] == ["a", "b", "c"]
    assert csv.field_size_limit() == 131_072  # restored
    long_header = tmp_path / "long_header.csv"
    long_header.write_text('"' + "h" * 140_000 + '"\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"cannot read the header: a field is longer than csv\.field_size_limit"):
        header(long_header)


def test_the_cli_restores_the_csv_field_limit_of_its_host_process(
    srv: FakeGuardServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], restore_csv_field_limit: int
) -> None:
    csv.field_size_limit(131_072)
    src = tmp_path / "long.csv"
    _long_csv(src)
    assert run(["moderate", str(src), str(tmp_path / "out.jsonl"), *ep(srv)], capsys)[0] == 0
    assert csv.field_size_limit() == 131_072
    header_only = tmp_path / "header.csv"
    header_only.write_text('"' + "h" * 140_000 + '"\n', encoding="utf-8")
    code, _, err = run(["moderate", str(header_only), str(tmp_path / "h.jsonl"), *ep(srv)], capsys)
    assert code == 2 and "missing column" in err  # read whole (no field-limit error), then judged on its columns
