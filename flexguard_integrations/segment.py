"""Script-aware text segmentation: sentences (redaction, streaming) and overlapping chunks (long texts).

Qwen3Guard covers 119 languages, so boundaries must work for any script: CJK and Thai use no spaces, CJK
ends sentences with 。！？, and a split must never fall inside a grapheme cluster (a combining mark, a
ZWJ emoji sequence, a variation selector, a regional-indicator flag, Thai/Lao SARA AM, a Hangul jamo
sequence, an Indic conjunct, CR LF). Pure functions, no I/O.
"""

from __future__ import annotations

import re
import unicodedata

# A sentence ends at terminal punctuation (Latin, CJK, Devanagari, Arabic, Ethiopic, Armenian, Myanmar,
# Khmer...), optionally followed by closing quotes/brackets, then whitespace — or, for fullwidth CJK
# punctuation, immediately. Blank lines and line breaks also end sentences.
_SENTENCE_END = re.compile(
    r"""(?:[.!?…‼⁇⁈⁉]+["'”’»)\]]*\s+)"""  # Latin-style: needs following whitespace
    r"""|(?:[。！？｡]+[」』”’）】〕》]*\s*)"""  # CJK: no space needed
    r"""|(?:[।॥؟۔።፧՜՞։။៕៘]+\s*)"""  # other scripts' terminators
    r"""|(?:\n\s*)""",
)
_THAI = re.compile(r"[\u0e00-\u0e7f\u0e80-\u0eff]")  # Thai and Lao separate sentences with spaces
_SPACE_RUN = re.compile(r"\s+")


def is_extending(ch: str) -> bool:
    """True for code points that attach to the previous one (never split before them)."""
    cp = ord(ch)
    return (
        unicodedata.combining(ch) != 0
        or unicodedata.category(ch) in ("Mn", "Me", "Mc")
        or cp in (0x0E33, 0x0EB3, 0x200C, 0x200D)  # Thai SARA AM and Lao AM (letters that attach), ZWNJ, ZWJ
        or 0xFE00 <= cp <= 0xFE0F  # variation selectors
        or 0xE0100 <= cp <= 0xE01EF
        or 0x1F3FB <= cp <= 0x1F3FF  # emoji skin-tone modifiers
        or 0xE0020 <= cp <= 0xE007F  # emoji tag sequences
        or 0xDC00 <= cp <= 0xDFFF  # a low surrogate (never separate it from its high one)
    )


_MAX_CLUSTER = 64
"""How far back (code points) a split looks for the start of a cluster. Real clusters are a few code points;
a longer one (a run of marks or of linked consonants, crafted text) is cut at the code point, so that every
cut costs bounded time (an unbounded walk made chunking a crafted 200 kB text take seconds)."""

_PREPEND = frozenset(
    (
        *range(0x0600, 0x0606),
        *(0x06DD, 0x070F, 0x0890, 0x0891, 0x08E2, 0x0D4E, 0x110BD, 0x110CD, 0x111C2, 0x111C3),
        *(0x1193F, 0x11941, 0x11A3A, *range(0x11A84, 0x11A8A), 0x11D46, 0x11F02),
    )
)
"""Grapheme_Cluster_Break=Prepend (UAX #29 GB9b): never split right after one (Malayalam dot reph, Arabic
number signs...)."""


def _is_regional_indicator(ch: str) -> bool:
    return 0x1F1E6 <= ord(ch) <= 0x1F1FF


def _hangul_type(ch: str) -> str:
    """Hangul_Syllable_Type: L, V, T (conjoining jamo), LV, LVT (precomposed syllables), or "" for the rest."""
    cp = ord(ch)
    if 0x1100 <= cp <= 0x115F or 0xA960 <= cp <= 0xA97C:
        return "L"
    if 0x1160 <= cp <= 0x11A7 or 0xD7B0 <= cp <= 0xD7C6:
        return "V"
    if 0x11A8 <= cp <= 0x11FF or 0xD7CB <= cp <= 0xD7FB:
        return "T"
    if 0xAC00 <= cp <= 0xD7A3:
        return "LV" if (cp - 0xAC00) % 28 == 0 else "LVT"
    return ""


def _joined(prev: str, ch: str) -> bool:
    """True when ``prev`` and ``ch`` belong to one cluster by CR LF or the Hangul rules (UAX #29 GB3, GB6-8)."""
    if prev == "\r":
        return ch == "\n"
    before = _hangul_type(prev)
    if not before:
        return False
    after = _hangul_type(ch)
    if before == "L":
        return after in ("L", "V", "LV", "LVT")
    if before in ("LV", "V"):
        return after in ("V", "T")
    return after == "T"  # before is LVT or T


# UAX #29 GB9c (Unicode 15.1): no break inside an Indic conjunct, consonant + virama (+ marks) + consonant.
# The viramas that link consonants (Indic_Conjunct_Break=Linker) and the consonant ranges of their scripts
# (Devanagari, Bengali, Gujarati, Oriya, Telugu, Malayalam).
_LINKERS = frozenset((0x094D, 0x09CD, 0x0ACD, 0x0B4D, 0x0C4D, 0x0D4D))
_CONSONANTS = (
    (0x0915, 0x0939), (0x0958, 0x095F), (0x0978, 0x097F),
    (0x0995, 0x09B9), (0x09DC, 0x09DF), (0x09F0, 0x09F1),
    (0x0A95, 0x0AB9), (0x0AF9, 0x0AF9),
    (0x0B15, 0x0B39), (0x0B5C, 0x0B5F), (0x0B71, 0x0B71),
    (0x0C15, 0x0C39), (0x0C58, 0x0C5A),
    (0x0D15, 0x0D3A),
)  # fmt: skip


def _is_consonant(ch: str) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in _CONSONANTS) and unicodedata.category(ch) == "Lo"


def _in_conjunct(text: str, i: int) -> bool:
    """True when ``text[i]`` is a consonant after a virama (and marks): part of a conjunct (GB9c). The rule
    asks for a consonant before the virama too; not asking means one cut fewer in malformed text only."""
    if not _is_consonant(text[i]):
        return False
    j = i - 1
    while j >= max(0, i - _MAX_CLUSTER) and is_extending(text[j]):
        if ord(text[j]) in _LINKERS:
            return True
        if text[j] == "\u200c":  # ZWNJ: written to keep the consonants apart
            return False
        j -= 1
    return False


def safe_boundary(text: str, index: int) -> int:
    """The nearest index at or before ``index`` where a split does not break a grapheme cluster; ``index``
    itself when the cluster around it is longer than ``_MAX_CLUSTER`` code points (only crafted text)."""
    start = i = max(0, min(index, len(text)))
    while 0 < i < len(text):
        if start - i >= _MAX_CLUSTER:
            return start
        ch, prev = text[i], text[i - 1]
        if (
            is_extending(ch)
            or ord(prev) == 0x200D
            or 0xD800 <= ord(prev) <= 0xDBFF
            or ord(prev) in _PREPEND
            or _joined(prev, ch)
            or (is_extending(prev) and _in_conjunct(text, i))  # a virama (+ marks) before: GB9c
        ):
            i -= 1
            continue
        if _is_regional_indicator(ch) and _is_regional_indicator(prev):
            # keep flag pairs together: count the run of indicators before i
            j = i
            while j > max(0, i - _MAX_CLUSTER) and _is_regional_indicator(text[j - 1]):
                j -= 1
            if (i - j) % 2 == 1:
                i -= 1
                continue
        break
    return i


def split_sentences(text: str) -> list[str]:
    """Split ``text`` into sentences whose concatenation is exactly ``text`` (separators stay attached)."""
    if not text:
        return []
    out: list[str] = []
    start = 0
    for m in _SENTENCE_END.finditer(text):
        end = m.end()
        if end > start and text[start:end].strip():
            out.append(text[start:end])
            start = end
    if start < len(text):
        if out and not text[start:].strip():
            out[-1] += text[start:]
        else:
            out.append(text[start:])
    if _THAI.search(text):
        refined: list[str] = []
        for sentence in out:
            if _THAI.search(sentence):
                refined.extend(_split_on_spaces(sentence))
            else:
                refined.append(sentence)
        out = refined
    return out


def _split_on_spaces(text: str) -> list[str]:
    parts: list[str] = []
    start = 0
    for m in _SPACE_RUN.finditer(text):
        if m.start() > start:
            parts.append(text[start : m.end()])
            start = m.end()
    if start < len(text):
        if parts and not text[start:].strip():
            parts[-1] += text[start:]
        else:
            parts.append(text[start:])
    return parts or [text]


def chunk_text(text: str, max_chars: int, overlap: int = 0) -> list[str]:
    """Overlapping chunks of at most ``max_chars`` characters covering all of ``text``.

    Each cut prefers the last sentence end or whitespace in the final fifth of the window and never
    falls inside a grapheme cluster. Consecutive chunks share about ``overlap`` characters, so a harmful
    span cut at a boundary is still seen whole by one chunk. Nothing is ever dropped.
    """
    if max_chars < 1:
        raise ValueError("max_chars must be at least 1")
    overlap = max(0, min(overlap, max_chars // 2))
    if len(text) <= max_chars:
        return [text]
    chunks: list[str] = []
    start = 0
    n = len(text)
    while start < n:
        hard_end = start + max_chars
        if hard_end >= n:
            chunks.append(text[start:])
            break
        end = _preferred_cut(text, start, hard_end)
        chunks.append(text[start:end])
        next_start = safe_boundary(text, end - overlap) if overlap else end
        if next_start <= start:  # always progress
            next_start = end
        start = next_start
    return chunks


def _preferred_cut(text: str, start: int, hard_end: int) -> int:
    window_start = start + (hard_end - start) * 4 // 5
    window = text[window_start:hard_end]
    best = -1
    for m in _SENTENCE_END.finditer(window):
        best = m.end()
    if best <= 0:
        ws = [m.end() for m in _SPACE_RUN.finditer(window)]
        best = ws[-1] if ws else -1
    cut = window_start + best if best > 0 else hard_end
    cut = safe_boundary(text, cut)
    if cut <= start:  # a single grapheme cluster longer than the window: cut at the code point
        cut = hard_end
    return cut
