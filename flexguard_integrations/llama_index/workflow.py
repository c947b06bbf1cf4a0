"""A workflow step that checks text inside a custom LlamaIndex ``Workflow``.

Send a :class:`GuardCheckEvent`; the :class:`GuardStepMixin` step answers with a :class:`GuardPassedEvent`
(the text, redacted if the policy says so, plus the decision and your payload) or ends the workflow with
a ``StopEvent`` whose result is the refusal (and the decision)::

    class MyFlow(GuardStepMixin, Workflow):
        @step
        async def start(self, ev: StartEvent) -> GuardCheckEvent:
            return GuardCheckEvent(text=ev.query)

        @step
        async def answer(self, ev: GuardPassedEvent) -> StopEvent:
            return StopEvent(result=f"answering: {ev.text}")

    flow = MyFlow(guard=guard)
"""

from __future__ import annotations

from typing import Any

from llama_index.core.bridge.pydantic import Field
from llama_index.core.workflow import Event, StopEvent, step

from ..guard import Guard, scoped_policy
from ..verdict import Action, Surface
from .events import emit
from .query_engine import DEFAULT_REFUSAL, _refusal_text


class GuardCheckEvent(Event):
    """Ask the guard step to check ``text`` (with ``response`` for response moderation).

    ``surface`` selects the policy's per-surface rules; left as None it is ``"response"`` when
    ``response`` is given (``response`` is then checked, with ``text`` as the user message before it),
    else ``"prompt"``.
    """

    text: str
    response: str | None = None
    surface: str | None = None
    payload: dict[str, Any] = Field(default_factory=dict)


def _surface_of(ev: GuardCheckEvent) -> Surface:
    """The surface a check runs on: the event's ``surface`` if given, else from whether it has a response."""
    if ev.surface is not None:
        return Surface.parse(ev.surface)
    return Surface.RESPONSE if ev.response is not None else Surface.PROMPT


class GuardPassedEvent(Event):
    """The text passed (``text`` is the redacted text when the policy redacted it)."""

    text: str
    response: str | None = None
    decision: dict[str, Any]
    payload: dict[str, Any] = Field(default_factory=dict)


class GuardStepMixin:
    """Adds the ``guard_check`` step to a Workflow. Pass ``guard=`` (and optionally ``guard_policy=``,
    ``guard_refusal=``) to the workflow's constructor."""

    def __init__(
        self,
        *args: Any,
        guard: Guard,
        guard_policy: Any = None,
        guard_refusal: str = DEFAULT_REFUSAL,
        **kwargs: Any,
    ) -> None:
        self.guard = guard
        self.guard_policy = guard_policy
        self.guard_refusal = guard_refusal
        super().__init__(*args, **kwargs)

    @step
    async def guard_check(self, ev: GuardCheckEvent) -> GuardPassedEvent | StopEvent:
        """Check the event's text; pass it on or stop the workflow with the refusal."""
        surface = _surface_of(ev)
        if ev.response is not None:
            decision = await self.guard.acheck(
                ev.text, response=ev.response, surface=surface, policy=scoped_policy(self.guard_policy)
            )
        else:
            decision = await self.guard.acheck(ev.text, surface=surface, policy=scoped_policy(self.guard_policy))
        emit(decision, "workflow:guard_check")
        if decision.action.passes or (decision.action is Action.REDACT and decision.redacted_text is not None):
            redacted = decision.redacted_text if decision.action is Action.REDACT else None
            text, response = ev.text, ev.response
            if redacted is not None:
                if response is None:
                    text = redacted
                else:
                    response = redacted
            return GuardPassedEvent(text=text, response=response, decision=decision.to_dict(), payload=ev.payload)
        return StopEvent(
            result={"refusal": _refusal_text(self.guard_refusal, decision), "decision": decision.to_dict()}
        )
