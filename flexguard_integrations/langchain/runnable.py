"""Guard Runnables: ``GuardRunnable`` (text in, Decision out) and ``guarded(runnable, guard)``.

``guarded`` wraps any Runnable (a chain, a chat model, an agent): the input is checked before the wrapped
run (or at the same time, ``parallel_input=True``), the output after it, and the decision is carried out:
REDACT passes the redacted text on, REROUTE runs ``routes[name]`` with the original input, BLOCK raises
:class:`GuardBlockedError` or answers with the refusal. ``stream`` / ``astream`` hold text back until a
check has passed it (see :mod:`flexguard_integrations.streaming`).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_origin

from langchain_core.callbacks import AsyncCallbackManagerForChainRun, CallbackManagerForChainRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, BaseMessageChunk, convert_to_messages
from langchain_core.runnables import (
    Runnable,
    RunnableBinding,
    RunnableConfig,
    RunnableParallel,
    RunnableSequence,
    RunnableSerializable,
    RunnableWithFallbacks,
)
from langchain_core.runnables.base import RunnableBindingBase
from langchain_core.runnables.config import ContextThreadPoolExecutor, patch_config
from langgraph.pregel import Pregel
from pydantic import ConfigDict, Field, model_validator

from ..errors import ConfigurationError, GuardBlockedError, GuardInputError
from ..guard import Guard, scoped_policy
from ..streaming import StreamModerator, check_window_sizes
from ..verdict import Action, Decision, Surface
from ._common import (
    DEFAULT_REFUSAL,
    adispatch_verdict,
    dispatch_verdict,
    extract_input_text,
    extract_output_text,
    format_refusal,
    is_text_output,
    item_text,
    logger,
    policy_from_config,
    replace_input_text,
    replace_output_text,
    with_text,
)

OnBlock = Literal["raise", "refuse"]
RefusalAs = Literal["auto", "str", "message", "dict"]


class GuardRunnable(RunnableSerializable[Any, Decision]):
    """A Runnable that checks its input and returns the :class:`Decision`.

    The input may be a str, a message, a list of messages, a PromptValue or a dict (``input_key``, or one
    of ``input``/``question``/``query``/``messages``/``text``/``prompt``). With ``response_key`` a dict
    input gets response moderation of ``input[response_key]`` with the input text as its prompt. The
    policy can be chosen per call with ``config={"configurable": {"flexguard_policy": "strict"}}``.
    Each check runs as its own traced run and dispatches a ``flexguard_verdict`` custom event.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    guard: Guard
    surface: Surface = Surface.PROMPT
    input_key: str | None = None
    response_key: str | None = None
    policy: Any = None
    name: str | None = "FlexGuard"

    def _texts(self, value: Any) -> tuple[str, str | None]:
        response = None
        if self.response_key and isinstance(value, Mapping) and self.response_key in value:
            response = extract_output_text(value[self.response_key])
        return extract_input_text(value, self.input_key), response

    def _check(self, value: Any, run_manager: CallbackManagerForChainRun, config: RunnableConfig) -> Decision:
        text, response = self._texts(value)
        policy = policy_from_config(config) or scoped_policy(self.policy)
        surface = Surface.RESPONSE if response is not None and self.surface.mode == "prompt" else self.surface
        decision = self.guard.check(text, response=response, surface=surface, policy=policy)
        dispatch_verdict(decision, "GuardRunnable", config)
        return decision

    async def _acheck(
        self, value: Any, run_manager: AsyncCallbackManagerForChainRun, config: RunnableConfig
    ) -> Decision:
        text, response = self._texts(value)
        policy = policy_from_config(config) or scoped_policy(self.policy)
        surface = Surface.RESPONSE if response is not None and self.surface.mode == "prompt" else self.surface
        decision = await self.guard.acheck(text, response=response, surface=surface, policy=policy)
        await adispatch_verdict(decision, "GuardRunnable", config)
        return decision

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Decision:
        return self._call_with_config(self._check, input, config, run_type="chain", **kwargs)

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Decision:
        return await self._acall_with_config(self._acheck, input, config, run_type="chain", **kwargs)


class GuardedRunnable(RunnableSerializable[Any, Any]):
    """A Runnable wrapped by a guard on its input and output. Build it with :func:`guarded`."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    bound: Runnable[Any, Any]
    guard: Guard
    check_input: bool = True
    check_output: bool = True
    on_block: OnBlock = "raise"
    refusal: str = DEFAULT_REFUSAL
    refusal_as: RefusalAs = "auto"
    routes: dict[str, Runnable[Any, Any]] = Field(default_factory=dict)
    parallel_input: bool = False
    input_key: str | None = None
    output_key: str | None = None
    policy: Any = None
    stream_chunk_chars: int = 200
    stream_context_chars: int = 50
    stream_first_chunk_chars: int | None = 50
    stream_first: bool = False
    name: str | None = None

    @model_validator(mode="after")
    def _check_stream_windows(self) -> GuardedRunnable:
        check_window_sizes(self.stream_chunk_chars, self.stream_first_chunk_chars, prefix="stream_")
        return self

    def get_name(self, suffix: str | None = None, *, name: str | None = None) -> str:
        return name or self.name or f"Guarded[{self.bound.get_name()}]"

    # ----------------------------------------------------------------- shared decisions

    def _policy(self, config: RunnableConfig | None) -> Any:
        return policy_from_config(config) or scoped_policy(self.policy)

    def _refusal_value(self, decision: Decision, input_value: Any, output: Any = None) -> Any:
        text = format_refusal(self.refusal, decision)
        kind = self.refusal_as
        if kind == "auto":
            if output is not None:
                return replace_output_text(output, text, self.output_key)
            if isinstance(input_value, Mapping) and isinstance(input_value.get("messages"), list):
                # an agent's state in, an agent's state out: append the refusal as the last message
                answer = AIMessage(content=text, response_metadata={"flexguard": decision.to_dict()})
                return {**input_value, "messages": [*input_value["messages"], answer]}
            kind = self._output_kind(input_value)
        if kind == "message":
            return AIMessage(content=text, response_metadata={"flexguard": decision.to_dict()})
        if kind == "dict":
            return {self.output_key or "output": text}
        return text

    def _output_kind(self, input_value: Any) -> RefusalAs:
        """The shape of the wrapped runnable's output: its declared OutputType, else a guess from the input."""
        try:
            declared = self.bound.OutputType
        except Exception:  # some runnables cannot infer it
            declared = Any
        if declared is str:
            return "str"
        if isinstance(declared, type) and issubclass(declared, BaseMessage):
            return "message"
        if "langchain_core.messages" in repr(declared):
            return "message"
        if declared is dict or get_origin(declared) is dict:
            return "dict"
        if isinstance(self.bound, BaseChatModel) or isinstance(input_value, BaseMessage | list):
            return "message"
        if isinstance(input_value, Mapping):
            return "dict"
        return "str"

    def _blocked(self, decision: Decision, input_value: Any, output: Any = None) -> Any:
        if self.on_block == "raise":
            raise GuardBlockedError(decision)
        return self._refusal_value(decision, input_value, output)

    def _route(self, decision: Decision) -> Runnable[Any, Any] | None:
        return self.routes.get(decision.route or "")

    # ----------------------------------------------------------------- sync

    def _redirect(self, decision: Decision) -> _Redirect:
        route = self._route(decision) if decision.action is Action.REROUTE else None
        return _Redirect(route=route, decision=decision)

    def _input_outcome(
        self, decision: Decision, value: Any, config: RunnableConfig
    ) -> tuple[Literal["run", "done"], Any]:
        """What to do after the input check: ("run", input to run with) or ("done", a _Redirect)."""
        if decision.action.passes:
            return "run", value
        if decision.action is Action.REDACT and decision.redacted_text is not None:
            return "run", replace_input_text(value, decision.redacted_text, self.input_key)
        return "done", self._redirect(decision)

    def _finish_output(self, decision: Decision, value: Any, output: Any) -> Any:
        if decision.action.passes:
            return output
        if decision.action is Action.REDACT and decision.redacted_text is not None:
            if is_text_output(output, self.output_key):
                return replace_output_text(output, decision.redacted_text, self.output_key)
            # a structured output (a list, a model) cannot be redacted in place: it is blocked, and says so
            reason = f"{decision.reason}; a structured output cannot be redacted: blocked"
            decision = dataclasses.replace(decision, action=Action.BLOCK, reason=reason, redacted_text=None)
        return self._redirect(decision)

    def _invoke(self, value: Any, run_manager: CallbackManagerForChainRun, config: RunnableConfig) -> Any:
        policy = self._policy(config)
        child = patch_config(config, callbacks=run_manager.get_child())
        prompt = extract_input_text(value, self.input_key) if (self.check_input or self.check_output) else ""
        run_value = value
        if self.check_input:
            if self.parallel_input:
                return self._invoke_parallel(value, prompt, policy, child, config)
            decision = self.guard.check(prompt, surface=Surface.PROMPT, policy=policy)
            dispatch_verdict(decision, "input", config)
            step, result = self._input_outcome(decision, value, config)
            if step == "done":
                return self._resolve(result, value, child)
            run_value = result
        output = self.bound.invoke(run_value, child)
        return self._check_output(value, prompt, output, policy, config, child)

    def _resolve(self, result: _Redirect, value: Any, child: RunnableConfig, output: Any = None) -> Any:
        if result.route is not None:
            return result.route.invoke(value, child)
        return self._blocked(result.decision, value, output)

    def _check_output(
        self, value: Any, prompt: str, output: Any, policy: Any, config: RunnableConfig, child: RunnableConfig
    ) -> Any:
        if not self.check_output:
            return output
        text = extract_output_text(output, self.output_key)
        if text is None or not text.strip():
            return output
        decision = self.guard.check(prompt or " ", response=text, surface=Surface.RESPONSE, policy=policy)
        dispatch_verdict(decision, "output", config)
        result = self._finish_output(decision, value, output)
        if isinstance(result, _Redirect):
            return self._resolve(result, value, child, output)
        return result

    def _invoke_parallel(
        self, value: Any, prompt: str, policy: Any, child: RunnableConfig, config: RunnableConfig
    ) -> Any:
        # Sync speculation: the wrapped run goes to a worker thread while the input is checked here. A
        # thread cannot be cancelled: on a block its result is discarded and never released.
        pool = ContextThreadPoolExecutor(max_workers=1)
        try:
            future = pool.submit(self.bound.invoke, value, child)
            decision = self.guard.check(prompt, surface=Surface.PROMPT, policy=policy)
            dispatch_verdict(decision, "input", config)
            step, result = self._input_outcome(decision, value, config)
            if step == "done" or result is not value:
                future.cancel()
                if step == "done":
                    return self._resolve(result, value, child)
                output = self.bound.invoke(result, child)  # redacted input: the speculative run is stale
            else:
                output = future.result()
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        return self._check_output(value, prompt, output, policy, config, child)

    def _passing(self, kwargs: dict[str, Any]) -> GuardedRunnable:
        """This guard over ``bound.bind(**kwargs)``: call-time keyword arguments (a chat model's ``stop``, an
        agent's ``context``, a graph's ``stream_mode``) go to the wrapped runnable, as they would unguarded."""
        return self.model_copy(update={"bound": self.bound.bind(**kwargs)})

    def _check_graph_call(self, call: Literal["invoke", "stream"]) -> None:
        """Refuse the graph arguments that reshape what the output checks read (a reshaped output would go out
        unjudged) or print the graph's output before it is checked (``print_mode``, ``debug``).

        Only while the output is checked. A graph the guard cannot see (behind ``with_retry``, fallbacks, a
        sequence) gets none of these arguments: the guard cannot tell what they would do there.
        """
        if not self.check_output:
            return
        graph, kwargs = _graph_call(self.bound)
        if graph is None:
            given = sorted(k for k in _GRAPH_SHAPING if k in kwargs)
            if given:
                raise ConfigurationError(
                    f"guarded() passes {', '.join(given)} only to a LangGraph graph it wraps directly (or through "
                    f"bind/with_config); it cannot tell what they do to {self.bound.get_name()!r}'s output: guard "
                    "the graph itself, or drop them"
                )
            if _debug_graph_inside(self.bound):
                raise ConfigurationError(
                    f"guarded() cannot check {self.bound.get_name()!r}: a LangGraph graph inside it is compiled with "
                    "debug=True (it prints its output before the checks read it): compile it without debug"
                )
            return
        expected = "values" if call == "invoke" else "updates"
        mode = kwargs.get("stream_mode", "values" if call == "invoke" else None)
        if mode is None:  # LangGraph then streams the graph's own stream_mode, in invoke too
            mode = graph.stream_mode
        if mode != expected:
            hint = "use invoke()" if call == "stream" else "use stream()"
            raise ConfigurationError(
                f"guarded() {'streams' if call == 'stream' else 'invokes'} a LangGraph graph only with "
                f"stream_mode={expected!r} (this call uses {mode!r}): drop stream_mode, {hint}, or guard the agent "
                "with GuardMiddleware"
            )
        for key, allowed in (("subgraphs", False), ("version", "v1"), ("output_keys", None), ("debug", False)):
            if key in kwargs and kwargs[key] not in (allowed, None):
                raise ConfigurationError(
                    f"guarded() cannot check a LangGraph graph called with {key}={kwargs[key]!r} (it reshapes or "
                    "prints the output before the checks read it): drop it, or guard the agent with GuardMiddleware"
                )
        if getattr(graph, "debug", False) and kwargs.get("debug") is not False:
            raise ConfigurationError(
                "guarded() cannot check a LangGraph graph compiled with debug=True (it prints the output before "
                "the checks read it): compile it without debug, or pass debug=False"
            )
        if kwargs.get("print_mode"):
            raise ConfigurationError(
                f"guarded() cannot check a LangGraph graph called with print_mode={kwargs['print_mode']!r} (it "
                "prints the output before the checks read it): drop it, or guard the agent with GuardMiddleware"
            )

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        if kwargs:
            return self._passing(kwargs).invoke(input, config)
        self._check_graph_call("invoke")
        return self._call_with_config(self._invoke, input, config, run_type="chain")

    # ----------------------------------------------------------------- async

    async def _aresolve(self, result: _Redirect, value: Any, child: RunnableConfig, output: Any = None) -> Any:
        if result.route is not None:
            return await result.route.ainvoke(value, child)
        return self._blocked(result.decision, value, output)

    async def _acheck_output(
        self, value: Any, prompt: str, output: Any, policy: Any, config: RunnableConfig, child: RunnableConfig
    ) -> Any:
        if not self.check_output:
            return output
        text = extract_output_text(output, self.output_key)
        if text is None or not text.strip():
            return output
        decision = await self.guard.acheck(prompt or " ", response=text, surface=Surface.RESPONSE, policy=policy)
        await adispatch_verdict(decision, "output", config)
        result = self._finish_output(decision, value, output)
        if isinstance(result, _Redirect):
            return await self._aresolve(result, value, child, output)
        return result

    async def _ainvoke(self, value: Any, run_manager: AsyncCallbackManagerForChainRun, config: RunnableConfig) -> Any:
        policy = self._policy(config)
        child = patch_config(config, callbacks=run_manager.get_child())
        prompt = extract_input_text(value, self.input_key) if (self.check_input or self.check_output) else ""
        run_value = value
        if self.check_input:
            if self.parallel_input:
                output = await self._ainvoke_parallel(value, prompt, policy, child, config)
                if isinstance(output, _Final):
                    return output.value
                return await self._acheck_output(value, prompt, output, policy, config, child)
            decision = await self.guard.acheck(prompt, surface=Surface.PROMPT, policy=policy)
            await adispatch_verdict(decision, "input", config)
            step, result = self._input_outcome(decision, value, config)
            if step == "done":
                return await self._aresolve(result, value, child)
            run_value = result
        output = await self.bound.ainvoke(run_value, child)
        return await self._acheck_output(value, prompt, output, policy, config, child)

    async def _ainvoke_parallel(
        self, value: Any, prompt: str, policy: Any, child: RunnableConfig, config: RunnableConfig
    ) -> Any:
        """Speculative input guarding: the wrapped run starts with the check and is cancelled on a block."""
        run_task: asyncio.Task[Any] = asyncio.ensure_future(self.bound.ainvoke(value, child))
        try:
            decision = await self.guard.acheck(prompt, surface=Surface.PROMPT, policy=policy)
        except BaseException:
            run_task.cancel()
            await asyncio.gather(run_task, return_exceptions=True)
            raise
        await adispatch_verdict(decision, "input", config)
        step, result = self._input_outcome(decision, value, config)
        if step == "run" and result is value:
            return await run_task
        run_task.cancel()
        await asyncio.gather(run_task, return_exceptions=True)
        if step == "done":
            return _Final(await self._aresolve(result, value, child))
        return await self.bound.ainvoke(result, child)  # redacted input: the speculative run was stale

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        if kwargs:
            return await self._passing(kwargs).ainvoke(input, config)
        self._check_graph_call("invoke")
        return await self._acall_with_config(self._ainvoke, input, config, run_type="chain")

    # ----------------------------------------------------------------- streaming

    def _moderator(self, prompt: str, policy: Any, sample: list[Any]) -> StreamModerator[Any]:
        return StreamModerator(
            self.guard,
            prompt=prompt,
            surface=Surface.RESPONSE,
            policy=policy,
            chunk_chars=self.stream_chunk_chars,
            context_chars=self.stream_context_chars,
            first_chunk_chars=self.stream_first_chunk_chars,
            stream_first=self.stream_first,
            redact_item=lambda text: self._text_chunk(text, sample[0] if sample else None),
        )

    def _sampler(self, sample: list[Any]) -> Callable[[Any], str]:
        """The text of a streamed chunk; the first chunk is kept as the model for refusal/redaction chunks."""

        def text_of(chunk: Any) -> str:
            if not sample:
                sample.append(chunk)
            return _chunk_text(chunk, self.output_key)

        return text_of

    def _text_chunk(self, text: str, sample: Any, decision: Decision | None = None) -> Any:
        """A chunk of the wrapped stream's type carrying ``text``."""
        meta = {"flexguard": decision.to_dict()} if decision is not None else {}
        if isinstance(sample, BaseMessageChunk) or (sample is None and isinstance(self.bound, BaseChatModel)):
            return AIMessageChunk(content=text, response_metadata=meta)
        if isinstance(sample, Mapping):
            return {self.output_key or "output": text}
        return text

    def _stop_chunk(self, decision: Decision, sample: Any) -> Any:
        """The chunk that ends a stream in place of text that did not pass."""
        if self.on_block == "raise":
            raise GuardBlockedError(decision)
        return self._text_chunk(format_refusal(self.refusal, decision), sample, decision)

    def _input_refusal_chunk(self, decision: Decision, input_value: Any) -> Any:
        """The refusal a stream yields for a blocked input, as a chunk of the wrapped stream's type."""
        if self.on_block == "raise":
            raise GuardBlockedError(decision)
        if _graph_of(self.bound) is not None:
            text = format_refusal(self.refusal, decision)
            answer = AIMessage(content=text, response_metadata={"flexguard": decision.to_dict()})
            return {GUARD_NODE: {"messages": [answer]}}
        refusal = self._refusal_value(decision, input_value)
        if isinstance(refusal, AIMessage) and not isinstance(refusal, AIMessageChunk):
            return AIMessageChunk(content=refusal.content, response_metadata=refusal.response_metadata)
        return refusal

    def _stream_redirect(self, result: _Redirect, value: Any, child: RunnableConfig) -> Iterator[Any]:
        """A stream ended by an input decision: the route's own stream, else the refusal (or raise)."""
        if result.route is not None:
            yield from result.route.stream(value, child)
        else:
            yield self._input_refusal_chunk(result.decision, value)

    async def _astream_redirect(self, result: _Redirect, value: Any, child: RunnableConfig) -> AsyncIterator[Any]:
        """Async twin of :meth:`_stream_redirect`."""
        if result.route is not None:
            async for chunk in result.route.astream(value, child):
                yield chunk
        else:
            yield self._input_refusal_chunk(result.decision, value)

    def _output_moderator(self, prompt: str, policy: Any, sample: list[Any]) -> _OutputModerator | None:
        if not self.check_output:
            return None
        if _graph_of(self.bound) is None:
            return self._moderator(prompt, policy, sample)
        return _GraphUpdateModerator(self.guard, prompt, policy)

    def _released(self, moderator: _OutputModerator | None, stream: Any, sample: list[Any]) -> Any:
        if moderator is None:
            return stream
        if isinstance(moderator, _GraphUpdateModerator):
            return moderator.moderate(stream)
        return moderator.moderate(stream, self._sampler(sample))

    def _areleased(self, moderator: _OutputModerator | None, stream: Any, sample: list[Any]) -> Any:
        if moderator is None:
            return stream
        if isinstance(moderator, _GraphUpdateModerator):
            return moderator.amoderate(stream)
        return moderator.amoderate(stream, self._sampler(sample))

    def _stopped_output(self, moderator: _OutputModerator, sample: list[Any]) -> tuple[Runnable[Any, Any] | None, Any]:
        """After an output stop: (the route to stream, None) or (None, the refusal chunk); raises on "raise"."""
        decision = moderator.stopped
        assert decision is not None
        route = self._route(decision) if decision.action is Action.REROUTE else None
        if route is not None:
            return route, None
        if isinstance(moderator, _GraphUpdateModerator):
            if self.on_block == "raise":
                raise GuardBlockedError(decision)
            return None, moderator.refusal_chunk(format_refusal(self.refusal, decision), decision)
        return None, self._stop_chunk(decision, sample[0] if sample else None)

    def _stream(
        self, inputs: Iterator[Any], run_manager: CallbackManagerForChainRun, config: RunnableConfig
    ) -> Iterator[Any]:
        value = _single(inputs)
        policy = self._policy(config)
        child = patch_config(config, callbacks=run_manager.get_child())
        prompt = extract_input_text(value, self.input_key)
        run_value = value
        if self.check_input:
            if self.parallel_input:
                yield from self._stream_parallel(value, prompt, policy, child, config)
                return
            decision = self.guard.check(prompt, surface=Surface.PROMPT, policy=policy)
            dispatch_verdict(decision, "input", config)
            step, result = self._input_outcome(decision, value, config)
            if step == "done":
                yield from self._stream_redirect(result, value, child)
                return
            run_value = result
        yield from self._moderated(value, run_value, prompt, policy, child, config)

    def _moderated(
        self,
        value: Any,
        run_value: Any,
        prompt: str,
        policy: Any,
        child: RunnableConfig,
        config: RunnableConfig,
        gate: Callable[[], bool] | None = None,
    ) -> Iterator[Any]:
        """The wrapped stream, output-moderated when ``check_output``.

        ``gate`` (speculative input) is asked once, before anything is released or raised; when it says no,
        the stream ends there, silently: the caller carries out the input decision. An output REROUTE with
        a route streams ``route.stream(value)`` (the original input) after what was already released.
        """
        sample: list[Any] = []
        moderator = self._output_moderator(prompt, policy, sample)
        stream = self.bound.stream(run_value, child)
        released = self._released(moderator, stream, sample)
        dispatched = 0
        try:
            for item in released:
                if gate is not None:
                    open_, gate = gate, None
                    if not open_():
                        return
                if moderator is not None:
                    for decision in moderator.decisions[dispatched:]:
                        dispatch_verdict(decision, "stream", config)
                    dispatched = len(moderator.decisions)
                yield item
        except Exception as exc:
            if gate is not None:
                open_, gate = gate, None
                if not open_():
                    logger.info("speculative run failed after its input was refused: %r", exc)
                    return
            raise
        finally:
            close = getattr(released, "close", None)
            if close is not None:
                close()  # for a moderated stream, closes the wrapped stream too
        if gate is not None and not gate():
            return
        if moderator is not None:
            for decision in moderator.decisions[dispatched:]:
                dispatch_verdict(decision, "stream", config)
            if moderator.stopped is not None:
                route, refusal = self._stopped_output(moderator, sample)
                if route is not None:
                    yield from route.stream(value, child)
                else:
                    yield refusal

    def _stream_parallel(
        self, value: Any, prompt: str, policy: Any, child: RunnableConfig, config: RunnableConfig
    ) -> Iterator[Any]:
        """Speculative input guarding for streams: the wrapped stream starts while the input is checked (in a
        worker thread); nothing is released before the input has passed."""
        pool = ContextThreadPoolExecutor(max_workers=1)
        future = pool.submit(self.guard.check, prompt, surface=Surface.PROMPT, policy=policy)
        outcome: list[tuple[Literal["run", "done"], Any]] = []

        def gate() -> bool:
            decision = future.result()
            dispatch_verdict(decision, "input", config)
            step, result = self._input_outcome(decision, value, config)
            if step == "run" and result is value:
                return True
            outcome.append((step, result))
            return False

        try:
            yield from self._moderated(value, value, prompt, policy, child, config, gate)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        if outcome:
            step, result = outcome[0]
            if step == "done":
                yield from self._stream_redirect(result, value, child)
            else:  # redacted input: the speculative run was stale
                yield from self._moderated(value, result, prompt, policy, child, config)

    async def _astream(
        self, inputs: AsyncIterator[Any], run_manager: AsyncCallbackManagerForChainRun, config: RunnableConfig
    ) -> AsyncIterator[Any]:
        value = None
        async for item in inputs:
            value = item
        policy = self._policy(config)
        child = patch_config(config, callbacks=run_manager.get_child())
        prompt = extract_input_text(value, self.input_key)
        run_value = value
        if self.check_input:
            if self.parallel_input:
                async for chunk in self._astream_parallel(value, prompt, policy, child, config):
                    yield chunk
                return
            decision = await self.guard.acheck(prompt, surface=Surface.PROMPT, policy=policy)
            await adispatch_verdict(decision, "input", config)
            step, result = self._input_outcome(decision, value, config)
            if step == "done":
                async for chunk in self._astream_redirect(result, value, child):
                    yield chunk
                return
            run_value = result
        async for chunk in self._amoderated(value, run_value, prompt, policy, child, config):
            yield chunk

    async def _amoderated(
        self,
        value: Any,
        run_value: Any,
        prompt: str,
        policy: Any,
        child: RunnableConfig,
        config: RunnableConfig,
        gate: Callable[[], Awaitable[bool]] | None = None,
    ) -> AsyncIterator[Any]:
        """Async twin of :meth:`_moderated`."""
        sample: list[Any] = []
        moderator = self._output_moderator(prompt, policy, sample)
        stream = self.bound.astream(run_value, child)
        released = self._areleased(moderator, stream, sample)
        dispatched = 0
        try:
            async for item in released:
                if gate is not None:
                    open_, gate = gate, None
                    if not await open_():
                        return
                if moderator is not None:
                    for decision in moderator.decisions[dispatched:]:
                        await adispatch_verdict(decision, "stream", config)
                    dispatched = len(moderator.decisions)
                yield item
        except Exception as exc:
            if gate is not None:
                open_, gate = gate, None
                if not await open_():
                    logger.info("speculative run failed after its input was refused: %r", exc)
                    return
            raise
        finally:
            aclose = getattr(released, "aclose", None)
            if aclose is not None:
                await aclose()  # cancels running checks and closes the wrapped stream
        if gate is not None and not await gate():
            return
        if moderator is not None:
            for decision in moderator.decisions[dispatched:]:
                await adispatch_verdict(decision, "stream", config)
            if moderator.stopped is not None:
                route, refusal = self._stopped_output(moderator, sample)
                if route is not None:
                    async for chunk in route.astream(value, child):
                        yield chunk
                else:
                    yield refusal

    async def _astream_parallel(
        self, value: Any, prompt: str, policy: Any, child: RunnableConfig, config: RunnableConfig
    ) -> AsyncIterator[Any]:
        """Speculative input guarding for streams: the wrapped stream starts with the input check; nothing is
        released before the input has passed, and on a refusal the wrapped stream is closed (cancelled)."""
        check: asyncio.Task[Decision] = asyncio.ensure_future(
            self.guard.acheck(prompt, surface=Surface.PROMPT, policy=policy)
        )
        outcome: list[tuple[Literal["run", "done"], Any]] = []

        async def gate() -> bool:
            decision = await check
            await adispatch_verdict(decision, "input", config)
            step, result = self._input_outcome(decision, value, config)
            if step == "run" and result is value:
                return True
            outcome.append((step, result))
            return False

        try:
            async for chunk in self._amoderated(value, value, prompt, policy, child, config, gate):
                yield chunk
        finally:
            if not check.done():
                check.cancel()
                await asyncio.gather(check, return_exceptions=True)
        if outcome:
            step, result = outcome[0]
            if step == "done":
                async for chunk in self._astream_redirect(result, value, child):
                    yield chunk
            else:  # redacted input: the speculative run was stale
                async for chunk in self._amoderated(value, result, prompt, policy, child, config):
                    yield chunk

    def stream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Iterator[Any]:
        if kwargs:
            yield from self._passing(kwargs).stream(input, config)
            return
        self._check_graph_call("stream")
        yield from self._transform_stream_with_config(iter([input]), self._stream, config, run_type="chain")

    async def astream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> AsyncIterator[Any]:
        if kwargs:
            async for chunk in self._passing(kwargs).astream(input, config):
                yield chunk
            return
        self._check_graph_call("stream")

        async def one() -> AsyncIterator[Any]:
            yield input

        async for chunk in self._atransform_stream_with_config(one(), self._astream, config, run_type="chain"):
            yield chunk


@dataclass(frozen=True)
class _Redirect:
    """A decision that replaces the normal result: run ``route``, else block (raise or refuse)."""

    route: Runnable[Any, Any] | None
    decision: Decision


class _Final:
    """Marks a finished result (refusal or route output) coming out of speculative input guarding."""

    def __init__(self, value: Any) -> None:
        self.value = value


GUARD_NODE = "flexguard"
"""The node name of the update a guarded graph stream yields when the input is refused."""


def _graph_of(runnable: Runnable[Any, Any]) -> Pregel[Any, Any, Any, Any] | None:
    """The LangGraph graph behind ``runnable`` (through ``with_config``/``bind`` wrappers), or None."""
    return _graph_call(runnable)[0]


def _graph_call(runnable: Runnable[Any, Any]) -> tuple[Pregel[Any, Any, Any, Any] | None, dict[str, Any]]:
    """The LangGraph graph behind ``runnable`` (through ``bind``/``with_config`` wrappers) and the keyword
    arguments those wrappers call it with (an outer wrapper's argument overrides an inner one's, as in
    ``RunnableBinding``); (None, the arguments) when no graph is seen through them."""
    kwargs: dict[str, Any] = {}
    while isinstance(runnable, RunnableBindingBase):
        kwargs = {**runnable.kwargs, **kwargs}
        if type(runnable) is not RunnableBinding:  # with_retry & co. run the graph their own way
            return None, kwargs
        runnable = runnable.bound
    return (runnable, kwargs) if isinstance(runnable, Pregel) else (None, kwargs)


def _debug_graph_inside(runnable: Any, depth: int = 0) -> bool:
    """Whether a LangGraph graph compiled with ``debug=True`` sits inside ``runnable``, through the wrappers and
    compositions LangChain builds (bindings, retries, fallbacks, sequences, parallels)."""
    if depth > 32:
        return False
    if isinstance(runnable, Pregel):
        return bool(getattr(runnable, "debug", False))
    if isinstance(runnable, RunnableBindingBase):
        return _debug_graph_inside(runnable.bound, depth + 1)
    if isinstance(runnable, RunnableWithFallbacks):
        return any(_debug_graph_inside(r, depth + 1) for r in (runnable.runnable, *runnable.fallbacks))
    if isinstance(runnable, RunnableSequence):
        return any(_debug_graph_inside(r, depth + 1) for r in runnable.steps)
    if isinstance(runnable, RunnableParallel):
        return any(_debug_graph_inside(r, depth + 1) for r in runnable.steps__.values())
    return False


_GRAPH_SHAPING = ("stream_mode", "subgraphs", "version", "output_keys", "print_mode", "debug")
"""LangGraph call arguments that change (or print) what a graph returns: never passed blind."""


class _GraphUpdateModerator:
    """Moderates a LangGraph ``stream_mode="updates"`` stream (``{node: {"messages": [...]}}`` chunks).

    An update is released only after every AI message in it that carries text passed a response check
    (a whole message at a time: updates are not token streams). REDACT replaces the message's text (same
    id); any other decision stops the stream and closes the graph run (``stopped`` holds the decision).
    """

    def __init__(self, guard: Guard, prompt: str, policy: Any) -> None:
        self.guard = guard
        self.prompt = prompt or " "
        self.policy = policy
        self.decisions: list[Decision] = []
        self.stopped: Decision | None = None
        self._stop_at: tuple[str, Mapping[str, Any], int] | None = None

    @staticmethod
    def _messages(node: str, update: Any) -> list[BaseMessage] | None:
        if not isinstance(update, Mapping) or "messages" not in update:
            return None
        raw = update["messages"]
        try:
            return convert_to_messages(raw if isinstance(raw, list | tuple) else [raw])
        except Exception as exc:  # never release text that could not be read
            raise GuardInputError(f"cannot read the messages of the update of graph node {node!r}: {exc}") from exc

    def _pending(self, chunk: Any) -> list[tuple[str, int, str]]:
        """(node, message index, text) of every AI message with text in an update chunk."""
        if not isinstance(chunk, Mapping):
            return []
        found: list[tuple[str, int, str]] = []
        for node, update in chunk.items():
            for index, message in enumerate(self._messages(node, update) or []):
                if isinstance(message, AIMessage) and message.text.strip():
                    found.append((node, index, str(message.text)))
        return found

    def _edited(self, node: str, update: Mapping[str, Any], edits: Mapping[tuple[str, int], str]) -> dict[str, Any]:
        messages = self._messages(node, update) or []
        for (n, index), text in edits.items():
            if n == node:
                messages[index] = with_text(messages[index], text)
        return {**update, "messages": messages}

    def _apply(self, chunk: Any, checked: list[tuple[str, int, Decision]]) -> Any | None:
        """The chunk to release (redactions applied), or None when a decision stops the stream."""
        edits: dict[tuple[str, int], str] = {}
        for node, index, decision in checked:
            self.decisions.append(decision)
            if decision.action.passes:
                continue
            if decision.action is Action.REDACT and decision.redacted_text is not None:
                edits[(node, index)] = decision.redacted_text
                continue
            self.stopped = decision
            self._stop_at = (node, self._edited(node, chunk[node], edits), index)
            return None
        if not edits:
            return chunk
        nodes = {node for node, _ in edits}
        return {node: self._edited(node, u, edits) if node in nodes else u for node, u in chunk.items()}

    def refusal_chunk(self, text: str, decision: Decision) -> dict[str, Any]:
        """The stopped update, its blocked message replaced by the refusal (same id) and nothing after it."""
        assert self._stop_at is not None
        node, update, index = self._stop_at
        messages = update["messages"]
        blocked = messages[index]
        refusal = replace_output_text(blocked, text).model_copy(
            update={"response_metadata": {**blocked.response_metadata, "flexguard": decision.to_dict()}}
        )
        return {node: {**update, "messages": [*messages[:index], refusal]}}

    def moderate(self, source: Iterator[Any]) -> Iterator[Any]:
        try:
            for chunk in source:
                checked = [
                    (
                        node,
                        index,
                        self.guard.check(self.prompt, response=text, surface=Surface.RESPONSE, policy=self.policy),
                    )
                    for node, index, text in self._pending(chunk)
                ]
                released = self._apply(chunk, checked)
                if released is None:
                    return
                yield released
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    async def amoderate(self, source: AsyncIterator[Any]) -> AsyncIterator[Any]:
        try:
            async for chunk in source:
                pending = self._pending(chunk)
                decisions = await asyncio.gather(
                    *(
                        self.guard.acheck(self.prompt, response=text, surface=Surface.RESPONSE, policy=self.policy)
                        for _, _, text in pending
                    )
                )
                released = self._apply(chunk, [(n, i, d) for (n, i, _), d in zip(pending, decisions, strict=True)])
                if released is None:
                    return
                yield released
        finally:
            aclose = getattr(source, "aclose", None)
            if aclose is not None:
                await aclose()


_OutputModerator = StreamModerator[Any] | _GraphUpdateModerator


def _single(inputs: Iterator[Any]) -> Any:
    value = None
    for item in inputs:
        value = item
    return value


def _chunk_text(chunk: Any, output_key: str | None) -> str:
    """The text of a streamed chunk; a chunk of another kind (a list of documents, a model) is read as ``invoke``
    reads an output (``item_text``), never released unread."""
    if isinstance(chunk, str):
        return chunk
    if isinstance(chunk, BaseMessage):
        return str(chunk.text)
    if isinstance(chunk, Mapping):
        text = extract_output_text(chunk, output_key)
        return text or ""
    return item_text(chunk)  # a list (a retriever's documents), a model...: read as invoke() reads it


def guarded(
    runnable: Runnable[Any, Any],
    guard: Guard,
    *,
    check_input: bool = True,
    check_output: bool = True,
    on_block: OnBlock = "raise",
    refusal: str = DEFAULT_REFUSAL,
    refusal_as: RefusalAs = "auto",
    routes: Mapping[str, Runnable[Any, Any]] | None = None,
    parallel_input: bool = False,
    input_key: str | None = None,
    output_key: str | None = None,
    policy: Any = None,
    stream_chunk_chars: int = 200,
    stream_context_chars: int = 50,
    stream_first_chunk_chars: int | None = 50,
    stream_first: bool = False,
) -> GuardedRunnable:
    """Wrap any Runnable with input and output guarding.

    - ``on_block="raise"`` raises :class:`GuardBlockedError`; ``"refuse"`` answers with ``refusal`` (a
      template with ``{categories}``, ``{risk_score}``, ``{reason}``), as an AIMessage where the wrapped
      runnable deals in messages, a dict with ``output_key`` for dict chains, else a str.
    - ``routes`` maps REROUTE names to Runnables run with the original input.
    - ``parallel_input=True`` checks the input while the wrapped run starts (speculative); on a block the
      run is cancelled (async) or its result discarded (sync) and nothing it produced is released; streams
      start with the check too and yield nothing before the input has passed.
    - Streams hold text back until a check at a sentence or ``stream_chunk_chars`` boundary passed it; the
      first window is ``stream_first_chunk_chars`` (50; None: like the others), so the first token waits
      for a short check rather than a full window; ``stream_first=True`` releases text before its check
      (lower latency, leaky: documented as such).
    """
    return GuardedRunnable(
        bound=runnable,
        guard=guard,
        check_input=check_input,
        check_output=check_output,
        on_block=on_block,
        refusal=refusal,
        refusal_as=refusal_as,
        routes=dict(routes or {}),
        parallel_input=parallel_input,
        input_key=input_key,
        output_key=output_key,
        policy=policy,
        stream_chunk_chars=stream_chunk_chars,
        stream_context_chars=stream_context_chars,
        stream_first_chunk_chars=stream_first_chunk_chars,
        stream_first=stream_first,
    )
