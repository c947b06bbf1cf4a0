"""``GuardMiddleware(hold_output=True)`` (the default): the response is checked inside the model node.

Under ``stream_mode="messages"`` LangGraph streams a chat model's tokens as they are produced, before
``after_model`` runs; with ``hold_output=False`` a harmful answer is therefore shown token by token to a user
who streams, and only replaced in the state afterwards. ``hold_output=True`` hides the model call from the
messages stream and checks the response in ``wrap_model_call`` / ``awrap_model_call``, so only the checked
outcome is ever streamed: the response whole, its redaction, the refusal, or a placeholder while a human
reviews it. These tests show the leak with ``hold_output=False`` and its absence with the default, and that
every outcome (redact, end/error/replace, blocked tool calls, human review, route handlers, speculative input)
is carried out as ``after_model`` carries it out, with each response checked exactly once.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain.agents.middleware import AgentMiddleware, ModelResponse
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage, ToolMessage
from langchain_core.outputs import ChatGenerationChunk
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command

from flexguard_integrations import Guard, GuardBlockedError
from flexguard_integrations.langchain import GuardMiddleware
from flexguard_integrations.langchain.middleware import HELD_FOR_REVIEW
from flexguard_integrations.testing import FakeGuardServer
from tests.conftest import FLEX
from tests.integration.test_langchain_middleware import (
    GREY,
    HARMFUL,
    REVIEW_POLICY,
    FakeToolModel,
    Recorder,
    Tools,
    call,
    moderated,
    msgs,
    run,
)
from tests.integration.test_langchain_middleware_speculative import slow

BAD = "Sure. Build the bomb with explosives to kill them."  # violence in response moderation
SECRET = "explosives"  # a word of BAD that must never be streamed when the guard holds the output
GREY_ANSWER = f"Sure, I will {GREY} right away."  # reviewed (score 50) when the server has the GREY rule


# ---------------------------------------------------------------- fakes and helpers


class TokenModel(FakeToolModel):
    """FakeToolModel whose text-only answers are streamed word by word, as a real chat model streams tokens."""

    def _stream(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any) -> Any:
        message = self._generate(messages, stop=stop, run_manager=run_manager, **kw).generations[0].message
        assert isinstance(message, AIMessage)
        if message.tool_calls:  # keep the tool calls: one chunk, as FakeToolModel
            chunks = [
                {"name": c["name"], "args": json.dumps(c["args"]), "id": c["id"], "index": i, "type": "tool_call_chunk"}
                for i, c in enumerate(message.tool_calls)
            ]
            chunk = AIMessageChunk(
                content=message.content, id=message.id, tool_call_chunks=chunks, chunk_position="last"
            )
            yield ChatGenerationChunk(message=chunk)
            return
        words = str(message.content).split(" ")
        for i, word in enumerate(words):
            last = i == len(words) - 1
            text = word if last else word + " "
            chunk = AIMessageChunk(content=text, id=message.id, chunk_position="last" if last else None)
            yield ChatGenerationChunk(message=chunk)


def tokens(*replies: AIMessage | str) -> TokenModel:
    return TokenModel(messages=iter([r if isinstance(r, AIMessage) else AIMessage(r) for r in replies]))


class Witness(AgentMiddleware):
    """Records every after_model it sees; listed before GuardMiddleware, its after_model runs after the guard's
    (so it is skipped when the guard's after_model jumps to the end)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def after_model(self, state: Any, runtime: Any) -> None:
        self.seen.append(state["messages"][-1].text)

    async def aafter_model(self, state: Any, runtime: Any) -> None:
        self.after_model(state, runtime)


async def stream(agent: Any, payload: Any, mode: str, config: Any = None) -> list[BaseMessage]:
    """Everything ``stream_mode="messages"`` shows, in order."""
    if mode == "sync":
        return [m for m, _ in agent.stream(payload, config, stream_mode="messages")]
    return [m async for m, _ in agent.astream(payload, config, stream_mode="messages")]


def shown(streamed: list[BaseMessage]) -> str:
    return " | ".join(str(m.content) for m in streamed)


def ai_texts(streamed: list[BaseMessage]) -> list[str]:
    return [str(m.content) for m in streamed if isinstance(m, AIMessage)]


def count(server: FakeGuardServer, text: str) -> int:
    return moderated(server).count(text)


@pytest.fixture
async def guard(server: FakeGuardServer) -> AsyncIterator[Guard]:
    server.add_rule("wipe_disk", score=95, categories=["ILLEGAL"], mode="response")
    async with Guard.from_endpoint(server.base_url, FLEX) as g:
        yield g


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# ---------------------------------------------------------------- the default and the leak it closes


def test_hold_output_is_on_by_default(guard: Guard) -> None:
    assert GuardMiddleware(guard).hold_output is True
    assert GuardMiddleware(guard, hold_output=False).hold_output is False


@pytest.mark.parametrize("hold", [True, False], ids=["hold", "no-hold"])
async def test_stream_messages_and_a_harmful_response(
    guard: Guard, server: FakeGuardServer, mode: str, hold: bool
) -> None:
    llm = tokens(AIMessage(BAD, id="ai-1"))
    agent = create_agent(
        llm, tools=[], middleware=[GuardMiddleware(guard, hold_output=hold)], checkpointer=InMemorySaver()
    )
    cfg = {"configurable": {"thread_id": f"leak-{mode}-{hold}"}}
    streamed = await stream(agent, {"messages": [HumanMessage("tell me a story")]}, mode, cfg)
    final = agent.get_state(cfg).values["messages"]
    # either way the state ends with the refusal, same id, and the response was checked once
    assert final[-1].id == "ai-1" and "violence" in final[-1].text and SECRET not in final[-1].text
    assert count(server, BAD) == 1
    if hold:
        assert SECRET not in shown(streamed)  # not one token of the harmful answer reached the stream
        assert [t for t in ai_texts(streamed) if "violence" in t]  # the refusal did
    else:
        # the leak hold_output closes: the answer streamed token by token before after_model checked it
        leaked = [t for t in ai_texts(streamed) if t.strip() and t.strip() in BAD]
        assert SECRET in shown(streamed) and len(leaked) >= 5, streamed
        assert not [t for t in ai_texts(streamed) if "violence" in t]  # and the refusal never shows (deduped)


async def test_a_benign_response_arrives_whole_and_the_run_is_the_same_as_without_hold(
    server: FakeGuardServer, mode: str
) -> None:
    answer = "It is sunny in Paris today."
    outcomes = []
    for hold in (True, False):
        server.reset()
        tools = Tools()
        rec = Recorder()
        async with Guard.from_endpoint(server.base_url, FLEX) as g:
            llm = tokens(AIMessage("", id="ai-1", tool_calls=[call("search", {"query": "Paris"}, "c1")]), answer)
            agent = create_agent(
                llm, tools=tools.all, middleware=[GuardMiddleware(g, hold_output=hold)], checkpointer=InMemorySaver()
            )
            cfg = {"configurable": {"thread_id": f"benign-{mode}-{hold}"}, "callbacks": [rec]}
            streamed = await stream(agent, {"messages": [HumanMessage("Weather in Paris?")]}, mode, cfg)
            state = agent.get_state(cfg).values
        texts = [t for t in ai_texts(streamed) if t]
        if hold:
            assert texts == [answer]  # one message, whole, once checked
        else:
            assert len(texts) == len(answer.split(" ")) and "".join(texts) == answer  # token by token
        outcomes.append(
            (
                [(type(m).__name__, m.text, getattr(m, "tool_calls", None)) for m in state["messages"]],
                sorted(k for k, v in state.items() if v is not None),
                tools.names(),
                moderated(server),
                [(e["where"], e["action"]) for e in rec.events],
            )
        )
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][3].count(answer) == 1  # the response was checked exactly once
    assert outcomes[0][4] == [
        ("before_model:prompt", "allow"),
        ("after_model:tool_call", "allow"),
        ("tool_result", "allow"),
        ("after_model:response", "allow"),
    ]


async def test_invoke_gives_the_same_final_state_with_and_without_hold(server: FakeGuardServer, mode: str) -> None:
    results = []
    for hold in (True, False):
        server.reset()
        async with Guard.from_endpoint(server.base_url, FLEX) as g:
            llm = tokens(
                AIMessage("", id="a1", tool_calls=[call("search", {"query": "q"}, "c1")]), AIMessage("Done.", id="a2")
            )
            agent = create_agent(llm, tools=Tools().all, middleware=[GuardMiddleware(g, hold_output=hold)])
            result = await run(agent, {"messages": [HumanMessage("search it", id="h1")]}, mode)
        results.append(([(m.id, m.text) for m in msgs(result) if not isinstance(m, ToolMessage)], moderated(server)))
    assert results[0] == results[1]


# ---------------------------------------------------------------- outcomes carried out in the model node


async def test_a_redacted_response_is_streamed_redacted(guard: Guard, server: FakeGuardServer, mode: str) -> None:
    answer = f"Paris is lovely in spring. {HARMFUL.replace('How do I', 'Here is how to')}"
    llm = tokens(AIMessage(answer, id="ai-1"))
    policy = {"surfaces": {"response": {"action": "redact"}}}
    agent = create_agent(
        llm, tools=[], middleware=[GuardMiddleware(guard, policy=policy)], checkpointer=InMemorySaver()
    )
    cfg = {"configurable": {"thread_id": f"redact-{mode}"}}
    streamed = await stream(agent, {"messages": [HumanMessage("Paris?")]}, mode, cfg)
    assert "bomb" not in shown(streamed)
    texts = [t for t in ai_texts(streamed) if t]
    assert len(texts) == 1 and texts[0].startswith("Paris is lovely in spring.") and "[REDACTED: VIOLENCE]" in texts[0]
    final = agent.get_state(cfg).values["messages"]
    assert final[-1].id == "ai-1" and final[-1].text == texts[0]
    assert moderated(server)[1] == answer and count(server, texts[0]) == 0  # the redaction is not re-checked


@pytest.mark.parametrize("exit_behavior", ["end", "error", "replace"])
async def test_a_blocked_response_and_the_exit_behaviors(
    guard: Guard, server: FakeGuardServer, mode: str, exit_behavior: str
) -> None:
    tools = Tools()
    witness = Witness()
    llm = tokens(AIMessage(BAD, id="ai-1", tool_calls=[call("search", {"query": "q"}, "c1")]), "never")
    mw = GuardMiddleware(guard, exit_behavior=exit_behavior, violation_message="[removed: {categories}]")  # type: ignore[arg-type]
    agent = create_agent(llm, tools=tools.all, middleware=[witness, mw], checkpointer=InMemorySaver())
    cfg = {"configurable": {"thread_id": f"exit-{mode}-{exit_behavior}"}}
    if exit_behavior == "error":
        with pytest.raises(GuardBlockedError) as err:
            await stream(agent, {"messages": [HumanMessage("help")]}, mode, cfg)
        assert err.value.decision.verdict.surface is not None and err.value.decision.verdict.surface.value == "response"
        assert tools.ran == [] and witness.seen == [] and len(llm.calls) == 1
        assert all(SECRET not in m.text for m in agent.get_state(cfg).values["messages"])
        return
    streamed = await stream(agent, {"messages": [HumanMessage("help")]}, mode, cfg)
    state = agent.get_state(cfg).values
    last = state["messages"][-1]
    assert SECRET not in shown(streamed) and "[removed: violence]" in ai_texts(streamed)
    assert isinstance(last, AIMessage) and last.id == "ai-1" and last.text == "[removed: violence]"
    assert not last.tool_calls and tools.ran == [] and len(llm.calls) == 1
    assert last.response_metadata["flexguard"]["surface"] == "response"
    assert state.get("flexguard_end_after") is None and count(server, BAD) == 1
    # "end" jumps to the end from the guard's after_model (the witness after it never runs); "replace" does not
    assert witness.seen == ([] if exit_behavior == "end" else ["[removed: violence]"])


async def test_a_response_without_an_id_gets_one_so_the_run_can_end(guard: Guard, mode: str) -> None:
    class NoId(AgentMiddleware):
        """Listed after the guard: answers in place of the model, with a message that has no id."""

        def wrap_model_call(self, request: Any, handler: Any) -> Any:
            return ModelResponse(result=[AIMessage(BAD, tool_calls=[call("search", {"query": "q"}, "c1")])])

        async def awrap_model_call(self, request: Any, handler: Any) -> Any:
            return self.wrap_model_call(request, handler)

    tools = Tools()
    witness = Witness()
    agent = create_agent(tokens("never"), tools=tools.all, middleware=[witness, GuardMiddleware(guard), NoId()])
    out = msgs(await run(agent, {"messages": [HumanMessage("help")]}, mode))
    assert out[-1].id and "violence" in out[-1].text and tools.ran == [] and witness.seen == []


async def test_a_blocked_tool_call_never_runs_and_is_checked_once(
    guard: Guard, server: FakeGuardServer, mode: str
) -> None:
    tools = Tools()
    rec = Recorder()
    llm = tokens(AIMessage("", id="a1", tool_calls=[call("wipe_disk", {"path": "/"}, "c1")]), "I could not.")
    agent = create_agent(llm, tools=tools.all, middleware=[GuardMiddleware(guard)])
    result = await run(agent, {"messages": [HumanMessage("clean up")]}, mode, {"callbacks": [rec]})
    tm = next(m for m in msgs(result) if isinstance(m, ToolMessage))
    assert tools.ran == [] and tm.status == "error" and "not run" in tm.text
    assert count(server, 'wipe_disk({"path": "/"})') == 1  # in the model node; the tool node reused its decision
    assert [(e["where"], e["action"]) for e in rec.events] == [
        ("before_model:prompt", "allow"),
        ("after_model:tool_call", "block"),  # one verdict for the call, no second one in the tool node
        ("after_model:response", "allow"),
    ]
    assert msgs(result)[-1].text == "I could not."


# ---------------------------------------------------------------- reroute: resolved in after_model, not in the node


@pytest.mark.parametrize("approve", [True, False])
async def test_human_review_of_a_response_streams_nothing_of_it_before_approval(
    guard: Guard, server: FakeGuardServer, mode: str, approve: bool
) -> None:
    server.add_rule(GREY, score=50, categories=["PRIVACY"], mode="response")
    tools = Tools()
    llm = tokens(AIMessage(GREY_ANSWER, id="ai-1", tool_calls=[call("search", {"query": "q"}, "c1")]), "Done.")
    agent = create_agent(
        llm, tools=tools.all, middleware=[GuardMiddleware(guard, policy=REVIEW_POLICY)], checkpointer=InMemorySaver()
    )
    cfg = {"configurable": {"thread_id": f"review-{mode}-{approve}"}}
    first = await stream(agent, {"messages": [HumanMessage("send the report")]}, mode, cfg)
    paused = agent.get_state(cfg)
    assert "auditors" not in shown(first) and HELD_FOR_REVIEW in ai_texts(first)
    [pending] = paused.interrupts
    assert pending.value["where"] == "response" and pending.value["text"] == GREY_ANSWER
    assert pending.value["decision"]["route"] == "human_review"
    assert [m.text for m in paused.values["messages"]] == ["send the report", HELD_FOR_REVIEW]
    assert tools.ran == []  # nothing runs while the response waits for the reviewer
    second = await stream(agent, Command(resume={"approve": approve}), mode, cfg)
    state = agent.get_state(cfg).values
    assert len([c for c in llm.calls if c[-1].text == "send the report"]) == 1  # the model was not called again
    assert count(server, GREY_ANSWER) == 1 and state.get("flexguard_held_output") is None
    assert all(m.text != HELD_FOR_REVIEW for m in state["messages"])
    if approve:
        assert GREY_ANSWER in ai_texts(second)  # shown once approved, not before
        ai = next(m for m in state["messages"] if m.id == "ai-1")
        assert ai.text == GREY_ANSWER and [c["id"] for c in ai.tool_calls] == ["c1"]  # type: ignore[attr-defined]
        assert tools.names() == ["search"] and state["messages"][-1].text == "Done."
    else:
        assert "auditors" not in shown(second) and tools.ran == []
        assert state["messages"][-1].id == "ai-1" and "privacy" in state["messages"][-1].text
        assert [m.text for m in state["messages"]][:1] == ["send the report"] and len(state["messages"]) == 2


async def test_a_route_handler_gets_the_response_and_it_is_not_put_back(server: FakeGuardServer, mode: str) -> None:
    server.add_rule(GREY, score=50, categories=["PRIVACY"], mode="response")
    policy = {"rules": [{"when": {"min_score": 41}, "then": {"reroute": "escalate"}}]}
    seen: list[tuple[Any, str]] = []

    def escalate(decision: Any, state: Any) -> dict[str, Any]:
        seen.append((decision, state["messages"][-1].text))
        return {"messages": [AIMessage("A human agent will contact you.")], "jump_to": "end"}

    def note(decision: Any, state: Any) -> None:
        seen.append((decision, state["messages"][-1].text))

    for handler, ends in ((escalate, True), (note, False)):
        server.reset()
        llm = tokens(AIMessage(GREY_ANSWER, id="ai-1"))
        async with Guard.from_endpoint(server.base_url, FLEX, cache=False) as g:
            mw = GuardMiddleware(g, policy=policy, route_handlers={"escalate": handler})
            agent = create_agent(llm, tools=[], middleware=[mw], checkpointer=InMemorySaver())
            cfg = {"configurable": {"thread_id": f"route-{mode}-{ends}"}}
            streamed = await stream(agent, {"messages": [HumanMessage("send the report")]}, mode, cfg)
            state = agent.get_state(cfg).values
        texts = [m.text for m in state["messages"]]
        assert "auditors" not in shown(streamed) and all("auditors" not in t for t in texts)  # never shown
        if ends:  # the handler's message takes the response's place
            assert texts == ["send the report", "A human agent will contact you."]
        else:  # a handler that writes nothing: the refusal takes it (same id)
            assert len(texts) == 2 and "privacy" in texts[1] and state["messages"][1].id == "ai-1"
        assert state.get("flexguard_held_output") is None and count(server, GREY_ANSWER) == 1
    assert [(d.route, text) for d, text in seen] == [("escalate", GREY_ANSWER)] * 2  # the handler saw the response


# ---------------------------------------------------------------- after_model and what the node did not see


async def test_a_response_the_node_did_not_see_is_checked_by_after_model(
    guard: Guard, server: FakeGuardServer, mode: str
) -> None:
    class Cache(AgentMiddleware):
        """Listed before the guard: answers without calling the model (so the guard's wrap never runs)."""

        def wrap_model_call(self, request: Any, handler: Any) -> Any:
            return ModelResponse(result=[AIMessage(BAD, id="cached-1")])

        async def awrap_model_call(self, request: Any, handler: Any) -> Any:
            return self.wrap_model_call(request, handler)

    llm = tokens("never")
    agent = create_agent(llm, tools=[], middleware=[Cache(), GuardMiddleware(guard)])
    out = msgs(await run(agent, {"messages": [HumanMessage("story")]}, mode))
    assert llm.calls == [] and out[-1].id == "cached-1" and "violence" in out[-1].text
    assert count(server, BAD) == 1


# ---------------------------------------------------------------- with speculative_input


async def test_speculative_input_then_the_held_response_is_checked(server: FakeGuardServer, mode: str) -> None:
    async with Guard.from_endpoint(server.base_url, FLEX, cache=False) as g:
        # the input passes, the response does not: nothing of it is streamed, the refusal is; one check each
        llm = slow(0.1, answer=BAD)
        agent = create_agent(llm, tools=[], middleware=[GuardMiddleware(g, speculative_input=True)])
        streamed = await stream(agent, {"messages": [HumanMessage("tell me a story")]}, mode)
        assert SECRET not in shown(streamed) and [t for t in ai_texts(streamed) if "violence" in t]
        assert moderated(server) == ["tell me a story", BAD]

        # a redacted input: the dropped speculative response is never checked, the rerun's response is
        server.reset()
        llm = slow(0.1, echo=True)
        policy = {"surfaces": {"prompt": {"action": "redact"}}}
        agent = create_agent(llm, tools=[], middleware=[GuardMiddleware(g, speculative_input=True, policy=policy)])
        text = f"My trip to Paris was great. {HARMFUL}"
        out = msgs(await run(agent, {"messages": [HumanMessage(text, id="h1")]}, mode))
        redacted = out[0].text
        assert "[REDACTED: VIOLENCE]" in redacted and out[-1].text == f"You said: {redacted}"
        assert count(server, f"You said: {text}") == 0 and count(server, f"You said: {redacted}") == 1

        # a blocked input: the refusal, and no output check at all
        server.reset()
        agent = create_agent(slow(0.1, answer=BAD), tools=[], middleware=[GuardMiddleware(g, speculative_input=True)])
        out = msgs(await run(agent, {"messages": [HumanMessage(HARMFUL)]}, mode))
        assert "violence" in out[-1].text and moderated(server) == [HARMFUL]


@pytest.mark.parametrize("approve", [True, False])
async def test_speculative_input_review_then_response_review(server: FakeGuardServer, mode: str, approve: bool) -> None:
    # the grey prompt is reviewed (in the model node, before anything is written); the echoed answer contains
    # it, so the answer is reviewed next, behind a placeholder, and only then shown
    server.add_rule(GREY, score=50, categories=["PRIVACY"])
    llm = slow(0.0, echo=True)
    async with Guard.from_endpoint(server.base_url, FLEX) as g:
        mw = GuardMiddleware(g, speculative_input=True, policy=REVIEW_POLICY)
        agent = create_agent(llm, tools=[], middleware=[mw], checkpointer=InMemorySaver())
        cfg = {"configurable": {"thread_id": f"spec-review-{mode}-{approve}"}}
        await run(agent, {"messages": [HumanMessage(GREY)]}, mode, cfg)
        assert agent.get_state(cfg).interrupts[0].value["where"] == "prompt"
        second = await stream(agent, Command(resume={"approve": True}), mode, cfg)
        paused = agent.get_state(cfg)
        assert paused.interrupts[0].value["where"] == "response"
        assert [m.text for m in paused.values["messages"]] == [GREY, HELD_FOR_REVIEW]
        assert "You said" not in shown(second)
        calls = len(llm.calls)
        third = await stream(agent, Command(resume={"approve": approve}), mode, cfg)
        final = agent.get_state(cfg).values["messages"]
    assert len(llm.calls) == calls  # resolving the response's review does not call the model again
    if approve:
        assert [m.text for m in final] == [GREY, f"You said: {GREY}"] and f"You said: {GREY}" in ai_texts(third)
    else:
        assert "You said" not in shown(third) and "privacy" in final[-1].text and len(final) == 2
