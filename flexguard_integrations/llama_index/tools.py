"""Agent tool gating for ``FunctionAgent``, ``ReActAgent`` and ``AgentWorkflow``, and a whole-agent guard.

In llama-index 0.14 an exception raised inside a tool does not stop the agent: it goes back to the model
as an error result. So a blocked call returns an error ``ToolOutput`` carrying the refusal, and the real
function never runs. The arguments are checked before execution (surface ``tool_call``), the output after
(surface ``tool_result``: REDACT replaces it, BLOCK withholds it). The output check covers every content
block the agent sends to the model (``ToolOutput.blocks``: text, the text inside citable and citation
blocks, text documents); blocks whose content cannot be checked (images, audio, video, binary documents)
are withheld unless ``unchecked_blocks="pass"``. Error results are checked like any other: an error
``ToolOutput`` the tool returns, and the text of an exception it raises (which the agent would send the
model as ``str(exception)``); a withheld or redacted exception becomes an error ``ToolOutput``, a passing
one is re-raised as it was. Workflow control-flow exceptions (waiting for an event) are re-raised unchecked.

``GuardedAgent`` guards a workflow agent as a whole: the user message before the run, the final answer
after it (every content block and the structured response), in the output and in the agent's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import json
import logging
import weakref
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import replace
from typing import Any, Literal

from llama_index.core.base.llms.types import (
    CachePoint,
    CitableBlock,
    CitationBlock,
    DocumentBlock,
    TextBlock,
    ThinkingBlock,
)
from llama_index.core.llms import ChatMessage, MessageRole
from llama_index.core.tools import FunctionTool, ToolOutput
from llama_index.core.tools.types import AsyncBaseTool, BaseTool, ToolMetadata
from llama_index.core.workflow import Event

from ..errors import GuardBlockedError
from ..guard import Guard, policy_scope, scoped_policy
from ..verdict import Action, Decision, Surface
from .events import emit
from .query_engine import _refusal_text

logger = logging.getLogger("flexguard_integrations")

DEFAULT_TOOL_REFUSAL = "Tool call blocked by the safety guard ({categories}); the tool was not run."
DEFAULT_TOOL_RESULT_REFUSAL = "[tool result withheld by the safety guard ({categories})]"
DEFAULT_AGENT_REFUSAL = "I can't help with that: it was blocked by the safety guard ({categories})."
UNCHECKED_BLOCK_NOTICE = "[{kind} withheld by the safety guard: it cannot be checked]"
_TEXT_MIMETYPES = ("application/json", "application/xml", "application/yaml", "application/x-yaml", "application/csv")


def render_call(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """A tool call as the text the guard judges: ``name(arguments as JSON)``."""
    payload: Any = kwargs if kwargs else (args[0] if len(args) == 1 else list(args))
    try:
        rendered = json.dumps(payload, ensure_ascii=False, sort_keys=True, default=str)
    except (TypeError, ValueError):
        rendered = str(payload)
    return f"{name}({rendered})"


def _document_text(block: DocumentBlock) -> str | None:
    """The text of a text document held inline or in a local file; None for binary or remote ones."""
    mimetype = (block.document_mimetype or "").lower()
    if mimetype and not (mimetype.startswith("text/") or mimetype in _TEXT_MIMETYPES):
        return None
    if block.data is None and block.path is None:  # a URL only: never fetched here
        return None
    try:
        data: bytes = block.resolve_document().read()
        return data.decode("utf-8")
    except (OSError, ValueError):  # unreadable, empty, or not UTF-8 (UnicodeDecodeError is a ValueError)
        return None


@functools.cache
def _control_flow_exceptions() -> tuple[type[BaseException], ...]:
    """Exceptions the workflow runtime uses for control flow: a guarded tool re-raises them unchecked.

    ``WaitingForEvent`` (``ctx.wait_for_event`` in a tool: human in the loop) is the one the agents
    themselves re-raise instead of turning it into an error result.
    """
    from workflows.errors import WorkflowCancelledByUser, WorkflowDone, WorkflowTimeoutError

    found: list[type[BaseException]] = [WorkflowCancelledByUser, WorkflowDone, WorkflowTimeoutError]
    with contextlib.suppress(ImportError):  # workflows >= 2.9
        from workflows.runtime.types.results import WaitingForEvent

        found.append(WaitingForEvent)
    return tuple(found)


class _Screen:
    """The text of a tool result's content blocks, and the blocks as the model may see them.

    Blocks that cannot be checked are replaced by a notice (``withhold``) or kept (``pass``).
    """

    def __init__(self, blocks: Sequence[Any], withhold: bool) -> None:
        self.texts: list[str] = []
        self.withheld = 0
        self.withhold = withhold
        self.blocks = [self._block(b) for b in blocks]

    @property
    def text(self) -> str:
        return "\n".join(t for t in self.texts if t.strip())

    def _unchecked(self, block: Any) -> Any:
        if not self.withhold:
            return block
        self.withheld += 1
        kind = str(getattr(block, "block_type", None) or type(block).__name__)
        return TextBlock(text=UNCHECKED_BLOCK_NOTICE.format(kind=kind))

    def _block(self, block: Any) -> Any:
        if isinstance(block, TextBlock):
            self.texts.append(block.text)
        elif isinstance(block, ThinkingBlock):
            self.texts.append(block.content or "")
        elif isinstance(block, CachePoint):
            pass  # a caching marker, no content
        elif isinstance(block, CitableBlock):
            self.texts.extend((block.title, block.source))
            content = [self._block(b) for b in block.content]
            if any(new is not old for new, old in zip(content, block.content, strict=True)):
                return block.model_copy(update={"content": content})
        elif isinstance(block, CitationBlock):
            self.texts.extend((block.title, block.source))
            cited = self._block(block.cited_content)
            if cited is not block.cited_content:
                return block.model_copy(update={"cited_content": cited})
        elif isinstance(block, DocumentBlock) and (text := _document_text(block)) is not None:
            if block.title and block.title != "input_document":  # the default title says nothing
                self.texts.append(block.title)
            self.texts.append(text)
        else:  # images, audio, video, binary documents, anything unknown
            return self._unchecked(block)
        return block


class GuardedTool(AsyncBaseTool):
    """A LlamaIndex tool whose arguments and output go through a Guard (same metadata as the wrapped one)."""

    def __init__(
        self,
        tool: BaseTool,
        guard: Guard,
        *,
        check_args: bool = True,
        check_output: bool = True,
        violation_message: str = DEFAULT_TOOL_REFUSAL,
        output_violation_message: str = DEFAULT_TOOL_RESULT_REFUSAL,
        policy: Any = None,
        unchecked_blocks: Literal["withhold", "pass"] = "withhold",
    ) -> None:
        if unchecked_blocks not in ("withhold", "pass"):
            raise ValueError(f"unchecked_blocks must be 'withhold' or 'pass', got {unchecked_blocks!r}")
        self.tool = tool
        self.guard = guard
        self.check_args = check_args
        self.check_output = check_output
        self.violation_message = violation_message
        self.output_violation_message = output_violation_message
        self.policy = policy
        self.unchecked_blocks = unchecked_blocks

    @property
    def metadata(self) -> ToolMetadata:
        return self.tool.metadata

    @property
    def _name(self) -> str:
        return self.tool.metadata.get_name()

    def _raw_input(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """FunctionTool's ``raw_input`` shape, without an injected workflow Context (it must serialize)."""
        return {"args": args, "kwargs": self._visible_kwargs(kwargs)}

    def _blocked_output(
        self, decision: Decision, args: tuple[Any, ...], kwargs: dict[str, Any], template: str
    ) -> ToolOutput:
        text = _refusal_text(template, decision)
        return ToolOutput(
            content=text, tool_name=self._name, raw_input=self._raw_input(args, kwargs), raw_output=text, is_error=True
        )

    @staticmethod
    def _replaced(output: ToolOutput, blocks: list[Any]) -> ToolOutput:
        """``output`` with new blocks; ``raw_output`` follows them (it may reach the user, e.g. return_direct)."""
        new = ToolOutput(
            blocks=blocks, tool_name=output.tool_name, raw_input=output.raw_input, is_error=output.is_error
        )
        new.raw_output = new.content
        return new

    def _screen(self, output: ToolOutput) -> _Screen | None:
        """The output's blocks to check (error outputs included), or None when outputs are not checked."""
        if not self.check_output:
            return None
        return _Screen(output.blocks, withhold=self.unchecked_blocks == "withhold")

    def _screened(self, output: ToolOutput, screen: _Screen) -> ToolOutput:
        return self._replaced(output, screen.blocks) if screen.withheld else output

    def _after(
        self, output: ToolOutput, screen: _Screen, decision: Decision, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> ToolOutput:
        emit(decision, f"tool_result:{self._name}")
        if decision.action.passes:
            return self._screened(output, screen)
        if decision.action is Action.REDACT and decision.redacted_text is not None:
            return self._replaced(output, [TextBlock(text=decision.redacted_text)])
        return self._blocked_output(decision, args, kwargs, self.output_violation_message)

    def _error_text(self, exc: Exception) -> str | None:
        """The text an agent would send the model for ``exc`` (``str(exc)``), or None to re-raise it unchecked.

        Workflow control flow (waiting for an event, a cancelled or finished run) is re-raised untouched,
        as the agents do; so is everything when outputs are not checked, and an error without text.
        """
        if not self.check_output or isinstance(exc, _control_flow_exceptions()):
            return None
        text = str(exc)
        return text if text.strip() else None

    def _after_error(self, decision: Decision, args: tuple[Any, ...], kwargs: dict[str, Any]) -> ToolOutput | None:
        """The error result that replaces a withheld or redacted exception; None when it may go on as raised."""
        emit(decision, f"tool_result:{self._name}")
        if decision.action.passes:
            return None
        if decision.action is Action.REDACT and decision.redacted_text is not None:
            text = decision.redacted_text
            raw_input = self._raw_input(args, kwargs)
            return ToolOutput(content=text, tool_name=self._name, raw_input=raw_input, raw_output=text, is_error=True)
        return self._blocked_output(decision, args, kwargs, self.output_violation_message)

    def _visible_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The arguments the model chose (a workflow Context injected by the agent is not shown to the guard)."""
        ctx_name = getattr(self.tool, "ctx_param_name", None)
        return {k: v for k, v in kwargs.items() if k != ctx_name}

    def call(self, *args: Any, **kwargs: Any) -> ToolOutput:
        if self.check_args:
            text = render_call(self._name, args, self._visible_kwargs(kwargs))
            decision = self.guard.check(
                " ", response=text, surface=Surface.TOOL_CALL, policy=scoped_policy(self.policy)
            )
            emit(decision, f"tool_call:{self._name}")
            if not decision.action.passes:
                return self._blocked_output(decision, args, kwargs, self.violation_message)
        try:
            output = self.tool(*args, **kwargs)
        except Exception as exc:
            error = self._error_text(exc)
            if error is None:
                raise
            decision = self.guard.check(error, surface=Surface.TOOL_RESULT, policy=scoped_policy(self.policy))
            withheld = self._after_error(decision, args, kwargs)
            if withheld is None:
                raise
            return withheld
        screen = self._screen(output)
        if screen is None:
            return output
        if not screen.text.strip():
            return self._screened(output, screen)
        decision = self.guard.check(screen.text, surface=Surface.TOOL_RESULT, policy=scoped_policy(self.policy))
        return self._after(output, screen, decision, args, kwargs)

    async def acall(self, *args: Any, **kwargs: Any) -> ToolOutput:
        if self.check_args:
            text = render_call(self._name, args, self._visible_kwargs(kwargs))
            decision = await self.guard.acheck(
                " ", response=text, surface=Surface.TOOL_CALL, policy=scoped_policy(self.policy)
            )
            emit(decision, f"tool_call:{self._name}")
            if not decision.action.passes:
                return self._blocked_output(decision, args, kwargs, self.violation_message)
        try:
            if isinstance(self.tool, AsyncBaseTool):
                output = await self.tool.acall(*args, **kwargs)
            else:
                output = await asyncio.to_thread(self.tool, *args, **kwargs)
        except Exception as exc:
            error = self._error_text(exc)
            if error is None:
                raise
            decision = await self.guard.acheck(error, surface=Surface.TOOL_RESULT, policy=scoped_policy(self.policy))
            withheld = self._after_error(decision, args, kwargs)
            if withheld is None:
                raise
            return withheld
        screen = self._screen(output)
        if screen is None:
            return output
        if not screen.text.strip():
            return self._screened(output, screen)
        decision = await self.guard.acheck(screen.text, surface=Surface.TOOL_RESULT, policy=scoped_policy(self.policy))
        return self._after(output, screen, decision, args, kwargs)


class GuardedFunctionTool(FunctionTool):
    """A guarded ``FunctionTool``: still a FunctionTool, so agents inject a workflow ``Context`` into it."""

    _guarded: GuardedTool

    def call(self, *args: Any, **kwargs: Any) -> ToolOutput:
        return self._guarded.call(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> ToolOutput:
        return self._guarded.call(*args, **kwargs)

    async def acall(self, *args: Any, **kwargs: Any) -> ToolOutput:
        return await self._guarded.acall(*args, **kwargs)


def guard_tool(tool: BaseTool, guard: Guard, **options: Any) -> GuardedTool | GuardedFunctionTool:
    """Wrap one tool: arguments checked before it runs (a blocked call never runs it), output after.

    A ``FunctionTool`` stays a FunctionTool (so a ``ctx: Context`` parameter is still injected by agents).
    """
    guarded = GuardedTool(tool, guard, **options)
    if isinstance(tool, FunctionTool):
        wrapper = copy.copy(tool)
        wrapper.__class__ = GuardedFunctionTool
        wrapper._guarded = guarded  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]
    return guarded


def guard_tools(tools: Sequence[BaseTool], guard: Guard, **options: Any) -> list[GuardedTool | GuardedFunctionTool]:
    """:func:`guard_tool` for each tool, order kept."""
    return [guard_tool(t, guard, **options) for t in tools]


# ---------------------------------------------------------------------------------------------- GuardedAgent

#: Per-context decisions of GuardedAgent runs: the agent → the decisions of its last run in this context.
#: Copied on write, so a run in one asyncio task never changes what another task reads.
_RUN_DECISIONS: ContextVar[weakref.WeakKeyDictionary[GuardedAgent, dict[str, Decision]] | None] = ContextVar(
    "flexguard_llama_index_agent_decisions", default=None
)


def _message_text(message: Any) -> str:
    """The text of every content block of a chat message (text, thinking, citations, text documents)."""
    blocks = getattr(message, "blocks", None)
    if isinstance(blocks, list):
        return _Screen(blocks, withhold=False).text
    return str(getattr(message, "content", "") or "")


def _structured_text(structured: Any) -> str | None:
    """A structured response as the JSON text the guard judges; None when there is none."""
    if structured is None:
        return None
    if hasattr(structured, "model_dump_json"):
        return str(structured.model_dump_json())
    try:
        return json.dumps(structured, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(structured)


def _rewritten(message: ChatMessage, text: str) -> ChatMessage:
    """``message`` with ``text`` as its only content; a tool message keeps the id of the call it answers."""
    keep = {k: v for k, v in message.additional_kwargs.items() if k in ("tool_call_id", "name")}
    return ChatMessage(role=message.role, content=text, additional_kwargs=keep)


def _rewrite_answer(messages: list[ChatMessage], answer: str, text: str) -> bool:
    """Replace the run's final answer at the end of ``messages`` by ``text``, in place; False when not found.

    The answer is the last message when it is an assistant message holding the answer's text (a ReActAgent
    stores its whole reasoning, answer included; a FunctionAgent the answer itself). A ``return_direct``
    tool result the agent repeated as its answer is the tool message just before it: it is rewritten too.
    """
    if not messages or messages[-1].role != MessageRole.ASSISTANT:
        return False
    answer = answer.strip()
    if answer and answer not in _message_text(messages[-1]):
        return False  # the last message is not this run's answer (the agent did not store it there)
    messages[-1] = _rewritten(messages[-1], text)
    if answer and len(messages) > 1:
        before = messages[-2]
        if before.role == MessageRole.TOOL and _message_text(before).strip() == answer:
            messages[-2] = _rewritten(before, text)
    return True


async def _rewrite_memory(memory: Any, answer: str, text: str) -> bool:
    """Replace the final answer stored in an agent memory by ``text``; False when it is not there.

    A ``Memory`` (SQL chat store) has its active messages rewritten, its archived ones left as they are;
    any other ``BaseMemory`` (``ChatMemoryBuffer``...) is read with ``aget_all`` and written with ``aset``.
    """
    from llama_index.core.memory import Memory
    from llama_index.core.storage.chat_store.base_db import MessageStatus

    if isinstance(memory, Memory):
        store, key = memory.sql_store, memory.session_id
        messages = list(await store.get_messages(key, status=MessageStatus.ACTIVE))
        if not _rewrite_answer(messages, answer, text):
            return False
        await store.delete_messages(key, status=MessageStatus.ACTIVE)
        await store.add_messages(key, messages, status=MessageStatus.ACTIVE)
        return True
    if not hasattr(memory, "aget_all") or not hasattr(memory, "aset"):
        return False
    messages = list(await memory.aget_all())
    if not _rewrite_answer(messages, answer, text):
        return False
    await memory.aset(messages)
    return True


class GuardedAgent:
    """Guard a workflow agent (``FunctionAgent``, ``ReActAgent``, ``AgentWorkflow``) as a whole.

    ``await GuardedAgent(agent, guard).run(user_msg=...)`` checks the user message before the run (a
    blocked one never starts the agent) and the final answer after it: the text of every content block of
    ``output.response`` (text, thinking, citations, text documents) and the structured response (as JSON),
    checked as one text. A blocked answer is replaced by the refusal, in the output and in the agent's
    memory. A run's decisions are attached to its output (``output["flexguard"]``, and
    ``output.raw["flexguard"]`` when ``raw`` is a dict); :attr:`last_decisions` reads them per context.
    Combine with :func:`guard_tools` to gate each tool call as well.
    """

    def __init__(
        self,
        agent: Any,
        guard: Guard,
        *,
        on_block: Literal["refuse", "raise"] = "refuse",
        refusal: str = DEFAULT_AGENT_REFUSAL,
        policy: Any = None,
    ) -> None:
        self.agent = agent
        self.guard = guard
        self.on_block = on_block
        self.refusal = refusal
        self.policy = policy
        self._last_finished: dict[str, Decision] = {}

    @property
    def last_decisions(self) -> dict[str, Decision]:
        """The decisions (``"input"``, ``"output"``) of this agent's last run in the current context.

        A run records its decisions in the context it runs in: the coroutine that awaits :meth:`run`, or
        the asyncio task it runs as. So concurrent runs (``asyncio.gather``, one task per request) each read
        their own run's decisions, never another's. Read from a context where this agent never ran, it
        gives the decisions of the run that finished last on this instance, whichever context ran it.
        Under concurrency prefer the decisions attached to each output (``output["flexguard"]``).
        """
        runs = _RUN_DECISIONS.get()
        if runs is not None and self in runs:
            return runs[self]
        return self._last_finished

    def _start_run(self) -> dict[str, Decision]:
        """A fresh decisions dict for one run, made visible to :attr:`last_decisions` in this context."""
        decisions: dict[str, Decision] = {}
        runs = _RUN_DECISIONS.get()
        mine: weakref.WeakKeyDictionary[GuardedAgent, dict[str, Decision]] = weakref.WeakKeyDictionary(runs or {})
        mine[self] = decisions
        _RUN_DECISIONS.set(mine)
        return decisions

    @staticmethod
    def _attach(output: Any, decisions: dict[str, Decision]) -> Any:
        """Attach the run's decisions (as dicts) to its output: ``output["flexguard"]`` and a dict ``raw``."""
        record = {k: v.to_dict() for k, v in decisions.items()}
        if isinstance(output, Event):
            output["flexguard"] = record
        raw = getattr(output, "raw", None)
        if isinstance(raw, dict):
            raw["flexguard"] = record
        return output

    def _refusal(self, decision: Decision, decisions: dict[str, Decision]) -> Any:
        if self.on_block == "raise":
            raise GuardBlockedError(decision)
        from llama_index.core.agent.workflow import AgentOutput

        output = AgentOutput(
            response=ChatMessage(role=MessageRole.ASSISTANT, content=_refusal_text(self.refusal, decision)),
            tool_calls=[],
            raw={},
            current_agent_name=getattr(self.agent, "name", "agent"),
        )
        return self._attach(output, decisions)

    async def run(self, user_msg: str, *, policy: Any = None, **kwargs: Any) -> Any:
        """Run the agent on ``user_msg`` with both checks; returns the agent's output (or the refusal).

        ``policy=`` overrides the policy for this run only: both checks and, through
        :func:`~flexguard_integrations.policy_scope`, the guarded tools the agent calls. Other keyword
        arguments go to ``agent.run`` (``memory=``, ``ctx=``, ``chat_history=``...).
        """
        decisions = self._start_run()
        try:
            with policy_scope(policy) if policy is not None else contextlib.nullcontext():
                return await self._run(user_msg, decisions, **kwargs)
        finally:
            self._last_finished = decisions

    async def _run(self, user_msg: str, decisions: dict[str, Decision], **kwargs: Any) -> Any:
        decision = await self.guard.acheck(user_msg, surface=Surface.PROMPT, policy=scoped_policy(self.policy))
        emit(decision, "agent:input")
        decisions["input"] = decision
        run_msg = user_msg
        if decision.action is Action.REDACT and decision.redacted_text is not None:
            run_msg = decision.redacted_text
        elif not decision.action.passes:
            return self._refusal(decision, decisions)
        handler = self.agent.run(user_msg=run_msg, **kwargs)
        output = await handler
        answer = _message_text(getattr(output, "response", None))
        structured = _structured_text(getattr(output, "structured_response", None))
        checked = "\n\n".join(t for t in (answer, structured) if t and t.strip())
        if not checked:
            return self._attach(output, decisions)
        decision = await self.guard.acheck(
            user_msg, response=checked, surface=Surface.RESPONSE, policy=scoped_policy(self.policy)
        )
        if decision.action is Action.REDACT and structured is not None:
            # a structured response cannot be redacted in place: it is blocked, and says so
            reason = f"{decision.reason}; a structured response cannot be redacted: blocked"
            decision = replace(decision, action=Action.BLOCK, reason=reason, redacted_text=None)
        emit(decision, "agent:output")
        decisions["output"] = decision
        if decision.action.passes:
            return self._attach(output, decisions)
        if decision.action is Action.REDACT and decision.redacted_text is not None:
            await self._rewrite_run_memory(handler, kwargs, answer, decision.redacted_text)
            output.response = ChatMessage(role=MessageRole.ASSISTANT, content=decision.redacted_text)
            output.raw = {}  # the model's raw answer holds the unredacted text
            return self._attach(output, decisions)
        await self._rewrite_run_memory(handler, kwargs, answer, _refusal_text(self.refusal, decision))
        return self._refusal(decision, decisions)

    @staticmethod
    async def _rewrite_run_memory(handler: Any, kwargs: dict[str, Any], answer: str, text: str) -> None:
        """Put ``text`` in place of the blocked or redacted answer in the memory the run used.

        Workflow agents keep their memory in the run's context store (``memory=`` given to ``run`` ends up
        there too); an agent without one falls back to the ``memory=`` argument.
        """
        memory: Any = None
        ctx = getattr(handler, "ctx", None)
        store = getattr(ctx, "store", None)
        if store is not None:
            memory = await store.get("memory", default=None)
        if memory is None:
            memory = kwargs.get("memory")
        if memory is not None and not await _rewrite_memory(memory, answer, text):
            logger.warning(
                "the blocked or redacted answer was not found at the end of the agent's %s: it may still hold "
                "the original text, which the next run would feed back to the model",
                type(memory).__name__,
            )
