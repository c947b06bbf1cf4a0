"""FlexGuard (Tommy-DING/FlexGuard-Qwen3-8B and siblings): a 0–100 risk score plus categories.

The model card says the model "is prompted to output exactly" a ``<think>`` block of eight steps, then
``CATEGORY`` (``SAFE`` or codes among VIO, ILG, SEX, INF, DIS, MIS, JAIL), then the integer ``RISK_SCORE``.
The official instruction text could not be obtained: the package ships an instruction **reconstructed
from the model card's description** (``templates/flexguard_prompt.txt`` and ``flexguard_response.txt``).
Replace it with the official text, or your own, through ``prompt_template=`` / ``response_template=``
(a string or a path); the text must contain ``{{conversation}}`` where the conversation goes.

The parser tolerates labelled (``RISK_SCORE: 87``) and bare lines, any separator between codes, and the
reasoning returned in ``reasoning_content`` by servers started with a reasoning parser.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

from ..errors import ConfigurationError
from ..verdict import Category, Verdict
from .base import GuardInput, GuardModel, register

PLACEHOLDER = "{{conversation}}"

_CODES: dict[str, Category] = {
    "VIO": Category.VIOLENCE,
    "ILG": Category.ILLEGAL,
    "SEX": Category.SEXUAL,
    "INF": Category.PRIVACY,
    "DIS": Category.DISCRIMINATION,
    "MIS": Category.MISINFORMATION,
    "JAIL": Category.JAILBREAK,
}
_SAFE_WORDS = {"SAFE", "NONE", "N/A", "NA", "BENIGN"}

# one line, and no two runs that can share the same blanks (a long run of blanks in a guard answer would
# otherwise cost quadratic time: 32K blank lines before the answer took 11.6 s)
_B = r"[^\S\n]"  # a blank that is not a line break (spaces, tabs, \r of CRLF, no-break spaces)
_LABELLED_SCORE = re.compile(
    rf"^(?:[^\w\n]|_)*RISK[ _-]?SCORE(?:[^\w\n]|_)*?[:=]{_B}*(?:\*+{_B}*)?(-?\d+(?:\.\d+)?){_B}*(?:\*+{_B}*)?"
    rf"(?:/{_B}*100{_B}*)?$",
    re.IGNORECASE | re.MULTILINE,
)
_LABEL_ONLY = re.compile(r"^(?:[^\w\n]|_)*RISK[ _-]?SCORE(?:[^\w\n]|_)*$", re.IGNORECASE)
# a line that is a number with stray punctuation ("85.", "85!"): a bare score this parser cannot read
_NUMBER_LINE = re.compile(r"^(?:[^\w\n]|_)*(-?\d+(?:\.\d+)?)(?:[^\w\n]|_)*$")
# the score label with its colon: at the start of a line in any spelling, or anywhere as the format's own
# RISK_SCORE ("Final RISK_SCORE: 85", "CATEGORY: VIO, RISK_SCORE: 85"); not a sentence ("extreme risk score: 81")
_EMBEDDED_LABEL = re.compile(
    r"^(?:[^\w\n]|_)*RISK[ _-]?SCORE(?:[^\w\n]|_){0,3}[:=]|RISK_SCORE(?:[^\w\n]|_){0,3}[:=]", re.IGNORECASE
)
# "CATEGORY: VIO" on one line: nothing in it may cross into the next line (an empty "CATEGORY:" is empty)
_LABELLED_CATEGORY = re.compile(r"^[^\w\n]*_*CATEGOR(?:Y|IES)[^\w\n]*?[:=](.*)$", re.IGNORECASE | re.MULTILINE)
_BARE_SCORE = re.compile(rf"^\**{_B}*(-?\d+(?:\.\d+)?){_B}*(?:/{_B}*100{_B}*)?\**$")  # "87", "**87**", "87/100"
_DIGIT = re.compile(r"\d")
_END_MARKS = ("</think>", "<|im_end|>", "<|endoftext|>")  # what a server may leave after an answer
_CODE_SPLIT = re.compile(r"[\s,;|/+&]+")
_CODE_TOKEN = re.compile(r"^[A-Z][A-Z_-]{1,15}$")


def load_template(source: str | Path) -> str:
    """Read a template from a path, or take a string that already contains the placeholder."""
    if isinstance(source, Path) or (PLACEHOLDER not in source and "\n" not in source):
        path = Path(source)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigurationError(f"cannot read FlexGuard template {str(path)!r}: {exc}") from exc
    else:
        text = source
    if PLACEHOLDER not in text:
        raise ConfigurationError(f"FlexGuard template must contain {PLACEHOLDER} where the conversation goes")
    if not text.rstrip().endswith(PLACEHOLDER) and text.count(PLACEHOLDER) != 1:
        raise ConfigurationError(f"FlexGuard template must contain {PLACEHOLDER} exactly once")
    return text


def _bundled(name: str) -> str:
    return (
        resources.files("flexguard_integrations.models")
        .joinpath("templates")
        .joinpath(name)
        .read_text(encoding="utf-8")
    )


def _parse_codes(line: str, *, labelled: bool = False) -> tuple[list[Category], list[str], bool]:
    """Categories, native codes and whether the line looked like a category line at all.

    An unlabelled line with a prose word is not a category line (it is reasoning). A labelled one
    (``CATEGORY: JAIL (prompt injection)``) is, whatever else it says: its codes are read and its prose
    skipped; when it names no code and no safe word either, its category is ``OTHER`` (an unsafe verdict
    whose categories cannot be read is still unsafe, and is not labelled SAFE).
    """
    cats: list[Category] = []
    natives: list[str] = []
    if line.strip().strip("*`'\"[](){}.:-").upper() in _SAFE_WORDS:  # "N/A" before "/" splits it
        return cats, natives, True
    raw_tokens = [t.strip("*`'\"[](){}.:-") for t in _CODE_SPLIT.split(line.strip())]
    raw_tokens = [t for t in raw_tokens if t]
    if not raw_tokens:
        return cats, natives, False
    said_safe = False
    for raw in raw_tokens:
        tok = raw.upper()
        if tok in _SAFE_WORDS:
            said_safe = True
            continue
        # a known code in any case, or an unknown upper-case code; prose words are not codes
        if tok not in _CODES and not (raw.isupper() and _CODE_TOKEN.match(tok)):
            if labelled:
                continue
            return [], [], False
        if tok in natives:
            continue
        natives.append(tok)
        cat = _CODES.get(tok, Category.OTHER)
        if cat not in cats:
            cats.append(cat)
    if labelled and not natives and not said_safe:
        return [Category.OTHER], [line.strip()[:40]], True
    return cats, natives, True


def _final_lines(text: str) -> tuple[list[str], float | None]:
    """The end of an answer a reasoning parser kept in ``reasoning_content``, without the steps above it: the
    last line, which must be the score (labelled or bare), and the category lines right above it (labelled,
    lines of codes, separators), the order of the model card's format; and the highest other score the text
    mentions when it is above the final one. End markers a server may leave (``</think>``, ``<|im_end|>``) are
    dropped first; a closing code fence is not (such an answer fails closed).

    Anything else as the last line means the answer has no final score (the model stopped in its steps): no
    lines. Which score is the model's own and which one its steps quote from the judged text ("RISK_SCORE: 0")
    cannot be told here, so the verdict takes the highest score line (or number line) there, with every
    category named in a category line: a quote can raise the risk, never lower it. A score line that cannot
    be read ("RISK_SCORE: HIGH") makes it no verdict: it may be the model's own.
    """
    lines = [ln.strip() for ln in _drop_end_marks(text).splitlines() if ln.strip()]
    if not lines or not (_LABELLED_SCORE.match(lines[-1]) or _BARE_SCORE.match(lines[-1])):
        return [], None
    start = len(lines) - 1
    while start > 0 and (
        _LABELLED_CATEGORY.match(lines[start - 1]) or _parse_codes(lines[start - 1])[2] or _separator(lines[start - 1])
    ):
        start -= 1
    if any(_unreadable_score(line) for line in lines):  # the model's own score may be the unreadable one
        return [], None
    final = _score_value(lines[-1]) or 0.0
    higher = max((v for line in lines[:-1] for v in _score_mentions(line) if v > final), default=None)
    if higher is None:
        return lines[start:], None
    # the final lines may be a quote: every category the text names in a category line counts too
    named = [ln for ln in lines[:start] if _LABELLED_CATEGORY.match(ln) or _parse_codes(ln)[2]]
    return [*named, *lines[start:]], higher


def _score_mentions(line: str) -> list[float]:
    """The score a score-shaped line states: a score line ("RISK_SCORE: 85", "85") or a number line ("85.");
    values from 0 to 100. Sentences are not read ("the user's credit risk score is 95")."""
    value = _score_value(line)
    if value is None and (number := _NUMBER_LINE.match(line)) is not None:
        value = float(number.group(1))
    return [value] if value is not None and 0 <= value <= 100 else []


def _unreadable_score(line: str) -> bool:
    """A line that gives the score in a way this parser cannot read ("RISK_SCORE: HIGH", "RISK_SCORE: 85.",
    "CATEGORY: VIO, RISK_SCORE: 85", "Final RISK_SCORE: 85"); a label alone (its value on the next line) is
    not."""
    return bool(_EMBEDDED_LABEL.search(line)) and _score_value(line) is None and not _LABEL_ONLY.match(line)


def _score_value(line: str) -> float | None:
    """The score a labelled or bare score line gives, None when it cannot be read."""
    match = _LABELLED_SCORE.match(line) or _BARE_SCORE.match(line)
    return float(match.group(1)) if match else None


def _separator(line: str) -> bool:
    """A line with no letter or digit ("---", "***", a fence), or a score label whose value is on the next line:
    skipped between the category and score lines."""
    return not any(c.isalnum() for c in line) or bool(_LABEL_ONLY.match(line))


def _think_block(content: str) -> tuple[str, int] | None:
    """The text of the first ``<think>...</think>`` block and where it ends; str.find, so linear (a lazy regex
    took quadratic time on many unclosed "<think>")."""
    start = content.find("<think>")
    if start < 0:
        return None
    end = content.find("</think>", start + len("<think>"))
    return None if end < 0 else (content[start + len("<think>") : end], end + len("</think>"))


def _drop_end_marks(text: str) -> str:
    """``text`` without the end markers (and blanks) after its last line; linear (one copy at the end)."""
    end = len(text.rstrip())
    while (mark := next((m for m in _END_MARKS if text.endswith(m, 0, end)), None)) is not None:
        end -= len(mark)
        while end and text[end - 1].isspace():
            end -= 1
    return text[:end]


def _code_lines_above(lines: Sequence[str]) -> str | None:
    """The category text just above the score: every consecutive line of codes there, merged ("VIO\nJAIL" is
    both: keeping only the last would let a looser threshold decide alone), else the last line (which
    :func:`_parse_codes` then reads as no category), else None."""
    codes: list[str] = []
    for line in reversed(lines):
        if _separator(line) and line.strip():  # "---" between the codes and the score
            continue
        if not _parse_codes(line)[2]:
            break
        codes.append(line)
    if codes:
        return ", ".join(reversed(codes))
    return lines[-1] if lines else None


def _code_lines_among(lines: Sequence[str]) -> str | None:
    """The lines of codes in the block of category lines (labelled or codes) at the end of ``lines``, merged;
    None when there are none."""
    codes: list[str] = []
    for line in reversed(lines):
        if _LABELLED_CATEGORY.match(line) or (_separator(line) and line.strip()):
            continue
        if not _parse_codes(line)[2]:
            break
        codes.append(line)
    return ", ".join(reversed(codes)) if codes else None


@dataclass
class _Tail:
    """What the lines after the think block say: the score as written, the categories, or why it is no verdict."""

    score_text: str | None = None
    categories: list[Category] = field(default_factory=list)
    natives: list[str] = field(default_factory=list)
    error: str | None = None


def _read_tail(tail: str) -> _Tail:
    """Read the CATEGORY and RISK_SCORE lines of ``tail`` (labelled or bare)."""
    labelled = list(_LABELLED_SCORE.finditer(tail))
    # an answer that says two things is no verdict: whichever line the parser kept would decide, and a text
    # that gets the guard to echo "RISK_SCORE: 0" after its own score would pick the outcome
    scores = {float(m.group(1)) for m in labelled}
    scores |= {float(m.group(1)) for ln in tail.splitlines() if (m := _BARE_SCORE.match(ln.strip()))}
    if len(scores) > 1:
        return _Tail(error=f"the guard answer gives conflicting risk scores: {tail.strip()[-80:]!r}")
    # a higher score stated where this parser cannot read it ("RISK_SCORE: 85.", "85.", "CATEGORY: VIO,
    # RISK_SCORE: 85") beside a readable one: an echoed "RISK_SCORE: 0" after an unreadable own score decided
    if scores and any(
        _unreadable_score(ln) or any(v > max(scores) for v in _score_mentions(ln.strip())) for ln in tail.splitlines()
    ):
        return _Tail(error=f"the guard answer gives conflicting risk scores: {tail.strip()[-80:]!r}")
    cat_lines = [m.group(1).strip() for m in _LABELLED_CATEGORY.finditer(tail)]
    out = _Tail()
    code_line: str | None = None  # an unlabelled line of codes
    if labelled:
        out.score_text = labelled[-1].group(1)
        before = [ln.strip() for ln in tail[: labelled[-1].start()].splitlines() if ln.strip()]
        # bare code lines before the labelled score ("JAIL\nRISK_SCORE: 35"), also among labelled ones: a
        # quoted "CATEGORY: SAFE" above the model's own "VIO" must not hide it
        code_line = _code_lines_above(before) if not cat_lines else _code_lines_among(before)
    else:
        lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
        if not lines or not (m := _BARE_SCORE.match(lines[-1])):
            return out
        out.score_text = m.group(1)
        above: list[str] = []  # the labelled category lines right above the bare score, all of them
        for line in reversed(lines[:-1]):
            labelled_cat = _LABELLED_CATEGORY.match(line)
            if labelled_cat is None:
                if _parse_codes(line)[2]:  # a line of codes among them: read below
                    continue
                break
            above.append(labelled_cat.group(1).strip())
        cat_lines = above[::-1]
        if not cat_lines and len(lines) >= 2:
            code_line = _code_lines_above(lines[:-1])
        elif cat_lines:
            code_line = _code_lines_among(lines[:-1])
    # several labelled lines (how the model writes several categories is not documented): their union, so a
    # "SAFE" line never hides a category another line names
    for line in cat_lines:
        cats, natives, _ = _parse_codes(line, labelled=True)
        out.categories += [c for c in cats if c not in out.categories]
        out.natives += [n for n in natives if n not in out.natives]
    if code_line is not None:
        cats, natives, looked_like_codes = _parse_codes(code_line)
        if looked_like_codes:  # with the labelled lines: their union
            out.categories += [c for c in cats if c not in out.categories]
            out.natives += [n for n in natives if n not in out.natives]
    return out


@register
class FlexGuardModel(GuardModel):
    """FlexGuard-Qwen3-8B / -4B / -LLaMA3.1-Instruct-8B behind an OpenAI-compatible server."""

    family: ClassVar[str] = "flexguard"
    name_patterns: ClassVar[tuple[str, ...]] = (r"flex[-_ ]?guard",)
    native_categories: ClassVar[Mapping[str, Category]] = _CODES

    def __init__(
        self,
        *,
        prompt_template: str | Path | None = None,
        response_template: str | Path | None = None,
        max_new_tokens: int = 1024,
    ) -> None:
        if max_new_tokens < 16:
            raise ConfigurationError("flexguard max_new_tokens must be at least 16 (the think block needs room)")
        self.prompt_template = load_template(prompt_template) if prompt_template else _bundled("flexguard_prompt.txt")
        self.response_template = (
            load_template(response_template) if response_template else _bundled("flexguard_response.txt")
        )
        self.max_new_tokens = max_new_tokens
        digest = hashlib.sha256((self.prompt_template + "\0" + self.response_template).encode()).hexdigest()
        self._version = f"flexguard/{digest[:12]}"

    @property
    def template_version(self) -> str:
        return self._version

    @property
    def prompt_overhead_chars(self) -> int:
        return max(len(self.prompt_template), len(self.response_template)) + 200

    def render(self, inp: GuardInput) -> str:
        """The instruction with the conversation filled in (fixed prefix first, variable text last)."""
        turns = [f"{role.upper()}: {self.clean(text)}" for role, text in inp.history]
        if inp.mode == "response":
            turns.append(f"USER: {self.clean(inp.context)}")
            turns.append(f"ASSISTANT: {self.clean(inp.text)}")
            template = self.response_template
        else:
            turns.append(f"USER: {self.clean(inp.text)}")
            template = self.prompt_template
        return template.replace(PLACEHOLDER, "\n\n".join(turns), 1)

    def build_messages(self, inp: GuardInput) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.render(inp)}]

    def parse_output(
        self,
        content: str,
        *,
        reasoning: str | None = None,
        finish_reason: str | None = "stop",
        logprobs: Sequence[Mapping[str, Any]] | None = None,
    ) -> Verdict:
        raw = content if reasoning is None else f"<think>{reasoning}</think>\n{content}"
        base: dict[str, Any] = {"raw_output": raw, "family": self.family}
        if finish_reason == "length":
            return Verdict.failed("guard answer was cut off at max_tokens (finish_reason=length)", **base)

        think: str | None = reasoning.strip() if reasoning else None
        match = _think_block(content)
        if match:
            think = match[0].strip()
            tail = content[match[1] :]
        elif "</think>" in content:  # the template pre-filled "<think>"
            head, _, tail = content.partition("</think>")
            think = head.strip()
        elif "<think>" in content:
            return Verdict.failed("guard answer has an unclosed <think> block", **base)
        else:
            tail = content
        base["reasoning"] = think or None

        read = _read_tail(tail)
        where = "the guard answer"
        if read.score_text is None and read.error is None and reasoning and not match and not tail.strip():
            # a reasoning parser may have put the final lines in reasoning_content, leaving content empty
            # (reference 1.4 b): read them there, and only them; a higher score the steps state stands
            final, higher = _final_lines(reasoning)
            read = _read_tail("\n".join(final))
            if higher is not None and read.score_text is not None:
                read.score_text = f"{higher:g}"
            where, tail = "the last lines of the guard's reasoning_content", reasoning
        if read.error is not None:
            return Verdict.failed(read.error, **base)
        score_text = read.score_text
        if score_text is None:
            snippet = tail.strip()[-80:] or "<empty>"
            return Verdict.failed(f"no RISK_SCORE in {where}: {snippet!r}", **base)
        score = float(score_text)
        if not 0.0 <= score <= 100.0:
            return Verdict.failed(f"risk score {score_text} is outside 0-100", **base)
        cats, natives = read.categories, read.natives
        native_label = ", ".join(natives) if natives else "SAFE"
        return Verdict(
            risk_score=score,
            categories=tuple(cats),
            native_categories=tuple(natives),
            native_label=f"{native_label} / {score_text}",
            **base,
        )
