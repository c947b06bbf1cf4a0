"""Instrumentation: every verdict is dispatched as a ``GuardVerdictEvent`` through LlamaIndex's dispatcher.

Existing observability handlers (``llama_index.core.instrumentation`` event handlers, Arize, Langfuse...)
see them. Handlers can observe but not block: blocking is done by the components themselves.
"""

from __future__ import annotations

from typing import Any

from llama_index.core.instrumentation import get_dispatcher  # type: ignore[attr-defined]
from llama_index.core.instrumentation.events import BaseEvent

from ..verdict import Decision

dispatcher = get_dispatcher("flexguard_integrations")


class GuardVerdictEvent(BaseEvent):
    """One guard decision: where it was made, and the decision with its verdict (as a dict)."""

    where: str
    action: str
    risk_score: float
    categories: list[str]
    fail_open: bool = False
    error: str | None = None
    decision: dict[str, Any]

    @classmethod
    def class_name(cls) -> str:
        return "GuardVerdictEvent"


def emit(decision: Decision, where: str) -> None:
    """Dispatch a :class:`GuardVerdictEvent` for ``decision``."""
    dispatcher.event(
        GuardVerdictEvent(
            where=where,
            action=decision.action.value,
            risk_score=float(decision.verdict.risk_score),
            categories=[c.value for c in decision.verdict.categories],
            fail_open=decision.fail_open,
            error=decision.verdict.error,
            decision=decision.to_dict(),
        )
    )
