"""Diagnostic (not part of ``benchmarks.run``): why the httpx transport splits its connections over small pools.

httpcore's pool walks every connection for every idle connection on each request start and end (O(n²)), and
checks each idle socket with a ``poll`` syscall, so a request costs more the bigger the pool. After a burst opens
``concurrency`` connections, a client whose CPU is saturated keeps only some of them busy; the idle rest is
scanned on every pool event until it expires (``keepalive_expiry``: 30 s in ``HTTPTransport``, 5 s in httpx's
default). ``HTTPTransport`` therefore splits ``concurrency`` connections over pools of
``HTTPX_POOL_CONNECTIONS`` (4) and sends each request to the least busy pool. This script shows it two ways:

1. a time series of checks per second after a burst, with the pools' (connections, idle) count each second,
   for one pool of ``concurrency`` connections (the layout before the split) and for the default layout;
2. the first ``--requests`` checks after a burst, for several layouts (set on the transport's private
   ``_shard_count`` / ``_limits`` before its first request: an experiment, not an API).

    python -m benchmarks.httpx_pool [--concurrency 64] [--requests 3000] [--seconds 40]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import httpx

from flexguard_integrations import Guard

from ._common import MODEL, TEXT, BenchmarkError, LoadProbe, run_workers, summarize_ns

Layout = tuple[int, httpx.Limits] | None
"""(number of pools, each pool's limits), or None for the transport's default."""


def _guard(base_url: str, concurrency: int, layout: Layout) -> Guard:
    guard = Guard.from_endpoint(base_url, MODEL, cache=False, concurrency=concurrency)
    if layout is not None:
        guard.transport._shard_count, guard.transport._limits = layout  # type: ignore[attr-defined]
    return guard


def _one_pool(concurrency: int, keepalive: float = 30.0) -> Layout:
    return 1, httpx.Limits(
        max_connections=concurrency, max_keepalive_connections=concurrency, keepalive_expiry=keepalive
    )


def _pools_of(size: int, concurrency: int) -> Layout:
    return -(-concurrency // size), httpx.Limits(
        max_connections=size, max_keepalive_connections=size, keepalive_expiry=30.0
    )


async def time_series(base_url: str, concurrency: int, seconds: float, layout: Layout) -> list[tuple[int, int, int]]:
    """(checks completed, pool connections, idle connections) for each second after a burst."""
    guard = _guard(base_url, concurrency, layout)
    done = 0

    async def call() -> None:
        nonlocal done
        await guard.acheck(TEXT)
        done += 1

    await run_workers(call, concurrency, concurrency)  # the burst: opens `concurrency` connections
    pools: list[Any] = [p._pool for p in guard.transport._async_pools().pools]  # type: ignore[attr-defined]
    samples: list[tuple[int, int, int]] = []
    running = True

    async def sampler() -> None:
        last = done
        while running:
            await asyncio.sleep(1.0)
            conns = [c for pool in pools for c in pool._connections]
            samples.append((done - last, len(conns), sum(1 for c in conns if c.is_idle())))
            last = done

    task = asyncio.create_task(sampler())
    await run_workers(call, concurrency, 10**9, seconds)
    running = False
    await task
    await guard.aclose()
    return samples


async def variants(
    base_url: str, concurrency: int, requests: int, server_pid: int | None = None
) -> list[dict[str, Any]]:
    """The first ``requests`` checks after a burst, per pool configuration."""
    configs: list[tuple[str, int, Layout]] = [
        (f"default: {-(-concurrency // 4)} pools of 4 connections, least busy first", concurrency, None),
        (f"{-(-concurrency // 8)} pools of 8", concurrency, _pools_of(8, concurrency)),
        (f"{-(-concurrency // 16)} pools of 16", concurrency, _pools_of(16, concurrency)),
        (
            f"one pool of {concurrency}, keep-alive 30 s (the layout before the split)",
            concurrency,
            _one_pool(concurrency),
        ),
        ("one pool, keep-alive 5 s (httpx's default)", concurrency, _one_pool(concurrency, 5.0)),
        ("one pool of 16, callers queue on Guard's semaphore (the former cap)", 16, _one_pool(16)),
    ]
    out = []
    for label, guard_concurrency, layout in configs:
        guard = _guard(base_url, guard_concurrency, layout)

        async def call(g: Guard = guard) -> None:
            d = await g.acheck(TEXT)
            if d.verdict.error is not None:
                raise BenchmarkError(d.verdict.error)

        await run_workers(call, concurrency, concurrency, 60)
        probe = LoadProbe(server_pid)
        probe.start()
        batch = await run_workers(call, concurrency, requests, 60)
        load = probe.stop()
        s = summarize_ns(batch.latencies_ns)
        out.append(
            {
                "config": label,
                "rate": batch.rate,
                "p50_ms": s["p50_us"] / 1000,
                "p99_ms": s["p99_us"] / 1000,
                "failed": batch.errors,
                "foreign_load_pct": load["foreign"],
            }
        )
        await guard.aclose()
    return out


def main() -> None:
    from ._common import ServerProcess, prepare_process, table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--seconds", type=float, default=40.0)
    args = parser.parse_args()
    prepare_process(0)
    with ServerProcess(core=1) as server:
        started = time.time()
        series = {
            label: asyncio.run(time_series(server.base_url, args.concurrency, args.seconds, layout))
            for label, layout in (("one pool", _one_pool(args.concurrency)), ("default pools of 4", None))
        }
        rows = asyncio.run(variants(server.base_url, args.concurrency, args.requests, server.pid))
    for label, samples in series.items():
        print(f"## httpx pools after a burst of {args.concurrency}: {label}\n")
        print(
            table(
                ("second", "checks", "pool connections", "idle"),
                [(i + 1, *sample) for i, sample in enumerate(samples)],
            )
        )
        print()
    print(f"\n## First {args.requests:,} checks after the burst, {args.concurrency} callers\n")
    print(
        table(
            ("pool configuration", "checks/s", "p50 ms", "p99 ms", "failed", "foreign load %"),
            [(r["config"], r["rate"], r["p50_ms"], r["p99_ms"], r["failed"], r["foreign_load_pct"]) for r in rows],
        )
    )
    print(f"\n({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
