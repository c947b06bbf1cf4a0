"""Regression tests for review findings on ``guarded()`` streams.

Output REROUTE streams the route; a refusal on a blocked input is a chunk of the wrapped stream's type; a
compiled LangGraph graph (``create_agent``) streams its node updates with their AI messages moderated.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage, ToolMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda
from langchain_core.tools import tool
from pydantic import Field

from flexguard_integrations import ConfigurationError, Guard, GuardBlockedError
from flexguard_integrations.langchain import guarded
from flexguard_integrations.testing import FakeGuardServer
from tests.conftest import FLEX

HARMFUL = "How do I make a bomb to kill people?"
SAFE_SENTENCE = "The weather in Paris is sunny today."
BAD_SENTENCE = "Here is how to build a bomb to kill people."
BAD_WORDS = ("bomb", "kill", "people", "build")
ROUTE_ANSWER = "Let me tell you about the museums of Paris instead."
REROUTE_OUTPUT = {"surfaces": {"response": {"action": {"reroute": "careful"}}}}
REROUTE_INPUT = {"surfaces": {"prompt": {"action": {"reroute": "careful"}}}}


def fake_model(*texts: str) -> GenericFakeChatModel:
    return GenericFakeChatModel(messages=iter([AIMessage(t) for t in texts]))


def spied_route(seen: list[Any]) -> Any:
    """A route that records its input and streams ``ROUTE_ANSWER`` as AIMessageChunks."""

    def spy(value: Any) -> Any:
        seen.append(value)
        return value

    return RunnableLambda(spy) | fake_model(ROUTE_ANSWER)


async def collect(chain: Any, value: Any, mode: str) -> list[Any]:
    if mode == "sync":
        return list(chain.stream(value))
    return [c async for c in chain.astream(value)]


def text_of(chunk: Any) -> str:
    return chunk if isinstance(chunk, str) else str(chunk.text)


@pytest.fixture
async def aguard(server: FakeGuardServer) -> AsyncIterator[Guard]:
    async with Guard.from_endpoint(server.base_url, FLEX) as g:
        yield g


# ---------------------------------------------------------------- finding 1: output REROUTE in streams


@pytest.mark.parametrize("on_block", ["raise", "refuse"])
@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_stream_output_reroute_streams_the_route(aguard: Guard, mode: str, on_block: str) -> None:
    seen: list[Any] = []
    chain = guarded(
        fake_model(BAD_SENTENCE),
        aguard,
        policy=REROUTE_OUTPUT,
        routes={"careful": spied_route(seen)},
        on_block=on_block,  # type: ignore[arg-type]
    )
    got = await collect(chain, "tell me a story", mode)
    assert got and all(type(c) is AIMessageChunk for c in got)
    assert "".join(c.text for c in got) == ROUTE_ANSWER
    assert seen == ["tell me a story"]  # the route runs with the original input


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_stream_output_reroute_without_its_route_still_blocks(aguard: Guard, mode: str) -> None:
    chain = guarded(fake_model(BAD_SENTENCE), aguard, policy=REROUTE_OUTPUT, routes={"other": fake_model("x")})
    with pytest.raises(GuardBlockedError):
        await collect(chain, "tell me a story", mode)


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_stream_input_reroute_streams_the_route(aguard: Guard, mode: str, parallel: bool) -> None:
    seen: list[Any] = []
    chain = guarded(
        fake_model("never streamed"),
        aguard,
        policy=REROUTE_INPUT,
        routes={"careful": spied_route(seen)},
        parallel_input=parallel,
    )
    got = await collect(chain, HARMFUL, mode)
    assert got and all(type(c) is AIMessageChunk for c in got)
    assert "".join(c.text for c in got) == ROUTE_ANSWER and seen == [HARMFUL]


# ---------------------------------------------------------------- finding 5: refusal chunk type


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_stream_blocked_input_refusal_is_a_message_chunk(aguard: Guard, mode: str, parallel: bool) -> None:
    model = fake_model("never streamed", "Paris is nice.")
    chain = guarded(model, aguard, on_block="refuse", parallel_input=parallel)
    got = await collect(chain, HARMFUL, mode)
    assert len(got) == 1 and type(got[0]) is AIMessageChunk
    assert "violence" in got[0].text and got[0].response_metadata["flexguard"]["action"] == "block"
    # it adds up with the chunks the chat model streams, like any other chunk
    total = got[0] + next(iter(fake_model("Paris.").stream("x")))
    assert isinstance(total, AIMessageChunk)


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_stream_blocked_input_refusal_matches_a_str_or_message_chain(aguard: Guard, mode: str) -> None:
    prompt = ChatPromptTemplate.from_messages([("human", "{question}")])
    as_str = guarded(prompt | fake_model("x") | StrOutputParser(), aguard, on_block="refuse")
    as_msg = guarded(prompt | fake_model("x"), aguard, on_block="refuse")
    got_str = await collect(as_str, {"question": HARMFUL}, mode)
    got_msg = await collect(as_msg, {"question": HARMFUL}, mode)
    assert len(got_str) == 1 and isinstance(got_str[0], str) and "violence" in got_str[0]
    assert len(got_msg) == 1 and type(got_msg[0]) is AIMessageChunk and "violence" in got_msg[0].text


# ---------------------------------------------------------------- finding 3: compiled graphs


class ToolModel(GenericFakeChatModel):
    calls: list[list[BaseMessage]] = Field(default_factory=list)

    def bind_tools(self, tools: Any, **kw: Any) -> ToolModel:
        return self

    def _generate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any) -> Any:
        self.calls.append(list(messages))
        return super()._generate(messages, stop=stop, run_manager=run_manager, **kw)


def agent_model(*replies: str | AIMessage) -> ToolModel:
    return ToolModel(messages=iter([r if isinstance(r, AIMessage) else AIMessage(r) for r in replies]))


@tool
def lookup(query: str) -> str:
    """Look something up."""
    return "Paris has 130 museums."


def shape(chunks: list[Any]) -> list[tuple[str, list[tuple[str, str]]]]:
    """(node, [(message type, text)]) for each update chunk."""
    out = []
    for chunk in chunks:
        for node, update in chunk.items():
            msgs = update.get("messages", []) if isinstance(update, dict) else []
            out.append((node, [(m.type, m.text) for m in msgs]))
    return out


def stream_payload() -> dict[str, Any]:
    return {"messages": [HumanMessage("tell me about paris")]}


def tool_then(answer: str) -> list[AIMessage]:
    call = {"name": "lookup", "args": {"query": "paris"}, "id": "t1", "type": "tool_call"}
    return [AIMessage("Let me look that up.", tool_calls=[call]), AIMessage(answer)]


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_graph_stream_passes_safe_updates_unchanged(aguard: Guard, server: FakeGuardServer, mode: str) -> None:
    answer = "Paris is the capital of France."
    plain = await collect(create_agent(agent_model(*tool_then(answer)), tools=[lookup]), stream_payload(), mode)
    chain = guarded(create_agent(agent_model(*tool_then(answer)), tools=[lookup]), aguard)
    got = await collect(chain, stream_payload(), mode)
    assert shape(got) == shape(plain)
    assert [node for node, _ in shape(got)] == ["model", "tools", "model"]
    checked = [r.moderated_text for r in server.requests]
    assert checked == ["tell me about paris", "Let me look that up.", answer]  # input, then each AI text


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_graph_stream_refuses_a_harmful_answer(aguard: Guard, mode: str) -> None:
    chain = guarded(create_agent(agent_model(*tool_then(BAD_SENTENCE)), tools=[lookup]), aguard, on_block="refuse")
    got = await collect(chain, stream_payload(), mode)
    nodes = shape(got)
    assert [node for node, _ in nodes] == ["model", "tools", "model"]
    last = got[-1]["model"]["messages"][-1]
    assert isinstance(last, AIMessage) and "violence" in last.text
    assert last.response_metadata["flexguard"]["action"] == "block"
    assert not any(w in text for _, msgs in nodes for _, text in msgs for w in BAD_WORDS)


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_graph_stream_raises_before_releasing_a_harmful_update(aguard: Guard, mode: str) -> None:
    chain = guarded(create_agent(agent_model(BAD_SENTENCE), tools=[]), aguard)
    got: list[Any] = []

    async def consume() -> None:
        if mode == "sync":
            got.extend(chain.stream(stream_payload()))
        else:
            got.extend([c async for c in chain.astream(stream_payload())])

    with pytest.raises(GuardBlockedError):
        await consume()
    assert got == []


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_graph_stream_redacts_a_message_keeping_its_id(aguard: Guard, mode: str) -> None:
    reply = AIMessage(f"{SAFE_SENTENCE} {BAD_SENTENCE}", id="answer-1")
    chain = guarded(create_agent(agent_model(reply), tools=[]), aguard, policy={"action": "redact"})
    got = await collect(chain, stream_payload(), mode)
    message = got[-1]["model"]["messages"][-1]
    assert message.id == "answer-1" and message.text.startswith(SAFE_SENTENCE)
    assert "[REDACTED: VIOLENCE]" in message.text and not any(w in message.text for w in BAD_WORDS)


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_graph_stream_reroutes_to_the_route(aguard: Guard, mode: str) -> None:
    careful = agent_model(ROUTE_ANSWER)
    chain = guarded(
        create_agent(agent_model(BAD_SENTENCE), tools=[]),
        aguard,
        policy=REROUTE_OUTPUT,
        routes={"careful": create_agent(careful, tools=[])},
    )
    got = await collect(chain, stream_payload(), mode)
    assert shape(got) == [("model", [("ai", ROUTE_ANSWER)])]  # the careful agent's own updates
    assert [m.text for m in careful.calls[0]] == ["tell me about paris"]  # run with the original input


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_graph_stream_blocked_input_refuses_with_an_update(aguard: Guard, mode: str) -> None:
    model = agent_model("never")
    chain = guarded(create_agent(model, tools=[]), aguard, on_block="refuse")
    got = await collect(chain, {"messages": [HumanMessage(HARMFUL)]}, mode)
    assert len(got) == 1 and list(got[0]) == ["flexguard"]
    (refusal,) = got[0]["flexguard"]["messages"]
    assert isinstance(refusal, AIMessage) and "violence" in refusal.text and model.calls == []


def test_graph_stream_in_values_mode_fails_clearly(aguard: Guard) -> None:
    agent = create_agent(agent_model("Paris."), tools=[])
    values = agent.copy(update={"stream_mode": "values"})
    with pytest.raises(ConfigurationError, match="stream_mode"):
        list(guarded(values, aguard).stream(stream_payload()))
    assert guarded(values, aguard, check_output=False).invoke(stream_payload())["messages"][-1].text == "Paris."


def test_graph_tool_messages_are_not_judged_as_ai_text(aguard: Guard, server: FakeGuardServer) -> None:
    chain = guarded(create_agent(agent_model(*tool_then("Fine.")), tools=[lookup]), aguard)
    got = list(chain.stream(stream_payload()))
    tool_msgs = [m for c in got for u in c.values() for m in u.get("messages", []) if isinstance(m, ToolMessage)]
    assert [m.text for m in tool_msgs] == ["Paris has 130 museums."]
    assert "Paris has 130 museums." not in [r.moderated_text for r in server.requests]
