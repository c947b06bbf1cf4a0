"""Checks per second on one client core at concurrency 1, 16, 64 and 256.

At each level ``N`` workers share a fixed number of requests (one request in flight per worker), and every
client gets a pool (or Guard ``concurrency``) of ``N`` (the openai SDK and ChatOpenAI: ``max(N, 100)``, 100
being the SDK's default keep-alive pool): raw httpx, Guard on httpx (default), raw aiohttp, Guard on aiohttp,
the openai SDK, LangChain's ``ChatOpenAI``, plus a raw-socket client that shows the emulated server's ceiling.
Diagnostic Guard configurations (at c=64 and c=256) isolate costs found while profiling: a fixed
``concurrency`` whatever the load (16 or 64 on httpx, 64 on aiohttp: one deployed Guard under a rising load,
its semaphore queueing the callers beyond it) and aiohttp with the garbage collector disabled while measured
(what the collector's passes cost at high concurrency). Every measurement also records the time
spent in the collector and its collections per 1,000 checks (``gc.callbacks``), shown in their own table.

Each measurement has only its own client open (opened, warmed up, measured, closed), after a ``gc.collect()``:
other clients' pools and objects would otherwise sit in the same loop and heap and tax whoever is measured.

    python -m benchmarks.throughput [--quick] [--requests N] [--rounds R] [--levels 1,16,64,256]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
from typing import Any

from ._common import (
    CLIENTS,
    LABELS,
    Section,
    Settings,
    Target,
    measure,
    median,
    open_client,
    run_workers,
    summarize_ns,
    table,
)

LEVELS: tuple[int, ...] = (1, 16, 64, 256)
CEILING = ("raw_socket",)
DIAGNOSTIC = ("guard_httpx_c16", "guard_httpx_c64", "guard_aiohttp_c64", "guard_aiohttp_nogc")


def plan(quick: bool) -> dict[str, int]:
    """Requests per measurement, rounds per level, and the time cap of one measurement (seconds)."""
    return (
        {"requests": 300, "rounds": 1, "max_seconds": 15}
        if quick
        else {"requests": 3000, "rounds": 3, "max_seconds": 60}
    )


def _kinds(level: int, quick: bool) -> tuple[str, ...]:
    if quick:
        return CEILING + CLIENTS
    diagnostic = DIAGNOSTIC if level >= 64 else ()
    return CEILING + CLIENTS + diagnostic


async def _level(
    base_url: str,
    level: int,
    requests: int,
    rounds: int,
    max_seconds: float,
    settings: Settings,
    kinds: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    kinds = kinds or _kinds(level, settings.quick)
    out: dict[str, Any] = {}
    measured: dict[str, list[Any]] = {k: [] for k in kinds}
    for r in range(rounds):
        order = kinds[r % len(kinds) :] + kinds[: r % len(kinds)]
        for kind in order:
            gc.collect()  # the previous client's garbage is not this one's to collect
            no_gc = kind == "guard_aiohttp_nogc"
            async with open_client(kind, base_url, level) as call:
                await run_workers(call, level, max(level, 20), max_seconds)  # open the pool's connections
                if no_gc:
                    gc.disable()  # a diagnostic only: what the same client does without the collector's passes
                try:
                    measured[kind].append(await measure(call, level, requests, settings, max_seconds))
                finally:
                    if no_gc:
                        gc.enable()
    for kind in kinds:
        ms = measured[kind]
        rates = [m.rate for m in ms]
        lat = summarize_ns(x for m in ms for x in m.latencies_ns)
        out[kind] = {
            "label": LABELS[kind],
            "rate": median(rates),
            "rates": rates,
            "p50_us": lat["p50_us"],
            "p99_us": lat["p99_us"],
            "foreign_load_pct": [m.load["foreign"] for m in ms],
            "client_cpu_pct": [m.load["client"] for m in ms],
            "server_cpu_pct": [m.load["server"] for m in ms],
            "attempts": [m.attempts for m in ms],
            "gc_pct": median([100.0 * m.gc_share for m in ms]),
            "gc_collections_per_1000": [
                [round(1000.0 * c / max(1, m.batch.completed), 1) for c in m.gc.get("collections", [0, 0, 0])]
                for m in ms
            ],
            "completed": [m.batch.completed for m in ms],
            "capped": any(m.batch.capped for m in ms),
            "errors": sum(m.batch.errors for m in ms),
            "first_error": next((m.batch.first_error for m in ms if m.batch.first_error), None),
        }
    return out


def run(
    base_url: str,
    settings: Settings,
    requests: int | None = None,
    rounds: int | None = None,
    levels: tuple[int, ...] = LEVELS,
) -> Section:
    """Measure every level, and return the tables, raw results and targets."""
    p = plan(settings.quick)
    requests = requests or p["requests"]
    rounds = rounds or p["rounds"]
    results: dict[int, dict[str, Any]] = {}
    for level in levels:
        results[level] = asyncio.run(_level(base_url, level, requests, rounds, p["max_seconds"], settings))
    section = Section("Throughput (one client core)")
    all_kinds = [k for k in CEILING + CLIENTS + DIAGNOSTIC if any(k in results[lv] for lv in levels)]

    def cell(level: int, kind: str, key: str) -> Any:
        r = results[level].get(kind)
        return r[key] if r else "—"

    def rate_cell(level: int, kind: str) -> Any:
        r = results[level].get(kind)
        if not r:
            return "—"
        marks = ("†" if r["capped"] else "") + (f" ({r['errors']:,} failed)" if r["errors"] else "")
        return f"{r['rate']:,.0f}{marks}" if marks else r["rate"]

    rows = []
    for kind in all_kinds:
        label = LABELS[kind] + (" [diagnostic]" if kind in DIAGNOSTIC else "")
        rows.append((label, *(rate_cell(level, kind) for level in levels)))
    section.tables.append(
        (
            f"Successful checks/s (median of {rounds} round(s) of {requests:,} requests per level; pool = concurrency; "
            f"† = stopped by the {p['max_seconds']} s cap before all requests were made; failed = checks that "
            "raised or that Guard decided without a verdict)",
            table(("client", *(f"c={lv}" for lv in levels)), rows),
        )
    )
    lat_rows = []
    for kind in all_kinds:
        label = LABELS[kind] + (" [diagnostic]" if kind in DIAGNOSTIC else "")
        lat_rows.append(
            (
                label,
                *(
                    f"{cell(lv, kind, 'p50_us') / 1000:.1f} / {cell(lv, kind, 'p99_us') / 1000:.1f}"
                    if kind in results[lv]
                    else "—"
                    for lv in levels
                ),
            )
        )
    section.tables.append(
        ("Latency p50 / p99 per call, ms", table(("client", *(f"c={lv}" for lv in levels)), lat_rows))
    )
    gc_rows = []
    for kind in all_kinds:
        label = LABELS[kind] + (" [diagnostic]" if kind in DIAGNOSTIC else "")
        cells = []
        for lv in levels:
            r = results[lv].get(kind)
            if not r:
                cells.append("—")
                continue
            young = median([c[0] for c in r["gc_collections_per_1000"]])
            cells.append(f"{r['gc_pct']:.1f}% ({young:g})")
        gc_rows.append((label, *cells))
    section.tables.append(
        (
            "Share of wall time in the garbage collector (young-generation collections per 1,000 checks)",
            table(("client", *(f"c={lv}" for lv in levels)), gc_rows),
        )
    )
    ratio_rows = []
    for level in levels:
        r = results[level]
        ratio_rows.append(
            (
                level,
                f"{r['guard_httpx']['rate'] / r['raw_httpx']['rate']:.2f}×",
                f"{r['guard_aiohttp']['rate'] / r['raw_aiohttp']['rate']:.2f}×",
                f"{r['guard_aiohttp']['rate'] / r['guard_httpx']['rate']:.2f}×",
                f"{r['raw_httpx']['rate'] / r['raw_socket']['rate']:.2f}",
                f"{r['raw_aiohttp']['rate'] / r['raw_socket']['rate']:.2f}",
                max(max(x["foreign_load_pct"]) for x in r.values()),
            )
        )
    section.tables.append(
        (
            "Ratios",
            table(
                (
                    "concurrency",
                    "Guard httpx / raw httpx",
                    "Guard aiohttp / raw aiohttp",
                    "Guard aiohttp / Guard httpx",
                    "raw httpx / server ceiling",
                    "raw aiohttp / server ceiling",
                    "max foreign load %",
                ),
                ratio_rows,
            ),
        )
    )
    section.results = {
        "plan": {"requests": requests, "rounds": rounds, "levels": list(levels), "max_seconds": p["max_seconds"]},
        "levels": {str(k): v for k, v in results.items()},
    }
    section.targets = _targets(results, levels)
    return section


def _targets(results: dict[int, dict[str, Any]], levels: tuple[int, ...]) -> list[Target]:
    targets: list[Target] = []
    rate = {lv: results[lv]["guard_httpx"]["rate"] for lv in levels}
    if 64 in levels:
        targets.append(
            Target(
                "Guard default ≥ 600 checks/s on one core (c=64)",
                f"{rate[64]:,.0f}/s",
                "≥ 600/s",
                rate[64] >= 600,
                note="per level: " + ", ".join(f"c={lv} {rate[lv]:,.0f}" for lv in levels),
                source="issue; reference §6.2.2",
            )
        )
    ratios = {lv: results[lv]["guard_httpx"]["rate"] / results[lv]["raw_httpx"]["rate"] for lv in levels}
    worst = min(ratios, key=lambda lv: ratios[lv])
    targets.append(
        Target(
            "Guard default ≥ 0.9× raw httpx at every concurrency",
            f"worst {ratios[worst]:.2f}× (c={worst})",
            "≥ 0.90× at each level",
            all(v >= 0.9 for v in ratios.values()),
            note=", ".join(f"c={lv} {v:.2f}×" for lv, v in ratios.items()),
            source="issue",
        )
    )
    if 64 in levels and 256 in levels:
        fall = rate[256] / rate[64]
        targets.append(
            Target(
                "Guard default does not fall from c=64 to c=256",
                f"c=256 / c=64 = {fall:.2f}×",
                "≥ 0.95× (5% noise allowance)",
                fall >= 0.95,
                note=_fixed_note(results, "guard_httpx_c64"),
                source="issue; reference §6.2.2",
            )
        )
    if 64 in levels and 256 in levels:
        aio = {lv: results[lv]["guard_aiohttp"]["rate"] for lv in (64, 256)}
        targets.append(
            Target(
                "Guard aiohttp does not fall from c=64 to c=256",
                f"c=256 / c=64 = {aio[256] / aio[64]:.2f}×",
                "≥ 0.95× (5% noise allowance)",
                aio[256] / aio[64] >= 0.95,
                note=_aiohttp_fall_note(results),
                source="issue",
            )
        )
    if 64 in levels:
        r64 = results[64]
        speedup = r64["guard_aiohttp"]["rate"] / r64["guard_httpx"]["rate"]
        targets.append(
            Target(
                "Guard aiohttp ≥ 3× Guard default at c=64",
                f"{speedup:.2f}× ({r64['guard_aiohttp']['rate']:,.0f}/s)",
                "≥ 3.0×",
                speedup >= 3.0,
                source="issue",
            )
        )
        targets.append(
            Target(
                "Guard aiohttp ≥ 3,000 checks/s at c=64",
                f"{r64['guard_aiohttp']['rate']:,.0f}/s",
                "≥ 3,000/s",
                r64["guard_aiohttp"]["rate"] >= 3000,
                note=f"server ceiling here {r64['raw_socket']['rate']:,.0f}/s",
                source="reference §6.2.2",
            )
        )
    return targets


def _fixed_note(results: dict[int, dict[str, Any]], kind: str) -> str:
    """c=256 / c=64 of a Guard whose concurrency stays 64 (callers beyond it queue on its semaphore)."""
    rates = [results[lv].get(kind) for lv in (64, 256)]
    if not (rates[0] and rates[1]):
        return "fixed concurrency=64 not measured"
    return f"with concurrency=64 whatever the load: {rates[1]['rate'] / rates[0]['rate']:.2f}×"


def _aiohttp_fall_note(results: dict[int, dict[str, Any]]) -> str:
    raw = results[256]["raw_aiohttp"]["rate"] / results[64]["raw_aiohttp"]["rate"]
    gc_pct = f"{results[64]['guard_aiohttp']['gc_pct']:.1f}% → {results[256]['guard_aiohttp']['gc_pct']:.1f}%"
    note = f"raw aiohttp: {raw:.2f}×; time in the collector {gc_pct}; {_fixed_note(results, 'guard_aiohttp_c64')}"
    nogc = [results[lv].get("guard_aiohttp_nogc") for lv in (64, 256)]
    if nogc[0] and nogc[1]:
        note += f"; collector off: {nogc[1]['rate'] / nogc[0]['rate']:.2f}×"
    return note


LATENCY_KINDS: tuple[str, ...] = ("raw_httpx", "guard_httpx", "raw_aiohttp", "guard_aiohttp")
LATENCY_LEVELS: tuple[int, ...] = (16, 64, 256)
GUARD_LATENCY_S = 0.05


def run_latency(base_url: str, settings: Settings, latency: float = GUARD_LATENCY_S) -> Section:
    """Throughput against a server that takes ``latency`` per answer, like a guard model on a GPU: the client
    is no longer the only bottleneck, and what counts is how many checks each client keeps in flight."""
    requests, rounds = (300, 1) if settings.quick else (1500, 2)
    max_seconds = 30 if settings.quick else 60
    results = {
        level: asyncio.run(_level(base_url, level, requests, rounds, max_seconds, settings, LATENCY_KINDS))
        for level in LATENCY_LEVELS
    }
    ms = f"{latency * 1e3:g} ms"
    section = Section(f"Throughput against a guard that answers in {ms}")
    rows = []
    for kind in LATENCY_KINDS:
        cells = []
        for level in LATENCY_LEVELS:
            r = results[level][kind]
            marks = ("†" if r["capped"] else "") + (f" ({r['errors']:,} failed)" if r["errors"] else "")
            cells.append(f"{r['rate']:,.0f}{marks} ({r['p50_us'] / 1000:.0f} / {r['p99_us'] / 1000:.0f} ms)")
        rows.append((LABELS[kind], *cells))
    ideal = ("ideal: c / latency", *(f"{level / latency:,.0f}" for level in LATENCY_LEVELS))
    section.tables.append(
        (
            f"Successful checks/s (p50 / p99 latency) with a {ms} server latency (median of {rounds} round(s) of "
            f"{requests:,} requests; pool = concurrency, split by the httpx transport over pools of 4)",
            table(("client", *(f"c={lv}" for lv in LATENCY_LEVELS)), [*rows, ideal]),
        )
    )
    section.results = {
        "latency_s": latency,
        "plan": {"requests": requests, "rounds": rounds, "levels": list(LATENCY_LEVELS)},
        "levels": {str(k): v for k, v in results.items()},
    }
    ratios = {lv: results[lv]["guard_httpx"]["rate"] / results[lv]["raw_httpx"]["rate"] for lv in LATENCY_LEVELS}
    worst = min(ratios, key=lambda lv: ratios[lv])
    section.targets.append(
        Target(
            f"Guard default ≥ 0.9× raw httpx at every concurrency, {ms} guard",
            f"worst {ratios[worst]:.2f}× (c={worst})",
            "≥ 0.90× at each level",
            all(v >= 0.9 for v in ratios.values()),
            note=", ".join(f"c={lv} {v:.2f}×" for lv, v in ratios.items()),
            source="issue (with a realistic server latency)",
        )
    )
    fall = results[256]["guard_httpx"]["rate"] / results[64]["guard_httpx"]["rate"]
    section.targets.append(
        Target(
            f"Guard default does not fall from c=64 to c=256, {ms} guard",
            f"c=256 / c=64 = {fall:.2f}×",
            "≥ 0.95× (5% noise allowance)",
            fall >= 0.95,
            source="issue",
        )
    )
    fall_aio = results[256]["guard_aiohttp"]["rate"] / results[64]["guard_aiohttp"]["rate"]
    section.targets.append(
        Target(
            f"Guard aiohttp does not fall from c=64 to c=256, {ms} guard",
            f"c=256 / c=64 = {fall_aio:.2f}×",
            "≥ 0.95× (5% noise allowance)",
            fall_aio >= 0.95,
            source="issue",
        )
    )
    return section


def main() -> None:
    from ._common import ServerProcess, prepare_process

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--requests", type=int, default=None, help="requests per measurement")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)))
    args = parser.parse_args()
    levels = tuple(int(x) for x in args.levels.split(","))
    prepare_process(0)
    with ServerProcess(core=1) as server:
        section = run(
            server.base_url,
            Settings(quick=args.quick, server_pid=server.pid, attempts=1 if args.quick else 3),
            args.requests,
            args.rounds,
            levels,
        )
    print(section.render())


if __name__ == "__main__":
    main()
