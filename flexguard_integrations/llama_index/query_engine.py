"""``GuardedQueryEngine``: guard any query engine's question and answer.

The query is checked first (surface ``prompt``): BLOCK answers with a refusal (or raises) — a
``Response``, or for an engine that streams a ``StreamingResponse`` / ``AsyncStreamingResponse`` yielding it,
REROUTE sends it to ``fallback_engines[name]``, REDACT queries with the redacted text. The answer is then
checked against the query (surface ``response``); every decision lands in ``response.metadata
["flexguard"]``. Streaming responses hold back text that has not been checked yet (as the LangChain
integration does) and end with the refusal when a chunk is blocked (after a ``"\n\n"`` token when text
was already released).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Generator, Mapping
from typing import Any, Literal, TypeVar

from llama_index.core.base.base_query_engine import BaseQueryEngine
from llama_index.core.base.response.schema import (
    RESPONSE_TYPE,
    AsyncStreamingResponse,
    PydanticResponse,
    Response,
    StreamingResponse,
)
from llama_index.core.callbacks import CallbackManager
from llama_index.core.schema import QueryBundle, QueryType

from ..errors import GuardBlockedError, GuardInputError
from ..guard import Guard, policy_scope, scoped_policy
from ..streaming import StreamModerator, check_window_sizes
from ..verdict import Action, Decision, Surface, Verdict
from .events import emit

R = TypeVar("R")

DEFAULT_REFUSAL = "I can't answer that: it was blocked by the safety guard ({categories})."


def _refusal_text(template: str, decision: Decision) -> str:
    cats = ", ".join(c.value.lower().replace("_", " ") for c in decision.verdict.categories)
    if not cats:
        cats = "guard unavailable" if decision.verdict.error else "policy violation"
    try:
        return template.format(categories=cats, risk_score=f"{decision.verdict.risk_score:g}", reason=decision.reason)
    except (KeyError, IndexError, ValueError):
        return template


class GuardedQueryEngine(BaseQueryEngine):
    """Wrap a query engine with query and answer checks (sync, async and streaming)."""

    def __init__(
        self,
        query_engine: BaseQueryEngine,
        guard: Guard,
        *,
        fallback_engines: Mapping[str, BaseQueryEngine] | None = None,
        check_query: bool = True,
        check_response: bool = True,
        on_block: Literal["refuse", "raise"] = "refuse",
        refusal: str = DEFAULT_REFUSAL,
        policy: Any = None,
        stream_chunk_chars: int = 200,
        stream_context_chars: int = 50,
        stream_first_chunk_chars: int | None = 50,
        streaming: bool | None = None,
        callback_manager: CallbackManager | None = None,
    ) -> None:
        check_window_sizes(stream_chunk_chars, stream_first_chunk_chars, prefix="stream_")
        self.query_engine = query_engine
        self.guard = guard
        self.fallback_engines = dict(fallback_engines or {})
        self.check_query = check_query
        self.check_response = check_response
        self.on_block = on_block
        self.refusal = refusal
        self.policy = policy
        self.stream_chunk_chars = stream_chunk_chars
        self.stream_context_chars = stream_context_chars
        self.stream_first_chunk_chars = stream_first_chunk_chars
        self.streaming = streaming
        super().__init__(callback_manager or getattr(query_engine, "callback_manager", None))

    def _get_prompt_modules(self) -> dict[str, Any]:
        return {"query_engine": self.query_engine}

    @property
    def _policy(self) -> Any:
        return scoped_policy(self.policy)

    def query(self, str_or_query_bundle: QueryType, policy: Any = None) -> RESPONSE_TYPE:
        """Query with both checks; ``policy=`` overrides the policy for this call only."""
        with policy_scope(policy) if policy is not None else contextlib.nullcontext():
            return super().query(str_or_query_bundle)

    async def aquery(self, str_or_query_bundle: QueryType, policy: Any = None) -> RESPONSE_TYPE:
        """Async twin of :meth:`query`."""
        with policy_scope(policy) if policy is not None else contextlib.nullcontext():
            return await super().aquery(str_or_query_bundle)

    def _check_answer(self, query: str, text: str) -> Decision:
        try:
            return self.guard.check(query, response=text, surface=Surface.RESPONSE, policy=self._policy)
        except GuardInputError as exc:  # an answer too large to check is not released unchecked
            return self._failed(exc)

    async def _acheck_answer(self, query: str, text: str) -> Decision:
        try:
            return await self.guard.acheck(query, response=text, surface=Surface.RESPONSE, policy=self._policy)
        except GuardInputError as exc:
            return self._failed(exc)

    def _failed(self, exc: GuardInputError) -> Decision:
        policy = self.guard._resolve_policy(self._policy)
        return policy.decide(Verdict.failed(str(exc), surface=Surface.RESPONSE), Surface.RESPONSE)

    # ----------------------------------------------------------------- decisions

    @property
    def streams(self) -> bool:
        """Whether the wrapped engine answers with a stream: ``streaming=`` if given, else read from the engine.

        Read from its response synthesizer (``as_query_engine(streaming=True)``), its own ``_streaming``
        flag, or a wrapped GuardedQueryEngine; an engine that says nothing counts as not streaming.
        """
        if self.streaming is not None:
            return self.streaming
        return _engine_streams(self.query_engine)

    def _refuse(self, decision: Decision, decisions: dict[str, Any]) -> Response:
        if self.on_block == "raise":
            raise GuardBlockedError(decision)
        return Response(
            response=_refusal_text(self.refusal, decision), source_nodes=[], metadata={"flexguard": decisions}
        )

    def _refuse_query(self, decision: Decision, decisions: dict[str, Any], *, is_async: bool) -> RESPONSE_TYPE:
        """The refusal of a query, in the response type the wrapped engine answers with."""
        refusal = self._refuse(decision, decisions)
        if not self.streams:
            return refusal
        text = refusal.response or ""
        if is_async:

            async def agen() -> AsyncGenerator[str, None]:
                yield text

            return AsyncStreamingResponse(response_gen=agen(), source_nodes=[], metadata=refusal.metadata)

        def gen() -> Generator[str, None, None]:
            yield text

        return StreamingResponse(response_gen=gen(), source_nodes=[], metadata=refusal.metadata)

    def _query_plan(self, bundle: QueryBundle, decision: Decision) -> tuple[str, Any]:
        """("run", bundle) to query, ("route", engine) for a fallback, or ("refuse", None)."""
        if decision.action.passes:
            return "run", bundle
        if decision.action is Action.REDACT and decision.redacted_text is not None:
            return "run", QueryBundle(query_str=decision.redacted_text, custom_embedding_strs=[decision.redacted_text])
        if decision.action is Action.REROUTE and decision.route in self.fallback_engines:
            return "route", self.fallback_engines[decision.route]
        return "refuse", None

    @staticmethod
    def _text_of(response: Any) -> str | None:
        if isinstance(response, Response):
            return response.response or ""
        if isinstance(response, PydanticResponse):
            return response.response.model_dump_json() if response.response is not None else ""
        return None

    def _finish(self, response: Any, decision: Decision, decisions: dict[str, Any]) -> Any:
        decisions["response"] = decision.to_dict()
        if decision.action.passes:
            return _with_metadata(response, decisions)
        if decision.action is Action.REDACT and decision.redacted_text is not None and isinstance(response, Response):
            response.response = decision.redacted_text
            return _with_metadata(response, decisions)
        return self._refuse(decision, decisions)

    def _moderator(self, query: str, decisions: dict[str, Any]) -> StreamModerator[str]:
        def record(decision: Decision) -> None:
            emit(decision, "query_engine:stream")
            decisions["response"] = decision.to_dict()
            decisions["stream_checks"] = decisions.get("stream_checks", 0) + 1

        return StreamModerator(
            self.guard,
            prompt=query,
            surface=Surface.RESPONSE,
            policy=self._policy,
            chunk_chars=self.stream_chunk_chars,
            context_chars=self.stream_context_chars,
            first_chunk_chars=self.stream_first_chunk_chars,
            redact_item=lambda text: text,
            on_decision=record,
        )

    def _stop_text(self, decision: Decision) -> str:
        if self.on_block == "raise":
            raise GuardBlockedError(decision)
        return _refusal_text(self.refusal, decision)

    # ----------------------------------------------------------------- sync

    def _query(self, query_bundle: QueryBundle) -> RESPONSE_TYPE:
        decisions: dict[str, Any] = {}
        engine, bundle = self.query_engine, query_bundle
        if self.check_query:
            decision = self.guard.check(query_bundle.query_str, surface=Surface.PROMPT, policy=self._policy)
            emit(decision, "query_engine:query")
            decisions["query"] = decision.to_dict()
            step, target = self._query_plan(query_bundle, decision)
            if step == "refuse":
                return self._refuse_query(decision, decisions, is_async=False)
            if step == "route":
                engine = target
            else:
                bundle = target
        response = engine.query(bundle)
        if not self.check_response:
            return _with_metadata(response, decisions)
        if isinstance(response, StreamingResponse):
            return self._guard_stream(response, query_bundle.query_str, decisions)
        text = self._text_of(response)
        if not text or not text.strip():
            return _with_metadata(response, decisions)
        decision = self._check_answer(query_bundle.query_str, text)
        emit(decision, "query_engine:response")
        return self._finish(response, decision, decisions)  # type: ignore[no-any-return]

    def _guard_stream(self, response: StreamingResponse, query: str, decisions: dict[str, Any]) -> StreamingResponse:
        moderator = self._moderator(query, decisions)
        source = response.response_gen

        def gen() -> Generator[str, None, None]:
            released = moderator.moderate(source, str)
            tail = ""
            try:
                for token in released:
                    tail = _tail(tail, token)
                    yield token
            finally:
                released.close()
            if moderator.stopped is not None:
                refusal = self._stop_text(moderator.stopped)
                if separator := _separator(tail):
                    yield separator
                yield refusal

        return StreamingResponse(
            response_gen=gen(), source_nodes=response.source_nodes, metadata=_merged(response.metadata, decisions)
        )

    # ----------------------------------------------------------------- async

    async def _aquery(self, query_bundle: QueryBundle) -> RESPONSE_TYPE:
        decisions: dict[str, Any] = {}
        engine, bundle = self.query_engine, query_bundle
        if self.check_query:
            decision = await self.guard.acheck(query_bundle.query_str, surface=Surface.PROMPT, policy=self._policy)
            emit(decision, "query_engine:query")
            decisions["query"] = decision.to_dict()
            step, target = self._query_plan(query_bundle, decision)
            if step == "refuse":
                return self._refuse_query(decision, decisions, is_async=True)
            if step == "route":
                engine = target
            else:
                bundle = target
        response = await engine.aquery(bundle)
        if not self.check_response:
            return _with_metadata(response, decisions)
        if isinstance(response, AsyncStreamingResponse):
            return self._aguard_stream(response, query_bundle.query_str, decisions)
        if isinstance(response, StreamingResponse):
            return self._guard_stream(response, query_bundle.query_str, decisions)
        text = self._text_of(response)
        if not text or not text.strip():
            return _with_metadata(response, decisions)
        decision = await self._acheck_answer(query_bundle.query_str, text)
        emit(decision, "query_engine:response")
        return self._finish(response, decision, decisions)  # type: ignore[no-any-return]

    def _aguard_stream(
        self, response: AsyncStreamingResponse, query: str, decisions: dict[str, Any]
    ) -> AsyncStreamingResponse:
        moderator = self._moderator(query, decisions)
        source = response.async_response_gen()

        async def gen() -> AsyncGenerator[str, None]:
            released = moderator.amoderate(source, str)
            tail = ""
            try:
                async for token in released:
                    tail = _tail(tail, token)
                    yield token
            finally:
                await released.aclose()
            if moderator.stopped is not None:
                refusal = self._stop_text(moderator.stopped)
                if separator := _separator(tail):
                    yield separator
                yield refusal

        return AsyncStreamingResponse(
            response_gen=gen(), source_nodes=response.source_nodes, metadata=_merged(response.metadata, decisions)
        )


STREAM_REFUSAL_SEPARATOR = "\n\n"


def _tail(tail: str, token: str) -> str:
    """The last two characters of the released text, after ``token``."""
    return (tail + token)[-2:]


def _separator(tail: str) -> str:
    """What goes between released text ending in ``tail`` and the refusal that stops the stream.

    Nothing when no text was released; otherwise a paragraph break (the part of one the text does not end
    with already), so the refusal never reads as the end of a cut-off sentence.
    """
    if not tail:
        return ""
    if tail.endswith(STREAM_REFUSAL_SEPARATOR):
        return ""
    return "\n" if tail.endswith("\n") else STREAM_REFUSAL_SEPARATOR


def _engine_streams(engine: Any) -> bool:
    """True when ``engine`` is known to answer with a stream (see :attr:`GuardedQueryEngine.streams`)."""
    if isinstance(engine, GuardedQueryEngine):
        return engine.streams
    for owner in (engine, getattr(engine, "_response_synthesizer", None)):
        flag = getattr(owner, "_streaming", None)
        if isinstance(flag, bool):
            return flag
    return False


def _merged(metadata: dict[str, Any] | None, decisions: dict[str, Any]) -> dict[str, Any]:
    merged = dict(metadata or {})
    merged["flexguard"] = decisions
    return merged


def _with_metadata(response: R, decisions: dict[str, Any]) -> R:
    if hasattr(response, "metadata"):
        response.metadata = _merged(response.metadata, decisions)
    return response
