"""Per-check latency at concurrency 1: what Guard adds on top of a raw HTTP client.

Six clients send the same request (the exact JSON body ``Guard.acheck(TEXT)`` sends) to the same emulated
server, one request at a time: raw ``httpx.AsyncClient.post``, ``Guard.acheck`` on the default httpx transport
(cache off), raw ``aiohttp.ClientSession.post``, ``Guard.acheck`` with ``transport="aiohttp"``, the openai SDK's
``chat.completions.create`` and LangChain's ``ChatOpenAI.ainvoke`` (langchain-openai, same settings as the openai
row). Diagnostic clients isolate costs: Guard's transports alone (``HTTPTransport`` / ``AiohttpTransport``
``acomplete``, without the Guard layer) and Guard on aiohttp with ``trust_env=False`` (aiohttp's per-request
environment lookups).

The clients take turns: each round measures every client in a rotated order, so slow drifts of the machine hit
all of them alike. Latencies are per call (``perf_counter_ns``) after a warm-up.

The targets are judged on **paired** runs: for each pair (Guard and the raw client it is compared with, and
Guard's transport alone against the same raw client) the two clients alternate call by call, A B, B A, A B...,
so the VM's speed, which drifts by a third over seconds here, is the same for both sides of every pair of
calls. Rounds of a few thousand calls per client cannot cancel that drift: their per-round ratios spread over
±20%, the paired blocks over ±4%.

    python -m benchmarks.overhead [--quick] [--requests N] [--rounds R]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from typing import Any

from ._common import (
    CLIENTS,
    LABELS,
    Call,
    LoadProbe,
    Section,
    Settings,
    Target,
    measure,
    median,
    open_client,
    summarize_ns,
    table,
)

DIAGNOSTIC = ("transport_httpx", "transport_aiohttp", "guard_aiohttp_noenv")
PAIRED: tuple[tuple[str, str, str], ...] = (
    ("Guard httpx / raw httpx", "guard_httpx", "raw_httpx"),
    ("↳ HTTPTransport / raw httpx", "transport_httpx", "raw_httpx"),
    ("Guard aiohttp / raw aiohttp", "guard_aiohttp", "raw_aiohttp"),
    ("↳ AiohttpTransport / raw aiohttp", "transport_aiohttp", "raw_aiohttp"),
)
"""(name, client, baseline) measured call by call in alternation (:func:`_measure_paired`)."""


def plan(quick: bool) -> dict[str, int]:
    """Requests per client (total over rounds), rounds and warm-up calls."""
    if quick:
        return {"requests": 2000, "rounds": 2, "warmup": 100, "paired": 2000, "block": 500}
    return {"requests": 10000, "rounds": 5, "warmup": 300, "paired": 10000, "block": 1000}


async def _measure_paired(
    base_url: str, pairs: tuple[tuple[str, str, str], ...], n: int, block: int, warmup: int, settings: Settings
) -> dict[str, Any]:
    """For each pair, ``n`` calls of each client, alternating A B, B A...: the p50 of each side, their ratio,
    and the ratio per block of ``block`` call pairs (how stable it is). Each pair runs on fresh clients."""
    clock = time.perf_counter_ns
    out: dict[str, Any] = {}
    for name, num, den in pairs:
        async with open_client(num, base_url, 1) as a, open_client(den, base_url, 1) as b:
            for _ in range(warmup):
                await a()
                await b()
            la: list[int] = []
            lb: list[int] = []
            probe = LoadProbe(settings.server_pid)
            probe.start()
            for i in range(n):
                first, second, l1, l2 = (a, b, la, lb) if i % 2 == 0 else (b, a, lb, la)
                t0 = clock()
                await first()
                t1 = clock()
                await second()
                l2.append(clock() - t1)
                l1.append(t1 - t0)
            load = probe.stop()
        blocks = [
            median([float(x) for x in la[j : j + block]]) / median([float(x) for x in lb[j : j + block]])
            for j in range(0, n, block)
        ]
        sa, sb = summarize_ns(la), summarize_ns(lb)
        out[name] = {
            "client": num,
            "baseline": den,
            "n": n,
            "p50_us": sa["p50_us"],
            "baseline_p50_us": sb["p50_us"],
            "p99_us": sa["p99_us"],
            "baseline_p99_us": sb["p99_us"],
            "ratio": sa["p50_us"] / sb["p50_us"],
            "delta_us": sa["p50_us"] - sb["p50_us"],
            "block_ratios": blocks,
            "foreign_load_pct": load["foreign"],
        }
    return out


async def _measure_all(
    base_url: str, kinds: tuple[str, ...], requests: int, rounds: int, warmup: int, settings: Settings
) -> dict[str, Any]:
    per_round = max(1, requests // rounds)
    latencies: dict[str, list[int]] = {k: [] for k in kinds}
    rounds_out: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    async with contextlib.AsyncExitStack() as stack:
        calls: dict[str, Call] = {}
        for kind in kinds:
            calls[kind] = await stack.enter_async_context(open_client(kind, base_url, 1))
        for call in calls.values():
            for _ in range(warmup):
                await call()
        for r in range(rounds):
            order = kinds[r % len(kinds) :] + kinds[: r % len(kinds)]
            for kind in order:
                m = await measure(calls[kind], 1, per_round, settings)
                latencies[kind].extend(m.latencies_ns)
                s = summarize_ns(m.latencies_ns)
                rounds_out[kind].append(
                    {
                        "round": r,
                        "p50_us": s["p50_us"],
                        "mean_us": s["mean_us"],
                        "rate": m.rate,
                        "foreign_load_pct": m.load["foreign"],
                        "client_cpu_pct": m.load["client"],
                        "server_cpu_pct": m.load["server"],
                        "client_cpu_us_per_call": m.load["client"] / 100.0 / m.rate * 1e6,
                        "attempts": m.attempts,
                        "errors": m.batch.errors,
                        "first_error": m.batch.first_error,
                    }
                )
    return {
        kind: {
            "label": LABELS[kind],
            **summarize_ns(latencies[kind]),
            "client_cpu_us": median([x["client_cpu_us_per_call"] for x in rounds_out[kind]]),
            "errors": sum(x["errors"] for x in rounds_out[kind]),
            "rounds": rounds_out[kind],
        }
        for kind in kinds
    }


def _round_ratio(results: dict[str, Any], num: str, den: str, key: str = "p50_us") -> list[float]:
    return [a[key] / b[key] for a, b in zip(results[num]["rounds"], results[den]["rounds"], strict=True)]


def run(base_url: str, settings: Settings, requests: int | None = None, rounds: int | None = None) -> Section:
    """Measure, and return the tables, raw results and targets."""
    p = plan(settings.quick)
    requests = requests or p["requests"]
    rounds = rounds or p["rounds"]
    kinds = CLIENTS + DIAGNOSTIC
    results = asyncio.run(_measure_all(base_url, kinds, requests, rounds, p["warmup"], settings))
    paired = asyncio.run(_measure_paired(base_url, PAIRED, p["paired"], p["block"], p["warmup"], settings))
    section = Section("Overhead per check (concurrency 1)")
    rows = []
    for kind in kinds:
        r = results[kind]
        p50s = [x["p50_us"] for x in r["rounds"]]
        rows.append(
            (
                r["label"] + (" [diagnostic]" if kind in DIAGNOSTIC else ""),
                r["n"],
                r["p50_us"],
                r["p99_us"],
                r["mean_us"],
                1e6 / r["mean_us"],
                f"{min(p50s):.0f}–{max(p50s):.0f}",
                r["client_cpu_us"],
                r["errors"],
                max(x["foreign_load_pct"] for x in r["rounds"]),
            )
        )
    section.tables.append(
        (
            f"Latency per call, µs ({requests:,} requests per client in {rounds} interleaved rounds, after warm-up; "
            "client CPU/call = the client process's CPU time per call, median of the rounds)",
            table(
                (
                    "client",
                    "n",
                    "p50",
                    "p99",
                    "mean",
                    "calls/s",
                    "p50 per round",
                    "client CPU/call",
                    "errors",
                    "max foreign %",
                ),
                rows,
            ),
        )
    )
    pairs = [
        ("Guard httpx / raw httpx", "guard_httpx", "raw_httpx"),
        ("↳ HTTPTransport / raw httpx", "transport_httpx", "raw_httpx"),
        ("↳ Guard httpx / HTTPTransport", "guard_httpx", "transport_httpx"),
        ("Guard aiohttp / raw aiohttp", "guard_aiohttp", "raw_aiohttp"),
        ("↳ AiohttpTransport / raw aiohttp", "transport_aiohttp", "raw_aiohttp"),
        ("↳ Guard aiohttp / AiohttpTransport", "guard_aiohttp", "transport_aiohttp"),
        ("Guard aiohttp (trust_env=False) / raw aiohttp", "guard_aiohttp_noenv", "raw_aiohttp"),
        ("Guard httpx / openai SDK", "guard_httpx", "openai"),
        ("Guard aiohttp / openai SDK", "guard_aiohttp", "openai"),
        ("Guard httpx / LangChain ChatOpenAI", "guard_httpx", "langchain_openai"),
        ("LangChain ChatOpenAI / openai SDK", "langchain_openai", "openai"),
    ]
    ratio_rows = []
    ratios: dict[str, dict[str, float]] = {}
    for name, num, den in pairs:
        a, b = results[num], results[den]
        per_round = _round_ratio(results, num, den)
        ratios[name] = {
            "p50": a["p50_us"] / b["p50_us"],
            "p99": a["p99_us"] / b["p99_us"],
            "mean": a["mean_us"] / b["mean_us"],
            "p50_per_round_median": median(per_round),
            "p50_per_round_min": min(per_round),
            "p50_per_round_max": max(per_round),
            "p50_delta_us": a["p50_us"] - b["p50_us"],
            "mean_delta_us": a["mean_us"] - b["mean_us"],
            "cpu": a["client_cpu_us"] / b["client_cpu_us"],
            "cpu_delta_us": a["client_cpu_us"] - b["client_cpu_us"],
        }
        q = ratios[name]
        ratio_rows.append(
            (
                name,
                f"{q['p50']:.2f}×",
                f"{q['p99']:.2f}×",
                f"{q['mean']:.2f}×",
                f"{q['p50_per_round_min']:.2f}–{q['p50_per_round_max']:.2f}",
                q["p50_delta_us"],
                q["mean_delta_us"],
                f"{q['cpu']:.2f}×",
                q["cpu_delta_us"],
            )
        )
    section.tables.append(
        (
            "Ratios (pooled over rounds; the per-round column pairs the rounds)",
            table(
                ("ratio", "p50", "p99", "mean", "p50 per round", "Δp50 µs", "Δmean µs", "client CPU", "ΔCPU µs"),
                ratio_rows,
            ),
        )
    )
    section.tables.append(
        (
            f"Paired: the two clients alternate call by call ({p['paired']:,} calls each; blocks of "
            f"{p['block']:,} call pairs). The targets below use these ratios",
            table(
                ("pair", "p50 µs", "baseline p50 µs", "ratio", "Δp50 µs", "ratio per block", "max foreign %"),
                [
                    (
                        name,
                        q["p50_us"],
                        q["baseline_p50_us"],
                        f"{q['ratio']:.3f}×",
                        q["delta_us"],
                        f"{min(q['block_ratios']):.2f}–{max(q['block_ratios']):.2f}",
                        q["foreign_load_pct"],
                    )
                    for name, q in paired.items()
                ],
            ),
        )
    )
    section.results = {
        "plan": {"requests": requests, "rounds": rounds, "warmup": p["warmup"], "paired": p["paired"]},
        "clients": results,
        "ratios": ratios,
        "paired": paired,
    }
    httpx_ratio = paired["Guard httpx / raw httpx"]["ratio"]
    aio_ratio = paired["Guard aiohttp / raw aiohttp"]["ratio"]
    d_httpx = results["guard_httpx"]["p50_us"] - results["raw_aiohttp"]["p50_us"]
    d_aio = results["guard_aiohttp"]["p50_us"] - results["raw_aiohttp"]["p50_us"]
    d_openai = results["guard_httpx"]["p50_us"] - results["openai"]["p50_us"]
    section.targets = [
        Target(
            "Guard httpx p50 ≤ 1.2× raw httpx (paired)",
            f"{httpx_ratio:.2f}×",
            "≤ 1.20×",
            httpx_ratio <= 1.2,
            source="issue 2",
        ),
        Target(
            "Guard httpx p50 ≤ 1.1× raw httpx (paired)",
            f"{httpx_ratio:.2f}×",
            "≤ 1.10×",
            httpx_ratio <= 1.1,
            source="issue 6",
        ),
        Target(
            "Guard aiohttp p50 ≤ 1.3× raw aiohttp (paired)",
            f"{aio_ratio:.2f}×",
            "≤ 1.30×",
            aio_ratio <= 1.3,
            source="issue",
        ),
        Target(
            "Guard httpx p50 ≤ raw aiohttp + 1.0 ms",
            f"+{d_httpx / 1000:.2f} ms",
            "≤ +1.00 ms",
            d_httpx <= 1000,
            source="reference §6.2.1",
        ),
        Target(
            "Guard aiohttp p50 ≤ raw aiohttp + 0.3 ms",
            f"+{d_aio / 1000:.2f} ms",
            "≤ +0.30 ms",
            d_aio <= 300,
            source="reference §6.2.1",
        ),
        Target(
            "Guard httpx p50 ≤ openai SDK + 0.2 ms",
            f"{d_openai / 1000:+.2f} ms",
            "≤ +0.20 ms",
            d_openai <= 200,
            source="reference §6.2.1",
        ),
    ]
    return section


def main() -> None:
    from ._common import ServerProcess, prepare_process

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--requests", type=int, default=None, help="requests per client (total over rounds)")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    prepare_process(0)
    with ServerProcess(core=1) as server:
        section = run(
            server.base_url,
            Settings(quick=args.quick, server_pid=server.pid, attempts=1 if args.quick else 3),
            args.requests,
            args.rounds,
        )
    print(section.render())


if __name__ == "__main__":
    main()
