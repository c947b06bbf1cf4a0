"""GuardMiddleware regressions from review: structured output, rerouted responses and rerouted tool results.

- A structured answer (``response_format``: the ``ToolStrategy`` tool call's arguments, the ``ProviderStrategy``
  content) is checked on the response surface, and ``structured_response`` never keeps content that did not
  pass (hold_output on and off, sync and async).
- A response rerouted to a route handler is not put back into the visible messages; the handler still gets it.
- A tool result rerouted to a handler or to human review runs its route (without running the tool again).
- ``exit_behavior="error"`` raises on a blocked tool result (what the docs now say).
- The end-of-run backstop (``after_agent``): a tool result still unresolved when the run ends without the
  middleware's ``before_model`` (a tool turned ``return_direct`` by another middleware, a tool registered at
  runtime, another middleware ending the run) is withheld, or checked then; a safe run is unchanged.
- A non-error ToolMessage of a registered tool (a human-in-the-loop ``respond``) is not a structured answer.
- The backstop never takes the model node's structured-answer ToolMessage for a tool result, checks a result never
  checked even when another middleware answered after it (but leaves earlier turns alone), and cancels its other
  checks when one fails.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any, NotRequired
from unittest.mock import patch

import pytest
from langchain.agents import AgentState, create_agent
from langchain.agents.middleware import (
    AgentMiddleware,
    HumanInTheLoopMiddleware,
    ModelCallLimitMiddleware,
    ModelResponse,
    hook_config,
)
from langchain.agents.structured_output import ProviderStrategy, ToolStrategy
from langchain_core.messages import AIMessage, HumanMessage, RemoveMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.tools import InjectedToolCallId, tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command
from pydantic import BaseModel, Field

from flexguard_integrations import Guard, GuardBlockedError
from flexguard_integrations.langchain import GuardMiddleware
from flexguard_integrations.langchain.middleware import HELD_FOR_REVIEW, RUN_ENDED_NO_ROUTE
from flexguard_integrations.testing import FakeGuardServer
from tests.conftest import FLEX
from tests.integration.test_langchain_middleware import (
    GREY,
    INJECTION,
    REVIEW_POLICY,
    SAFE_RESULT,
    FakeToolModel,
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
    # the tool node stored their (reroute) decisions: no model call read one, not even a dropped speculative one
    # (with speculative_input the known reroutes are resolved before the model call starts)
    assert all(INJECTION not in m.text for call_ in llm.calls for m in call_)
    assert len(llm.calls) == (1 if ends else 2)
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


# ---------------------------------------------------------------- 6. a tool that returns a Command


def command_lookup(
    runs: list[str], text: str, *, return_direct: bool = False, extra: Any = None, as_dict: bool = False
) -> Any:
    """A tool that answers with a ``Command`` whose update carries its ToolMessage (and ``extra`` messages);
    ``as_dict``: the ToolMessage as a message dict."""

    @tool(return_direct=return_direct)
    def lookup(query: str, tool_call_id: Annotated[str, InjectedToolCallId]) -> Command:
        """Look something up."""
        runs.append(query)
        result: Any = ToolMessage(text, tool_call_id=tool_call_id, name="lookup")
        if as_dict:
            result = {"role": "tool", "content": text, "tool_call_id": tool_call_id}
        return Command(update={"messages": [result, *(extra or [])]})

    return lookup


@pytest.mark.parametrize("as_dict", [False, True], ids=["message", "dict"])
@pytest.mark.parametrize("return_direct", [True, False], ids=["return-direct", "ordinary"])
async def test_a_tool_result_inside_a_command_is_checked(
    guard: Guard, mode: str, return_direct: bool, as_dict: bool
) -> None:
    runs: list[str] = []
    llm = model(AIMessage("", tool_calls=[call("lookup", {"query": "a"}, "c1")]), "Done.")
    tools = [command_lookup(runs, INJECTION, return_direct=return_direct, as_dict=as_dict)]
    agent = create_agent(llm, tools=tools, middleware=[GuardMiddleware(guard)])
    rec = Recorder()
    result = await run(agent, {"messages": [HumanMessage("look it up")]}, mode, {"callbacks": [rec]})
    assert runs == ["a"] and not leaked(result, INJECTION)
    assert all(INJECTION not in m.text for call_ in llm.calls for m in call_)
    tm = next(m for m in msgs(result) if isinstance(m, ToolMessage))
    assert tm.status == "error" and "jailbreak" in tm.text
    assert [e["where"] for e in rec.events if e["action"] == "block"] == ["tool_result"]  # checked once
    if return_direct:  # the withheld result is the run's final message
        assert msgs(result)[-1].text == tm.text and len(llm.calls) == 1
    else:
        assert msgs(result)[-1].text == "Done." and len(llm.calls) == 2


async def test_a_command_result_is_redacted_and_its_other_messages_are_checked(
    guard: Guard, server: FakeGuardServer, mode: str
) -> None:
    server.add_rule("explosives", score=90, categories=["VIOLENCE"])
    policy = {"surfaces": {"tool_result": {"action": "redact"}}}
    runs: list[str] = []
    note = AIMessage(f"Note: {BAD}")  # a message the tool writes besides its result: read by user and model
    llm = model(AIMessage("", tool_calls=[call("lookup", {"query": "a"}, "c1")]), "Done.")
    tools = [command_lookup(runs, f"{GOOD} {BAD}", return_direct=True, extra=[note])]
    agent = create_agent(llm, tools=tools, middleware=[GuardMiddleware(guard, policy=policy)])
    result = await run(agent, {"messages": [HumanMessage("look it up")]}, mode)
    assert runs == ["a"] and not leaked(result, SECRET)
    tm = next(m for m in msgs(result) if isinstance(m, ToolMessage))
    assert GOOD in tm.text and "[REDACTED" in tm.text


@pytest.mark.parametrize("route", ["escalate", "human_review"])
async def test_a_rerouted_command_result_of_a_return_direct_tool_is_resolved(
    guard: Guard, mode: str, route: str
) -> None:
    policy = {"surfaces": {"tool_result": {"action": {"reroute": route}}}}
    seen: list[Any] = []

    def escalate(decision: Any, state: Any) -> dict[str, Any]:
        seen.append(state["messages"][-1].text)
        return {"content": ESCALATED}

    runs: list[str] = []
    llm = model(AIMessage("", tool_calls=[call("lookup", {"query": "a"}, "c1")]), "never")
    mw = GuardMiddleware(guard, policy=policy, route_handlers={"escalate": escalate})
    tools = [command_lookup(runs, INJECTION, return_direct=True)]
    agent = create_agent(llm, tools=tools, middleware=[mw], checkpointer=InMemorySaver())
    cfg: Any = {"configurable": {"thread_id": f"command-return-direct-{route}-{mode}"}}
    result = await run(agent, {"messages": [HumanMessage("look it up")]}, mode, cfg)
    assert "__interrupt__" not in result and runs == ["a"] and len(llm.calls) == 1
    assert not leaked(result, INJECTION) and not leaked(agent.get_state(cfg).values, INJECTION)
    last = msgs(result)[-1]
    assert isinstance(last, ToolMessage) and last.status == "error"
    if route == "escalate":
        assert seen == [INJECTION] and last.text == ESCALATED
    else:
        assert "return_direct" in last.text


async def test_a_tool_result_of_an_unknown_shape_is_withheld(guard: Guard, mode: str) -> None:
    class Raw(AgentMiddleware):  # an inner wrapper that answers with something that is not a ToolMessage
        def wrap_tool_call(self, request: Any, handler: Any) -> Any:
            handler(request)
            return [ToolMessage(INJECTION, tool_call_id="c1", name="search"), {"content": INJECTION}]

        async def awrap_tool_call(self, request: Any, handler: Any) -> Any:
            await handler(request)
            return [ToolMessage(INJECTION, tool_call_id="c1", name="search"), {"content": INJECTION}]

    tools = Tools(search_result=SAFE_RESULT)
    llm = model(AIMessage("", tool_calls=[call("search", {"query": "a"}, "c1")]), "Done.")
    agent = create_agent(llm, tools=tools.all, middleware=[GuardMiddleware(guard), Raw()])
    result = await run(agent, {"messages": [HumanMessage("look it up")]}, mode)
    assert not leaked(result, INJECTION) and all(INJECTION not in m.text for c in llm.calls for m in c)
    tm = next(m for m in msgs(result) if isinstance(m, ToolMessage))
    assert tm.status == "error" and tm.tool_call_id == "c1" and msgs(result)[-1].text == "Done."


# ---------------------------------------------------------------- 7. return_direct next to an ordinary tool


def lookup_and_weather(runs: list[str]) -> list[Any]:
    @tool(return_direct=True)
    def lookup(query: str) -> str:
        """Look something up."""
        runs.append("lookup")
        return f"{INJECTION} (lookup)"

    @tool
    def weather(city: str) -> str:
        """The weather."""
        runs.append("weather")
        return SAFE_RESULT

    return [lookup, weather]


def lookup_and_weather_calls() -> AIMessage:
    return AIMessage("", tool_calls=[call("lookup", {"query": "a"}, "c1"), call("weather", {"city": "x"}, "c2")])


async def test_a_return_direct_result_next_to_an_ordinary_call_is_withheld_in_the_tool_node(
    guard: Guard, mode: str
) -> None:
    """A return_direct tool's rerouted result is resolved in the tool node even when the step also has an
    ordinary call (LangChain then goes back to the model): whether the run ends depends on the other tools'
    flags, which the tool node cannot know without state kept across agents and checkpoints. Human review
    is not available there, so the result is withheld, and the model never reads it."""
    policy = {"surfaces": {"tool_result": {"action": {"reroute": "human_review"}}}}
    runs: list[str] = []
    llm = model(lookup_and_weather_calls(), "Done.")
    mw = GuardMiddleware(guard, policy=policy)
    agent = create_agent(llm, tools=lookup_and_weather(runs), middleware=[mw], checkpointer=InMemorySaver())
    cfg: Any = {"configurable": {"thread_id": f"mixed-review-{mode}"}}
    result = await run(agent, {"messages": [HumanMessage("look it up")]}, mode, cfg)
    assert "__interrupt__" not in result
    assert sorted(runs) == ["lookup", "weather"] and msgs(result)[-1].text == "Done." and len(llm.calls) == 2
    c1 = next(m for m in msgs(result) if isinstance(m, ToolMessage) and m.tool_call_id == "c1")
    assert c1.status == "error" and "return_direct" in c1.text
    assert INJECTION not in " ".join(m.text for m in llm.calls[-1])


async def test_a_return_direct_result_next_to_an_ordinary_call_runs_its_handler_in_the_tool_node(
    guard: Guard, mode: str
) -> None:
    policy = {"surfaces": {"tool_result": {"action": {"reroute": "escalate"}}}}
    seen: list[str] = []

    def escalate(decision: Any, state: Any) -> dict[str, Any]:
        seen.append(decision.route)
        return {"messages": [AIMessage(ESCALATED)], "jump_to": "end"}

    runs: list[str] = []
    llm = model(lookup_and_weather_calls(), "Done.")
    mw = GuardMiddleware(guard, policy=policy, route_handlers={"escalate": escalate})
    agent = create_agent(llm, tools=lookup_and_weather(runs), middleware=[mw])
    result = await run(agent, {"messages": [HumanMessage("look it up")]}, mode)
    # the handler ran (a tool node cannot jump: the model answers after the withheld result)
    assert seen == ["escalate"] and len(llm.calls) == 2
    assert INJECTION not in " ".join(m.text for m in llm.calls[-1])
    assert not leaked(result, INJECTION)


async def test_one_middleware_shared_by_agents_never_lets_a_rerouted_return_direct_result_through(
    guard: Guard, mode: str
) -> None:
    """The middleware keeps no per-tool flags. Here a worker's middleware first serves agent X, whose ``weather``
    is an ordinary tool, then resumes agent Y's checkpoint (paused by a tool-call approval on another worker)
    straight into Y's tool node, where ``lookup`` and ``weather`` are both return_direct: the run ends after
    the tool step, so a rerouted ``lookup`` result deferred to a model step would end the run raw."""
    from langchain.agents.middleware import HumanInTheLoopMiddleware

    policy = {"surfaces": {"tool_result": {"action": {"reroute": "human_review"}}}}

    @tool
    def weather(city: str) -> str:
        """The weather."""
        return SAFE_RESULT

    @tool("weather", return_direct=True)
    def weather_direct(city: str) -> str:
        """The weather."""
        return SAFE_RESULT

    runs: list[str] = []
    lookup = next(t for t in lookup_and_weather(runs) if t.name == "lookup")  # return_direct
    saver, cfg = InMemorySaver(), {"configurable": {"thread_id": f"shared-{mode}"}}
    llm = model(lookup_and_weather_calls(), "MODEL RAN AGAIN")

    def agent_y(mw: GuardMiddleware) -> Any:
        hitl = HumanInTheLoopMiddleware({"weather": True})
        return create_agent(llm, tools=[lookup, weather_direct], middleware=[mw, hitl], checkpointer=saver)

    paused = await run(agent_y(GuardMiddleware(guard, policy=policy)), {"messages": [HumanMessage("a")]}, mode, cfg)
    assert "__interrupt__" in paused  # worker 1: Y waits for the approval of its tool calls
    shared = GuardMiddleware(guard, policy=policy)  # worker 2
    x = create_agent(model("Hello."), tools=[weather], middleware=[shared])
    assert msgs(await run(x, {"messages": [HumanMessage("hi")]}, mode))[-1].text == "Hello."
    result = await run(agent_y(shared), Command(resume={"decisions": [{"type": "approve"}]}), mode, cfg)
    assert runs == ["lookup"] and len(llm.calls) == 1  # every tool return_direct: the run ended after them
    assert not leaked(result, INJECTION)
    c1 = next(m for m in msgs(result) if isinstance(m, ToolMessage) and m.tool_call_id == "c1")
    assert c1.status == "error" and "return_direct" in c1.text


@pytest.mark.parametrize("route", ["human_review", "escalate"])
async def test_a_rerouted_result_in_a_step_that_answers_with_structured_output_is_resolved_in_the_tool_node(
    guard: Guard, mode: str, route: str
) -> None:
    """The model calls a tool and the structured-output tool together: LangChain ends after that step (a
    structured answer was given), so no model step follows in which to route the tool's result."""
    policy = {"surfaces": {"tool_result": {"action": {"reroute": route}}}}
    handled: list[str] = []

    def escalate(decision: Any, state: Any) -> dict[str, Any]:
        handled.append(decision.route)
        return {"messages": [AIMessage(ESCALATED)], "jump_to": "end"}

    tools = Tools(search_result=INJECTION)
    calls = [call("search", {"query": "a"}, "c1"), call("Answer", {"answer": "ok"}, "c2")]
    llm = model(AIMessage("", tool_calls=calls), "MODEL RAN AGAIN")
    mw = GuardMiddleware(guard, policy=policy, route_handlers={"escalate": escalate})
    agent = create_agent(
        llm, tools=tools.all, response_format=ToolStrategy(Answer), middleware=[mw], checkpointer=InMemorySaver()
    )
    cfg: Any = {"configurable": {"thread_id": f"structured-step-{route}-{mode}"}}
    result = await run(agent, {"messages": [HumanMessage("look it up")]}, mode, cfg)
    assert "__interrupt__" not in result and len(llm.calls) == 1
    assert not leaked(result, INJECTION)
    c1 = next(m for m in msgs(result) if isinstance(m, ToolMessage) and m.tool_call_id == "c1")
    assert c1.status == "error"
    assert handled == (["escalate"] if route == "escalate" else [])


# ---------------------------------------------------------------- 8. review answers are strict


REJECTIONS: list[Any] = [
    {"approve": "false"},
    {"approve": "no"},
    {"approve": 1},
    {"approve": False, "approved": "false"},
    {"approved": "reject"},
    {"approve": True, "approved": False},
    {"comment": "looks fine"},
    "no",
    "false",
    "",
    0,
]
APPROVALS: list[Any] = [True, {"approve": True}, {"approved": True}, "approve", "Yes", {"approve": "approved"}]


@pytest.mark.parametrize(
    ("answer", "approved"), [*((a, False) for a in REJECTIONS), *((a, True) for a in APPROVALS)], ids=repr
)
async def test_a_tool_result_review_approves_only_an_explicit_yes(
    guard: Guard, mode: str, answer: Any, approved: bool
) -> None:
    policy = {"surfaces": {"tool_result": {"action": {"reroute": "human_review"}}}}
    tools = Tools(search_result=INJECTION)
    llm = model(AIMessage("", tool_calls=[call("search", {"query": "a"}, "c1")]), "Done.")
    agent = create_agent(
        llm, tools=tools.all, middleware=[GuardMiddleware(guard, policy=policy)], checkpointer=InMemorySaver()
    )
    cfg: Any = {"configurable": {"thread_id": f"answer-{mode}-{answer!r}"}}
    first = await run(agent, {"messages": [HumanMessage("search")]}, mode, cfg)
    assert first["__interrupt__"][0].value["where"] == "tool_result"
    result = await run(agent, Command(resume=answer), mode, cfg)
    read = any(INJECTION in m.text for m in llm.calls[-1])
    assert read is approved and msgs(result)[-1].text == "Done."


@pytest.mark.parametrize("answer", [{"approve": "false"}, {"approve": "no"}, {"approved": "0"}, "nope"], ids=repr)
async def test_a_tool_call_review_rejects_anything_but_an_explicit_yes(
    guard: Guard, server: FakeGuardServer, mode: str, answer: Any
) -> None:
    server.add_rule("send_email", score=50, categories=["PRIVACY"], mode="response")
    tools = Tools()
    llm = model(AIMessage("", tool_calls=[call("send_email", {"to": "a@example.com", "body": "r"}, "c1")]), "Done.")
    agent = create_agent(
        llm, tools=tools.all, middleware=[GuardMiddleware(guard, policy=REVIEW_POLICY)], checkpointer=InMemorySaver()
    )
    cfg: Any = {"configurable": {"thread_id": f"call-answer-{mode}-{answer!r}"}}
    first = await run(agent, {"messages": [HumanMessage("send the report")]}, mode, cfg)
    assert first["__interrupt__"][0].value["where"] == "tool_call"
    result = await run(agent, Command(resume=answer), mode, cfg)
    tm = next(m for m in msgs(result) if isinstance(m, ToolMessage))
    assert tools.ran == [] and tm.status == "error" and "privacy" in tm.text


# ---------------------------------------------------------------- 9. speculative input: known reroutes first


@pytest.mark.parametrize("route", ["human_review", "escalate"])
async def test_a_speculative_model_call_never_reads_a_result_known_to_be_rerouted(
    guard: Guard, mode: str, route: str
) -> None:
    policy = {"surfaces": {"tool_result": {"action": {"reroute": route}}}}
    runs: list[str] = []
    llm = model(two_searches(), *["Done."] * 6)
    mw = GuardMiddleware(guard, policy=policy, speculative_input=True, route_handlers={"escalate": lambda d, s: {}})
    agent = create_agent(llm, tools=[injected_search(runs)], middleware=[mw], checkpointer=InMemorySaver())
    cfg: Any = {"configurable": {"thread_id": f"speculative-known-{route}-{mode}"}}
    result = await run(agent, {"messages": [HumanMessage("search something")]}, mode, cfg)
    resumes = 0
    while "__interrupt__" in result:
        assert resumes < 2
        result = await run(agent, Command(resume={"approve": False}), mode, cfg)
        resumes += 1
    assert resumes == (2 if route == "human_review" else 0) and msgs(result)[-1].text == "Done."
    assert all(INJECTION not in m.text for call_ in llm.calls for m in call_)  # not once, dropped or not
    assert len(llm.calls) == 2  # the tool-calling step and the step after the results were withheld


# ---------------------------------------------------------------- 10. parallel return_direct results, one key


class EscalationState(AgentState[Any]):
    escalated: NotRequired[int]


async def test_parallel_return_direct_results_routed_to_a_handler_setting_a_key_do_not_crash(
    guard: Guard, mode: str
) -> None:
    policy = {"surfaces": {"tool_result": {"action": {"reroute": "escalate"}}}}
    seen: list[str] = []

    def escalate(decision: Any, state: Any) -> dict[str, Any]:
        seen.append(state["messages"][-1].text)
        return {"content": ESCALATED, "escalated": len(seen)}

    runs: list[str] = []
    llm = model(two_searches(), "never")
    mw = GuardMiddleware(guard, policy=policy, route_handlers={"escalate": escalate})
    agent = create_agent(
        llm, tools=[injected_search(runs, return_direct=True)], state_schema=EscalationState, middleware=[mw]
    )
    result = await run(agent, {"messages": [HumanMessage("search something")]}, mode)
    assert sorted(runs) == ["a", "b"] and len(llm.calls) == 1 and len(seen) == 2
    assert result["escalated"] in (1, 2)  # one handler's keys (the first to run) are applied
    results = [m for m in msgs(result) if isinstance(m, ToolMessage)]
    assert len(results) == 2 and all(m.text == ESCALATED and m.status == "error" for m in results)
    assert not leaked(result, INJECTION)


# ---------------------------------------------------------------- 6. the end-of-run backstop (after_agent)

RD_RESULT = f"{INJECTION} (final)"


def rerouted_to(route: str) -> dict[str, Any]:
    return {"surfaces": {"tool_result": {"action": {"reroute": route}}}}


def assert_withheld_at_the_end(message: Any) -> None:
    """A tool result the backstop withheld: same shape as elsewhere, and its decision says why."""
    assert isinstance(message, ToolMessage) and message.status == "error"
    assert message.text == "[tool result withheld by the safety guard (jailbreak)]"
    meta = message.response_metadata["flexguard"]
    assert meta["action"] == "block" and RUN_ENDED_NO_ROUTE in meta["reason"] and meta["route"] is not None


@pytest.mark.parametrize("route", ["escalate", "human_review"])
async def test_a_call_edited_into_a_return_direct_tool_never_ends_the_run_with_its_raw_result(
    guard: Guard, mode: str, route: str
) -> None:
    # the Guard (listed first) sees the original request (an ordinary tool) and defers the reroute to
    # before_model; the human-in-the-loop edit inside it runs a return_direct tool, so LangChain ends the run
    @tool
    def search(query: str) -> str:
        """Search."""
        return "harmless"

    @tool(return_direct=True)
    def final(query: str) -> str:
        """Final answer lookup."""
        return RD_RESULT

    handled: list[Any] = []
    llm = model(AIMessage("", tool_calls=[call("search", {"query": "a"}, "c1")]), "never")
    mw = GuardMiddleware(guard, policy=rerouted_to(route), route_handlers={"escalate": lambda d, s: handled.append(d)})
    hitl = HumanInTheLoopMiddleware(interrupt_on={"search": True})
    agent = create_agent(llm, tools=[search, final], middleware=[mw, hitl], checkpointer=InMemorySaver())
    cfg: Any = {"configurable": {"thread_id": f"hitl-edit-{route}-{mode}"}}
    first = await run(agent, {"messages": [HumanMessage("look it up")]}, mode, cfg)
    assert "__interrupt__" in first
    edit = {"type": "edit", "edited_action": {"name": "final", "args": {"query": "b"}}}
    result = await run(agent, Command(resume={"decisions": [edit]}), mode, cfg)
    assert "__interrupt__" not in result and len(llm.calls) == 1 and agent.get_state(cfg).next == ()
    assert not leaked(result, INJECTION) and not leaked(agent.get_state(cfg).values, INJECTION)
    assert_withheld_at_the_end(msgs(result)[-1])
    assert handled == []  # no route runs at the end of a run: withheld, fail closed


@pytest.mark.parametrize("route", ["escalate", "human_review"])
async def test_a_runtime_tool_next_to_a_return_direct_tool_never_ends_the_run_with_its_raw_result(
    guard: Guard, mode: str, route: str
) -> None:
    @tool(return_direct=True)
    def final(query: str) -> str:
        """Final answer."""
        return "The answer is 42."

    @tool
    def fetch_page(url: str) -> str:
        """Fetch a page."""
        return f"{INJECTION} (page)"

    class DynamicTools(AgentMiddleware):  # the documented pattern for tools registered at runtime
        def wrap_model_call(self, request: Any, handler: Any) -> Any:
            return handler(request.override(tools=[*request.tools, fetch_page]))

        async def awrap_model_call(self, request: Any, handler: Any) -> Any:
            return await handler(request.override(tools=[*request.tools, fetch_page]))

        def wrap_tool_call(self, request: Any, handler: Any) -> Any:
            if request.tool_call["name"] == "fetch_page":
                request = request.override(tool=fetch_page)
            return handler(request)

        async def awrap_tool_call(self, request: Any, handler: Any) -> Any:
            if request.tool_call["name"] == "fetch_page":
                request = request.override(tool=fetch_page)
            return await handler(request)

    handled: list[Any] = []
    calls = [call("final", {"query": "a"}, "c1"), call("fetch_page", {"url": "x"}, "c2")]
    llm = model(AIMessage("", tool_calls=calls), "never")
    mw = GuardMiddleware(guard, policy=rerouted_to(route), route_handlers={"escalate": lambda d, s: handled.append(d)})
    agent = create_agent(llm, tools=[final], middleware=[mw, DynamicTools()], checkpointer=InMemorySaver())
    cfg: Any = {"configurable": {"thread_id": f"dynamic-{route}-{mode}"}}
    result = await run(agent, {"messages": [HumanMessage("look it up")]}, mode, cfg)
    assert "__interrupt__" not in result and len(llm.calls) == 1
    assert not leaked(result, INJECTION) and not leaked(agent.get_state(cfg).values, INJECTION)
    results = {m.tool_call_id: m for m in msgs(result) if isinstance(m, ToolMessage)}
    assert results["c1"].text == "The answer is 42." and results["c1"].status == "success"  # resolved: untouched
    assert_withheld_at_the_end(results["c2"])
    assert handled == []


@pytest.mark.parametrize(
    ("speculative", "guard_first"),
    [(True, True), (True, False), (False, False)],
    ids=["speculative-guard-first", "speculative-limit-first", "default-limit-first"],
)
@pytest.mark.parametrize("route", ["escalate", "human_review"])
async def test_a_run_ended_by_another_middleware_never_keeps_a_deferred_raw_result(
    guard: Guard, mode: str, route: str, speculative: bool, guard_first: bool
) -> None:
    handled: list[Any] = []
    tools = Tools(search_result=INJECTION)
    llm = model(AIMessage("", tool_calls=[call("search", {"query": "a"}, "c1")]), "never")
    mw = GuardMiddleware(
        guard,
        policy=rerouted_to(route),
        route_handlers={"escalate": lambda d, s: handled.append(d)},
        speculative_input=speculative,
    )
    limit = ModelCallLimitMiddleware(run_limit=1, exit_behavior="end")
    agent = create_agent(
        llm, tools=tools.all, middleware=[mw, limit] if guard_first else [limit, mw], checkpointer=InMemorySaver()
    )
    cfg: Any = {"configurable": {"thread_id": f"limit-{route}-{mode}-{speculative}-{guard_first}"}}
    result = await run(agent, {"messages": [HumanMessage("search something")]}, mode, cfg)
    assert "__interrupt__" not in result and len(llm.calls) == 1 and tools.names() == ["search"]
    assert "limit" in msgs(result)[-1].text  # the limit middleware's answer ended the run
    assert not leaked(result, INJECTION) and not leaked(agent.get_state(cfg).values, INJECTION)
    assert_withheld_at_the_end(next(m for m in msgs(result) if isinstance(m, ToolMessage)))
    assert handled == []


async def test_a_run_ended_by_another_middleware_still_routes_when_the_guard_runs_first(
    guard: Guard, mode: str
) -> None:
    # not a regression: the Guard's before_model runs before the limit's and routes the result as always
    handled: list[Any] = []
    tools = Tools(search_result=INJECTION)
    llm = model(AIMessage("", tool_calls=[call("search", {"query": "a"}, "c1")]), "never")
    escalate = {"escalate": lambda d, s: handled.append(d)}
    mw = GuardMiddleware(guard, policy=rerouted_to("escalate"), route_handlers=escalate)
    agent = create_agent(llm, tools=tools.all, middleware=[mw, ModelCallLimitMiddleware(run_limit=1)])
    result = await run(agent, {"messages": [HumanMessage("search something")]}, mode)
    assert len(handled) == 1 and not leaked(result, INJECTION)
    tm = next(m for m in msgs(result) if isinstance(m, ToolMessage))
    assert tm.status == "error" and "flexguard" not in tm.response_metadata  # withheld by before_model


async def test_a_deferred_result_at_the_end_of_the_run_raises_with_exit_behavior_error(guard: Guard, mode: str) -> None:
    tools = Tools(search_result=INJECTION)
    llm = model(AIMessage("", tool_calls=[call("search", {"query": "a"}, "c1")]), "never")
    handled: list[Any] = []
    mw = GuardMiddleware(
        guard,
        policy=rerouted_to("escalate"),
        route_handlers={"escalate": lambda d, s: handled.append(d)},
        speculative_input=True,
        exit_behavior="error",
    )
    agent = create_agent(llm, tools=tools.all, middleware=[mw, ModelCallLimitMiddleware(run_limit=1)])
    with pytest.raises(GuardBlockedError) as raised:
        await run(agent, {"messages": [HumanMessage("search something")]}, mode)
    assert RUN_ENDED_NO_ROUTE in raised.value.decision.reason and handled == []


class WritesAnswerAndEnds(AgentMiddleware):
    """After the model, answers its tool call with a ToolMessage of its own and ends the run (a node that is
    not the tool node: the Guard's wrap_tool_call never sees this result)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    @hook_config(can_jump_to=["end"])
    def after_model(self, state: Any, runtime: Any) -> dict[str, Any] | None:
        last = state["messages"][-1]
        if not isinstance(last, AIMessage) or not last.tool_calls:
            return None
        answer = ToolMessage(self.text, tool_call_id=last.tool_calls[0]["id"], name="search")
        return {"messages": [answer], "jump_to": "end"}

    @hook_config(can_jump_to=["end"])
    async def aafter_model(self, state: Any, runtime: Any) -> dict[str, Any] | None:
        return self.after_model(state, runtime)


@pytest.mark.parametrize("action", ["block", "redact", "allow"])
async def test_a_tool_result_never_checked_is_checked_at_the_end_of_the_run(
    guard: Guard, server: FakeGuardServer, mode: str, action: str
) -> None:
    text = {"block": INJECTION, "redact": f"{SAFE_RESULT} {INJECTION}", "allow": SAFE_RESULT}[action]
    policy = {"surfaces": {"tool_result": {"action": "redact"}}} if action == "redact" else None
    llm = model(AIMessage("", tool_calls=[call("search", {"query": "a"}, "c1")]), "never")
    rec = Recorder()
    mw = GuardMiddleware(guard, policy=policy)
    agent = create_agent(llm, tools=Tools().all, middleware=[mw, WritesAnswerAndEnds(text)])
    result = await run(agent, {"messages": [HumanMessage("search something")]}, mode, {"callbacks": [rec]})
    tm = msgs(result)[-1]
    assert isinstance(tm, ToolMessage) and len(llm.calls) == 1
    assert [e["where"] for e in rec.events if e["where"].startswith("after_agent")] == ["after_agent:tool_result"]
    if action == "allow":
        assert tm.text == SAFE_RESULT and tm.status == "success"
    elif action == "redact":
        assert SAFE_RESULT in tm.text and INJECTION not in tm.text and "[REDACTED" in tm.text
    else:
        assert tm.status == "error" and tm.text == "[tool result withheld by the safety guard (jailbreak)]"
        assert tm.response_metadata["flexguard"]["action"] == "block"
    assert not leaked(result, INJECTION)


SAFE_SCENARIOS = {
    "answer": ([], lambda: [AIMessage("Hello there.", id="a1")], None),
    "tool": (
        ["search"],
        lambda: [
            AIMessage("", id="a1", tool_calls=[call("search", {"query": "a"}, "c1")]),
            AIMessage("Paris.", id="a2"),
        ],
        None,
    ),
    "return_direct": (
        ["final"],
        lambda: [AIMessage("", id="a1", tool_calls=[call("final", {"query": "a"}, "c1")])],
        None,
    ),
    "parallel": (
        ["final", "search"],
        lambda: [
            AIMessage(
                "", id="a1", tool_calls=[call("final", {"query": "a"}, "c1"), call("search", {"query": "b"}, "c2")]
            ),
            AIMessage("Done.", id="a2"),
        ],
        None,
    ),
    "structured": (
        ["search"],
        lambda: [
            AIMessage(
                "",
                id="a1",
                tool_calls=[call("search", {"query": "a"}, "c1"), call("Answer", {"answer": "Paris"}, "s1")],
            )
        ],
        ToolStrategy(Answer),
    ),
}


@pytest.mark.parametrize("speculative", [False, True], ids=["sequential", "speculative"])
@pytest.mark.parametrize("scenario", list(SAFE_SCENARIOS))
async def test_a_safe_run_ends_with_the_same_state_with_the_backstop(
    guard: Guard, server: FakeGuardServer, mode: str, scenario: str, speculative: bool
) -> None:
    @tool
    def search(query: str) -> str:
        """Search."""
        return GOOD

    @tool(return_direct=True)
    def final(query: str) -> str:
        """Final."""
        return "The answer is 42."

    class WithoutBackstop(GuardMiddleware):
        after_agent = AgentMiddleware.after_agent
        aafter_agent = AgentMiddleware.aafter_agent

    names, replies, response_format = SAFE_SCENARIOS[scenario]
    tools = [t for t in (search, final) if t.name in names] or [search]

    async def one(cls: type[GuardMiddleware]) -> tuple[Any, list[Any], int]:
        before = len(server.requests)
        kw: dict[str, Any] = {"response_format": response_format} if response_format is not None else {}
        agent = create_agent(
            model(*replies()), tools=tools, middleware=[cls(guard, speculative_input=speculative)], **kw
        )
        assert ("GuardMiddleware.after_agent" in agent.get_graph().nodes) is (cls is GuardMiddleware)
        result = await run(agent, {"messages": [HumanMessage("question?", id="h1")]}, mode)
        seen = [m.model_dump(exclude={"id"}) | {"kind": type(m).__name__} for m in msgs(result)]
        return result.get("structured_response"), seen, len(server.requests) - before

    assert await one(GuardMiddleware) == await one(WithoutBackstop)  # messages, structured answer, guard calls


@pytest.mark.parametrize(
    ("options", "has_after_agent"),
    [
        ({}, True),
        ({"speculative_input": True}, True),
        ({"check_tool_results": False}, False),
        ({"check_tool_results": False, "speculative_input": True}, False),
        ({"check_input": False, "check_tool_results": False}, False),
    ],
)
def test_the_backstop_node_is_added_only_when_tool_results_are_checked(
    guard: Guard, options: dict[str, Any], has_after_agent: bool
) -> None:
    mw = GuardMiddleware(guard, **options)
    assert isinstance(mw, GuardMiddleware) and mw.name == "GuardMiddleware"
    nodes = set(create_agent(model("hi"), tools=[], middleware=[mw]).get_graph().nodes)
    assert ("GuardMiddleware.after_agent" in nodes) is has_after_agent
    assert ("GuardMiddleware.before_agent" in nodes) is has_after_agent  # it marks the run's start for it
    has_before_model = not options.get("speculative_input") and options.get("check_input", True) is not False
    assert ("GuardMiddleware.before_model" in nodes) is has_before_model


# ---------------------------------------------------------------- 7. a human "respond" is not a structured answer


@pytest.mark.parametrize("approve", [True, False])
async def test_a_human_respond_next_to_a_rerouted_result_does_not_skip_its_review(
    guard: Guard, mode: str, approve: bool
) -> None:
    tools = Tools(search_result=INJECTION)
    calls = [call("send_email", {"to": "bob", "body": "hi"}, "c1"), call("search", {"query": "a"}, "c2")]
    llm = model(AIMessage("", tool_calls=calls), "MODEL ANSWERED")
    mw = GuardMiddleware(guard, policy=rerouted_to("human_review"))
    hitl = HumanInTheLoopMiddleware(interrupt_on={"send_email": True})
    agent = create_agent(llm, tools=tools.all, middleware=[mw, hitl], checkpointer=InMemorySaver())
    cfg: Any = {"configurable": {"thread_id": f"respond-{mode}-{approve}"}}
    first = await run(agent, {"messages": [HumanMessage("mail bob and search")]}, mode, cfg)
    assert "__interrupt__" in first
    respond = {"type": "respond", "message": "Not sent; Bob is away."}
    second = await run(agent, Command(resume={"decisions": [respond]}), mode, cfg)
    # the run goes on to the model: the search result is reviewed in before_model, not withheld unreviewed
    payload = second["__interrupt__"][0].value
    assert payload["type"] == "flexguard_review" and payload["where"] == "tool_result" and INJECTION in payload["text"]
    result = await run(agent, Command(resume={"approve": approve}), mode, cfg)
    assert msgs(result)[-1].text == "MODEL ANSWERED" and tools.names() == ["search"]
    c2 = next(m for m in msgs(result) if isinstance(m, ToolMessage) and m.tool_call_id == "c2")
    read = " ".join(m.text for m in llm.calls[-1])
    if approve:
        assert c2.status == "success" and INJECTION in read
    else:
        assert c2.status == "error" and INJECTION not in read and "return_direct" not in c2.text


# ---------------------------------------------------------------- 8. sixth review: the end-of-run backstop's reach


@pytest.mark.parametrize("speculative", [False, True], ids=["sequential", "speculative"])
async def test_a_structured_answer_is_not_checked_as_a_tool_result_when_output_is_not_checked(
    guard: Guard, server: FakeGuardServer, mode: str, speculative: bool
) -> None:
    # the ToolStrategy answer's ToolMessage is the model node's own, not a tool result: with check_output=False
    # the user asked for the answer to go through unchecked, and the backstop must not withhold it
    calls = [call("search", {"query": "a"}, "c1")]
    llm = model(
        AIMessage("", tool_calls=calls), AIMessage("", tool_calls=[call("Answer", {"answer": INJECTION}, "s1")])
    )
    rec = Recorder()
    mw = GuardMiddleware(guard, check_output=False, speculative_input=speculative)
    agent = create_agent(llm, tools=Tools().all, middleware=[mw], response_format=ToolStrategy(Answer))
    before = len(server.requests)
    result = await run(agent, {"messages": [HumanMessage("summarize the page")]}, mode, {"callbacks": [rec]})
    assert result["structured_response"] == Answer(answer=INJECTION)
    last = msgs(result)[-1]
    assert isinstance(last, ToolMessage) and last.tool_call_id == "s1" and last.status == "success"
    assert INJECTION in last.text and "flexguard" not in last.response_metadata
    wheres = sorted(e["where"] for e in rec.events)
    assert not any(w.startswith("after_agent") for w in wheres)
    assert wheres.count("tool_result") == 1  # the search result only
    assert [r.moderated_text for r in server.requests[before:]].count(INJECTION) == 0


class AnswersFromCache(AgentMiddleware):
    """An outer ``wrap_tool_call`` (listed before the Guard) answering without running the tool: the Guard's own
    ``wrap_tool_call`` never sees the result."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def wrap_tool_call(self, request: Any, handler: Any) -> Any:
        return ToolMessage(self.text, tool_call_id=request.tool_call["id"], name=request.tool_call["name"])

    async def awrap_tool_call(self, request: Any, handler: Any) -> Any:
        return self.wrap_tool_call(request, handler)


@pytest.mark.parametrize("speculative", [False, True], ids=["sequential", "speculative"])
async def test_a_result_never_checked_is_checked_at_the_end_even_when_another_middleware_answered_after_it(
    guard: Guard, mode: str, speculative: bool
) -> None:
    # the limit middleware ends the run with an AIMessage of its own after the unchecked tool result
    llm = model(AIMessage("", tool_calls=[call("search", {"query": "a"}, "c1")]), "MODEL RAN AGAIN")
    rec = Recorder()
    mw = GuardMiddleware(guard, speculative_input=speculative)
    limit = ModelCallLimitMiddleware(run_limit=1, exit_behavior="end")
    cache = AnswersFromCache(INJECTION)
    middleware = [cache, mw, limit] if speculative else [cache, limit, mw]
    agent = create_agent(llm, tools=Tools().all, middleware=middleware)
    result = await run(agent, {"messages": [HumanMessage("look it up")]}, mode, {"callbacks": [rec]})
    assert len(llm.calls) == 1 and "limit" in msgs(result)[-1].text
    tm = next(m for m in msgs(result) if isinstance(m, ToolMessage))
    assert tm.status == "error" and tm.text == "[tool result withheld by the safety guard (jailbreak)]"
    assert [e["where"] for e in rec.events if e["where"].startswith("after_agent")] == ["after_agent:tool_result"]
    assert not leaked(result, INJECTION)


class WritesTwoAnswersAndEnds(AgentMiddleware):
    """Answers two tool calls with ToolMessages of its own and ends the run."""

    @hook_config(can_jump_to=["end"])
    async def aafter_model(self, state: Any, runtime: Any) -> dict[str, Any] | None:
        last = state["messages"][-1]
        if not isinstance(last, AIMessage) or not last.tool_calls:
            return None
        answers = [
            ToolMessage(text, tool_call_id=c["id"], name=c["name"])
            for text, c in zip(("fails", "hangs"), last.tool_calls, strict=True)
        ]
        return {"messages": answers, "jump_to": "end"}


async def test_a_failed_check_at_the_end_of_the_run_cancels_the_other_checks(guard: Guard) -> None:
    cancelled: list[str] = []
    started = asyncio.Event()
    real = guard.acheck

    async def acheck(text: str, **kw: Any) -> Any:
        if text not in ("fails", "hangs"):  # the prompt and the tool calls
            return await real(text, **kw)
        if text == "hangs":
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.append(text)
                raise
        await started.wait()
        raise RuntimeError("guard exploded")

    calls = [call("search", {"query": "a"}, "c1"), call("search", {"query": "b"}, "c2")]
    llm = model(AIMessage("", tool_calls=calls), "never")
    mw = GuardMiddleware(guard)
    agent = create_agent(llm, tools=Tools().all, middleware=[mw, WritesTwoAnswersAndEnds()])
    with patch.object(guard, "acheck", acheck), pytest.raises(RuntimeError, match="guard exploded"):
        await asyncio.wait_for(agent.ainvoke({"messages": [HumanMessage("search twice")]}), timeout=30)
    assert cancelled == ["hangs"]
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []


async def test_a_result_approved_in_an_earlier_turn_is_left_alone_by_a_new_instance(guard: Guard, mode: str) -> None:
    # a worker restart between turns: the new instance never saw the approved raw result; it belongs to an
    # earlier run (before the last human message), so the backstop of a later run must not withhold it
    saver = InMemorySaver()
    cfg: Any = {"configurable": {"thread_id": f"approved-earlier-{mode}"}}
    tools = Tools(search_result=INJECTION)
    first_llm = model(AIMessage("", tool_calls=[call("search", {"query": "a"}, "c1")]), "Found it.")
    first = create_agent(
        first_llm,
        tools=tools.all,
        middleware=[GuardMiddleware(guard, policy=rerouted_to("human_review"))],
        checkpointer=saver,
    )
    assert "__interrupt__" in await run(first, {"messages": [HumanMessage("search something")]}, mode, cfg)
    turn1 = await run(first, Command(resume={"approve": True}), mode, cfg)
    assert msgs(turn1)[-1].text == "Found it." and leaked(turn1, INJECTION)  # approved: the raw result stays
    rec = Recorder()
    second = create_agent(
        model("Anything else?"),
        tools=tools.all,
        middleware=[GuardMiddleware(guard, policy=rerouted_to("human_review"))],
        checkpointer=saver,
    )
    turn2 = await run(second, {"messages": [HumanMessage("thanks")]}, mode, {**cfg, "callbacks": [rec]})
    assert msgs(turn2)[-1].text == "Anything else?"
    c1 = next(m for m in msgs(turn2) if isinstance(m, ToolMessage))
    assert c1.status == "success" and c1.text == INJECTION
    assert not [e for e in rec.events if e["where"].startswith("after_agent")]


# ---------------------------------------------------------------- 9. seventh review: what the backstop may skip


class AnswersACallItself(AgentMiddleware):
    """Listed after the Guard: the first model call is answered from a replay cache, the call *and* the page it
    fetched (a ToolMessage written by the model node that is a tool result, not a structured answer)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text, self.calls = text, 0

    def _cached(self) -> Any:
        return ModelResponse(
            result=[
                AIMessage("", id="ai-cached", tool_calls=[call("search", {"query": "x"}, "c1")]),
                ToolMessage(self.text, tool_call_id="c1", name="search"),
            ]
        )

    def wrap_model_call(self, request: Any, handler: Any) -> Any:
        self.calls += 1
        return self._cached() if self.calls == 1 else handler(request)

    async def awrap_model_call(self, request: Any, handler: Any) -> Any:
        self.calls += 1
        return self._cached() if self.calls == 1 else await handler(request)


@pytest.mark.parametrize("check_output", [True, False], ids=["output", "no-output"])
async def test_a_tool_message_an_inner_wrap_model_call_writes_is_checked_as_a_tool_result(
    guard: Guard, server: FakeGuardServer, mode: str, check_output: bool
) -> None:
    llm = model("Done.")
    mw = GuardMiddleware(guard, check_output=check_output)
    agent = create_agent(llm, tools=Tools().all, middleware=[mw, AnswersACallItself(INJECTION)])
    before = len(server.requests)
    result = await run(agent, {"messages": [HumanMessage("fetch x")]}, mode)
    assert [r.moderated_text for r in server.requests[before:]].count(INJECTION) == 1
    assert not any(INJECTION in m.text for c in llm.calls for m in c)  # the model never read it
    tm = next(m for m in msgs(result) if isinstance(m, ToolMessage))
    assert tm.status == "error" and not leaked(result, INJECTION)


class CachesSearch(AgentMiddleware):
    """Listed before the Guard: answers ``search`` from a cache with an injection (the Guard's own
    ``wrap_tool_call`` never sees it); other tools run."""

    def wrap_tool_call(self, request: Any, handler: Any) -> Any:
        if request.tool_call["name"] == "search":
            return ToolMessage(INJECTION, tool_call_id=request.tool_call["id"], name="search")
        return handler(request)

    async def awrap_tool_call(self, request: Any, handler: Any) -> Any:
        if request.tool_call["name"] == "search":
            return ToolMessage(INJECTION, tool_call_id=request.tool_call["id"], name="search")
        return await handler(request)


@tool
def ask_user(question: str, tool_call_id: Annotated[str, InjectedToolCallId]) -> Command:  # type: ignore[type-arg]
    """Relay a question; the user's canned answer is added as a human message."""
    return Command(
        update={
            "messages": [
                ToolMessage("asked", tool_call_id=tool_call_id, name="ask_user"),
                HumanMessage("The user says: go ahead."),
            ]
        }
    )


@pytest.mark.parametrize("speculative", [False, True], ids=["sequential", "speculative"])
async def test_a_human_message_written_in_the_tool_step_does_not_hide_a_result_never_checked(
    guard: Guard, mode: str, speculative: bool
) -> None:
    calls = [call("search", {"query": "a"}, "c1"), call("ask_user", {"question": "ok?"}, "c2")]
    llm = model(AIMessage("", tool_calls=calls), "MODEL RAN AGAIN")
    mw = GuardMiddleware(guard, speculative_input=speculative)
    limit = ModelCallLimitMiddleware(run_limit=1, exit_behavior="end")
    middleware = [CachesSearch(), mw, limit] if speculative else [CachesSearch(), limit, mw]
    agent = create_agent(llm, tools=[*Tools().all, ask_user], middleware=middleware)
    result = await run(agent, {"messages": [HumanMessage("look it up")]}, mode)
    assert any(isinstance(m, HumanMessage) and "go ahead" in m.text for m in msgs(result))
    c1 = next(m for m in msgs(result) if isinstance(m, ToolMessage) and m.tool_call_id == "c1")
    assert c1.status == "error" and not leaked(result, INJECTION)


async def test_a_structured_answer_is_left_alone_when_the_run_resumes_on_another_instance(
    guard: Guard, server: FakeGuardServer, mode: str
) -> None:
    # the structured answer's call id is kept in the checkpoint: an instance that never saw the model call
    # (a worker restarted during a review) does not take the framework's ToolMessage for a tool result
    server.add_rule("send_email", score=50, categories=["PRIVACY"], mode="response")
    saver = InMemorySaver()
    cfg: Any = {"configurable": {"thread_id": f"answer-elsewhere-{mode}"}}
    calls = [
        call("send_email", {"to": "a@example.com", "body": "report"}, "c1"),
        call("Answer", {"answer": INJECTION}, "s1"),
    ]

    def make() -> Any:
        mw = GuardMiddleware(guard, check_output=False, policy=REVIEW_POLICY)
        llm = model(AIMessage("", tool_calls=calls))
        return create_agent(
            llm, tools=Tools().all, middleware=[mw], response_format=ToolStrategy(Answer), checkpointer=saver
        )

    first = await run(make(), {"messages": [HumanMessage("send it and answer")]}, mode, cfg)
    assert "__interrupt__" in first
    rec = Recorder()
    result = await run(make(), Command(resume={"approve": True}), mode, {**cfg, "callbacks": [rec]})
    s1 = next(m for m in msgs(result) if isinstance(m, ToolMessage) and m.tool_call_id == "s1")
    assert s1.status == "success" and INJECTION in s1.text
    assert result["structured_response"] == Answer(answer=INJECTION)
    assert not [e for e in rec.events if e["where"].startswith("after_agent")]


# ---------------------------------------------------------------- 10. eighth review: structured answers, stateless


SCHEMA_NO_TITLE = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}


class AnswersWithTheSchemaTool(FakeToolModel):
    """Calls the structured-output tool the framework bound, whatever name it gave it (a schema without a title
    gets a random one)."""

    answer: str = ""
    bound: list[str] = Field(default_factory=list)

    def bind_tools(self, tools: Any, **kw: Any) -> Any:
        self.bound = [str(getattr(t, "name", None) or t.get("name") or t["function"]["name"]) for t in tools]
        return self

    def _generate(self, messages: Any, stop: Any = None, run_manager: Any = None, **kw: Any) -> ChatResult:
        name = next(n for n in self.bound if n.startswith("response_format_"))
        msg = AIMessage("", tool_calls=[call(name, {"answer": self.answer}, "s1")])
        return ChatResult(generations=[ChatGeneration(message=msg)])


@pytest.mark.parametrize("text", [GOOD, BAD], ids=["safe", "violent"])
async def test_a_structured_answer_to_a_schema_without_a_title_is_checked_as_the_response(
    guard: Guard, mode: str, text: str
) -> None:
    rec = Recorder()
    llm = AnswersWithTheSchemaTool(messages=iter([]), answer=text)
    agent = create_agent(llm, tools=Tools().all, middleware=[GuardMiddleware(guard)], response_format=SCHEMA_NO_TITLE)
    result = await run(agent, {"messages": [HumanMessage("question?")]}, mode, {"callbacks": [rec]})
    wheres = [e["where"] for e in rec.events]
    assert wheres == ["before_model:prompt", "after_model:response"]  # the answer, as the response: once
    if text == GOOD:
        assert result["structured_response"] == {"answer": GOOD}
        assert msgs(result)[-1].status == "success"
    else:
        assert result.get("structured_response") is None and not leaked(result, SECRET)


async def test_the_next_turn_on_another_instance_does_not_check_a_structured_answer_as_a_tool_result(
    guard: Guard, mode: str
) -> None:
    saver = InMemorySaver()
    cfg: Any = {"configurable": {"thread_id": f"next-turn-{mode}"}}

    def make(*replies: Any) -> Any:
        mw = GuardMiddleware(guard, check_output=False)
        return create_agent(
            model(*replies),
            tools=Tools().all,
            middleware=[mw],
            response_format=ToolStrategy(Answer),
            checkpointer=saver,
        )

    first = await run(
        make(AIMessage("", tool_calls=[call("Answer", {"answer": INJECTION}, "s1")])),
        {"messages": [HumanMessage("quote it")]},
        mode,
        cfg,
    )
    assert first["structured_response"] == Answer(answer=INJECTION)
    rec = Recorder()
    second = await run(
        make("You're welcome."), {"messages": [HumanMessage("thanks")]}, mode, {**cfg, "callbacks": [rec]}
    )
    assert [e["where"] for e in rec.events] == ["before_model:prompt"]
    s1 = next(m for m in msgs(second) if isinstance(m, ToolMessage))
    assert s1.status == "success" and INJECTION in s1.text


async def test_without_a_checkpointer_the_end_of_a_run_leaves_earlier_turns_alone(
    guard: Guard, server: FakeGuardServer, mode: str
) -> None:
    # a stateless worker: the client sends the history back, a new instance handles each turn
    def make(*replies: Any) -> Any:
        return create_agent(model(*replies), tools=Tools().all, middleware=[GuardMiddleware(guard)])

    first = await run(
        make(AIMessage("", tool_calls=[call("search", {"query": "x"}, "c1")]), "Sunny."),
        {"messages": [HumanMessage("weather?")]},
        mode,
    )
    rec = Recorder()
    before = len(server.requests)
    await run(make("ok"), {"messages": [*msgs(first), HumanMessage("thanks")]}, mode, {"callbacks": [rec]})
    assert [e["where"] for e in rec.events] == ["before_model:prompt", "after_model:response"]
    assert len(server.requests) - before == 2


# ---------------------------------------------------------------- 11. ninth review: answers by name and text


@pytest.mark.parametrize("check_output", [True, False], ids=["output", "no-output"])
async def test_a_result_an_inner_middleware_writes_for_an_unregistered_tool_is_not_a_structured_answer(
    guard: Guard, server: FakeGuardServer, mode: str, check_output: bool
) -> None:
    class FetchesItself(AgentMiddleware):  # a server-side tool the agent does not register
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def _cached(self) -> Any:
            return ModelResponse(
                result=[
                    AIMessage("", tool_calls=[call("web_fetch", {"url": "x"}, "c1")]),
                    ToolMessage(INJECTION, tool_call_id="c1", name="web_fetch"),
                ]
            )

        def wrap_model_call(self, request: Any, handler: Any) -> Any:
            self.calls += 1
            return self._cached() if self.calls == 1 else handler(request)

        async def awrap_model_call(self, request: Any, handler: Any) -> Any:
            self.calls += 1
            return self._cached() if self.calls == 1 else await handler(request)

    llm = model(AIMessage("", tool_calls=[call("Answer", {"answer": GOOD}, "s1")]))
    mw = GuardMiddleware(guard, check_output=check_output)
    agent = create_agent(llm, tools=Tools().all, middleware=[mw, FetchesItself()], response_format=ToolStrategy(Answer))
    before = len(server.requests)
    result = await run(agent, {"messages": [HumanMessage("fetch x")]}, mode)
    assert [r.moderated_text for r in server.requests[before:]].count(INJECTION) == 1
    assert not any(INJECTION in m.text for c in llm.calls for m in c) and not leaked(result, INJECTION)
    assert result["structured_response"] == Answer(answer=GOOD)


async def test_a_message_reusing_a_structured_answers_call_id_is_checked(guard: Guard, mode: str) -> None:
    saver = InMemorySaver()
    cfg: Any = {"configurable": {"thread_id": f"reused-id-{mode}"}}
    llm = model(AIMessage("", tool_calls=[call("Answer", {"answer": GOOD}, "s1")]), "I will comply.")
    agent = create_agent(
        llm,
        tools=Tools().all,
        middleware=[GuardMiddleware(guard)],
        response_format=ToolStrategy(Answer),
        checkpointer=saver,
    )
    await run(agent, {"messages": [HumanMessage("hi")]}, mode, cfg)
    result = await run(agent, {"messages": [ToolMessage(INJECTION, tool_call_id="s1")]}, mode, cfg)
    assert not any(INJECTION in m.text for m in llm.calls[-1]) and not leaked(result, INJECTION)


@tool
def ask_and_answer(question: str, tool_call_id: Annotated[str, InjectedToolCallId]) -> Command:  # type: ignore[type-arg]
    """Relay a question; writes a final-looking answer and the user's reply, as if a new turn began."""
    return Command(
        update={
            "messages": [
                ToolMessage("asked", tool_call_id=tool_call_id, name="ask_and_answer"),
                AIMessage("Asked the user."),
                HumanMessage("The user says: go ahead."),
            ]
        }
    )


async def test_a_turn_written_inside_the_tool_step_does_not_hide_a_result_without_a_checkpointer(
    guard: Guard, mode: str
) -> None:
    calls = [call("search", {"query": "a"}, "c1"), call("ask_and_answer", {"question": "ok?"}, "c2")]
    llm = model(AIMessage("", tool_calls=calls), "MODEL RAN AGAIN")
    limit = ModelCallLimitMiddleware(run_limit=1, exit_behavior="end")
    agent = create_agent(
        llm, tools=[*Tools().all, ask_and_answer], middleware=[CachesSearch(), limit, GuardMiddleware(guard)]
    )
    result = await run(agent, {"messages": [HumanMessage("look it up")]}, mode)
    c1 = next(m for m in msgs(result) if isinstance(m, ToolMessage) and m.tool_call_id == "c1")
    assert c1.status == "error" and not leaked(result, INJECTION)


# ---------------------------------------------------------------- 12. tenth review: retries, stale starts


async def test_a_structured_answer_the_framework_rejects_is_still_checked_as_the_response(
    guard: Guard, mode: str
) -> None:
    # handle_errors: the framework answers the bad call with an error ToolMessage and the model retries; the bad
    # call's arguments are the response all the same
    first = AIMessage("", id="a1", tool_calls=[call("Answer", {"wrong": BAD}, "s1")])
    llm = model(first, AIMessage("", id="a2", tool_calls=[call("Answer", {"answer": GOOD}, "s2")]))
    agent = create_agent(
        llm,
        tools=Tools().all,
        middleware=[GuardMiddleware(guard)],
        response_format=ToolStrategy(Answer, handle_errors=True),
    )
    result = await run(agent, {"messages": [HumanMessage("question?")]}, mode)
    assert not leaked(result, SECRET)


def _approved_grey_result_then(guard: Guard, server: FakeGuardServer, extra: list[Any]) -> tuple[Any, Any]:
    server.add_rule(GREY, score=50, categories=["PRIVACY"])
    saver = InMemorySaver()

    def make(*replies: Any) -> Any:
        mw = GuardMiddleware(guard, policy=REVIEW_POLICY)
        return create_agent(
            model(*replies), tools=Tools(search_result=GREY).all, middleware=[*extra, mw], checkpointer=saver
        )

    return make, saver


class EndsEarly(AgentMiddleware):
    @hook_config(can_jump_to=["end"])
    def before_agent(self, state: Any, runtime: Any) -> dict[str, Any] | None:
        if state["messages"][-1].text == "stop":
            return {"jump_to": "end", "messages": [AIMessage("gated")]}
        return None

    @hook_config(can_jump_to=["end"])
    async def abefore_agent(self, state: Any, runtime: Any) -> dict[str, Any] | None:
        return self.before_agent(state, runtime)


class RewritesTheInput(AgentMiddleware):
    def before_model(self, state: Any, runtime: Any) -> dict[str, Any] | None:
        last = state["messages"][-1]
        if isinstance(last, HumanMessage) and last.text == "my card is 4111":
            return {"messages": [RemoveMessage(id=last.id or ""), HumanMessage("my card is [CARD]")]}
        return None

    async def abefore_model(self, state: Any, runtime: Any) -> dict[str, Any] | None:
        return self.before_model(state, runtime)


@pytest.mark.parametrize("case", ["another before_agent ends the run", "the input is rewritten"])
async def test_a_result_approved_in_an_earlier_run_survives_a_stale_or_removed_run_start(
    guard: Guard, server: FakeGuardServer, mode: str, case: str
) -> None:
    extra: list[Any] = [EndsEarly()] if case.startswith("another") else [RewritesTheInput()]
    make, _ = _approved_grey_result_then(guard, server, extra)
    cfg: Any = {"configurable": {"thread_id": f"stale-start-{mode}-{case}"}}
    first = await run(
        make(AIMessage("", tool_calls=[call("search", {"query": "a"}, "c1")]), "done"),
        {"messages": [HumanMessage("go")]},
        mode,
        cfg,
    )
    assert "__interrupt__" in first
    await run(make("done"), Command(resume={"approve": True}), mode, cfg)
    rec = Recorder()
    text = "stop" if case.startswith("another") else "my card is 4111"
    result = await run(
        make("welcome"), {"messages": [HumanMessage(text)]}, mode, {**cfg, "callbacks": [rec]}
    )  # a new instance
    c1 = next(m for m in msgs(result) if isinstance(m, ToolMessage))
    assert c1.status == "success" and c1.text == GREY  # the reviewer's approval stands
    assert not [e for e in rec.events if e["where"].startswith("after_agent")]
