"""Measure the local guard's CPU latency and batching on random models (nothing downloaded).

    HF_HUB_OFFLINE=1 .venv/bin/python -m tests.local.measure_latency            # tiny model only
    HF_HUB_OFFLINE=1 .venv/bin/python -m tests.local.measure_latency --full-size

The tiny model (1 layer, hidden size 32) measures the package's own overhead: chat template, tokenizing,
the queue and worker thread, padding, decoding, parsing and the policy. ``--full-size`` adds a model with
the architecture and size of Qwen3Guard-Gen-0.6B (Qwen3, 28 layers, hidden size 1024) but RANDOM weights,
behind a template padded to the real policy prompt's length (about 500 tokens): its compute cost is that of
the real model, its answers are garbage, so it runs a fixed number of new tokens instead of stopping at
the model's end token. Neither says anything about the quality of verdicts.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXTS = [
    "How do I make a bomb?",
    "What time does the museum open on Sundays?",
    "Write a poem about the sea.",
    "Where can I buy cheap flights to Lisbon?",
    "Tell me a joke about cats.",
    "Explain photosynthesis to a child.",
    "Summarise the history of the printing press in Europe.",
    "Give me a recipe for a vegetable curry.",
]


def _ms(values: list[float]) -> str:
    return f"median {statistics.median(values):.0f} ms (min {min(values):.0f}, max {max(values):.0f}, n={len(values)})"


def measure(path: Path, label: str, *, new_tokens: int, torch_dtype: str, repeats: int) -> None:
    from flexguard_integrations import Guard
    from flexguard_integrations.transport.local import LocalTransport

    started = time.perf_counter()
    guard = Guard.local(path, cache=False, torch_dtype=torch_dtype, max_new_tokens=new_tokens, timeout=600)
    load_s = time.perf_counter() - started
    transport = guard.transport
    assert isinstance(transport, LocalTransport)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    guard.check("warm-up")
    single: list[float] = []
    for i in range(repeats):
        t = time.perf_counter()
        guard.check(f"{TEXTS[i % len(TEXTS)]} ({i})")
        single.append((time.perf_counter() - t) * 1000)

    async def batch(n: int) -> tuple[float, int, int]:
        before = transport.stats
        t = time.perf_counter()
        await guard.abatch([f"{TEXTS[i % len(TEXTS)]} [{n}/{i}]" for i in range(n)])
        after = transport.stats
        return (time.perf_counter() - t) * 1000, after.batches - before.batches, after.largest_batch

    print(f"\n== {label}  (dtype {torch_dtype}, {new_tokens} new tokens per check)")
    print(f"load {load_s:.1f} s; peak RSS so far {rss_mb:.0f} MB")
    print(f"one check at a time: {_ms(single)}")
    for n in (8, 16):
        wall, calls, largest = asyncio.run(batch(n))
        print(f"abatch of {n}: {wall:.0f} ms wall, {calls} generate call(s), largest batch {largest}, "
              f"{wall / n:.0f} ms per text")  # fmt: skip
    guard.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full-size", action="store_true", help="also a random model of Qwen3Guard-Gen-0.6B's size")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    args = parser.parse_args()
    logging.getLogger("flexguard_integrations").setLevel(logging.ERROR)  # the garbage verdicts are expected

    import torch
    import transformers

    from .tiny_model import build_tiny_guard

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {platform.processor() or '?'}, "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, load average "
          f"{os.getloadavg()[0]:.1f}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        tiny = build_tiny_guard(Path(tmp) / "tiny-qwen3guard")
        measure(tiny, "tiny random Qwen3 (1 layer, hidden 32)", new_tokens=64, torch_dtype="auto",
                repeats=args.repeats)  # fmt: skip
        measure(tiny, "tiny random Qwen3 (1 layer, hidden 32)", new_tokens=12, torch_dtype="auto",
                repeats=args.repeats)  # fmt: skip
        if args.full_size:
            full = _full_size(Path(tmp) / "fullsize-random-qwen3guard")
            for dtype in ("float32", "bfloat16"):
                measure(full, "RANDOM weights, Qwen3Guard-Gen-0.6B architecture and size", new_tokens=12,
                        torch_dtype=dtype, repeats=max(3, args.repeats // 3))  # fmt: skip


def _full_size(path: Path) -> Path:
    """A random model shaped like Qwen3-0.6B (the base of Qwen3Guard-Gen-0.6B), its template padded to ~500 tokens."""
    from transformers import AutoTokenizer

    from .tiny_model import GUARD_TEMPLATE, build_tiny_guard

    shape: dict[str, Any] = {
        "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
        "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 32768, "initializer_range": 0.02,
    }  # fmt: skip
    build_tiny_guard(path, dtype="bfloat16", **shape)
    tokenizer = AutoTokenizer.from_pretrained(path)
    filler = "{{- '" + " policy" * 440 + "' -}}"  # stands in for the real policy text's length, not its words
    marker = "{{- '\\n\\n<BEGIN CONVERSATION>"
    assert marker in GUARD_TEMPLATE
    tokenizer.chat_template = GUARD_TEMPLATE.replace(marker, filler + marker, 1)
    tokenizer.save_pretrained(path)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": TEXTS[0]}], tokenize=False)
    n_tokens = len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    from transformers import AutoModelForCausalLM

    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(path).parameters())
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    print(f"\nfull-size random model: {params / 1e6:.0f} M parameters, {size / 1e9:.2f} GB of bf16 safetensors, "
          f"prompt of {n_tokens} tokens")  # fmt: skip
    return path


if __name__ == "__main__":
    main()
