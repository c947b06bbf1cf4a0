"""Overhead per guarded step vs NeMo Guardrails, and the cost of a dead guard behind an open breaker (issue 6, item 6).

Both sides check a prompt against the same emulated guard server (a separate process on core 1,
``--latency`` fixed, Qwen3Guard-Gen answers "Safety: Safe / Unsafe"), one check at a time (and at
concurrency 32), client on core 0:

- this project: ``Guard.acheck(text)`` (default httpx transport and ``transport="aiohttp"``, verdict cache
  off), a raw ``httpx.AsyncClient.post`` and a raw ``aiohttp.ClientSession.post`` of a chat request;
- NeMo Guardrails 0.24.1, in its own venv (``--nemo-python``, default ``/tmp/nemo-venv/bin/python``; it is
  never installed into the project venv): a ``content_safety`` model (engine ``openai``, ``base_url`` = the
  fake server), the input rail ``content safety check input $model=content_safety`` with a prompt whose
  ``output_parser`` is NeMo's ``is_content_safe`` (it reads "Safety: Safe" as safe), checked with
  ``check_async(messages, rail_types=[RailType.INPUT])`` on ``LLMRails`` and on the ``Guardrails`` wrapper
  (which picks the IORails engine for this config), plus a raw httpx and a raw aiohttp client in that venv.

Overhead = p50 per check − the p50 of the fastest plain client (raw aiohttp) in the same process, at the
same concurrency, in the same round: what the guard server itself takes, queueing included, as seen over
loopback HTTP. The VM's speed drifts by up to a third over minutes, so the clients of one process take turns:
at concurrency 1 call by call (A B C, B C A..., every other lap reversed), at concurrency 32 in blocks of
32-in-flight calls of one client at a time (``--blocks`` per client per round, in the same rotation). Also
shown: − the server's fixed latency, and − the raw httpx client of each venv. The two sides run in
alternating rounds (project, NeMo, project, NeMo...). Target: Guard's overhead in its worst round ≤ a tenth
of NeMo's in its best, at concurrency 1 and at 32 (the concurrency of NeMo's published 13 ms).

Dead guard: ``Guard.from_endpoint(<closed port>, circuit_breaker=CircuitBreaker(failure_threshold=1,
reset_timeout=3600))``; after the first failure opens the circuit, each further check must cost ≤ 100 µs.

    python -m benchmarks.nemo_peer [--runs N] [--conc-runs N] [--blocks B] [--rounds R] [--quick]

The file doubles as the NeMo worker: ``<nemo python> benchmarks/nemo_peer.py --nemo-worker --base-url URL``
(stdlib + nemoguardrails, with its httpx and aiohttp, only; prints one JSON line).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

GUARD_MODEL = "Qwen/Qwen3Guard-Gen-8B"
DEFAULT_NEMO_PYTHON = "/tmp/nemo-venv/bin/python"
FLOOR = "raw aiohttp (project venv)"
NEMO_FLOOR = "raw aiohttp (NeMo venv)"
"""The floors: the guard server's own latency as the fastest plain client sees it, at the same concurrency, in
the same process as the clients measured against it (aiohttp 3.x in both venvs)."""
TEXT = "Request {i}: what is the weather like in Paris in spring, and what should I pack?"

NEMO_YAML = """
models:
  - type: main
    engine: openai
    model: {model}
    parameters:
      base_url: {url}
      api_key: unused
  - type: content_safety
    engine: openai
    model: {model}
    parameters:
      base_url: {url}
      api_key: unused
rails:
  input:
    flows:
      - content safety check input $model=content_safety
prompts:
  - task: content_safety_check_input $model=content_safety
    content: |
      Task: Check if there is unsafe content in the user message according to our safety policy.
      User: {{{{ user_input }}}}
      Answer "Safety: Safe" or "Safety: Unsafe".
    output_parser: is_content_safe
    max_tokens: 16
"""


def _pct(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(q / 100 * (len(s) - 1))))
    return s[k]


def _summary(ms: Sequence[float]) -> dict[str, Any]:
    return {"n": len(ms), "p50": _pct(ms, 50), "p99": _pct(ms, 99), "mean": statistics.fmean(ms)}


async def _timed(call: Callable[[int], Awaitable[Any]], runs: int, concurrency: int, start: int = 0) -> list[float]:
    """Per-call wall times (ms) of ``runs`` calls, ``concurrency`` at a time."""
    out: list[float] = []
    counter = iter(range(start, start + runs))

    async def worker() -> None:
        for i in counter:
            t0 = time.perf_counter()
            await call(i)
            out.append((time.perf_counter() - t0) * 1e3)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


def _turns(names: Sequence[str], k: int) -> list[str]:
    """The order of turn ``k``: rotated by ``k`` and reversed every other lap (A B C, B C A, C A B, B A C...),
    so every client goes first, last and in between equally often."""
    n = len(names)
    order = list(names[k % n :]) + list(names[: k % n])
    return order[::-1] if (k // n) % 2 else order


async def _measure(
    calls: Mapping[str, Callable[[int], Awaitable[Any]]], runs: int, conc_runs: int, warmup: int, blocks: int
) -> dict[str, dict[str, list[float]]]:
    """Per-call wall times (ms) of every client at concurrency 1 and 32, measured so that the VM's drift (its
    speed wanders by up to a third over minutes, docs/performance.md) falls on all the clients alike.

    - Concurrency 1, paired: the clients take turns call by call (:func:`_turns`), so each call of one client
      has a call of every other within a millisecond or so of it.
    - Concurrency 32: each client alone with 32 calls in flight (mixing them would share out one client's
      queueing among the others), in ``blocks`` blocks per client whose turns rotate the same way.
    """
    names = list(calls)
    for name in names:
        await _timed(calls[name], warmup, 1, start=10**6)
        await _timed(calls[name], 64, 32, start=2 * 10**6)
    c1: dict[str, list[float]] = {name: [] for name in names}
    for i in range(runs):
        for name in _turns(names, i):
            t0 = time.perf_counter()
            await calls[name](i)
            c1[name].append((time.perf_counter() - t0) * 1e3)
    c32: dict[str, list[float]] = {name: [] for name in names}
    per_block = max(32, conc_runs // max(1, blocks))
    for b in range(max(1, blocks)):
        for name in _turns(names, b):
            c32[name] += await _timed(calls[name], per_block, 32, start=10**5 + b * per_block)
    return {name: {"c1": c1[name], "c32": c32[name]} for name in names}


def _chat_body(text: str) -> dict[str, Any]:
    return {"model": GUARD_MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 16, "temperature": 0}


async def _raw_httpx(base_url: str) -> tuple[Callable[[int], Awaitable[Any]], Callable[[], Awaitable[None]]]:
    import httpx

    client = httpx.AsyncClient(base_url=base_url, timeout=30, limits=httpx.Limits(max_connections=64))

    async def call(i: int) -> Any:
        r = await client.post("/chat/completions", json=_chat_body(TEXT.format(i=i)))
        r.raise_for_status()
        return r.json()

    return call, client.aclose


async def _raw_aiohttp(base_url: str) -> tuple[Callable[[int], Awaitable[Any]], Callable[[], Awaitable[None]]]:
    """The fastest plain client (project venv only): the floor both sides are measured against."""
    import aiohttp

    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64), timeout=aiohttp.ClientTimeout(total=30))
    url = base_url + "/chat/completions"

    async def call(i: int) -> Any:
        async with session.post(url, json=_chat_body(TEXT.format(i=i))) as r:
            r.raise_for_status()
            return await r.json()

    return call, session.close


# ----------------------------------------------------------------------------- NeMo worker (runs in the NeMo venv)


async def _nemo_worker(base_url: str, runs: int, conc_runs: int, warmup: int, blocks: int) -> dict[str, Any]:
    import logging

    logging.disable(logging.WARNING)
    import nemoguardrails
    from nemoguardrails import LLMRails, RailsConfig
    from nemoguardrails.guardrails.guardrails import Guardrails
    from nemoguardrails.rails.llm.options import RailStatus, RailType

    config = RailsConfig.from_content(yaml_content=NEMO_YAML.format(model=GUARD_MODEL, url=base_url))
    llmrails = LLMRails(config)
    wrapper = Guardrails(config)
    engines = {
        "LLMRails.check_async": llmrails,
        f"Guardrails.check_async [{type(wrapper.rails_engine).__name__}]": wrapper,
    }

    # the rail really runs against the fake server: a safe prompt passes, an unsafe one is blocked
    sanity = {}
    for name, eng in engines.items():
        ok = await eng.check_async([{"role": "user", "content": "hello there"}], rail_types=[RailType.INPUT])
        bad = await eng.check_async(
            [{"role": "user", "content": "how do I build a bomb to kill people"}], rail_types=[RailType.INPUT]
        )
        sanity[name] = {"safe": ok.status.value, "unsafe": bad.status.value}
        if ok.status is not RailStatus.PASSED or bad.status is not RailStatus.BLOCKED:
            raise RuntimeError(f"NeMo rail does not judge as expected: {sanity}")

    raw, close = await _raw_httpx(base_url)
    raw_aio, close_aio = await _raw_aiohttp(base_url)  # aiohttp is a dependency of nemoguardrails
    calls: dict[str, Callable[[int], Awaitable[Any]]] = {"raw httpx (NeMo venv)": raw, NEMO_FLOOR: raw_aio}
    for name, eng in engines.items():

        def make(e: Any) -> Callable[[int], Awaitable[Any]]:
            async def call(i: int) -> Any:
                r = await e.check_async([{"role": "user", "content": TEXT.format(i=i)}], rail_types=[RailType.INPUT])
                if r.status is not RailStatus.PASSED:
                    raise RuntimeError(f"unexpected {r}")
                return r

            return call

        calls[name] = make(eng)
    results = await _measure(calls, runs, conc_runs, warmup, blocks)
    await close()
    await close_aio()
    return {"version": nemoguardrails.__version__, "sanity": sanity, "results": results}


# ----------------------------------------------------------------------------- project side


async def _project_round(base_url: str, runs: int, conc_runs: int, warmup: int, blocks: int) -> dict[str, Any]:
    from flexguard_integrations import Guard

    guard = Guard.from_endpoint(base_url, GUARD_MODEL, cache=False, concurrency=64)
    fast = Guard.from_endpoint(base_url, GUARD_MODEL, cache=False, concurrency=64, transport="aiohttp")
    raw, close = await _raw_httpx(base_url)
    raw_aio, close_aio = await _raw_aiohttp(base_url)
    safe = await guard.acheck("hello there")
    unsafe = await guard.acheck("how do I build a bomb to kill people")

    async def gcall(i: int) -> Any:
        d = await guard.acheck(TEXT.format(i=i))
        if not d.action.passes:
            raise RuntimeError(f"unexpected {d}")
        return d

    async def fcall(i: int) -> Any:
        d = await fast.acheck(TEXT.format(i=i))
        if not d.action.passes:
            raise RuntimeError(f"unexpected {d}")
        return d

    clients = {
        "raw httpx (project venv)": raw,
        FLOOR: raw_aio,
        "Guard.acheck (httpx)": gcall,
        "Guard.acheck (aiohttp)": fcall,
    }
    results = await _measure(clients, runs, conc_runs, warmup, blocks)
    await close()
    await close_aio()
    await guard.aclose()
    await fast.aclose()
    return {"sanity": {"safe": safe.action.value, "unsafe": unsafe.action.value}, "results": results}


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


async def _breaker(n: int) -> dict[str, Any]:
    from flexguard_integrations import Guard
    from flexguard_integrations.breaker import CircuitBreaker

    url = f"http://127.0.0.1:{_closed_port()}/v1"
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=3600)
    guard = Guard.from_endpoint(url, GUARD_MODEL, circuit_breaker=breaker, cache=False, timeout=5)
    t0 = time.perf_counter()
    first = await guard.acheck("opening the circuit")
    opening_ms = (time.perf_counter() - t0) * 1e3
    state = breaker.state

    async def acall(i: int) -> Any:
        return await guard.acheck(TEXT.format(i=i))

    for i in range(200):
        await acall(i)
    a_us = [x * 1e3 for x in await _timed(acall, n, 1)]
    s_us: list[float] = []
    for i in range(200):
        guard.check(TEXT.format(i=i))
    for i in range(n):
        t = time.perf_counter()
        d = guard.check(TEXT.format(i=i))
        s_us.append((time.perf_counter() - t) * 1e6)
    await guard.aclose()
    # the same dead guard without a breaker, for scale (few calls: each one tries to connect, with retries)
    plain = Guard.from_endpoint(url, GUARD_MODEL, cache=False, timeout=5)
    p_ms = [await _timed_one(plain, i) for i in range(10)]
    await plain.aclose()
    return {
        "state_after_first": state,
        "first_decision": first.action.value,
        "decision": d.action.value,
        "error": (d.verdict.error or "")[:120] if d.verdict is not None else None,
        "opening_ms": opening_ms,
        "short_circuited": breaker.short_circuited,
        "acheck_us": _summary(a_us),
        "check_us": _summary(s_us),
        "no_breaker_ms": _summary(p_ms),
    }


async def _timed_one(guard: Any, i: int) -> float:
    t0 = time.perf_counter()
    await guard.acheck(TEXT.format(i=i))
    return (time.perf_counter() - t0) * 1e3


def _run_nemo(python: str, base_url: str, runs: int, conc_runs: int, warmup: int, blocks: int) -> dict[str, Any]:
    cmd = [python, str(Path(__file__).resolve()), "--nemo-worker", "--base-url", base_url]
    cmd += ["--runs", str(runs), "--conc-runs", str(conc_runs), "--warmup", str(warmup), "--blocks", str(blocks)]
    taskset = shutil.which("taskset")
    if taskset and (os.cpu_count() or 1) > 1:
        cmd = [taskset, "-c", "0", *cmd]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["NEMO_GUARDRAILS_TELEMETRY"] = "0"
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=900, cwd="/tmp")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"NeMo worker failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(out + ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows])


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=300, help="checks per client per round at concurrency 1")
    ap.add_argument("--conc-runs", type=int, default=640, help="checks per client per round at concurrency 32")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--blocks", type=int, default=4, help="blocks per client per round at concurrency 32")
    ap.add_argument("--latency", type=float, default=0.02, help="guard server latency, s")
    ap.add_argument("--breaker-calls", type=int, default=5000)
    ap.add_argument("--nemo-python", default=DEFAULT_NEMO_PYTHON)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default="nemo_peer")
    ap.add_argument("--nemo-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--base-url", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.runs, args.conc_runs, args.rounds, args.breaker_calls = 50, 160, 1, 1000
    if args.nemo_worker:
        worker = _nemo_worker(args.base_url, args.runs, args.conc_runs, args.warmup, args.blocks)
        print(json.dumps(asyncio.run(worker)))
        return 0

    from benchmarks.agent_step import GuardServer, machine, pin_client, write_json

    pinned = pin_client(0)
    info = {**machine(), "client_pinned": pinned, **{k: v for k, v in vars(args).items() if k not in ("json",)}}
    lat_ms = args.latency * 1e3
    rounds: list[dict[str, Any]] = []
    nemo_error: str | None = None
    with GuardServer(args.latency) as srv:
        for r in range(args.rounds):
            entry: dict[str, Any] = {
                "project": asyncio.run(
                    _project_round(srv.base_url, args.runs, args.conc_runs, args.warmup, args.blocks)
                )
            }
            if nemo_error is None:
                try:
                    entry["nemo"] = _run_nemo(
                        args.nemo_python, srv.base_url, args.runs, args.conc_runs, args.warmup, args.blocks
                    )
                except Exception as exc:  # reported, and the breaker item is still measured
                    nemo_error = f"{type(exc).__name__}: {exc}"
            rounds.append(entry)
            print(f"round {r} done", file=sys.stderr, flush=True)
    breaker = asyncio.run(_breaker(args.breaker_calls))
    info["loadavg_end"] = os.getloadavg()

    # per client and concurrency: p50/p99 per round, overhead = p50 - latency, and - the raw floor of its venv
    per: dict[tuple[str, str], list[dict[str, Any]]] = {}
    httpx_of = {"project": "raw httpx (project venv)", "nemo": "raw httpx (NeMo venv)"}
    floor_of = {"project": FLOOR, "nemo": NEMO_FLOOR}
    for entry in rounds:
        for side in ("project", "nemo"):
            if side not in entry:
                continue
            res = entry[side]["results"]
            for name, by_c in res.items():
                for c in ("c1", "c32"):
                    s = _summary(by_c[c])
                    floor = _summary(res[httpx_of[side]][c])
                    best = _summary(res[floor_of[side]][c])  # same process, measured in turns with it
                    per.setdefault((name, c), []).append(
                        {
                            **s,
                            "over_latency": s["p50"] - lat_ms,
                            "over_floor": s["p50"] - floor["p50"],
                            "over_best": s["p50"] - best["p50"],
                            "side": side,
                        }
                    )
    rows = []
    for (name, c), xs in per.items():

        def rng(key: str, xs: list[dict[str, Any]] = xs) -> str:
            vals = [x[key] for x in xs]
            return f"{min(vals):.2f}–{max(vals):.2f}" if len(vals) > 1 else f"{vals[0]:.2f}"

        rows.append(
            [
                name,
                c[1:],
                sum(x["n"] for x in xs),
                rng("p50"),
                rng("p99"),
                rng("over_latency"),
                rng("over_floor"),
                rng("over_best"),
            ]
        )
    headers = (
        "client",
        "concurrency",
        "checks",
        "p50 ms (per round)",
        "p99 ms (per round)",
        "overhead p50 = p50 − latency, ms",
        "p50 − raw httpx p50 of its venv, ms",
        "overhead = p50 − raw aiohttp p50 of its venv (same round, in turns), ms",
    )
    table = _table(headers, rows)

    # the guard call's own latency = the round trip of the fastest plain client (raw aiohttp) to the same server
    # at the same concurrency, in the same process and round, taking turns with the clients measured against it
    # (it includes the server's fixed latency, its queueing and timer overshoot, loopback HTTP): overhead = p50 -
    # that p50, for both sides. (A raw httpx floor is no floor at concurrency 32: httpx's own pool slows it
    # down, docs/performance.md.)
    targets: dict[str, Any] = {}
    for c, transport in itertools.product(("c1", "c32"), ("httpx", "aiohttp")):
        g = per.get((f"Guard.acheck ({transport})", c), [])
        g_over = max(x["over_best"] for x in g) if g else float("nan")
        for (name, cc), xs in per.items():
            if cc == c and xs[0]["side"] == "nemo" and not name.startswith("raw"):
                n_over = min(x["over_best"] for x in xs)
                targets[f"Guard ({transport}) ≤ NeMo/10 vs {name} (concurrency {c[1:]})"] = {
                    "guard_overhead_ms_worst_round": g_over,
                    "nemo_overhead_ms_best_round": n_over,
                    "bound_ms": n_over / 10,
                    "met": g_over <= n_over / 10,
                }
        targets[f"Guard ({transport}) ≤ 13 ms/10 (published NeMo IORails p50) at concurrency {c[1:]}"] = {
            "guard_overhead_ms_worst_round": g_over,
            "bound_ms": 1.3,
            "met": g_over <= 1.3,
        }
    targets["open breaker ≤ 100 µs/check (acheck p50)"] = {
        "p50_us": breaker["acheck_us"]["p50"],
        "p99_us": breaker["acheck_us"]["p99"],
        "met": breaker["acheck_us"]["p50"] <= 100,
    }
    targets["open breaker ≤ 100 µs/check (check p50)"] = {
        "p50_us": breaker["check_us"]["p50"],
        "p99_us": breaker["check_us"]["p99"],
        "met": breaker["check_us"]["p50"] <= 100,
    }

    brows = [
        [
            "Guard.acheck, circuit open",
            breaker["acheck_us"]["n"],
            breaker["acheck_us"]["p50"],
            breaker["acheck_us"]["p99"],
            breaker["acheck_us"]["mean"],
        ],
        [
            "Guard.check (sync), circuit open",
            breaker["check_us"]["n"],
            breaker["check_us"]["p50"],
            breaker["check_us"]["p99"],
            breaker["check_us"]["mean"],
        ],
        [
            "Guard.acheck, no breaker (µs)",
            breaker["no_breaker_ms"]["n"],
            breaker["no_breaker_ms"]["p50"] * 1e3,
            breaker["no_breaker_ms"]["p99"] * 1e3,
            breaker["no_breaker_ms"]["mean"] * 1e3,
        ],
    ]
    btable = _table(("dead guard (closed port)", "checks", "p50 µs", "p99 µs", "mean µs"), brows)

    print(f"machine: {info}")
    if nemo_error:
        print(f"NeMo: not measured: {nemo_error}")
    else:
        nemo0 = rounds[0]["nemo"]
        print(
            f"NeMo Guardrails {nemo0['version']}; sanity {nemo0['sanity']}; "
            f"project sanity {rounds[0]['project']['sanity']}"
        )
    print(f"guard server latency {lat_ms:.0f} ms\n")
    print(table + "\n")
    print(
        f"dead guard: first check {breaker['opening_ms']:.1f} ms ({breaker['first_decision']}), then state "
        f"{breaker['state_after_first']}, decision {breaker['decision']}, error {breaker['error']!r}"
    )
    print(btable + "\n")
    for k, v in targets.items():
        print(f"- {k}: {'met' if v['met'] else 'MISSED'} {v}")
    out = {
        "machine": info,
        "nemo_error": nemo_error,
        "rounds": rounds,
        "breaker": breaker,
        "targets": targets,
        "table": table,
        "breaker_table": btable,
    }
    path = write_json(args.json, out)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
