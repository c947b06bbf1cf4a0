"""Where Guard's extra time goes: the cost of each step of ``Guard.acheck``, and cProfile of the client loop.

Step costs time the pure-Python pieces ``acheck`` runs around the HTTP request (no I/O) with ``timeit``, each
on real objects (the request body of :data:`TEXT`, a completion the emulated server really sent). cProfile
then runs sequential checks against the server for Guard and the matching raw client, and groups the time
spent in each package per call, so the difference between the two shows which layer adds it.

    python -m benchmarks.profile_guard [--quick] [--top 25]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import math
import pstats
import sys
import time
import timeit
import urllib.request
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from flexguard_integrations import Guard, _telemetry
from flexguard_integrations.guard import _timeout_cm
from flexguard_integrations.transport.base import _orjson, decode_completion, encode_body, remaining
from flexguard_integrations.transport.http import HTTPTransport

from ._common import (
    HEADERS,
    LABELS,
    MODEL,
    TEXT,
    BenchmarkError,
    Section,
    open_client,
    request_payload,
    run_workers,
    table,
)

_REPO = str(Path(__file__).resolve().parents[1]) + "/"
PAIRS: tuple[tuple[str, str], ...] = (("guard_httpx", "raw_httpx"), ("guard_aiohttp", "raw_aiohttp"))
PACKAGES: tuple[tuple[str, str], ...] = (
    ("flexguard_integrations/", "flexguard_integrations"),
    ("site-packages/httpcore/", "httpcore"),
    ("site-packages/httpx/", "httpx"),
    ("site-packages/anyio/", "anyio"),
    ("site-packages/h11/", "h11"),
    ("site-packages/aiohttp/", "aiohttp"),
    ("site-packages/yarl/", "yarl"),
    ("site-packages/multidict/", "multidict"),
    ("site-packages/opentelemetry/", "opentelemetry"),
    ("site-packages/tenacity/", "tenacity"),
    ("/asyncio/", "asyncio (stdlib)"),
    ("/json/", "json (stdlib)"),
    ("/concurrent/", "concurrent.futures (stdlib)"),
    ("/threading.py", "threading (stdlib)"),
    ("/dataclasses.py", "dataclasses (stdlib)"),
    ("/urllib/", "urllib (stdlib)"),
    ("/netrc.py", "netrc (stdlib)"),
    ("/selectors.py", "selectors (stdlib)"),
    ("/contextlib.py", "contextlib (stdlib)"),
    ("site-packages/sniffio/", "sniffio"),
    ("/socket.py", "socket (stdlib)"),
    ("/enum.py", "enum (stdlib)"),
    ("benchmarks/", "benchmark loop"),
)


def _package(filename: str, funcname: str) -> str:
    for needle, name in PACKAGES:
        if needle in filename:
            return name
    if filename == "~":
        if "poll" in funcname or "select" in funcname:
            return "waiting in epoll"
        return "builtins (C)"
    return "other"


def _per_call(fn: Callable[[], Any], min_time: float = 0.2) -> float:
    """Microseconds per call of ``fn`` (best of 5 repeats, auto-sized)."""
    timer = timeit.Timer(fn)
    number, _ = timer.autorange()
    number = max(number, int(number * min_time / 0.2))
    return min(timer.repeat(5, number)) / number * 1e6


def _completion_bytes(base_url: str) -> bytes:
    req = urllib.request.Request(base_url + "/chat/completions", data=request_payload(), headers=HEADERS)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return bytes(resp.read())


def _safe(fn: Callable[[], float]) -> float:
    """A step timing, or NaN when the private method it times changed shape (the package is being edited)."""
    try:
        return fn()
    except (AttributeError, TypeError, ValueError):
        return float("nan")


def step_costs(base_url: str) -> list[tuple[str, float, str]]:
    """(step, µs per call, where) for every piece of ``Guard.acheck`` outside the HTTP client itself.

    These time Guard's private helpers one by one; a helper that no longer exists (or changed its signature)
    gives NaN ("n/a") rather than failing the run.
    """
    guard = Guard.from_endpoint(base_url, MODEL, cache=False)
    guard_cached = Guard.from_endpoint(base_url, MODEL, cache=True)
    raw = _completion_bytes(base_url)
    inp, surf = guard._prepare(TEXT, None, None, None)
    pol = guard._resolve_policy(None)
    body = guard.model.request_body(inp, MODEL)
    payload = encode_body(body)
    completion = decode_completion(raw, "application/json")
    verdict0 = guard.model.parse_completion(completion)
    verdict = guard._finish(verdict0, surf, time.perf_counter())
    decision = guard._decide_all([(verdict, None)], pol, surf)
    transport = guard.transport
    assert isinstance(transport, HTTPTransport)
    deadline = time.monotonic() + 30.0
    g: Any = guard  # private helpers, looked up at call time

    def telemetry() -> None:
        with _telemetry.span("flexguard.check", surface=surf.value, model=MODEL) as current:
            _telemetry.record_decision(current, decision)

    async def sem_and_timeout(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            async with _timeout_cm(remaining(deadline) + 0.05), g._sem():
                pass
        return (time.perf_counter() - t0) / n * 1e6

    async def sem_alone(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            async with g._sem():
                pass
        return (time.perf_counter() - t0) / n * 1e6

    async def split_path(n: int) -> float:
        # _averdicts → _alimit → _asplit's planning → one(): everything around _acall for a short text
        plan = getattr(g, "_plan_chunks", None)
        t0 = time.perf_counter()
        for _ in range(n):
            limit = await g._alimit(inp, deadline)
            if plan is not None:
                plan(inp, limit)
        return (time.perf_counter() - t0) / n * 1e6

    def breaker_step() -> float:
        b: Any = Guard.from_endpoint(base_url, MODEL, cache=False, circuit_breaker=True).breaker

        def one() -> None:
            b.before_request()
            b.record_success()

        return _per_call(one)

    def parsed() -> None:
        g._parsed(completion, None, surf, 0.0)

    steps: list[tuple[str, float, str]] = [
        (
            "_prepare: validate text, GuardInput, Surface",
            _safe(lambda: _per_call(lambda: g._prepare(TEXT, None, None, None))),
            "guard.py",
        ),
        ("_resolve_policy(None)", _safe(lambda: _per_call(lambda: g._resolve_policy(None))), "guard.py"),
        (
            "model.request_body: neutralise + messages",
            _per_call(lambda: guard.model.request_body(inp, MODEL)),
            "models/qwen3guard.py",
        ),
        (
            "encode_body(body): " + ("orjson" if _orjson is not None else "json (orjson not installed)"),
            _per_call(lambda: encode_body(body)),
            "transport/base.py",
        ),
        (
            "_averdicts path: _alimit, chunk planning",
            _safe(lambda: asyncio.run(split_path(20000))),
            "guard.py",
        ),
        (
            "asyncio.timeout + Semaphore enter/exit (httpx)",
            _safe(lambda: asyncio.run(sem_and_timeout(20000))),
            "guard.py _acall",
        ),
        (
            "Semaphore enter/exit alone (aiohttp bounds the deadline itself; overlaps the row above)",
            _safe(lambda: asyncio.run(sem_alone(20000))),
            "guard.py _acall",
        ),
        ("circuit breaker bookkeeping (when enabled)", _safe(breaker_step), "guard.py / breaker"),
        (
            "HTTPTransport._request (httpx): httpx.Request, timeouts from the deadline",
            _safe(lambda: _per_call(lambda: transport._request("POST", transport._chat, deadline, payload))),
            "transport/http.py _apost",
        ),
        (
            "decode_completion: loads (orjson or json) + shape check",
            _per_call(lambda: decode_completion(raw, "application/json")),
            "transport/base.py",
        ),
        (
            "model.parse_completion: regex parse → Verdict",
            _per_call(lambda: guard.model.parse_completion(completion)),
            "models/qwen3guard.py",
        ),
        (
            "_finish: stamp model, surface, latency on the verdict",
            _safe(lambda: _per_call(lambda: g._finish(verdict0, surf, 0.0))),
            "guard.py",
        ),
        (
            "_parsed: parse + _finish + bookkeeping (overlaps the two rows above)",
            _safe(lambda: _per_call(parsed)),
            "guard.py",
        ),
        (
            "_decide_all: policy.decide → Decision",
            _safe(lambda: _per_call(lambda: g._decide_all([(verdict, None)], pol, surf))),
            "guard.py, policy.py",
        ),
        (
            "_record: counters under a lock, log level checks",
            _safe(lambda: _per_call(lambda: g._record(decision))),
            "guard.py",
        ),
        (
            "_telemetry.span + record_decision",
            _per_call(telemetry),
            "_telemetry.py ("
            + ("a tracer is active" if _telemetry._get_tracer() is not None else "no tracer provider: span skipped")
            + ")",
        ),
        (
            "_cache_key (cache on only)",
            _safe(lambda: _per_call(lambda: guard_cached._cache_key(inp, surf))),
            "guard.py",
        ),
    ]
    return steps


class CannedTransport:
    """A Transport that answers every request with the same completion, without I/O: what is left of a check
    is Guard's own work (plus decoding the JSON, as a real transport does)."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    async def acomplete(
        self, body: Mapping[str, Any], *, deadline: float, headers: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        return decode_completion(self.raw, "application/json")

    def complete(
        self, body: Mapping[str, Any], *, deadline: float, headers: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        return decode_completion(self.raw, "application/json")

    async def amodels(self, *, deadline: float) -> list[dict[str, Any]]:
        return []

    def models(self, *, deadline: float) -> list[dict[str, Any]]:
        return []

    async def aclose(self) -> None:
        return None

    def close(self) -> None:
        return None


def guard_layer(base_url: str, n: int, top: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """µs per ``acheck`` / ``averdict`` / ``check`` on a :class:`CannedTransport` (best of 3 loops of ``n``),
    and the cProfile top functions of the ``acheck`` loop."""
    transport = CannedTransport(_completion_bytes(base_url))
    guard = Guard.from_endpoint("http://127.0.0.1:9/v1", MODEL, cache=False, concurrency=1, transport=transport)

    async def loop(fn: Callable[[], Awaitable[Any]]) -> float:
        gc.collect()  # start each loop from a clean heap (earlier sections leave garbage behind)
        t0 = time.perf_counter()
        for _ in range(n):
            await fn()
        return (time.perf_counter() - t0) / n * 1e6

    def sync_loop() -> float:
        gc.collect()
        t0 = time.perf_counter()
        for _ in range(n):
            guard.check(TEXT)
        return (time.perf_counter() - t0) / n * 1e6

    deadline = time.monotonic() + 3600.0
    costs = {
        "await Guard.acheck(text)": min(asyncio.run(loop(lambda: guard.acheck(TEXT))) for _ in range(3)),
        "await Guard.averdict(text)": min(asyncio.run(loop(lambda: guard.averdict(TEXT))) for _ in range(3)),
        "Guard.check(text) (blocking twin)": min(sync_loop() for _ in range(3)),
        "the canned transport alone (decode_completion)": min(
            asyncio.run(loop(lambda: transport.acomplete({}, deadline=deadline))) for _ in range(3)
        ),
    }
    profiler = cProfile.Profile()
    profiler.enable()
    asyncio.run(loop(lambda: guard.acheck(TEXT)))
    profiler.disable()
    return costs, _top(pstats.Stats(profiler), n, top)


async def _profile_loop(kind: str, base_url: str, n: int) -> tuple[pstats.Stats, float]:
    async with open_client(kind, base_url, 1) as call:
        await run_workers(call, 1, 200)
        profiler = cProfile.Profile()
        profiler.enable()
        batch = await run_workers(call, 1, n)
        profiler.disable()
    if batch.errors:
        raise BenchmarkError(f"{kind}: {batch.errors} failed checks while profiling: {batch.first_error}")
    return pstats.Stats(profiler), batch.elapsed


def _by_package(stats: pstats.Stats, n: int) -> dict[str, float]:
    totals: dict[str, float] = defaultdict(float)
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    for (filename, _line, funcname), (_cc, _nc, tottime, _ct, _callers) in raw.items():
        totals[_package(filename, funcname)] += tottime
    return {k: v / n * 1e6 for k, v in totals.items()}


def _top(stats: pstats.Stats, n: int, top: int) -> list[dict[str, Any]]:
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    rows = sorted(raw.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    out = []
    for (filename, line, funcname), (_cc, ncalls, tottime, cumtime, _callers) in rows:
        short = filename.split("site-packages/")[-1].split(_REPO)[-1]
        short = short.split(f"lib/python{sys.version_info[0]}.{sys.version_info[1]}/")[-1]
        out.append(
            {
                "function": f"{short}:{line}({funcname})",
                "calls_per_check": ncalls / n,
                "tottime_us_per_check": tottime / n * 1e6,
                "cumtime_us_per_check": cumtime / n * 1e6,
            }
        )
    return out


def run(base_url: str, quick: bool = False, top: int = 20) -> Section:
    """Step costs and per-package cProfile comparison; returns tables and raw results."""
    n = 500 if quick else 3000
    section = Section("Where Guard's time goes (profiles)")
    steps = step_costs(base_url)
    total = sum(
        us
        for name, us, _ in steps
        if not any(w in name for w in ("cache", "overlaps", "breaker")) and not math.isnan(us)
    )
    section.tables.append(
        (
            "Step costs of Guard.acheck outside the HTTP client, µs per call (timeit, no I/O)",
            table(
                ("step", "µs", "where"),
                [*steps, ("sum, default httpx transport (cache off, breaker off, no overlap)", total, "")],
            ),
        )
    )
    layer_n = 5000 if quick else 20000
    layer, layer_top = guard_layer(base_url, layer_n, 15)
    section.tables.append(
        (
            f"Guard's own work: a check on a transport that answers at once without I/O, µs per call "
            f"(best of 3 loops of {layer_n:,})",
            table(("call", "µs"), list(layer.items())),
        )
    )
    section.tables.append(
        (
            "cProfile top 15 functions by own time, Guard.acheck on the canned transport",
            table(
                ("function", "calls/check", "own µs/check", "cum µs/check"),
                [
                    (t["function"], t["calls_per_check"], t["tottime_us_per_check"], t["cumtime_us_per_check"])
                    for t in layer_top
                ],
            ),
        )
    )
    profiles: dict[str, Any] = {}
    for guard_kind, raw_kind in PAIRS:
        g_stats, g_elapsed = asyncio.run(_profile_loop(guard_kind, base_url, n))
        r_stats, r_elapsed = asyncio.run(_profile_loop(raw_kind, base_url, n))
        g_pkg, r_pkg = _by_package(g_stats, n), _by_package(r_stats, n)
        names = sorted(set(g_pkg) | set(r_pkg), key=lambda k: g_pkg.get(k, 0.0) - r_pkg.get(k, 0.0), reverse=True)
        rows = [
            (name, g_pkg.get(name, 0.0), r_pkg.get(name, 0.0), g_pkg.get(name, 0.0) - r_pkg.get(name, 0.0))
            for name in names
            if max(g_pkg.get(name, 0.0), r_pkg.get(name, 0.0)) >= 1.0
        ]
        rows.append(
            (
                "wall time per check (under the profiler)",
                g_elapsed / n * 1e6,
                r_elapsed / n * 1e6,
                (g_elapsed - r_elapsed) / n * 1e6,
            )
        )
        section.tables.append(
            (
                f"cProfile, {LABELS[guard_kind]} vs {LABELS[raw_kind]}: own time per check by package, µs "
                f"({n:,} sequential checks)",
                table(("package", "Guard", "raw", "Guard − raw"), rows),
            )
        )
        g_top = _top(g_stats, n, top)
        section.tables.append(
            (
                f"cProfile top {top} functions by own time, {LABELS[guard_kind]}",
                table(
                    ("function", "calls/check", "own µs/check", "cum µs/check"),
                    [
                        (t["function"], t["calls_per_check"], t["tottime_us_per_check"], t["cumtime_us_per_check"])
                        for t in g_top
                    ],
                ),
            )
        )
        profiles[guard_kind] = {
            "by_package_us": g_pkg,
            "raw_by_package_us": r_pkg,
            "wall_us": g_elapsed / n * 1e6,
            "raw_wall_us": r_elapsed / n * 1e6,
            "top": g_top,
        }
    section.results = {
        "checks_profiled": n,
        "steps_us": {name: us for name, us, _ in steps},
        "guard_layer_us": layer,
        "guard_layer_top": layer_top,
        "profiles": profiles,
    }
    return section


def main() -> None:
    from ._common import ServerProcess, prepare_process

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    prepare_process(0)
    with ServerProcess(core=1) as server:
        section = run(server.base_url, args.quick, args.top)
    print(section.render())


if __name__ == "__main__":
    main()
