"""Reading labelled data and corpora: JSONL, CSV / TSV, and Parquet (extra ``parquet``: pyarrow).

Every problem is reported with the file, the row (1-based, data rows only) and, for text formats, the line:
``data.csv: row 7 (line 8): unknown label 'maybe'; expected 0/1, true/false, safe/unsafe``.

Columns (the first name present is used; ``Columns`` overrides them):

- ``id`` (optional; default: the row number), ``text`` (or ``prompt``), ``response`` (optional: the text
  is then the prompt and the response is what gets moderated), ``label`` (``0``/``1``, ``true``/``false``,
  ``safe``/``unsafe``) or ``severity`` (or ``severity_level``: FlexBench tier 0–4 or its name, BENIGN, LOW,
  MODERATE, HIGH, EXTREME), ``category`` (or ``categories``: unified or native names, several separated by
  ``,``, ``;`` or ``|``), ``split`` (optional: ``valid``/``validation``/``val``/``dev`` or ``test``).
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import FlexGuardError
from ..models.base import resolve_category
from ..verdict import Category

__all__ = [
    "MIN_SEVERITY",
    "STRICTNESS",
    "TIERS",
    "Columns",
    "DataError",
    "Example",
    "RawRow",
    "detect_format",
    "iter_rows",
    "parse_categories",
    "parse_label",
    "parse_severity",
    "read_examples",
    "to_example",
]

STRICTNESS: tuple[str, ...] = ("strict", "moderate", "loose")
MIN_SEVERITY: dict[str, int] = {"strict": 1, "moderate": 2, "loose": 3}
"""FlexBench: ``label_strict = severity >= 1``, ``label_moderate = severity >= 2``, ``label_loose = severity >= 3``."""
TIERS: tuple[str, ...] = ("BENIGN", "LOW", "MODERATE", "HIGH", "EXTREME")

Format = Literal["jsonl", "csv", "tsv", "parquet"]

_TRUE = {"1", "true", "unsafe", "yes"}
_FALSE = {"0", "false", "safe", "no"}
_VALID_SPLITS = {"valid", "validation", "val", "dev"}
_TEST_SPLITS = {"test"}


class DataError(FlexGuardError, ValueError):
    """A data file cannot be used as given: unreadable, a missing column, a bad value. Names the row."""


@dataclass(frozen=True, slots=True)
class Columns:
    """Column names; each is a tuple of candidates, the first present wins."""

    id: tuple[str, ...] = ("id",)
    text: tuple[str, ...] = ("text", "prompt")
    response: tuple[str, ...] = ("response",)
    label: tuple[str, ...] = ("label",)
    severity: tuple[str, ...] = ("severity", "severity_level")
    category: tuple[str, ...] = ("category", "categories")
    split: tuple[str, ...] = ("split",)
    given: frozenset[str] = frozenset()
    """The roles whose column was named explicitly (``--response-col answer``): the data must have it, else a
    mistyped name would silently leave that column unread (an unchecked response, a lost id)."""

    _ROLES = ("id", "text", "response", "label", "severity", "category", "split")

    @classmethod
    def with_overrides(cls, **names: str | None) -> Columns:
        """Columns with some names fixed (``text="body"``); None keeps the defaults."""
        base = cls()
        given = {k: (v,) for k, v in names.items() if v}
        unknown = set(given) - set(cls._ROLES)
        if unknown:
            raise ValueError(f"unknown column role(s): {', '.join(sorted(unknown))}")
        return cls(
            **{k: given.get(k, getattr(base, k)) for k in cls._ROLES},
            given=frozenset(given),
        )

    def named(self) -> dict[str, str]:
        """Role → column name for each explicitly named column."""
        return {role: getattr(self, role)[0] for role in sorted(self.given)}


@dataclass(frozen=True, slots=True)
class RawRow:
    """One record as read: its data, or why it could not be read."""

    row: int
    line: int | None
    data: dict[str, Any] | None
    error: str | None = None

    def where(self, path: str | Path) -> str:
        """``file: row N (line L)``."""
        line = f" (line {self.line})" if self.line is not None and self.line != self.row else ""
        return f"{path}: row {self.row}{line}"


@dataclass(frozen=True, slots=True)
class Example:
    """One labelled row: what to check and what the right answer is."""

    id: str | int
    row: int
    text: str
    response: str | None = None
    label: bool | None = None
    severity: int | None = None
    categories: tuple[Category, ...] = ()
    split: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def key(self) -> str:
        """The id as a string (what resuming keys on)."""
        return str(self.id)

    def positive(self, strictness: str = "moderate") -> bool:
        """Unsafe under ``strictness``: severity >= 1 / 2 / 3 (strict / moderate / loose), else the binary label."""
        if self.severity is not None:
            return self.severity >= MIN_SEVERITY[strictness]
        if self.label is None:
            raise ValueError(f"row {self.row} has no label")
        return self.label


# ===================================================================== value parsing


def parse_label(value: Any) -> bool:
    """0/1, true/false, safe/unsafe (also yes/no; case-insensitive) → True for unsafe."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        key = value.strip().lower()
        if key.endswith(".0") and key[:-2] in ("0", "1"):
            key = key[:-2]
        if key in _TRUE:
            return True
        if key in _FALSE:
            return False
    raise ValueError(f"unknown label {value!r}; expected 0/1, true/false or safe/unsafe")


def parse_severity(value: Any) -> int:
    """A FlexBench tier: 0–4 or BENIGN / LOW / MODERATE / HIGH / EXTREME."""
    number: Any = value
    if isinstance(value, str):
        key = value.strip().upper()
        if key in TIERS:
            return TIERS.index(key)
        try:
            number = float(key)
        except ValueError:
            number = None
    if (
        isinstance(number, bool)
        or not isinstance(number, int | float)
        or not math.isfinite(number)
        or number != int(number)
    ):
        raise ValueError(f"unknown severity {value!r}; expected a tier 0-4 or one of {', '.join(TIERS)}")
    tier = int(number)
    if not 0 <= tier <= 4:
        raise ValueError(f"severity {value!r} is out of range; FlexBench tiers are 0-4")
    return tier


def parse_categories(value: Any) -> tuple[Category, ...]:
    """Unified or native category names: a list, or one string separated by , ; or |. Empty/SAFE → ()."""
    if value is None:
        return ()
    items: list[Any]
    if isinstance(value, str):
        items = [p for p in re.split(r"[,;|]", value) if p.strip()]
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        raise ValueError(f"category must be a name or a list of names, not {type(value).__name__}")
    out: list[Category] = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"category {item!r} is not a name")
        if item.strip().upper() in ("SAFE", "NONE", ""):
            continue
        cat = resolve_category(item)
        if cat not in out:
            out.append(cat)
    return tuple(out)


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _pick(data: Mapping[str, Any], names: tuple[str, ...]) -> tuple[str | None, Any]:
    for name in names:
        if name in data:
            return name, data[name]
    return None, None


# ===================================================================== reading


def detect_format(path: str | Path) -> Format:
    """The format from the file name: .jsonl/.ndjson/.json, .csv, .tsv, .parquet/.pq."""
    name = str(path).lower()
    for suffix in (".gz", ".bz2", ".xz"):
        if name.endswith(suffix):
            raise DataError(f"{path}: compressed files are not supported; decompress it first")
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    if name.endswith(".csv"):
        return "csv"
    if name.endswith(".tsv"):
        return "tsv"
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    raise DataError(f"{path}: unknown file type; use .jsonl, .csv, .tsv or .parquet")


def _pyarrow_parquet(path: str | Path) -> Any:
    try:
        return importlib.import_module("pyarrow.parquet")
    except ImportError:
        raise DataError(
            f"{path}: reading Parquet needs pyarrow: pip install 'flexguard-integrations[parquet]'"
        ) from None


def header(path: str | Path, fmt: Format | None = None) -> list[str] | None:
    """The column names of a CSV/TSV/Parquet file (None for JSONL, whose rows each carry their keys)."""
    fmt = fmt or detect_format(path)
    if fmt == "jsonl":
        return None
    if fmt == "parquet":
        pq = _pyarrow_parquet(path)
        try:
            return [str(n) for n in pq.ParquetFile(str(path)).schema_arrow.names]
        except Exception as exc:
            raise DataError(f"{path}: not a readable Parquet file: {exc}") from None
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            first = next(csv.reader(f, delimiter="\t" if fmt == "tsv" else ","), None)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    except csv.Error as exc:
        raise DataError(f"{path}: cannot read the header: {_csv_problem(exc)}") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read the header: {exc}") from None
    if not first:
        raise DataError(f"{path}: the file is empty (no header row)")
    return [c.strip() for c in first]


def iter_rows(path: str | Path, fmt: Format | None = None) -> Iterator[RawRow]:
    """Every record of the file, in order; a record that cannot be read comes with ``error`` set.

    Blank lines of a JSONL file are skipped (they are not rows). Problems with the file as a whole (missing,
    not UTF-8 in a CSV, not Parquet) raise :class:`DataError`.
    """
    fmt = fmt or detect_format(path)
    if not Path(path).is_file():
        raise DataError(f"{path}: no such file")
    if fmt == "jsonl":
        yield from _iter_jsonl(path)
    elif fmt == "parquet":
        yield from _iter_parquet(path)
    else:
        yield from _iter_csv(path, "\t" if fmt == "tsv" else ",")


def _iter_jsonl(path: str | Path) -> Iterator[RawRow]:
    row = 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            row += 1
            try:
                text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                yield RawRow(row, line_no, None, f"not valid UTF-8 ({exc.reason} at byte {exc.start})")
                continue
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                yield RawRow(row, line_no, None, f"not valid JSON ({exc.msg} at column {exc.colno})")
                continue
            if not isinstance(data, dict):
                yield RawRow(row, line_no, None, f"a row must be a JSON object, not {type(data).__name__}")
                continue
            yield RawRow(row, line_no, data)


CSV_FIELD_LIMIT = 2**31 - 1
"""The csv field limit inside :func:`long_csv_fields`: the largest a C long holds on every platform."""


@contextlib.contextmanager
def long_csv_fields() -> Iterator[None]:
    """Within the block, the csv module reads fields of any length (its default stops at 131,072 characters).

    The limit is process-wide (``csv.field_size_limit``), so the library never changes it on its own: the
    ``flexguard`` CLI runs its commands in this block, and a program that reads CSV files with long documents
    through :func:`iter_rows`, :func:`read_examples` or :func:`~flexguard_integrations.eval.moderate.moderate_file`
    does too. The limit before the block is restored after it (it is only ever raised inside).
    """
    before = csv.field_size_limit()
    csv.field_size_limit(max(before, CSV_FIELD_LIMIT))
    try:
        yield
    finally:
        csv.field_size_limit(before)


def _iter_csv(path: str | Path, delimiter: str) -> Iterator[RawRow]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            head = next(reader, None)
            if not head:
                return
            names = [c.strip() for c in head]
            doubled = sorted({n for n in names if n and names.count(n) > 1})  # blank ones: trailing commas
            if doubled:
                raise DataError(
                    f"{path}: the header names column(s) {', '.join(map(repr, doubled))} more than once; one of "
                    "each would be lost"
                )
            row = 0
            for record in reader:
                if not record or (len(record) == 1 and not record[0].strip()):
                    continue
                row += 1
                if len(record) != len(names):
                    yield RawRow(
                        row,
                        reader.line_num,
                        None,
                        f"has {len(record)} fields but the header has {len(names)} (an unquoted delimiter?)",
                    )
                    continue
                yield RawRow(row, reader.line_num, dict(zip(names, record, strict=True)))
        except UnicodeDecodeError as exc:
            raise DataError(
                f"{path}: not valid UTF-8 after line {reader.line_num} ({exc.reason}); save the file as UTF-8"
            ) from None
        except csv.Error as exc:
            raise DataError(f"{path}: line {reader.line_num}: {_csv_problem(exc)}") from None


def _csv_problem(exc: csv.Error) -> str:
    """What a csv.Error says, with the way out when it is the field size limit."""
    if "field larger than field limit" in str(exc):
        return (
            f"a field is longer than csv.field_size_limit() ({csv.field_size_limit()} characters); the flexguard "
            "CLI raises that limit, a program reads the file inside flexguard_integrations.eval.data.long_csv_fields()"
        )
    return f"unreadable CSV: {exc}"


def _iter_parquet(path: str | Path) -> Iterator[RawRow]:
    pq = _pyarrow_parquet(path)
    try:
        pf = pq.ParquetFile(str(path))
    except Exception as exc:
        raise DataError(f"{path}: not a readable Parquet file: {exc}") from None
    row = 0
    for batch in pf.iter_batches(batch_size=2048):
        for data in batch.to_pylist():
            row += 1
            yield RawRow(row, None, dict(data))


# ===================================================================== examples


def check_columns(path: str | Path, columns: Columns, *, require_label: bool, fmt: Format | None = None) -> None:
    """Raise a DataError naming the missing column when a CSV/Parquet header lacks the text (or label) column."""
    names = header(path, fmt)
    if names is None:
        return
    present = set(names)
    listed = ", ".join(names) or "(none)"
    for role, name in columns.named().items():
        if name not in present:
            raise DataError(f"{path}: no column {name!r} (given as the {role} column); columns: {listed}")
    if not present & set(columns.text):
        raise DataError(f"{path}: missing column {_alts(columns.text)} (the text to check); columns: {listed}")
    if require_label and not present & (set(columns.label) | set(columns.severity)):
        raise DataError(
            f"{path}: missing label column: expected {_alts(columns.label)} (0/1, true/false, safe/unsafe) or "
            f"{_alts(columns.severity)} (tier 0-4); columns: {listed}"
        )


def check_named_columns_seen(path: str | Path, columns: Columns, seen: set[str]) -> None:
    """Raise a DataError when a column named explicitly appears in none of the rows (``seen``: every field
    name met); for files without a header (JSONL), where :func:`check_columns` cannot tell."""
    for role, name in columns.named().items():
        if name not in seen:
            listed = ", ".join(sorted(seen)[:20]) or "(none)"
            raise DataError(f"{path}: no row has the field {name!r} (given as the {role} column); fields: {listed}")


def _alts(names: tuple[str, ...]) -> str:
    return " or ".join(repr(n) for n in names)


def row_id(raw: RawRow, columns: Columns) -> str | int:
    """The row's id: its id column when present and non-empty, else its row number."""
    if raw.data is not None:
        _, value = _pick(raw.data, columns.id)
        if isinstance(value, str) and value.strip():
            return value.strip()
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):  # JSON NaN / Infinity: kept as written
                return str(value)
            return int(value) if value == int(value) else value  # type: ignore[return-value]
    return raw.row


def texts_of(raw: RawRow, columns: Columns) -> tuple[str, str | None]:
    """(text, response) of a readable row; ValueError naming the problem."""
    assert raw.data is not None
    name, text = _pick(raw.data, columns.text)
    if name is None:
        raise ValueError(f"missing field {_alts(columns.text)}")
    if not isinstance(text, str):
        raise ValueError(f"{name!r} must be a string, not {'null' if text is None else type(text).__name__}")
    if not text.strip():
        raise ValueError(f"{name!r} is empty")
    rname, response = _pick(raw.data, columns.response)
    if _empty(response):
        response = None
    elif not isinstance(response, str):
        raise ValueError(f"{rname!r} must be a string, not {type(response).__name__}")
    return text, response


def to_example(raw: RawRow, columns: Columns, path: str | Path, *, require_label: bool = True) -> Example:
    """A validated Example; DataError naming the file, the row and the problem."""
    if raw.error is not None or raw.data is None:
        raise DataError(f"{raw.where(path)}: {raw.error or 'unreadable'}")
    data = raw.data
    try:
        text, response = texts_of(raw, columns)
        label: bool | None = None
        severity: int | None = None
        sev_name, sev_value = _pick(data, columns.severity)
        lab_name, lab_value = _pick(data, columns.label)
        if not _empty(sev_value):
            severity = parse_severity(sev_value)
        elif not _empty(lab_value):
            label = parse_label(lab_value)
        elif require_label:
            if sev_name is None and lab_name is None:
                raise ValueError(f"no label: expected a field {_alts(columns.label)} or {_alts(columns.severity)}")
            raise ValueError(f"the label ({lab_name or sev_name!r}) is empty")
        _, cat_value = _pick(data, columns.category)
        cats = () if _empty(cat_value) else parse_categories(cat_value)
        _, split_value = _pick(data, columns.split)
        split = None if _empty(split_value) else str(split_value).strip().lower()
        if split is not None and split not in _VALID_SPLITS | _TEST_SPLITS:
            raise ValueError(f"unknown split {split_value!r}; expected valid/validation/val/dev or test")
    except ValueError as exc:
        raise DataError(f"{raw.where(path)}: {exc}") from None
    return Example(
        id=row_id(raw, columns),
        row=raw.row,
        text=text,
        response=response,
        label=label,
        severity=severity,
        categories=cats,
        split=None if split is None else ("test" if split in _TEST_SPLITS else "valid"),
    )


def read_examples(
    path: str | Path,
    columns: Columns | None = None,
    *,
    require_label: bool = True,
    limit: int | None = None,
) -> list[Example]:
    """Every row of a labelled data file, validated; the first bad row raises a DataError naming it."""
    columns = columns or Columns()
    fmt = detect_format(path)
    check_columns(path, columns, require_label=require_label, fmt=fmt)
    out: list[Example] = []
    seen: dict[str, int] = {}
    fields: set[str] = set()
    for raw in iter_rows(path, fmt):
        if raw.data is not None:
            fields.update(raw.data)
        if limit is not None and len(out) >= limit:
            if set(columns.named().values()) <= fields:
                break
            continue  # past the limit, only until every named column is seen: it may appear in later rows only
        ex = to_example(raw, columns, path, require_label=require_label)
        if ex.key in seen:
            raise DataError(f"{raw.where(path)}: duplicate id {ex.id!r} (also at row {seen[ex.key]})")
        seen[ex.key] = ex.row
        out.append(ex)
    if not out:
        raise DataError(f"{path}: no rows")
    check_named_columns_seen(path, columns, fields)
    return out
