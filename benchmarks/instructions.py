"""Diagnostic (not part of ``benchmarks.run``): CPU instructions per check at two concurrency levels, under callgrind.

Checks per second on a shared VM drift by 20% from one round to the next, which is as much as the fall from
c=64 to c=256 this is meant to explain. The number of instructions the client executes per check hardly drifts:
this runs each client under valgrind's callgrind twice, for a small and a large number of checks after the same
warm-up, and divides the difference by the difference in checks, so start-up and warm-up cancel out. It splits
the result into the garbage collector (the inclusive cost of CPython's ``gc_collect_main``) and everything
else. If the instructions per check stay flat while the wall-clock throughput falls, the fall is the same work
running slower (caches, memory), not more work; if only the collector's share grows, it is the collector.

Under valgrind the client runs ~50 times slower, so the emulated server (on its own core, at full speed) always
answers at once. How often the collector runs depends on how requests interleave, so its share varies a little
between runs; the rest is stable to about 1%.

    python -m benchmarks.instructions [--kinds raw_aiohttp,guard_aiohttp] [--levels 64,256] [--checks 500,2500]

Kinds are the clients of ``benchmarks._common.open_client`` (``raw_httpx``, ``guard_httpx``, ``raw_aiohttp``,
``guard_aiohttp``, ``guard_aiohttp_c64``...): each gets a pool sized to the number of callers, except the
fixed-concurrency diagnostics (``guard_httpx_c64``, ``guard_aiohttp_c64``), whose callers beyond 64 queue on
Guard's semaphore. Needs ``valgrind`` and ``callgrind_annotate`` on the PATH. About 3 minutes per client run on
an aiohttp client, 6 on httpx: the default 2 kinds x 2 levels x 2 sizes take about 25 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ._common import BenchmarkError, open_client, run_workers

WARMUP = 600
"""Checks before the counted ones: connections opened, caches and the parser's memo filled."""

_TOTAL = re.compile(r"^\s*([\d,]+)\s+(?:\(\s*[\d.]+%\)\s+)?PROGRAM TOTALS", re.MULTILINE)
_GC = re.compile(r"^\s*([\d,]+)\s+(?:\(\s*[\d.]+%\)\s+)?\S*?gc_collect_main\s", re.MULTILINE)


def child(kind: str, base_url: str, callers: int, checks: int) -> None:
    """The measured process: warm up, collect, then ``checks`` checks by ``callers`` workers."""

    async def main() -> None:
        async with open_client(kind, base_url, callers) as call:
            await run_workers(call, callers, WARMUP)
            gc.collect()
            batch = await run_workers(call, callers, checks)
            if batch.errors:
                raise BenchmarkError(f"{kind}: {batch.errors} failed checks, first: {batch.first_error}")

    asyncio.run(main())


def parse_annotate(text: str) -> tuple[int, int]:
    """(program total, the collector's inclusive total) from ``callgrind_annotate --inclusive=yes`` output
    (``--threshold=100``, so that a collector below the default 0.1% still gets its line)."""
    total = _TOTAL.search(text)
    if total is None:
        raise BenchmarkError("callgrind_annotate printed no PROGRAM TOTALS line")
    collector = _GC.search(text)  # absent when the collector never ran
    return int(total.group(1).replace(",", "")), int(collector.group(1).replace(",", "")) if collector else 0


def count(kind: str, base_url: str, callers: int, checks: int, workdir: Path) -> tuple[int, int]:
    """Instructions of one child run under callgrind: (total, in the collector)."""
    out = workdir / f"callgrind.{kind}.{callers}.{checks}"
    cmd = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out}",
        sys.executable,
        "-m",
        "benchmarks.instructions",
        "--child",
        kind,
        base_url,
        str(callers),
        str(checks),
    ]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    if proc.returncode != 0:
        raise BenchmarkError(f"{kind} at {callers} callers failed under valgrind:\n{proc.stderr[-2000:]}")
    annotated = subprocess.run(
        ["callgrind_annotate", "--inclusive=yes", "--threshold=100", str(out)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    out.unlink()
    return parse_annotate(annotated)


def measure(kinds: list[str], levels: list[int], sizes: tuple[int, int], base_url: str) -> list[dict[str, Any]]:
    small, large = sizes
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="flexguard-callgrind-") as tmp:
        for kind in kinds:
            for callers in levels:
                started = time.time()
                t_small, gc_small = count(kind, base_url, callers, small, Path(tmp))
                t_large, gc_large = count(kind, base_url, callers, large, Path(tmp))
                per = (t_large - t_small) / (large - small)
                per_gc = max(0, gc_large - gc_small) / (large - small)
                rows.append(
                    {
                        "kind": kind,
                        "callers": callers,
                        "instructions_per_check": per,
                        "collector_per_check": per_gc,
                        "rest_per_check": per - per_gc,
                        "seconds": time.time() - started,
                    }
                )
                print(
                    f"  {kind} at {callers} callers: {per / 1e3:,.0f}k per check, collector {per_gc / 1e3:,.1f}k",
                    flush=True,
                )
    return rows


def render(rows: list[dict[str, Any]], levels: list[int]) -> str:
    from ._common import table

    lines = [
        table(
            ("client", "callers", "instructions/check", "collector", "the rest"),
            [
                (
                    r["kind"],
                    r["callers"],
                    f"{r['instructions_per_check'] / 1e3:,.0f}k",
                    f"{r['collector_per_check'] / 1e3:,.1f}k",
                    f"{r['rest_per_check'] / 1e3:,.0f}k",
                )
                for r in rows
            ],
        )
    ]
    if len(levels) >= 2:
        lo, hi = levels[0], levels[-1]
        by = {(r["kind"], r["callers"]): r for r in rows}
        ratios = []
        for kind in dict.fromkeys(r["kind"] for r in rows):
            a, b = by.get((kind, lo)), by.get((kind, hi))
            if a and b:
                ratios.append(
                    (
                        kind,
                        f"{b['instructions_per_check'] / a['instructions_per_check']:.3f}x",
                        f"{b['rest_per_check'] / a['rest_per_check']:.3f}x",
                        f"{(b['collector_per_check'] - a['collector_per_check']) / 1e3:+,.1f}k",
                    )
                )
        lines.append(f"\nFrom {lo} to {hi} callers:\n")
        lines.append(table(("client", "instructions/check", "without the collector", "collector"), ratios))
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
        return
    from ._common import ServerProcess, prepare_process
    from .agent_step import machine, write_json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default="raw_aiohttp,guard_aiohttp")
    parser.add_argument("--levels", default="64,256")
    parser.add_argument("--checks", default="500,2500", help="the small and the large number of counted checks")
    parser.add_argument("--json", default="instructions")
    args = parser.parse_args()
    for tool in ("valgrind", "callgrind_annotate"):
        if shutil.which(tool) is None:
            raise SystemExit(f"benchmarks.instructions needs {tool} on the PATH (apt install valgrind)")
    kinds = [k for k in args.kinds.split(",") if k]
    levels = [int(x) for x in args.levels.split(",") if x]
    small, large = (int(x) for x in args.checks.split(","))
    if not 0 < small < large:
        raise SystemExit(f"--checks needs two counts, the first smaller: got {args.checks!r}")
    prepare_process(0)
    started = time.time()
    with ServerProcess(core=1) as server:
        rows = measure(kinds, levels, (small, large), server.base_url)
    text = render(rows, levels)
    print(f"\n## Instructions per check under callgrind ({small:,} and {large:,} checks after {WARMUP} of warm-up)\n")
    print(text)
    path = write_json(args.json, {"machine": machine(), "options": vars(args), "results": rows})
    print(f"\n({time.time() - started:.0f} s; {path})")


if __name__ == "__main__":
    main()
