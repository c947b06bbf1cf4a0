"""Turning a text plus per-sentence verdicts into a redacted text.

REDACT on one text (DESIGN.md, "Segmenting text"): the Guard splits it into sentences
(:func:`~flexguard_integrations.segment.split_sentences`), checks them concurrently, and this module
replaces each sentence over the threshold by ``[REDACTED: <categories>]``. The Guard then checks the
redacted text once more and blocks it if it is still over. Sentences flagged only for PRIVACY can be
masked precisely instead, by a span redactor such as :class:`RegexPIIRedactor` or a Presidio wrapper.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from .verdict import Category, Verdict

SpanRedactor = Callable[[str], str]
"""Masks sensitive spans inside one sentence and returns the masked sentence."""


def marker(verdict: Verdict | None) -> str:
    """The replacement for a redacted sentence: ``[REDACTED: VIOLENCE, ILLEGAL]``."""
    if verdict is None or verdict.error is not None:
        return "[REDACTED: unchecked]"
    cats = [c.value for c in verdict.categories]
    return f"[REDACTED: {', '.join(cats)}]" if cats else "[REDACTED]"


def group_sentences(sentences: Sequence[str], max_segments: int) -> list[str]:
    """Merge neighbouring sentences so there are at most ``max_segments`` segments (order kept)."""
    if max_segments < 1:
        raise ValueError("max_segments must be at least 1")
    if len(sentences) <= max_segments:
        return list(sentences)
    per = -(-len(sentences) // max_segments)
    return ["".join(sentences[i : i + per]) for i in range(0, len(sentences), per)]


def apply_redactions(
    segments: Sequence[str],
    flagged: Sequence[Verdict | None],
    *,
    span_redactor: SpanRedactor | None = None,
    labelled: bool = True,
) -> str:
    """Join ``segments``, replacing those whose entry in ``flagged`` is a verdict (None keeps the segment).

    Leading and trailing whitespace of a replaced segment is kept so the layout survives. A segment
    flagged for PRIVACY alone is passed to ``span_redactor`` when one is given. ``labelled=False`` writes a
    bare ``[REDACTED]``: the form the Guard re-checks, so the marker's own words (``JAILBREAK``...) are
    not judged as content.
    """
    if len(segments) != len(flagged):
        raise ValueError("segments and flagged must have the same length")
    out: list[str] = []
    for seg, verdict in zip(segments, flagged, strict=True):
        if verdict is None:
            out.append(seg)
            continue
        lead = seg[: len(seg) - len(seg.lstrip())]
        trail = seg[len(seg.rstrip()) :]
        if (
            span_redactor is not None
            and verdict.error is None
            and verdict.categories
            and set(verdict.categories) <= {Category.PRIVACY}
        ):
            out.append(span_redactor(seg))
        else:
            out.append(f"{lead}{marker(verdict) if labelled else '[REDACTED]'}{trail}")
    return "".join(out)


class RegexPIIRedactor:
    """A small pattern redactor for emails, phone numbers, card numbers, US SSNs and IPv4 addresses.

    Good enough to keep the rest of a sentence readable; for production PII masking plug in Presidio.
    """

    PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
        ("EMAIL", re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")),
        ("SSN", re.compile(r"\b\d{3}-\d{2}-\d{4}\b")),
        ("CARD", re.compile(r"\b(?:\d[ -]?){13,19}\b")),
        ("PHONE", re.compile(r"(?<!\w)\+?\d[\d\s().-]{7,}\d(?!\w)")),
        ("IP", re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b")),
    )

    def __call__(self, text: str) -> str:
        for name, pattern in self.PATTERNS:
            text = pattern.sub(f"[{name}]", text)
        return text
