"""``GuardMiddleware``: guard every place text moves inside a ``langchain.agents.create_agent`` agent.

- before the model: the new user message (surface ``prompt``) and the tool results since the last AI
  message (surface ``tool_result``: indirect prompt injection);
- after the model: the AI message text (``response``) and each tool call's name and arguments
  (``tool_call``), all checked before any tool runs;
- around each tool call: the arguments (if not already checked) and the result.

BLOCK on the input answers with the refusal and ends the run; a blocked tool call is never executed (the
agent receives a ``ToolMessage(status="error")``); a blocked response is replaced (same message id).
REDACT replaces content in place (same id). REROUTE to ``human_review`` raises a LangGraph interrupt
carrying the decision (needs a checkpointer); other route names call ``route_handlers[name]``.
Both sync and async hooks are implemented, and ``can_jump_to`` is declared (an undeclared ``jump_to`` is
silently ignored by LangChain).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Literal

from langchain.agents.middleware import AgentMiddleware, hook_config
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage

from ..errors import GuardBlockedError
from ..guard import Guard, scoped_policy
from ..verdict import Action, Decision, Surface
from ._common import (
    DEFAULT_REFUSAL,
    adispatch_verdict,
    current_config_policy,
    dispatch_verdict,
    format_refusal,
    last_human_text,
    message_text,
    render_tool_call,
    tool_message_error,
    with_text,
)

ExitBehavior = Literal["end", "error", "replace"]
RouteHandler = Callable[[Decision, Mapping[str, Any]], Mapping[str, Any] | None]

DEFAULT_TOOL_REFUSAL = "Tool call blocked by the safety guard ({categories}); the tool was not run."
DEFAULT_TOOL_RESULT_REFUSAL = "[tool result withheld by the safety guard ({categories})]"
HUMAN_REVIEW = "human_review"
_MAX_REMEMBERED = 10_000


class GuardMiddleware(AgentMiddleware):
    """Agent middleware that checks prompts, responses, tool calls and tool results with a Guard.

    ``exit_behavior``: ``"end"`` (answer with ``violation_message`` and end the run), ``"error"`` (raise
    :class:`GuardBlockedError`) or ``"replace"`` (replace the offending content with the message and go
    on). Messages are templates with ``{categories}``, ``{risk_score}``, ``{reason}``.
    """

    def __init__(
        self,
        guard: Guard,
        *,
        check_input: bool = True,
        check_output: bool = True,
        check_tool_calls: bool = True,
        check_tool_results: bool = True,
        exit_behavior: ExitBehavior = "end",
        violation_message: str = DEFAULT_REFUSAL,
        tool_violation_message: str = DEFAULT_TOOL_REFUSAL,
        tool_result_violation_message: str = DEFAULT_TOOL_RESULT_REFUSAL,
        route_handlers: Mapping[str, RouteHandler] | None = None,
        policy: Any = None,
    ) -> None:
        super().__init__()
        if exit_behavior not in ("end", "error", "replace"):
            raise ValueError(f"exit_behavior must be 'end', 'error' or 'replace', not {exit_behavior!r}")
        self.guard = guard
        self.check_input = check_input
        self.check_output = check_output
        self.check_tool_calls = check_tool_calls
        self.check_tool_results = check_tool_results
        self.exit_behavior = exit_behavior
        self.violation_message = violation_message
        self.tool_violation_message = tool_violation_message
        self.tool_result_violation_message = tool_result_violation_message
        self.route_handlers = dict(route_handlers or {})
        self.policy = policy
        self._call_decisions: OrderedDict[str, Decision] = OrderedDict()
        self._checked_results: OrderedDict[str, None] = OrderedDict()

    @property
    def name(self) -> str:
        return "GuardMiddleware"

    @property
    def _policy(self) -> Any:
        """Per call (``configurable.flexguard_policy`` or a policy_scope) beats the middleware's own."""
        return current_config_policy() or scoped_policy(self.policy)

    # ================================================================= bookkeeping

    def _remember(self, store: OrderedDict[str, Any], key: str, value: Any) -> None:
        store[key] = value
        while len(store) > _MAX_REMEMBERED:
            store.popitem(last=False)

    @staticmethod
    def _new_messages(messages: Sequence[BaseMessage]) -> list[BaseMessage]:
        for i in range(len(messages) - 1, -1, -1):
            if isinstance(messages[i], AIMessage):
                return list(messages[i + 1 :])
        return list(messages)

    def _input_tasks(self, messages: Sequence[BaseMessage]) -> list[tuple[BaseMessage, Surface, str]]:
        tasks: list[tuple[BaseMessage, Surface, str]] = []
        for msg in self._new_messages(messages):
            text = message_text(msg)
            if not text.strip():
                continue
            if isinstance(msg, HumanMessage) and self.check_input:
                tasks.append((msg, Surface.PROMPT, text))
            elif (
                isinstance(msg, ToolMessage)
                and self.check_tool_results
                and msg.tool_call_id not in self._checked_results
            ):
                tasks.append((msg, Surface.TOOL_RESULT, text))
        return tasks

    def _output_tasks(self, messages: Sequence[BaseMessage]) -> tuple[AIMessage | None, list[tuple[str, Surface, str]]]:
        last = messages[-1] if messages else None
        if not isinstance(last, AIMessage):
            return None, []
        tasks: list[tuple[str, Surface, str]] = []
        text = message_text(last)
        if self.check_output and text.strip():
            tasks.append(("", Surface.RESPONSE, text))
        if self.check_tool_calls:
            for call in last.tool_calls:
                if call.get("id"):
                    tasks.append((str(call["id"]), Surface.TOOL_CALL, render_tool_call(call["name"], call["args"])))
        return last, tasks

    # ================================================================= outcomes

    def _fmt(self, template: str, decision: Decision) -> str:
        return format_refusal(template, decision)

    def _review(self, decision: Decision, text: str, where: str) -> Decision:
        """REROUTE to human_review: interrupt the graph; resume with {"approve": true} to let it pass."""
        from langgraph.types import interrupt

        answer = interrupt({"type": "flexguard_review", "where": where, "text": text, "decision": decision.to_dict()})
        approved = answer is True or (isinstance(answer, str) and answer.lower() in ("approve", "approved", "yes"))
        if isinstance(answer, Mapping):
            approved = bool(answer.get("approve") or answer.get("approved"))
        if approved:
            from dataclasses import replace

            return replace(decision, action=Action.ALLOW, reason=f"{decision.reason}; approved by human review")
        from dataclasses import replace

        return replace(decision, action=Action.BLOCK, reason=f"{decision.reason}; rejected by human review")

    def _resolve_route(
        self, decision: Decision, text: str, where: str, state: Mapping[str, Any]
    ) -> tuple[Decision, Mapping[str, Any] | None]:
        """Turn REROUTE into ALLOW/BLOCK (human review) or run a route handler (its state update)."""
        if decision.action is not Action.REROUTE:
            return decision, None
        if decision.route == HUMAN_REVIEW and HUMAN_REVIEW not in self.route_handlers:
            return self._review(decision, text, where), None
        handler = self.route_handlers.get(decision.route or "")
        if handler is None:
            from dataclasses import replace

            blocked = replace(
                decision, action=Action.BLOCK, reason=f"{decision.reason}; no handler for route {decision.route!r}"
            )
            return blocked, None
        return decision, handler(decision, state) or {}

    def _before_update(
        self, state: Mapping[str, Any], tasks: list[tuple[BaseMessage, Surface, str]], decisions: list[Decision]
    ) -> dict[str, Any] | None:
        replaced: list[BaseMessage] = []
        for (msg, surface, text), raw_decision in zip(tasks, decisions, strict=True):
            if isinstance(msg, ToolMessage):
                self._remember(self._checked_results, msg.tool_call_id, None)
            decision, handled = self._resolve_route(raw_decision, text, surface.value, state)
            if handled is not None:
                return dict(handled)
            if decision.action.passes:
                continue
            if decision.action is Action.REDACT and decision.redacted_text is not None:
                replaced.append(with_text(msg, decision.redacted_text))
                continue
            if self.exit_behavior == "error":
                raise GuardBlockedError(decision)
            if surface is Surface.TOOL_RESULT:
                content = self._fmt(self.tool_result_violation_message, decision)
                replaced.append(msg.model_copy(update={"content": content, "status": "error"}))
                continue
            refusal = self._fmt(self.violation_message, decision)
            if self.exit_behavior == "replace":
                replaced.append(msg.model_copy(update={"content": refusal}))
                continue
            meta = {"flexguard": decision.to_dict()}
            return {"messages": [*replaced, AIMessage(content=refusal, response_metadata=meta)], "jump_to": "end"}
        return {"messages": replaced} if replaced else None

    def _after_update(
        self,
        state: Mapping[str, Any],
        last: AIMessage,
        tasks: list[tuple[str, Surface, str]],
        decisions: list[Decision],
    ) -> dict[str, Any] | None:
        update: dict[str, Any] | None = None
        for (call_id, surface, text), raw_decision in zip(tasks, decisions, strict=True):
            if surface is Surface.TOOL_CALL:
                self._remember(self._call_decisions, call_id, raw_decision)
                continue
            decision, handled = self._resolve_route(raw_decision, text, surface.value, state)
            if handled is not None:
                return dict(handled)
            if decision.action.passes:
                continue
            if decision.action is Action.REDACT and decision.redacted_text is not None:
                update = {"messages": [with_text(last, decision.redacted_text)]}
                continue
            if self.exit_behavior == "error":
                raise GuardBlockedError(decision)
            refusal = self._fmt(self.violation_message, decision)
            replacement = last.model_copy(
                update={
                    "content": refusal,
                    "tool_calls": [],
                    "invalid_tool_calls": [],
                    "response_metadata": {**last.response_metadata, "flexguard": decision.to_dict()},
                }
            )
            result: dict[str, Any] = {"messages": [replacement]}
            if self.exit_behavior == "end":
                result["jump_to"] = "end"
            return result
        return update

    # ================================================================= model hooks

    @hook_config(can_jump_to=["end"])
    def before_model(self, state: Any, runtime: Any) -> dict[str, Any] | None:
        tasks = self._input_tasks(state["messages"])
        if not tasks:
            return None
        decisions = [self.guard.check(text, surface=surface, policy=self._policy) for _, surface, text in tasks]
        for decision, (_, surface, _) in zip(decisions, tasks, strict=True):
            dispatch_verdict(decision, f"before_model:{surface.value}")
        return self._before_update(state, tasks, decisions)

    @hook_config(can_jump_to=["end"])
    async def abefore_model(self, state: Any, runtime: Any) -> dict[str, Any] | None:
        tasks = self._input_tasks(state["messages"])
        if not tasks:
            return None
        decisions = list(
            await asyncio.gather(
                *(self.guard.acheck(text, surface=surface, policy=self._policy) for _, surface, text in tasks)
            )
        )
        for decision, (_, surface, _) in zip(decisions, tasks, strict=True):
            await adispatch_verdict(decision, f"before_model:{surface.value}")
        return self._before_update(state, tasks, decisions)

    @hook_config(can_jump_to=["end"])
    def after_model(self, state: Any, runtime: Any) -> dict[str, Any] | None:
        last, tasks = self._output_tasks(state["messages"])
        if last is None or not tasks:
            return None
        prompt = last_human_text(state["messages"]) or " "
        decisions = [self.guard.check(prompt, response=text, surface=s, policy=self._policy) for _, s, text in tasks]
        for decision, (_, surface, _) in zip(decisions, tasks, strict=True):
            dispatch_verdict(decision, f"after_model:{surface.value}")
        return self._after_update(state, last, tasks, decisions)

    @hook_config(can_jump_to=["end"])
    async def aafter_model(self, state: Any, runtime: Any) -> dict[str, Any] | None:
        last, tasks = self._output_tasks(state["messages"])
        if last is None or not tasks:
            return None
        prompt = last_human_text(state["messages"]) or " "
        decisions = list(
            await asyncio.gather(
                *(self.guard.acheck(prompt, response=text, surface=s, policy=self._policy) for _, s, text in tasks)
            )
        )
        for decision, (_, surface, _) in zip(decisions, tasks, strict=True):
            await adispatch_verdict(decision, f"after_model:{surface.value}")
        return self._after_update(state, last, tasks, decisions)

    # ================================================================= tool hooks

    def _call_outcome(self, request: Any, decision: Decision) -> ToolMessage | None:
        """None to run the tool; an error ToolMessage when the call may not run.

        A call a route handler took over is not run either: the handler decided what happens instead.
        """
        call = request.tool_call
        text = render_tool_call(call["name"], call["args"])
        decision, handled = self._resolve_route(decision, text, "tool_call", request.state or {})
        if decision.action.passes:
            return None
        if self.exit_behavior == "error" and handled is None:
            raise GuardBlockedError(decision)
        # the agent will see this message as the tool's result: do not send it back to the guard
        self._remember(self._checked_results, str(call["id"]), None)
        content = self._fmt(self.tool_violation_message, decision)
        if handled is not None and isinstance(handled.get("content"), str):
            content = handled["content"]
        return tool_message_error(str(call["id"]), call.get("name"), content)

    def _result_outcome(self, result: Any, decision: Decision) -> Any:
        if decision.action.passes:
            return result
        if decision.action is Action.REDACT and decision.redacted_text is not None:
            return result.model_copy(update={"content": decision.redacted_text})
        if self.exit_behavior == "error":
            raise GuardBlockedError(decision)
        content = self._fmt(self.tool_result_violation_message, decision)
        return result.model_copy(update={"content": content, "status": "error"})

    def _prompt_of(self, request: Any) -> str:
        state = request.state or {}
        messages = state.get("messages", []) if isinstance(state, Mapping) else []
        return last_human_text(messages) or " "

    def wrap_tool_call(self, request: Any, handler: Callable[[Any], Any]) -> Any:
        call = request.tool_call
        call_id = str(call.get("id"))
        if self.check_tool_calls:
            decision = self._call_decisions.pop(call_id, None)
            if decision is None:
                text = render_tool_call(call["name"], call["args"])
                decision = self.guard.check(
                    self._prompt_of(request), response=text, surface=Surface.TOOL_CALL, policy=self._policy
                )
                dispatch_verdict(decision, "tool_call")
            refused = self._call_outcome(request, decision)
            if refused is not None:
                return refused
        result = handler(request)
        if not self.check_tool_results or not isinstance(result, ToolMessage):
            return result
        text = message_text(result)
        if not text.strip():
            return result
        decision = self.guard.check(text, surface=Surface.TOOL_RESULT, policy=self._policy)
        dispatch_verdict(decision, "tool_result")
        self._remember(self._checked_results, result.tool_call_id, None)
        return self._result_outcome(result, decision)

    async def awrap_tool_call(self, request: Any, handler: Callable[[Any], Awaitable[Any]]) -> Any:
        call = request.tool_call
        call_id = str(call.get("id"))
        if self.check_tool_calls:
            decision = self._call_decisions.pop(call_id, None)
            if decision is None:
                text = render_tool_call(call["name"], call["args"])
                decision = await self.guard.acheck(
                    self._prompt_of(request), response=text, surface=Surface.TOOL_CALL, policy=self._policy
                )
                await adispatch_verdict(decision, "tool_call")
            refused = self._call_outcome(request, decision)
            if refused is not None:
                return refused
        result = await handler(request)
        if not self.check_tool_results or not isinstance(result, ToolMessage):
            return result
        text = message_text(result)
        if not text.strip():
            return result
        decision = await self.guard.acheck(text, surface=Surface.TOOL_RESULT, policy=self._policy)
        await adispatch_verdict(decision, "tool_result")
        self._remember(self._checked_results, result.tool_call_id, None)
        return self._result_outcome(result, decision)
