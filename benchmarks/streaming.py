"""Streaming moderation cost (issue 6, item 4): added time to first token and text held back.

A fake chat model streams ``--tokens`` tokens (words and the spaces between them, as
``GenericFakeChatModel`` splits them) with a fixed ``--token-delay`` after a fixed ``--ttft``; the guard is the
emulated guard server in a separate process (``--latency``, pinned to core 1; client on core 0). Measured
per configuration, over ``--runs`` streams in interleaved rounds, verdict cache off:

- time to first token (TTFT) and total stream time, and what they add over the unguarded ``model.astream``;
- what is held back, two ways: the ``StreamModerator``'s own ``stats`` (``max_held_chars`` /
  ``max_held_items``, read from the moderator the wrapper builds: a benchmark-only subclass of
  ``GuardedRunnable`` records it), and from outside, the most tokens the model had produced but the
  consumer had not yet received;
- the number of chunk checks per stream, and the most of them in flight at once (checks are pipelined:
  the stream keeps being pulled while they run).

Configurations: ``guarded(model)`` (input check, then the output held until checked) for a few
``stream_chunk_chars`` (the first window 50 characters, ``stream_first_chunk_chars``' default, or as big as
the others with ``stream_first_chunk_chars=None``), ``parallel_input=True`` (the stream starts with the input check),
``stream_first=True``, and ``check_input=False`` (output moderation only).

    python -m benchmarks.streaming [--runs N] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun
from langchain_core.messages import AIMessageChunk, BaseMessage, HumanMessage
from langchain_core.outputs import ChatGenerationChunk

from flexguard_integrations.langchain.runnable import GuardedRunnable
from flexguard_integrations.streaming import StreamModerator

from .agent_step import GUARD_MODEL, GuardServer, SleepyChatModel, machine, md_table, pct, pin_client, write_json

SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank today. "


class StreamingFakeModel(SleepyChatModel):
    """Streams ``n_tokens`` tokens: ``ttft`` before the first, ``token_delay`` between the others.

    ``produced`` counts the tokens handed out so far (read by the consumer to see what is held back).
    """

    n_tokens: int = 120
    ttft: float = 0.05
    token_delay: float = 0.01
    produced: int = 0

    def tokens(self) -> list[str]:
        words = (SENTENCE * (self.n_tokens // 10 + 2)).split(" ")
        out: list[str] = []
        for w in words:
            out += [w, " "]
        return out[: self.n_tokens]

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        self.produced = 0
        for i, tok in enumerate(self.tokens()):
            await asyncio.sleep(self.ttft if i == 0 else self.token_delay)
            self.produced = i + 1
            yield ChatGenerationChunk(message=AIMessageChunk(content=tok))


class RecordingGuarded(GuardedRunnable):
    """``GuardedRunnable`` that keeps the last StreamModerator it built (for its ``stats``); nothing else changes."""

    def _moderator(self, prompt: str, policy: Any, sample: list[Any]) -> StreamModerator[Any]:
        moderator = super()._moderator(prompt, policy, sample)
        object.__setattr__(self, "_last_moderator", moderator)
        return moderator


def recording_guarded(model: Any, guard: Any, **kw: Any) -> RecordingGuarded:
    return RecordingGuarded(bound=model, guard=guard, **kw)


async def one_stream(runnable: Any, model: StreamingFakeModel, i: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    first: float | None = None
    received_tokens = 0
    received_chars = 0
    max_behind_tokens = 0
    async for chunk in runnable.astream([HumanMessage(f"Request {i}: tell me about foxes and dogs.")]):
        text = chunk.content if isinstance(chunk.content, str) else ""
        if first is None and text:
            first = time.perf_counter()
        # tokens the model had produced but the consumer had not received (measured before counting this chunk)
        max_behind_tokens = max(max_behind_tokens, model.produced - received_tokens - 1)
        received_tokens += 1
        received_chars += len(text)
    total = time.perf_counter() - t0
    mod = getattr(runnable, "_last_moderator", None)
    return {
        "ttft_ms": ((first or time.perf_counter()) - t0) * 1e3,
        "total_ms": total * 1e3,
        "tokens": received_tokens,
        "chars": received_chars,
        "max_behind_tokens": max(0, max_behind_tokens),
        "held_chars": mod.stats.max_held_chars if mod else 0,
        "held_items": mod.stats.max_held_items if mod else 0,
        "checks": mod.stats.checks if mod else 0,
        "in_flight": mod.stats.max_in_flight if mod else 0,
    }


async def measure(base_url: str, n_tokens: int, ttft: float, delay: float, runs: int, rounds: int) -> dict[str, Any]:
    from flexguard_integrations import Guard

    guard = Guard.from_endpoint(base_url, GUARD_MODEL, cache=False)
    model = StreamingFakeModel(messages=iter([]), n_tokens=n_tokens, ttft=ttft, token_delay=delay)
    configs: dict[str, Any] = {"unguarded": model}
    for cc in (50, 200, 800):  # the first window is 50 (stream_first_chunk_chars' default)
        configs[f"guarded chunk={cc}"] = recording_guarded(model, guard, stream_chunk_chars=cc)
    for cc in (200, 800):  # the first window as big as the others (the default before first_chunk_chars)
        configs[f"guarded chunk={cc} first=None"] = recording_guarded(
            model, guard, stream_chunk_chars=cc, stream_first_chunk_chars=None
        )
    for cc in (50, 200):
        configs[f"guarded chunk={cc} parallel_input"] = recording_guarded(
            model, guard, stream_chunk_chars=cc, parallel_input=True
        )
    configs["guarded chunk=200 stream_first"] = recording_guarded(
        model, guard, stream_chunk_chars=200, stream_first=True
    )
    configs["guarded chunk=200 output only"] = recording_guarded(
        model, guard, stream_chunk_chars=200, check_input=False
    )
    # diagnostic: the wrapper's own per-chunk cost (LangChain run/stream machinery), no checks at all
    configs["wrapper only, no checks"] = recording_guarded(model, guard, check_input=False, check_output=False)
    out: dict[str, list[dict[str, Any]]] = {k: [] for k in configs}
    round_ttft: dict[str, list[float]] = {k: [] for k in configs}
    names = list(configs)
    counter = itertools.count()
    try:
        for name in names:  # warm-up
            await one_stream(configs[name], model, -1)
        per_round = max(1, runs // rounds)
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                this = [await one_stream(configs[name], model, next(counter)) for _ in range(per_round)]
                out[name] += this
                round_ttft[name].append(statistics.median(x["ttft_ms"] for x in this))
    finally:
        await guard.aclose()
    summary: dict[str, Any] = {}
    for name, xs in out.items():
        summary[name] = {
            "n": len(xs),
            "ttft_p50": pct([x["ttft_ms"] for x in xs], 50),
            "ttft_p99": pct([x["ttft_ms"] for x in xs], 99),
            "total_p50": pct([x["total_ms"] for x in xs], 50),
            "total_p99": pct([x["total_ms"] for x in xs], 99),
            "round_ttft_p50": round_ttft[name],
            "max_behind_tokens": max(x["max_behind_tokens"] for x in xs),
            "held_chars": max(x["held_chars"] for x in xs),
            "held_items": max(x["held_items"] for x in xs),
            "checks": statistics.median(x["checks"] for x in xs),
            "in_flight": max(x["in_flight"] for x in xs),
            "chars": xs[0]["chars"],
        }
    return summary


HEADERS = (
    "configuration",
    "n",
    "TTFT p50 ms",
    "TTFT p99",
    "TTFT p50 per round",
    "added TTFT p50",
    "total p50 ms",
    "added total p50",
    "checks/stream",
    "max checks in flight",
    "max held chars (stats)",
    "max held items (stats)",
    "max tokens behind (consumer)",
)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=120, help="tokens per stream (words and spaces)")
    ap.add_argument("--ttft", type=float, default=0.05, help="model time to first token, s")
    ap.add_argument("--token-delay", type=float, default=0.01, help="model inter-token delay, s")
    ap.add_argument("--latency", type=float, default=0.02, help="guard server latency, s")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default="streaming")
    args = ap.parse_args(argv)
    if args.quick:
        args.runs, args.rounds = 6, 1
    pinned = pin_client(0)
    info = {**machine(), "client_pinned": pinned, **{k: v for k, v in vars(args).items() if k != "json"}}
    with GuardServer(args.latency) as srv:
        res = asyncio.run(measure(srv.base_url, args.tokens, args.ttft, args.token_delay, args.runs, args.rounds))
    info["loadavg_end"] = os.getloadavg()
    ref = res["unguarded"]
    rows = []
    for name, r in res.items():
        rows.append(
            [
                name,
                r["n"],
                r["ttft_p50"],
                r["ttft_p99"],
                "–".join(f"{x:.1f}" for x in (min(r["round_ttft_p50"]), max(r["round_ttft_p50"]))),
                "—" if name == "unguarded" else r["ttft_p50"] - ref["ttft_p50"],
                r["total_p50"],
                "—" if name == "unguarded" else r["total_p50"] - ref["total_p50"],
                r["checks"],
                r["in_flight"],
                r["held_chars"],
                r["held_items"],
                r["max_behind_tokens"],
            ]
        )
    table = md_table(HEADERS, rows)
    print(f"machine: {info}")
    print(
        f"stream: {args.tokens} tokens ({ref['chars']} chars), model TTFT {args.ttft * 1e3:.0f} ms, "
        f"{args.token_delay * 1e3:.0f} ms/token; guard latency {args.latency * 1e3:.0f} ms"
    )
    print(table)
    path = write_json(args.json, {"machine": info, "results": res, "table": table})
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
