"""``GuardMiddleware(speculative_input=True)`` in a real ``create_agent`` agent.

The input check runs in ``wrap_model_call`` / ``awrap_model_call`` while the model runs. These tests show
that both really overlap (the model starts while the guard server holds the check), that a safe input gives
the same run as the sequential middleware, and that when the input does not pass, the speculative response
never reaches the state, the stream or a tool: BLOCK ends with the refusal (async: the model call is
cancelled), REDACT reruns the model on the redacted message (replaced in place), ``exit_behavior="error"``
raises, human review interrupts, route handlers update the state, and a guard that cannot answer fails
closed. No task or thread is left behind.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from langchain.agents import create_agent
from langchain.agents.middleware import AgentMiddleware
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command
from pydantic import Field

from flexguard_integrations import Guard, GuardBlockedError, GuardUnavailableError
from flexguard_integrations.langchain import VERDICT_EVENT, GuardMiddleware
from flexguard_integrations.testing import FakeGuardServer, FaultPlan
from tests.conftest import FLEX
from tests.integration.test_langchain_middleware import (
    GREY,
    HARMFUL,
    INJECTION,
    REVIEW_POLICY,
    SAFE_RESULT,
    FakeToolModel,
    Tools,
    call,
    model,
    moderated,
    msgs,
    run,
)

SECRET = "SPECULATIVE-ANSWER"  # what the speculative model call answers; must never be seen when blocked
CHECK_THREAD = "speculative-input-check"


# ---------------------------------------------------------------- fakes


class Log(BaseCallbackHandler):
    """Verdict events (with the time they were dispatched) in one ordered log shared with tools and models."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, str, float]] = []

    def on_custom_event(self, name: str, data: Any, *, run_id: UUID, **kw: Any) -> None:
        if name == VERDICT_EVENT:
            self.entries.append(("verdict", f"{data['where']}={data['action']}", time.monotonic()))

    def add(self, kind: str, what: str) -> None:
        self.entries.append((kind, what, time.monotonic()))

    def kinds(self) -> list[str]:
        return [f"{k}:{w}" for k, w, _ in self.entries]

    def verdicts(self) -> list[str]:
        return [w for k, w, _ in self.entries if k == "verdict"]


class SlowModel(FakeToolModel):
    """Answers after ``latency`` seconds (``time.sleep`` sync, ``asyncio.sleep`` async) with ``answer`` (or
    ``You said: <last user text>`` when ``echo``), and records when it started, whether it finished or was
    cancelled, and what the guard server had seen at its start (``probe``)."""

    latency: float = 0.0
    answer: str = SECRET
    echo: bool = False
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)
    server: Any = None
    log: Any = None
    probes: list[tuple[int, int]] = Field(default_factory=list)
    finished: int = 0
    cancelled: int = 0

    def _reply(self, messages: list[BaseMessage]) -> ChatResult:
        text = self.answer
        if self.echo:
            text = "You said: " + next(m.text for m in reversed(messages) if isinstance(m, HumanMessage))
        message = AIMessage(text, tool_calls=list(self.tool_calls))
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _probe(self) -> tuple[int, int]:
        # (guard requests received by the server so far, verdicts dispatched so far)
        return len(self.server.requests) if self.server else 0, len(self.log.verdicts()) if self.log else 0

    def _start(self, messages: list[BaseMessage]) -> None:
        self.calls.append(list(messages))
        if self.log is not None:
            self.log.add("model", "start")

    def _generate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any) -> Any:
        self._start(messages)
        deadline = time.monotonic() + min(self.latency, 2.0)
        while self.server is not None and not self.server.requests and time.monotonic() < deadline:
            time.sleep(0.005)  # wait (within the model's own latency) for the input check to reach the guard
        self.probes.append(self._probe())
        time.sleep(max(0.0, deadline - time.monotonic()) if self.server is not None else self.latency)
        self.finished += 1
        return self._reply(messages)

    async def _agenerate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any
    ) -> Any:
        self._start(messages)
        started = time.monotonic()
        try:
            # the server lives in another thread: poll it (no event to wait on)
            while self.server is not None and not self.server.requests and time.monotonic() - started < 2.0:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
            self.probes.append(self._probe())
            await asyncio.sleep(max(0.0, self.latency - (time.monotonic() - started)))
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        self.finished += 1
        return self._reply(messages)


def slow(latency: float, **kw: Any) -> SlowModel:
    return SlowModel(messages=iter([]), latency=latency, **kw)


def no_leftovers() -> None:
    """No task of ours still pending on this loop, no check thread still alive."""
    here = asyncio.current_task()
    assert [t for t in asyncio.all_tasks() if t is not here] == []
    assert [t.name for t in threading.enumerate() if t.name.startswith(CHECK_THREAD)] == []


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def spec(guard: Guard, **kw: Any) -> GuardMiddleware:
    return GuardMiddleware(guard, speculative_input=True, **kw)


# ---------------------------------------------------------------- the API


def test_both_model_wrappers_are_implemented_and_off_by_default(server: FakeGuardServer) -> None:
    # LangChain raises NotImplementedError under ainvoke when only the sync wrapper exists, and vice versa
    assert GuardMiddleware.wrap_model_call is not AgentMiddleware.wrap_model_call
    assert GuardMiddleware.awrap_model_call is not AgentMiddleware.awrap_model_call
    with Guard.from_endpoint(server.base_url, FLEX) as g:
        assert GuardMiddleware(g).speculative_input is False
        assert spec(g).speculative_input is True


# ---------------------------------------------------------------- a passing input: same run as sequential


async def test_safe_input_gives_the_same_run_as_the_sequential_middleware(server: FakeGuardServer, mode: str) -> None:
    outcomes = []
    for speculative in (False, True):
        server.reset()
        tools = Tools()
        llm = model(
            AIMessage("", tool_calls=[call("search", {"query": "weather Paris"}, "c1")]), "It is sunny in Paris."
        )
        log = Log()
        async with Guard.from_endpoint(server.base_url, FLEX) as g:
            mw = GuardMiddleware(g, speculative_input=speculative)
            agent = create_agent(llm, tools=tools.all, middleware=[mw])
            result = await run(
                agent, {"messages": [HumanMessage("What's the weather in Paris?")]}, mode, {"callbacks": [log]}
            )
        outcomes.append(
            (
                [(type(m).__name__, m.text) for m in msgs(result)],
                tools.names(),
                moderated(server),
                log.verdicts(),
                [[m.text for m in c] for c in llm.calls],
                sorted(result),
            )
        )
    assert outcomes[0] == outcomes[1]
    texts, ran, checked, verdicts, _, keys = outcomes[1]
    assert texts[-1] == ("AIMessage", "It is sunny in Paris.") and ran == ["search"] and keys == ["messages"]
    # the prompt is checked once (in wrap_model_call, not again in before_model), the rest as before
    assert checked == ["What's the weather in Paris?", 'search({"query": "weather Paris"})', SAFE_RESULT, texts[-1][1]]
    assert verdicts[0] == "before_model:prompt=allow"


async def test_check_and_model_overlap_and_the_step_costs_the_longer_of_the_two(
    server: FakeGuardServer, mode: str
) -> None:
    server.faults = FaultPlan(latency=0.5)
    log = Log()
    llm = slow(0.5, answer="Sunny.", server=server, log=log)
    async with Guard.from_endpoint(server.base_url, FLEX, cache=False) as g:
        agent = create_agent(llm, tools=[], middleware=[spec(g, check_output=False)])
        await run(agent, {"messages": [HumanMessage("warm up")]}, mode)  # compile, connect
        server.reset()
        llm.probes.clear()
        log.entries.clear()
        t0 = time.monotonic()
        result = await run(agent, {"messages": [HumanMessage("Weather in Paris?")]}, mode, {"callbacks": [log]})
        elapsed = time.monotonic() - t0
    assert msgs(result)[-1].text == "Sunny."
    # when the model started, the guard server already held the input check and had not answered it
    assert llm.probes == [(1, 0)]
    assert log.kinds() == ["model:start", "verdict:before_model:prompt=allow"]
    # 0.5 s guard and 0.5 s model side by side, not one after the other (>= 1.0 s)
    assert elapsed < 0.85, elapsed
    if mode == "async":
        no_leftovers()


async def test_tools_run_only_after_the_input_passed(server: FakeGuardServer, mode: str) -> None:
    server.faults = FaultPlan(latency=0.3)
    log = Log()

    @tool
    def lookup(query: str) -> str:
        """Look something up."""
        log.add("tool", "lookup")
        return "found"

    llm = slow(0.05, tool_calls=[call("lookup", {"query": "q"}, "c1")], server=server, log=log)
    llm2 = model("Done.")  # second step: a plain answer
    replies = iter([llm, llm2])

    class TwoStep(FakeToolModel):
        def _generate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any) -> Any:
            return next(replies)._generate(messages)

        async def _agenerate(
            self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any
        ) -> Any:
            chosen = next(replies)
            return await chosen._agenerate(messages) if chosen is llm else chosen._generate(messages)

    async with Guard.from_endpoint(server.base_url, FLEX) as g:
        agent = create_agent(TwoStep(messages=iter([])), tools=[lookup], middleware=[spec(g, check_output=False)])
        result = await run(agent, {"messages": [HumanMessage("look it up")]}, mode, {"callbacks": [log]})
    assert msgs(result)[-1].text == "Done."
    kinds = log.kinds()
    # the model answered with a tool call long before the 0.3 s check came back; the tool waited for it
    assert kinds.index("model:start") < kinds.index("verdict:before_model:prompt=allow") < kinds.index("tool:lookup")


# ---------------------------------------------------------------- a blocked input


async def test_blocked_input_ends_with_the_refusal_and_the_speculative_answer_is_dropped(
    server: FakeGuardServer, mode: str
) -> None:
    server.faults = FaultPlan(latency=0.3)
    tools = Tools()
    log = Log()
    # async: a 3 s model that must be cancelled; sync: it cannot be, so keep it short
    latency = 3.0 if mode == "async" else 0.6
    llm = slow(latency, tool_calls=[call("wipe_disk", {"path": "/"}, "c1")], server=server, log=log)
    async with Guard.from_endpoint(server.base_url, FLEX) as g:
        agent = create_agent(llm, tools=tools.all, middleware=[spec(g)], checkpointer=InMemorySaver())
        cfg: dict[str, Any] = {"configurable": {"thread_id": f"block-{mode}"}, "callbacks": [log]}
        t0 = time.monotonic()
        result = await run(agent, {"messages": [HumanMessage(HARMFUL)]}, mode, cfg)
        elapsed = time.monotonic() - t0
        saved = agent.get_state(cfg).values
    out = msgs(result)
    assert [type(m) for m in out] == [HumanMessage, AIMessage]
    assert "violence" in out[-1].text and out[-1].response_metadata["flexguard"]["action"] == "block"
    assert not out[-1].tool_calls and tools.ran == []
    for messages in (out, saved["messages"]):
        assert all(SECRET not in m.text for m in messages)
    assert saved.get("flexguard_end_after") is None and "flexguard_end_after" not in result
    assert llm.probes == [(1, 0)] and len(llm.calls) == 1  # the model did start, alongside the check
    assert moderated(server) == [HARMFUL]  # the refusal is not sent to the guard as a response
    if mode == "async":
        assert (llm.cancelled, llm.finished) == (1, 0)
        assert elapsed < 1.5, elapsed  # did not wait for the 3 s model
        no_leftovers()
    else:
        assert (llm.cancelled, llm.finished) == (0, 1)  # ran to completion, its answer dropped
        assert [t.name for t in threading.enumerate() if t.name.startswith(CHECK_THREAD)] == []


async def test_blocked_input_in_a_multi_turn_conversation(server: FakeGuardServer) -> None:
    llm = slow(0.0, echo=True)
    async with Guard.from_endpoint(server.base_url, FLEX) as g:
        agent = create_agent(llm, tools=[], middleware=[spec(g)], checkpointer=InMemorySaver())
        cfg = {"configurable": {"thread_id": "turns"}}
        await agent.ainvoke({"messages": [HumanMessage("Hi")]}, cfg)
        blocked = await agent.ainvoke({"messages": [HumanMessage(HARMFUL)]}, cfg)
        after = await agent.ainvoke({"messages": [HumanMessage("Where is Paris?")]}, cfg)
    assert "violence" in msgs(blocked)[-1].text
    # the marker of the blocked turn does not end the next one early: it is answered and its answer checked
    assert [m.text for m in msgs(after)][-2:] == ["Where is Paris?", "You said: Where is Paris?"]
    assert moderated(server)[-2:] == ["Where is Paris?", "You said: Where is Paris?"]


async def test_stream_messages_never_shows_the_speculative_answer(server: FakeGuardServer, mode: str) -> None:
    server.faults = FaultPlan(latency=0.2)  # the model starts before the check answers
    async with Guard.from_endpoint(server.base_url, FLEX) as g:
        for text, visible in ((HARMFUL, False), ("Hello", True)):
            llm = slow(0.2)
            agent = create_agent(llm, tools=[], middleware=[spec(g, check_output=False)])
            payload = {"messages": [HumanMessage(text)]}
            if mode == "sync":
                chunks = list(agent.stream(payload, stream_mode="messages"))
            else:
                chunks = [c async for c in agent.astream(payload, stream_mode="messages")]
            shown = " ".join(str(getattr(c[0], "content", "")) for c in chunks)
            assert len(llm.calls) == 1, text
            assert (SECRET in shown) is visible, (text, shown)
            if not visible:
                assert "violence" in shown


async def test_exit_behavior_error_raises_and_the_tool_never_runs(server: FakeGuardServer, mode: str) -> None:
    server.faults = FaultPlan(latency=0.2)
    tools = Tools()
    llm = slow(1.0, tool_calls=[call("wipe_disk", {"path": "/"}, "c1")])
    async with Guard.from_endpoint(server.base_url, FLEX) as g:
        agent = create_agent(llm, tools=tools.all, middleware=[spec(g, exit_behavior="error")])
        with pytest.raises(GuardBlockedError) as err:
            await run(agent, {"messages": [HumanMessage(HARMFUL)]}, mode)
    assert err.value.decision.verdict.surface is not None and err.value.decision.verdict.surface.value == "prompt"
    assert tools.ran == [] and len(llm.calls) == 1
    if mode == "async":
        assert (llm.cancelled, llm.finished) == (1, 0)
        no_leftovers()


async def test_exit_behavior_replace_reruns_the_model_on_the_replacement(server: FakeGuardServer, mode: str) -> None:
    server.faults = FaultPlan(latency=0.1)
    llm = slow(0.3, echo=True)
    async with Guard.from_endpoint(server.base_url, FLEX) as g:
        mw = spec(g, exit_behavior="replace", violation_message="[removed: {categories}]")
        agent = create_agent(llm, tools=[], middleware=[mw])
        out = msgs(await run(agent, {"messages": [HumanMessage(HARMFUL, id="h1")]}, mode))
    assert [(m.id, m.text) for m in out[:1]] == [("h1", "[removed: violence]")]
    assert [m.text for m in out[1:]] == ["You said: [removed: violence]"]
    assert [c[-1].text for c in llm.calls] == [HARMFUL, "[removed: violence]"]


# ---------------------------------------------------------------- redaction


async def test_redacted_input_replaces_the_message_and_reruns_the_model(server: FakeGuardServer, mode: str) -> None:
    server.faults = FaultPlan(latency=0.05)
    llm = slow(0.5, echo=True)
    policy = {"surfaces": {"prompt": {"action": "redact"}}}
    text = f"My trip to Paris was great. {HARMFUL}"
    async with Guard.from_endpoint(server.base_url, FLEX) as g:
        agent = create_agent(llm, tools=[], middleware=[spec(g, policy=policy)])
        result = await run(agent, {"messages": [HumanMessage(text, id="human-1")]}, mode)
    out = msgs(result)
    assert [type(m) for m in out] == [HumanMessage, AIMessage]
    assert out[0].id == "human-1" and "bomb" not in out[0].text and "[REDACTED: VIOLENCE]" in out[0].text
    # the speculative call saw the original; its answer was dropped and the model ran again on the redaction
    assert [c[-1].text for c in llm.calls] == [text, out[0].text]
    assert out[1].text == f"You said: {out[0].text}"
    if mode == "async":
        assert (llm.cancelled, llm.finished) == (1, 1)
        no_leftovers()
    else:
        assert (llm.cancelled, llm.finished) == (0, 2)


async def test_injected_tool_result_is_withheld_before_the_model_reads_it(server: FakeGuardServer, mode: str) -> None:
    server.faults = FaultPlan(latency=0.1)
    llm = slow(0.3, answer="The page says nothing useful.")
    state = {
        "messages": [
            HumanMessage("summarise this page", id="h1"),
            AIMessage("", tool_calls=[call("fetch", {"url": "http://x"}, "f1")], id="a1"),
            ToolMessage(INJECTION, tool_call_id="f1", name="fetch", id="tm-1"),
        ]
    }
    async with Guard.from_endpoint(server.base_url, FLEX) as g:
        agent = create_agent(llm, tools=[], middleware=[spec(g)])
        result = await run(agent, state, mode)
    out = msgs(result)
    assert [m.id for m in out[:3]] == ["h1", "a1", "tm-1"] and len(out) == 4
    assert out[2].status == "error" and "withheld" in out[2].text  # type: ignore[attr-defined]
    assert len(llm.calls) == 2 and all("Ignore all previous" not in m.text for m in llm.calls[1])
    assert "Ignore all previous" in llm.calls[0][-1].text  # only the dropped speculative call saw it


# ---------------------------------------------------------------- reroute


@pytest.mark.parametrize("approve", [True, False])
async def test_human_review_interrupts_without_the_speculative_answer(
    server: FakeGuardServer, mode: str, approve: bool
) -> None:
    server.add_rule(GREY, score=50, categories=["PRIVACY"])
    server.faults = FaultPlan(latency=0.1)
    llm = slow(0.3, echo=True)
    async with Guard.from_endpoint(server.base_url, FLEX) as g:
        # hold_output=False: the echoed answer contains GREY too, so its own review follows the prompt's; with
        # the old after_model-only check the answer sits in the state while that second review waits, which is
        # what this test reads (hold_output=True puts a placeholder there: test_langchain_middleware_hold.py)
        mw = spec(g, policy=REVIEW_POLICY, hold_output=False)
        agent = create_agent(llm, tools=[], middleware=[mw], checkpointer=InMemorySaver())
        cfg = {"configurable": {"thread_id": f"review-{mode}-{approve}"}}
        first = await run(agent, {"messages": [HumanMessage(GREY)]}, mode, cfg)
        payload = first["__interrupt__"][0].value
        assert payload["type"] == "flexguard_review" and payload["where"] == "prompt" and payload["text"] == GREY
        assert [m.text for m in msgs(first)] == [GREY]  # nothing of the speculative call in the state
        result = await run(agent, Command(resume={"approve": approve}), mode, cfg)
    last = msgs(result)[-1]
    if approve:
        assert last.text == f"You said: {GREY}"
    else:
        assert "privacy" in last.text and "You said" not in last.text
    # the speculative call before the interrupt, then the model node again on resume (async: a rejected
    # resume may cancel that second call before it reached the model)
    assert len(llm.calls) == 2 if approve or mode == "sync" else len(llm.calls) in (1, 2)
    assert llm.finished == (2 if mode == "sync" else int(approve))
    if mode == "async":
        no_leftovers()


async def test_route_handler_update_is_applied(server: FakeGuardServer, mode: str) -> None:
    server.add_rule(GREY, score=50, categories=["PRIVACY"])
    policy = {"rules": [{"when": {"min_score": 41}, "then": {"reroute": "escalate"}}]}
    seen: list[Any] = []

    def escalate(decision: Any, state: Any) -> dict[str, Any]:
        seen.append(decision)
        return {"messages": [AIMessage("A human agent will contact you.")], "jump_to": "end"}

    def note(decision: Any, state: Any) -> None:
        seen.append(decision)  # no update: the run goes on as if the input had passed

    async with Guard.from_endpoint(server.base_url, FLEX) as g:
        llm = slow(0.1, echo=True, tool_calls=[call("wipe_disk", {"path": "/"}, "c1")])
        tools = Tools()
        mw = spec(g, policy=policy, route_handlers={"escalate": escalate})
        out = msgs(
            await run(create_agent(llm, tools=tools.all, middleware=[mw]), {"messages": [HumanMessage(GREY)]}, mode)
        )
        assert [m.text for m in out] == [GREY, "A human agent will contact you."] and tools.ran == []
        assert len(seen) == 1 and seen[0].route == "escalate"

        llm = slow(0.1, echo=True)
        mw = spec(g, policy=policy, route_handlers={"escalate": note}, check_output=False)
        out = msgs(await run(create_agent(llm, tools=[], middleware=[mw]), {"messages": [HumanMessage(GREY)]}, mode))
        assert [m.text for m in out] == [GREY, f"You said: {GREY}"] and len(llm.calls) == 1
    assert len(seen) == 2


# ---------------------------------------------------------------- the guard cannot answer


async def test_guard_server_down_fails_closed(server: FakeGuardServer, mode: str) -> None:
    llm = slow(0.3)
    async with Guard.from_endpoint(server.base_url, FLEX, max_retries=0, timeout=2) as g:
        agent = create_agent(llm, tools=[], middleware=[spec(g)])
        server.stop()
        out = msgs(await run(agent, {"messages": [HumanMessage("What is the capital of France?")]}, mode))
    assert [type(m) for m in out] == [HumanMessage, AIMessage]
    assert "guard unavailable" in out[-1].text and all(SECRET not in m.text for m in out)
    assert len(llm.calls) <= 1 and llm.finished == (1 if mode == "sync" else 0)
    if mode == "async":
        no_leftovers()


async def test_a_check_that_raises_cancels_the_model_and_is_re_raised(server: FakeGuardServer, mode: str) -> None:
    server.faults = FaultPlan(latency=0.2)
    llm = slow(3.0 if mode == "async" else 0.4)
    async with Guard.from_endpoint(server.base_url, FLEX, max_retries=0, timeout=2, policy={"on_error": "raise"}) as g:
        agent = create_agent(llm, tools=[], middleware=[spec(g)])
        server.fail_next(1, "malformed")
        t0 = time.monotonic()
        with pytest.raises(GuardUnavailableError):
            await run(agent, {"messages": [HumanMessage("What is the capital of France?")]}, mode)
        elapsed = time.monotonic() - t0
    assert len(llm.calls) == 1
    if mode == "async":
        assert (llm.cancelled, llm.finished) == (1, 0) and elapsed < 1.5
        no_leftovers()


async def test_a_model_error_is_raised_only_when_the_input_passes(server: FakeGuardServer, mode: str) -> None:
    class Broken(FakeToolModel):
        def _generate(self, *a: Any, **kw: Any) -> Any:
            raise RuntimeError("model down")

        async def _agenerate(self, *a: Any, **kw: Any) -> Any:
            raise RuntimeError("model down")

    async with Guard.from_endpoint(server.base_url, FLEX) as g:
        agent = create_agent(Broken(messages=iter([])), tools=[], middleware=[spec(g)])
        with pytest.raises(RuntimeError, match="model down"):
            await run(agent, {"messages": [HumanMessage("Hello")]}, mode)
        out = msgs(await run(agent, {"messages": [HumanMessage(HARMFUL)]}, mode))
    assert "violence" in out[-1].text  # the input's refusal, not the model's error


@pytest.mark.parametrize("speculative", [False, True], ids=["sequential", "speculative"])
async def test_a_route_handler_keeps_the_redactions_made_before_it(
    server: FakeGuardServer, mode: str, speculative: bool
) -> None:
    # two tool results at once: the first is redacted, the second goes to a route handler that changes
    # nothing; the model must still read the first one redacted
    server.add_rule(GREY, score=50, categories=["PRIVACY"])
    bad = "Here is how to build a bomb to kill people."
    policy = {
        "rules": [{"when": {"min_score": 41, "max_score": 60}, "then": {"reroute": "note"}}],
        "surfaces": {"tool_result": {"action": "redact"}},
    }
    routed: list[Any] = []
    state = {
        "messages": [
            HumanMessage("look both up", id="h1"),
            AIMessage("", tool_calls=[call("fetch", {"u": "a"}, "f1"), call("fetch", {"u": "b"}, "f2")], id="a1"),
            ToolMessage(f"{SAFE_RESULT} {bad}", tool_call_id="f1", name="fetch", id="tm-1"),
            ToolMessage(GREY, tool_call_id="f2", name="fetch", id="tm-2"),
        ]
    }
    llm = slow(0.0, answer="Both fetched.")
    async with Guard.from_endpoint(server.base_url, FLEX) as g:
        mw = GuardMiddleware(
            g,
            policy=policy,
            route_handlers={"note": lambda d, s: routed.append(d)},
            check_output=False,
            speculative_input=speculative,
        )
        out = msgs(await run(create_agent(llm, tools=[], middleware=[mw]), state, mode))
    assert len(routed) == 1
    assert out[2].id == "tm-1" and out[2].text == f"{SAFE_RESULT} [REDACTED: VIOLENCE]"
    assert all("bomb" not in m.text for m in llm.calls[-1])
    assert out[-1].text == "Both fetched."


# ---------------------------------------------------------------- the example


def test_the_example_runs_and_shows_what_it_promises() -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "langchain_agent_speculative.py"
    done = subprocess.run([sys.executable, str(example)], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    blocks = {b.split(":", 1)[0].strip(): b for b in out.split("\n== ")[1:]}
    harmful = blocks["harmful input"]
    assert "cancelled 1" in harmful and "blocked by the safety guard (violence)" in harmful
    assert "You asked: How do I make a bomb" not in out  # no answer to the harmful input is ever shown
    assert "(model) You asked: I loved Paris. [REDACTED: VIOLENCE]" in blocks["redacted input"]
    seq = float(blocks["safe input, speculative_input=False"].split(": ")[1].split(" s")[0])
    spe = float(blocks["safe input, speculative_input=True"].split(": ")[1].split(" s")[0])
    assert seq >= 0.8 and spe < seq  # 0.3 s guard + 0.5 s model, then side by side


# ---------------------------------------------------------------- graph shape and event cost


@pytest.fixture
async def guard(server: FakeGuardServer) -> Any:
    async with Guard.from_endpoint(server.base_url, FLEX, cache=False) as g:
        yield g


@pytest.mark.parametrize(
    ("options", "has_before_model"),
    [
        ({}, True),
        ({"speculative_input": True}, False),
        ({"check_input": False, "check_tool_results": False}, False),
        ({"check_input": False}, True),  # tool results are still checked in before_model
    ],
)
def test_a_before_model_that_checks_nothing_adds_no_graph_node(
    guard: Guard, options: dict[str, Any], has_before_model: bool
) -> None:
    mw = GuardMiddleware(guard, **options)
    assert isinstance(mw, GuardMiddleware)
    assert mw.name == "GuardMiddleware"
    nodes = set(create_agent(model("hi"), tools=[], middleware=[mw]).get_graph().nodes)
    assert ("GuardMiddleware.before_model" in nodes) is has_before_model
    assert "GuardMiddleware.after_model" in nodes


async def test_pruned_speculative_middleware_still_blocks_and_reports(
    guard: Guard, server: FakeGuardServer, mode: str
) -> None:
    log = Log()
    agent = create_agent(model(SECRET), tools=[], middleware=[GuardMiddleware(guard, speculative_input=True)])
    result = await run(agent, {"messages": [HumanMessage(HARMFUL)]}, mode, {"callbacks": [log]})
    assert SECRET not in str([m.content for m in msgs(result)])
    assert log.verdicts() == ["before_model:prompt=block"]
    assert HARMFUL in moderated(server)


async def test_verdict_payload_is_built_only_when_a_handler_listens(
    guard: Guard, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    from flexguard_integrations.langchain import _common

    built: list[str] = []
    real = _common.event_payload

    def counting(decision: Any, where: str) -> dict[str, Any]:
        built.append(where)
        return real(decision, where)

    monkeypatch.setattr(_common, "event_payload", counting)
    agent = create_agent(model("fine", "fine"), tools=[], middleware=[GuardMiddleware(guard)])
    await run(agent, {"messages": [HumanMessage("What is a nice name for a goldfish?")]}, mode)
    assert built == []  # nobody listens: no payload, no dispatch
    log = Log()
    await run(agent, {"messages": [HumanMessage("What is a nice name for a goldfish?")]}, mode, {"callbacks": [log]})
    assert built == ["before_model:prompt", "after_model:response"]
    assert log.verdicts() == ["before_model:prompt=allow", "after_model:response=allow"]
