"""Moderate a whole corpus before indexing: every input row gets exactly one output row with the decision.

Input: JSONL, CSV/TSV or Parquet (pyarrow). Output: JSONL (resumable, in input order; see
:mod:`.runner`), or CSV / Parquet, which are written from a JSONL progress file ``OUT.partial.jsonl`` once
every row is done (the progress file is then removed).

Each output row is the input row plus a ``flexguard`` object:

``{"id", "row", "action", "risk_score", "categories", "reason", "rule", "error", "fail_open", "route",
"redacted_text", "surface"}``

A row that could not be checked (unreadable, no text, the guard failed) carries the ``error`` and the
fail-closed decision: ``block`` (a guard failure follows the policy's ``on_error``, block by default; an
input problem is always ``block``).
"""

from __future__ import annotations

import asyncio
import csv
import importlib
import json
import os
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import GuardUnavailableError
from ..policy import StrictnessPolicy
from ..verdict import Action, Decision, Surface
from .data import (
    Columns,
    DataError,
    RawRow,
    check_columns,
    check_named_columns_seen,
    detect_format,
    iter_rows,
    row_id,
    texts_of,
)
from .runner import Progress, ResumableWriter, refuse_foreign_ids, refuse_same_file, run_pool, run_sync

if TYPE_CHECKING:
    from ..guard import Guard

__all__ = ["ModerationSummary", "moderate_file", "output_paths"]

FIELD = "flexguard"


@dataclass
class ModerationSummary:
    """What a (possibly resumed) moderation run did; ``actions`` / ``errors`` cover the whole output."""

    input: str
    output: str
    total: int = 0
    checked: int = 0
    resumed: int = 0
    retried: int = 0
    dropped_partial: int = 0
    actions: Counter[str] = field(default_factory=Counter)
    errors: int = 0
    input_errors: int = 0
    fail_open: int = 0
    seconds: float = 0.0
    already_complete: bool = False

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "input": self.input,
            "output": self.output,
            "total": self.total,
            "checked_this_run": self.checked,
            "resumed": self.resumed,
            "retried_errors": self.retried,
            "actions": dict(self.actions),
            "errors": self.errors,
            "input_errors": self.input_errors,
            "fail_open": self.fail_open,
            "seconds": round(self.seconds, 3),
        }

    def format(self) -> str:
        """The summary printed at the end of ``flexguard moderate``."""
        if self.already_complete:
            return f"{self.output} is already complete (nothing to resume)"
        rate = self.checked / self.seconds if self.seconds > 0 else 0.0
        acts = ", ".join(f"{a.value} {self.actions[a.value]}" for a in Action if self.actions.get(a.value))
        lines = [
            f"moderated {self.total} rows: {acts or 'none'}",
            f"  this run: {self.checked} checked in {self.seconds:.1f} s ({rate:.1f}/s)"
            + (f"; {self.resumed} already done (resumed)" if self.resumed else "")
            + (f"; {self.retried} errors retried" if self.retried else "")
            + ("; dropped 1 partly written line" if self.dropped_partial else ""),
            f"  errors: {self.errors} (guard {self.errors - self.input_errors}, input {self.input_errors}); "
            f"fail-open passes: {self.fail_open}",
            f"  output: {self.output}",
        ]
        return "\n".join(lines)


def output_paths(out: str | Path) -> tuple[Path, Path | None]:
    """(the JSONL file written row by row, the final CSV/Parquet file or None when the output is JSONL)."""
    out = Path(out)
    name = out.name.lower()
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return out, None
    if name.endswith((".csv", ".tsv", ".parquet", ".pq")):
        return out.with_name(out.name + ".partial.jsonl"), out
    raise DataError(f"{out}: unknown output type; use .jsonl, .csv, .tsv or .parquet")


def _error_record(data: dict[str, Any] | None, rid: str | int, row: int, error: str, surface: str) -> dict[str, Any]:
    return {
        **(data or {}),
        FIELD: {
            "id": rid,
            "row": row,
            "action": Action.BLOCK.value,
            "risk_score": None,
            "categories": [],
            "reason": f"not checked ({error}); blocked (fail-closed)",
            "rule": "input_error",
            "error": error,
            "input_error": True,
            "fail_open": False,
            "route": None,
            "redacted_text": None,
            "surface": surface,
        },
    }


def _decision_record(data: dict[str, Any], rid: str | int, row: int, d: Decision) -> dict[str, Any]:
    v = d.verdict
    return {
        **data,
        FIELD: {
            "id": rid,
            "row": row,
            "action": d.action.value,
            "risk_score": None if v.error is not None else v.risk_score,
            "categories": [c.value for c in v.categories],
            "reason": d.reason,
            "rule": d.rule,
            "error": v.error,
            "input_error": False,
            "fail_open": d.fail_open,
            "route": d.route,
            "redacted_text": d.redacted_text,
            "surface": d.surface.value if d.surface else None,
        },
    }


def _scan(path: Path, columns: Columns, limit: int | None) -> tuple[list[str], set[str]]:
    """(the ids of the rows to moderate, in order: the first ``limit``; every id of the file). The whole file is
    read, ``--limit`` or not: duplicate ids, explicitly named columns that no row has and fields the output
    would overwrite are rejected before anything is written, and a resumed output is checked against every id
    the input has."""
    seen: dict[str, int] = {}
    fields: set[str] = set()
    chosen: list[str] = []
    for raw in iter_rows(path):
        if raw.data is not None:
            fields.update(raw.data)
            taken = sorted(k for k in raw.data if k == FIELD or k.startswith(f"{FIELD}_"))
            if taken:
                shown = ", ".join(map(repr, taken[:3])) + (f" and {len(taken) - 3} more" if len(taken) > 3 else "")
                raise DataError(
                    f"{raw.where(path)}: has the field(s) {shown}, which the output uses for the decision (is this "
                    f"the output of an earlier `flexguard moderate`? Remove its {FIELD!r} field or columns to "
                    "moderate the rows again)"
                )
        key = str(row_id(raw, columns))
        if key in seen:
            raise DataError(
                f"{raw.where(path)}: duplicate id {key!r} (also at row {seen[key]}); every row needs its own "
                "id to be resumable (use --id-col to choose the id column)"
            )
        seen[key] = raw.row
        if limit is None or len(chosen) < limit:
            chosen.append(key)
    if seen:
        check_named_columns_seen(path, columns, fields)
    return chosen, set(seen)


def _id_text(value: Any) -> str:
    """An id read back from a CSV / Parquet output as the input's id text (Parquet stores a column of ints and
    floats as floats: 1 comes back as 1.0)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def _keep(record: dict[str, Any]) -> tuple[str, bool, bool, bool]:
    fg = record[FIELD]
    return (str(fg["action"]), bool(fg.get("error")), bool(fg.get("input_error")), bool(fg.get("fail_open")))


def moderate_file(
    guard: Guard,
    source: str | Path,
    out: str | Path,
    *,
    columns: Columns | None = None,
    policy: StrictnessPolicy | str | None = None,
    surface: Surface | str | None = None,
    concurrency: int = 64,
    resume: bool = False,
    overwrite: bool = False,
    retry_errors: bool = False,
    limit: int | None = None,
    progress: bool | Progress = True,
) -> ModerationSummary:
    """Moderate every row of ``source`` into ``out`` (see the module docstring); resumable and bounded in memory.

    ``surface`` defaults to ``retrieved`` for rows without a response (text about to be indexed) and
    ``response`` for rows with one.
    """
    source = Path(source)
    columns = columns or Columns()
    work_path, final = output_paths(out)
    for path in (work_path, final):
        if path is not None:
            refuse_same_file(source, path)
    summary = ModerationSummary(str(source), str(final or work_path))
    if final is not None and final.exists() and not (resume or overwrite):
        raise DataError(f"{final} exists; pass --overwrite to replace it")
    fmt = detect_format(source)
    check_columns(source, columns, require_label=False, fmt=fmt)
    chosen, every_id = _scan(source, columns, limit)
    total = len(chosen)
    summary.total = total
    if resume and final is not None and final.exists() and not work_path.exists():
        held = [_id_text((r.data or {}).get(f"{FIELD}_id")) for r in iter_rows(final)]
        if sorted(held) != sorted(chosen):
            raise DataError(
                f"{final} holds {len(held)} rows and {source} has {total}{' (with --limit)' if limit else ''}, or "
                "other ids: it is not this input's complete output (an earlier run with another --limit or "
                "input?); pass --overwrite to moderate them all again"
            )
        summary.already_complete = True
        return summary

    def same_input(done: Mapping[str, Any]) -> None:  # before the writer changes anything in the file
        refuse_foreign_ids(
            work_path,
            done,
            every_id,
            str(source),
            "it is the output of another input: use another output file or --overwrite",
        )

    surf = Surface.parse(surface) if surface is not None else None
    started = time.monotonic()
    with ResumableWriter(
        work_path,
        key=lambda r: str(r[FIELD]["id"]),
        resume=resume,
        overwrite=overwrite,
        retry_errors=retry_errors,
        is_error=lambda r: bool(r[FIELD].get("error")),
        keep=_keep,
        accept=same_input,
        shape=lambda r: isinstance(r.get(FIELD), dict) and "id" in r[FIELD],
    ) as writer:
        summary.resumed = len(writer.done)
        summary.retried = writer.retried
        summary.dropped_partial = writer.dropped_partial
        bar = progress if isinstance(progress, Progress) else Progress(total, "moderate", enabled=bool(progress))
        bar.total = total
        bar.skipped = len(writer.done)
        known = set(writer.done)

        def pending() -> Iterator[RawRow]:
            n = 0
            for raw in iter_rows(source, fmt):
                if limit is not None and n >= limit:
                    return
                n += 1
                key = str(row_id(raw, columns))
                if key in known:
                    known.discard(key)
                    continue
                yield raw

        async def work(raw: RawRow) -> dict[str, Any]:
            rid = row_id(raw, columns)
            if raw.error is not None or raw.data is None:
                return _error_record(None, rid, raw.row, f"row {raw.row}: {raw.error}", "-")
            try:
                text, response = texts_of(raw, columns)
            except ValueError as exc:
                return _error_record(raw.data, rid, raw.row, f"row {raw.row}: {exc}", "-")
            where = surf or (Surface.RESPONSE if response is not None else Surface.RETRIEVED)
            try:
                decision = await guard.acheck(text, response, surface=where, policy=policy)
            except GuardUnavailableError as exc:  # on_error: raise -> record it, blocked
                if exc.decision is not None:
                    return _decision_record(raw.data, rid, raw.row, exc.decision)
                return _error_record(raw.data, rid, raw.row, str(exc), where.value)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # bad input for the guard (e.g. too long): this row only
                return _error_record(raw.data, rid, raw.row, f"{type(exc).__name__}: {exc}"[:500], where.value)
            return _decision_record(raw.data, rid, raw.row, decision)

        def write(record: dict[str, Any]) -> None:
            writer.write(record)
            kept = _keep(record)
            writer.done[str(record[FIELD]["id"])] = kept
            summary.checked += 1
            bar.update(errors=1 if kept[1] else 0)

        async def main() -> None:
            try:
                await run_pool(pending(), work, write, concurrency=concurrency)
            finally:
                await guard.transport.aclose()

        try:
            run_sync(main)
        finally:
            summary.seconds = time.monotonic() - started
            bar.close()
        if known and limit is None:
            raise DataError(
                f"{work_path}: holds {len(known)} id(s) that are not in {source} (e.g. {next(iter(known))!r}); "
                "it is the output of another input: use another output file or --overwrite"
            )
        for action, error, input_error, fail_open in writer.done.values():
            summary.actions[action] += 1
            summary.errors += error
            summary.input_errors += input_error
            summary.fail_open += fail_open
    if final is not None:
        _convert(work_path, final)
        work_path.unlink()
    return summary


def _flat(record: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in record.items() if k != FIELD}
    for k, v in record[FIELD].items():
        out[f"{FIELD}_{k}"] = ",".join(v) if isinstance(v, list) else v
    return out


def _convert(src: Path, dst: Path) -> None:
    """Write the finished JSONL progress file as CSV/TSV/Parquet, rows sorted by input row."""
    with open(src, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    records.sort(key=lambda r: int(r[FIELD]["row"]))
    rows = [_flat(r) for r in records]
    tmp = dst.with_name(dst.name + ".tmp")
    name = dst.name.lower()
    if name.endswith((".parquet", ".pq")):
        try:
            pa = importlib.import_module("pyarrow")
            pq = importlib.import_module("pyarrow.parquet")
        except ImportError:
            raise DataError(
                f"{dst}: writing Parquet needs pyarrow: pip install 'flexguard-integrations[parquet]'; the "
                f"results are kept in {src}"
            ) from None
        try:
            pq.write_table(pa.Table.from_pylist(rows), str(tmp))
        except (pa.lib.ArrowException, ValueError, TypeError) as exc:  # e.g. a column of numbers and strings
            tmp.unlink(missing_ok=True)
            raise DataError(
                f"{dst}: the results cannot be written as Parquet ({type(exc).__name__}: {exc}; a column mixing "
                f"numbers and strings?); every result is kept in {src} (JSONL, one record per row)"
            ) from None
    else:
        names: list[str] = []
        for r in rows:
            names += [k for k in r if k not in names]
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=names, delimiter="\t" if name.endswith(".tsv") else ",")
            w.writeheader()
            for r in rows:
                w.writerow({k: (json.dumps(v) if isinstance(v, dict | list) else v) for k, v in r.items()})
    os.replace(tmp, dst)
