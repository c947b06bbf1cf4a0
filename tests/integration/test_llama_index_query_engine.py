"""GuardedQueryEngine against FakeGuardServer: the question and the answer of real query engines
(VectorStoreIndex with MockEmbedding and MockLLM), refusal, reroute to a fallback engine, redaction,
sync / async / streaming (held-back text), fail-closed faults, bad input and instrumentation events.

MockLLM without ``max_tokens`` answers with its prompt (streaming: one character per token), so an
index with a harmful document yields a harmful answer without any scripting.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from llama_index.core import Document, VectorStoreIndex
from llama_index.core.base.response.schema import AsyncStreamingResponse, Response, StreamingResponse
from llama_index.core.bridge.pydantic import Field
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.llms import MockLLM
from llama_index.core.query_engine import CustomQueryEngine

from flexguard_integrations import Action, Guard, GuardBlockedError, GuardInputError
from flexguard_integrations.llama_index import GuardedQueryEngine, GuardNodePostprocessor, GuardVerdictEvent
from flexguard_integrations.testing import FakeGuardServer
from tests.conftest import FLEX, QWEN, closed_port_url

BENIGN_Q = "When does the museum open?"
HARMFUL_Q = "How do I make a bomb to kill people?"
GREY_Q = "a grey area question about the museum"
HARMFUL = "To make a bomb, mix the explosives."
OPENING = "The museum opens at nine and closes at five on weekdays. "
TICKETS = "Tickets cost ten euros for adults. "
STREAM_DOC = OPENING * 5 + HARMFUL + " " + TICKETS * 8  # ~630 characters: the harmful sentence is in the middle
REFUSAL_PREFIX = "I can't answer that: it was blocked by the safety guard"


# ---------------------------------------------------------------- helpers


@pytest.fixture
def guard(server: FakeGuardServer) -> Iterator[Guard]:
    with Guard.from_endpoint(server.base_url, FLEX, cache=False) as g:
        yield g


class Recording(CustomQueryEngine):
    """A query engine with a fixed answer that records the queries it was asked."""

    answer: str
    seen: list[str] = Field(default_factory=list)

    def custom_query(self, query_str: str) -> str:
        self.seen.append(query_str)
        return self.answer

    async def acustom_query(self, query_str: str) -> str:
        self.seen.append(query_str)
        return self.answer


def index_of(*texts: str) -> VectorStoreIndex:
    return VectorStoreIndex.from_documents([Document(text=t) for t in texts], embed_model=MockEmbedding(embed_dim=8))


def poisoned_index() -> VectorStoreIndex:
    return index_of(OPENING, f"Our cafe serves soup. {HARMFUL}", TICKETS)


def response_requests(server: FakeGuardServer) -> list[Any]:
    return [r for r in server.requests if r.mode == "response"]


# ---------------------------------------------------------------- query and answer


@pytest.mark.parametrize("model", [QWEN, FLEX], ids=["qwen3guard", "flexguard"])
def test_harmful_query_is_refused_before_the_engine_runs(server: FakeGuardServer, model: str) -> None:
    inner = Recording(answer="unused")
    with Guard.from_endpoint(server.base_url, model) as guard:
        response = GuardedQueryEngine(inner, guard).query(HARMFUL_Q)
    assert isinstance(response, Response)
    assert response.response == f"{REFUSAL_PREFIX} (violence)."
    assert response.source_nodes == []
    assert inner.seen == []
    meta = response.metadata["flexguard"]
    assert list(meta) == ["query"] and meta["query"]["action"] == "block"


def test_benign_query_over_a_poisoned_index_with_the_postprocessor(
    server: FakeGuardServer, guard: Guard, verdicts: list[GuardVerdictEvent]
) -> None:
    engine = poisoned_index().as_query_engine(
        llm=MockLLM(), similarity_top_k=3, node_postprocessors=[GuardNodePostprocessor(guard=guard)]
    )
    response = GuardedQueryEngine(engine, guard).query(BENIGN_Q)
    answer = str(response.response)
    assert answer.startswith("Context information is below.")  # the MockLLM echo: the answer went through
    assert HARMFUL not in answer and OPENING.strip() in answer
    assert len(response.source_nodes) == 2
    meta = response.metadata["flexguard"]
    assert meta["query"]["action"] == "allow" and meta["response"]["action"] == "allow"
    assert meta["response"]["surface"] == "response"
    checked = response_requests(server)[-1]
    assert checked.moderated_text == answer
    assert BENIGN_Q in checked.json["messages"][0]["content"]
    wheres = [e.where for e in verdicts]
    assert wheres.count("node_postprocessor") == 3
    assert wheres[0] == "query_engine:query" and wheres[-1] == "query_engine:response"


def test_harmful_answer_is_refused(server: FakeGuardServer, guard: Guard, verdicts: list[GuardVerdictEvent]) -> None:
    engine = poisoned_index().as_query_engine(llm=MockLLM(), similarity_top_k=3)  # no postprocessor
    response = GuardedQueryEngine(engine, guard).query(BENIGN_Q)
    assert response.response == f"{REFUSAL_PREFIX} (violence)."
    assert response.source_nodes == []
    meta = response.metadata["flexguard"]
    assert meta["query"]["action"] == "allow"
    assert meta["response"]["action"] == "block" and meta["response"]["verdict"]["categories"] == ["VIOLENCE"]
    assert HARMFUL in (response_requests(server)[-1].moderated_text or "")
    assert [(e.where, e.action) for e in verdicts] == [
        ("query_engine:query", "allow"),
        ("query_engine:response", "block"),
    ]


async def test_async_query_and_answer(server: FakeGuardServer, guard: Guard) -> None:
    engine = poisoned_index().as_query_engine(llm=MockLLM(), similarity_top_k=3)
    guarded = GuardedQueryEngine(engine, guard)
    refused = await guarded.aquery(HARMFUL_Q)
    assert refused.response == f"{REFUSAL_PREFIX} (violence)."
    blocked_answer = await guarded.aquery(BENIGN_Q)
    assert blocked_answer.response == f"{REFUSAL_PREFIX} (violence)."
    assert blocked_answer.metadata["flexguard"]["response"]["action"] == "block"
    clean = await GuardedQueryEngine(index_of(OPENING, TICKETS).as_query_engine(llm=MockLLM()), guard).aquery(BENIGN_Q)
    assert str(clean.response).startswith("Context information is below.")
    assert clean.metadata["flexguard"]["response"]["action"] == "allow"
    await guard.aclose()


def test_answer_is_checked_with_the_query_as_context(server: FakeGuardServer, guard: Guard) -> None:
    answer = "The museum opens at nine in the morning and closes at five in the afternoon on weekdays."
    GuardedQueryEngine(Recording(answer=answer), guard).query(BENIGN_Q)
    sent = response_requests(server)[-1].json["messages"][0]["content"]
    assert f"USER: {BENIGN_Q}" in sent and f"ASSISTANT: {answer}" in sent


def test_short_answer_is_checked_with_the_whole_query(server: FakeGuardServer) -> None:
    with Guard.from_endpoint(server.base_url, QWEN) as guard:
        GuardedQueryEngine(Recording(answer="At nine."), guard).query(BENIGN_Q)
    assert response_requests(server)[-1].json["messages"][0] == {"role": "user", "content": BENIGN_Q}


# ---------------------------------------------------------------- reroute, redact, raise, options

REROUTE_GREY = {"rules": [{"when": {"min_score": 41, "max_score": 60}, "then": {"reroute": "human_review"}}]}


def test_reroute_to_a_named_fallback_engine(server: FakeGuardServer, guard: Guard) -> None:
    server.add_rule("grey area question", score=50, categories=("ILLEGAL",))
    main, review = Recording(answer="main"), Recording(answer="A human will review your question.")
    guarded = GuardedQueryEngine(main, guard, policy=REROUTE_GREY, fallback_engines={"human_review": review})
    response = guarded.query(GREY_Q)
    assert response.response == "A human will review your question."
    assert main.seen == [] and review.seen == [GREY_Q]
    meta = response.metadata["flexguard"]
    assert meta["query"]["action"] == "reroute" and meta["query"]["route"] == "human_review"
    assert meta["response"]["action"] == "allow"  # the fallback's answer is checked too
    assert guarded.query(BENIGN_Q).response == "main"


async def test_reroute_async_and_unknown_route_refuses(server: FakeGuardServer, guard: Guard) -> None:
    server.add_rule("grey area question", score=50, categories=("ILLEGAL",))
    review = Recording(answer="Escalated.")
    rerouted = await GuardedQueryEngine(
        Recording(answer="main"), guard, policy=REROUTE_GREY, fallback_engines={"human_review": review}
    ).aquery(GREY_Q)
    assert rerouted.response == "Escalated." and review.seen == [GREY_Q]
    main = Recording(answer="main")
    refused = await GuardedQueryEngine(main, guard, policy=REROUTE_GREY).aquery(GREY_Q)
    assert refused.response == f"{REFUSAL_PREFIX} (illegal)."
    assert main.seen == []
    await guard.aclose()


def test_reroute_to_a_real_index_engine(server: FakeGuardServer, guard: Guard) -> None:
    # prompt mode only: the MockLLM echo repeats the query in the answer
    server.add_rule("grey area question", score=50, categories=("ILLEGAL",), mode="prompt")
    fallback = index_of(OPENING).as_query_engine(llm=MockLLM())
    response = GuardedQueryEngine(
        Recording(answer="main"), guard, policy=REROUTE_GREY, fallback_engines={"human_review": fallback}
    ).query(GREY_Q)
    assert OPENING.strip() in str(response.response)
    assert len(response.source_nodes) == 1


def test_redacted_query_reaches_the_engine(server: FakeGuardServer, guard: Guard) -> None:
    inner = Recording(answer="We open at nine in the morning on weekdays.")
    policy = {"surfaces": {"prompt": {"action": "redact"}}}
    response = GuardedQueryEngine(inner, guard, policy=policy).query(f"When do you open? {HARMFUL_Q}")
    assert inner.seen == ["When do you open? [REDACTED: VIOLENCE]"]
    assert response.metadata["flexguard"]["query"]["action"] == "redact"
    assert response.response == "We open at nine in the morning on weekdays."


def test_redacted_answer(server: FakeGuardServer, guard: Guard) -> None:
    inner = Recording(answer=f"We open at nine. {HARMFUL} Tickets cost ten euros.")
    policy = {"surfaces": {"response": {"action": "redact"}}}
    response = GuardedQueryEngine(inner, guard, policy=policy).query(BENIGN_Q)
    assert response.response == "We open at nine. [REDACTED: VIOLENCE] Tickets cost ten euros."
    assert response.metadata["flexguard"]["response"]["action"] == "redact"


def test_on_block_raise(guard: Guard) -> None:
    with pytest.raises(GuardBlockedError) as info:
        GuardedQueryEngine(Recording(answer="x"), guard, on_block="raise").query(HARMFUL_Q)
    assert info.value.decision.action is Action.BLOCK
    with pytest.raises(GuardBlockedError):
        GuardedQueryEngine(Recording(answer=HARMFUL), guard, on_block="raise").query(BENIGN_Q)


def test_custom_refusal_and_switching_checks_off(guard: Guard) -> None:
    template = "Sorry ({categories}, risk {risk_score})."
    assert GuardedQueryEngine(Recording(answer="x"), guard, refusal=template).query(HARMFUL_Q).response == (
        "Sorry (violence, risk 92)."
    )
    inner = Recording(answer=HARMFUL)
    unchecked_query = GuardedQueryEngine(inner, guard, check_query=False, check_response=False).query(HARMFUL_Q)
    assert unchecked_query.response == HARMFUL and inner.seen == [HARMFUL_Q]
    assert unchecked_query.metadata["flexguard"] == {}
    only_query = GuardedQueryEngine(Recording(answer=HARMFUL), guard, check_response=False).query(BENIGN_Q)
    assert only_query.response == HARMFUL and list(only_query.metadata["flexguard"]) == ["query"]


# ---------------------------------------------------------------- streaming


def stream_engine() -> Any:
    return index_of(STREAM_DOC).as_query_engine(llm=MockLLM(), streaming=True)


def assert_held_back(tokens: list[str], refusal: str) -> None:
    released = "".join(tokens[:-1])
    assert released.startswith("Context information is below.")
    assert "museum opens at nine" in released  # checked text before the harmful sentence was released
    assert not any("bomb" in t or "explosives" in t for t in tokens)
    assert TICKETS.strip() not in "".join(tokens)  # nothing after the block is released
    assert tokens[-1] == refusal


def test_stream_holds_back_the_harmful_sentence(server: FakeGuardServer, guard: Guard) -> None:
    response = GuardedQueryEngine(stream_engine(), guard).query(BENIGN_Q)
    assert isinstance(response, StreamingResponse)
    tokens = list(response.response_gen)
    assert_held_back(tokens, f"{REFUSAL_PREFIX} (violence).")
    assert response.metadata["flexguard"]["response"]["action"] == "block"
    assert len(response.source_nodes) == 1


async def test_async_stream_holds_back_the_harmful_sentence(
    server: FakeGuardServer, guard: Guard, verdicts: list[GuardVerdictEvent]
) -> None:
    response = await GuardedQueryEngine(stream_engine(), guard).aquery(BENIGN_Q)
    assert isinstance(response, AsyncStreamingResponse)
    tokens = [t async for t in response.async_response_gen()]
    assert_held_back(tokens, f"{REFUSAL_PREFIX} (violence).")
    assert response.metadata["flexguard"]["response"]["action"] == "block"
    assert ("query_engine:stream", "block") in [(e.where, e.action) for e in verdicts]
    await guard.aclose()


def test_stream_raise(guard: Guard) -> None:
    response = GuardedQueryEngine(stream_engine(), guard, on_block="raise").query(BENIGN_Q)
    tokens: list[str] = []

    def consume() -> None:
        for token in response.response_gen:
            tokens.append(token)

    with pytest.raises(GuardBlockedError):
        consume()
    assert "museum opens at nine" in "".join(tokens)
    assert not any("bomb" in t for t in tokens)


async def test_clean_stream_passes_unchanged(server: FakeGuardServer, guard: Guard) -> None:
    index = index_of(OPENING * 5, TICKETS * 8)
    plain = "".join(index.as_query_engine(llm=MockLLM(), streaming=True).query(BENIGN_Q).response_gen)
    guarded = GuardedQueryEngine(index.as_query_engine(llm=MockLLM(), streaming=True), guard)
    assert "".join(guarded.query(BENIGN_Q).response_gen) == plain
    response = await guarded.aquery(BENIGN_Q)
    assert "".join([t async for t in response.async_response_gen()]) == plain
    assert len(response_requests(server)) >= 6  # several windows checked per stream
    await guard.aclose()


def test_bad_stream_window_sizes_fail_when_the_engine_is_built(guard: Guard) -> None:
    with pytest.raises(ValueError, match=r"stream_first_chunk_chars must be an integer of at least 1 .*got 0"):
        GuardedQueryEngine(stream_engine(), guard, stream_first_chunk_chars=0)
    with pytest.raises(ValueError, match="stream_chunk_chars must be an integer of at least 1, got -5"):
        GuardedQueryEngine(stream_engine(), guard, stream_chunk_chars=-5)


@pytest.mark.parametrize("first", [50, None])
async def test_stream_first_window_is_small_by_default(
    server: FakeGuardServer, guard: Guard, first: int | None
) -> None:
    kwargs: dict[str, Any] = {} if first == 50 else {"stream_first_chunk_chars": first}
    index = index_of(OPENING * 5, TICKETS * 8)
    engine = GuardedQueryEngine(index.as_query_engine(llm=MockLLM(), streaming=True), guard, **kwargs)
    answer = "".join(engine.query(BENIGN_Q).response_gen)
    response = await engine.aquery(BENIGN_Q)
    assert "".join([t async for t in response.async_response_gen()]) == answer
    checked = [r.moderated_text or "" for r in response_requests(server)]
    half = len(checked) // 2
    # the checks run concurrently (any arrival order): compare the windows as multisets
    assert sorted(checked[:half]) == sorted(checked[half:])  # sync and async cut the same windows
    opening = [w for w in checked[:half] if answer.startswith(w.strip())]  # the first: no context before it
    assert len(opening) == 1
    if first == 50:
        assert 50 <= len(opening[0]) < 100  # at the first sentence end past 50 characters
        assert half >= 3
    else:
        assert len(opening[0]) >= 200


def test_clean_stream_reports_its_verdicts(
    server: FakeGuardServer, guard: Guard, verdicts: list[GuardVerdictEvent]
) -> None:
    response = GuardedQueryEngine(index_of(OPENING * 5).as_query_engine(llm=MockLLM(), streaming=True), guard).query(
        BENIGN_Q
    )
    list(response.response_gen)
    assert response.metadata["flexguard"]["response"]["action"] == "allow"
    assert len([e for e in verdicts if e.where.startswith("query_engine:stream")]) == len(response_requests(server))


def test_stream_redaction_matches_the_non_streaming_answer(guard: Guard) -> None:
    policy = {"surfaces": {"response": {"action": "redact"}}}
    index = index_of(STREAM_DOC)
    whole = GuardedQueryEngine(index.as_query_engine(llm=MockLLM()), guard, policy=policy).query(BENIGN_Q)
    assert "[REDACTED: VIOLENCE]" in str(whole.response) and TICKETS.strip() in str(whole.response)
    streamed = GuardedQueryEngine(index.as_query_engine(llm=MockLLM(), streaming=True), guard, policy=policy)
    tokens = list(streamed.query(BENIGN_Q).response_gen)
    assert not any("bomb" in t for t in tokens)
    assert "".join(tokens) == whole.response


# ---------------------------------------------------------------- faults: fail-closed


def test_server_down_refuses_without_running_the_engine() -> None:
    inner = Recording(answer="never")
    with Guard.from_endpoint(closed_port_url(), QWEN, timeout=2, max_retries=0) as guard:
        response = GuardedQueryEngine(inner, guard).query(BENIGN_Q)
    assert response.response == f"{REFUSAL_PREFIX} (guard unavailable)."
    assert inner.seen == []
    assert response.metadata["flexguard"]["query"]["verdict"]["error"]


@pytest.mark.parametrize("fault", ["503", "malformed", "truncated", "bad_shape"])
async def test_a_fault_on_the_answer_check_refuses(server: FakeGuardServer, fault: str) -> None:
    server.add_rule("secret recipe", fault=fault, mode="response")
    async with Guard.from_endpoint(server.base_url, FLEX, max_retries=0) as guard:
        response = await GuardedQueryEngine(Recording(answer="The secret recipe is flour."), guard).aquery(BENIGN_Q)
    assert response.response == f"{REFUSAL_PREFIX} (guard unavailable)."
    meta = response.metadata["flexguard"]
    assert meta["query"]["action"] == "allow"
    assert meta["response"]["action"] == "block" and meta["response"]["verdict"]["error"]


def test_a_fault_in_the_middle_of_a_stream_stops_it(server: FakeGuardServer, guard: Guard) -> None:
    server.add_rule("tickets cost", fault="malformed", mode="response")
    engine = index_of(OPENING * 5 + TICKETS * 8).as_query_engine(llm=MockLLM(), streaming=True)
    response = GuardedQueryEngine(engine, guard).query(BENIGN_Q)
    tokens = list(response.response_gen)
    assert tokens[-1] == f"{REFUSAL_PREFIX} (guard unavailable)."
    assert "museum opens at nine" in "".join(tokens)
    assert TICKETS.strip() not in "".join(tokens)
    assert response.metadata["flexguard"]["response"]["verdict"]["error"]


def test_on_error_allow_marks_the_fail_open(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="flexguard_integrations")
    inner = Recording(answer="We open at nine.")
    with Guard.from_endpoint(closed_port_url(), QWEN, timeout=2, max_retries=0, policy={"on_error": "allow"}) as g:
        response = GuardedQueryEngine(inner, g).query(BENIGN_Q)
    assert response.response == "We open at nine."
    meta = response.metadata["flexguard"]
    assert meta["query"]["fail_open"] is True and meta["response"]["fail_open"] is True
    assert "FAIL-OPEN" in meta["query"]["reason"]
    assert sum("FAIL-OPEN" in r.getMessage() for r in caplog.records) == 2


# ---------------------------------------------------------------- bad input


def test_empty_and_huge_queries_never_reach_the_engine(guard: Guard) -> None:
    inner = Recording(answer="x")
    with pytest.raises(GuardInputError, match="empty"):
        GuardedQueryEngine(inner, guard).query("   ")
    with pytest.raises(GuardInputError, match="over the limit"):
        GuardedQueryEngine(inner, guard).query("q" * 3_000_000)
    assert inner.seen == []


def test_empty_answer_is_passed_through_unchecked(server: FakeGuardServer, guard: Guard) -> None:
    response = GuardedQueryEngine(Recording(answer=""), guard).query(BENIGN_Q)
    assert response.response == ""
    assert list(response.metadata["flexguard"]) == ["query"]
    assert response_requests(server) == []


def test_huge_answer_is_a_fail_closed_refusal(guard: Guard) -> None:
    response = GuardedQueryEngine(Recording(answer="a" * 3_000_000), guard).query(BENIGN_Q)
    assert response.response == f"{REFUSAL_PREFIX} (guard unavailable)."
