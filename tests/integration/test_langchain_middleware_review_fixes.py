"""GuardMiddleware regressions from review: structured output, rerouted responses and rerouted tool results.

- A structured answer (``response_format``: the ``ToolStrategy`` tool call's arguments, the ``ProviderStrategy``
  content) is checked on the response surface, and ``structured_response`` never keeps content that did not
  pass (hold_output on and off, sync and async).
- A response rerouted to a route handler is not put back into the visible messages; the handler still gets it.
- A tool result rerouted to a handler or to human review runs its route (without running the tool again).
- ``exit_behavior="error"`` raises on a blocked tool result (what the docs now say).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain.agents.structured_output import ProviderStrategy, ToolStrategy
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command
from pydantic import BaseModel

from flexguard_integrations import Guard, GuardBlockedError
from flexguard_integrations.langchain import GuardMiddleware
from flexguard_integrations.langchain.middleware import HELD_FOR_REVIEW
from flexguard_integrations.testing import FakeGuardServer
from tests.conftest import FLEX
from tests.integration.test_langchain_middleware import (
    GREY,
    INJECTION,
    REVIEW_POLICY,
    Recorder,
    Tools,
    call,
    model,
    moderated,
    msgs,
    run,
)

BAD = "Sure. Build the bomb with explosives to kill them."  # violence in response moderation
SECRET = "explosives"  # a word of BAD that must not survive anywhere once the answer is blocked
GOOD = "Paris is the capital of France."
GREY_ANSWER = f"Sure, I will {GREY} right away."
ESCALATED = "A human agent will contact you."


class Answer(BaseModel):
    answer: str


@pytest.fixture
async def guard(server: FakeGuardServer) -> AsyncIterator[Guard]:
    async with Guard.from_endpoint(server.base_url, FLEX, cache=False) as g:
        yield g


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=[True, False], ids=["hold", "no-hold"])
def hold(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def tool_answer(text: str) -> AIMessage:
    """A ToolStrategy answer: the structured-output tool call, no text."""
    return AIMessage("", id="ai-1", tool_calls=[call("Answer", {"answer": text}, "s1")])


def provider_answer(text: str) -> AIMessage:
    return AIMessage(Answer(answer=text).model_dump_json(), id="ai-1")


def leaked(result: dict[str, Any], word: str) -> bool:
    """Whether ``word`` is anywhere in the messages (text, tool calls) or the structured response."""
    seen = [str(result.get("structured_response"))]
    for m in msgs(result):
        seen.append(m.text)
        seen.extend(str(c["args"]) for c in getattr(m, "tool_calls", []))
    return any(word in s for s in seen)


# ---------------------------------------------------------------- 1. structured output


@pytest.mark.parametrize("strategy", ["tool", "provider"])
async def test_a_harmful_structured_answer_is_checked_and_never_kept(
    guard: Guard, server: FakeGuardServer, mode: str, hold: bool, strategy: str
) -> None:
    fmt: Any = ToolStrategy(Answer) if strategy == "tool" else ProviderStrategy(Answer)
    llm = model(tool_answer(BAD) if strategy == "tool" else provider_answer(BAD), "never")
    agent = create_agent(llm, tools=[], middleware=[GuardMiddleware(guard, hold_output=hold)], response_format=fmt)
    result = await run(agent, {"messages": [HumanMessage("tell me a story")]}, mode)
    assert any(BAD in t for t in moderated(server))  # the answer reached the guard (response surface)
    assert result.get("structured_response") is None
    assert not leaked(result, SECRET)
    last = msgs(result)[-1]
    assert isinstance(last, AIMessage) and "violence" in last.text and last.tool_calls == []
    assert len(llm.calls) == 1  # the run ended with the refusal


@pytest.mark.parametrize("strategy", ["tool", "provider"])
async def test_a_benign_structured_answer_is_checked_once_and_kept(
    guard: Guard, server: FakeGuardServer, mode: str, hold: bool, strategy: str
) -> None:
    fmt: Any = ToolStrategy(Answer) if strategy == "tool" else ProviderStrategy(Answer)
    llm = model(tool_answer(GOOD) if strategy == "tool" else provider_answer(GOOD))
    agent = create_agent(llm, tools=[], middleware=[GuardMiddleware(guard, hold_output=hold)], response_format=fmt)
    result = await run(agent, {"messages": [HumanMessage("capital of France?")]}, mode)
    assert result["structured_response"] == Answer(answer=GOOD)
    assert len([t for t in moderated(server) if GOOD in t]) == 1
    assert msgs(result)[1].id == "ai-1"


@pytest.mark.parametrize("exit_behavior", ["replace", "redact"])
async def test_a_structured_answer_replaced_or_redacted_ends_the_run_without_it(
    guard: Guard, server: FakeGuardServer, mode: str, hold: bool, exit_behavior: str
) -> None:
    # ToolStrategy with no tools loops back to the model while structured_response is None: a structured
    # answer that did not pass is the final answer, so the run must end
    policy = {"surfaces": {"response": {"action": "redact"}}} if exit_behavior == "redact" else None
    behavior = "end" if exit_behavior == "redact" else "replace"
    llm = model(tool_answer(f"{GOOD} {BAD}"), "never")
    mw = GuardMiddleware(guard, hold_output=hold, policy=policy, exit_behavior=behavior)  # type: ignore[arg-type]
    agent = create_agent(llm, tools=[], middleware=[mw], response_format=ToolStrategy(Answer))
    result = await run(agent, {"messages": [HumanMessage("tell me a story")]}, mode)
    assert result.get("structured_response") is None and not leaked(result, SECRET)
    assert len(llm.calls) == 1
    assert not [m for m in msgs(result) if isinstance(m, ToolMessage)]  # no answer to a removed tool call
    if exit_behavior == "redact":
        assert "[REDACTED: VIOLENCE]" in msgs(result)[-1].text


async def test_a_structured_answer_with_exit_behavior_error_raises(guard: Guard, mode: str, hold: bool) -> None:
    agent = create_agent(
        model(tool_answer(BAD)),
        tools=[],
        middleware=[GuardMiddleware(guard, hold_output=hold, exit_behavior="error")],
        response_format=ToolStrategy(Answer),
    )
    with pytest.raises(GuardBlockedError):
        await run(agent, {"messages": [HumanMessage("tell me a story")]}, mode)


@pytest.mark.parametrize("approve", [True, False])
async def test_human_review_of_a_structured_answer(
    guard: Guard, server: FakeGuardServer, mode: str, hold: bool, approve: bool
) -> None:
    server.add_rule(GREY, score=50, categories=["PRIVACY"], mode="response")
    llm = model(tool_answer(GREY_ANSWER), "never")
    agent = create_agent(
        llm,
        tools=[],
        middleware=[GuardMiddleware(guard, policy=REVIEW_POLICY, hold_output=hold)],
        response_format=ToolStrategy(Answer),
        checkpointer=InMemorySaver(),
    )
    cfg: Any = {"configurable": {"thread_id": f"structured-review-{mode}-{hold}-{approve}"}}
    await run(agent, {"messages": [HumanMessage("send the report")]}, mode, cfg)
    paused = agent.get_state(cfg)
    assert paused.interrupts[0].value["where"] == "response" and GREY_ANSWER in paused.interrupts[0].value["text"]
    if hold:  # nothing of the answer is in the visible state while it waits
        assert paused.values.get("structured_response") is None
        assert [m.text for m in paused.values["messages"]] == ["send the report", HELD_FOR_REVIEW]
    result = await run(agent, Command(resume={"approve": approve}), mode, cfg)
    assert len(llm.calls) == 1
    if approve:
        assert result["structured_response"] == Answer(answer=GREY_ANSWER)
    else:
        assert result.get("structured_response") is None and not leaked(result, "auditors")
        assert "privacy" in msgs(result)[-1].text


# ---------------------------------------------------------------- 2. a response rerouted to a handler


async def test_a_response_rerouted_to_a_handler_is_not_put_back(
    server: FakeGuardServer, guard: Guard, mode: str, hold: bool
) -> None:
    server.add_rule(GREY, score=50, categories=["PRIVACY"], mode="response")
    policy = {"rules": [{"when": {"min_score": 41}, "then": {"reroute": "escalate"}}]}
    seen: list[tuple[Any, str]] = []

    def escalate(decision: Any, state: Any) -> dict[str, Any]:
        seen.append((decision, state["messages"][-1].text))
        return {"messages": [AIMessage(ESCALATED)], "jump_to": "end"}

    def note(decision: Any, state: Any) -> None:
        seen.append((decision, state["messages"][-1].text))

    for handler, ends in ((escalate, True), (note, False)):
        tools = Tools()
        llm = model(AIMessage(GREY_ANSWER, id="ai-1", tool_calls=[call("search", {"query": "q"}, "c1")]), "never")
        mw = GuardMiddleware(guard, policy=policy, route_handlers={"escalate": handler}, hold_output=hold)
        agent = create_agent(llm, tools=tools.all, middleware=[mw], checkpointer=InMemorySaver())
        cfg: Any = {"configurable": {"thread_id": f"route-{mode}-{hold}-{ends}"}}
        result = await run(agent, {"messages": [HumanMessage("send the report")]}, mode, cfg)
        state = agent.get_state(cfg).values
        for values in (result, state):
            assert not leaked(values, "auditors")  # the rerouted response is nowhere in the messages
        texts = [m.text for m in state["messages"]]
        if ends:
            assert texts == ["send the report", ESCALATED]
        else:  # a handler that writes nothing: the response is withheld in place (same id, no tool calls)
            assert texts[0] == "send the report" and "privacy" in texts[1] and len(texts) == 2
            assert state["messages"][1].id == "ai-1" and state["messages"][1].tool_calls == []
        assert tools.ran == [] and len(llm.calls) == 1 and state.get("flexguard_held_output") is None
    assert [(d.route, text) for d, text in seen] == [("escalate", GREY_ANSWER)] * 2  # the handler saw it


# ---------------------------------------------------------------- 3. a rerouted tool result runs its route


@pytest.mark.parametrize("speculative", [False, True], ids=["sequential", "speculative"])
async def test_a_tool_result_rerouted_to_a_handler_runs_it(guard: Guard, mode: str, speculative: bool) -> None:
    policy = {"surfaces": {"tool_result": {"action": {"reroute": "escalate"}}}}
    seen: list[Any] = []

    def escalate(decision: Any, state: Any) -> dict[str, Any]:
        seen.append((decision, [m.text for m in state["messages"] if isinstance(m, ToolMessage)]))
        return {"messages": [AIMessage(ESCALATED)], "jump_to": "end"}

    tools = Tools(search_result=INJECTION)
    llm = model(AIMessage("", tool_calls=[call("search", {"query": "x"}, "c1")]), "never")
    rec = Recorder()
    mw = GuardMiddleware(guard, policy=policy, route_handlers={"escalate": escalate}, speculative_input=speculative)
    agent = create_agent(llm, tools=tools.all, middleware=[mw])
    result = await run(agent, {"messages": [HumanMessage("search something")]}, mode, {"callbacks": [rec]})
    assert len(seen) == 1 and seen[0][0].route == "escalate" and seen[0][0].surface.value == "tool_result"
    assert seen[0][1] == [INJECTION]  # the handler gets the result
    assert msgs(result)[-1].text == ESCALATED and tools.names() == ["search"]
    # sequential: the model never read it; speculative: the call that read it was dropped, nothing of it kept
    assert all(m.text != "never" for m in msgs(result))
    if not speculative:  # (a speculative async call may be cancelled before it reached the model)
        assert len(llm.calls) == 1
    tm = next(m for m in msgs(result) if isinstance(m, ToolMessage))
    assert tm.status == "error" and INJECTION not in tm.text  # withheld in the state
    assert [e["where"] for e in rec.events if e["action"] == "reroute"] == ["tool_result"]  # one check


@pytest.mark.parametrize("approve", [True, False])
@pytest.mark.parametrize("speculative", [False, True], ids=["sequential", "speculative"])
async def test_a_tool_result_rerouted_to_human_review_is_reviewed_without_running_the_tool_again(
    guard: Guard, server: FakeGuardServer, mode: str, approve: bool, speculative: bool
) -> None:
    server.add_rule(GREY, score=50, categories=["PRIVACY"])
    tools = Tools(search_result=GREY)
    # speculative: the model node (and its model call) runs again on resume
    llm = model(AIMessage("", tool_calls=[call("search", {"query": "x"}, "c1")]), "Done.", "Done.", "Done.")
    agent = create_agent(
        llm,
        tools=tools.all,
        middleware=[GuardMiddleware(guard, policy=REVIEW_POLICY, speculative_input=speculative)],
        checkpointer=InMemorySaver(),
    )
    cfg: Any = {"configurable": {"thread_id": f"result-review-{mode}-{approve}-{speculative}"}}
    first = await run(agent, {"messages": [HumanMessage("search something")]}, mode, cfg)
    payload = first["__interrupt__"][0].value
    assert payload["where"] == "tool_result" and payload["text"] == GREY
    assert [m.text for m in first["messages"]][-1] == GREY  # waiting: no answer written from it
    result = await run(agent, Command(resume={"approve": approve}), mode, cfg)
    assert tools.names() == ["search"]  # the tool ran once, before the review
    tm = next(m for m in msgs(result) if isinstance(m, ToolMessage))
    read = " ".join(m.text for m in llm.calls[-1])
    if approve:
        assert tm.text == GREY and GREY in read
    else:
        assert tm.status == "error" and "privacy" in tm.text and GREY not in read
    assert msgs(result)[-1].text == "Done." and len([t for t in moderated(server) if t == GREY]) == 1


# ---------------------------------------------------------------- 4. exit_behavior="error" on a tool result


async def test_a_blocked_tool_result_raises_with_exit_behavior_error(guard: Guard, mode: str) -> None:
    tools = Tools(search_result=INJECTION)
    llm = model(AIMessage("", tool_calls=[call("search", {"query": "x"}, "c1")]), "never")
    agent = create_agent(llm, tools=tools.all, middleware=[GuardMiddleware(guard, exit_behavior="error")])
    with pytest.raises(GuardBlockedError):
        await run(agent, {"messages": [HumanMessage("search")]}, mode)
    assert tools.names() == ["search"] and len(llm.calls) == 1


# ---------------------------------------------------------------- 5. rerouted tool results: return_direct, parallel


def injected_search(runs: list[str], *, return_direct: bool = False) -> Any:
    """A search tool whose result is an injection naming its query (``INJECTION (a)``)."""

    @tool(return_direct=return_direct)
    def search(query: str) -> str:
        """Search the web."""
        runs.append(query)
        return f"{INJECTION} ({query})"

    return search


def two_searches() -> AIMessage:
    return AIMessage("", tool_calls=[call("search", {"query": "a"}, "c1"), call("search", {"query": "b"}, "c2")])


@pytest.mark.parametrize("route", ["escalate", "human_review"])
async def test_a_rerouted_result_of_a_return_direct_tool_is_resolved_in_the_tool_node(
    guard: Guard, mode: str, route: str
) -> None:
    # after a return_direct tool the agent ends without before_model: the result must not be left raw
    policy = {"surfaces": {"tool_result": {"action": {"reroute": route}}}}
    seen: list[Any] = []

    def escalate(decision: Any, state: Any) -> dict[str, Any]:
        seen.append((decision, [m.text for m in state["messages"] if isinstance(m, ToolMessage)]))
        return {"messages": [AIMessage(ESCALATED)], "jump_to": "end"}

    runs: list[str] = []
    llm = model(AIMessage("", tool_calls=[call("search", {"query": "a"}, "c1")]), "never")
    mw = GuardMiddleware(guard, policy=policy, route_handlers={"escalate": escalate})
    agent = create_agent(
        llm, tools=[injected_search(runs, return_direct=True)], middleware=[mw], checkpointer=InMemorySaver()
    )
    cfg: Any = {"configurable": {"thread_id": f"return-direct-{route}-{mode}"}}
    result = await run(agent, {"messages": [HumanMessage("search something")]}, mode, cfg)
    assert "__interrupt__" not in result and runs == ["a"] and len(llm.calls) == 1
    assert not leaked(result, INJECTION) and not leaked(agent.get_state(cfg).values, INJECTION)
    last = msgs(result)[-1]
    assert isinstance(last, ToolMessage) and last.status == "error"  # the run's final message, withheld
    meta = last.response_metadata["flexguard"]
    if route == "escalate":
        assert len(seen) == 1 and seen[0][0].route == "escalate" and seen[0][1] == [f"{INJECTION} (a)"]
        assert last.text == ESCALATED and meta["action"] == "reroute"  # the handler's word is the final answer
    else:  # no review in the tool node (on resume the tool would run again): withheld, and it says why
        assert meta["action"] == "block" and "return_direct" in meta["reason"]
        assert "jailbreak" in last.text and "return_direct" in last.text


async def test_a_return_direct_result_rerouted_to_review_raises_with_exit_behavior_error(
    guard: Guard, mode: str
) -> None:
    policy = {"surfaces": {"tool_result": {"action": {"reroute": "human_review"}}}}
    runs: list[str] = []
    llm = model(AIMessage("", tool_calls=[call("search", {"query": "a"}, "c1")]), "never")
    mw = GuardMiddleware(guard, policy=policy, exit_behavior="error")
    agent = create_agent(
        llm, tools=[injected_search(runs, return_direct=True)], middleware=[mw], checkpointer=InMemorySaver()
    )
    cfg: Any = {"configurable": {"thread_id": f"return-direct-error-{mode}"}}
    with pytest.raises(GuardBlockedError, match="return_direct"):
        await run(agent, {"messages": [HumanMessage("search something")]}, mode, cfg)
    assert runs == ["a"] and len(llm.calls) == 1


@pytest.mark.parametrize("ends", [False, True], ids=["goes-on", "ends"])
@pytest.mark.parametrize("speculative", [False, True], ids=["sequential", "speculative"])
async def test_parallel_tool_results_rerouted_to_a_handler_are_all_resolved(
    guard: Guard, mode: str, speculative: bool, ends: bool
) -> None:
    policy = {"surfaces": {"tool_result": {"action": {"reroute": "escalate"}}}}
    seen: list[Any] = []

    def escalate(decision: Any, state: Any) -> dict[str, Any]:
        seen.append(decision.route)
        if not ends:
            return {}
        return {"messages": [AIMessage(f"escalated {len(seen)}")], "jump_to": "end"}

    runs: list[str] = []
    llm = model(two_searches(), "Done.", "Done.", "Done.")
    mw = GuardMiddleware(guard, policy=policy, route_handlers={"escalate": escalate}, speculative_input=speculative)
    agent = create_agent(llm, tools=[injected_search(runs)], middleware=[mw])
    result = await run(agent, {"messages": [HumanMessage("search something")]}, mode)
    assert seen == ["escalate", "escalate"] and sorted(runs) == ["a", "b"]  # every result's route ran
    results = [m for m in msgs(result) if isinstance(m, ToolMessage)]
    assert len(results) == 2 and all(m.status == "error" and INJECTION not in m.text for m in results)
    # sequential: no model call read one; speculative: a call that read them was dropped (its response is
    # nowhere), and the rerun (when the run goes on) did not read them
    read = llm.calls if not speculative else llm.calls[-1:] if not ends else []
    assert all(INJECTION not in m.text for call_ in read for m in call_)
    texts = [m.text for m in msgs(result)]
    if ends:  # both handlers' messages, in order; the first jump wins (both say "end")
        assert texts[-2:] == ["escalated 1", "escalated 2"] and "Done." not in texts
    else:
        assert texts[-1] == "Done."


@pytest.mark.parametrize("answers", ["nn", "yn", "ny"])
@pytest.mark.parametrize("speculative", [False, True], ids=["sequential", "speculative"])
async def test_parallel_tool_results_under_review_each_get_their_own_answer(
    guard: Guard, mode: str, speculative: bool, answers: str
) -> None:
    # one interrupt per result, in order; nothing is marked or replaced before every review has answered
    policy = {"surfaces": {"tool_result": {"action": {"reroute": "human_review"}}}}
    runs: list[str] = []
    llm = model(two_searches(), *["Done."] * 6)
    mw = GuardMiddleware(guard, policy=policy, speculative_input=speculative)
    agent = create_agent(llm, tools=[injected_search(runs)], middleware=[mw], checkpointer=InMemorySaver())
    cfg: Any = {"configurable": {"thread_id": f"parallel-review-{mode}-{speculative}-{answers}"}}
    result = await run(agent, {"messages": [HumanMessage("search something")]}, mode, cfg)
    reviewed = []
    for answer in answers:
        (pending,) = result["__interrupt__"]
        assert pending.value["where"] == "tool_result"
        reviewed.append(pending.value["text"])
        result = await run(agent, Command(resume={"approve": answer == "y"}), mode, cfg)
    assert "__interrupt__" not in result and reviewed == [f"{INJECTION} (a)", f"{INJECTION} (b)"]
    assert sorted(runs) == ["a", "b"] and msgs(result)[-1].text == "Done."
    read = [m.text for m in llm.calls[-1] if isinstance(m, ToolMessage)]
    by_call = {m.tool_call_id: m for m in msgs(result) if isinstance(m, ToolMessage)}
    for call_id, query, answer in (("c1", "a", answers[0]), ("c2", "b", answers[1])):
        original = f"{INJECTION} ({query})"
        if answer == "y":
            assert by_call[call_id].text == original and original in read
        else:
            assert (
                by_call[call_id].status == "error" and original not in read and INJECTION not in by_call[call_id].text
            )
