"""``guard_tool`` / ``guard_tools``: gate a ``BaseTool`` for agents not built with ``create_agent``.

The arguments are checked (surface ``tool_call``, rendered as ``name(arguments)``; injected arguments such
as ``InjectedToolCallId`` are not shown to the guard) before the tool runs: a blocked call never runs the
tool. Called with a ToolCall the agent gets a ``ToolMessage(status="error")`` carrying the refusal; called
with plain arguments it gets the refusal text (LangChain's ``handle_tool_error`` behaviour). The output
is checked after the run (surface ``tool_result``): REDACT replaces it, BLOCK withholds it. The original
input — a ToolCall included — is passed to the wrapped tool unchanged, so ``content_and_artifact`` tools
and injected arguments keep working. The policy can be chosen per call through
``config["configurable"]["flexguard_policy"]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManager, CallbackManager
from langchain_core.messages import ToolMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import ensure_config, patch_config
from langchain_core.tools import BaseTool
from pydantic import AliasChoices, AliasPath, ConfigDict
from pydantic.fields import FieldInfo

from ..guard import Guard, scoped_policy
from ..verdict import Action, Decision, Surface
from ._common import adispatch_verdict, dispatch_verdict, format_refusal, policy_from_config, render_tool_call
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

    # ----------------------------------------------------------------- helpers

    def _policy(self, config: RunnableConfig | None) -> Any:
        return policy_from_config(config) or scoped_policy(self.policy)

    def _split_input(self, input: Any) -> tuple[str | None, Any]:
        """(tool call id or None, the arguments the model chose)."""
        if isinstance(input, Mapping) and input.get("type") == "tool_call":
            return str(input.get("id")), input.get("args", {})
        return None, input

    def _visible_args(self, args: Any) -> Any:
        """The arguments without the injected ones (by name or alias); everything else is shown to the guard."""
        if not isinstance(args, Mapping):
            return args
        hidden = self._injected_keys()
        return {k: v for k, v in args.items() if k not in hidden}

    def _injected_keys(self) -> set[str]:
        """Names and aliases of the fields of the full args schema that the model does not see."""
        try:
            full = self.tool.get_input_schema().model_fields  # type: ignore[union-attr]
            model_facing = self.tool.tool_call_schema.model_fields  # type: ignore[union-attr]
        except Exception:  # a tool without a pydantic schema: nothing is injected
            return set()
        facing = {key for name, info in model_facing.items() for key in _field_keys(name, info)}
        injected = {key for name, info in full.items() if name not in model_facing for key in _field_keys(name, info)}
        return injected - facing

    def _args_text(self, input: Any) -> str:
        _, args = self._split_input(input)
        return render_tool_call(self.tool.name, self._visible_args(args))

    def _refused_call(self, input: Any, decision: Decision) -> Any:
        text = format_refusal(self.violation_message, decision)
        call_id, _ = self._split_input(input)
        if call_id is not None:
            return ToolMessage(content=text, tool_call_id=call_id, name=self.name, status="error")
        return text

    def _output(self, input: Any, output: Any, decision: Decision) -> Any:
        if decision.action.passes:
            return output
        if decision.action is Action.REDACT and decision.redacted_text is not None:
            return _with_text(output, decision.redacted_text, error=False)
        return _with_text(output, format_refusal(self.output_violation_message, decision), error=True)

    # ----------------------------------------------------------------- run

    def _callback_manager(self, config: RunnableConfig, manager_cls: Any) -> Any:
        return manager_cls.configure(
            config.get("callbacks"),
            self.callbacks,
            self.verbose,
            config.get("tags"),
            self.tags,
            config.get("metadata"),
            self.metadata,
        )

    def _run_start(self, input: Any, config: RunnableConfig) -> dict[str, Any]:
        """The arguments of ``on_tool_start`` for this call (what ``BaseTool.run`` gives it: injected arguments
        hidden; the run's id and name from ``config``)."""
        call_id, args = self._split_input(input)
        visible = self._visible_args(args)
        return {
            "serialized": {"name": self.name, "description": self.description},
            "input_str": visible if isinstance(visible, str) else str(visible),
            "run_id": config.get("run_id"),
            "name": config.get("run_name"),
            "inputs": dict(visible) if isinstance(visible, Mapping) else None,
            "tool_call_id": call_id,
        }

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        """Check the arguments, run the tool, check its output.

        Inside a run (an agent's tool node, a chain) the wrapped tool's own run is the trace and the verdicts
        are events of the enclosing run. Called at the top level with callbacks, this tool opens its own tool
        run first, as ``BaseTool.invoke`` does, so tracers and ``astream_events`` see the call and its
        verdicts.
        """
        config = ensure_config(config)
        manager = self._callback_manager(config, CallbackManager)
        if manager.parent_run_id is not None or not manager.handlers:
            return self._checked_invoke(input, config, **kwargs)
        start = self._run_start(input, config)
        run = manager.on_tool_start(**start)
        try:
            output = self._checked_invoke(input, patch_config(config, callbacks=run.get_child()), **kwargs)
        except BaseException as exc:
            run.on_tool_error(exc, tool_call_id=start["tool_call_id"])
            raise
        run.on_tool_end(output, name=self.name)
        return output

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        """Async twin of :meth:`invoke`."""
        config = ensure_config(config)
        manager = self._callback_manager(config, AsyncCallbackManager)
        if manager.parent_run_id is not None or not manager.handlers:
            return await self._achecked_invoke(input, config, **kwargs)
        start = self._run_start(input, config)
        run = await manager.on_tool_start(**start)
        try:
            output = await self._achecked_invoke(input, patch_config(config, callbacks=run.get_child()), **kwargs)
        except BaseException as exc:
            await run.on_tool_error(exc, tool_call_id=start["tool_call_id"])
            raise
        await run.on_tool_end(output, name=self.name)
        return output

    def _checked_invoke(self, input: Any, config: RunnableConfig, **kwargs: Any) -> Any:
        policy = self._policy(config)
        if self.check_args:
            decision = self.guard.check(" ", response=self._args_text(input), surface=Surface.TOOL_CALL, policy=policy)
            dispatch_verdict(decision, f"tool_call:{self.tool.name}", config)
            if not decision.action.passes:
                return self._refused_call(input, decision)
        output = self.tool.invoke(input, config, **kwargs)
        text = _text_of(output)
        if not self.check_output or not text.strip():
            return output
        decision = self.guard.check(text, surface=Surface.TOOL_RESULT, policy=policy)
        dispatch_verdict(decision, f"tool_result:{self.tool.name}", config)
        return self._output(input, output, decision)

    async def _achecked_invoke(self, input: Any, config: RunnableConfig, **kwargs: Any) -> Any:
        policy = self._policy(config)
        if self.check_args:
            decision = await self.guard.acheck(
                " ", response=self._args_text(input), surface=Surface.TOOL_CALL, policy=policy
            )
            await adispatch_verdict(decision, f"tool_call:{self.tool.name}", config)
            if not decision.action.passes:
                return self._refused_call(input, decision)
        output = await self.tool.ainvoke(input, config, **kwargs)
        text = _text_of(output)
        if not self.check_output or not text.strip():
            return output
        decision = await self.guard.acheck(text, surface=Surface.TOOL_RESULT, policy=policy)
        await adispatch_verdict(decision, f"tool_result:{self.tool.name}", config)
        return self._output(input, output, decision)

    def _run(self, *args: Any, **kwargs: Any) -> Any:
        """Reached only through ``BaseTool.run``; delegates to the guarded :meth:`invoke`."""
        kwargs.pop("run_manager", None)
        return self.invoke(kwargs if kwargs else (args[0] if args else ""))

    async def _arun(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.pop("run_manager", None)
        return await self.ainvoke(kwargs if kwargs else (args[0] if args else ""))


def _field_keys(name: str, info: FieldInfo) -> set[str]:
    """The keys a pydantic field accepts: its name, its alias and its validation aliases."""
    keys = {name}
    if info.alias:
        keys.add(info.alias)
    aliases = info.validation_alias
    choices = aliases.choices if isinstance(aliases, AliasChoices) else [aliases]
    for choice in choices:
        if isinstance(choice, str):
            keys.add(choice)
        elif isinstance(choice, AliasPath) and choice.path and isinstance(choice.path[0], str):
            keys.add(choice.path[0])
    return keys


def _text_of(output: Any) -> str:
    if isinstance(output, ToolMessage):
        return str(output.text)
    if isinstance(output, tuple) and len(output) == 2:  # content_and_artifact
        return _text_of(output[0])
    return output if isinstance(output, str) else str(output)


def _with_text(output: Any, text: str, *, error: bool) -> Any:
    if isinstance(output, ToolMessage):
        update: dict[str, Any] = {"content": text}
        if error:
            update["status"] = "error"
            update["artifact"] = None
        return output.model_copy(update=update)
    if isinstance(output, tuple) and len(output) == 2:
        return (text, None if error else output[1])
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
