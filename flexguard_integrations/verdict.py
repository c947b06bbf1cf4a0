"""Plain frozen data shared by every layer: surfaces, unified categories, verdicts, actions, decisions.

Nothing here does I/O or knows a guard family; parsing lives in :mod:`flexguard_integrations.models`
and decisions are made in :mod:`flexguard_integrations.policy`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, Literal

Family = str
"""Name of a guard family, e.g. ``"flexguard"`` or ``"qwen3guard"`` (see :mod:`.models`)."""

Mode = Literal["prompt", "response"]
"""Which moderation a guard runs: of text a model reads (prompt) or of text a model wrote (response)."""


class Surface(str, Enum):
    """The place in a pipeline a text comes from; it selects the moderation mode and per-surface rules."""

    PROMPT = "prompt"
    RESPONSE = "response"
    TOOL_CALL = "tool_call"
    TOOL_RESULT = "tool_result"
    RETRIEVED = "retrieved"

    @property
    def mode(self) -> Mode:
        """Text a model produced (response, tool call) gets response moderation; the rest prompt moderation."""
        return "response" if self in (Surface.RESPONSE, Surface.TOOL_CALL) else "prompt"

    @classmethod
    def parse(cls, value: Surface | str) -> Surface:
        """Accept a Surface or its name (case-insensitive); raise ValueError naming the valid ones."""
        if isinstance(value, Surface):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            valid = ", ".join(s.value for s in cls)
            raise ValueError(f"unknown surface {value!r}; expected one of: {valid}") from None


class Category(str, Enum):
    """The unified harm taxonomy both guard families are mapped onto (DESIGN.md, "Unified categories")."""

    VIOLENCE = "VIOLENCE"
    ILLEGAL = "ILLEGAL"
    SEXUAL = "SEXUAL"
    PRIVACY = "PRIVACY"
    DISCRIMINATION = "DISCRIMINATION"
    MISINFORMATION = "MISINFORMATION"
    SELF_HARM = "SELF_HARM"
    UNETHICAL = "UNETHICAL"
    COPYRIGHT = "COPYRIGHT"
    JAILBREAK = "JAILBREAK"
    OTHER = "OTHER"
    """A category the guard named that has no unified equivalent; the native string is kept."""


class Action(str, Enum):
    """What an integration does with a text. Ordered by severity: ALLOW < FLAG < REDACT < REROUTE < BLOCK."""

    ALLOW = "allow"
    FLAG = "flag"
    REDACT = "redact"
    REROUTE = "reroute"
    BLOCK = "block"

    @property
    def severity(self) -> int:
        """Rank used when several decisions are combined (the most severe wins)."""
        return _SEVERITY[self]

    @property
    def passes(self) -> bool:
        """True when the original text may continue unchanged (ALLOW or FLAG)."""
        return self in (Action.ALLOW, Action.FLAG)


_SEVERITY = {Action.ALLOW: 0, Action.FLAG: 1, Action.REDACT: 2, Action.REROUTE: 3, Action.BLOCK: 4}


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one guard model said about one text, on the shared 0–100 risk scale.

    ``error`` is set (and ``risk_score`` is meaningless) when no verdict could be read: the server was
    unreachable, the answer was unparseable, or it was cut off. A verdict with an error is never "safe".
    """

    risk_score: float
    categories: tuple[Category, ...] = ()
    native_categories: tuple[str, ...] = ()
    native_label: str | None = None
    refusal: bool | None = None
    reasoning: str | None = None
    model: str | None = None
    family: Family | None = None
    surface: Surface | None = None
    raw_output: str | None = None
    latency_ms: float | None = None
    error: str | None = None
    chunks: int = 1
    """How many chunks of a long text were checked to produce this verdict (the worst one is reported)."""
    cached: bool = False

    @property
    def ok(self) -> bool:
        """True when the guard answered and the answer could be read."""
        return self.error is None

    @classmethod
    def failed(cls, error: str, **kwargs: Any) -> Verdict:
        """A verdict for a guard that could not answer; its score is the maximum so nothing reads it as safe."""
        return cls(risk_score=100.0, error=error, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (enums as their values)."""
        data = asdict(self)
        data["categories"] = [c.value for c in self.categories]
        data["native_categories"] = list(self.native_categories)
        data["surface"] = self.surface.value if self.surface else None
        return data


@dataclass(frozen=True, slots=True)
class Decision:
    """What the policy decided for one text, and why.

    ``fail_open`` is True only when the guard could not answer and the policy let the text through; such a
    decision is never indistinguishable from a clean pass.
    """

    action: Action
    verdict: Verdict
    reason: str
    rule: str | None = None
    route: str | None = None
    redacted_text: str | None = None
    fail_open: bool = False
    threshold: float | None = None
    surface: Surface | None = None
    policy: str | None = field(default=None, compare=False)

    @property
    def allowed(self) -> bool:
        """True when the original text may continue (ALLOW or FLAG)."""
        return self.action.passes

    @property
    def blocked(self) -> bool:
        """True for BLOCK."""
        return self.action is Action.BLOCK

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, the verdict included."""
        return {
            "action": self.action.value,
            "reason": self.reason,
            "rule": self.rule,
            "route": self.route,
            "redacted_text": self.redacted_text,
            "fail_open": self.fail_open,
            "threshold": self.threshold,
            "surface": self.surface.value if self.surface else None,
            "policy": self.policy,
            "verdict": self.verdict.to_dict(),
        }
