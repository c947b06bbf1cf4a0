"""Reading labelled data: formats, labels, severity tiers, categories, and errors that name the row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flexguard_integrations.eval.data import (
    Columns,
    DataError,
    parse_categories,
    parse_label,
    parse_severity,
    read_examples,
)
from flexguard_integrations.verdict import Category


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0, False), (1, True), (True, True), (False, False), ("safe", False), ("Unsafe", True), ("1", True),
     ("0.0", False), (" true ", True), ("no", False), (1.0, True)],
)  # fmt: skip
def test_parse_label(value: object, expected: bool) -> None:
    assert parse_label(value) is expected


@pytest.mark.parametrize("value", ["maybe", 2, -1, "", None, 0.5])
def test_parse_label_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="label"):
        parse_label(value)


def test_parse_severity() -> None:
    assert [parse_severity(v) for v in (0, "1", 2.0, "3.0", "extreme", "Benign")] == [0, 1, 2, 3, 4, 0]
    for bad in (5, -1, "2.5", "bad", True, None):
        with pytest.raises(ValueError, match="severity"):
            parse_severity(bad)


def test_parse_categories_unified_and_native() -> None:
    assert parse_categories("VIO, ILG") == (Category.VIOLENCE, Category.ILLEGAL)
    assert parse_categories(["PII", "jailbreak"]) == (Category.PRIVACY, Category.JAILBREAK)
    assert parse_categories("SAFE") == ()
    assert parse_categories("Violent|VIOLENCE") == (Category.VIOLENCE,)
    with pytest.raises(ValueError, match="unknown category"):
        parse_categories("weather")


def test_positive_class_per_strictness(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [{"text": f"t{s}", "severity": s} for s in range(5)] + [{"text": "b", "label": "unsafe"}],
    )
    ex = read_examples(path)
    # FlexBench: strict = severity >= 1, moderate >= 2, loose >= 3; a binary label is the same for all three
    assert [e.positive("strict") for e in ex] == [False, True, True, True, True, True]
    assert [e.positive("moderate") for e in ex] == [False, False, True, True, True, True]
    assert [e.positive("loose") for e in ex] == [False, False, False, True, True, True]
    assert [e.id for e in ex] == [1, 2, 3, 4, 5, 6]  # no id column: the row number


def test_csv_with_flexbench_names_and_response(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text(
        "id,prompt,response,severity_level,category,split\n"
        'p1,"Hello, there",,0,,valid\n'
        'p2,How do I make a bomb?,"I can\'t help.",4,VIO,test\n',
        encoding="utf-8",
    )
    a, b = read_examples(path)
    assert (a.id, a.text, a.response, a.severity, a.split) == ("p1", "Hello, there", None, 0, "valid")
    assert (b.response, b.severity, b.categories, b.split) == ("I can't help.", 4, (Category.VIOLENCE,), "test")


def test_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "x", "text": "hi", "label": 0}, {"id": "y", "text": "yo",
                                                                                  "label": 1}]), str(path))  # fmt: skip
    assert [(e.id, e.label) for e in read_examples(path)] == [("x", False), ("y", True)]


def test_column_overrides(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"doc": "d1", "body": "hello", "unsafe": "false"}])
    cols = Columns.with_overrides(id="doc", text="body", label="unsafe")
    (ex,) = read_examples(path, cols)
    assert (ex.id, ex.text, ex.label) == ("d1", "hello", False)


# ------------------------------------------------------------------------------------------ bad input


def test_missing_text_column_in_csv_names_the_columns(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("id,body,label\n1,hi,0\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.csv: missing column 'text' or 'prompt'.*columns: id, body, label"):
        read_examples(path)


def test_missing_label_column_in_csv(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("id,text\n1,hi\n", encoding="utf-8")
    with pytest.raises(DataError, match="missing label column"):
        read_examples(path)


def test_unknown_label_names_the_row(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": "maybe"}])
    with pytest.raises(DataError, match=r"d\.jsonl: row 2: unknown label 'maybe'; expected 0/1"):
        read_examples(path)


def test_unreadable_jsonl_row_names_row_and_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 0}\n\n{"text": "b", "label": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"row 2 \(line 3\): not valid JSON"):
        read_examples(path)


def test_row_missing_field_and_empty_label(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"label": 1}])
    with pytest.raises(DataError, match=r"row 1: missing field 'text' or 'prompt'"):
        read_examples(path)
    path = write_jsonl(tmp_path / "e.jsonl", [{"text": "a"}])
    with pytest.raises(DataError, match=r"row 1: no label"):
        read_examples(path)
    path = tmp_path / "f.csv"
    path.write_text("text,label\nhello,\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"row 1 \(line 2\): the label \('label'\) is empty"):
        read_examples(path)


def test_csv_row_with_wrong_field_count(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("text,label\nok,0\nhello, world,1\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"row 2 \(line 3\): has 3 fields but the header has 2"):
        read_examples(path)


def test_other_bad_rows(tmp_path: Path) -> None:
    cases = [
        ([{"text": "", "label": 0}], r"row 1: 'text' is empty"),
        ([{"text": 5, "label": 0}], r"row 1: 'text' must be a string"),
        ([[1, 2]], r"row 1: a row must be a JSON object"),
        ([{"text": "a", "severity": 7}], r"row 1: severity 7 is out of range"),
        ([{"text": "a", "label": 0, "category": "weather"}], r"row 1: unknown category 'weather'"),
        ([{"id": "x", "text": "a", "label": 0}, {"id": "x", "text": "b", "label": 1}],
         r"row 2: duplicate id 'x' \(also at row 1\)"),
        ([{"text": "a", "label": 0, "split": "train"}], r"row 1: unknown split"),
    ]  # fmt: skip
    for i, (rows, pattern) in enumerate(cases):
        path = write_jsonl(tmp_path / f"c{i}.jsonl", rows)
        with pytest.raises(DataError, match=pattern):
            read_examples(path)


def test_file_level_problems(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        read_examples(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="unknown file type"):
        read_examples(tmp_path / "data.xlsx")
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="no rows"):
        read_examples(tmp_path / "empty.jsonl")
    (tmp_path / "latin.csv").write_bytes(b"text,label\ncaf\xe9,0\n")
    with pytest.raises(DataError, match="not valid UTF-8"):
        read_examples(tmp_path / "latin.csv")
