"""Qwen3Guard-Gen: Safe / Controversial / Unsafe, categories and, for responses, a refusal flag.

The server's chat template holds the whole safety policy, so a request carries only the conversation (no
system message). The answer looks like::

    Safety: Unsafe
    Categories: Violent
    Refusal: No            # response moderation only

Risk is the tier mapping Safe 0 / Controversial 50 / Unsafe 100, or with ``scoring="logprobs"`` the
expectation 50·P(Controversial) + 100·P(Unsafe) over the label token's ``top_logprobs``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

from ..errors import ConfigurationError
from ..verdict import Category, Verdict
from .base import GuardInput, GuardModel, register

Scoring = Literal["tier", "logprobs"]

TIER_SCORES: Mapping[str, float] = {"Safe": 0.0, "Controversial": 50.0, "Unsafe": 100.0}

_NATIVE: dict[str, Category] = {
    "VIOLENT": Category.VIOLENCE,
    "NON-VIOLENT ILLEGAL ACTS": Category.ILLEGAL,
    "SEXUAL CONTENT OR SEXUAL ACTS": Category.SEXUAL,
    "PII": Category.PRIVACY,
    "PERSONALLY IDENTIFIABLE INFORMATION": Category.PRIVACY,
    "SUICIDE & SELF-HARM": Category.SELF_HARM,
    "UNETHICAL ACTS": Category.UNETHICAL,
    "POLITICALLY SENSITIVE TOPICS": Category.MISINFORMATION,
    "COPYRIGHT VIOLATION": Category.COPYRIGHT,
    "JAILBREAK": Category.JAILBREAK,
}

_SAFETY = re.compile(
    r"Safety\s*:\s*\**\s*(Safe|Unsafe|Controversial)\b((?:\s*[,/|]\s*\**\s*(?:Safe|Unsafe|Controversial)\b)*)",
    re.IGNORECASE,
)
_LABEL_WORD = re.compile(r"Safe|Unsafe|Controversial", re.IGNORECASE)
_CATEGORIES = re.compile(r"^\W*Categories\s*:\s*(.*)$", re.IGNORECASE | re.MULTILINE)
_REFUSAL = re.compile(r"Refusal\s*:\s*\**\s*(Yes|No)\b", re.IGNORECASE)
_LABEL_PREFIX = re.compile(r"Safety\s*:\s*$", re.IGNORECASE)

_MEMO_MAX_ENTRIES = 1024
"""Distinct answers whose parsed fields a model keeps (Qwen3Guard says one of a few dozen things)."""
_MEMO_MAX_CHARS = 512
"""Longer answers are parsed every time (they are not the model's usual two or three lines)."""


def _label_of_token(token: str) -> str | None:
    """Which verdict label a generated token starts (``" Cont"`` is the first piece of Controversial)."""
    t = token.strip().lower()
    if not t:
        return None
    if t.startswith("unsafe") or (len(t) >= 2 and "unsafe".startswith(t)):
        return "Unsafe"
    if t.startswith("safe") or (len(t) >= 2 and "safe".startswith(t)):
        return "Safe"
    if t.startswith("cont") or (len(t) >= 3 and "controversial".startswith(t)):
        return "Controversial"
    return None


def expected_risk(top_logprobs: Sequence[Mapping[str, Any]]) -> tuple[float, dict[str, float]] | None:
    """Risk 0–100 as the expectation over the three label probabilities found among ``top_logprobs``.

    Probabilities of tokens that start the same label are summed, then renormalised over the three labels.
    Returns None when no label token is present.
    """
    mass = {"Safe": 0.0, "Controversial": 0.0, "Unsafe": 0.0}
    for alt in top_logprobs:
        if not isinstance(alt, Mapping):
            continue
        token, logprob = alt.get("token"), alt.get("logprob")
        if not isinstance(token, str) or not isinstance(logprob, int | float) or math.isnan(logprob):
            continue
        label = _label_of_token(token)
        if label is not None:  # a log-probability is at most 0: a larger one is clamped, not overflowed
            mass[label] += math.exp(min(max(float(logprob), -1e4), 0.0))
    total = sum(mass.values())
    if total <= 0.0:
        return None
    probs = {k: v / total for k, v in mass.items()}
    return 50.0 * probs["Controversial"] + 100.0 * probs["Unsafe"], probs


def _find_label_position(tokens: Sequence[Mapping[str, Any]]) -> int | None:
    """Index of the generated token that carries the verdict label (right after ``Safety:``)."""
    text = ""
    for i, entry in enumerate(tokens):
        if not isinstance(entry, Mapping):
            return None
        tok = entry.get("token")
        if not isinstance(tok, str):
            return None
        if _LABEL_PREFIX.search(text) and _label_of_token(tok) is not None:
            return i
        text += tok
        if len(text) > 200:
            return None
    return None


def _read_categories(line: str) -> tuple[list[str], list[Category]]:
    """The native names (as written) and unified categories of one ``Categories:`` line."""
    natives: list[str] = []
    cats: list[Category] = []
    for part in line.split(","):
        name = part.strip().strip("*").strip()
        if not name or name.upper() == "NONE":
            continue
        natives.append(name)
        cat = _NATIVE.get(name.upper(), Category.OTHER)
        if cat not in cats:
            cats.append(cat)
    return natives, cats


@register
class Qwen3GuardModel(GuardModel):
    """Qwen/Qwen3Guard-Gen-0.6B / 4B / 8B served with the model's own chat template."""

    family: ClassVar[str] = "qwen3guard"
    name_patterns: ClassVar[tuple[str, ...]] = (r"qwen3[-_ ]?guard",)
    native_categories: ClassVar[Mapping[str, Category]] = _NATIVE

    def __init__(self, *, scoring: Scoring = "tier", max_new_tokens: int = 64, top_logprobs: int = 5) -> None:
        if scoring not in ("tier", "logprobs"):
            raise ConfigurationError(f"qwen3guard scoring must be 'tier' or 'logprobs', not {scoring!r}")
        if max_new_tokens < 8:
            raise ConfigurationError("qwen3guard max_new_tokens must be at least 8")
        if not 1 <= top_logprobs <= 20:
            raise ConfigurationError("qwen3guard top_logprobs must be between 1 and 20 (vLLM's default cap)")
        self.scoring: Scoring = scoring
        self.max_new_tokens = max_new_tokens
        self.top_logprobs = top_logprobs
        # answer text -> the fields parse_output reads from it (tier scoring only: with logprobs the score
        # depends on more than the text). The answers repeat, and the regexes cost more than the lookup.
        self._parsed: dict[str, tuple[Any, ...]] = {}

    @property
    def template_version(self) -> str:
        return f"qwen3guard-chat-template/{self.scoring}"

    @property
    def prompt_overhead_chars(self) -> int:
        return 2600  # the rendered policy text is about 2.3k characters

    def build_messages(self, inp: GuardInput) -> list[dict[str, str]]:
        messages = [{"role": role, "content": self.clean(text)} for role, text in inp.history]
        if inp.mode == "response":
            messages.append({"role": "user", "content": self.clean(inp.context)})
            messages.append({"role": "assistant", "content": self.clean(inp.text)})
        else:
            messages.append({"role": "user", "content": self.clean(inp.text)})
        return messages

    def request_body(self, inp: GuardInput, model_name: str) -> dict[str, Any]:
        body = super().request_body(inp, model_name)
        if self.scoring == "logprobs":
            body["logprobs"] = True
            body["top_logprobs"] = self.top_logprobs
        return body

    def parse_output(
        self,
        content: str,
        *,
        reasoning: str | None = None,
        finish_reason: str | None = "stop",
        logprobs: Sequence[Mapping[str, Any]] | None = None,
    ) -> Verdict:
        if finish_reason == "length":
            return Verdict.failed(
                "guard answer was cut off at max_tokens (finish_reason=length)", raw_output=content, family=self.family
            )
        if self.scoring == "tier":
            fields = self._parsed.get(content)
            if fields is None:
                verdict = self._parse(content, None)
                if verdict.error is None and len(content) <= _MEMO_MAX_CHARS:
                    if len(self._parsed) >= _MEMO_MAX_ENTRIES:
                        self._parsed.clear()
                    self._parsed[content] = (
                        verdict.risk_score,
                        verdict.categories,
                        verdict.native_categories,
                        verdict.native_label,
                        verdict.refusal,
                    )
                return verdict
            score, cats, natives, label, refusal = fields
            return Verdict(
                risk_score=score,
                categories=cats,
                native_categories=natives,
                native_label=label,
                refusal=refusal,
                raw_output=content,
                family=self.family,
            )
        return self._parse(content, logprobs)

    def _parse(self, content: str, logprobs: Sequence[Mapping[str, Any]] | None) -> Verdict:
        """parse_output without the memo (``logprobs`` None for tier scoring)."""
        base: dict[str, Any] = {"raw_output": content, "family": self.family}
        snippet = content.strip()[:80] or "<empty>"
        labels = {  # every label of every "Safety:" line ("Safety: Safe, Unsafe" gives two)
            word.capitalize()
            for m in _SAFETY.finditer(content)
            for word in _LABEL_WORD.findall(m.group(1) + m.group(2))
        }
        if not labels:
            return Verdict.failed(f"no 'Safety:' label in the guard answer: {snippet!r}", **base)
        # an answer that says two things is no verdict: whichever came first would decide, and a text that
        # gets the guard to echo "Safety: Safe" ahead of its own label would pick the outcome
        if len(labels) > 1:
            return Verdict.failed(f"the guard answer gives conflicting labels {sorted(labels)}: {snippet!r}", **base)
        label = labels.pop()
        readings = [_read_categories(m.group(1)) for m in _CATEGORIES.finditer(content)]
        if len({tuple(natives) for natives, _ in readings}) > 1:
            return Verdict.failed(f"the guard answer gives conflicting categories: {snippet!r}", **base)
        natives, cats = readings[0] if readings else ([], [])
        if label == "Safe" and natives:
            return Verdict.failed(f"the guard answer says Safe but names categories {natives}: {snippet!r}", **base)
        refusals = {m.group(1).lower() == "yes" for m in _REFUSAL.finditer(content)}
        if len(refusals) > 1:
            return Verdict.failed(f"the guard answer gives conflicting refusal flags: {snippet!r}", **base)
        refusal = refusals.pop() if refusals else None

        score = TIER_SCORES[label]
        note = None
        if self.scoring == "logprobs":
            scored = self._logprob_score(logprobs)
            if scored is None:
                note = "logprobs missing; tier score used"
            else:
                score = scored
        return Verdict(
            risk_score=round(score, 3),
            categories=tuple(cats),
            native_categories=tuple(natives),
            native_label=label if note is None else f"{label} ({note})",
            refusal=refusal,
            **base,
        )

    def _logprob_score(self, tokens: Sequence[Mapping[str, Any]] | None) -> float | None:
        if not tokens:
            return None
        pos = _find_label_position(tokens)
        if pos is None:
            return None
        alts = tokens[pos].get("top_logprobs")
        if not isinstance(alts, list) or not alts:
            alts = [tokens[pos]]
        result = expected_risk(alts)
        return None if result is None else result[0]
