"""flexguard-integrations: FlexGuard and Qwen3Guard-Gen guard models in front of LangChain and LlamaIndex.

The public names are imported lazily, so ``import flexguard_integrations`` stays fast and pulls in
neither httpx nor pydantic until a Guard or a policy is first used; the framework integrations live in
``flexguard_integrations.langchain`` and ``flexguard_integrations.llama_index``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "Guard": ".guard",
    "CheckRequest": ".guard",
    "policy_scope": ".guard",
    "StrictnessPolicy": ".policy",
    "PRESETS": ".policy",
    "Verdict": ".verdict",
    "Decision": ".verdict",
    "Action": ".verdict",
    "Surface": ".verdict",
    "Category": ".verdict",
    "VerdictCache": ".cache",
    "CircuitBreaker": ".breaker",
    "FlexGuardError": ".errors",
    "ConfigurationError": ".errors",
    "PolicyError": ".errors",
    "GuardInputError": ".errors",
    "GuardBlockedError": ".errors",
    "GuardUnavailableError": ".errors",
    "GuardTransportError": ".errors",
    "GuardConnectionError": ".errors",
    "GuardTimeoutError": ".errors",
    "GuardOverloadedError": ".errors",
    "GuardServerError": ".errors",
    "GuardAuthenticationError": ".errors",
    "GuardBadRequestError": ".errors",
    "ContextLengthExceededError": ".errors",
    "GuardResponseError": ".errors",
}

__all__ = [
    "PRESETS",
    "Action",
    "Category",
    "CheckRequest",
    "CircuitBreaker",
    "ConfigurationError",
    "ContextLengthExceededError",
    "Decision",
    "FlexGuardError",
    "Guard",
    "GuardAuthenticationError",
    "GuardBadRequestError",
    "GuardBlockedError",
    "GuardConnectionError",
    "GuardInputError",
    "GuardOverloadedError",
    "GuardResponseError",
    "GuardServerError",
    "GuardTimeoutError",
    "GuardTransportError",
    "GuardUnavailableError",
    "PolicyError",
    "StrictnessPolicy",
    "Surface",
    "Verdict",
    "VerdictCache",
    "__version__",
    "policy_scope",
]

if TYPE_CHECKING:
    from .breaker import CircuitBreaker
    from .cache import VerdictCache
    from .errors import (
        ConfigurationError,
        ContextLengthExceededError,
        FlexGuardError,
        GuardAuthenticationError,
        GuardBadRequestError,
        GuardBlockedError,
        GuardConnectionError,
        GuardInputError,
        GuardOverloadedError,
        GuardResponseError,
        GuardServerError,
        GuardTimeoutError,
        GuardTransportError,
        GuardUnavailableError,
        PolicyError,
    )
    from .guard import CheckRequest, Guard, policy_scope
    from .policy import PRESETS, StrictnessPolicy
    from .verdict import Action, Category, Decision, Surface, Verdict


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'flexguard_integrations' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
