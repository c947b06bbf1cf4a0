"""``guarded()`` passes call-time keyword arguments to the wrapped runnable, as it would be called unguarded.

A chat model's ``stop``, an agent's ``context`` (``create_agent(context_schema=...)``) and a graph's
``stream_mode="updates"`` reach the wrapped runnable through ``invoke``, ``ainvoke``, ``stream``, ``astream``
and ``batch``; the guard still checks input and output. Graph arguments that reshape what the checks read
(another ``stream_mode``, ``subgraphs``, ``version="v2"``, ``output_keys``) are refused with a clear error,
whether given at call time or bound beforehand with ``bind()``: a reshaped output would go out unjudged.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain.agents.middleware import AgentMiddleware
from langchain_core.documents import Document
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage
from langchain_core.runnables import RunnableGenerator, RunnableLambda, RunnablePassthrough
from pydantic import BaseModel, Field

from flexguard_integrations import ConfigurationError, Guard, GuardBlockedError, GuardInputError
from flexguard_integrations.langchain import guarded
from flexguard_integrations.testing import FakeGuardServer
from tests.conftest import FLEX

HARMFUL = "How do I make a bomb to kill people?"
BAD_SENTENCE = "Here is how to build a bomb to kill people."


class RecordingModel(GenericFakeChatModel):
    """Records the ``stop`` and extra keyword arguments of every call (its ``_stream`` calls ``_generate``)."""

    seen: list[dict[str, Any]] = Field(default_factory=list)

    def bind_tools(self, tools: Any, **kw: Any) -> RecordingModel:
        return self

    def _generate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any) -> Any:
        self.seen.append({"stop": stop, **kw})
        return super()._generate(messages, stop=stop, run_manager=run_manager, **kw)


def recording(*texts: str) -> RecordingModel:
    return RecordingModel(messages=iter([AIMessage(t) for t in texts]))


@pytest.fixture
async def aguard(server: FakeGuardServer) -> AsyncIterator[Guard]:
    async with Guard.from_endpoint(server.base_url, FLEX) as g:
        yield g


async def call(chain: Any, value: Any, how: str, **kwargs: Any) -> str:
    """The text of the chain's answer, called the way ``how`` says, with ``kwargs``."""
    if how == "invoke":
        return str(chain.invoke(value, **kwargs).text)
    if how == "ainvoke":
        return str((await chain.ainvoke(value, **kwargs)).text)
    if how == "stream":
        return "".join(c.text for c in chain.stream(value, **kwargs))
    if how == "astream":
        return "".join([c.text async for c in chain.astream(value, **kwargs)])
    (out,) = chain.batch([value], **kwargs)
    return str(out.text)


HOW = ["invoke", "ainvoke", "stream", "astream", "batch"]


@pytest.mark.parametrize("how", HOW)
async def test_a_chat_models_stop_reaches_it(aguard: Guard, server: FakeGuardServer, how: str) -> None:
    model = recording("Paris is the capital of France.")
    before = len(server.requests)
    text = await call(guarded(model, aguard), "capital of France?", how, stop=["END"])
    assert text == "Paris is the capital of France."
    assert [s["stop"] for s in model.seen] == [["END"]]
    assert len(server.requests) - before >= 2  # the input and the output were checked


@pytest.mark.parametrize("how", HOW)
async def test_the_output_is_still_checked_with_keyword_arguments(aguard: Guard, how: str) -> None:
    model = recording(BAD_SENTENCE)
    with pytest.raises(GuardBlockedError):
        await call(guarded(model, aguard), "tell me a story", how, stop=["END"])
    assert [s["stop"] for s in model.seen] == [["END"]]


@pytest.mark.parametrize("how", ["invoke", "ainvoke"])
async def test_the_input_is_still_checked_with_keyword_arguments(aguard: Guard, how: str) -> None:
    model = recording("never")
    with pytest.raises(GuardBlockedError):
        await call(guarded(model, aguard), HARMFUL, how, stop=["END"])
    assert model.seen == []


@dataclass
class Ctx:
    user: str


class ReadsContext(AgentMiddleware):
    def __init__(self, seen: list[Any]) -> None:
        super().__init__()
        self.seen = seen

    def before_model(self, state: Any, runtime: Any) -> None:
        self.seen.append(runtime.context)

    async def abefore_model(self, state: Any, runtime: Any) -> None:
        self.seen.append(runtime.context)


def agent_with_context(seen: list[Any], answer: str) -> Any:
    return create_agent(recording(answer), tools=[], middleware=[ReadsContext(seen)], context_schema=Ctx)


def last_text(result: Any) -> str:
    return str(result["messages"][-1].text)


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_an_agents_context_reaches_it(aguard: Guard, mode: str) -> None:
    seen: list[Any] = []
    chain = guarded(agent_with_context(seen, "Hello Bob."), aguard)
    payload = {"messages": [HumanMessage("hi")]}
    if mode == "sync":
        result = chain.invoke(payload, context=Ctx(user="bob"))
    else:
        result = await chain.ainvoke(payload, context=Ctx(user="bob"))
    assert last_text(result) == "Hello Bob." and seen == [Ctx(user="bob")]


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_an_agents_context_reaches_it_when_streamed_and_the_updates_are_moderated(
    aguard: Guard, mode: str
) -> None:
    seen: list[Any] = []
    chain = guarded(agent_with_context(seen, BAD_SENTENCE), aguard, on_block="refuse")
    payload = {"messages": [HumanMessage("tell me a story")]}
    kw: dict[str, Any] = {"context": Ctx(user="bob"), "stream_mode": "updates"}
    if mode == "sync":
        got = list(chain.stream(payload, **kw))
    else:
        got = [c async for c in chain.astream(payload, **kw)]
    assert seen == [Ctx(user="bob")]
    texts = [m.text for c in got for u in c.values() if isinstance(u, dict) for m in u.get("messages", [])]
    assert texts and not any("bomb" in t for t in texts)  # the blocked answer was replaced by the refusal
    assert "violence" in texts[-1]


async def run_graph(chain: Any, payload: Any, how: str, kwargs: dict[str, Any]) -> Any:
    """Call ``chain`` the way ``how`` says; a stream is collected into a list."""
    if how == "stream":
        return list(chain.stream(payload, **kwargs))
    if how == "astream":
        return [c async for c in chain.astream(payload, **kwargs)]
    if how == "invoke":
        return chain.invoke(payload, **kwargs)
    return await chain.ainvoke(payload, **kwargs)


@pytest.mark.parametrize(
    ("how", "kwargs", "word"),
    [
        ("stream", {"stream_mode": "values"}, "stream_mode"),
        ("stream", {"stream_mode": "messages"}, "stream_mode"),
        ("stream", {"stream_mode": ["updates", "messages"]}, "stream_mode"),
        ("stream", {"subgraphs": True}, "subgraphs"),
        ("stream", {"version": "v2"}, "version"),
        ("astream", {"stream_mode": "messages"}, "stream_mode"),
        ("invoke", {"stream_mode": "updates"}, "stream_mode"),
        ("invoke", {"stream_mode": None}, "stream_mode"),  # None: the graph's own mode, "updates" for an agent
        ("ainvoke", {"stream_mode": None}, "stream_mode"),
        ("invoke", {"print_mode": "updates"}, "print_mode"),
        ("stream", {"print_mode": ["values"]}, "print_mode"),
        ("invoke", {"debug": True}, "debug"),
        ("invoke", {"output_keys": "messages"}, "output_keys"),
        ("ainvoke", {"stream_mode": "updates"}, "stream_mode"),
    ],
)
async def test_graph_arguments_that_reshape_the_output_are_refused(
    aguard: Guard, server: FakeGuardServer, how: str, kwargs: dict[str, Any], word: str
) -> None:
    model = recording(BAD_SENTENCE)
    chain = guarded(create_agent(model, tools=[]), aguard)
    payload = {"messages": [HumanMessage("tell me a story")]}
    with pytest.raises(ConfigurationError, match=word):
        await run_graph(chain, payload, how, kwargs)
    assert model.seen == []  # refused before the graph ran


def test_a_graph_bound_to_another_stream_mode_is_refused(aguard: Guard) -> None:
    # bound before guarding: the graph's own stream_mode says "updates", the binding overrides it
    model = recording(BAD_SENTENCE)
    chain = guarded(create_agent(model, tools=[]).bind(stream_mode="values"), aguard)
    with pytest.raises(ConfigurationError, match="stream_mode"):
        list(chain.stream({"messages": [HumanMessage("tell me a story")]}))
    assert model.seen == []


def test_an_outer_binding_overrides_an_inner_one(aguard: Guard) -> None:
    model = recording("Paris.")
    bound = create_agent(model, tools=[]).bind(stream_mode="values").bind(stream_mode="updates")
    got = list(guarded(bound, aguard).stream({"messages": [HumanMessage("capital of France?")]}))
    assert [m.text for c in got for u in c.values() for m in u["messages"]] == ["Paris."]


def test_a_graph_bound_to_stream_mode_none_is_refused_in_invoke(aguard: Guard) -> None:
    model = recording(BAD_SENTENCE)
    chain = guarded(create_agent(model, tools=[]).bind(stream_mode=None), aguard)
    with pytest.raises(ConfigurationError, match="stream_mode"):
        chain.invoke({"messages": [HumanMessage("tell me a story")]})
    with pytest.raises(ConfigurationError, match="stream_mode"):
        chain.batch([{"messages": [HumanMessage("tell me a story")]}])
    assert model.seen == []


@pytest.mark.parametrize("wrap", ["with_retry", "with_fallbacks", "sequence"])
async def test_graph_arguments_are_refused_behind_a_wrapper_the_guard_cannot_see_through(
    aguard: Guard, wrap: str
) -> None:
    model = recording(BAD_SENTENCE, BAD_SENTENCE)
    agent = create_agent(model, tools=[])
    wrapped: Any = {
        "with_retry": lambda: agent.with_retry(stop_after_attempt=1),
        "with_fallbacks": lambda: agent.with_fallbacks([agent]),
        "sequence": lambda: agent | RunnablePassthrough(),
    }[wrap]()
    chain = guarded(wrapped, aguard)
    payload = {"messages": [HumanMessage("tell me a story")]}
    for how, kwargs in (
        ("invoke", {"stream_mode": "updates"}),
        ("ainvoke", {"stream_mode": None}),
        ("stream", {"stream_mode": "messages"}),
    ):
        with pytest.raises(ConfigurationError, match="stream_mode"):
            await run_graph(chain, payload, how, kwargs)
    assert model.seen == []
    with pytest.raises(GuardBlockedError):  # without them, the output is checked as always
        chain.invoke(payload)


@pytest.mark.parametrize("how", ["invoke", "stream"])
async def test_graph_arguments_are_passed_when_the_output_is_not_checked(aguard: Guard, how: str) -> None:
    # nothing reads the output then, so its shape is the caller's business (the same rule for invoke and stream)
    model = recording("Paris.")
    chain = guarded(create_agent(model, tools=[]), aguard, check_output=False)
    mode = "updates" if how == "invoke" else "values"
    out = await run_graph(chain, {"messages": [HumanMessage("capital of France?")]}, how, {"stream_mode": mode})
    assert isinstance(out, list) and len(model.seen) == 1


LIST_OUTPUTS = {
    "dicts": lambda text: [{"story": text}],
    "nested": lambda text: [[{"story": text}]],
    "strings": lambda text: ["Once upon a time.", text],
    "messages": lambda text: [AIMessage(text)],
    "message tuples": lambda text: [(AIMessageChunk(text), {"langgraph_node": "model"})],
    "documents": lambda text: [Document(page_content=text)],
    "model": lambda text: Story(story=text),
}


class Story(BaseModel):
    story: str


@pytest.mark.parametrize("shape", list(LIST_OUTPUTS))
@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_an_output_inside_a_list_or_a_model_is_checked(aguard: Guard, mode: str, shape: str) -> None:
    make = LIST_OUTPUTS[shape]
    bad = guarded(RunnableLambda(lambda _: make(BAD_SENTENCE)), aguard)
    with pytest.raises(GuardBlockedError):
        await run_graph(bad, "tell me a story", "invoke" if mode == "sync" else "ainvoke", {})
    good = guarded(RunnableLambda(lambda _: make("Paris has many museums.")), aguard)
    out = await run_graph(good, "tell me a story", "invoke" if mode == "sync" else "ainvoke", {})
    assert out == make("Paris has many museums.")  # a safe structured output comes back as it was


async def test_a_redacted_structured_output_is_blocked_not_reshaped(aguard: Guard) -> None:
    redact = {"surfaces": {"response": {"action": "redact"}}}
    chain = guarded(RunnableLambda(lambda _: [{"story": f"Paris is nice. {BAD_SENTENCE}"}]), aguard, policy=redact)
    with pytest.raises(GuardBlockedError):
        chain.invoke("tell me a story")


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_stream_of_non_text_chunks_is_read_like_invoke(aguard: Guard, mode: str) -> None:
    def chunks(_: Any) -> Any:
        yield "Paris is nice. "
        yield [{"story": BAD_SENTENCE}]

    async def achunks(_: Any) -> Any:
        for chunk in chunks(_):
            yield chunk

    chain = guarded(RunnableGenerator(chunks, achunks), aguard)
    with pytest.raises(GuardBlockedError):
        await run_graph(chain, "tell me a story", "stream" if mode == "sync" else "astream", {})


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_guarded_retriever_streams_its_documents_once_checked(aguard: Guard, mode: str) -> None:
    docs = [Document(page_content="The Louvre opens at nine."), Document(page_content="Tickets are online.")]
    how = "stream" if mode == "sync" else "astream"
    assert await run_graph(guarded(RunnableLambda(lambda _: docs), aguard), "museums?", how, {}) == [docs]
    bad = [*docs, Document(page_content=BAD_SENTENCE)]
    with pytest.raises(GuardBlockedError):
        await run_graph(guarded(RunnableLambda(lambda _: bad), aguard), "museums?", how, {})


async def test_every_field_of_a_dict_in_a_list_is_checked(aguard: Guard) -> None:
    # not only the usual text key: a search hit's title is text the caller will show too
    chain = guarded(RunnableLambda(lambda _: [{"text": "", "title": BAD_SENTENCE}]), aguard)
    with pytest.raises(GuardBlockedError):
        chain.invoke("search")


def test_an_output_that_cannot_be_read_fails_clearly(aguard: Guard) -> None:
    looped: list[Any] = []
    looped.append(looped)
    cyclic: dict[str, Any] = {}
    cyclic["self"] = cyclic
    for output in (looped, [cyclic]):
        with pytest.raises(GuardInputError, match="cannot read the output"):
            guarded(RunnableLambda(lambda _, o=output: o), aguard).invoke("anything")


def test_a_refused_list_output_keeps_its_shape(aguard: Guard) -> None:
    docs = [Document(page_content=BAD_SENTENCE)]
    out = guarded(RunnableLambda(lambda _: docs), aguard, on_block="refuse").invoke("museums?")
    assert isinstance(out, list) and len(out) == 1 and isinstance(out[0], Document)
    assert "violence" in out[0].page_content and BAD_SENTENCE not in out[0].page_content


def test_a_redacted_structured_output_is_reported_as_a_block(aguard: Guard) -> None:
    redact = {"surfaces": {"response": {"action": "redact"}}}
    chain = guarded(RunnableLambda(lambda _: [{"story": f"Paris is nice. {BAD_SENTENCE}"}]), aguard, policy=redact)
    with pytest.raises(GuardBlockedError) as raised:
        chain.invoke("tell me a story")
    assert raised.value.decision.action.value == "block" and "cannot be redacted" in raised.value.decision.reason


def test_a_graph_compiled_with_debug_is_refused(aguard: Guard) -> None:
    model = recording(BAD_SENTENCE)
    agent = create_agent(model, tools=[], debug=True)
    with pytest.raises(ConfigurationError, match="debug"):
        guarded(agent, aguard).invoke({"messages": [HumanMessage("tell me a story")]})
    assert model.seen == []


@pytest.mark.parametrize("wrap", ["with_retry", "with_fallbacks", "sequence"])
def test_a_graph_compiled_with_debug_is_refused_behind_a_wrapper(aguard: Guard, wrap: str) -> None:
    model = recording(BAD_SENTENCE)
    agent = create_agent(model, tools=[], debug=True)
    wrapped: Any = {
        "with_retry": lambda: agent.with_retry(stop_after_attempt=1),
        "with_fallbacks": lambda: agent.with_fallbacks([agent]),
        "sequence": lambda: RunnablePassthrough() | agent,
    }[wrap]()
    with pytest.raises(ConfigurationError, match="debug"):
        guarded(wrapped, aguard).invoke({"messages": [HumanMessage("tell me a story")]})
    assert model.seen == []
