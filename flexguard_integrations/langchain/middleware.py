"""``GuardMiddleware``: guard every place text moves inside a ``langchain.agents.create_agent`` agent.

- before the model: the new user message (surface ``prompt``) and the tool results since the last AI
  message (surface ``tool_result``: indirect prompt injection);
- after the model: the AI message text (``response``) and each tool call's name and arguments
  (``tool_call``), all checked before any tool runs;
- around each tool call: the arguments (if not already checked) and the result.

BLOCK on the input answers with the refusal and ends the run; a blocked tool call is never executed (the agent
receives a ``ToolMessage(status="error")``); a blocked response is replaced (same message id). REDACT replaces
content in place (same id). REROUTE to ``human_review`` raises a LangGraph interrupt carrying the decision (needs a
checkpointer); other route names call ``route_handlers[name]``. A rerouted response is never put back in the visible
messages; a rerouted tool result is routed in ``before_model`` (in the tool node when the run may end after the tool
step: the tool is ``return_direct``, or the step also answered with a structured output; there human review cannot
run, the result is withheld). At the end of the run ``after_agent`` is a backstop for the ways to end after a tool
step that the tool node cannot foresee: a tool result still unresolved (a deferred reroute, or never checked) is
resolved fail closed, without running routes (see ``after_agent``). A tool's ``Command`` result has each message of
its ``update["messages"]`` checked; a result of another shape is withheld. Review answers approve only when
explicitly affirmative (``True``, ``{"approve": True}``, "approve"/"approved"/"yes"). Several rerouted tool results
are all resolved in one ``before_model`` pass: one review interrupt per result, in order, nothing written until
every review has answered; the handlers' updates are merged (first ``jump_to`` wins). A structured answer
(``response_format``) is checked on the response surface; when it does not pass, ``structured_response`` is cleared.
Both sync and async hooks are implemented, and ``can_jump_to`` is declared (an undeclared ``jump_to`` is silently
ignored by LangChain).

``speculative_input=True`` moves the input checks from ``before_model`` into ``wrap_model_call`` /
``awrap_model_call``, where they run at the same time as the model call (see :class:`GuardMiddleware`).

``hold_output=True`` (the default) checks the response and its tool calls inside the model node, whose model
call is hidden from ``stream_mode="messages"``, so no unchecked token is streamed (see :class:`GuardMiddleware`).
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import hashlib
import json
import logging
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Annotated, Any, Literal, NotRequired, TypeVar

from langchain.agents.middleware import AgentMiddleware, AgentState, ExtendedModelResponse, ModelResponse, hook_config
from langchain.agents.middleware.types import PrivateStateAttr
from langchain.agents.structured_output import AutoStrategy, ProviderStrategy, ToolStrategy
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    HumanMessage,
    RemoveMessage,
    ToolMessage,
    convert_to_messages,
    message_to_dict,
    messages_from_dict,
)
from langchain_core.runnables.config import var_child_runnable_config
from langgraph.graph.message import add_messages
from langgraph.types import Command

from ..errors import GuardBlockedError
from ..guard import Guard, scoped_policy
from ..verdict import Action, Category, Decision, Surface, Verdict
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
logger = logging.getLogger(__name__)
_END_AFTER = "flexguard_end_after"
_ANSWERS = "flexguard_answers"
_RUN_START = "flexguard_run_start"
_RUN_END = "flexguard_run_end"
_HELD = "flexguard_held_output"
HELD_FOR_REVIEW = "[response held for review by the safety guard]"
RETURN_DIRECT_NO_REVIEW = (
    "human review is not available for the result of a return_direct tool (the run may end after this tool step,"
    " with no model step to review it in): withheld"
)
RUN_ENDED_NO_ROUTE = (
    "the run ended before this tool result's route could run (no model step followed the tool step): withheld"
)
_NOSTREAM = "nostream"  # langgraph.constants.TAG_NOSTREAM: the messages stream skips chat models tagged so


class GuardAgentState(AgentState[Any]):
    """The agent state with the middleware's private key (never in the agent's input or output).

    ``flexguard_end_after``: set by a speculative input check that ended the run from the model node, which
    cannot jump; it holds the id of the last message that model node wrote, and ``after_model`` turns it into
    ``jump_to: "end"`` when that message is still the last one (a stale value is cleared and ignored). A
    response blocked in the model node (``hold_output=True``, ``exit_behavior="end"``) ends the run the same way.

    ``flexguard_held_output``: set by the model node (``hold_output=True``) when the response was rerouted
    (human review or a route handler): the node wrote a placeholder ``AIMessage`` instead of the response, and
    this key holds ``{"placeholder": <its id>, "message": <the response, message_to_dict>, "decision": ...}``.
    ``after_model`` resolves the route when the placeholder is still the last message, then clears the key.

    ``flexguard_answers``: the structured answers (``ToolStrategy``) the model node wrote, as keys of their
    ToolMessage (call id and text): those are the framework's, not tool results (kept in the checkpoint, so an
    instance that did not see the model call, after a restart, still knows them; a message reusing the call id
    with other text is a tool result).

    ``flexguard_run_start``: the id of the last message when the run started (``before_agent``), and
    ``flexguard_run_end``: the id of the last message when the previous run ended (``after_agent``): the end of
    the run only looks at what came after the later of the two (the start may be stale when another
    middleware's ``before_agent`` ended the run early, or removed when the input was rewritten).
    """

    flexguard_end_after: NotRequired[Annotated[str | None, PrivateStateAttr]]
    flexguard_held_output: NotRequired[Annotated[dict[str, Any] | None, PrivateStateAttr]]
    flexguard_answers: NotRequired[Annotated[list[str] | None, PrivateStateAttr]]
    flexguard_run_start: NotRequired[Annotated[str | None, PrivateStateAttr]]
    flexguard_run_end: NotRequired[Annotated[str | None, PrivateStateAttr]]


@dataclass
class _Plan:
    """How ``wrap_model_call`` carries out the state update ``before_model`` would have returned."""

    end: bool = False  # the update ends the run: the model's response is discarded
    rerun: Any = None  # the ModelRequest to run the model on again (the input changed), or None
    added: list[BaseMessage] = field(default_factory=list)  # new messages, written before the model's
    update: dict[str, Any] = field(default_factory=dict)  # replacements by id and other keys (a Command)


@dataclass
class _Answer:
    """A model node's response as the held-output check sees it."""

    response: Any  # the ModelResponse (ids given to the answer's messages)
    last: AIMessage | None = None  # its last AIMessage (None: nothing to check)
    trailing: list[ToolMessage] = field(default_factory=list)  # ToolMessages answering a structured call
    tasks: list[tuple[str, Surface, str]] = field(default_factory=list)
    prompt: str = " "
    structured: bool = False  # the response carries a structured answer (response_format)


class GuardMiddleware(AgentMiddleware):
    """Agent middleware that checks prompts, responses, tool calls and tool results with a Guard.

    ``exit_behavior``: ``"end"`` (answer with ``violation_message`` and end the run), ``"error"`` (raise
    :class:`GuardBlockedError`) or ``"replace"`` (replace the offending content with the message and go
    on). Messages are templates with ``{categories}``, ``{risk_score}``, ``{reason}``.

    ``hold_output=True`` (the default; it applies when ``check_output`` or ``check_tool_calls`` is on) checks
    the model's response **inside the model node**, in ``wrap_model_call`` / ``awrap_model_call``, whose model
    call is tagged ``nostream``: ``stream_mode="messages"`` (and ``"updates"``, ``"values"``) only ever shows
    the checked outcome, never an unchecked token. The cost: under ``stream_mode="messages"`` the model
    step's message arrives **whole, after its check, not token by token**. ``hold_output=False`` restores
    token streaming, checking in ``after_model`` only, and accepts that the tokens are shown to a streaming
    user *before* they are checked (a blocked response is replaced in the state, not in what was streamed).
    The node checks the last ``AIMessage`` of the response as ``after_model`` would (same surfaces, same
    verdict events ``after_model:response`` / ``after_model:tool_call``) and carries out the outcome: a pass
    returns the response unchanged, REDACT the redacted message (same id), BLOCK the refusal (same id; with
    ``exit_behavior="end"`` ``after_model`` ends the run through ``flexguard_end_after``; ``"error"`` raises
    :class:`GuardBlockedError`). A REROUTE of the response (human review, a route handler) is not resolved in
    the model node (on resume LangGraph runs the whole node again, model call included): the node writes a
    placeholder ``AIMessage`` (``HELD_FOR_REVIEW``, no tool calls), keeps the response in the private state
    key ``flexguard_held_output``, and ``after_model`` resolves the route on it: approval puts the response
    back in place of the placeholder (with a structured answer's ToolMessage and ``structured_response``),
    rejection writes the refusal, a handler's update is applied without the response (its messages, or the
    refusal, take its place; the handler gets the response in ``state``). ``after_model`` does not check
    again what the node checked; it still checks an ``AIMessage`` the node did not see (written by another
    node, or by a middleware listed before this one that answered without calling the model).

    ``speculative_input=True`` checks the input (the new user message, surface ``prompt``, and the unchecked
    tool results, ``tool_result``: the same checks ``before_model`` makes) **while the model runs**, in
    ``wrap_model_call`` / ``awrap_model_call``; ``before_model`` then checks nothing. An agent step costs
    about max(T_guard, T_model) instead of T_guard + T_model. The model node returns only once the check
    has answered, so the tool node (which runs after the model node) never runs a tool the speculative
    response asked for before the input passed, and the response and its tool calls are still checked (in
    the model node once the input passed with ``hold_output``, else by ``after_model``; a dropped speculative
    response is never checked, the response of a rerun is). When every input decision passes (ALLOW, FLAG)
    the model's response is returned unchanged (once its own check passed). Otherwise the speculative
    response is discarded, never written to the state, and the decision is carried out as ``before_model``
    would:

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

    def __new__(cls, guard: Guard | None = None, **options: Any) -> GuardMiddleware:
        # guard is optional here only for copy.deepcopy and pickle, which call __new__(cls) alone
        # create_agent adds a graph node for every middleware class that overrides before_model; a
        # configuration whose before_model can never act gets a class without it, and saves the node's
        # superstep on every agent step (about a millisecond)
        # the same for after_agent, which only resolves tool results: without check_tool_results it never acts
        speculative = bool(options.get("speculative_input", False))
        no_results = not options.get("check_tool_results", True)
        no_input = not options.get("check_input", True) and no_results
        if cls is not GuardMiddleware:
            return super().__new__(cls)
        pruned: type[GuardMiddleware] = {
            (False, False): GuardMiddleware,
            (True, False): _GuardMiddlewareNoBeforeModel,
            (False, True): _GuardMiddlewareNoAfterAgent,
            (True, True): _GuardMiddlewareNoAgentHooks,
        }[(speculative or no_input, no_results)]
        return super().__new__(pruned)

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
        hold_output: bool = True,
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
        self.hold_output = hold_output
        self._held_checked: OrderedDict[str, None] = OrderedDict()
        self._call_decisions: OrderedDict[str, Decision] = OrderedDict()
        self._checked_results: OrderedDict[str, None] = OrderedDict()
        self._result_decisions: OrderedDict[str, Decision] = OrderedDict()  # rerouted in the tool node
        self._step_owner: OrderedDict[str, str] = OrderedDict()  # tool step -> call whose handler keys apply

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

    def _input_tasks(
        self, messages: Sequence[BaseMessage], answers: Collection[str] = ()
    ) -> list[tuple[BaseMessage, Surface, str]]:
        """What to check before the model reads the new messages: prompts, and tool results not checked yet
        (``answers``: the keys of structured answers, whose ToolMessages are the framework's)."""
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
                and _seen_key(msg.tool_call_id, text) not in answers
            ):
                tasks.append((msg, Surface.TOOL_RESULT, text))
        return tasks

    def _output_tasks(
        self, messages: Sequence[BaseMessage], answers: Collection[str]
    ) -> tuple[AIMessage | None, list[ToolMessage], list[tuple[str, Surface, str]]]:
        """(the last AIMessage, the ToolMessages after it that answer its structured calls, what to check).

        ``answers``: the keys of structured answers (``ToolStrategy``): part of the response, not tool
        calls. Other ToolMessages after it (written by another middleware's ``wrap_model_call``) are tool
        results, checked as such before the model reads them or at the end of the run.
        """
        last, trailing = _last_answer(messages, answers)
        if last is None:
            return None, [], []
        tasks: list[tuple[str, Surface, str]] = []
        text = _answer_text(last, trailing)
        if self.check_output and text.strip():
            tasks.append(("", Surface.RESPONSE, text))
        answered = {m.tool_call_id for m in trailing}
        if self.check_tool_calls:
            for call in last.tool_calls:
                if call.get("id") and call["id"] not in answered:
                    tasks.append((str(call["id"]), Surface.TOOL_CALL, render_tool_call(call["name"], call["args"])))
        return last, trailing, tasks

    # ================================================================= outcomes

    def _fmt(self, template: str, decision: Decision) -> str:
        return format_refusal(template, decision)

    def _review(self, decision: Decision, text: str, where: str) -> Decision:
        """REROUTE to human_review: interrupt the graph; resume with {"approve": true} to let it pass."""
        from langgraph.types import interrupt

        answer = interrupt({"type": "flexguard_review", "where": where, "text": text, "decision": decision.to_dict()})
        if _approves(answer):
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

    def _ends(self, decision: Decision, surface: Surface) -> bool:
        """Whether carrying out ``decision`` (not a REROUTE) ends the run: a raise, or a refusal with "end"."""
        if decision.action.passes or decision.action is Action.REROUTE:
            return False
        if decision.action is Action.REDACT and decision.redacted_text is not None:
            return False
        return self.exit_behavior == "error" or (surface is not Surface.TOOL_RESULT and self.exit_behavior == "end")

    def _reviews(self, tasks: list[tuple[BaseMessage, Surface, str]], decisions: list[Decision]) -> list[Decision]:
        """Every human review of the input, one interrupt per text in task order, before anything is written.

        LangGraph matches resume values to a node's interrupts by their order and runs the node again from its
        start on every resume; so this pass has no side effect (nothing marked, no handler run) until every
        review has answered, and the same tasks come back in the same order each time. Reviews stop at a text
        whose decision ends the run: the texts after it are not reviewed (see ``_before_update``).
        """
        resolved = list(decisions)
        for i, ((_, surface, text), raw) in enumerate(zip(tasks, decisions, strict=True)):
            if self._reviewed(raw):
                resolved[i] = self._review(raw, text, surface.value)
            if self._ends(resolved[i], surface):
                break
        return resolved

    def _reviewed(self, decision: Decision) -> bool:
        """A REROUTE to human review (an interrupt), not to a ``human_review`` route handler."""
        return (
            decision.action is Action.REROUTE
            and decision.route == HUMAN_REVIEW
            and HUMAN_REVIEW not in self.route_handlers
        )

    def _before_update(
        self, state: Mapping[str, Any], tasks: list[tuple[BaseMessage, Surface, str]], decisions: list[Decision]
    ) -> dict[str, Any] | None:
        """The state update carrying out the input's decisions (may interrupt for review, or raise).

        Every text is resolved: each tool result that does not pass is withheld (a rerouted one too), and the
        route handlers' updates are merged: their messages in task order, after the replacements; the other keys
        (``jump_to`` included) from the first handler that sets them. A text whose decision ends the run (a
        refusal with ``exit_behavior="end"``) ends it: the routes of the texts after it are not run, and the
        tool results among them that do not pass are withheld; the refusal is the last message and the jump
        is ``"end"``.
        """
        resolved = self._reviews(tasks, decisions)  # may interrupt: nothing is written before it returns
        replaced: list[BaseMessage] = []
        added: list[Any] = []
        extra: dict[str, Any] = {}
        refusal: AIMessage | None = None
        for (msg, surface, text), outcome in zip(tasks, resolved, strict=True):
            decision = outcome
            if isinstance(msg, ToolMessage):
                self._remember(self._checked_results, _seen_key(msg.tool_call_id, text), None)
                self._result_decisions.pop(_seen_key(msg.tool_call_id, text), None)
            if refusal is not None:  # the run ends: nothing more is routed, nothing unchecked is left for later
                if surface is Surface.TOOL_RESULT and not decision.action.passes:
                    replaced.append(self._withhold(msg, decision))
                continue
            handled: Mapping[str, Any] | None = None
            if decision.action is Action.REROUTE:  # a route handler (reviews are resolved), or none: a block
                decision, handled = self._resolve_route(decision, text, surface.value, state)
            if handled is not None:
                update = dict(handled)
                if surface is Surface.TOOL_RESULT:  # the handler took it over: the model does not read it
                    replaced.append(self._withhold(msg, decision))
                added.extend(_as_list(update.pop("messages", None)))
                for key, value in update.items():
                    extra.setdefault(key, value)
                continue
            if decision.action.passes:
                continue
            if decision.action is Action.REDACT and decision.redacted_text is not None:
                replaced.append(self._checked(with_text(msg, decision.redacted_text)))
                continue
            if self.exit_behavior == "error":
                raise GuardBlockedError(decision)
            if surface is Surface.TOOL_RESULT:
                replaced.append(self._withhold(msg, decision))
                continue
            content = self._fmt(self.violation_message, decision)
            if self.exit_behavior == "replace":
                replaced.append(msg.model_copy(update={"content": content}))
                continue
            refusal = AIMessage(content=content, response_metadata={"flexguard": decision.to_dict()})
        messages = [*replaced, *added, *([refusal] if refusal is not None else [])]
        if refusal is not None:
            extra["jump_to"] = "end"
        if messages:
            extra["messages"] = messages
        return extra or None

    def _withhold(self, msg: BaseMessage, decision: Decision) -> BaseMessage:
        """A tool result that did not pass, withheld in place (same id, ``status="error"``), marked as checked."""
        content = self._fmt(self.tool_result_violation_message, decision)
        return self._checked(msg.model_copy(update={"content": content, "status": "error"}))

    def _after_update(
        self,
        state: Mapping[str, Any],
        last: AIMessage,
        tasks: list[tuple[str, Surface, str]],
        decisions: list[Decision],
        trailing: Sequence[ToolMessage] = (),
        structured: bool = False,
    ) -> dict[str, Any] | None:
        """The update carrying out the response's decisions.

        ``trailing``: the ToolMessages (in the state) answering a structured answer's tool call; ``structured``:
        the response carries a structured answer. A structured answer that does not pass is the final answer:
        ``structured_response`` is cleared, its ToolMessages removed, and the run ends (even with "replace").
        """
        for tm in trailing:  # framework answers to a checked structured call: not tool results to check again
            self._checked(tm)
        update: dict[str, Any] | None = None
        for (call_id, surface, text), raw_decision in zip(tasks, decisions, strict=True):
            if surface is Surface.TOOL_CALL:
                self._remember(self._call_decisions, _seen_key(call_id, text), raw_decision)
                continue
            decision, handled = self._resolve_route(raw_decision, text, surface.value, state)
            if handled is not None:
                return self._routed(handled, decision, last, [m.id for m in trailing if m.id], True, structured)
            if decision.action.passes:
                continue
            if decision.action is Action.REDACT and decision.redacted_text is not None:
                if not structured:
                    update = {"messages": [with_text(last, decision.redacted_text)]}
                    continue
                redacted = with_text(last, decision.redacted_text)
                return self._withheld(redacted, decision, trailing, structured=True, end=True)
            if self.exit_behavior == "error":
                raise GuardBlockedError(decision)
            refused = last.model_copy(update={"content": self._fmt(self.violation_message, decision)})
            return self._withheld(refused, decision, trailing, structured, end=self.exit_behavior == "end")
        return update

    @staticmethod
    def _withheld(
        message: BaseMessage, decision: Decision, trailing: Sequence[ToolMessage], structured: bool, end: bool
    ) -> dict[str, Any]:
        """``message`` (same id) without tool calls, in place of a response that did not pass."""
        replacement = message.model_copy(
            update={
                "tool_calls": [],
                "invalid_tool_calls": [],
                "response_metadata": {**message.response_metadata, "flexguard": decision.to_dict()},
            }
        )
        result: dict[str, Any] = {"messages": [replacement, *(RemoveMessage(id=m.id) for m in trailing if m.id)]}
        if structured:
            result["structured_response"] = None
        if end or structured:
            result["jump_to"] = "end"
        return result

    def _routed(
        self,
        handled: Mapping[str, Any],
        decision: Decision,
        original: AIMessage,
        remove: Sequence[str],
        in_state: bool,
        structured: bool,
    ) -> dict[str, Any]:
        """A route handler's update for a response: the response is never put back in the visible messages.

        The handler's messages take its place (``remove``: ids to drop, e.g. a placeholder; ``in_state``: the
        response itself is in the state and is removed too); a handler that writes no message leaves the
        refusal in its place (same id, no tool calls). A structured answer is cleared and the run ends unless
        the handler says otherwise.
        """
        update = dict(handled)
        more = _as_list(update.get("messages"))
        drops: list[BaseMessage] = [RemoveMessage(id=i) for i in remove]
        if more:
            if in_state and original.id:
                drops.insert(0, RemoveMessage(id=original.id))
            update["messages"] = [*drops, *more]
        else:
            refused = original.model_copy(update={"content": self._fmt(self.violation_message, decision)})
            update["messages"] = [*drops, *self._withheld(refused, decision, (), False, False)["messages"]]
        if structured:
            update.setdefault("structured_response", None)
            update.setdefault("jump_to", "end")
        return update

    # ================================================================= model hooks

    @hook_config(can_jump_to=["end"])
    def before_model(self, state: Any, runtime: Any) -> dict[str, Any] | None:
        if self.speculative_input:
            return None  # checked in wrap_model_call, alongside the model call
        tasks = self._input_tasks(state["messages"], state.get(_ANSWERS) or ())
        if not tasks:
            return None
        stored = self._stored(tasks)
        decisions = self._check_inputs(tasks, self._policy, stored)
        for decision, known, (_, surface, _) in zip(decisions, stored, tasks, strict=True):
            if known is None:
                dispatch_verdict(decision, f"before_model:{surface.value}")
        return self._before_update(state, tasks, decisions)

    @hook_config(can_jump_to=["end"])
    async def abefore_model(self, state: Any, runtime: Any) -> dict[str, Any] | None:
        if self.speculative_input:
            return None
        tasks = self._input_tasks(state["messages"], state.get(_ANSWERS) or ())
        if not tasks:
            return None
        stored = self._stored(tasks)
        decisions = await self._acheck_inputs(tasks, self._policy, stored)
        for decision, known, (_, surface, _) in zip(decisions, stored, tasks, strict=True):
            if known is None:
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

    @staticmethod
    def _held_of(state: Mapping[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """(the held response to release at this model call, the update clearing a stale key)."""
        held = state.get(_HELD)
        if not held:
            return None, None
        messages = state["messages"]
        if isinstance(held, Mapping) and messages and messages[-1].id == held.get("placeholder"):
            return dict(held), None
        return None, {_HELD: None}  # stale (the placeholder is no longer the last message): it stays, fail closed

    def _release(self, state: Mapping[str, Any], held: Mapping[str, Any]) -> dict[str, Any]:
        """Resolve the route of a response the model node held (hold_output) and put the outcome in its place.

        Approved: the response replaces the placeholder. Rejected: the refusal does (as ``_after_update`` builds
        it). A route handler: its update, the response not put back (see ``_routed``).
        """
        original = messages_from_dict([held["message"]])[0]
        if not isinstance(original, AIMessage):  # pragma: no cover - the node only holds AI messages
            raise TypeError(f"held message is not an AIMessage: {type(original).__name__}")
        trailing = [m for m in messages_from_dict(list(held.get("trailing") or [])) if isinstance(m, ToolMessage)]
        answer = held.get("structured")
        structured = bool(trailing) or answer is not None
        decision = _decision_from_dict(held["decision"])
        text = _answer_text(original, trailing)
        restored = {**state, "messages": [*state["messages"][:-1], original]}
        placeholder = str(held["placeholder"])
        decision, handled = self._resolve_route(decision, text, Surface.RESPONSE.value, restored)
        if handled is not None:
            update = self._routed(handled, decision, original, [placeholder], False, structured)
        elif decision.action.passes:
            for tm in trailing:
                self._checked(tm)
            update = {"messages": [RemoveMessage(id=placeholder), original, *trailing]}
            if answer is not None:
                update["structured_response"] = answer
        else:
            tasks = [("", Surface.RESPONSE, text)]
            blocked = self._after_update(restored, original, tasks, [decision], (), structured) or {}
            update = {**blocked, "messages": [RemoveMessage(id=placeholder), *blocked.get("messages", [])]}
        update[_HELD] = None
        return update

    def _after_model_pending(self, state: Mapping[str, Any]) -> tuple[dict[str, Any] | None, bool]:
        """What the model node left for after_model: (the update so far, whether that is all there is to do)."""
        ended = self._speculative_end(state)
        held, stale = self._held_of(state)
        if ended is not None and "jump_to" in ended:
            return self._merge(ended, stale), True  # the model node wrote a refusal: nothing more to check
        if held is not None:
            return self._merge(self._release(state, held), ended), True
        return self._merge(ended, stale), False

    @hook_config(can_jump_to=["end"])
    def after_model(self, state: Any, runtime: Any) -> dict[str, Any] | None:
        ended, done = self._after_model_pending(state)
        if done:
            return ended
        last, trailing, tasks = self._output_tasks(state["messages"], state.get(_ANSWERS) or ())
        if last is None or not tasks or self._held_seen(last):
            return ended  # nothing to check, or the model node checked it already (hold_output)
        structured = bool(trailing) or state.get("structured_response") is not None
        prompt = last_human_text(state["messages"]) or " "
        decisions = [self.guard.check(prompt, response=text, surface=s, policy=self._policy) for _, s, text in tasks]
        for decision, (_, surface, _) in zip(decisions, tasks, strict=True):
            dispatch_verdict(decision, f"after_model:{surface.value}")
        return self._merge(self._after_update(state, last, tasks, decisions, trailing, structured), ended)

    @hook_config(can_jump_to=["end"])
    async def aafter_model(self, state: Any, runtime: Any) -> dict[str, Any] | None:
        ended, done = self._after_model_pending(state)
        if done:
            return ended
        last, trailing, tasks = self._output_tasks(state["messages"], state.get(_ANSWERS) or ())
        if last is None or not tasks or self._held_seen(last):
            return ended
        structured = bool(trailing) or state.get("structured_response") is not None
        prompt = last_human_text(state["messages"]) or " "
        decisions = list(
            await asyncio.gather(
                *(self.guard.acheck(prompt, response=text, surface=s, policy=self._policy) for _, s, text in tasks)
            )
        )
        for decision, (_, surface, _) in zip(decisions, tasks, strict=True):
            await adispatch_verdict(decision, f"after_model:{surface.value}")
        return self._merge(self._after_update(state, last, tasks, decisions, trailing, structured), ended)

    # ================================================================= speculative input (wrap_model_call)

    def _speculative_tasks(self, request: Any) -> list[tuple[BaseMessage, Surface, str]]:
        if not self.speculative_input:
            return []
        state = request.state or {}
        if not isinstance(state, Mapping):
            return self._input_tasks([])
        return self._input_tasks(state.get("messages", []), state.get(_ANSWERS) or ())

    def _stored(self, tasks: list[tuple[BaseMessage, Surface, str]]) -> list[Decision | None]:
        """The decisions the tool node left for a rerouted tool result (None: check the text)."""
        return [
            self._result_decisions.get(_seen_key(msg.tool_call_id, text)) if isinstance(msg, ToolMessage) else None
            for msg, _, text in tasks
        ]

    def _check_inputs(
        self, tasks: list[tuple[BaseMessage, Surface, str]], policy: Any, stored: list[Decision | None]
    ) -> list[Decision]:
        return [
            known or self.guard.check(text, surface=surface, policy=policy)
            for known, (_, surface, text) in zip(stored, tasks, strict=True)
        ]

    async def _acheck_inputs(
        self, tasks: list[tuple[BaseMessage, Surface, str]], policy: Any, stored: list[Decision | None]
    ) -> list[Decision]:
        fresh = [(i, s, t) for i, ((_, s, t), known) in enumerate(zip(tasks, stored, strict=True)) if known is None]
        decisions: list[Decision | None] = list(stored)
        if len(fresh) == 1:
            i, surface, text = fresh[0]
            decisions[i] = await self.guard.acheck(text, surface=surface, policy=policy)
        elif fresh:
            checks = [asyncio.ensure_future(self.guard.acheck(t, surface=s, policy=policy)) for _, s, t in fresh]
            try:
                answers = await asyncio.gather(*checks)
            except BaseException:
                await _cancel(*checks)  # gather does not cancel the others when one fails
                raise
            for (i, _, _), answer in zip(fresh, answers, strict=True):
                decisions[i] = answer
        return [d for d in decisions if d is not None]

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
    def _respond(plan: _Plan | None, response: Any = None, extra: Mapping[str, Any] | None = None) -> Any:
        """The model node's result: the plan's messages, then the response's, then the Command (the plan's
        update and ``extra``, the held output's keys)."""
        if plan is not None and plan.end:
            result: Any = ModelResponse(result=list(plan.added))
        elif plan is not None and plan.added:
            result = ModelResponse(
                result=[*plan.added, *response.result], structured_response=response.structured_response
            )
        else:
            result = response
        update = {**(plan.update if plan is not None else {}), **(extra or {})}
        if not update:
            return result
        return ExtendedModelResponse(model_response=result, command=Command(update=update))

    # ================================================================= held output (wrap_model_call)

    @property
    def _holds(self) -> bool:
        return self.hold_output and (self.check_output or self.check_tool_calls)

    def _remember_held(self, msg: BaseMessage) -> None:
        """Remember a message the model node wrote after checking the response, so after_model skips it."""
        self._remember(self._held_checked, _seen_key(str(msg.id), _response_text(msg)), None)

    def _held_seen(self, msg: BaseMessage) -> bool:
        return msg.id is not None and _seen_key(msg.id, _response_text(msg)) in self._held_checked

    def _deferred(self, decision: Decision) -> bool:
        """A REROUTE that the model node must not resolve: human review (an interrupt) or a route handler."""
        if decision.action is not Action.REROUTE:
            return False
        return decision.route == HUMAN_REVIEW or (decision.route or "") in self.route_handlers

    def _hold_tasks(self, request: Any, response: Any) -> _Answer:
        """The response as a ModelResponse, its answer (last AIMessage and the ToolMessages after it, with ids),
        what to check and the prompt."""
        if isinstance(response, AIMessage):
            response = ModelResponse(result=[response])
        result = list(response.result)
        answers = _answer_ids(request, result)
        last, trailing = _last_answer(result, answers)
        if last is None:
            return _Answer(response)
        start = len(result) - 1 - next(i for i, m in enumerate(reversed(result)) if m is last)
        after = result[start + 1 :]
        if last.id is None or any(m.id is None for m in after):  # the marker, RemoveMessage, memory go by id
            last = last if last.id is not None else last.model_copy(update={"id": str(uuid.uuid4())})
            after = [m if m.id is not None else m.model_copy(update={"id": str(uuid.uuid4())}) for m in after]
            trailing = [m for m in after if isinstance(m, ToolMessage) and _answer_key(m) in answers]
            result = [*result[:start], last, *after]
            response = ModelResponse(result=result, structured_response=response.structured_response)
        _, _, tasks = self._output_tasks([last, *trailing], answers)
        state = request.state or {}
        history = list(state.get("messages", [])) if isinstance(state, Mapping) else []
        structured = bool(trailing) or response.structured_response is not None
        prompt = last_human_text([*history, *result]) or " "
        return _Answer(response, last, trailing, tasks, prompt, structured)

    def _hold_outcome(self, request: Any, answer: _Answer, decisions: list[Decision]) -> tuple[Any, dict[str, Any]]:
        """Carry out the response's decisions in the model node: (the response to return, the state keys)."""
        response, last, tasks = answer.response, answer.last, answer.tasks
        assert last is not None
        said = next((d for (_, s, _), d in zip(tasks, decisions, strict=True) if s is Surface.RESPONSE), None)
        if said is not None and self._deferred(said):
            for (call_id, surface, text), decision in zip(tasks, decisions, strict=True):
                if surface is Surface.TOOL_CALL:
                    self._remember(self._call_decisions, _seen_key(call_id, text), decision)
            meta = {"flexguard": {"held": True, "action": said.action.value, "route": said.route}}
            placeholder = AIMessage(content=HELD_FOR_REVIEW, id=str(uuid.uuid4()), response_metadata=meta)
            self._remember_held(placeholder)
            held: dict[str, Any] = {
                "placeholder": placeholder.id,
                "message": message_to_dict(last),
                "decision": said.to_dict(),
            }
            if answer.trailing:
                held["trailing"] = [message_to_dict(m) for m in answer.trailing]
            if response.structured_response is not None:
                held["structured"] = response.structured_response
            start = next(i for i, m in enumerate(response.result) if m is last)
            return ModelResponse(result=[*response.result[:start], placeholder]), {_HELD: held}
        state = request.state or {}
        # may raise GuardBlockedError
        update = self._after_update(state, last, tasks, decisions, answer.trailing, answer.structured)
        if update is None:
            self._remember_held(last)
            return response, {}
        written = update["messages"][0]
        self._remember_held(written)
        result = convert_to_messages(add_messages(list(response.result), update["messages"]))  # type: ignore[arg-type]
        structured = None if "structured_response" in update else response.structured_response
        extra = {_END_AFTER: result[-1].id} if update.get("jump_to") == "end" else {}
        return ModelResponse(result=result, structured_response=structured), extra

    def _hold(self, request: Any, response: Any) -> tuple[Any, dict[str, Any]]:
        """Check the response of a hidden model call (hold_output); a pass is returned as it came."""
        if not self._holds:
            return response, {}
        answer = self._hold_tasks(request, response)
        if answer.last is None or not answer.tasks:
            return answer.response, {}
        policy, prompt = self._policy, answer.prompt
        decisions = [self.guard.check(prompt, response=text, surface=s, policy=policy) for _, s, text in answer.tasks]
        for decision, (_, surface, _) in zip(decisions, answer.tasks, strict=True):
            dispatch_verdict(decision, f"after_model:{surface.value}")
        return self._hold_outcome(request, answer, decisions)

    async def _ahold(self, request: Any, response: Any) -> tuple[Any, dict[str, Any]]:
        if not self._holds:
            return response, {}
        answer = self._hold_tasks(request, response)
        if answer.last is None or not answer.tasks:
            return answer.response, {}
        policy, prompt = self._policy, answer.prompt
        decisions = list(
            await asyncio.gather(
                *(self.guard.acheck(prompt, response=text, surface=s, policy=policy) for _, s, text in answer.tasks)
            )
        )
        for decision, (_, surface, _) in zip(decisions, answer.tasks, strict=True):
            await adispatch_verdict(decision, f"after_model:{surface.value}")
        return self._hold_outcome(request, answer, decisions)

    def _mark_answers(self, request: Any, response: Any, answers: list[str]) -> Any:
        """The framework's ToolMessages answering a ``ToolStrategy`` structured call are not tool results: never
        checked as such, before the model or at the end of the run (the response surface checks the structured
        answer, when ``check_output``); their call ids go to ``answers`` (then to the state). Any other
        ToolMessage in the response (another middleware's ``wrap_model_call`` answering a call itself) is a
        tool result like any other."""
        result = getattr(response, "result", None) or ()
        keys = _answer_ids(request, result)
        for msg in result:
            if isinstance(msg, ToolMessage) and _answer_key(msg) in keys:
                self._checked(msg)
                answers.append(_answer_key(msg))
        return response

    def _marking(self, handler: Callable[[Any], Any], answers: list[str]) -> Callable[[Any], Any]:
        def call(request: Any) -> Any:
            return self._mark_answers(request, handler(request), answers)

        return call

    def _amarking(
        self, handler: Callable[[Any], Awaitable[Any]], answers: list[str]
    ) -> Callable[[Any], Awaitable[Any]]:
        async def call(request: Any) -> Any:
            return self._mark_answers(request, await handler(request), answers)

        return call

    def _call(self, handler: Callable[[Any], Any], request: Any) -> Any:
        """Call the model; hidden from stream_mode="messages" when its response is held for its check."""
        if not self._holds:
            return handler(request)
        return contextvars.copy_context().run(_hidden_call, handler, request)

    async def _acall(self, handler: Callable[[Any], Awaitable[Any]], request: Any) -> Any:
        if not self._holds:
            return await handler(request)
        return await _ahidden_inline(handler, request)

    def wrap_model_call(self, request: Any, handler: Callable[[Any], Any]) -> Any:
        """Check around the model call (see ``_wrap_model_call``); the structured answers' ids go to the state."""
        answers: list[str] = []
        return _with_answers(self._wrap_model_call(request, self._marking(handler, answers)), answers)

    async def awrap_model_call(self, request: Any, handler: Callable[[Any], Awaitable[Any]]) -> Any:
        answers: list[str] = []
        return _with_answers(await self._awrap_model_call(request, self._amarking(handler, answers)), answers)

    def _input_plan(
        self,
        request: Any,
        tasks: list[tuple[BaseMessage, Surface, str]],
        stored: list[Decision | None],
        decisions: list[Decision],
    ) -> _Plan | None:
        """The model node's plan after the input checks (fresh decisions dispatched); may raise or interrupt."""
        for decision, known, (_, surface, _) in zip(decisions, stored, tasks, strict=True):
            if known is None:
                dispatch_verdict(decision, f"before_model:{surface.value}")
        update = self._before_update(request.state, tasks, decisions)
        return None if update is None else self._plan(request, update)

    async def _ainput_plan(
        self,
        request: Any,
        tasks: list[tuple[BaseMessage, Surface, str]],
        stored: list[Decision | None],
        decisions: list[Decision],
    ) -> _Plan | None:
        for decision, known, (_, surface, _) in zip(decisions, stored, tasks, strict=True):
            if known is None:
                await adispatch_verdict(decision, f"before_model:{surface.value}")
        update = self._before_update(request.state, tasks, decisions)
        return None if update is None else self._plan(request, update)

    def _wrap_model_call(self, request: Any, handler: Callable[[Any], Any]) -> Any:
        """With ``speculative_input``: the model runs in this thread while a worker thread checks the input.

        A thread cannot be cancelled: when the input does not pass, the model call has finished and its
        response (or error) is dropped. A check that raises is re-raised (the response dropped too). When a
        tool result's stored decision (from the tool node) already does not pass, nothing is speculative: the
        input is resolved first and the model only reads the outcome.
        """
        tasks = self._speculative_tasks(request)
        if not tasks:
            if not self._holds:
                return handler(request)
            return self._respond(None, *self._hold(request, self._call(handler, request)))
        policy = self._policy
        stored = self._stored(tasks)
        if _known_not_passing(stored):  # the model must never read it: resolve it before the model call
            plan = self._input_plan(request, tasks, stored, self._check_inputs(tasks, policy, stored))
            if plan is not None and plan.end:
                return self._respond(plan)
            rerun = request if plan is None or plan.rerun is None else plan.rerun
            return self._respond(plan, *self._hold(rerun, self._call(handler, rerun)))
        response: Any = None
        model_error: Exception | None = None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="speculative-input-check") as pool:
            check = pool.submit(contextvars.copy_context().run, self._check_inputs, tasks, policy, stored)
            try:
                response = contextvars.copy_context().run(_hidden_call, handler, request)
            except Exception as exc:  # the input's decision comes first: a blocked input ends the same way
                model_error = exc
            decisions = check.result()  # shutdown(wait=True) on exit: the worker never outlives the call
        plan = self._input_plan(request, tasks, stored, decisions)
        if plan is None or (not plan.end and plan.rerun is None):
            if model_error is not None:
                raise model_error
            return self._respond(plan, *self._hold(request, response))
        if plan.end:
            return self._respond(plan)
        return self._respond(plan, *self._hold(plan.rerun, self._call(handler, plan.rerun)))

    async def _awrap_model_call(self, request: Any, handler: Callable[[Any], Awaitable[Any]]) -> Any:
        """With ``speculative_input``: the model call runs as a task while the input is checked.

        The task is cancelled (and awaited) as soon as the input does not pass or the check raises. When a tool
        result's stored decision already does not pass, the input is resolved before the model call starts.
        """
        tasks = self._speculative_tasks(request)
        if not tasks:
            if not self._holds:
                return await handler(request)
            return self._respond(None, *await self._ahold(request, await self._acall(handler, request)))
        policy = self._policy
        stored = self._stored(tasks)
        if _known_not_passing(stored):  # the model must never read it: resolve it before the model call
            plan = await self._ainput_plan(request, tasks, stored, await self._acheck_inputs(tasks, policy, stored))
            if plan is not None and plan.end:
                return self._respond(plan)
            rerun = request if plan is None or plan.rerun is None else plan.rerun
            return self._respond(plan, *await self._ahold(rerun, await self._acall(handler, rerun)))
        model = asyncio.ensure_future(_ahidden_call(handler, request))
        try:
            plan = await self._ainput_plan(request, tasks, stored, await self._acheck_inputs(tasks, policy, stored))
            if plan is None or (not plan.end and plan.rerun is None):
                response = await model
        except BaseException:
            await _cancel(model)
            raise
        if plan is None or (not plan.end and plan.rerun is None):
            return self._respond(plan, *await self._ahold(request, response))
        await _cancel(model)
        if plan.end:
            return self._respond(plan)
        return self._respond(plan, *await self._ahold(plan.rerun, await self._acall(handler, plan.rerun)))

    # ================================================================= end of the run (after_agent)

    def _end_tasks(self, state: Mapping[str, Any]) -> list[tuple[ToolMessage, str, Decision | None]]:
        """The tool results still unresolved at the end of the run: (message, text, the stored decision of a
        deferred reroute, or None for a result that was never checked).

        Both count anywhere after the last AIMessage with tool calls, i.e. in the last tool step, even when an
        AIMessage written by another middleware follows it (a model call limit ending the run): a deferred
        reroute (a non-passing decision the tool node stored, for a result whose text is still the raw one:
        resolving it drops the decision), and a result never checked, when it came after the run's input (the
        last message when the run started, ``flexguard_run_start``): a result of an earlier run was resolved in
        its own run, and another instance (a worker restarted between runs) must not withhold a result a
        reviewer approved then. A result a model step read was checked then (on another instance, after a
        restart within the run, it is checked once more). The framework's ToolMessages answering a structured
        call (``flexguard_answers``) are the response, not tool results.
        """
        messages = list(state.get("messages", [])) if isinstance(state, Mapping) else []
        step = max((i for i, m in enumerate(messages) if isinstance(m, AIMessage) and m.tool_calls), default=-1)
        marks = {state.get(_RUN_START), state.get(_RUN_END)} - {None} if isinstance(state, Mapping) else set()
        found = [i for i, m in enumerate(messages) if m.id is not None and m.id in marks]
        # after the run's input or the previous run's end, the later; with neither, the last turn boundary
        start = (
            max(found) if found else max((i for i in range(1, len(messages)) if _turn_starts(messages, i)), default=-1)
        )
        answers = set(state.get(_ANSWERS) or ()) if isinstance(state, Mapping) else set()
        tasks: list[tuple[ToolMessage, str, Decision | None]] = []
        for i in range(step + 1, len(messages)):
            msg = messages[i]
            if not isinstance(msg, ToolMessage):
                continue
            text = message_text(msg)
            if not text.strip():
                continue
            key = _seen_key(msg.tool_call_id, text)
            stored = self._result_decisions.get(key)
            if stored is not None and not stored.action.passes:
                tasks.append((msg, text, stored))
            elif i > start and key not in self._checked_results and key not in answers:
                tasks.append((msg, text, None))
        return tasks

    def _end_update(
        self, tasks: list[tuple[ToolMessage, str, Decision | None]], decisions: list[Decision]
    ) -> dict[str, Any] | None:
        """Resolve the unresolved tool results fail closed: no route runs at the end of a run (no interrupt, no
        handler), a REROUTE becomes a BLOCK whose reason says so; REDACT redacts, anything else that does not
        pass is withheld (``GuardBlockedError`` with ``exit_behavior="error"``)."""
        from dataclasses import replace

        outcomes: list[tuple[ToolMessage, str, BaseMessage | None]] = []
        for (msg, text, _), raw in zip(tasks, decisions, strict=True):
            decision = raw
            if decision.action.passes:
                outcomes.append((msg, text, None))
                continue
            if decision.action is Action.REDACT and decision.redacted_text is not None:
                outcomes.append((msg, text, with_text(msg, decision.redacted_text)))
                continue
            if decision.action is Action.REROUTE:
                decision = replace(decision, action=Action.BLOCK, reason=f"{decision.reason}; {RUN_ENDED_NO_ROUTE}")
            if self.exit_behavior == "error":
                raise GuardBlockedError(decision)  # nothing marked: a rerun of this node withholds it again
            content = self._fmt(self.tool_result_violation_message, decision)
            outcomes.append((msg, text, _withheld_result(msg, content, decision)))
        replaced: list[BaseMessage] = []
        for msg, text, out in outcomes:
            self._remember(self._checked_results, _seen_key(msg.tool_call_id, text), None)
            self._result_decisions.pop(_seen_key(msg.tool_call_id, text), None)
            if out is not None:
                replaced.append(self._checked(out))
        return {"messages": replaced} if replaced else None

    def before_agent(self, state: Any, runtime: Any) -> dict[str, Any] | None:
        """Record where the run starts (the id of its last input message), for the end of the run: results
        before it belong to earlier runs. A resumed run does not pass here and keeps its start."""
        if not self.check_tool_results:
            return None
        messages = state.get("messages") if isinstance(state, Mapping) else None
        last = messages[-1].id if messages and isinstance(messages[-1], BaseMessage) else None
        return {_RUN_START: last}

    async def abefore_agent(self, state: Any, runtime: Any) -> dict[str, Any] | None:
        return self.before_agent(state, runtime)

    def after_agent(self, state: Any, runtime: Any) -> dict[str, Any] | None:
        """Backstop at the end of the run (LangChain's exit node: every way to the end goes through it).

        A tool result after the last AIMessage may still be unresolved when the run ends without this
        middleware's ``before_model``: a reroute the tool node deferred (the run ended after the tool step in a way
        the tool node could not foresee: a tool changed by another middleware's ``wrap_tool_call`` into a
        ``return_direct`` one, a tool registered at runtime, another middleware's ``before_model`` ending the
        run, ``speculative_input``), or a result never checked (written by another node). Each is resolved here
        (see ``_end_update``); resolved results are left untouched, so a safe run's final state is unchanged.
        """
        if not self.check_tool_results:
            return None
        tasks = self._end_tasks(state)
        if not tasks:
            return _run_ended(state, None)
        policy = self._policy
        decisions: list[Decision] = []
        for _, text, stored in tasks:
            if stored is not None:
                decisions.append(stored)
                continue
            decision = self.guard.check(text, surface=Surface.TOOL_RESULT, policy=policy)
            dispatch_verdict(decision, "after_agent:tool_result")
            decisions.append(decision)
        return _run_ended(state, self._end_update(tasks, decisions))

    async def aafter_agent(self, state: Any, runtime: Any) -> dict[str, Any] | None:
        if not self.check_tool_results:
            return None
        tasks = self._end_tasks(state)
        if not tasks:
            return _run_ended(state, None)
        stored = [known for _, _, known in tasks]
        checks: list[tuple[BaseMessage, Surface, str]] = [(msg, Surface.TOOL_RESULT, text) for msg, text, _ in tasks]
        decisions = await self._acheck_inputs(checks, self._policy, stored)  # a failure cancels the other checks
        for decision, known in zip(decisions, stored, strict=True):
            if known is None:
                await adispatch_verdict(decision, "after_agent:tool_result")
        return _run_ended(state, self._end_update(tasks, decisions))

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

    def _defer_result(self, result: ToolMessage, text: str, decision: Decision) -> ToolMessage:
        """A tool result rerouted to human review or a route handler: its route runs in ``before_model``.

        Not here: an interrupt in the tool node would run the tool again on resume, and a tool node cannot
        jump. The result goes into the state unmarked, so ``before_model`` (or the speculative check in the
        model node) takes it up before the model reads it, with this decision (no second guard call). While it
        waits the raw result is in the state, so ``stream_mode="updates"``/``"values"``/``"messages"`` show the
        tool node's write. Not when the agent may end after this tool step (see ``_route_result_here``).
        """
        self._remember(self._result_decisions, _seen_key(result.tool_call_id, text), decision)
        return result

    @staticmethod
    def _calling_message(request: Any) -> AIMessage | None:
        """The AIMessage (in the tool node's state) whose tool calls include this request's call."""
        call_id = request.tool_call.get("id")
        state = request.state
        messages = state.get("messages", []) if isinstance(state, Mapping) else state if isinstance(state, list) else []
        for msg in reversed(messages):
            if isinstance(msg, AIMessage) and any(c.get("id") == call_id for c in msg.tool_calls):
                return msg
        return None

    def _ends_after_tools(self, request: Any) -> bool:
        """Whether the agent may end right after this tool step, without another ``before_model``; then a
        rerouted result is resolved in the tool node.

        Read from this request alone, never from what the middleware saw before (one instance may serve several
        agents, threads and checkpoints resumed elsewhere), and on the safe side: LangChain ends after a step
        whose every tool is ``return_direct`` (so: this tool is), or that answered a structured-output call (the
        model node wrote that call's ToolMessage, so another call of the same AIMessage already has a non-error
        ToolMessage in the state). A call whose AIMessage cannot be found counts as ending the run.
        """
        if getattr(request.tool, "return_direct", False):
            return True
        calling = self._calling_message(request)
        if calling is None:
            return True
        own = request.tool_call.get("id")
        others = {c.get("id") for c in calling.tool_calls if c.get("id") != own}
        if not others:
            return False
        state = request.state
        messages = state.get("messages", []) if isinstance(state, Mapping) else state if isinstance(state, list) else []
        registered = _registered_tools(request)
        return any(
            isinstance(m, ToolMessage)
            and m.tool_call_id in others
            and m.status != "error"
            and (registered is None or m.name not in registered)
            for m in messages
        )

    def _claim_step(self, request: Any) -> bool:
        """Whether this tool call is the first of its tool step to apply a route handler's non-message keys.

        The parallel tool tasks of one step may not write the same state key (LangGraph raises
        ``InvalidUpdateError``): only the first handler to run in the step gets its other keys applied.
        """
        own = str(request.tool_call.get("id"))
        calling = self._calling_message(request)
        if calling is None:
            return True
        key = calling.id or ",".join(str(c.get("id")) for c in calling.tool_calls)
        owner = self._step_owner.setdefault(key, own)  # atomic: parallel sync tasks run in threads
        while len(self._step_owner) > _MAX_REMEMBERED:
            self._step_owner.popitem(last=False)
        return owner == own

    def _route_result_here(
        self, request: Any, result: ToolMessage, text: str, decision: Decision
    ) -> tuple[ToolMessage, dict[str, Any]]:
        """The route of a rerouted tool result, resolved in the tool node: (the withheld result, the handler's
        other keys).

        For a result after which the agent may end without ``before_model`` (every tool of the step is
        ``return_direct``), or that cannot wait for it (see ``_tool_result_outcome``). A route handler runs here (its
        ``state`` ends with the raw result); the result is withheld, and since it may be the run's final message
        it carries the handler's ``content`` (a str), else the text of the last message the handler returned,
        else ``tool_result_violation_message``. The handler's other keys are applied (a Command; when several
        handlers run in one tool step, only the first one's: see ``_claim_step``); its messages are not written
        (an AIMessage after the result would send the agent back to the model) and ``jump_to`` is ignored (a
        tool node cannot jump). Human review cannot run here (an interrupt in the tool node runs the tool again
        on resume): the result is withheld as a BLOCK whose reason says so (``GuardBlockedError`` with
        ``exit_behavior="error"``).
        """
        from dataclasses import replace

        self._checked(result)  # the original text was checked (it may come back in a replay)
        if self._reviewed(decision):
            blocked = replace(decision, action=Action.BLOCK, reason=f"{decision.reason}; {RETURN_DIRECT_NO_REVIEW}")
            if self.exit_behavior == "error":
                raise GuardBlockedError(blocked)
            content = f"{self._fmt(self.tool_result_violation_message, blocked)} {RETURN_DIRECT_NO_REVIEW}"
            return self._checked(_withheld_result(result, content, blocked)), {}
        state = request.state if isinstance(request.state, Mapping) else {}
        seen = {**state, "messages": [*state.get("messages", []), result]}
        decision, handled = self._resolve_route(decision, text, Surface.TOOL_RESULT.value, seen)
        update = dict(handled or {})
        said = update.pop("content", None)
        messages = convert_to_messages(_as_list(update.pop("messages", None)))
        update.pop("jump_to", None)
        if not isinstance(said, str):
            said = message_text(messages[-1]) if messages else ""
        content = said if said.strip() else self._fmt(self.tool_result_violation_message, decision)
        withheld = self._checked(_withheld_result(result, content, decision))
        if update and not self._claim_step(request):
            update = {}
        return withheld, update

    def _message_outcome(
        self, request: Any, msg: BaseMessage, text: str, decision: Decision, here: bool
    ) -> tuple[BaseMessage, dict[str, Any]]:
        """Carry out a tool result's decision: (the message to write, state keys a route handler set).

        ``here``: a rerouted result must be resolved in the tool node (it cannot wait for ``before_model``).
        A message other than a ToolMessage (one a tool's ``Command`` writes) runs no route: what does not pass
        is withheld (REDACT: redacted).
        """
        if isinstance(msg, ToolMessage):
            if self._deferred(decision):
                if here:
                    return self._route_result_here(request, msg, text, decision)
                return self._defer_result(msg, text, decision), {}
            outcome = self._checked(self._result_outcome(msg, decision))
            if outcome is not msg:  # the original text was checked too (it may come back in a replay)
                self._checked(msg)
            return outcome, {}
        if decision.action.passes:
            return msg, {}
        if decision.action is Action.REDACT and decision.redacted_text is not None:
            return with_text(msg, decision.redacted_text), {}
        if self.exit_behavior == "error":
            raise GuardBlockedError(decision)
        meta = {**msg.response_metadata, "flexguard": decision.to_dict()}
        content = self._fmt(self.tool_result_violation_message, decision)
        return msg.model_copy(update={"content": content, "response_metadata": meta}), {}

    def _unreadable(self, request: Any, result: Any) -> ToolMessage:
        """A tool result of a shape this cannot read for checking: withheld (fail closed)."""
        call = request.tool_call
        reason = f"tool result of type {type(result).__name__} cannot be checked: withheld"
        decision = Decision(
            action=Action.BLOCK,
            verdict=Verdict(risk_score=100.0, surface=Surface.TOOL_RESULT),
            reason=reason,
            surface=Surface.TOOL_RESULT,
        )
        if self.exit_behavior == "error":
            raise GuardBlockedError(decision)
        content = self._fmt(self.tool_result_violation_message, decision)
        return self._checked(
            _withheld_result(tool_message_error(str(call["id"]), call.get("name"), content), content, decision)
        )

    def _result_checks(self, request: Any, result: Any) -> list[tuple[BaseMessage, str]] | None:
        """What of a tool's result the model or the user will read: (message, text) for every message with
        text, a ``Command``'s ``update["messages"]`` included; None for a shape this cannot read."""
        messages = _result_messages(result)
        if messages is None:
            return None
        checks = []
        for msg in messages:
            text = message_text(msg)
            if text.strip():
                checks.append((msg, text))
        return checks

    def _tool_result_outcome(
        self, request: Any, result: Any, checks: list[tuple[BaseMessage, str]], decisions: list[Decision]
    ) -> Any:
        """Rebuild the tool's result with the outcome of each checked message (a ToolMessage, a Command, or a
        list of them, as the tool node returned it)."""
        # the messages come back in the order _result_checks read them (dict messages converted again, equal)
        decided = iter(zip(checks, decisions, strict=True))
        ends = self._ends_after_tools(request)

        def one(msg: BaseMessage, here: bool, extra: dict[str, Any]) -> BaseMessage:
            text = message_text(msg)
            if not text.strip():
                return msg
            (_, checked), decision = next(decided)
            if checked != text:  # pragma: no cover - the same walk over the same result
                raise RuntimeError("tool result changed while it was checked")
            out, keys = self._message_outcome(request, msg, text, decision, here)
            for key, value in keys.items():
                extra.setdefault(key, value)
            return out

        def rebuild(item: Any) -> Any:
            extra: dict[str, Any] = {}
            if isinstance(item, ToolMessage):
                out = one(item, ends, extra)
                return Command(update={**extra, "messages": [out]}) if extra else out
            if isinstance(item, list):
                return [rebuild(r) for r in item]
            assert isinstance(item, Command)
            messages = _command_messages(item) or []
            # a result that cannot wait for before_model: the run may end (return_direct, a goto), or a message
            # after it would hide it from before_model (which checks what follows the last AIMessage)
            here = ends or bool(item.goto) or item.graph is not None or any(isinstance(m, AIMessage) for m in messages)
            written = [one(m, here, extra) for m in messages]
            if isinstance(item.update, Mapping):
                update: Any = {**item.update, **extra, "messages": written} if messages else {**item.update, **extra}
            elif isinstance(item.update, list):
                update = written  # a list update is messages only: handler keys cannot be added
            else:
                update = item.update
            return dataclasses.replace(item, update=update)

        return rebuild(result)

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
        if not self.check_tool_results:
            return result
        checks = self._result_checks(request, result)
        if checks is None:
            return self._unreadable(request, result)
        if not checks:
            return result
        policy = self._policy
        decisions = [self.guard.check(text, surface=Surface.TOOL_RESULT, policy=policy) for _, text in checks]
        for decision in decisions:
            dispatch_verdict(decision, "tool_result")
        return self._tool_result_outcome(request, result, checks, decisions)

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
        if not self.check_tool_results:
            return result
        checks = self._result_checks(request, result)
        if checks is None:
            return self._unreadable(request, result)
        if not checks:
            return result
        policy = self._policy
        decisions = list(
            await asyncio.gather(
                *(self.guard.acheck(text, surface=Surface.TOOL_RESULT, policy=policy) for _, text in checks)
            )
        )
        for decision in decisions:
            await adispatch_verdict(decision, "tool_result")
        return self._tool_result_outcome(request, result, checks, decisions)


# ================================================================= helpers


class _GuardMiddlewareNoBeforeModel(GuardMiddleware):
    """GuardMiddleware for configurations whose ``before_model`` checks nothing (``speculative_input=True``, or
    neither user input nor tool results checked): without the override, ``create_agent`` adds no node for it."""

    before_model = AgentMiddleware.before_model
    abefore_model = AgentMiddleware.abefore_model


class _GuardMiddlewareNoAfterAgent(GuardMiddleware):
    """GuardMiddleware with ``check_tool_results=False``: its ``after_agent`` (which only resolves tool results)
    and ``before_agent`` (which marks the run's start for it) would never act, so ``create_agent`` adds no node
    for them."""

    before_agent = AgentMiddleware.before_agent
    abefore_agent = AgentMiddleware.abefore_agent
    after_agent = AgentMiddleware.after_agent
    aafter_agent = AgentMiddleware.aafter_agent


class _GuardMiddlewareNoAgentHooks(_GuardMiddlewareNoBeforeModel):
    """Neither ``before_model`` nor ``before_agent``/``after_agent`` would act (see the two classes above)."""

    before_agent = AgentMiddleware.before_agent
    abefore_agent = AgentMiddleware.abefore_agent
    after_agent = AgentMiddleware.after_agent
    aafter_agent = AgentMiddleware.aafter_agent


def _registered_tools(request: Any) -> frozenset[str] | None:
    """The names of the tool node's tools (``ToolRuntime.tools``: the ToolNode passes every registered tool);
    None when the request does not carry them (then every non-error ToolMessage may be a structured answer)."""
    tools = getattr(getattr(request, "runtime", None), "tools", None)
    if not isinstance(tools, list | tuple) or not tools:
        return None
    names = [getattr(t, "name", None) for t in tools]
    if not all(isinstance(n, str) for n in names):
        return None
    return frozenset(n for n in names if isinstance(n, str))


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


async def _ahidden_inline(handler: Callable[[Any], Awaitable[Any]], request: Any) -> Any:
    """``_ahidden_call`` in the current task: the tag is set for the call and taken off after it."""
    config = var_child_runnable_config.get()
    if config is None or _NOSTREAM in (config.get("tags") or []):
        return await handler(request)
    token = var_child_runnable_config.set({**config, "tags": [*(config.get("tags") or []), _NOSTREAM]})
    try:
        return await handler(request)
    finally:
        var_child_runnable_config.reset(token)


def _response_text(msg: BaseMessage) -> str:
    """A message's text and its tool calls: what the model node checked of a response."""
    calls = msg.tool_calls if isinstance(msg, AIMessage) else []
    return "\n".join([message_text(msg), *(f"{c.get('id')}:{render_tool_call(c['name'], c['args'])}" for c in calls)])


def _last_answer(
    messages: Sequence[BaseMessage], answers: Collection[str]
) -> tuple[AIMessage | None, list[ToolMessage]]:
    """The last AIMessage and the ToolMessages after it answering its structured calls (``answers``: the keys of
    ``ToolStrategy`` answers, which a model node writes); (None, []) when the messages do not end with an
    AIMessage and ToolMessages answering its calls."""
    i = len(messages) - 1
    while i >= 0 and isinstance(messages[i], ToolMessage):
        i -= 1
    last = messages[i] if i >= 0 else None
    if not isinstance(last, AIMessage):
        return None, []
    after = [m for m in messages[i + 1 :] if isinstance(m, ToolMessage)]
    ids = {c.get("id") for c in last.tool_calls}
    if any(m.tool_call_id not in ids for m in after):
        return None, []
    return last, [m for m in after if _answer_key(m) in answers]


def _structured_names(request: Any) -> frozenset[str]:
    """The tool names of the request's ``ToolStrategy`` structured answers (none for other formats)."""
    fmt = getattr(request, "response_format", None)
    if fmt is None or isinstance(fmt, ProviderStrategy):
        return frozenset()
    if isinstance(fmt, AutoStrategy):
        fmt = fmt.schema
    if not isinstance(fmt, ToolStrategy):
        try:  # a raw schema: the framework makes it a ToolStrategy (or a ProviderStrategy, with no ToolMessage)
            fmt = ToolStrategy(schema=fmt)
        except Exception as exc:  # not a schema the framework can use either: it reports that itself
            logger.debug("cannot read the structured answer names of %r: %r", fmt, exc)
            return frozenset()
    return frozenset(spec.name for spec in fmt.schema_specs)


def _turn_starts(messages: Sequence[BaseMessage], i: int) -> bool:
    """A HumanMessage right after a final answer (an AIMessage without tool calls): a new turn."""
    prev = messages[i - 1]
    return isinstance(messages[i], HumanMessage) and isinstance(prev, AIMessage) and not prev.tool_calls


def _run_ended(state: Mapping[str, Any], update: dict[str, Any] | None) -> dict[str, Any] | None:
    """``update`` with the id of the run's last message (replacements keep their ids), for the next run's end."""
    messages = state.get("messages") if isinstance(state, Mapping) else None
    last = messages[-1].id if messages and isinstance(messages[-1], BaseMessage) else None
    if last is None or state.get(_RUN_END) == last:
        return update
    return {**(update or {}), _RUN_END: last}


def _answer_key(msg: ToolMessage) -> str:
    """A structured answer's ToolMessage as remembered: its call id and its text (a reused id is not enough)."""
    return _seen_key(msg.tool_call_id, message_text(msg))


def _answer_ids(request: Any, result: Sequence[BaseMessage]) -> set[str]:
    """The keys (``_answer_key``) of the ToolMessages in ``result`` that are the framework's answers to a
    structured call of the request's format: the call is named like one of its ``ToolStrategy`` tools (or, for a
    schema without a title, which LangChain names ``response_format_<random>``, has that prefix and names no
    registered tool): the framework's answer, or its error asking the model to retry (``handle_errors``). They
    are remembered by call id and text, so a later message reusing the id is a tool result. Anything else a
    model node writes is a tool result."""
    fmt = getattr(request, "response_format", None)
    if fmt is None or isinstance(fmt, ProviderStrategy):
        return set()
    calls = {str(c["id"]): c["name"] for m in result if isinstance(m, AIMessage) for c in m.tool_calls if c.get("id")}
    messages = [m for m in result if isinstance(m, ToolMessage) and m.tool_call_id in calls]
    if not messages:
        return set()
    names = _structured_names(request)
    tools = getattr(request, "tools", None) or ()
    registered = {t.get("name") if isinstance(t, Mapping) else getattr(t, "name", None) for t in tools}
    keys: set[str] = set()
    for msg in messages:
        name = calls[msg.tool_call_id]
        named = name in names or (name.startswith("response_format_") and name not in registered)
        if named:  # the answer, or the framework's error asking the model to retry (handle_errors): the
            keys.add(_answer_key(msg))  # call's arguments are the response either way
    return keys


def _with_answers(out: Any, answers: list[str]) -> Any:
    """The model node's result with the structured answers' keys in its state update."""
    if not answers:
        return out
    if isinstance(out, ExtendedModelResponse):
        command = out.command
        update = dict(command.update or {}) if command is not None else {}
        update[_ANSWERS] = list(dict.fromkeys(answers))
        return ExtendedModelResponse(model_response=out.model_response, command=Command(update=update))
    response = ModelResponse(result=[out]) if isinstance(out, AIMessage) else out
    return ExtendedModelResponse(
        model_response=response, command=Command(update={_ANSWERS: list(dict.fromkeys(answers))})
    )


def _answer_text(last: AIMessage, trailing: Sequence[ToolMessage]) -> str:
    """What the response surface checks: the message text and the arguments of its structured-answer calls."""
    answered = {m.tool_call_id for m in trailing}
    parts = [message_text(last)]
    for call in last.tool_calls:
        if call.get("id") in answered:
            parts.append(json.dumps(call["args"], ensure_ascii=False, sort_keys=True, default=str))
    return "\n".join(p for p in parts if p.strip())


_AFFIRMATIVE = frozenset({"approve", "approved", "yes"})


def _affirmative(value: Any) -> bool:
    """``True``, or one of the strings "approve", "approved", "yes" (any case, surrounding spaces ignored)."""
    return value is True or (isinstance(value, str) and value.strip().lower() in _AFFIRMATIVE)


def _approves(answer: Any) -> bool:
    """Whether a reviewer's answer approves: ``True``, an affirmative string, or a mapping whose ``approve`` /
    ``approved`` keys (at least one present) are all affirmative. Anything else (``False``, ``"false"``,
    ``"no"``, ``0``, ``1``, ``None``, an empty mapping, ...) rejects: fail closed."""
    if isinstance(answer, Mapping):
        said = [answer[k] for k in ("approve", "approved") if k in answer]
        return bool(said) and all(_affirmative(v) for v in said)
    return _affirmative(answer)


def _known_not_passing(stored: Sequence[Decision | None]) -> bool:
    """Whether a stored tool-result decision (left by the tool node) already says the result does not pass."""
    return any(d is not None and not d.action.passes for d in stored)


def _command_messages(command: Command[Any]) -> list[BaseMessage] | None:
    """The messages a tool's ``Command`` writes (``update["messages"]``, or a list update); None when its update
    has a shape this cannot read."""
    update = command.update
    if update is None:
        return []
    if isinstance(update, Mapping):
        raw = update.get("messages")
    elif isinstance(update, list):
        raw = update
    else:
        return None
    try:
        return convert_to_messages(_as_list(raw))
    except Exception:  # not messages: cannot be checked
        return None


def _result_messages(result: Any) -> list[BaseMessage] | None:
    """Every message of a tool node result (a ToolMessage, a Command, or a list of them); None: unreadable."""
    if isinstance(result, ToolMessage):
        return [result]
    if isinstance(result, Command):
        return _command_messages(result)
    if isinstance(result, list):
        messages: list[BaseMessage] = []
        for item in result:
            if not isinstance(item, ToolMessage | Command):
                return None
            more = _result_messages(item)
            if more is None:
                return None
            messages.extend(more)
        return messages
    return None


def _as_list(value: Any) -> list[Any]:
    """A state update's ``messages`` value as a list."""
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def _withheld_result(result: ToolMessage, content: str, decision: Decision) -> ToolMessage:
    """``result`` withheld (same id, ``status="error"``) with ``content``; the decision in its metadata."""
    meta = {**result.response_metadata, "flexguard": decision.to_dict()}
    return result.model_copy(update={"content": content, "status": "error", "response_metadata": meta})


def _decision_from_dict(data: Mapping[str, Any]) -> Decision:
    """The inverse of ``Decision.to_dict`` (a held response keeps its decision in the checkpointed state)."""
    raw = dict(data.get("verdict") or {})
    known = {f.name for f in fields(Verdict)}
    values = {k: v for k, v in raw.items() if k in known}
    values["categories"] = tuple(Category(c) for c in raw.get("categories") or ())
    values["native_categories"] = tuple(raw.get("native_categories") or ())
    values["surface"] = Surface(raw["surface"]) if raw.get("surface") else None
    return Decision(
        action=Action(data["action"]),
        verdict=Verdict(**values),
        reason=str(data.get("reason") or ""),
        rule=data.get("rule"),
        route=data.get("route"),
        redacted_text=data.get("redacted_text"),
        fail_open=bool(data.get("fail_open")),
        threshold=data.get("threshold"),
        surface=Surface(data["surface"]) if data.get("surface") else None,
        policy=data.get("policy"),
    )


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
