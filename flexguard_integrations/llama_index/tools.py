"""Agent tool gating for ``FunctionAgent``, ``ReActAgent`` and ``AgentWorkflow``, and a whole-agent guard.

In llama-index 0.14 an exception raised inside a tool does not stop the agent: it goes back to the model
as an error result. So a blocked call returns an error ``ToolOutput`` carrying the refusal, and the real
function never runs. The arguments are checked before execution (surface ``tool_call``), the output after
(surface ``tool_result``: REDACT replaces it, BLOCK withholds it). The output check covers every content
block the agent sends to the model (``ToolOutput.blocks``: text, the text inside citable and citation
blocks, text documents); blocks whose content cannot be checked (images, audio, video, binary documents)
are withheld unless ``unchecked_blocks="pass"``.

``GuardedAgent`` guards a workflow agent as a whole: the user message before the run, the final answer
after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
from collections.abc import Sequence
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

from ..errors import GuardBlockedError
from ..guard import Guard, policy_scope, scoped_policy
from ..verdict import Action, Decision, Surface
from .events import emit
from .query_engine import _refusal_text

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
        """The output's blocks to check, or None when the output is passed on unchecked."""
        if not self.check_output or output.is_error:
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
        output = self.tool(*args, **kwargs)
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
        if isinstance(self.tool, AsyncBaseTool):
            output = await self.tool.acall(*args, **kwargs)
        else:
            output = await asyncio.to_thread(self.tool, *args, **kwargs)
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


class GuardedAgent:
    """Guard a workflow agent (``FunctionAgent``, ``ReActAgent``, ``AgentWorkflow``) as a whole.

    ``await GuardedAgent(agent, guard).run(user_msg=...)`` checks the user message before the run (a
    blocked one never starts the agent) and the final answer after it (a blocked answer is replaced by
    the refusal). Decisions are in ``output.raw["flexguard"]`` when the output allows it, and always in
    ``self.last_decisions``. Combine with :func:`guard_tools` to gate each tool call as well.
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
        self.last_decisions: dict[str, Decision] = {}

    def _refusal(self, decision: Decision) -> Any:
        if self.on_block == "raise":
            raise GuardBlockedError(decision)
        from llama_index.core.agent.workflow import AgentOutput

        text = _refusal_text(self.refusal, decision)
        return AgentOutput(
            response=ChatMessage(role=MessageRole.ASSISTANT, content=text),
            tool_calls=[],
            raw={"flexguard": {k: v.to_dict() for k, v in self.last_decisions.items()}},
            current_agent_name=getattr(self.agent, "name", "agent"),
        )

    async def run(self, user_msg: str, *, policy: Any = None, **kwargs: Any) -> Any:
        """Run the agent on ``user_msg`` with both checks; returns the agent's output (or the refusal).

        ``policy=`` overrides the policy for this run only: both checks and, through
        :func:`~flexguard_integrations.policy_scope`, the guarded tools the agent calls. Other keyword
        arguments go to ``agent.run``.
        """
        with policy_scope(policy) if policy is not None else contextlib.nullcontext():
            return await self._run(user_msg, **kwargs)

    async def _run(self, user_msg: str, **kwargs: Any) -> Any:
        self.last_decisions = {}
        decision = await self.guard.acheck(user_msg, surface=Surface.PROMPT, policy=scoped_policy(self.policy))
        emit(decision, "agent:input")
        self.last_decisions["input"] = decision
        run_msg = user_msg
        if decision.action is Action.REDACT and decision.redacted_text is not None:
            run_msg = decision.redacted_text
        elif not decision.action.passes:
            return self._refusal(decision)
        output = await self.agent.run(user_msg=run_msg, **kwargs)
        answer = str(getattr(getattr(output, "response", None), "content", "") or "")
        if not answer.strip():
            return output
        decision = await self.guard.acheck(
            user_msg, response=answer, surface=Surface.RESPONSE, policy=scoped_policy(self.policy)
        )
        emit(decision, "agent:output")
        self.last_decisions["output"] = decision
        if decision.action is Action.REDACT and decision.redacted_text is not None:
            output.response = ChatMessage(role=MessageRole.ASSISTANT, content=decision.redacted_text)
        elif not decision.action.passes:
            return self._refusal(decision)
        raw = getattr(output, "raw", None)
        if isinstance(raw, dict):
            raw["flexguard"] = {k: v.to_dict() for k, v in self.last_decisions.items()}
        return output
