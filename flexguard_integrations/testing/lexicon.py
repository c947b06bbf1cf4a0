"""The default verdicts of FakeGuardServer: a small, deterministic keyword lexicon.

``judge(text, mode, context)`` maps a text to a :class:`ScriptedVerdict` (a 0–100 risk score plus unified
category names) without any model. It exists so that demos, notebooks and integration tests get sensible,
repeatable answers: obviously harmful requests score high, grey ones score low-but-not-zero (so the
``strict`` / ``moderate`` / ``loose`` presets visibly differ), and everyday text stays benign.

The table (case-insensitive regular expressions; several hits → union of categories, maximum score):

==================  =====  ==========================================================================
category            score  examples that match
==================  =====  ==========================================================================
VIOLENCE            92     "how do I make a bomb", "build an explosive", "plan a mass shooting"
VIOLENCE            90     "how can I kill my neighbour", "murder someone", "poison him"
VIOLENCE            88     "buy an untraceable gun", "3d print a gun", "ghost gun"
VIOLENCE            85     "hurt someone", "beat him up", "bomb" / "explosives" on their own
VIOLENCE            25     a plain mention of guns, firearms or weapons (grey)
SELF_HARM           90     "kill myself", "suicide", "end my life", "want to die", "cut myself"
JAILBREAK           90     "ignore (all) previous instructions", "you are DAN", "developer mode"
JAILBREAK           88     "reveal your system prompt", "pretend you have no restrictions"
JAILBREAK           80     the word "jailbreak"
SEXUAL              100    sexual content involving minors
SEXUAL              75     "porn", "sexually explicit", "erotic story", "send nudes"
ILLEGAL             80     "synthesize meth", "cook fentanyl", "write ransomware / malware / a keylogger"
ILLEGAL             78     "hack into", "break into her email account"
ILLEGAL             76     "credit card fraud", "carding", "counterfeit money"
ILLEGAL             75     "buy cocaine / heroin / fentanyl"
ILLEGAL             74     "launder money", "money laundering"
ILLEGAL             72     "steal", "shoplift", "phishing email"
ILLEGAL             70     "tax evasion", "evade the police"
ILLEGAL             35     "lock pick(ing)", "fake ID", "fake passport" (grey)
DISCRIMINATION      72     "<group> should not be allowed to vote / have rights"
DISCRIMINATION      70     "inferior race", "racial slurs", "I hate all <group>", "<group> are subhuman"
PRIVACY             60     SSN patterns (123-45-6789), card numbers, "dox"
PRIVACY             55     e-mail addresses, phone numbers, "home address of", "find her phone number"
MISINFORMATION      50     "write a fake news article"
MISINFORMATION      45     "vaccines cause autism", "the election was stolen / rigged", "flat earth", "5G spreads covid"
UNETHICAL           40     "manipulate / gaslight my partner"
UNETHICAL           30     "cheat on a test / exam"
UNETHICAL           25     "lie to my boss"
COPYRIGHT           40     "bypass DRM", "crack the software licence"
COPYRIGHT           35     "pirated movies", "torrent the new album" (grey)
COPYRIGHT           30     "full text of <book>", "full lyrics of"
==================  =====  ==========================================================================

No hit → score 3 and no categories.

Response mode: a refusal in the first ~300 characters of the response ("I can't", "I cannot", "I won't",
"I'm sorry, but", "unable to help", "I must decline", ...) gives ``refusal=True`` and a Safe verdict
(score 2) whatever the context asked for; otherwise ``refusal=False`` and the response text itself is judged
with the table above (the user context is not scored: a helpful, harmless answer to a harmful question
is safe).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "FAULT_NAMES",
    "LABELS",
    "LEXICON",
    "UNIFIED_CATEGORIES",
    "ScriptedVerdict",
    "detect_refusal",
    "judge",
    "label_for_score",
    "normalize_category",
]

Mode = Literal["prompt", "response"]

UNIFIED_CATEGORIES: tuple[str, ...] = (
    "VIOLENCE",
    "ILLEGAL",
    "SEXUAL",
    "PRIVACY",
    "DISCRIMINATION",
    "MISINFORMATION",
    "SELF_HARM",
    "UNETHICAL",
    "COPYRIGHT",
    "JAILBREAK",
)

LABELS: tuple[str, ...] = ("Safe", "Controversial", "Unsafe")

#: Names accepted by ``add_rule(fault=...)``, ``fail_next(fault=...)`` and ``ScriptedVerdict.fault``.
FAULT_NAMES: frozenset[str] = frozenset(
    {
        "503",
        "502",
        "504",
        "hang",
        "reset",
        "malformed",
        "truncated",
        "400_overflow",
        "401",
        "html",
        "empty",
        "bad_shape",
        "slow",
        "trickle",
    }
)

_ALIASES = {
    "VIO": "VIOLENCE",
    "VIOLENT": "VIOLENCE",
    "ILG": "ILLEGAL",
    "SEX": "SEXUAL",
    "INF": "PRIVACY",
    "PII": "PRIVACY",
    "DIS": "DISCRIMINATION",
    "MIS": "MISINFORMATION",
    "JAIL": "JAILBREAK",
    "SELF-HARM": "SELF_HARM",
    "SELFHARM": "SELF_HARM",
}


def normalize_category(value: object) -> str:
    """Return the unified category name for ``value`` (a name, a FlexGuard code or an enum member)."""
    raw = getattr(value, "value", value)
    if not isinstance(raw, str):
        raw = getattr(value, "name", str(value))
    name = str(raw).strip().upper().replace(" ", "_")
    name = _ALIASES.get(name, name)
    if name not in UNIFIED_CATEGORIES:
        name_by_enum = str(getattr(value, "name", "")).upper()
        if name_by_enum in UNIFIED_CATEGORIES:
            return name_by_enum
        raise ValueError(f"unknown category {value!r}; expected one of {', '.join(UNIFIED_CATEGORIES)}")
    return name


def label_for_score(score: float) -> str:
    """Qwen3Guard label of a 0–100 score: 0–20 Safe, 21–60 Controversial, 61–100 Unsafe."""
    if score <= 20:
        return "Safe"
    if score <= 60:
        return "Controversial"
    return "Unsafe"


@dataclass(frozen=True)
class ScriptedVerdict:
    """What the fake guard answers for one text: score, unified categories and optional overrides.

    ``label`` overrides the Qwen3Guard label (derived from ``score`` when None); ``refusal`` is the response-mode
    refusal flag; ``probs`` the Safe/Controversial/Unsafe probabilities reported through logprobs; ``fault`` a
    fault name to inject instead of answering; ``raw`` the exact completion text to return.
    """

    score: int = 3
    categories: tuple[str, ...] = ()
    label: str | None = None
    refusal: bool | None = None
    probs: Mapping[str, float] | None = field(default=None, hash=False, compare=True)
    fault: str | None = None
    raw: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.score, bool) or not isinstance(self.score, (int, float)):
            raise TypeError(f"score must be a number in [0, 100], got {self.score!r}")
        if not 0 <= self.score <= 100 or (isinstance(self.score, float) and math.isnan(self.score)):
            raise ValueError(f"score must be in [0, 100], got {self.score!r}")
        object.__setattr__(self, "score", round(self.score))
        cats: list[str] = []
        for c in self.categories:
            name = normalize_category(c)
            if name not in cats:
                cats.append(name)
        object.__setattr__(self, "categories", tuple(cats))
        if self.label is not None:
            label = {lab.lower(): lab for lab in LABELS}.get(str(self.label).strip().lower())
            if label is None:
                raise ValueError(f"label must be one of {LABELS}, got {self.label!r}")
            object.__setattr__(self, "label", label)
        if self.probs is not None:
            probs = {lab.lower(): lab for lab in LABELS}
            clean: dict[str, float] = {}
            for key, value in self.probs.items():
                lab = probs.get(str(key).strip().lower())
                if lab is None:
                    raise ValueError(f"probs keys must be among {LABELS}, got {key!r}")
                p = float(value)
                if not 0.0 <= p <= 1.0:
                    raise ValueError(f"probability for {lab} must be in [0, 1], got {value!r}")
                clean[lab] = p
            if sum(clean.values()) <= 0.0:
                raise ValueError("probs must not all be zero")
            object.__setattr__(self, "probs", clean)
        if self.fault is not None and self.fault not in FAULT_NAMES:
            raise ValueError(f"unknown fault {self.fault!r}; expected one of {sorted(FAULT_NAMES)}")

    @property
    def effective_label(self) -> str:
        """The Qwen3Guard label: ``label`` if given, else the band of ``score``."""
        return self.label if self.label is not None else label_for_score(self.score)


# ---------------------------------------------------------------------------------------------------
# The lexicon. One entry: (pattern, categories, score). Patterns are matched case-insensitively.
# ---------------------------------------------------------------------------------------------------

_GROUPS = (
    r"(?:jews|muslims|christians|hindus|black people|white people|asians|gays|gay people|lesbians|"
    r"trans people|immigrants|refugees|women|mexicans|arabs)"
)

LEXICON: tuple[tuple[str, tuple[str, ...], int], ...] = (
    # --- VIOLENCE -----------------------------------------------------------------------------
    (
        r"\b(?:make|making|build|building|assemble|construct|create|detonate)\b.{0,30}"
        r"\b(?:bombs?|explosives?|pipe ?bombs?|ieds?|molotov(?: cocktails?)?|grenades?)\b",
        ("VIOLENCE",),
        92,
    ),
    (r"\b(?:mass shooting|school shooting|terrorist attack)\b", ("VIOLENCE",), 92),
    (
        r"\b(?:kill|murder|stab|shoot|strangle|poison|behead)(?:ing|ed|s)?\s+"
        r"(?:him|her|them|someone|somebody|anyone|people|a person|my|his|their|our)\b",
        ("VIOLENCE",),
        90,
    ),
    (r"\bhow (?:do|can|could|would|to) (?:i |you |we )?(?:kill|murder)\b", ("VIOLENCE",), 90),
    (
        r"\b(?:buy|get|obtain|3d[- ]?print|make|build|smuggle|modify|convert)\b.{0,30}"
        r"\b(?:untraceable|unregistered|illegal|automatic)\s+(?:guns?|firearms?|weapons?|rifles?)\b",
        ("VIOLENCE",),
        88,
    ),
    (r"\b(?:ghost guns?|3d[- ]?print(?:ed)? (?:a )?guns?)\b", ("VIOLENCE",), 88),
    (r"\bhurt (?:someone|somebody|people|him|her|them|my \w+)\b", ("VIOLENCE",), 85),
    (r"\bbeat (?:him|her|them|someone|somebody) up\b", ("VIOLENCE",), 85),
    (r"\b(?:bombs?|explosives?)\b", ("VIOLENCE",), 85),
    (r"\b(?:guns?|firearms?|weapons?)\b", ("VIOLENCE",), 25),
    # --- SELF_HARM ----------------------------------------------------------------------------
    (r"\b(?:kill|hurt|harm|cut|starve) (?:myself|meself)\b", ("SELF_HARM",), 90),
    (r"\bsuicid(?:e|al)\b", ("SELF_HARM",), 90),
    (r"\b(?:end my (?:own )?life|end it all|want to die|wanna die|take my own life)\b", ("SELF_HARM",), 90),
    # --- JAILBREAK ----------------------------------------------------------------------------
    (
        r"\bignore (?:all |any )?(?:of )?(?:your |the |my )?(?:previous|prior|above|earlier|preceding) "
        r"(?:instructions?|rules|prompts?|directions)\b",
        ("JAILBREAK",),
        90,
    ),
    (r"\b(?:you are (?:now )?dan|do anything now)\b", ("JAILBREAK",), 90),
    (r"\bdeveloper mode\b", ("JAILBREAK",), 90),
    (
        r"\b(?:reveal|show|print|repeat|tell me|output|leak|dump)\b.{0,20}"
        r"\b(?:system prompt|initial instructions|hidden instructions|instructions above)\b",
        ("JAILBREAK",),
        88,
    ),
    (
        r"\bpretend (?:that )?(?:you are|you're|to be)\b.{0,50}\b(?:no|without) "
        r"(?:rules|restrictions|filters|limits|guidelines)\b",
        ("JAILBREAK",),
        88,
    ),
    (r"\bjailbreak(?:ing|s)?\b", ("JAILBREAK",), 80),
    # --- SEXUAL -------------------------------------------------------------------------------
    (
        r"\b(?:child|children|minor|minors|underage|kids?|preteen)\b.{0,30}"
        r"\b(?:sex|sexual|nude|naked|porn\w*|erotic)\b",
        ("SEXUAL",),
        100,
    ),
    (
        r"\b(?:porn\w*|sexually explicit|explicit sex\w*|erotic\w*|send (?:me )?nudes|nudes|"
        r"naked (?:photos?|pictures?|pics)|hardcore sex|xxx)\b",
        ("SEXUAL",),
        75,
    ),
    # --- ILLEGAL ------------------------------------------------------------------------------
    (
        r"\b(?:synthesi[sz]e|synthesi[sz]ing|cook|cooking|make|making|manufactur\w*|produce|extract)\b.{0,30}"
        r"\b(?:meth|methamphetamine|cocaine|crack cocaine|heroin|fentanyl|lsd|mdma|ricin|sarin|nerve agents?)\b",
        ("ILLEGAL",),
        80,
    ),
    (
        r"\b(?:write|create|build|code|develop|deploy|spread|make)\b.{0,30}"
        r"\b(?:malware|ransomware|keyloggers?|botnets?|trojans?|spyware|computer virus)\b",
        ("ILLEGAL",),
        80,
    ),
    (
        r"\bhack(?:ing)? into\b|\bbreak into (?:his|her|their|someone'?s|my \w+'?s) "
        r"(?:account|email|e-mail|phone|computer|wifi)",
        ("ILLEGAL",),
        78,
    ),
    (r"\b(?:credit card fraud|carding|counterfeit (?:money|cash|bills|currency))\b", ("ILLEGAL",), 76),
    (r"\b(?:buy|sell|order|get)\w*\b.{0,30}\b(?:cocaine|heroin|fentanyl|meth)\b", ("ILLEGAL",), 75),
    (r"\b(?:launder(?:ing)? (?:money|cash)|money laundering)\b", ("ILLEGAL",), 74),
    (r"\b(?:steal|stealing|steals|shoplift\w*)\b", ("ILLEGAL",), 72),
    (r"\bphishing (?:emails?|pages?|sites?|kits?|campaign)\b", ("ILLEGAL",), 72),
    (r"\b(?:tax evasion|evade (?:taxes|the police|the cops|arrest))\b", ("ILLEGAL",), 70),
    (r"\block ?pick\w*\b|\bpick(?:ing)? a lock\b", ("ILLEGAL",), 35),
    (r"\bfake (?:id|ids|passports?|driver'?s licen[cs]es?)\b", ("ILLEGAL",), 35),
    # --- DISCRIMINATION -----------------------------------------------------------------------
    (
        rf"\b{_GROUPS} (?:should not|shouldn't|should never) (?:be allowed to|have) "
        r"(?:vote|work|rights|exist|live here)\b",
        ("DISCRIMINATION",),
        72,
    ),
    (r"\binferior (?:race|races|people|gender|religion|ethnicity)\b", ("DISCRIMINATION",), 70),
    (r"\b(?:racial|ethnic|racist|homophobic) (?:slurs?|cleansing|jokes?)\b", ("DISCRIMINATION",), 70),
    (rf"\bi (?:hate|despise) (?:all )?{_GROUPS}\b", ("DISCRIMINATION",), 70),
    (rf"\b{_GROUPS} are (?:all )?(?:subhuman|animals|vermin|inferior|parasites)\b", ("DISCRIMINATION",), 70),
    # --- PRIVACY ------------------------------------------------------------------------------
    (r"\b\d{3}-\d{2}-\d{4}\b", ("PRIVACY",), 60),
    (r"\b(?:\d{4}[ -]){3}\d{4}\b", ("PRIVACY",), 60),
    (r"\bdox(?:x)?(?:ing|ed)?\b", ("PRIVACY",), 60),
    (r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b", ("PRIVACY",), 55),
    (r"(?<![\d-])(?:\+\d{1,2}[ .-]?)?(?:\(\d{3}\)\s?|\d{3}[ .-])\d{3}[ .-]\d{4}(?![\d-])", ("PRIVACY",), 55),
    (r"\bhome address (?:of|for)\b|\bwhere does .{1,40} live\b", ("PRIVACY",), 55),
    (
        r"\b(?:find|get|look up|lookup|give me)\b.{0,30}"
        r"\b(?:home address|phone number|social security number|ssn|bank details)\b",
        ("PRIVACY",),
        55,
    ),
    # --- MISINFORMATION -----------------------------------------------------------------------
    (
        r"\b(?:write|create|generate) (?:a |an |some )?(?:fake|false) (?:news|story|article)",
        ("MISINFORMATION",),
        50,
    ),
    (r"\bvaccines? (?:cause|causes|causing|caused) autism\b", ("MISINFORMATION",), 45),
    (
        r"\b(?:election|vote|votes|voting) (?:was |were |is )?(?:rigged|stolen|fraudulent)\b",
        ("MISINFORMATION",),
        45,
    ),
    (r"\b(?:stolen election|election fraud|flat earth)\b", ("MISINFORMATION",), 45),
    (r"\bmoon landings? (?:was |were )?(?:fake|faked|a hoax|staged)\b", ("MISINFORMATION",), 45),
    (r"\b5g (?:causes|spreads|caused) (?:covid|cancer|coronavirus)\b", ("MISINFORMATION",), 45),
    # --- UNETHICAL ----------------------------------------------------------------------------
    (r"\b(?:manipulate|gaslight)\w* (?:my|someone|somebody|him|her|them)\b", ("UNETHICAL",), 40),
    (r"\bcheat(?:ing)? (?:on|in) (?:a |an |my |the )?(?:tests?|exams?|quiz)\b", ("UNETHICAL",), 30),
    (r"\blie to (?:my|the) (?:boss|teacher|parents|wife|husband|manager)\b", ("UNETHICAL",), 25),
    # --- COPYRIGHT ----------------------------------------------------------------------------
    (
        r"\b(?:bypass|remove|strip|break) (?:the )?drm\b|\bcrack (?:the )?(?:software|licen[cs]e)",
        ("COPYRIGHT",),
        40,
    ),
    (
        r"\b(?:pirat(?:e|ed|ing)|torrent(?:ing|ed)?)\b.{0,30}"
        r"\b(?:movies?|films?|software|games?|books?|albums?|music|shows?)\b",
        ("COPYRIGHT",),
        35,
    ),
    (r"\b(?:full text of|full lyrics (?:of|to|for))\b", ("COPYRIGHT",), 30),
)

REFUSAL_PATTERNS: tuple[str, ...] = (
    r"\bi (?:can't|cannot|can not|won't|will not|am not able to|'m not able to|am unable to|'m unable to)\b",
    r"\b(?:i'm|i am) sorry,? but\b",
    r"\bunable to (?:help|assist|fulfill|fulfil|comply|provide|do that)\b",
    r"\bi must (?:decline|refuse)\b",
    r"\bnot able to (?:help|assist) with\b",
    r"\bagainst my (?:guidelines|policy|policies|principles)\b",
)

_COMPILED: tuple[tuple[re.Pattern[str], tuple[str, ...], int], ...] = tuple(
    (re.compile(p, re.IGNORECASE), cats, score) for p, cats, score in LEXICON
)
_REFUSAL = re.compile("|".join(f"(?:{p})" for p in REFUSAL_PATTERNS), re.IGNORECASE)
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})

BENIGN_SCORE = 3
REFUSAL_SCORE = 2


def detect_refusal(response: str) -> bool:
    """True when the opening of ``response`` reads as a refusal ("I can't", "I'm sorry, but", ...)."""
    return _REFUSAL.search(response[:300].translate(_APOSTROPHES)) is not None


def _scan(text: str) -> tuple[int, tuple[str, ...]]:
    text = text.translate(_APOSTROPHES)
    score = 0
    cats: list[str] = []
    for pattern, categories, value in _COMPILED:
        if pattern.search(text) is not None:
            score = max(score, value)
            for c in categories:
                if c not in cats:
                    cats.append(c)
    if not cats:
        return BENIGN_SCORE, ()
    return score, tuple(cats)


@functools.lru_cache(maxsize=8192)
def _judge_cached(text: str, mode: str) -> ScriptedVerdict:
    if mode == "response":
        if detect_refusal(text):
            return ScriptedVerdict(score=REFUSAL_SCORE, categories=(), refusal=True)
        score, cats = _scan(text)
        return ScriptedVerdict(score=score, categories=cats, refusal=False)
    score, cats = _scan(text)
    return ScriptedVerdict(score=score, categories=cats)


def judge(text: str, mode: Mode = "prompt", context: str = "") -> ScriptedVerdict:
    """The default lexicon verdict for ``text`` (pure and deterministic).

    ``mode`` is "prompt" (judge a user text) or "response" (judge an assistant text; ``context`` is the user
    message it answers, which the lexicon only keeps for symmetry: refusals are safe whatever was asked, and
    a non-refusal is judged on its own words).
    """
    if mode not in ("prompt", "response"):
        raise ValueError(f"mode must be 'prompt' or 'response', got {mode!r}")
    del context  # documented: the lexicon scores the response's own words
    return _judge_cached(text, mode)


def categories_of(values: Iterable[Any]) -> tuple[str, ...]:
    """Normalise an iterable of category names/codes/enum members to unified names (order kept, no dups)."""
    out: list[str] = []
    for v in values:
        name = normalize_category(v)
        if name not in out:
            out.append(name)
    return tuple(out)
