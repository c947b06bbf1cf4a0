"""``guard_tool`` / ``guard_tools``: gate a ``BaseTool`` for agents not built with ``create_agent``.

The arguments are checked (surface ``tool_call``, rendered as ``name(arguments)``) before the tool runs;
a blocked call never runs the tool and comes back as a ToolException, which LangChain turns into the
error result the agent sees (``ToolMessage(status="error")`` when called with a tool call). The output is
checked after the run (surface ``tool_result``): REDACT replaces it, BLOCK withholds it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForToolRun, CallbackManagerForToolRun
from langchain_core.messages import ToolMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import BaseTool, ToolException
from pydantic import ConfigDict

from ..guard import Guard
from ..verdict import Action, Decision, Surface
from ._common import adispatch_verdict, dispatch_verdict, format_refusal, render_tool_call
from .middleware import DEFAULT_TOOL_REFUSAL, DEFAULT_TOOL_RESULT_REFUSAL


class GuardedTool(BaseTool):
    """A tool whose arguments and output go through a Guard. Same name, description and schema."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    tool: BaseTool
    guard: Guard
    check_args: bool = True
    check_output: bool = True
    violation_message: str = DEFAULT_TOOL_REFUSAL
    output_violation_message: str = DEFAULT_TOOL_RESULT_REFUSAL
    policy: Any = None

    def _args_text(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        payload: Any = kwargs if kwargs else (args[0] if len(args) == 1 else list(args))
        return render_tool_call(self.tool.name, payload)

    def _refuse_call(self, decision: Decision) -> None:
        if not decision.action.passes:
            raise ToolException(format_refusal(self.violation_message, decision))

    def _output(self, output: Any, decision: Decision) -> Any:
        if decision.action.passes:
            return output
        if decision.action is Action.REDACT and decision.redacted_text is not None:
            return _with_text(output, decision.redacted_text)
        raise ToolException(format_refusal(self.output_violation_message, decision))

    def _run(self, *args: Any, run_manager: CallbackManagerForToolRun | None = None, **kwargs: Any) -> Any:
        if self.check_args:
            decision = self.guard.check(
                " ", response=self._args_text(args, kwargs), surface=Surface.TOOL_CALL, policy=self.policy
            )
            dispatch_verdict(decision, f"tool_call:{self.tool.name}")
            self._refuse_call(decision)
        config: RunnableConfig = {"callbacks": run_manager.get_child()} if run_manager else {}
        output = self.tool.invoke(kwargs if kwargs else (args[0] if args else ""), config)
        text = _text_of(output)
        if not self.check_output or not text.strip():
            return output
        decision = self.guard.check(text, surface=Surface.TOOL_RESULT, policy=self.policy)
        dispatch_verdict(decision, f"tool_result:{self.tool.name}")
        return self._output(output, decision)

    async def _arun(self, *args: Any, run_manager: AsyncCallbackManagerForToolRun | None = None, **kwargs: Any) -> Any:
        if self.check_args:
            decision = await self.guard.acheck(
                " ", response=self._args_text(args, kwargs), surface=Surface.TOOL_CALL, policy=self.policy
            )
            await adispatch_verdict(decision, f"tool_call:{self.tool.name}")
            self._refuse_call(decision)
        config: RunnableConfig = {"callbacks": run_manager.get_child()} if run_manager else {}
        output = await self.tool.ainvoke(kwargs if kwargs else (args[0] if args else ""), config)
        text = _text_of(output)
        if not self.check_output or not text.strip():
            return output
        decision = await self.guard.acheck(text, surface=Surface.TOOL_RESULT, policy=self.policy)
        await adispatch_verdict(decision, f"tool_result:{self.tool.name}")
        return self._output(output, decision)


def _text_of(output: Any) -> str:
    if isinstance(output, ToolMessage):
        return str(output.text)
    if isinstance(output, tuple) and len(output) == 2:  # content_and_artifact
        return _text_of(output[0])
    return output if isinstance(output, str) else str(output)


def _with_text(output: Any, text: str) -> Any:
    if isinstance(output, ToolMessage):
        return output.model_copy(update={"content": text})
    if isinstance(output, tuple) and len(output) == 2:
        return (text, output[1])
    return text


def guard_tool(
    tool: BaseTool,
    guard: Guard,
    *,
    check_args: bool = True,
    check_output: bool = True,
    violation_message: str = DEFAULT_TOOL_REFUSAL,
    output_violation_message: str = DEFAULT_TOOL_RESULT_REFUSAL,
    policy: Any = None,
) -> GuardedTool:
    """Wrap one tool: arguments checked before it runs, output after. Blocked calls never run it."""
    return GuardedTool(
        name=tool.name,
        description=tool.description,
        args_schema=tool.args_schema,
        return_direct=tool.return_direct,
        response_format=tool.response_format,
        handle_tool_error=True,
        tool=tool,
        guard=guard,
        check_args=check_args,
        check_output=check_output,
        violation_message=violation_message,
        output_violation_message=output_violation_message,
        policy=policy,
    )


def guard_tools(tools: Sequence[BaseTool], guard: Guard, **options: Any) -> list[GuardedTool]:
    """:func:`guard_tool` for each tool, order kept."""
    return [guard_tool(t, guard, **options) for t in tools]
