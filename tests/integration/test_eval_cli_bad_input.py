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
from flexguard_integrations.policy import StrictnessPolicy
from flexguard_integrations.testing import FakeGuardServer
from tests.integration.test_eval_moderate import ENV_VARS, FLEX, corpus, ep, read_out


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def srv() -> Iterator[FakeGuardServer]:
    with FakeGuardServer((FLEX,)) as s:
        yield s


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_moderate_refuses_to_write_over_its_input(
    srv: FakeGuardServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = corpus(tmp_path / "same.jsonl", 5)
    before = src.read_bytes()
    code, _, err = run(["moderate", str(src), str(src), "--overwrite", *ep(srv)], capsys)
    assert code == 2 and "is the input file itself" in err
    assert src.read_bytes() == before
    link = tmp_path / "link.jsonl"
    link.symlink_to(src)
    code, _, err = run(["moderate", str(src), str(link), "--overwrite", *ep(srv)], capsys)
    assert code == 2 and "is the input file itself" in err
    assert src.read_bytes() == before


def test_eval_refuses_to_write_its_verdicts_over_the_data(
    srv: FakeGuardServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"id": "a", "text": "hello", "label": 0}) + "\n", encoding="utf-8")
    before = data.read_bytes()
    code, _, err = run(["eval", str(data), "--out", str(data), "--overwrite", *ep(srv)], capsys)
    assert code == 2 and "is the input file itself" in err
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
