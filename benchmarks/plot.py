"""Plots of a ``benchmarks.run`` result: throughput against concurrency, and the overhead at concurrency 1.

    python -m benchmarks.plot [results.json] [--out docs/img]

Reads the JSON ``benchmarks.run`` writes (default ``benchmarks/results/latest.json``) and writes two SVGs:

- ``bench-throughput.svg``: successful checks/s (log scale) against concurrency for each client of the issue,
  with the raw-socket client (the emulated server's ceiling) dashed;
- ``bench-overhead.svg``: p50 and p99 latency per call at concurrency 1 for each client.

Both are titled with the commit, the machine and the date of the run. The files are byte-for-byte reproducible
from the same JSON (fixed ``svg.hashsalt``, no date in the SVG metadata). Clients missing from the JSON (an
older run without ChatOpenAI, say) and missing sections are skipped. ``benchmarks.run`` calls this at the end
of a full run.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from ._common import CLIENTS, LABELS

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "latest.json"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "img"
THROUGHPUT_SVG = "bench-throughput.svg"
OVERHEAD_SVG = "bench-overhead.svg"
CEILING = "raw_socket"

COLORS: dict[str, str] = {
    "raw_httpx": "#1f77b4",
    "guard_httpx": "#aec7e8",
    "raw_aiohttp": "#2ca02c",
    "guard_aiohttp": "#98df8a",
    "openai": "#d62728",
    "langchain_openai": "#9467bd",
    CEILING: "#7f7f7f",
}
"""One colour per client in both plots: a raw client dark, Guard on the same HTTP library light."""


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.hashsalt": "flexguard-benchmarks", "svg.fonttype": "path", "font.size": 9})
    return plt


def _label(kind: str, entry: dict[str, Any] | None = None) -> str:
    return str((entry or {}).get("label") or LABELS.get(kind, kind))


def describe_run(doc: dict[str, Any]) -> str:
    """``commit 968befa · AMD EPYC, 2 CPUs (KVM) · Python 3.11.7 · 2026-11-23``, from the JSON."""
    machine = doc.get("machine") or {}
    parts = []
    if machine.get("git_commit"):
        parts.append(f"commit {machine['git_commit']}")
    cpu = machine.get("cpu") or "unknown CPU"
    hypervisor = machine.get("hypervisor")
    parts.append(f"{cpu}, {machine.get('nproc', '?')} CPUs" + (f" ({hypervisor})" if hypervisor else ""))
    if machine.get("python"):
        parts.append(f"{machine.get('implementation', 'Python')} {machine['python']}")
    if doc.get("started"):
        parts.append(str(doc["started"])[:10])
    if doc.get("quick"):
        parts.append("QUICK run (smoke figures)")
    return " · ".join(parts)


def _section(doc: dict[str, Any], name: str) -> dict[str, Any] | None:
    section = (doc.get("sections") or {}).get(name)
    return section.get("results") if isinstance(section, dict) else None


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def plot_throughput(doc: dict[str, Any], out: Path) -> Path | None:
    """Checks/s against concurrency, one line per client; None when the JSON has no throughput section."""
    results = _section(doc, "throughput")
    levels_data: dict[str, dict[str, Any]] = (results or {}).get("levels") or {}
    if not levels_data:
        return None
    levels = sorted(int(lv) for lv in levels_data)
    plt = _pyplot()
    from matplotlib import ticker

    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    for kind in (*CLIENTS, CEILING):
        points = [(lv, levels_data[str(lv)].get(kind)) for lv in levels]
        points = [(lv, e) for lv, e in points if e is not None and _finite(e.get("rate"))]
        if not points:
            continue
        label = _label(kind, points[0][1])
        flawed = [lv for lv, e in points if e.get("capped") or e.get("errors")]
        if flawed:
            label += f" (capped or failed at c={', '.join(map(str, flawed))})"
        ax.plot(
            [lv for lv, _ in points],
            [e["rate"] for _, e in points],
            marker="s" if kind.startswith("guard_") else "o",
            markersize=4,
            linewidth=1.2 if kind == CEILING else 1.8,
            linestyle="--" if kind == CEILING else "-",
            color=COLORS.get(kind),
            label=label,
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(levels, [str(lv) for lv in levels])
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_minor_locator(ticker.NullLocator())
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _pos: f"{y:,.0f}"))
    ax.set_xlabel("concurrency (callers, one request in flight each)")
    ax.set_ylabel("successful checks/s, one client core (log scale)")
    ax.grid(True, which="major", linewidth=0.5, alpha=0.5)
    ax.set_title(f"Throughput against concurrency\n{describe_run(doc)}", fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _save(plt, fig, out / THROUGHPUT_SVG)


def plot_overhead(doc: dict[str, Any], out: Path) -> Path | None:
    """p50 and p99 per call at concurrency 1, two bars per client; None when the JSON has no overhead section."""
    results = _section(doc, "overhead")
    clients: dict[str, Any] = (results or {}).get("clients") or {}
    kinds = [k for k in CLIENTS if k in clients and _finite(clients[k].get("p50_us"))]
    if not kinds:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 0.55 * len(kinds) + 1.6))
    height = 0.38
    top = max(clients[k].get("p99_us") or clients[k]["p50_us"] for k in kinds)
    for i, kind in enumerate(kinds):
        entry = clients[kind]
        for offset, key, alpha, name in ((-height / 2, "p50_us", 1.0, "p50"), (height / 2, "p99_us", 0.45, "p99")):
            value = entry.get(key)
            if not _finite(value):
                continue
            ax.barh(
                i + offset,
                value,
                height=height,
                color=COLORS.get(kind),
                alpha=alpha,
                edgecolor="black",
                linewidth=0.4,
            )
            ax.text(value + top * 0.01, i + offset, f"{name} {value:,.0f}", va="center", fontsize=7.5)
    labels = []
    for kind in kinds:
        errors = clients[kind].get("errors") or 0
        labels.append(_label(kind, clients[kind]) + (f" ({errors:,} failed)" if errors else ""))
    ax.set_yticks(range(len(kinds)), labels)
    ax.invert_yaxis()
    ax.set_xlim(0, top * 1.15)
    ax.set_xlabel("latency per call at concurrency 1, µs (solid p50, pale p99; lower is better)")
    ax.grid(True, axis="x", linewidth=0.5, alpha=0.5)
    n = clients[kinds[0]].get("n")
    count = f", {n:,} calls per client" if isinstance(n, int) else ""
    ax.set_title(f"Overhead per check at concurrency 1{count}\n{describe_run(doc)}", fontsize=9)
    return _save(plt, fig, out / OVERHEAD_SVG)


def _save(plt: Any, fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    return path


def plot(doc: dict[str, Any], out: Path = DEFAULT_OUT) -> list[Path]:
    """Write every plot the results allow into ``out``; returns the files written."""
    written = [plot_throughput(doc, out), plot_overhead(doc, out)]
    return [p for p in written if p is not None]


def main(argv: list[str] | None = None) -> int:
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", type=Path, default=DEFAULT_JSON, help=f"default {DEFAULT_JSON}")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    doc = json.loads(args.results.read_text())
    written = plot(doc, args.out)
    if not written:
        print(f"{args.results}: no overhead or throughput results to plot")
        return 1
    for path in written:
        print(f"plot written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
