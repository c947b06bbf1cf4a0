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

``speculative_input=True`` moves the input checks from ``before_model`` into ``wrap_model_call`` /
``awrap_model_call``, where they run at the same time as the model call (see :class:`GuardMiddleware`).
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar

from langchain.agents.middleware import AgentMiddleware, AgentState, ExtendedModelResponse, ModelResponse, hook_config
from langchain.agents.middleware.types import PrivateStateAttr
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage, convert_to_messages
from langchain_core.runnables.config import var_child_runnable_config
from langgraph.graph.message import add_messages
from langgraph.types import Command
from typing_extensions import NotRequired

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
_M = TypeVar("_M")
RouteHandler = Callable[[Decision, Mapping[str, Any]], Mapping[str, Any] | None]

DEFAULT_TOOL_REFUSAL = "Tool call blocked by the safety guard ({categories}); the tool was not run."
DEFAULT_TOOL_RESULT_REFUSAL = "[tool result withheld by the safety guard ({categories})]"
HUMAN_REVIEW = "human_review"
_MAX_REMEMBERED = 10_000
_END_AFTER = "flexguard_end_after"
_NOSTREAM = "nostream"  # langgraph.constants.TAG_NOSTREAM: the messages stream skips chat models tagged so


class GuardAgentState(AgentState[Any]):
    """The agent state with the middleware's private key (never in the agent's input or output).

    ``flexguard_end_after``: set by a speculative input check that ended the run from the model node, which
    cannot jump; it holds the id of the last message that model node wrote, and ``after_model`` turns it into
    ``jump_to: "end"`` when that message is still the last one (a stale value is cleared and ignored).
    """

    flexguard_end_after: NotRequired[Annotated[str | None, PrivateStateAttr]]


@dataclass
class _Plan:
    """How ``wrap_model_call`` carries out the state update ``before_model`` would have returned."""

    end: bool = False  # the update ends the run: the model's response is discarded
    rerun: Any = None  # the ModelRequest to run the model on again (the input changed), or None
    added: list[BaseMessage] = field(default_factory=list)  # new messages, written before the model's
    update: dict[str, Any] = field(default_factory=dict)  # replacements by id and other keys (a Command)


class GuardMiddleware(AgentMiddleware):
    """Agent middleware that checks prompts, responses, tool calls and tool results with a Guard.

    ``exit_behavior``: ``"end"`` (answer with ``violation_message`` and end the run), ``"error"`` (raise
    :class:`GuardBlockedError`) or ``"replace"`` (replace the offending content with the message and go
    on). Messages are templates with ``{categories}``, ``{risk_score}``, ``{reason}``.

    ``speculative_input=True`` checks the input (the new user message, surface ``prompt``, and the unchecked
    tool results, ``tool_result``: the same checks ``before_model`` makes) **while the model runs**, in
    ``wrap_model_call`` / ``awrap_model_call``; ``before_model`` then checks nothing. An agent step costs
    about max(T_guard, T_model) instead of T_guard + T_model. The model node returns only once the check
    has answered, so the tool node (which runs after the model node) never runs a tool the speculative
    response asked for before the input passed, and ``after_model`` still checks the response and the tool
    calls. When every input decision passes (ALLOW, FLAG) the model's response is returned unchanged.
    Otherwise the speculative response is discarded, never written to the state, and the decision is
    carried out as ``before_model`` would:

    - BLOCK with ``exit_behavior="end"``: the model node writes the refusal ``AIMessage`` instead of the
      response, and ``after_model`` (which, unlike ``wrap_model_call``, may jump) ends the run without
      checking it, through the private state key ``flexguard_end_after``;
    - ``"error"``: :class:`GuardBlockedError` is raised out of the model node;
    - REDACT, ``"replace"``, a withheld tool result: the message is replaced in the state (same id, through
      an ``ExtendedModelResponse`` command) and the model runs again on the changed input;
    - REROUTE: ``human_review`` interrupts the model node (on resume the node runs again from its start,
      model call included); ``route_handlers[name]``'s state update is applied, its ``jump_to: "end"`` too.

    The cost: the model's tokens are spent even on input that is then blocked. Async runs cancel the
    model call as soon as the check says no (the task is cancelled and awaited); sync runs keep the model
    in the calling thread and the check in a worker thread, so a blocked model call runs to completion
    before its response is dropped. The speculative call is tagged ``nostream``, so
    ``stream_mode="messages"`` does not show its tokens: the model step's message arrives whole when the
    model node returns. Put GuardMiddleware first in ``middleware=[...]``: a ``wrap_model_call`` of a
    middleware listed before it that answers without calling the model (a cache) skips the input check.
    """

    state_schema = GuardAgentState

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
        speculative_input: bool = False,
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
        self.speculative_input = speculative_input
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

    def _checked(self, msg: _M) -> _M:
        """Remember a tool result (its id and its text) as checked, so before_model does not check it again."""
        if isinstance(msg, ToolMessage):
            self._remember(self._checked_results, _seen_key(msg.tool_call_id, message_text(msg)), None)
        return msg

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
                and _seen_key(msg.tool_call_id, text) not in self._checked_results
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
                self._remember(self._checked_results, _seen_key(msg.tool_call_id, text), None)
            decision, handled = self._resolve_route(raw_decision, text, surface.value, state)
            if handled is not None:
                update = dict(handled)
                if replaced:  # keep what was already redacted or withheld: the model must not read it
                    extra = update.get("messages")
                    more = [] if extra is None else list(extra) if isinstance(extra, list | tuple) else [extra]
                    update["messages"] = [*replaced, *more]
                return update
            if decision.action.passes:
                continue
            if decision.action is Action.REDACT and decision.redacted_text is not None:
                replaced.append(self._checked(with_text(msg, decision.redacted_text)))
                continue
            if self.exit_behavior == "error":
                raise GuardBlockedError(decision)
            if surface is Surface.TOOL_RESULT:
                content = self._fmt(self.tool_result_violation_message, decision)
                replaced.append(self._checked(msg.model_copy(update={"content": content, "status": "error"})))
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
                self._remember(self._call_decisions, _seen_key(call_id, text), raw_decision)
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
        if self.speculative_input:
            return None  # checked in wrap_model_call, alongside the model call
        tasks = self._input_tasks(state["messages"])
        if not tasks:
            return None
        decisions = [self.guard.check(text, surface=surface, policy=self._policy) for _, surface, text in tasks]
        for decision, (_, surface, _) in zip(decisions, tasks, strict=True):
            dispatch_verdict(decision, f"before_model:{surface.value}")
        return self._before_update(state, tasks, decisions)

    @hook_config(can_jump_to=["end"])
    async def abefore_model(self, state: Any, runtime: Any) -> dict[str, Any] | None:
        if self.speculative_input:
            return None
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

    @staticmethod
    def _speculative_end(state: Mapping[str, Any]) -> dict[str, Any] | None:
        """The jump a speculative input check asked for at this model call; a stale marker is only cleared."""
        marker = state.get(_END_AFTER)
        if marker is None:
            return None
        messages = state["messages"]
        if messages and messages[-1].id == marker:
            return {"jump_to": "end", _END_AFTER: None}
        return {_END_AFTER: None}

    @staticmethod
    def _merge(update: dict[str, Any] | None, extra: dict[str, Any] | None) -> dict[str, Any] | None:
        if extra is None:
            return update
        return {**(update or {}), **extra}

    @hook_config(can_jump_to=["end"])
    def after_model(self, state: Any, runtime: Any) -> dict[str, Any] | None:
        ended = self._speculative_end(state)
        if ended is not None and "jump_to" in ended:
            return ended  # the model node wrote the input's refusal: nothing of the model's to check
        last, tasks = self._output_tasks(state["messages"])
        if last is None or not tasks:
            return ended
        prompt = last_human_text(state["messages"]) or " "
        decisions = [self.guard.check(prompt, response=text, surface=s, policy=self._policy) for _, s, text in tasks]
        for decision, (_, surface, _) in zip(decisions, tasks, strict=True):
            dispatch_verdict(decision, f"after_model:{surface.value}")
        return self._merge(self._after_update(state, last, tasks, decisions), ended)

    @hook_config(can_jump_to=["end"])
    async def aafter_model(self, state: Any, runtime: Any) -> dict[str, Any] | None:
        ended = self._speculative_end(state)
        if ended is not None and "jump_to" in ended:
            return ended
        last, tasks = self._output_tasks(state["messages"])
        if last is None or not tasks:
            return ended
        prompt = last_human_text(state["messages"]) or " "
        decisions = list(
            await asyncio.gather(
                *(self.guard.acheck(prompt, response=text, surface=s, policy=self._policy) for _, s, text in tasks)
            )
        )
        for decision, (_, surface, _) in zip(decisions, tasks, strict=True):
            await adispatch_verdict(decision, f"after_model:{surface.value}")
        return self._merge(self._after_update(state, last, tasks, decisions), ended)

    # ================================================================= speculative input (wrap_model_call)

    def _speculative_tasks(self, request: Any) -> list[tuple[BaseMessage, Surface, str]]:
        if not self.speculative_input:
            return []
        state = request.state or {}
        return self._input_tasks(state.get("messages", []) if isinstance(state, Mapping) else [])

    def _check_inputs(self, tasks: list[tuple[BaseMessage, Surface, str]], policy: Any) -> list[Decision]:
        return [self.guard.check(text, surface=surface, policy=policy) for _, surface, text in tasks]

    async def _acheck_inputs(self, tasks: list[tuple[BaseMessage, Surface, str]], policy: Any) -> list[Decision]:
        if len(tasks) == 1:
            _, surface, text = tasks[0]
            return [await self.guard.acheck(text, surface=surface, policy=policy)]
        checks = [asyncio.ensure_future(self.guard.acheck(t, surface=s, policy=policy)) for _, s, t in tasks]
        try:
            return list(await asyncio.gather(*checks))
        except BaseException:
            await _cancel(*checks)  # gather does not cancel the others when one fails
            raise

    def _plan(self, request: Any, update: Mapping[str, Any]) -> _Plan:
        """Translate ``before_model``'s state update into what the model node can do with it.

        A model node cannot jump and its own messages go in first, so: new messages are written by the node
        (in order), replacements (an id already in the state) and the other keys by a Command, ``jump_to:
        "end"`` by the ``flexguard_end_after`` marker; a changed input means running the model again.
        """
        rest = dict(update)
        jump = rest.pop("jump_to", None)
        raw = rest.pop("messages", None)
        messages = convert_to_messages(raw if isinstance(raw, list | tuple) else [raw]) if raw is not None else []
        state = request.state or {}
        in_state = list(state.get("messages", []))
        known = {m.id for m in in_state if m.id is not None}
        replaced = [m for m in messages if m.id is not None and m.id in known]
        added = [
            m if m.id is not None else m.model_copy(update={"id": str(uuid.uuid4())})
            for m in messages
            if m.id is None or m.id not in known
        ]
        if replaced:
            rest["messages"] = replaced
        if jump == "end":  # before_model declares only "end"; any other jump it returns is ignored by LangChain
            last = added[-1].id if added else (in_state[-1].id if in_state else None)
            return _Plan(end=True, added=added, update={**rest, _END_AFTER: last})
        if not messages:  # the model's input did not change: its response stands
            return _Plan(update=rest)
        changes: list[Any] = list(messages)
        rerun = request.override(
            messages=add_messages(list(request.messages), changes),
            state={**state, **rest, "messages": add_messages(in_state, changes)},
        )
        return _Plan(rerun=rerun, added=added, update=rest)

    @staticmethod
    def _respond(plan: _Plan, response: Any = None) -> Any:
        """The model node's result: the plan's messages, then the response's, then the Command."""
        if plan.end:
            result: Any = ModelResponse(result=list(plan.added))
        elif plan.added:
            result = ModelResponse(
                result=[*plan.added, *response.result], structured_response=response.structured_response
            )
        else:
            result = response
        if not plan.update:
            return result
        return ExtendedModelResponse(model_response=result, command=Command(update=plan.update))

    def wrap_model_call(self, request: Any, handler: Callable[[Any], Any]) -> Any:
        """With ``speculative_input``: the model runs in this thread while a worker thread checks the input.

        A thread cannot be cancelled: when the input does not pass, the model call has finished and its
        response (or error) is dropped. A check that raises is re-raised (the response dropped too).
        """
        tasks = self._speculative_tasks(request)
        if not tasks:
            return handler(request)
        policy = self._policy
        response: Any = None
        model_error: Exception | None = None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="speculative-input-check") as pool:
            check = pool.submit(contextvars.copy_context().run, self._check_inputs, tasks, policy)
            try:
                response = contextvars.copy_context().run(_hidden_call, handler, request)
            except Exception as exc:  # the input's decision comes first: a blocked input ends the same way
                model_error = exc
            decisions = check.result()  # shutdown(wait=True) on exit: the worker never outlives the call
        for decision, (_, surface, _) in zip(decisions, tasks, strict=True):
            dispatch_verdict(decision, f"before_model:{surface.value}")
        update = self._before_update(request.state, tasks, decisions)
        plan = None if update is None else self._plan(request, update)
        if plan is None or (not plan.end and plan.rerun is None):
            if model_error is not None:
                raise model_error
            return response if plan is None else self._respond(plan, response)
        if plan.end:
            return self._respond(plan)
        return self._respond(plan, handler(plan.rerun))

    async def awrap_model_call(self, request: Any, handler: Callable[[Any], Awaitable[Any]]) -> Any:
        """With ``speculative_input``: the model call runs as a task while the input is checked.

        The task is cancelled (and awaited) as soon as the input does not pass or the check raises.
        """
        tasks = self._speculative_tasks(request)
        if not tasks:
            return await handler(request)
        policy = self._policy
        model = asyncio.ensure_future(_ahidden_call(handler, request))
        try:
            decisions = await self._acheck_inputs(tasks, policy)
            for decision, (_, surface, _) in zip(decisions, tasks, strict=True):
                await adispatch_verdict(decision, f"before_model:{surface.value}")
            update = self._before_update(request.state, tasks, decisions)  # may raise or interrupt
            plan = None if update is None else self._plan(request, update)
            if plan is None or (not plan.end and plan.rerun is None):
                response = await model
                return response if plan is None else self._respond(plan, response)
        except BaseException:
            await _cancel(model)
            raise
        await _cancel(model)
        if plan.end:
            return self._respond(plan)
        return self._respond(plan, await handler(plan.rerun))

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
        content = self._fmt(self.tool_violation_message, decision)
        if handled is not None and isinstance(handled.get("content"), str):
            content = handled["content"]
        # the agent will see this message as the tool's result: do not send it back to the guard
        return self._checked(tool_message_error(str(call["id"]), call.get("name"), content))

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
            text = render_tool_call(call["name"], call["args"])
            decision = self._call_decisions.pop(_seen_key(call_id, text), None)
            if decision is None:
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
        outcome = self._checked(self._result_outcome(result, decision))
        if outcome is not result:  # the original text was checked too (it may come back in a replay)
            self._checked(result)
        return outcome

    async def awrap_tool_call(self, request: Any, handler: Callable[[Any], Awaitable[Any]]) -> Any:
        call = request.tool_call
        call_id = str(call.get("id"))
        if self.check_tool_calls:
            text = render_tool_call(call["name"], call["args"])
            decision = self._call_decisions.pop(_seen_key(call_id, text), None)
            if decision is None:
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
        outcome = self._checked(self._result_outcome(result, decision))
        if outcome is not result:  # the original text was checked too (it may come back in a replay)
            self._checked(result)
        return outcome


# ================================================================= helpers


def _hide_from_stream() -> None:
    """Tag the model call about to start (this context only) so stream_mode="messages" does not show it."""
    config = var_child_runnable_config.get()
    if config is None:
        return
    tags = list(config.get("tags") or [])
    if _NOSTREAM not in tags:
        var_child_runnable_config.set({**config, "tags": [*tags, _NOSTREAM]})


def _hidden_call(handler: Callable[[Any], Any], request: Any) -> Any:
    _hide_from_stream()  # run in a copied context: the tag does not outlive the call
    return handler(request)


async def _ahidden_call(handler: Callable[[Any], Awaitable[Any]], request: Any) -> Any:
    _hide_from_stream()  # a task runs in its own copy of the context
    return await handler(request)


def _seen_key(call_id: str, text: str) -> str:
    """Key of what was checked: the tool call id *and* a digest of the text, so a message that reuses an id
    (another run, a replayed or forged history) with other content is checked again, never waved through."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=12).hexdigest()
    return f"{call_id}:{digest}"


async def _cancel(*tasks: asyncio.Future[Any]) -> None:
    """Cancel ``tasks`` and wait until they are done (their results and errors are dropped)."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
