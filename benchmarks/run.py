"""Run every benchmark against one emulated guard server and write the results as JSON.

    python -m benchmarks.run [--quick] [--json OUT] [--only overhead,throughput,latency,cache,profile] [--plot-dir DIR]

The client pins itself to one core (``--client-core``, default 0; the call behind ``taskset -c 0``) and starts
``python -m flexguard_integrations.testing --port 0`` under ``taskset -c 1`` (``--server-core``), waits for
``/health``, runs the sections, prints their tables and stops the server. Measurements disturbed by other
processes (more than ``--max-foreign`` % of a core) are repeated after the machine calms down.

The full run takes about 10 minutes on a 2-core VM; ``--quick`` about 1–2 minutes (fewer requests, one round).
A full (not ``--quick``) run ends by plotting its throughput and overhead results (``benchmarks.plot``) into
``--plot-dir`` (default ``docs/img``); ``--no-plot`` skips that.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import cache, overhead, plot, profile_guard, throughput
from ._common import (
    Section,
    ServerProcess,
    Settings,
    current_affinity,
    machine_info,
    prepare_process,
    targets_table,
    wait_quiet,
)

SECTIONS: tuple[str, ...] = ("overhead", "throughput", "latency", "cache", "profile")
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "latest.json"


def _run_section(name: str, base_url: str, settings: Settings, server_core: int | None = 1) -> Section:
    if name == "overhead":
        return overhead.run(base_url, settings)
    if name == "throughput":
        return throughput.run(base_url, settings)
    if name == "latency":  # its own server, answering in 50 ms like a guard model on a GPU
        with ServerProcess(core=server_core, extra_args=["--latency", str(throughput.GUARD_LATENCY_S)]) as slow:
            return throughput.run_latency(slow.base_url, replace(settings, server_pid=slow.pid))
    if name == "cache":
        return cache.run(base_url, settings)
    if name == "profile":
        return profile_guard.run(base_url, settings.quick)
    raise ValueError(f"unknown section {name!r}; choose from {', '.join(SECTIONS)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests and rounds (about a minute or two)")
    parser.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, help=f"where to write results (default {DEFAULT_JSON})"
    )
    parser.add_argument("--markdown", type=Path, default=None, help="also write the printed tables to this file")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections to run")
    parser.add_argument("--client-core", type=int, default=0)
    parser.add_argument("--server-core", type=int, default=1)
    parser.add_argument(
        "--max-foreign",
        type=float,
        default=15.0,
        help="repeat a measurement when other processes used more than this %% of a core",
    )
    parser.add_argument(
        "--attempts", type=int, default=None, help="tries per disturbed measurement (3; 1 with --quick)"
    )
    parser.add_argument("--quiet-wait", type=float, default=60.0, help="seconds to wait for quiet before a retry")
    parser.add_argument(
        "--plot-dir",
        type=Path,
        default=plot.DEFAULT_OUT,
        help=f"where a full run writes its SVG plots (default {plot.DEFAULT_OUT})",
    )
    parser.add_argument("--no-plot", action="store_true", help="do not plot (a --quick run never plots)")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    for s in sections:
        if s not in SECTIONS:
            parser.error(f"unknown section {s!r}; choose from {', '.join(SECTIONS)}")

    started = time.time()
    machine = machine_info()
    pinned = prepare_process(args.client_core)
    print(
        f"machine: {machine['cpu']} ({machine['nproc']} CPUs, {machine['hypervisor'] or 'bare metal'}), "
        f"Python {machine['python']}; client on cores {current_affinity()}" + ("" if pinned else " (NOT pinned)"),
        flush=True,
    )
    results: dict[str, Any] = {}
    rendered: list[str] = []
    all_targets: list[Any] = []
    with ServerProcess(core=args.server_core) as server:
        print(f"server: {' '.join(server.command)} → {server.base_url}", flush=True)
        settings = Settings(
            quick=args.quick,
            server_pid=server.pid,
            max_foreign=args.max_foreign,
            attempts=args.attempts or (1 if args.quick else 3),
            quiet_wait=args.quiet_wait,
        )
        waited = wait_quiet(60.0)
        if waited > 1.5:
            print(f"waited {waited:.0f} s for the machine to be quiet", flush=True)
        for name in sections:
            t0 = time.time()
            print(f"\n… {name}", flush=True)
            section = _run_section(name, server.base_url, settings, args.server_core)
            text = section.render()
            print(text, flush=True)
            rendered.append(text)
            results[name] = {**section.as_dict(), "seconds": time.time() - t0}
            all_targets.extend(section.targets)
        server_info = {"command": server.command, "pinned": server.pinned, "base_url": server.base_url}

    summary = "## All targets\n\n" + targets_table(all_targets) if all_targets else ""
    if summary:
        print(summary)
        rendered.append(summary)
    doc = {
        "started": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
        "duration_s": time.time() - started,
        "command": [
            os.path.basename(sys.executable),
            "-m",
            "benchmarks.run",
            *(argv if argv is not None else sys.argv[1:]),
        ],
        "quick": args.quick,
        "machine": machine,
        "client": {"core": args.client_core, "pinned": pinned, "affinity": current_affinity()},
        "server": server_info,
        "max_foreign_load_pct": args.max_foreign,
        "sections": results,
        "targets": [t.as_dict() for t in all_targets],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"\nresults written to {args.json}")
    if args.markdown:
        args.markdown.write_text("\n".join(rendered))
        print(f"tables written to {args.markdown}")
    if not args.quick and not args.no_plot:
        try:
            written = plot.plot(json.loads(args.json.read_text()), args.plot_dir)
        except ImportError as exc:
            print(f"no plots: {exc} (matplotlib is in the dev dependency group: make setup)")
        else:
            for path in written:
                print(f"plot written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
