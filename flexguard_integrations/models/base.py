"""The GuardModel protocol every guard family implements, and the family registry.

A family turns a :class:`GuardInput` into the body of an OpenAI-compatible chat-completion request and
turns the server's answer back into a :class:`~flexguard_integrations.verdict.Verdict`. Both directions
are pure: no I/O happens here, so every parser is unit-testable on literal strings.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar

from ..errors import ConfigurationError
from ..sanitize import neutralize
from ..verdict import Category, Mode, Verdict

Role = Literal["user", "assistant"]

_MAPPING = (dict, Mapping)
"""For isinstance: decoded JSON is a dict, and the exact-type check skips the ABC machinery."""


@dataclass(frozen=True, slots=True)
class GuardInput:
    """One moderation task: the text to judge, how, and the conversation it belongs to.

    ``context`` is the user message that led to a response (response mode only; empty when unknown).
    ``history`` holds earlier turns, oldest first, shown to the guard as context.
    """

    text: str
    mode: Mode = "prompt"
    context: str = ""
    history: tuple[tuple[Role, str], ...] = ()

    def cache_key(self) -> tuple[Any, ...]:
        """The parts of the input the verdict depends on."""
        return (self.mode, self.text, self.context, self.history)


class GuardModel(ABC):
    """A guard family: request builder and answer parser. Subclasses register with :func:`register`."""

    family: ClassVar[str]
    """Registry key, e.g. ``"flexguard"``."""
    name_patterns: ClassVar[tuple[str, ...]] = ()
    """Regexes (case-insensitive) that recognise this family in a served model name."""
    native_categories: ClassVar[Mapping[str, Category]] = {}
    """The family's own category strings (upper-cased) → unified category."""

    max_new_tokens: int
    """Default ``max_tokens`` of a request: enough room for a complete answer."""

    @property
    @abstractmethod
    def template_version(self) -> str:
        """Identifies the prompt format; part of every cache key so a template change never reuses verdicts."""

    @property
    def prompt_overhead_chars(self) -> int:
        """Characters the request adds around the text (instructions, template); used to size chunks."""
        return 2000

    @abstractmethod
    def build_messages(self, inp: GuardInput) -> list[dict[str, str]]:
        """The chat messages for ``inp``; every untrusted string already neutralised."""

    def request_body(self, inp: GuardInput, model_name: str) -> dict[str, Any]:
        """The full chat-completion request body (deterministic decoding)."""
        return {
            "model": model_name,
            "messages": self.build_messages(inp),
            "temperature": 0,
            "max_tokens": self.max_new_tokens,
        }

    @abstractmethod
    def parse_output(
        self,
        content: str,
        *,
        reasoning: str | None = None,
        finish_reason: str | None = "stop",
        logprobs: Sequence[Mapping[str, Any]] | None = None,
    ) -> Verdict:
        """Read one generated answer into a NEW Verdict (the Guard stamps it with model, surface and latency).

        Anything unreadable yields a verdict with ``error`` set, never a safe one.
        """

    def parse_completion(self, completion: Mapping[str, Any]) -> Verdict:
        """Read a chat-completion (or completion) response body already checked to have ``choices[0]``."""
        choice = completion["choices"][0]
        message = choice.get("message")
        if isinstance(message, _MAPPING):
            content = message.get("content")
            reasoning = message.get("reasoning_content") or message.get("reasoning")
        else:  # /v1/completions shape
            content = choice.get("text")
            reasoning = None
        if content is not None and not isinstance(content, str):
            return Verdict.failed(f"guard answer content is {type(content).__name__}, not text")
        lp = choice.get("logprobs")
        tokens = lp.get("content") if lp is not None and isinstance(lp, _MAPPING) else None
        return self.parse_output(
            content or "",
            reasoning=reasoning if isinstance(reasoning, str) else None,
            finish_reason=choice.get("finish_reason"),
            logprobs=tokens if isinstance(tokens, list) else None,
        )

    @staticmethod
    def clean(text: str) -> str:
        """Neutralise an untrusted string (control tokens, lone surrogates)."""
        return neutralize(text)


_REGISTRY: dict[str, type[GuardModel]] = {}
M = TypeVar("M", bound=type[GuardModel])


def register(cls: M) -> M:
    """Class decorator: make a family available by name and by model-name pattern."""
    _REGISTRY[cls.family] = cls
    return cls


def _ensure_builtin() -> None:
    from . import flexguard, qwen3guard  # noqa: F401  (registration side effect)


def families() -> list[str]:
    """Names of every registered family."""
    _ensure_builtin()
    return sorted(_REGISTRY)


def get_family(name: str) -> type[GuardModel]:
    """The GuardModel class registered as ``name``; ConfigurationError naming the known ones otherwise."""
    _ensure_builtin()
    key = name.strip().lower()
    try:
        return _REGISTRY[key]
    except KeyError:
        raise ConfigurationError(
            f"unknown guard family {name!r}; known families: {', '.join(sorted(_REGISTRY))}"
        ) from None


def infer_family(model_name: str) -> str:
    """Guess the family from a served model name such as ``Qwen/Qwen3Guard-Gen-8B``."""
    _ensure_builtin()
    for fam, cls in _REGISTRY.items():
        if any(re.search(p, model_name, re.IGNORECASE) for p in cls.name_patterns):
            return fam
    raise ConfigurationError(
        f"cannot tell the guard family of model {model_name!r} from its name; "
        f"pass family= one of: {', '.join(sorted(_REGISTRY))}"
    )


def create_model(family: str | None, model_name: str, **options: Any) -> GuardModel:
    """Instantiate the family for ``model_name`` (inferred from the name when ``family`` is None)."""
    cls = get_family(family) if family else get_family(infer_family(model_name))
    try:
        return cls(**options)
    except TypeError as exc:
        raise ConfigurationError(f"bad options for guard family {cls.family!r}: {exc}") from exc


def category_aliases() -> dict[str, Category]:
    """Every name a policy may use for a category: unified names and each family's native strings."""
    _ensure_builtin()
    aliases: dict[str, Category] = {c.value: c for c in Category}
    aliases.update({c.value.replace("_", " "): c for c in Category})
    aliases.update({c.value.replace("_", "-"): c for c in Category})
    for cls in _REGISTRY.values():
        aliases.update(cls.native_categories)
    return aliases


def resolve_category(name: str) -> Category:
    """Map a unified or native category name (case-insensitive) to a Category; ValueError if unknown."""
    aliases = category_aliases()
    key = name.strip().upper()
    if key in aliases:
        return aliases[key]
    known = ", ".join(c.value for c in Category if c is not Category.OTHER)
    native = ", ".join(sorted(k for k in aliases if k not in {c.value for c in Category} and " " not in k))
    raise ValueError(f"unknown category {name!r}; use a unified name ({known}) or a native code ({native})")


ParseFn = Callable[[str], Verdict]
