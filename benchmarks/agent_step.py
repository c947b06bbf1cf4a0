"""End-to-end cost of guarding one agent step (issue 6, item 3).

A fake chat model answers after a fixed latency T_model (``asyncio.sleep`` in ``_agenerate``); the guard is
the emulated guard server in a separate process (``python -m flexguard_integrations.testing --latency
T_guard``, pinned to core 1; the client is pinned to core 0). Measured, per (T_model, T_guard):

- ``create_agent(model)`` bare, with ``GuardMiddleware`` (input + output checks) and with
  ``GuardMiddleware(check_output=False)``, each also with ``speculative_input=True`` (the input check runs
  alongside the model call, in ``wrap_model_call``); and the whole agent wrapped as
  ``guarded(agent, parallel_input=True, check_output=False)``;
- the bare model, ``guarded(model, guard)`` sequential and ``parallel_input=True`` (speculative input check),
  each with ``check_output=False`` (input only) and with the output check.

Every configuration runs ``--runs`` times (default 60) in interleaved rounds, with the verdict cache off and a
distinct prompt per run. "Added" is the configuration's p50 (p99) minus its unguarded reference's p50 (p99).
Speculative target (input check only: ``guarded(..., parallel_input=True)`` and
``GuardMiddleware(speculative_input=True, check_output=False)``): added p50 <= max(0, T_guard - T_model) + 5 ms.
With the output check too, the response is checked after the model, so one T_guard more is expected.

    python -m benchmarks.agent_step [--runs N] [--rounds R] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.outputs import ChatGeneration, ChatResult

RESULTS = Path(__file__).resolve().parent / "results"
GUARD_MODEL = "Qwen/Qwen3Guard-Gen-8B"
ANSWER = "Sure. Here is a short, friendly answer about the weather in Paris: mild and sunny."


# ----------------------------------------------------------------------------- shared helpers


def pin_client(core: int = 0) -> bool:
    """Pin this process to ``core`` (what ``taskset -c 0`` does); False when the machine has too few cores."""
    if (os.cpu_count() or 1) <= core or not hasattr(os, "sched_setaffinity"):
        return False
    os.sched_setaffinity(0, {core})
    return True


class GuardServer:
    """The emulated guard server in its own process, pinned to ``core`` with taskset, on a free port."""

    def __init__(self, latency: float, core: int = 1, python: str = sys.executable) -> None:
        self.latency = latency
        self.core = core
        self.python = python
        self.base_url = ""
        self._proc: subprocess.Popen[str] | None = None
        self._lines: list[str] = []
        self._ready = threading.Event()

    def _drain(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            if not self._ready.is_set():
                self._lines.append(line)
                if "listening on" in line:
                    self._ready.set()
        self._ready.set()

    def __enter__(self) -> GuardServer:
        cmd = [self.python, "-m", "flexguard_integrations.testing", "--port", "0", "--latency", str(self.latency)]
        taskset = shutil.which("taskset")
        if taskset and self.core < (os.cpu_count() or 1):
            cmd = [taskset, "-c", str(self.core), *cmd]
        self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
        threading.Thread(target=self._drain, daemon=True).start()
        if not self._ready.wait(30):
            self.__exit__()
            raise RuntimeError("the guard server did not start")
        match = re.search(r"(http://127\.0\.0\.1:\d+)/v1", "".join(self._lines))
        if match is None:
            self.__exit__()
            raise RuntimeError(f"the guard server did not announce its address: {self._lines!r}")
        root = match.group(1)
        self.base_url = root + "/v1"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(root + "/health", timeout=1.0) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                time.sleep(0.05)
        self.__exit__()
        raise RuntimeError("the guard server never answered /health")

    def __exit__(self, *exc: object) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = max(0, min(len(s) - 1, round(q / 100 * (len(s) - 1))))
    return s[k]


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.2f}" if abs(v) < 100 else f"{v:.1f}"
        return str(v)

    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(out)


def machine() -> dict[str, Any]:
    return {"nproc": os.cpu_count(), "loadavg": os.getloadavg(), "python": sys.version.split()[0]}


def write_json(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


async def interleaved(
    calls: dict[str, Callable[[int], Awaitable[Any]]], runs: int, rounds: int, warmup: int = 3
) -> dict[str, dict[str, Any]]:
    """Run every call ``runs`` times in ``rounds`` rotated rounds; latencies in ms, per-round p50s."""
    names = list(calls)
    for name in names:
        for i in range(warmup):
            await calls[name](-1 - i)
    lat: dict[str, list[float]] = {n: [] for n in names}
    round_p50: dict[str, list[float]] = {n: [] for n in names}
    per_round = max(1, runs // rounds)
    seq = itertools.count()
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            this: list[float] = []
            for _ in range(per_round):
                i = next(seq)
                t0 = time.perf_counter()
                await calls[name](i)
                this.append((time.perf_counter() - t0) * 1e3)
            lat[name] += this
            round_p50[name].append(statistics.median(this))
    return {
        n: {"n": len(v), "p50": pct(v, 50), "p99": pct(v, 99), "mean": statistics.fmean(v), "round_p50": round_p50[n]}
        for n, v in lat.items()
    }


# ----------------------------------------------------------------------------- the fake model


class SleepyChatModel(GenericFakeChatModel):
    """``GenericFakeChatModel`` answering after ``latency`` seconds (async path: ``asyncio.sleep``).

    ``bind_tools`` returns self, so ``create_agent`` accepts it; it never calls a tool, so one agent step is
    one model call.
    """

    latency: float = 0.05

    def bind_tools(self, tools: Any, **kwargs: Any) -> SleepyChatModel:  # type: ignore[override]
        return self

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        await asyncio.sleep(self.latency)
        message = next(self.messages)
        message = AIMessage(content=message) if isinstance(message, str) else message
        return ChatResult(generations=[ChatGeneration(message=message)])


def sleepy_model(latency: float) -> SleepyChatModel:
    return SleepyChatModel(messages=itertools.cycle([ANSWER]), latency=latency)


# ----------------------------------------------------------------------------- the measurement


def prompt(i: int) -> str:
    return f"Request {i}: what is the weather like in Paris in spring, and what should I pack?"


async def measure_pair(base_url: str, t_model: float, t_guard: float, runs: int, rounds: int) -> dict[str, Any]:
    from langchain.agents import create_agent

    from flexguard_integrations import Guard
    from flexguard_integrations.langchain import GuardMiddleware, guarded

    guard = Guard.from_endpoint(base_url, GUARD_MODEL, cache=False)
    try:
        model = sleepy_model(t_model)
        agent_bare = create_agent(model, tools=[])
        agent_mw = create_agent(model, tools=[], middleware=[GuardMiddleware(guard)])
        agent_mw_in = create_agent(model, tools=[], middleware=[GuardMiddleware(guard, check_output=False)])
        agent_mw_spec = create_agent(model, tools=[], middleware=[GuardMiddleware(guard, speculative_input=True)])
        agent_mw_spec_in = create_agent(
            model, tools=[], middleware=[GuardMiddleware(guard, check_output=False, speculative_input=True)]
        )
        agent_spec = guarded(agent_bare, guard, parallel_input=True, check_output=False)
        g_seq_in = guarded(model, guard, check_output=False)
        g_par_in = guarded(model, guard, check_output=False, parallel_input=True)
        g_seq = guarded(model, guard)
        g_par = guarded(model, guard, parallel_input=True)

        def agent_call(r: Any) -> Callable[[int], Awaitable[Any]]:
            async def call(i: int) -> Any:
                out = await r.ainvoke({"messages": [HumanMessage(prompt(i))]})
                assert out["messages"][-1].content == ANSWER, out["messages"][-1].content
                return out

            return call

        def model_call(r: Any) -> Callable[[int], Awaitable[Any]]:
            async def call(i: int) -> Any:
                out = await r.ainvoke([HumanMessage(prompt(i))])
                assert out.content == ANSWER, out.content
                return out

            return call

        async def guard_only(i: int) -> Any:
            return await guard.acheck(prompt(i))

        calls = {
            "Guard.acheck alone": guard_only,
            "agent": agent_call(agent_bare),
            "agent+GuardMiddleware(in+out)": agent_call(agent_mw),
            "agent+GuardMiddleware(in)": agent_call(agent_mw_in),
            "agent+GuardMiddleware(in+out,speculative)": agent_call(agent_mw_spec),
            "agent+GuardMiddleware(in,speculative)": agent_call(agent_mw_spec_in),
            "guarded(agent,parallel,in)": agent_call(agent_spec),
            "model": model_call(model),
            "guarded(model,seq,in)": model_call(g_seq_in),
            "guarded(model,parallel,in)": model_call(g_par_in),
            "guarded(model,seq,in+out)": model_call(g_seq),
            "guarded(model,parallel,in+out)": model_call(g_par),
        }
        res = await interleaved(calls, runs, rounds)
    finally:
        await guard.aclose()
    return res


REFERENCE = {"agent": "agent", "model": "model", "Guard.acheck alone": ""}
SPECULATIVE = ("guarded(model,parallel,in)", "guarded(agent,parallel,in)", "agent+GuardMiddleware(in,speculative)")
EXPECTED_GUARD_CALLS = {
    "agent+GuardMiddleware(in+out)": 2,
    "agent+GuardMiddleware(in)": 1,
    "agent+GuardMiddleware(in+out,speculative)": 2,
    "agent+GuardMiddleware(in,speculative)": 1,
    "guarded(agent,parallel,in)": 1,
    "guarded(model,seq,in)": 1,
    "guarded(model,parallel,in)": 1,
    "guarded(model,seq,in+out)": 2,
    "guarded(model,parallel,in+out)": 2,
}


def rows_for(t_model: float, t_guard: float, res: dict[str, Any]) -> list[list[Any]]:
    rows = []
    g_eff = res["Guard.acheck alone"]["p50"]
    for name, r in res.items():
        ref = res["agent" if name.startswith(("agent", "guarded(agent")) else "model"]
        added50 = r["p50"] - ref["p50"]
        added99 = r["p99"] - ref["p99"]
        target = ""
        if name in SPECULATIVE:
            # strict: T_guard = the server's configured latency; effective: T_guard = a bare Guard.acheck's p50
            # (server latency + its sleep overshoot + loopback HTTP + Guard), T_model = the reference's p50
            bound = max(0.0, t_guard - t_model) * 1e3 + 5.0
            eff = max(0.0, g_eff - ref["p50"]) + 5.0
            target = (
                f"strict ≤ {bound:.1f}: {'met' if added50 <= bound else 'MISSED'}; "
                f"effective ≤ {eff:.1f}: {'met' if added50 <= eff else 'MISSED'}"
            )
        if name == "Guard.acheck alone":
            rows.append(
                [f"{t_model * 1e3:.0f}", f"{t_guard * 1e3:.0f}", name, r["n"], r["p50"], r["p99"], "", "—", "—", ""]
            )
            continue
        rp = r["round_p50"]
        rows.append(
            [
                f"{t_model * 1e3:.0f}",
                f"{t_guard * 1e3:.0f}",
                name,
                r["n"],
                r["p50"],
                r["p99"],
                f"{min(rp):.1f}–{max(rp):.1f}",
                "—" if name in REFERENCE else added50,
                "—" if name in REFERENCE else added99,
                target,
            ]
        )
    return rows


HEADERS = (
    "T_model ms",
    "T_guard ms",
    "configuration",
    "n",
    "p50 ms",
    "p99 ms",
    "p50 per round",
    "added p50",
    "added p99",
    "speculative target (added p50, ms)",
)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=60, help="runs per configuration (default 60)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model-latency", type=float, nargs="+", default=[0.05, 0.2])
    ap.add_argument("--guard-latency", type=float, nargs="+", default=[0.02, 0.1])
    ap.add_argument("--quick", action="store_true", help="10 runs per configuration, 1 round")
    ap.add_argument("--json", default="agent_step", help="results/<name>.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.runs, args.rounds = 10, 1
    pinned = pin_client(0)
    info = {**machine(), "client_pinned": pinned, "runs": args.runs, "rounds": args.rounds}
    results: dict[str, Any] = {}
    rows: list[list[Any]] = []
    for t_guard in args.guard_latency:
        with GuardServer(t_guard) as srv:
            for t_model in args.model_latency:
                res = asyncio.run(measure_pair(srv.base_url, t_model, t_guard, args.runs, args.rounds))
                results[f"model={t_model}/guard={t_guard}"] = res
                rows += rows_for(t_model, t_guard, res)
                print(f"done T_model={t_model} T_guard={t_guard}", file=sys.stderr, flush=True)
    info["loadavg_end"] = os.getloadavg()
    print(f"machine: {info}")
    print(md_table(HEADERS, rows))
    path = write_json(args.json, {"machine": info, "results": results, "table": md_table(HEADERS, rows)})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
