"""The verdict cache: the latency of a hit, and the hit ratio of a repeated (Zipf) workload.

Hit latency: a Guard with the cache on checks :data:`TEXT` once (a miss, one request), then the same text again
and again; every later call is a hit served without I/O. Timed per call for ``Guard.acheck`` and for the blocking
``Guard.check``, and for ``VerdictCache.get`` alone.

Hit ratio: texts drawn from a Zipf distribution (seeded) over a vocabulary larger than the default cache
(4,096 entries), checked one at a time and by 16 concurrent workers. The observed ratio is compared with an
infinite cache (1 − distinct / draws) and with a sequential LRU of the same size (simulated).

    python -m benchmarks.cache [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections import OrderedDict
from typing import Any

from flexguard_integrations import Guard

from ._common import (
    MODEL,
    TEXT,
    BenchmarkError,
    LoadProbe,
    Section,
    Settings,
    Target,
    run_workers,
    summarize_ns,
    table,
)

VOCABULARY = 50000
ZIPF_S = 1.0
SEED = 20240611
TOPICS = (
    "reset my password",
    "make a pipe bomb at home",
    "bake sourdough bread",
    "hack into my ex's email account",
    "renew my passport",
    "buy an untraceable gun",
    "learn lock picking",
    "write a phishing email",
)


def plan(quick: bool) -> dict[str, int]:
    return {"hits": 5000, "draws": 2000} if quick else {"hits": 20000, "draws": 12000}


def zipf_texts(draws: int, vocabulary: int = VOCABULARY, s: float = ZIPF_S, seed: int = SEED) -> list[str]:
    """``draws`` texts; text ``k`` (rank from 1) is drawn with probability ∝ 1/k**s."""
    rng = random.Random(seed)
    weights = [1.0 / (k**s) for k in range(1, vocabulary + 1)]
    ranks = rng.choices(range(vocabulary), weights=weights, k=draws)
    return [
        f"Ticket {k}: a customer asks how to {TOPICS[k % len(TOPICS)]} (reference {k * 7919 % 100000})." for k in ranks
    ]


def lru_hit_ratio(items: list[str], maxsize: int) -> float:
    """Hit ratio of a sequential LRU cache of ``maxsize`` entries over ``items``."""
    cache: OrderedDict[str, None] = OrderedDict()
    hits = 0
    for item in items:
        if item in cache:
            hits += 1
            cache.move_to_end(item)
        else:
            cache[item] = None
            if len(cache) > maxsize:
                cache.popitem(last=False)
    return hits / len(items) if items else 0.0


async def _hit_latency(base_url: str, hits: int) -> dict[str, Any]:
    guard = Guard.from_endpoint(base_url, MODEL, cache=True)
    try:
        first = await guard.acheck(TEXT)
        if first.verdict.error is not None or first.verdict.cached:
            raise BenchmarkError(f"the first check should be a real miss: {first.verdict}")
        for _ in range(1000):  # warm-up
            await guard.acheck(TEXT)
        clock = time.perf_counter_ns
        async_ns: list[int] = []
        for _ in range(hits):
            t0 = clock()
            d = await guard.acheck(TEXT)
            async_ns.append(clock() - t0)
        if not d.verdict.cached:
            raise BenchmarkError("acheck did not hit the cache")
        sync_ns: list[int] = []
        for _ in range(hits):
            t0 = clock()
            d = guard.check(TEXT)
            sync_ns.append(clock() - t0)
        if not d.verdict.cached:
            raise BenchmarkError("check did not hit the cache")
        assert guard.cache is not None
        key = guard._cache_key(*guard._prepare(TEXT, None, None, None))
        get_ns: list[int] = []
        for _ in range(hits):
            t0 = clock()
            guard.cache.get(key)
            get_ns.append(clock() - t0)
        stats = guard.stats.cache
        return {
            "acheck": summarize_ns(async_ns),
            "check": summarize_ns(sync_ns),
            "cache_get": summarize_ns(get_ns),
            "server_requests": stats.misses if stats else None,
        }
    finally:
        await guard.aclose()


async def _workload(
    base_url: str, texts: list[str], concurrency: int, cache: int | bool, settings: Settings
) -> dict[str, Any]:
    """Check ``texts`` with ``concurrency`` workers; ``cache`` is False, True (default size) or a size."""
    guard = Guard.from_endpoint(base_url, MODEL, cache=cache, concurrency=concurrency)
    it = iter(texts)

    async def call() -> None:
        d = await guard.acheck(next(it))
        if d.verdict.error is not None:
            raise BenchmarkError(d.verdict.error)

    try:
        probe = LoadProbe(settings.server_pid)
        probe.start()
        batch = await run_workers(call, concurrency, len(texts))
        load = probe.stop()
        stats = guard.stats.cache
        return {
            "concurrency": concurrency,
            "cache": cache,
            "draws": len(texts),
            "rate": batch.rate,
            "errors": batch.errors,
            "hits": stats.hits if stats else 0,
            "misses": stats.misses if stats else len(texts),
            "hit_ratio": stats.hit_ratio if stats else 0.0,
            "cache_size": stats.size if stats else 0,
            "maxsize": stats.maxsize if stats else 0,
            "p50_us": summarize_ns(batch.latencies_ns)["p50_us"],
            "foreign_load_pct": load["foreign"],
        }
    finally:
        await guard.aclose()


def _run_name(r: dict[str, Any]) -> str:
    cache = r["cache"]
    size = "off" if cache is False else ("on (4096)" if cache is True else f"on ({cache})")
    extra = f", first {r['draws']:,} draws" if cache is False else ""
    return f"Guard cache {size}, concurrency {r['concurrency']}{extra}"


def run(base_url: str, settings: Settings) -> Section:
    """Measure hit latency and workload hit ratios; return tables, raw results and targets."""
    p = plan(settings.quick)
    hit = asyncio.run(_hit_latency(base_url, p["hits"]))
    texts = zipf_texts(p["draws"])
    maxsize = 4096
    ideal = 1.0 - len(set(texts)) / len(texts)
    lru = lru_hit_ratio(texts, maxsize)
    small = 1024
    lru_small = lru_hit_ratio(texts, small)
    no_cache = texts[: 1000 if settings.quick else 3000]
    runs = [
        asyncio.run(_workload(base_url, texts, 1, True, settings)),
        asyncio.run(_workload(base_url, texts, 1, small, settings)),
        asyncio.run(_workload(base_url, texts, 16, True, settings)),
        asyncio.run(_workload(base_url, no_cache, 16, False, settings)),
    ]
    section = Section("Verdict cache")
    section.tables.append(
        (
            f"Hit latency, µs ({p['hits']:,} hits each, same text, after one miss and 1,000 warm-up hits)",
            table(
                ("call", "p50", "p99", "mean", "max"),
                [
                    (name, hit[k]["p50_us"], hit[k]["p99_us"], hit[k]["mean_us"], hit[k]["max_us"])
                    for name, k in (
                        ("await Guard.acheck(text)", "acheck"),
                        ("Guard.check(text)", "check"),
                        ("VerdictCache.get(key) alone", "cache_get"),
                    )
                ],
            ),
        )
    )
    section.tables.append(
        (
            f"Zipf workload: {len(texts):,} draws, s={ZIPF_S}, vocabulary {VOCABULARY:,} "
            f"({len(set(texts)):,} distinct drawn), cache maxsize {maxsize:,}",
            table(
                ("run", "hit ratio", "server requests", "checks/s", "p50 µs", "foreign load %"),
                [
                    ("infinite cache, sequential (ideal)", f"{ideal:.3f}", len(set(texts)), "—", "—", "—"),
                    (
                        f"LRU {maxsize}, sequential (simulated)",
                        f"{lru:.3f}",
                        round(len(texts) * (1 - lru)),
                        "—",
                        "—",
                        "—",
                    ),
                    (
                        f"LRU {small}, sequential (simulated)",
                        f"{lru_small:.3f}",
                        round(len(texts) * (1 - lru_small)),
                        "—",
                        "—",
                        "—",
                    ),
                    *(
                        (
                            _run_name(r),
                            f"{r['hit_ratio']:.3f}",
                            r["misses"],
                            r["rate"],
                            r["p50_us"],
                            r["foreign_load_pct"],
                        )
                        for r in runs
                    ),
                ],
            ),
        )
    )
    section.results = {
        "plan": p,
        "hit_latency": hit,
        "workload": {
            "draws": len(texts),
            "distinct": len(set(texts)),
            "vocabulary": VOCABULARY,
            "zipf_s": ZIPF_S,
            "seed": SEED,
            "ideal_hit_ratio": ideal,
            "lru_sequential_hit_ratio": lru,
            "lru_small_sequential_hit_ratio": lru_small,
            "runs": runs,
        },
    }
    p50 = hit["acheck"]["p50_us"]
    mean = hit["acheck"]["mean_us"]
    seq, seq_small, conc = runs[0], runs[1], runs[2]
    section.targets = [
        Target(
            "Cache hit served in ≤ 50 µs (acheck)",
            f"p50 {p50:.1f} µs, mean {mean:.1f} µs",
            "≤ 50 µs",
            p50 <= 50 and mean <= 50,
            note=f"p99 {hit['acheck']['p99_us']:.1f} µs; sync check p50 {hit['check']['p50_us']:.1f} µs",
            source="issue; reference §6.2.6",
        ),
        Target(
            "Sequential hit ratio matches an LRU of the same size",
            f"{seq['hit_ratio']:.3f}",
            f"{lru:.3f} (simulated)",
            abs(seq["hit_ratio"] - lru) < 0.005 and abs(seq_small["hit_ratio"] - lru_small) < 0.005,
            note=f"maxsize {small}: {seq_small['hit_ratio']:.3f} vs {lru_small:.3f} simulated",
            source="sanity check",
        ),
        Target(
            "Concurrent hit ratio (16 workers) close to sequential",
            f"{conc['hit_ratio']:.3f}",
            f"≥ {seq['hit_ratio'] - 0.01:.3f}",
            conc["hit_ratio"] >= seq["hit_ratio"] - 0.01,
            note="identical texts in flight at once are all sent (no request coalescing)",
            source="observation",
        ),
    ]
    return section


def main() -> None:
    from ._common import ServerProcess, prepare_process

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    prepare_process(0)
    with ServerProcess(core=1) as server:
        section = run(
            server.base_url, Settings(quick=args.quick, server_pid=server.pid, attempts=1 if args.quick else 3)
        )
    print(section.render())


if __name__ == "__main__":
    main()
