"""Regressions from the third LlamaIndex review, against FakeGuardServer and real llama-index 0.14 agents.

1. A REDACT of a ``GuardedAgent`` answer shows only redacted visible text: never the model's thinking,
   citation titles and sources, or document text (the decision still uses every block).
2. The memory rewrite touches only memories that hold a plain chat history (the primary memory of a
   ``SimpleComposableMemory``; a ``VectorMemory`` is left alone with a WARNING) and never raises out of run().
3. A structured response JSON cannot hold is judged (its ``repr`` for the odd values), not a crash.
4. Overlapping runs of one conversation: the rewrite finds the run's own answer by its exact content, never
   another run's later answer, and never rewrites for an answer without text.
5. ``last_decisions`` after a run awaited in a child task (``wait_for``, ``create_task``, ``TaskGroup``,
   ``gather``) gives that run, not an older one.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any, cast

import pytest
from llama_index.core.base.llms.types import CitationBlock, TextBlock, ThinkingBlock
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.llms import ChatMessage, MessageRole
from llama_index.core.memory import (
    ChatMemoryBuffer,
    ChatSummaryMemoryBuffer,
    Memory,
    SimpleComposableMemory,
    VectorMemory,
)
from llama_index.core.memory.types import BaseMemory
from llama_index.core.storage.chat_store import SimpleChatStore
from pydantic import BaseModel, ConfigDict, Field

from flexguard_integrations import Action, Decision, Guard, GuardBlockedError, Surface
from flexguard_integrations.llama_index import GuardedAgent, GuardVerdictEvent
from flexguard_integrations.testing import FakeGuardServer
from tests.conftest import FLEX
from tests.integration.test_llama_index_review_fixes_2 import (
    HARM,
    QUESTION,
    REDACT_RESPONSE,
    REFUSAL,
    Answer,
    agent_of,
    checked,
    dumped,
)

THINK = "The user asks for the hours. Internal: our margin on deliveries is 40 percent, do not mention it."
VISIBLE = f"The shop opens at nine. {HARM}"
REDACTED = "The shop opens at nine. [REDACTED: VIOLENCE]"
CHEMISTRY = "Tell me about chemistry"


@pytest.fixture
def guard(server: FakeGuardServer) -> Iterator[Guard]:
    with Guard.from_endpoint(server.base_url, FLEX, cache=False) as g:
        yield g


async def texts_of(memory: Any) -> list[str]:
    return [str(m.content) for m in await memory.aget_all()]


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "flexguard_integrations" and r.levelno == logging.WARNING]


# ---------------------------------------------------------------- 1. REDACT shows only visible text


async def test_a_redact_never_shows_the_thinking_as_answer_text(
    server: FakeGuardServer, guard: Guard, verdicts: list[GuardVerdictEvent]
) -> None:
    message = ChatMessage(role="assistant", blocks=[ThinkingBlock(content=THINK), TextBlock(text=VISIBLE)])
    memory = ChatMemoryBuffer.from_defaults()
    guarded = GuardedAgent(agent_of(Answer(message)), guard, policy=REDACT_RESPONSE)
    out = await guarded.run(user_msg=QUESTION, memory=memory)
    assert any(THINK in t and HARM in t for t in checked(server, "response"))  # the decision saw every block
    assert out.response.content == REDACTED and [type(b) for b in out.response.blocks] == [TextBlock]
    assert "margin" not in dumped(out) and HARM not in dumped(out)
    assert await texts_of(memory) == [QUESTION, REDACTED]
    assert guarded.last_decisions["output"].action is Action.REDACT
    assert guarded.last_decisions["output"].redacted_text == REDACTED
    assert [(e.where, e.action) for e in verdicts] == [("agent:input", "allow"), ("agent:output", "redact")]


async def test_a_redact_never_shows_citation_titles_or_sources(guard: Guard) -> None:
    citation = CitationBlock(
        cited_content=TextBlock(text="Opening hours 9-17."),
        source="https://intranet/hr/private.pdf",
        title="HR handbook",
        additional_location_info={},
    )
    message = ChatMessage(role="assistant", blocks=[TextBlock(text=VISIBLE), citation])
    memory = ChatMemoryBuffer.from_defaults()
    out = await GuardedAgent(agent_of(Answer(message)), guard, policy=REDACT_RESPONSE).run(
        user_msg=QUESTION, memory=memory
    )
    assert out.response.content == REDACTED
    for hidden in ("HR handbook", "intranet", "Opening hours 9-17", HARM):
        assert hidden not in dumped(out)
    assert await texts_of(memory) == [QUESTION, REDACTED]


async def test_harm_only_in_the_thinking_keeps_the_visible_text_and_drops_the_thinking(guard: Guard) -> None:
    message = ChatMessage(
        role="assistant", blocks=[ThinkingBlock(content=HARM), TextBlock(text="The shop opens at nine.")]
    )
    memory = ChatMemoryBuffer.from_defaults()
    guarded = GuardedAgent(agent_of(Answer(message)), guard, policy=REDACT_RESPONSE)
    out = await guarded.run(user_msg=QUESTION, memory=memory)
    assert out.response.content == "The shop opens at nine." and HARM not in dumped(out)
    assert await texts_of(memory) == [QUESTION, "The shop opens at nine."]
    decision = guarded.last_decisions["output"]
    assert decision.action is Action.REDACT and decision.verdict.risk_score >= 41  # the whole answer's verdict
    assert "the visible text alone passes" in decision.reason


async def test_visible_text_that_fails_on_its_own_is_blocked(server: FakeGuardServer, guard: Guard) -> None:
    # the whole answer is a redactable PRIVACY matter; the visible text, judged alone, is violent: blocked
    server.add_rule(re.compile(r"(?s)^(?!.*REDACTED).*margin.*opens"), score=50, categories=["PRIVACY"])
    server.add_rule("margin", score=50, categories=["PRIVACY"])
    policy = {"rules": [{"when": {"categories": ["PRIVACY"]}, "then": "redact"}]}
    message = ChatMessage(role="assistant", blocks=[ThinkingBlock(content=THINK), TextBlock(text=VISIBLE)])
    memory = ChatMemoryBuffer.from_defaults()
    guarded = GuardedAgent(agent_of(Answer(message)), guard, policy=policy)
    out = await guarded.run(user_msg=QUESTION, memory=memory)
    assert VISIBLE in checked(server, "response")  # the second check: the visible text alone
    assert out.response.content == REFUSAL and "margin" not in dumped(out) and HARM not in dumped(out)
    assert await texts_of(memory) == [QUESTION, REFUSAL]
    assert guarded.last_decisions["output"].action is Action.BLOCK


async def test_a_guard_failure_on_the_visible_text_check_blocks(server: FakeGuardServer, guard: Guard) -> None:
    server.add_rule(VISIBLE, kind="exact", fault="malformed")  # only the visible text, checked alone, fails
    message = ChatMessage(role="assistant", blocks=[ThinkingBlock(content=THINK), TextBlock(text=VISIBLE)])
    guarded = GuardedAgent(agent_of(Answer(message)), guard, policy=REDACT_RESPONSE)
    out = await guarded.run(user_msg=QUESTION)
    assert out.response.content == "I can't help with that: it was blocked by the safety guard (guard unavailable)."
    assert "margin" not in dumped(out) and HARM not in dumped(out)
    assert guarded.last_decisions["output"].action is Action.BLOCK


async def test_a_fail_open_visible_text_check_still_blocks(server: FakeGuardServer, guard: Guard) -> None:
    # under on_error: allow the failed re-check was a fail-open ALLOW, taken for "the visible text passes":
    # the sentence the first check found over the threshold was shown whole, as a REDACT with fail_open=False
    server.add_rule(VISIBLE, kind="exact", fault="malformed")
    message = ChatMessage(role="assistant", blocks=[ThinkingBlock(content=THINK), TextBlock(text=VISIBLE)])
    policy = {"on_error": "allow", "surfaces": {"response": {"action": "redact"}}}
    guarded = GuardedAgent(agent_of(Answer(message)), guard, policy=policy)
    out = await guarded.run(user_msg=QUESTION)
    assert HARM not in dumped(out) and "margin" not in dumped(out)
    decision = guarded.last_decisions["output"]
    assert decision.action is Action.BLOCK and "could not be re-checked" in decision.reason


async def test_a_redact_of_an_answer_without_visible_text_is_blocked(guard: Guard) -> None:
    citation = CitationBlock(
        cited_content=TextBlock(text=HARM), source="https://forum/x", title="Forum", additional_location_info={}
    )
    guarded = GuardedAgent(
        agent_of(Answer(ChatMessage(role="assistant", blocks=[citation]))), guard, policy=REDACT_RESPONSE
    )
    out = await guarded.run(user_msg=QUESTION)
    assert out.response.content == REFUSAL
    for hidden in ("Forum", "https://forum/x", HARM):
        assert hidden not in dumped(out)
    decision = guarded.last_decisions["output"]
    assert decision.action is Action.BLOCK and "no visible text to redact" in decision.reason


async def test_a_plain_text_redaction_needs_no_second_check(server: FakeGuardServer, guard: Guard) -> None:
    out = await GuardedAgent(agent_of(Answer(VISIBLE)), guard, policy=REDACT_RESPONSE).run(user_msg=QUESTION)
    assert out.response.content == REDACTED
    assert checked(server, "response").count(VISIBLE) == 1  # the one answer check (the redaction's own follow)


# ---------------------------------------------------------------- 2. which memories are rewritten


async def test_a_composable_memory_has_only_its_primary_memory_rewritten(
    guard: Guard, caplog: pytest.LogCaptureFixture
) -> None:
    secondary = ChatMemoryBuffer.from_defaults(chat_store_key="long_term")
    memory = SimpleComposableMemory.from_defaults(
        primary_memory=ChatMemoryBuffer.from_defaults(), secondary_memory_sources=[secondary]
    )

    def reply(messages: Sequence[ChatMessage], **kwargs: Any) -> ChatMessage:
        last = [m for m in messages if m.role == MessageRole.USER][-1]
        return ChatMessage(role="assistant", content=HARM if "chemistry" in str(last.content) else "At nine.")

    guarded = GuardedAgent(agent_of(reply), guard)
    await guarded.run(user_msg=QUESTION, memory=memory)
    out = await guarded.run(user_msg=CHEMISTRY, memory=memory)
    assert out.response.content == REFUSAL
    assert await texts_of(memory.primary_memory) == [QUESTION, "At nine.", CHEMISTRY, REFUSAL]
    # the secondary memory keeps what the agent gave it, once: the conversation is not appended again
    assert await texts_of(secondary) == [QUESTION, "At nine.", CHEMISTRY, HARM]
    assert [r.getMessage() for r in warnings_of(caplog)] == [
        "the secondary memories of the agent's SimpleComposableMemory (ChatMemoryBuffer) were not rewritten: "
        "they may still hold the original text of the blocked or redacted answer, which the next run would feed "
        "back to the model"
    ]


@pytest.mark.parametrize("on_block", ["refuse", "raise"])
async def test_a_vector_memory_is_left_alone_with_a_warning(
    guard: Guard, caplog: pytest.LogCaptureFixture, on_block: Any
) -> None:
    memory = VectorMemory.from_defaults(embed_model=MockEmbedding(embed_dim=8))
    guarded = GuardedAgent(agent_of(Answer(HARM)), guard, on_block=on_block)
    if on_block == "raise":
        with pytest.raises(GuardBlockedError):
            await guarded.run(user_msg=CHEMISTRY, memory=memory)
    else:
        assert (await guarded.run(user_msg=CHEMISTRY, memory=memory)).response.content == REFUSAL
    warned = [r.getMessage() for r in warnings_of(caplog)]
    assert len(warned) == 1 and warned[0].startswith("the agent's VectorMemory is not a chat history GuardedAgent")
    assert "may still hold the original text" in warned[0]


class NotesMemory(BaseMemory):
    """A memory that is not a chat history (it keeps notes), though it has the chat-memory methods."""

    notes: list[str] = Field(default_factory=list)

    @classmethod
    def from_defaults(cls, **kwargs: Any) -> NotesMemory:
        return cls()

    def get(self, input: str | None = None, **kwargs: Any) -> list[ChatMessage]:
        return [ChatMessage(role="system", content="\n".join(self.notes))] if self.notes else []

    def get_all(self) -> list[ChatMessage]:
        return self.get()

    def put(self, message: ChatMessage) -> None:
        self.notes.append(f"{message.role.value} said: {message.content}")

    def set(self, messages: list[ChatMessage]) -> None:
        self.notes = [f"{m.role.value} said: {m.content}" for m in messages]

    def reset(self) -> None:
        self.notes = []


async def test_an_unknown_memory_is_never_written(guard: Guard, caplog: pytest.LogCaptureFixture) -> None:
    memory = NotesMemory()
    out = await GuardedAgent(agent_of(Answer(HARM)), guard).run(user_msg=CHEMISTRY, memory=memory)
    assert out.response.content == REFUSAL
    assert memory.notes == [f"user said: {CHEMISTRY}", f"assistant said: {HARM}"]  # not overwritten by a guess
    assert [r.getMessage().split(" is not")[0] for r in warnings_of(caplog)] == ["the agent's NotesMemory"]


class BrokenStore(SimpleChatStore):
    """A chat store that can be read but not written (a backend gone read-only)."""

    def set_messages(self, key: str, messages: list[ChatMessage]) -> None:
        raise RuntimeError("chat store is read-only")


@pytest.mark.parametrize("on_block", ["refuse", "raise"])
async def test_a_failing_rewrite_is_logged_and_the_refusal_still_comes_out(
    guard: Guard, caplog: pytest.LogCaptureFixture, on_block: Any
) -> None:
    memory = ChatMemoryBuffer.from_defaults(chat_store=BrokenStore())
    guarded = GuardedAgent(agent_of(Answer(HARM)), guard, on_block=on_block)
    if on_block == "raise":
        with pytest.raises(GuardBlockedError):
            await guarded.run(user_msg=CHEMISTRY, memory=memory)
    else:
        assert (await guarded.run(user_msg=CHEMISTRY, memory=memory)).response.content == REFUSAL
    (record,) = warnings_of(caplog)
    assert record.getMessage() == (
        "rewriting the blocked or redacted answer in the agent's ChatMemoryBuffer failed: it may still hold the "
        "original text, which the next run would feed back to the model"
    )
    assert record.exc_info is not None and isinstance(record.exc_info[1], RuntimeError)


async def test_a_summary_memory_buffer_is_rewritten(guard: Guard) -> None:
    memory = ChatSummaryMemoryBuffer.from_defaults(token_limit=1000)
    out = await GuardedAgent(agent_of(Answer(HARM)), guard).run(user_msg=CHEMISTRY, memory=memory)
    assert out.response.content == REFUSAL
    assert await texts_of(memory) == [CHEMISTRY, REFUSAL]


# ---------------------------------------------------------------- 3. a structured response JSON cannot hold


class Handle:
    """A value JSON cannot hold (a database row, a file handle...)."""

    def __repr__(self) -> str:
        return "Handle()"


class Report(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)
    summary: str
    source: Handle


# llama-index itself warns that its AgentStreamStructuredOutput event cannot hold a Report (not a dict); the
# agent's output keeps the Report all the same
UNSTREAMABLE = pytest.mark.filterwarnings("ignore:There was a problem with the generation of the structured output")


@UNSTREAMABLE
async def test_a_structured_response_json_cannot_hold_is_judged(server: FakeGuardServer, guard: Guard) -> None:
    report = Report(summary="The shop sold 40 units.", source=Handle())
    agent = agent_of(Answer("Here is the report."), structured_output_fn=lambda messages: report)
    out = await GuardedAgent(agent, guard).run(user_msg="Summarise the shop report")
    assert out.structured_response is report and out["flexguard"]["output"]["action"] == "allow"
    assert checked(server, "response") == [
        'Here is the report.\n\n{"summary":"The shop sold 40 units.","source":"Handle()"}'
    ]


@UNSTREAMABLE
async def test_a_harmful_structured_response_json_cannot_hold_is_blocked(guard: Guard) -> None:
    agent = agent_of(Answer("Here it is."), structured_output_fn=lambda messages: Report(summary=HARM, source=Handle()))
    out = await GuardedAgent(agent, guard).run(user_msg="Summarise the shop report")
    assert out.response.content == REFUSAL and out.structured_response is None


# ---------------------------------------------------------------- 4. overlapping runs of one conversation


class HeldAnswerCheck:
    """A Guard whose answer checks (surface ``response``) wait for ``release``; ``arrived`` says one waits.

    With ``user_msg``, only the answer checks of that user message wait. It lets a test run another request
    of the conversation at a known point of the first one; the real guard still judges every text.
    """

    def __init__(self, guard: Guard, user_msg: str | None = None) -> None:
        self.guard = guard
        self.user_msg = user_msg
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()

    async def acheck(self, text: str, **kwargs: Any) -> Decision:
        if kwargs.get("surface") is Surface.RESPONSE and self.user_msg in (None, text):
            self.arrived.set()
            await self.release.wait()
        return await self.guard.acheck(text, **kwargs)


def memory_of(kind: str) -> Any:
    return ChatMemoryBuffer.from_defaults() if kind == "ChatMemoryBuffer" else Memory.from_defaults()


@pytest.mark.parametrize("memory_kind", ["ChatMemoryBuffer", "Memory"])
@pytest.mark.parametrize("later", ["clean", "quoting"])
async def test_a_later_answer_of_another_run_is_never_rewritten(guard: Guard, memory_kind: str, later: str) -> None:
    memory = memory_of(memory_kind)
    held = HeldAnswerCheck(guard)
    first = GuardedAgent(agent_of(Answer(HARM)), cast(Guard, held))
    # the other request's answer: clean, or quoting the first one's (allowed by its own policy)
    b_answer = "The shop opens at nine." if later == "clean" else f"The forum post said: {HARM} It was removed."
    second = GuardedAgent(agent_of(Answer(b_answer)), guard, policy={"thresholds": {"VIOLENCE": 100}})
    task = asyncio.create_task(first.run(user_msg=CHEMISTRY, memory=memory))
    await asyncio.wait_for(held.arrived.wait(), 10)
    assert (await second.run(user_msg=QUESTION, memory=memory)).response.content == b_answer
    held.release.set()
    assert (await task).response.content == REFUSAL
    assert await texts_of(memory) == [CHEMISTRY, REFUSAL, QUESTION, b_answer]


@pytest.mark.parametrize("memory_kind", ["ChatMemoryBuffer", "Memory"])
async def test_a_structured_only_answer_never_rewrites_another_runs_answer(
    guard: Guard, caplog: pytest.LogCaptureFixture, memory_kind: str
) -> None:
    memory = memory_of(memory_kind)
    held = HeldAnswerCheck(guard)
    first = GuardedAgent(agent_of(Answer(""), structured_output_fn=lambda messages: {"steps": HARM}), cast(Guard, held))
    second = GuardedAgent(agent_of(Answer("The shop opens at nine.")), guard)
    task = asyncio.create_task(first.run(user_msg="List the steps", memory=memory))
    await asyncio.wait_for(held.arrived.wait(), 10)
    await second.run(user_msg=QUESTION, memory=memory)
    held.release.set()
    assert (await task).response.content == REFUSAL
    assert await texts_of(memory) == ["List the steps", "", QUESTION, "The shop opens at nine."]
    assert [r.getMessage() for r in warnings_of(caplog)] == [
        f"the blocked or redacted answer has no text (only a structured response): nothing to look for in the "
        f"agent's {memory_kind}, which was not changed"
    ]


# ---------------------------------------------------------------- 5. last_decisions after a child task


def answers_by_topic(messages: Sequence[ChatMessage], **kwargs: Any) -> ChatMessage:
    last = [m for m in messages if m.role == MessageRole.USER][-1]
    return ChatMessage(role="assistant", content=HARM if "chemistry" in str(last.content) else "At nine.")


Run = Coroutine[Any, Any, Any]


async def in_create_task(run: Run) -> Any:
    return await asyncio.create_task(run)


async def in_task_group(run: Run) -> Any:
    async with asyncio.TaskGroup() as group:
        task = group.create_task(run)
    return task.result()


async def in_gather(run: Run) -> Any:
    (out,) = await asyncio.gather(run)
    return out


async def in_nested_task(run: Run) -> Any:
    async def inner() -> Any:
        return await asyncio.wait_for(run, timeout=30)  # a task of a task

    return await asyncio.create_task(inner())


CHILD_TASK_WAYS: dict[str, Callable[[Run], Coroutine[Any, Any, Any]]] = {
    "wait_for": lambda run: asyncio.wait_for(run, timeout=30),
    "create_task": in_create_task,
    "TaskGroup": in_task_group,
    "gather": in_gather,
    "nested": in_nested_task,
}


def last_output(guarded: GuardedAgent) -> Action:
    return guarded.last_decisions["output"].action


@pytest.mark.parametrize("way", list(CHILD_TASK_WAYS))
async def test_last_decisions_after_a_run_in_a_child_task(guard: Guard, way: str) -> None:
    guarded = GuardedAgent(agent_of(answers_by_topic), guard)
    await guarded.run(user_msg=QUESTION)
    assert last_output(guarded) is Action.ALLOW
    out = await CHILD_TASK_WAYS[way](guarded.run(user_msg=CHEMISTRY))
    assert out["flexguard"]["output"]["action"] == "block"
    assert last_output(guarded) is Action.BLOCK  # the newer run, not the one before
    assert guarded.last_decisions["output"].to_dict() == out["flexguard"]["output"]
    await guarded.run(user_msg=QUESTION)  # and a run awaited directly again is the last one again
    assert last_output(guarded) is Action.ALLOW


async def test_a_request_reads_its_own_run_after_a_later_run_finished(guard: Guard) -> None:
    # A starts after B and finishes first; B finishes before A reads: A still reads its own run
    held = HeldAnswerCheck(guard, user_msg=CHEMISTRY)  # only B's answer check waits
    guarded = GuardedAgent(agent_of(answers_by_topic), cast(Guard, held))

    async def request_b() -> Any:
        return await guarded.run(user_msg=CHEMISTRY)

    async def request_a(b: asyncio.Task[Any]) -> dict[str, Decision]:
        await asyncio.wait_for(held.arrived.wait(), 10)  # B waits at its answer check
        await guarded.run(user_msg=QUESTION)
        held.release.set()
        await b
        return dict(guarded.last_decisions)

    b = asyncio.create_task(request_b())
    a_seen = await asyncio.create_task(request_a(b))
    assert a_seen["output"].action is Action.ALLOW  # A's own run, not B's later BLOCK
    assert (await b).response.content == REFUSAL
    assert guarded.last_decisions["output"].action is Action.BLOCK  # outside both: the last to finish (B)


async def test_a_self_rescheduling_worker_keeps_no_chain_of_run_records(guard: Guard) -> None:
    # each run's task creating the next one linked every run's record to the previous one, without end
    from flexguard_integrations.llama_index import tools as li_tools

    guarded = GuardedAgent(agent_of(Answer("The shop opens at nine.")), guard)
    done = asyncio.Event()
    depth: list[int] = []

    async def job(i: int) -> None:
        await guarded.run(user_msg=QUESTION)
        record = (li_tools._RUN_DECISIONS.get() or {})[guarded]
        n = 0
        while record is not None:
            n, record = n + 1, record.parent
        depth.append(n)
        if i == 30:
            done.set()
        else:
            asyncio.get_running_loop().call_soon(asyncio.ensure_future, job(i + 1))

    first = asyncio.ensure_future(job(1))
    await asyncio.wait_for(done.wait(), 60)
    assert first.done()
    assert max(depth) <= 2 and guarded.last_decisions["output"].action is Action.ALLOW


async def test_a_follow_up_task_reads_the_run_it_awaited_after_its_creator_ended(guard: Guard) -> None:
    # a handler runs the agent, schedules a follow-up and ends; the follow-up awaits a run in a child task
    # (wait_for) and reads last_decisions: pruning the ended handler's record made it read the handler's run
    guarded = GuardedAgent(agent_of(answers_by_topic), guard)
    seen: dict[str, str] = {}
    done = asyncio.Event()

    async def follow_up() -> None:
        out = await asyncio.wait_for(guarded.run(user_msg=CHEMISTRY), 30)
        seen["own"] = out["flexguard"]["output"]["action"]
        seen["last"] = guarded.last_decisions["output"].action.value
        done.set()

    async def handler() -> None:
        await guarded.run(user_msg=QUESTION)  # allowed
        asyncio.get_running_loop().call_soon(asyncio.ensure_future, follow_up())

    await asyncio.create_task(handler())
    await asyncio.wait_for(done.wait(), 30)
    assert seen == {"own": "block", "last": "block"}


async def test_a_long_visible_text_whose_re_check_partly_fails_open_is_blocked(server: FakeGuardServer) -> None:
    # a re-check in several chunks, one failing under on_error: allow, is a fail-open ALLOW whose verdict (the
    # chunk that passed) has no error: it was taken for "the visible text passes" and the harm was shown
    filler = "The shop opens at nine and the staff are friendly. " * 80
    server.add_rule(re.compile(r"(?s)friendly\..*crowd\.\s*$"), fault="malformed")
    async with Guard.from_endpoint(server.base_url, FLEX, cache=False, max_model_len=4096) as small:
        policy = {"on_error": "allow", "surfaces": {"response": {"action": "redact"}}}
        message = ChatMessage(role="assistant", blocks=[TextBlock(text=filler + HARM), ThinkingBlock(content=THINK)])
        guarded = GuardedAgent(agent_of(Answer(message)), small, policy=policy)
        out = await guarded.run(user_msg=QUESTION)
    assert HARM not in dumped(out)
    assert guarded.last_decisions["output"].action is Action.BLOCK


async def test_the_top_context_reads_a_run_made_after_the_task_between_them_ended(guard: Guard) -> None:
    # top context -> handler task (runs the agent, schedules a follow-up, ends) -> follow-up task (runs it):
    # with one weak parent per record the handler's collected record cut the follow-up off from the top one
    import gc

    guarded = GuardedAgent(agent_of(answers_by_topic), guard)
    await guarded.run(user_msg="Hello there")  # the top context ran the agent: allowed
    done = asyncio.Event()

    async def follow_up() -> None:
        await guarded.run(user_msg=CHEMISTRY)  # blocked
        done.set()

    async def handler() -> None:
        await guarded.run(user_msg=QUESTION)  # allowed
        asyncio.get_running_loop().call_soon(asyncio.ensure_future, follow_up())

    await asyncio.create_task(handler())
    await asyncio.wait_for(done.wait(), 30)
    gc.collect()
    assert guarded.last_decisions["output"].action is Action.BLOCK


async def test_run_records_of_a_worker_that_keeps_its_tasks_grow_linearly() -> None:
    # each record copied the list of its live ancestors: a worker keeping its finished tasks (so their records
    # stay readable) held N*(N+1)/2 references after N runs (289 MB after 8,000). One shared chain: N links.
    import gc

    from flexguard_integrations.llama_index import tools as li_tools

    guarded = GuardedAgent.__new__(GuardedAgent)
    guarded._last_finished = {}
    kept: list[asyncio.Task[None]] = []
    done = asyncio.Event()
    last: list[Any] = []

    async def step(i: int) -> None:
        record = guarded._start_run({})  # what run() does around one run
        guarded._finish_run(record, {})
        last[:] = [record]
        if i < 300:
            kept.append(asyncio.get_running_loop().create_task(step(i + 1)))
        else:
            done.set()

    await step(0)
    await asyncio.wait_for(done.wait(), 30)
    gc.collect()
    links = sum(1 for o in gc.get_objects() if type(o) is li_tools._Link)
    assert 300 <= links <= 310  # one link per record (gc tracks them: the count is not vacuous)
    depth, link = 0, last[0].up
    while link is not None:
        depth, link = depth + 1, link.next
    assert depth == 300  # every ancestor is still readable: all of them are reached
    await asyncio.gather(*kept)
