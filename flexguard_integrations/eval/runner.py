"""The engine under ``flexguard eval`` / ``calibrate`` / ``moderate``: a bounded async worker pool, a resumable
JSONL writer, a progress line, and the evaluation report.

Resuming (``docs/evaluation.md``, "Resume"): the output is a JSONL file written row by row, in input order
(a reorder buffer holds rows that finish early), flushed to the operating system after every row and
fsync'd at least every half second and at the end. A run killed at any point leaves a prefix of the input
order, possibly followed by a partly written last line. ``resume=True`` drops that partial line, skips every
id already in the file and appends the rest, so the finished file holds every input id exactly once, in
input order (rows re-run with ``retry_errors`` are the exception: they are appended at the end).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import sys
import time
from collections.abc import Awaitable, Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

from ..errors import FlexGuardError
from ..policy import StrictnessPolicy
from ..verdict import Category, Surface, Verdict
from .data import MIN_SEVERITY, STRICTNESS, DataError, Example
from .metrics import Confusion, auroc, average_precision, confusion

if TYPE_CHECKING:
    from ..guard import Guard

logger = logging.getLogger("flexguard_integrations.eval")

__all__ = [
    "EvalRecord",
    "EvalReport",
    "OutputExistsError",
    "Progress",
    "ResumableWriter",
    "build_report",
    "evaluate",
    "format_report",
    "load_records",
    "preset_policies",
    "run_pool",
    "run_sync",
    "verdict_from_dict",
]

T = TypeVar("T")


class OutputExistsError(FlexGuardError, FileExistsError):
    """The output file exists and neither resume nor overwrite was asked for."""


# ===================================================================== progress


class Progress:
    """A one-line progress bar on stderr (no dependency): a redrawn bar on a terminal, a line every few seconds
    otherwise, nothing when disabled."""

    def __init__(
        self,
        total: int | None,
        label: str,
        *,
        stream: IO[str] | None = None,
        enabled: bool = True,
        interval: float | None = None,
    ) -> None:
        self.total = total
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if interval is not None else (0.1 if self.tty else 5.0)
        self.done = 0
        self.errors = 0
        self.skipped = 0
        self._start = time.monotonic()
        self._last = 0.0

    def update(self, n: int = 1, *, errors: int = 0) -> None:
        """Count ``n`` finished rows (``errors`` of them with an error); redraw when due."""
        self.done += n
        self.errors += errors
        now = time.monotonic()
        if self.enabled and now - self._last >= self.interval:
            self._last = now
            self._draw(final=False)

    def line(self) -> str:
        """The current progress text."""
        elapsed = max(time.monotonic() - self._start, 1e-9)
        rate = self.done / elapsed
        parts = [self.label]
        if self.total:
            frac = min(1.0, (self.done + self.skipped) / self.total)
            width = 24
            filled = int(frac * width)
            parts.append(f"[{'#' * filled}{'.' * (width - filled)}] {self.done + self.skipped}/{self.total}")
            parts.append(f"{frac:4.0%}")
            left = self.total - self.done - self.skipped
            if rate > 0 and left > 0:
                parts.append(f"ETA {_duration(left / rate)}")
        else:
            parts.append(f"{self.done} rows")
        parts.append(f"{rate:.1f}/s")
        if self.skipped:
            parts.append(f"{self.skipped} resumed")
        parts.append(f"{self.errors} errors")
        return "  ".join(parts)

    def _draw(self, *, final: bool) -> None:
        text = self.line()
        if self.tty:
            self.stream.write("\r\x1b[2K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Draw the final state."""
        if self.enabled:
            self._draw(final=True)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


# ===================================================================== resumable output


def refuse_same_file(source: str | Path, out: str | Path, what: str = "output") -> None:
    """Raise a DataError when ``out`` is ``source`` itself (or a link to it): writing would erase the input."""
    src, dst = Path(source), Path(out)
    same = dst.exists() and src.exists() and os.path.samefile(src, dst)
    if same or src.resolve() == dst.resolve():
        raise DataError(f"the {what} {dst} is the file {src} itself; writing it would erase that file")


def refuse_foreign_ids(out: str | Path, done: Iterable[str], known: Container[str], source: str, hint: str) -> None:
    """Raise a DataError when a resumed output ``out`` holds ids that ``known`` lacks (another input's output).

    ``source`` names the input in the message ("the data", a file name); ``hint`` says what to do instead.
    Call it from the ``accept`` callback of :class:`ResumableWriter`, which runs before the writer changes
    the file.
    """
    foreign = [k for k in done if k not in known]
    if foreign:
        raise DataError(f"{out}: holds {len(foreign)} id(s) that are not in {source} (e.g. {foreign[0]!r}); {hint}")


class ResumableWriter:
    """An append-only JSONL output whose rows are keyed by an id (see the module docstring).

    Opening it with ``resume=True`` reads what a previous run wrote: ``done`` maps each key to its record. A
    partly written last line (the process was killed while writing it) is cut off the file. With
    ``retry_errors=True`` the records for which ``is_error`` is true are removed (the file is rewritten
    atomically) so they run again. ``keep`` picks what ``done`` holds per key (default: the whole record;
    keep less for large corpora).
    """

    def __init__(
        self,
        path: str | Path,
        key: Callable[[Mapping[str, Any]], str],
        *,
        resume: bool = False,
        overwrite: bool = False,
        retry_errors: bool = False,
        is_error: Callable[[Mapping[str, Any]], bool] | None = None,
        keep: Callable[[dict[str, Any]], Any] | None = None,
        accept: Callable[[Mapping[str, Any]], None] | None = None,
        shape: Callable[[Mapping[str, Any]], bool] | None = None,
        fsync_interval: float = 0.5,
    ) -> None:
        self.path = Path(path)
        self.key = key
        self.shape = shape  # True for a record this command writes (its own fields), checked on every line
        self.keep = keep or (lambda r: r)
        self.fsync_interval = fsync_interval
        self.done: dict[str, Any] = {}
        self.dropped_partial = 0
        self.retried = 0
        exists = self.path.exists() and self.path.stat().st_size > 0
        if exists and not resume and not overwrite:
            raise OutputExistsError(
                f"{self.path} exists; pass --resume to continue that run, or --overwrite to start again"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if exists and resume:
            cut, cut_key = self._load()
            if accept is not None:  # e.g. "these are this input's ids": raises before the file is changed
                accept(self.done if cut_key is None else {**self.done, cut_key: None})
            if cut is not None:
                self._truncate(cut)
            if retry_errors and is_error is not None:
                self._drop_errors(is_error)
        mode = "a" if resume else "w"
        self._f: IO[str] = open(self.path, mode, encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._last_sync = time.monotonic()
        self.written = 0

    def _record_key(self, record: Any) -> str:
        """The key of one of this command's records; KeyError (or TypeError) for anything else."""
        if self.shape is not None and not (isinstance(record, dict) and self.shape(record)):
            raise KeyError("not the fields this command writes")
        return self.key(record)

    def _load(self) -> tuple[int | None, str | None]:
        """Read the records of a file to resume (every whole line must be one of this command's). When its last
        line was cut by a kill: the offset to cut the file at (the caller cuts it, once the records are
        accepted) and the key of that line when it is a whole record without its line break."""
        with open(self.path, "rb") as f:
            data = f.read()
        end = data.rfind(b"\n") + 1
        self._read_records(data[:end])  # every whole line first: the file may not be this command's output
        if end == len(data):
            return None, None
        tail = data[end:]
        if not tail.lstrip().startswith(b"{"):
            raise DataError(
                f"{self.path}: its last line is not a record of this command; is this the output of another "
                "run? Use another output file or --overwrite"
            )
        try:
            whole = json.loads(tail)
        except ValueError:
            whole = None  # cut by a kill mid-record
        cut_key: str | None = None
        if whole is not None:
            try:  # a whole record whose line break a kill cut off (the kernel copies a write page by page)
                cut_key = self._record_key(whole)
            except (KeyError, TypeError, ValueError):
                raise DataError(
                    f"{self.path}: its last line has no line break and is not a record of this command; is this "
                    "the output of another run? Use another output file or --overwrite"
                ) from None
        # the last line was cut by a kill: it is dropped and its row checked again
        self.dropped_partial = 1
        return end, cut_key

    def _truncate(self, end: int) -> None:
        with open(self.path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())

    def _read_records(self, data: bytes) -> None:
        for line_no, raw in enumerate(data.splitlines(), 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
                k = self._record_key(record)
            except (ValueError, KeyError, TypeError) as exc:
                raise DataError(
                    f"{self.path}: line {line_no} is not a record of this command ({exc}); "
                    "is this the output of another run? Use another output file or --overwrite"
                ) from None
            if k in self.done:
                raise DataError(f"{self.path}: line {line_no}: id {k!r} appears twice; the file was edited?")
            self.done[k] = self.keep(record)

    def _drop_errors(self, is_error: Callable[[Mapping[str, Any]], bool]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        dropped: list[str] = []
        with open(self.path, "rb") as src, open(tmp, "wb") as dst:
            for raw in src:
                if not raw.strip():
                    continue
                record = json.loads(raw)
                if is_error(record):
                    dropped.append(self.key(record))
                else:
                    dst.write(raw)
            dst.flush()
            os.fsync(dst.fileno())
        if not dropped:
            tmp.unlink()
            return
        os.replace(tmp, self.path)
        for k in dropped:
            del self.done[k]
        self.retried = len(dropped)

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one record (one line), flush it to the OS, fsync when the interval has passed."""
        self._f.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        self._f.flush()
        self.written += 1
        now = time.monotonic()
        if now - self._last_sync >= self.fsync_interval:
            os.fsync(self._f.fileno())
            self._last_sync = now

    def close(self) -> None:
        """Flush, fsync and close."""
        if self._f.closed:
            return
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def __enter__(self) -> ResumableWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ===================================================================== worker pool


async def run_pool(
    items: Iterable[T],
    work: Callable[[T], Awaitable[dict[str, Any]]],
    write: Callable[[dict[str, Any]], None],
    *,
    concurrency: int,
    window: int | None = None,
) -> int:
    """Run ``work`` on every item with ``concurrency`` workers and ``write`` the results in input order.

    At most ``window`` items (default ``4 × concurrency``) are in flight or waiting in the reorder buffer, so
    memory stays bounded however long the input is. ``work`` should not raise; if it does, the pool stops and
    the exception propagates (the results written so far stay written). Returns the number written.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    window = max(window or 4 * concurrency, concurrency)
    slots = asyncio.Semaphore(window)
    queue: asyncio.Queue[tuple[int, T] | None] = asyncio.Queue(maxsize=concurrency)
    finished: dict[int, dict[str, Any]] = {}
    next_seq = 0

    def drain() -> None:
        nonlocal next_seq
        while next_seq in finished:
            write(finished.pop(next_seq))
            next_seq += 1
            slots.release()

    async def producer() -> None:
        for seq, item in enumerate(items):
            await slots.acquire()
            await queue.put((seq, item))
        for _ in range(concurrency):
            await queue.put(None)

    async def worker() -> None:
        while True:
            got = await queue.get()
            if got is None:
                return
            seq, item = got
            finished[seq] = await work(item)
            drain()

    tasks = [asyncio.ensure_future(producer())] + [asyncio.ensure_future(worker()) for _ in range(concurrency)]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return next_seq


def run_sync(factory: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion from sync code, also when an event loop is already running in this
    thread (Jupyter): then it runs on a fresh loop in a worker thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_await(factory))
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="flexguard-eval") as pool:
        return pool.submit(lambda: asyncio.run(_await(factory))).result()


async def _await(factory: Callable[[], Awaitable[T]]) -> T:
    return await factory()


# ===================================================================== evaluation records


@dataclass(frozen=True, slots=True)
class EvalRecord:
    """One evaluated row: the labels of the example and the guard's verdict on it."""

    id: str | int
    row: int
    verdict: Verdict
    label: bool | None = None
    severity: int | None = None
    categories: tuple[Category, ...] = ()
    split: str | None = None
    mode: str = "prompt"

    @property
    def key(self) -> str:
        """The id as a string."""
        return str(self.id)

    @property
    def ok(self) -> bool:
        """True when the guard gave a verdict (no error)."""
        return self.verdict.error is None

    @property
    def score(self) -> float:
        """The verdict's risk score (meaningless when not ``ok``)."""
        return self.verdict.risk_score

    @property
    def surface(self) -> Surface:
        """PROMPT or RESPONSE, from the moderation mode."""
        return Surface.RESPONSE if self.mode == "response" else Surface.PROMPT

    def positive(self, strictness: str) -> bool:
        """Labelled unsafe under ``strictness`` (severity ≥ 1/2/3, or the binary label)."""
        if self.severity is not None:
            return self.severity >= MIN_SEVERITY[strictness]
        return bool(self.label)

    def to_dict(self) -> dict[str, Any]:
        """The saved form (one line of the verdicts file)."""
        return {
            "id": self.id,
            "row": self.row,
            "mode": self.mode,
            "label": self.label,
            "severity": self.severity,
            "categories": [c.value for c in self.categories],
            "split": self.split,
            "verdict": self.verdict.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvalRecord:
        """Read one saved line back; ValueError naming a field that is not what ``to_dict`` writes."""
        label, severity = data.get("label"), data.get("severity")
        if label is not None and not isinstance(label, bool):
            raise ValueError(f"label {label!r} is not true, false or null")
        if severity is not None and (isinstance(severity, bool) or not isinstance(severity, int)):
            raise ValueError(f"severity {severity!r} is not a tier 0-4 or null")
        if severity is not None and not 0 <= severity <= 4:
            raise ValueError(f"severity {severity!r} is out of range 0-4")
        if not isinstance(data["verdict"], Mapping) or "risk_score" not in data["verdict"]:
            raise ValueError("the verdict has no risk_score")
        return cls(
            id=data["id"],
            row=int(data["row"]),
            verdict=verdict_from_dict(data["verdict"]),
            label=label,
            severity=severity,
            categories=tuple(Category(c) for c in data.get("categories") or ()),
            split=data.get("split"),
            mode=data.get("mode") or "prompt",
        )


def verdict_from_dict(data: Mapping[str, Any]) -> Verdict:
    """The inverse of :meth:`Verdict.to_dict`."""
    fields = set(Verdict.__dataclass_fields__)
    kwargs = {k: v for k, v in data.items() if k in fields}
    kwargs["categories"] = tuple(Category(c) for c in kwargs.get("categories") or ())
    kwargs["native_categories"] = tuple(kwargs.get("native_categories") or ())
    surface = kwargs.get("surface")
    kwargs["surface"] = Surface(surface) if surface else None
    kwargs["risk_score"] = float(kwargs.get("risk_score", 100.0))
    return Verdict(**kwargs)


def load_records(path: str | Path) -> list[EvalRecord]:
    """Every record of a verdicts file written by ``flexguard eval``. A last line cut by a kill (no line break,
    not readable) is ignored, with a warning; a whole last record without its line break is read."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    out: list[EvalRecord] = []
    seen: dict[str, int] = {}
    data = path.read_bytes()
    lines = data.splitlines()
    if data and not data.endswith(b"\n"):
        try:
            json.loads(lines[-1])
        except ValueError:
            logger.warning("%s: its last line was cut off (a killed run?); it is left out", path)
            lines = lines[:-1]
    for line_no, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            record = EvalRecord.from_dict(json.loads(raw))
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{path}: line {line_no}: not a verdict record of `flexguard eval` ({exc})") from None
        if record.key in seen:
            raise DataError(f"{path}: line {line_no}: id {record.id!r} appears twice (also line {seen[record.key]})")
        seen[record.key] = line_no
        out.append(record)
    if not out:
        raise DataError(f"{path}: no verdict records")
    return out


async def _verdict_of(guard: Guard, ex: Example) -> Verdict:
    try:
        return await guard.averdict(ex.text, ex.response)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # bad input or an unexpected failure: the row records it, the run goes on
        return Verdict.failed(f"{type(exc).__name__}: {exc}"[:500])


def evaluate(
    guard: Guard,
    examples: Sequence[Example],
    out: str | Path,
    *,
    concurrency: int = 16,
    resume: bool = False,
    overwrite: bool = False,
    retry_errors: bool = False,
    progress: Progress | None = None,
) -> list[EvalRecord]:
    """Get the guard's verdict on every example, saving each to ``out`` (resumable); the records in input order."""
    by_key = {ex.key: ex for ex in examples}

    def same_data(done: Mapping[str, Any]) -> None:  # before the writer changes anything in the file
        refuse_foreign_ids(
            out,
            done,
            by_key,
            "the data",
            "it is the output of another data file (or of a run without --limit): use another --out or --overwrite",
        )

    with ResumableWriter(
        out,
        key=lambda r: str(r["id"]),
        resume=resume,
        overwrite=overwrite,
        retry_errors=retry_errors,
        is_error=lambda r: bool((r.get("verdict") or {}).get("error")),
        accept=same_data,
        shape=lambda r: "id" in r and isinstance(r.get("verdict"), dict),
    ) as writer:
        pending = [ex for ex in examples if ex.key not in writer.done]
        if progress is not None:
            progress.skipped = len(examples) - len(pending)

        async def work(ex: Example) -> dict[str, Any]:
            verdict = await _verdict_of(guard, ex)
            record = EvalRecord(
                id=ex.id,
                row=ex.row,
                verdict=verdict,
                label=ex.label,
                severity=ex.severity,
                categories=ex.categories,
                split=ex.split,
                mode="response" if ex.response is not None else "prompt",
            )
            return record.to_dict()

        def write(record: dict[str, Any]) -> None:
            writer.write(record)
            writer.done[str(record["id"])] = record
            if progress is not None:
                progress.update(errors=1 if record["verdict"].get("error") else 0)

        async def main() -> None:
            try:
                await run_pool(pending, work, write, concurrency=concurrency)
            finally:
                await guard.transport.aclose()

        try:
            run_sync(main)
        finally:
            if progress is not None:
                progress.close()
        return [EvalRecord.from_dict(writer.done[ex.key]) for ex in examples]


# ===================================================================== report


def preset_policies() -> dict[str, StrictnessPolicy]:
    """The three preset policies (thresholds 21 / 41 / 61)."""
    return {s: StrictnessPolicy.from_preset(s) for s in STRICTNESS}


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None or math.isnan(x) else round(x, digits)


@dataclass
class StrictnessResult:
    """Metrics of one strictness (one policy against one positive class)."""

    name: str
    positive: str
    policy: StrictnessPolicy
    confusion: Confusion
    errors: int
    auroc: float | None
    auprc: float | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        c = self.confusion
        return {
            "strictness": self.name,
            "positive": self.positive,
            "threshold": self.policy.base_threshold(),
            "category_thresholds": {k.value: v for k, v in self.policy.thresholds.items()},
            **{k: _round(v) if isinstance(v, float) else v for k, v in c.as_dict().items()},
            "errors_counted_unsafe": self.errors,
            "auroc": _round(self.auroc),
            "auprc": _round(self.auprc),
        }


@dataclass
class CategoryResult:
    """For one category: does the guard name it when the label does, and how much of it each strictness flags."""

    category: Category
    confusion: Confusion
    flagged: dict[str, float | None] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "category": self.category.value,
            **{k: _round(v) if isinstance(v, float) else v for k, v in self.confusion.as_dict().items()},
            "labelled": self.confusion.positives,
            "named": self.confusion.tp + self.confusion.fp,
            "recall_by_strictness": {k: _round(v) for k, v in self.flagged.items()},
        }


@dataclass
class EvalReport:
    """Everything ``flexguard eval`` prints."""

    n: int
    errors: int
    prompts: int
    responses: int
    label_kind: str
    strictness: list[StrictnessResult]
    categories: list[CategoryResult]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "n": self.n,
            "errors": self.errors,
            "prompts": self.prompts,
            "responses": self.responses,
            "labels": self.label_kind,
            "strictness": [s.as_dict() for s in self.strictness],
            "categories": [c.as_dict() for c in self.categories],
        }


def _positive_text(name: str, kind: str) -> str:
    if kind == "binary":
        return "label"
    return f"severity>={MIN_SEVERITY[name]}"


def build_report(
    records: Sequence[EvalRecord],
    policies: Mapping[str, StrictnessPolicy] | None = None,
    *,
    extra: Mapping[str, StrictnessPolicy] | None = None,
) -> EvalReport:
    """Metrics per strictness (and per extra policy, whose positive class follows its preset) and per category.

    A row whose verdict failed counts as predicted unsafe (fail-closed) and is left out of AUROC / AUPRC.
    """
    if not records:
        raise ValueError("no records to report on")
    policies = dict(policies or preset_policies())
    has_sev = any(r.severity is not None for r in records)
    has_bin = any(r.severity is None for r in records)
    kind = "severity" if has_sev and not has_bin else ("binary" if has_bin and not has_sev else "mixed")
    errors = sum(1 for r in records if not r.ok)
    ok = [r for r in records if r.ok]
    rows: list[tuple[str, str, StrictnessPolicy]] = [(s, s, policies[s]) for s in STRICTNESS if s in policies]
    for name, pol in (extra or {}).items():
        rows.append((name, pol.preset, pol))
    results: list[StrictnessResult] = []
    for name, level, pol in rows:
        labels = [r.positive(level) for r in records]
        predicted = [(not r.ok) or pol.is_over(r.verdict, r.surface) for r in records]
        scores = [r.score for r in ok]
        ok_labels = [r.positive(level) for r in ok]
        results.append(
            StrictnessResult(
                name=name,
                positive=_positive_text(level, kind),
                policy=pol,
                confusion=confusion(labels, predicted),
                errors=errors,
                auroc=auroc(scores, ok_labels),
                auprc=average_precision(scores, ok_labels),
            )
        )
    cat_results: list[CategoryResult] = []
    if any(r.categories for r in records):
        seen = {c for r in records for c in r.categories} | {c for r in ok for c in r.verdict.categories}
        for cat in [c for c in Category if c in seen]:
            truth = [cat in r.categories for r in ok]
            named = [cat in r.verdict.categories for r in ok]
            flagged: dict[str, float | None] = {}
            labelled = [r for r in records if cat in r.categories]
            for name, _, pol in rows:
                hits = sum(1 for r in labelled if (not r.ok) or pol.is_over(r.verdict, r.surface))
                flagged[name] = hits / len(labelled) if labelled else None
            cat_results.append(CategoryResult(cat, confusion(truth, named), flagged))
    return EvalReport(
        n=len(records),
        errors=errors,
        prompts=sum(1 for r in records if r.mode == "prompt"),
        responses=sum(1 for r in records if r.mode == "response"),
        label_kind=kind,
        strictness=results,
        categories=cat_results,
    )


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def format_report(report: EvalReport) -> str:
    """The report as aligned plain-text tables."""
    lines = [
        f"{report.n} rows ({report.prompts} prompts, {report.responses} responses); labels: {report.label_kind}",
    ]
    if report.errors:
        lines.append(
            f"guard errors: {report.errors} (counted as predicted unsafe, fail-closed; left out of AUROC/AUPRC)"
        )
    else:
        lines.append("guard errors: 0")
    lines.append("")
    head = ("strictness", "threshold", "positive", "n", "pos", "TP", "FP", "FN", "TN", "precision", "recall", "F1",
            "FPR", "AUROC", "AUPRC")  # fmt: skip
    table: list[tuple[str, ...]] = [head]
    for s in report.strictness:
        c = s.confusion
        thr = f"{s.policy.base_threshold():g}" + ("*" if s.policy.thresholds else "")
        table.append(
            (s.name, thr, s.positive, str(c.n), str(c.positives), str(c.tp), str(c.fp), str(c.fn), str(c.tn),
             _f(c.precision), _f(c.recall), _f(c.f1), _f(c.fpr), _f(s.auroc), _f(s.auprc))
        )  # fmt: skip
    lines += _align(table)
    if any(s.policy.thresholds for s in report.strictness):
        lines.append("  * plus per-category thresholds")
    if report.categories:
        names = [s.name for s in report.strictness]
        lines += ["", "per category (labelled category vs the category the guard named; recall = share flagged):"]
        ctable: list[tuple[str, ...]] = [
            ("category", "labelled", "named", "TP", "FP", "FN", "precision", "recall", "F1",
             *(f"flagged@{n}" for n in names))
        ]  # fmt: skip
        for cr in report.categories:
            c = cr.confusion
            ctable.append(
                (cr.category.value, str(c.positives), str(c.tp + c.fp), str(c.tp), str(c.fp), str(c.fn),
                 _f(c.precision), _f(c.recall), _f(c.f1), *(_f(cr.flagged.get(n)) for n in names))
            )  # fmt: skip
        lines += _align(ctable)
    return "\n".join(lines)


def _align(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
