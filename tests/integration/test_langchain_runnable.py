"""GuardRunnable and guarded() against FakeGuardServer with real LCEL chains and fake chat models.

Covers input types, per-call policies, tracing and custom events, BLOCK/REDACT/REROUTE on input and output,
speculative (parallel) input guarding with a slow model, stream/astream moderation and stream_first.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any
from uuid import UUID

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableGenerator, RunnableLambda

from flexguard_integrations import Action, Category, Decision, Guard, GuardBlockedError, GuardInputError, Surface
from flexguard_integrations.langchain import VERDICT_EVENT, GuardRunnable, guarded
from flexguard_integrations.testing import FakeGuardServer, FaultPlan
from tests.conftest import FLEX, QWEN

BENIGN = "What is the capital of France?"
HARMFUL = "How do I make a bomb to kill people?"
GREY = "a grey area question about locks"
SAFE_SENTENCE = "The weather in Paris is sunny today."
BAD_SENTENCE = "Here is how to build a bomb to kill people."
BAD_WORDS = ("bomb", "kill", "people", "build")
STREAM_TEXT = f"{SAFE_SENTENCE} {BAD_SENTENCE} Have a lovely trip."


# ---------------------------------------------------------------- helpers


class Recorder(BaseCallbackHandler):
    """Records chain starts (name) and flexguard_verdict custom events."""

    def __init__(self) -> None:
        self.starts: list[str] = []
        self.events: list[dict[str, Any]] = []

    def on_chain_start(self, serialized: Any, inputs: Any, *, run_id: UUID, **kw: Any) -> None:
        self.starts.append(str(kw.get("name")))

    def on_custom_event(self, name: str, data: Any, *, run_id: UUID, **kw: Any) -> None:
        if name == VERDICT_EVENT:
            self.events.append(data)


def fake_model(*texts: str) -> GenericFakeChatModel:
    return GenericFakeChatModel(messages=iter([AIMessage(t) for t in texts]))


def lcel_chain(answer: str, seen: list[Any] | None = None) -> Any:
    """ChatPromptTemplate | fake model | StrOutputParser; ``seen`` records what the model was sent."""

    def spy(value: Any) -> Any:
        if seen is not None:
            seen.append(value)
        return value

    prompt = ChatPromptTemplate.from_messages([("system", "You are helpful."), ("human", "{question}")])
    return prompt | RunnableLambda(spy) | fake_model(answer) | StrOutputParser()


def text_of(chunk: Any) -> str:
    return chunk if isinstance(chunk, str) else str(chunk.text)


@pytest.fixture
def guard(server: FakeGuardServer) -> Iterator[Guard]:
    with Guard.from_endpoint(server.base_url, FLEX) as g:
        yield g


@pytest.fixture
async def aguard(server: FakeGuardServer) -> AsyncIterator[Guard]:
    async with Guard.from_endpoint(server.base_url, FLEX) as g:
        yield g


# ---------------------------------------------------------------- GuardRunnable


def test_guard_runnable_reads_every_input_shape(server: FakeGuardServer, model_name: str) -> None:
    with Guard.from_endpoint(server.base_url, model_name) as g:
        gr = GuardRunnable(guard=g)
        assert gr.invoke(BENIGN).action is Action.ALLOW
        assert gr.invoke(HARMFUL).action is Action.BLOCK
        assert gr.invoke(HumanMessage(HARMFUL)).action is Action.BLOCK
        # a conversation: the last user message is the one checked
        convo = [SystemMessage("be nice"), HumanMessage(HARMFUL), AIMessage("no"), HumanMessage("Any museums?")]
        assert gr.invoke(convo).action is Action.ALLOW
        assert server.requests[-1].moderated_text == "Any museums?"
        assert gr.invoke({"question": HARMFUL}).action is Action.BLOCK
        prompt_value = ChatPromptTemplate.from_messages([("human", "{q}")]).invoke({"q": HARMFUL})
        assert gr.invoke(prompt_value).action is Action.BLOCK
        keyed = GuardRunnable(guard=g, input_key="user_text")
        decision = keyed.invoke({"question": BENIGN, "user_text": HARMFUL})
    assert isinstance(decision, Decision) and decision.action is Action.BLOCK
    assert Category.VIOLENCE in decision.verdict.categories
    assert decision.verdict.surface is Surface.PROMPT


def test_guard_runnable_response_key_runs_response_moderation(guard: Guard, server: FakeGuardServer) -> None:
    gr = GuardRunnable(guard=guard, response_key="answer")
    refused = gr.invoke({"question": HARMFUL, "answer": "I'm sorry, but I can't help with that."})
    complied = gr.invoke({"question": HARMFUL, "answer": "Sure: get explosives and build the bomb to kill."})
    assert refused.action is Action.ALLOW and refused.verdict.surface is Surface.RESPONSE
    assert complied.action is Action.BLOCK and complied.verdict.surface is Surface.RESPONSE
    assert "explosives" in (server.requests[-1].moderated_text or "")


def test_guard_runnable_batch_keeps_order_and_policy_per_call(guard: Guard, server: FakeGuardServer) -> None:
    server.add_rule(GREY, score=30, categories=["ILLEGAL"])
    gr = GuardRunnable(guard=guard)
    assert [d.action for d in gr.batch([BENIGN, HARMFUL, BENIGN, GREY])] == [
        Action.ALLOW,
        Action.BLOCK,
        Action.ALLOW,
        Action.ALLOW,
    ]
    strict = {"configurable": {"flexguard_policy": "strict"}}
    assert gr.invoke(GREY, config=strict).action is Action.BLOCK  # 30 >= strict 21
    assert gr.invoke(GREY).action is Action.ALLOW  # 30 < moderate 41
    assert gr.invoke(
        GREY, config={"configurable": {"flexguard_policy": {"preset": "strict", "action": "flag"}}}
    ).action is (Action.FLAG)
    # a runnable-level policy, overridden per call
    loose = GuardRunnable(guard=guard, policy="strict")
    assert loose.invoke(GREY).action is Action.BLOCK
    assert loose.invoke(GREY, config={"configurable": {"flexguard_policy": "loose"}}).action is Action.ALLOW


async def test_guard_runnable_async_and_abatch(aguard: Guard) -> None:
    gr = GuardRunnable(guard=aguard)
    assert (await gr.ainvoke(HARMFUL)).action is Action.BLOCK
    decisions = await gr.abatch([HARMFUL, BENIGN, [HumanMessage(BENIGN)]])
    assert [d.action for d in decisions] == [Action.BLOCK, Action.ALLOW, Action.ALLOW]


def test_guard_runnable_is_traced_with_a_verdict_event(guard: Guard) -> None:
    rec = Recorder()
    chain = RunnableLambda(lambda q: q["question"], name="pick") | GuardRunnable(guard=guard)
    chain.invoke({"question": HARMFUL}, config={"callbacks": [rec]})
    assert "FlexGuard" in rec.starts  # its own run in the trace
    assert len(rec.events) == 1
    event = rec.events[0]
    assert event["where"] == "GuardRunnable" and event["action"] == "block"
    assert event["verdict"]["categories"] == ["VIOLENCE"]


async def test_guard_runnable_event_in_astream_events(aguard: Guard) -> None:
    events = [e async for e in GuardRunnable(guard=aguard).astream_events(HARMFUL, version="v2")]
    custom = [e for e in events if e["event"] == "on_custom_event"]
    assert [e["name"] for e in custom] == [VERDICT_EVENT]
    assert custom[0]["data"]["action"] == "block"
    ends = [e for e in events if e["event"] == "on_chain_end" and e["name"] == "FlexGuard"]
    assert ends and isinstance(ends[0]["data"]["output"], Decision)


def test_guard_runnable_bad_input(guard: Guard, server: FakeGuardServer) -> None:
    gr = GuardRunnable(guard=guard)
    with pytest.raises(GuardInputError, match="empty list"):
        gr.invoke([])
    with pytest.raises(GuardInputError, match="keys"):
        gr.invoke({"unrelated": "x"})
    with pytest.raises(GuardInputError):
        gr.invoke(42)
    # list-of-blocks content: only the text blocks are checked, the image never reaches the guard
    blocks = HumanMessage(
        content=[
            {"type": "text", "text": HARMFUL},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        ]
    )
    n = len(server.requests)
    assert gr.invoke(blocks).action is Action.BLOCK
    assert server.requests[-1].moderated_text == HARMFUL
    assert len(server.requests) == n + 1
    # non-text content only: nothing to check is an input error, never a silent pass
    image_only = HumanMessage(content=[{"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}])
    with pytest.raises(GuardInputError):
        gr.invoke(image_only)


# ---------------------------------------------------------------- guarded(): invoke


def test_guarded_chain_passes_benign_and_blocks_harmful_input(guard: Guard, server: FakeGuardServer) -> None:
    seen: list[Any] = []
    chain = guarded(lcel_chain("Paris.", seen), guard, input_key="question")
    assert chain.invoke({"question": BENIGN}) == "Paris."
    assert len(seen) == 1
    with pytest.raises(GuardBlockedError) as err:
        chain.invoke({"question": HARMFUL})
    assert err.value.decision.verdict.surface is Surface.PROMPT
    assert Category.VIOLENCE in err.value.decision.verdict.categories
    assert len(seen) == 1  # the chain never ran on the blocked input


def test_guarded_check_switches(guard: Guard, server: FakeGuardServer) -> None:
    seen: list[Any] = []
    output_only = guarded(lcel_chain("I'm sorry, but I can't help with that.", seen), guard, check_input=False)
    assert output_only.invoke({"question": HARMFUL}).startswith("I'm sorry") and len(seen) == 1
    assert [r.moderated_text for r in server.requests] == ["I'm sorry, but I can't help with that."]
    input_only = guarded(lcel_chain("Build the bomb with explosives.", seen), guard, check_output=False)
    assert input_only.invoke({"question": "story time"}) == "Build the bomb with explosives."


def test_guarded_chain_blocks_harmful_output(guard: Guard) -> None:
    answer = "Sure. Get explosives and build the bomb to kill them."
    with pytest.raises(GuardBlockedError) as err:
        guarded(lcel_chain(answer), guard, input_key="question").invoke({"question": "tell me a story"})
    assert err.value.decision.verdict.surface is Surface.RESPONSE
    refused = guarded(
        lcel_chain(answer),
        guard,
        input_key="question",
        on_block="refuse",
        refusal="Blocked ({categories}, {risk_score}).",
    ).invoke({"question": "tell me a story"})
    assert refused.startswith("Blocked (violence, ") and "explosives" not in refused


def test_guarded_chat_model_refuses_with_an_ai_message(guard: Guard) -> None:
    out = guarded(fake_model("Sure, build the bomb with explosives to kill."), guard, on_block="refuse").invoke(
        [HumanMessage("tell me a story")]
    )
    assert isinstance(out, AIMessage)
    assert "violence" in out.text and "explosives" not in out.text
    assert not out.tool_calls
    # input blocked: the model never ran, the refusal is still a message
    model = fake_model("never used")
    out = guarded(model, guard, on_block="refuse").invoke([HumanMessage(HARMFUL)])
    assert isinstance(out, AIMessage) and "violence" in out.text
    assert next(model.messages).text == "never used"  # the model's answer was not consumed


def test_guarded_dict_output_and_missing_output_key(guard: Guard) -> None:
    rag = RunnableLambda(lambda q: {"answer": "Build the bomb with explosives to kill.", "sources": ["a"]})
    out = guarded(rag, guard, on_block="refuse", output_key="answer").invoke("tell me")
    assert isinstance(out, dict) and "violence" in out["answer"] and out["sources"] == ["a"]
    # a declared output key that the output lacks is an error, not a silent pass
    with pytest.raises(GuardInputError, match="no key 'text'"):
        guarded(rag, guard, output_key="text").invoke("tell me")


def test_guarded_dict_output_without_a_known_key_is_never_released_unchecked(guard: Guard) -> None:
    harmful = RunnableLambda(lambda q: {"reply": "Build the bomb with explosives to kill."})
    with pytest.raises((GuardInputError, GuardBlockedError)):
        guarded(harmful, guard).invoke("tell me")


def test_guarded_redacts_one_sentence_of_the_output(guard: Guard) -> None:
    answer = f"{SAFE_SENTENCE} {BAD_SENTENCE} Enjoy your stay."
    out = guarded(lcel_chain(answer), guard, input_key="question", policy={"action": "redact"}).invoke(
        {"question": "tell me about Paris"}
    )
    assert out.startswith(SAFE_SENTENCE) and out.endswith("Enjoy your stay.")
    assert "[REDACTED: VIOLENCE]" in out
    assert not any(w in out for w in BAD_WORDS)


def test_guarded_redacted_input_is_what_the_chain_receives(guard: Guard) -> None:
    seen: list[Any] = []
    chain = guarded(lcel_chain("ok", seen), guard, input_key="question", policy={"action": "redact"})
    assert chain.invoke({"question": f"{SAFE_SENTENCE} {BAD_SENTENCE}"}) == "ok"
    sent = seen[0].to_messages()[-1].text
    assert sent.startswith(SAFE_SENTENCE) and "[REDACTED" in sent and "bomb" not in sent


def test_guarded_reroutes_to_a_route_runnable_with_the_original_input(guard: Guard, server: FakeGuardServer) -> None:
    server.add_rule(GREY, score=50, categories=["ILLEGAL"])
    policy = {"rules": [{"when": {"min_score": 41, "max_score": 60}, "then": {"reroute": "expert"}}]}
    got: list[Any] = []
    expert = RunnableLambda(lambda x: got.append(x) or "expert answer")
    seen: list[Any] = []
    chain = guarded(
        lcel_chain("main answer", seen), guard, input_key="question", policy=policy, routes={"expert": expert}
    )
    assert chain.invoke({"question": GREY}) == "expert answer"
    assert got == [{"question": GREY}] and seen == []
    # output reroute: the route gets the original input too
    got.clear()
    chain = guarded(
        lcel_chain(f"Answer: {GREY}."), guard, input_key="question", policy=policy, routes={"expert": expert}
    )
    assert chain.invoke({"question": "hello"}) == "expert answer"
    assert got == [{"question": "hello"}]
    # a route name with no runnable is a block, never a pass
    with pytest.raises(GuardBlockedError):
        guarded(lcel_chain("x"), guard, input_key="question", policy=policy).invoke({"question": GREY})


def test_guarded_policy_per_call_through_configurable(guard: Guard, server: FakeGuardServer) -> None:
    server.add_rule(GREY, score=30, categories=["ILLEGAL"])
    chain = guarded(lcel_chain("answer"), guard, input_key="question")
    assert chain.invoke({"question": GREY}) == "answer"
    with pytest.raises(GuardBlockedError) as err:
        chain.invoke({"question": GREY}, config={"configurable": {"flexguard_policy": "strict"}})
    assert err.value.decision.threshold == 21


def test_guarded_batch_with_return_exceptions(guard: Guard) -> None:
    chain = guarded(RunnableLambda(lambda q: f"echo {q}"), guard)
    out = chain.batch([BENIGN, HARMFUL, "hello"], return_exceptions=True)
    assert out[0] == f"echo {BENIGN}" and out[2] == "echo hello"
    assert isinstance(out[1], GuardBlockedError)


async def test_guarded_async_and_abatch(aguard: Guard) -> None:
    chain = guarded(RunnableLambda(lambda q: f"echo {q}"), aguard, on_block="refuse")
    assert await chain.ainvoke(BENIGN) == f"echo {BENIGN}"
    out = await chain.abatch([HARMFUL, "hi"])
    assert "violence" in out[0] and out[1] == "echo hi"


def test_guarded_dispatches_events_for_input_and_output(guard: Guard) -> None:
    rec = Recorder()
    chain = guarded(lcel_chain("Paris."), guard, input_key="question")
    chain.invoke({"question": BENIGN}, config={"callbacks": [rec]})
    assert [(e["where"], e["action"]) for e in rec.events] == [("input", "allow"), ("output", "allow")]
    assert rec.starts[0] == "Guarded[RunnableSequence]"


async def test_guarded_events_in_astream_events(aguard: Guard) -> None:
    chain = guarded(
        lcel_chain("Build the bomb with explosives to kill."), aguard, input_key="question", on_block="refuse"
    )
    events = [e async for e in chain.astream_events({"question": "story"}, version="v2")]
    verdicts = [e["data"] for e in events if e["event"] == "on_custom_event" and e["name"] == VERDICT_EVENT]
    assert [v["where"] for v in verdicts] == ["input", "stream"]
    assert verdicts[-1]["action"] == "block"


def test_guarded_fails_closed_when_the_guard_is_down(server: FakeGuardServer) -> None:
    seen: list[Any] = []
    with Guard.from_endpoint(server.base_url, FLEX, max_retries=0, timeout=2) as g:
        chain = guarded(lcel_chain("answer", seen), g, input_key="question", on_block="refuse")
        server.fail_next(1, "malformed")
        out = chain.invoke({"question": BENIGN})
        assert "guard unavailable" in out and seen == []
        server.stop()
        out = chain.invoke({"question": "another question"})
    assert "guard unavailable" in out and seen == []


# ---------------------------------------------------------------- speculative input guarding


def _slow(flags: dict[str, int], delay: float = 0.6) -> RunnableLambda[Any, Any]:
    async def afunc(x: Any) -> str:
        flags["started"] += 1
        await asyncio.sleep(delay)
        flags["completed"] += 1
        return f"SECRET OUTPUT for {x}"

    def func(x: Any) -> str:
        flags["started"] += 1
        time.sleep(delay)
        flags["completed"] += 1
        return f"SECRET OUTPUT for {x}"

    return RunnableLambda(func, afunc=afunc, name="slow_model")


async def test_speculative_input_cancels_the_wrapped_run_on_block(server: FakeGuardServer) -> None:
    server.faults = FaultPlan(latency=0.3)
    flags = {"started": 0, "completed": 0}
    rec = Recorder()
    async with Guard.from_endpoint(server.base_url, FLEX, cache=False) as g:
        chain = guarded(_slow(flags), g, parallel_input=True, on_block="refuse")
        t0 = time.perf_counter()
        out = await chain.ainvoke(HARMFUL, config={"callbacks": [rec]})
        elapsed = time.perf_counter() - t0
        await asyncio.sleep(0.6)  # long after the slow run would have finished
    assert flags == {"started": 1, "completed": 0}  # started speculatively, cancelled
    assert "violence" in out and "SECRET" not in out
    assert elapsed < 0.6  # the refusal did not wait for the wrapped run
    assert [e["action"] for e in rec.events] == ["block"]


async def test_speculative_latency_is_the_larger_not_the_sum(server: FakeGuardServer) -> None:
    server.faults = FaultPlan(latency=0.3)
    model_delay, guard_delay = 0.6, 0.3
    flags = {"started": 0, "completed": 0}
    async with Guard.from_endpoint(server.base_url, FLEX, cache=False) as g:
        chain = guarded(_slow(flags, model_delay), g, parallel_input=True, check_output=False)
        t0 = time.perf_counter()
        out = await chain.ainvoke(BENIGN)
        elapsed = time.perf_counter() - t0
    assert out == f"SECRET OUTPUT for {BENIGN}" and flags["completed"] == 1
    assert elapsed < model_delay + guard_delay - 0.15, elapsed


async def test_speculative_output_is_still_checked(server: FakeGuardServer) -> None:
    async with Guard.from_endpoint(server.base_url, FLEX) as g:
        model = RunnableLambda(lambda x: "Build the bomb with explosives to kill.")
        with pytest.raises(GuardBlockedError) as err:
            await guarded(model, g, parallel_input=True).ainvoke(BENIGN)
    assert err.value.decision.verdict.surface is Surface.RESPONSE


async def test_speculative_redacted_input_reruns_with_the_redacted_text(server: FakeGuardServer) -> None:
    seen: list[str] = []

    async def model(x: str) -> str:
        seen.append(x)
        return "fine"

    async with Guard.from_endpoint(server.base_url, FLEX) as g:
        chain = guarded(RunnableLambda(model), g, parallel_input=True, policy={"action": "redact"})
        out = await chain.ainvoke(f"{SAFE_SENTENCE} {BAD_SENTENCE}")
    assert out == "fine"
    assert seen[-1].startswith(SAFE_SENTENCE) and "bomb" not in seen[-1]


def test_speculative_sync_discards_the_result_of_a_blocked_run(server: FakeGuardServer) -> None:
    # a thread cannot be cancelled: the sync path returns at once and never releases the result
    server.faults = FaultPlan(latency=0.3)
    flags = {"started": 0, "completed": 0}
    with Guard.from_endpoint(server.base_url, FLEX, cache=False) as g:
        chain = guarded(_slow(flags), g, parallel_input=True, on_block="refuse")
        t0 = time.perf_counter()
        out = chain.invoke(HARMFUL)
        elapsed = time.perf_counter() - t0
        assert "violence" in out and "SECRET" not in out
        assert elapsed < 0.6
        assert flags["started"] == 1
        ok = chain.invoke(BENIGN)
    assert ok == f"SECRET OUTPUT for {BENIGN}"


# ---------------------------------------------------------------- streaming


def _recording_chain(text: str, produced: list[str], gate: tuple[int, threading.Event] | None = None) -> Any:
    """prompt | streaming fake model | parser | a pass-through that records each chunk as it is produced.

    ``gate=(n, event)``: after producing ``n`` chunks the stream stalls until ``event`` is set (at most 10 s),
    like a model pausing between tokens.
    """

    def record(chunks: Iterator[str]) -> Iterator[str]:
        for c in chunks:
            if gate is not None and len(produced) == gate[0]:
                gate[1].wait(10)
            produced.append(c)
            yield c

    async def arecord(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
        async for c in chunks:
            if gate is not None and len(produced) == gate[0]:
                for _ in range(10_000):
                    if gate[1].is_set():
                        break
                    await asyncio.sleep(0.001)
            produced.append(c)
            yield c

    prompt = ChatPromptTemplate.from_messages([("human", "{question}")])
    return prompt | fake_model(text) | StrOutputParser() | RunnableGenerator(record, arecord)


def produced_chunks(text: str) -> list[str]:
    """The chunks GenericFakeChatModel streams for ``text`` (words and the spaces between them)."""
    return [c.text for c in fake_model(text).stream("x")]


def _assert_checked_before_release(yielded: list[tuple[str, int]], server: FakeGuardServer) -> None:
    """Every released piece of text had been sent to the guard before it was yielded."""
    reqs = server.requests
    for text, n_requests in yielded:
        if text.strip():
            checked = " ".join(r.moderated_text or "" for r in reqs[:n_requests])
            assert text.strip() in checked, f"{text!r} was yielded before any check saw it"


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_stream_never_yields_blocked_text(server: FakeGuardServer, mode: str) -> None:
    produced: list[str] = []
    yielded: list[tuple[str, int]] = []
    produced_at_first_yield = -1
    # the source stalls two chunks after the safe sentence until the consumer has received something: the
    # sentence's check runs while the source is pulled, and what passed goes out while the source waits
    first_words = SAFE_SENTENCE.split()
    first_received = threading.Event()
    gate = (2 * len(first_words) + 2, first_received)
    async with Guard.from_endpoint(server.base_url, FLEX) as g:
        chain = guarded(
            _recording_chain(STREAM_TEXT, produced, gate),
            g,
            input_key="question",
            on_block="refuse",
            stream_chunk_chars=20,
        )
        stream: Any = (
            chain.stream({"question": "tell me about Paris"})
            if mode == "sync"
            else chain.astream({"question": "tell me about Paris"})
        )
        if mode == "sync":
            for chunk in stream:
                if produced_at_first_yield < 0:
                    produced_at_first_yield = len(produced)
                    first_received.set()
                yielded.append((chunk, len(server.requests)))
        else:
            async for chunk in stream:
                if produced_at_first_yield < 0:
                    produced_at_first_yield = len(produced)
                    first_received.set()
                yielded.append((chunk, len(server.requests)))
    texts = [t for t, _ in yielded]
    assert all(isinstance(t, str) for t in texts)  # the wrapped chain's chunk type
    for t in texts:
        assert not any(w in t for w in BAD_WORDS), f"blocked text leaked: {t!r}"
        assert "lovely" not in t  # nothing after the block either
    # the safe sentence was released, word by word, as soon as its check passed
    assert "".join(texts[:-1]).strip() == SAFE_SENTENCE
    assert len(texts) > 3
    assert "violence" in texts[-1]  # the stream ended with the refusal
    # held back until checked: the first release came after the sentence end, and while the source was
    # stalled at the gate (before the model was done): the check did not wait for more of the stream
    assert 2 * len(first_words) - 1 <= produced_at_first_yield <= gate[0]
    assert produced_at_first_yield < len(produced)
    _assert_checked_before_release(yielded[:-1], server)


LONG_ANSWER = (
    "Paris is the capital of France, and it is a lovely city. "
    "It has many museums, among them the Louvre, the Musee d'Orsay and the Centre Pompidou, and most of them "
    "open late on one evening a week. The metro reaches every district, and the river boats stop near the "
    "big sights. Spring and autumn are the best seasons for a visit."
)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"stream_first_chunk_chars": 0}, "stream_first_chunk_chars must be an integer of at least 1"),
        ({"stream_chunk_chars": 0}, "stream_chunk_chars must be an integer of at least 1"),
    ],
)
def test_bad_stream_window_sizes_fail_when_the_wrapper_is_built(kwargs: dict[str, Any], message: str) -> None:
    guard = Guard.from_endpoint("http://127.0.0.1:9/v1", FLEX)
    with pytest.raises(ValueError, match=message):
        guarded(fake_model("hi"), guard, **kwargs)


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("first", [50, None])
async def test_stream_first_window_is_small_by_default(server: FakeGuardServer, mode: str, first: int | None) -> None:
    """The first token waits for one short check (stream_first_chunk_chars), later windows are full size."""
    kwargs: dict[str, Any] = {} if first == 50 else {"stream_first_chunk_chars": first}
    async with Guard.from_endpoint(server.base_url, FLEX) as g:
        chain = guarded(fake_model(LONG_ANSWER), g, check_input=False, **kwargs)
        if mode == "sync":
            got = "".join(c.text for c in chain.stream("tell me about Paris"))
        else:
            got = "".join([c.text async for c in chain.astream("tell me about Paris")])
    assert got == LONG_ANSWER
    # windows in stream order (their checks run concurrently, so the server may receive them in any order)
    windows = sorted(
        (r.moderated_text or "" for r in server.requests if r.mode == "response"),
        key=lambda w: LONG_ANSWER.index(w.strip()),
    )
    if first == 50:
        assert windows[0].strip() == "Paris is the capital of France, and it is a lovely city."
        assert all(len(w) >= 200 for w in windows[1:-1])  # then full windows (plus their context)
    else:
        assert len(windows[0]) >= 200  # the first window like the others
    assert len(windows) >= 2


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_stream_of_a_chat_model_keeps_the_chunk_type(server: FakeGuardServer, mode: str) -> None:
    answer = f"{SAFE_SENTENCE} Museums are open late on Fridays."
    async with Guard.from_endpoint(server.base_url, FLEX) as g:
        plain = fake_model(answer)
        chain = guarded(fake_model(answer), g, stream_chunk_chars=20)
        if mode == "sync":
            expected = list(plain.stream("hi"))
            got = list(chain.stream("hi"))
        else:
            expected = [c async for c in plain.astream("hi")]
            got = [c async for c in chain.astream("hi")]
    assert [type(c) for c in got] == [type(c) for c in expected]
    assert all(isinstance(c, AIMessageChunk) for c in got)
    assert "".join(c.text for c in got) == answer  # all held-back text released when safe


async def test_stream_types_match_the_wrapped_chain(server: FakeGuardServer) -> None:
    answer = "Paris has many museums. The Louvre is the largest."
    async with Guard.from_endpoint(server.base_url, FLEX) as g:
        plain_types = [type(c) for c in lcel_chain(answer).stream({"question": "q"})]
        guarded_chunks = list(guarded(lcel_chain(answer), g, input_key="question").stream({"question": "q"}))
        aguarded = [c async for c in guarded(lcel_chain(answer), g, input_key="question").astream({"question": "q"})]
    assert [type(c) for c in guarded_chunks] == plain_types
    assert "".join(guarded_chunks) == answer == "".join(aguarded)


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_stream_block_with_raise(server: FakeGuardServer, mode: str) -> None:
    got: list[str] = []
    async with Guard.from_endpoint(server.base_url, FLEX) as g:
        chain = guarded(fake_model(STREAM_TEXT), g, stream_chunk_chars=20)

        async def consume() -> None:
            if mode == "sync":
                for c in chain.stream("hi"):
                    got.append(c.text)
            else:
                async for c in chain.astream("hi"):
                    got.append(c.text)

        with pytest.raises(GuardBlockedError):
            await consume()
    assert "".join(got).strip() == SAFE_SENTENCE
    assert not any(w in "".join(got) for w in BAD_WORDS)


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_stream_blocked_input_yields_only_the_refusal(server: FakeGuardServer, mode: str) -> None:
    model = fake_model("never streamed")
    async with Guard.from_endpoint(server.base_url, FLEX) as g:
        chain = guarded(model, g, on_block="refuse")
        if mode == "sync":
            got = list(chain.stream([HumanMessage(HARMFUL)]))
        else:
            got = [c async for c in chain.astream([HumanMessage(HARMFUL)])]
    assert len(got) == 1 and "violence" in got[0].text
    assert next(model.messages).text == "never streamed"


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_stream_first_leaks_by_design(server: FakeGuardServer, mode: str) -> None:
    """stream_first releases text before its check: lower latency, but blocked text can escape (documented)."""
    produced: list[str] = []
    blocked = threading.Event()

    class StopSeen(BaseCallbackHandler):
        def on_custom_event(self, name: str, data: Any, *, run_id: UUID, **kw: Any) -> None:
            if name == VERDICT_EVENT and data["where"] == "stream" and data["action"] != "allow":
                blocked.set()

    # the source stalls before "Have a lovely trip." until the block has been decided (at most 10 s)
    gate = (len(produced_chunks(f"{SAFE_SENTENCE} {BAD_SENTENCE} ")), blocked)
    config: Any = {"callbacks": [StopSeen()]}
    async with Guard.from_endpoint(server.base_url, FLEX) as g:
        chain = guarded(
            _recording_chain(STREAM_TEXT, produced, gate),
            g,
            input_key="question",
            on_block="refuse",
            stream_first=True,
            stream_chunk_chars=20,
        )
        q = {"question": "hi"}
        if mode == "sync":
            got = list(chain.stream(q, config))
        else:
            got = [c async for c in chain.astream(q, config)]
    leaked = "".join(got[:-1])
    assert "bomb" in leaked  # released before the check that blocked it
    assert "violence" in got[-1]  # ...but the stream still ends with the refusal
    assert "lovely" not in "".join(got)  # and stops there
    assert "lovely" not in "".join(produced)  # the source was not pulled past the block


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_stream_redact_releases_only_the_redacted_rest(server: FakeGuardServer, mode: str) -> None:
    answer = f"{SAFE_SENTENCE} {BAD_SENTENCE}"
    async with Guard.from_endpoint(server.base_url, FLEX) as g:
        chain = guarded(fake_model(answer), g, policy={"action": "redact"}, stream_chunk_chars=20)
        if mode == "sync":
            got = [c.text for c in chain.stream("hi")]
        else:
            got = [c.text async for c in chain.astream("hi")]
    text = "".join(got)
    assert not any(w in text for w in BAD_WORDS)
    assert "[REDACTED: VIOLENCE]" in text
    assert text.count("today") == 1, f"released text repeated: {text!r}"
    assert text.startswith(SAFE_SENTENCE)


def test_qwen_family_through_guarded(server: FakeGuardServer) -> None:
    with Guard.from_endpoint(server.base_url, QWEN) as g:
        chain = guarded(lcel_chain("Paris."), g, input_key="question", on_block="refuse")
        assert chain.invoke({"question": BENIGN}) == "Paris."
        assert "violence" in chain.invoke({"question": HARMFUL})


# ---------------------------------------------------------------- speculative input guarding of streams


def _slow_stream(
    flags: dict[str, Any], delay: float, text: str = f"SECRET {SAFE_SENTENCE}", word_delay: float = 0.0
) -> Any:
    """A streaming runnable that waits ``delay`` before its first word (and ``word_delay`` between words);
    records what it received, when it started, how many words it produced, and whether it was closed."""
    words = [w + " " for w in text.split(" ")]

    def gen(inputs: Iterator[Any]) -> Iterator[str]:
        flags["inputs"].append(next(iter(inputs)))
        flags["started"] = time.perf_counter()
        try:
            time.sleep(delay)
            for w in words:
                flags["produced"] += 1
                yield w
                time.sleep(word_delay)
            flags["finished"] = True
        finally:
            flags["closed"] = True

    async def agen(inputs: AsyncIterator[Any]) -> AsyncIterator[str]:
        async for x in inputs:
            flags["inputs"].append(x)
        flags["started"] = time.perf_counter()
        try:
            await asyncio.sleep(delay)
            for w in words:
                flags["produced"] += 1
                yield w
                await asyncio.sleep(word_delay)
            flags["finished"] = True
        finally:
            flags["closed"] = True

    return RunnableGenerator(gen, agen, name="slow_stream")


def _flags() -> dict[str, Any]:
    return {"inputs": [], "started": None, "produced": 0, "finished": False, "closed": False}


async def _collect(chain: Any, value: Any, mode: str, config: Any = None) -> list[Any]:
    if mode == "sync":
        return await asyncio.to_thread(lambda: list(chain.stream(value, config)))
    return [c async for c in chain.astream(value, config)]


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_speculative_stream_refuses_and_releases_nothing_of_the_run(server: FakeGuardServer, mode: str) -> None:
    server.faults = FaultPlan(latency=0.3)
    flags = _flags()
    rec = Recorder()
    async with Guard.from_endpoint(server.base_url, FLEX, cache=False) as g:
        model = _slow_stream(flags, 0.05, word_delay=0.1)  # about 0.9 s of stream
        chain = guarded(model, g, parallel_input=True, on_block="refuse", stream_chunk_chars=10)
        t_call = time.perf_counter()
        got = await _collect(chain, HARMFUL, mode, {"callbacks": [rec]})
    assert len(got) == 1 and "violence" in got[0] and "SECRET" not in got[0]
    # the run had started speculatively, before the 0.3 s input check could answer, and was then closed
    assert flags["started"] is not None and flags["started"] - t_call < 0.25
    for _ in range(100):  # sync: the producer thread closes the stream at its next word
        if flags["closed"]:
            break
        await asyncio.sleep(0.02)
    assert flags["closed"] and not flags["finished"]
    # only the input decision was reported: the stale run's stream checks are not
    assert [(e["where"], e["action"]) for e in rec.events] == [("input", "block")]


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_speculative_stream_hides_the_input_check(server: FakeGuardServer, mode: str) -> None:
    server.faults = FaultPlan(latency=0.25)
    model_delay = 0.4
    outs: dict[bool, list[Any]] = {}
    times: dict[bool, float] = {}
    async with Guard.from_endpoint(server.base_url, FLEX, cache=False) as g:
        for parallel in (False, True):
            flags = _flags()
            chain = guarded(_slow_stream(flags, model_delay), g, parallel_input=parallel, stream_chunk_chars=500)
            t0 = time.perf_counter()
            outs[parallel] = await _collect(chain, BENIGN, mode)
            times[parallel] = time.perf_counter() - t0
            assert flags["finished"] and flags["inputs"] == [BENIGN]
    assert outs[True] == outs[False] and "".join(outs[True]).strip() == f"SECRET {SAFE_SENTENCE}"
    # serial: input check + model + one output check (~0.9 s); speculative: model + output check (~0.65 s)
    assert times[False] > 0.85, times
    assert times[True] < times[False] - 0.15, times


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_speculative_stream_output_is_still_moderated(server: FakeGuardServer, mode: str) -> None:
    flags = _flags()
    async with Guard.from_endpoint(server.base_url, FLEX) as g:
        chain = guarded(
            _slow_stream(flags, 0.0, STREAM_TEXT), g, parallel_input=True, on_block="refuse", stream_chunk_chars=20
        )
        got = await _collect(chain, BENIGN, mode)
    text = "".join(got[:-1])
    assert text.strip() == SAFE_SENTENCE and "violence" in got[-1]
    assert not any(w in text for w in BAD_WORDS)


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_speculative_stream_redacted_input_reruns_with_the_redacted_text(
    server: FakeGuardServer, mode: str
) -> None:
    flags = _flags()
    async with Guard.from_endpoint(server.base_url, FLEX) as g:
        chain = guarded(_slow_stream(flags, 0.0), g, parallel_input=True, policy={"action": "redact"})
        got = await _collect(chain, f"{SAFE_SENTENCE} {BAD_SENTENCE}", mode)
    assert "".join(got).strip() == f"SECRET {SAFE_SENTENCE}"  # the rerun's stream, whole
    assert len(flags["inputs"]) == 2  # the speculative run (stale) and the rerun
    assert flags["inputs"][-1].startswith(SAFE_SENTENCE) and "bomb" not in flags["inputs"][-1]


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_speculative_stream_raises_the_input_decision(server: FakeGuardServer, mode: str) -> None:
    flags = _flags()
    async with Guard.from_endpoint(server.base_url, FLEX) as g:
        # the stream itself would be blocked too: the input decision is the one raised
        chain = guarded(_slow_stream(flags, 0.0, BAD_SENTENCE), g, parallel_input=True, stream_chunk_chars=10)
        with pytest.raises(GuardBlockedError) as err:
            await _collect(chain, HARMFUL, mode)
    assert err.value.decision.surface is Surface.PROMPT
