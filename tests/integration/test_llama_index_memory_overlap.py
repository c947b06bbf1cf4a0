"""GuardedAgent's memory rewrite while another run of the conversation writes to the same memory.

The rewrite used to delete and re-add a ``Memory``'s whole history (messages stored in between were lost,
and the blocked answer could stay) and to read and write back a ``ChatMemoryBuffer`` from a worker thread
(messages stored in between were lost).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from llama_index.core.llms import ChatMessage
from llama_index.core.memory import Memory
from llama_index.core.storage.chat_store import SimpleChatStore
from llama_index.core.storage.chat_store.base_db import MessageStatus

from flexguard_integrations import Guard
from flexguard_integrations.llama_index import GuardedAgent
from flexguard_integrations.testing import FakeGuardServer
from tests.conftest import FLEX
from tests.integration.test_llama_index_review_fixes_2 import HARM, QUESTION, REFUSAL, Answer, agent_of
from tests.integration.test_llama_index_review_fixes_3 import (
    CHEMISTRY,
    HeldAnswerCheck,
    memory_of,
    texts_of,
)


@pytest.fixture
def guard(server: FakeGuardServer) -> Iterator[Guard]:
    with Guard.from_endpoint(server.base_url, FLEX, cache=False) as g:
        yield g


async def write_until(memory: Any, done: asyncio.Task[Any], started: asyncio.Event) -> list[str]:
    """Another run of the conversation, storing one message at a time (letting others run in between) until
    ``done`` has finished, five at least; returns what it stored."""
    stored: list[str] = []
    started.set()
    while not done.done() or len(stored) < 5:
        stored.append(f"another run's message {len(stored)}")
        await memory.aput(ChatMessage(role="user", content=stored[-1]))
        await asyncio.sleep(0.002)
    return stored


@pytest.mark.parametrize("memory_kind", ["ChatMemoryBuffer", "Memory"])
async def test_messages_stored_during_the_rewrite_are_kept_in_order(
    guard: Guard, memory_kind: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    if memory_kind == "ChatMemoryBuffer":  # a read that takes a while, so a thread's read-modify-write is caught
        slow_get = SimpleChatStore.get_messages

        def get_messages(self: SimpleChatStore, key: str) -> list[ChatMessage]:
            messages = list(slow_get(self, key))
            if threading.current_thread() is not threading.main_thread():  # a store that does I/O, read off the loop
                time.sleep(0.02)  # the answer takes a while to come back
            return messages

        monkeypatch.setattr(SimpleChatStore, "get_messages", get_messages)
    # a database file: llama-index's default in-memory SQLite shares one connection between sessions, and loses
    # messages itself when writers overlap (docs/llama_index.md)
    uri = f"sqlite+aiosqlite:///{tmp_path / 'memory.db'}"
    memory = memory_of(memory_kind) if memory_kind != "Memory" else Memory.from_defaults(async_database_uri=uri)
    held = HeldAnswerCheck(guard)
    agent = GuardedAgent(agent_of(Answer(HARM)), cast(Guard, held))
    task = asyncio.create_task(agent.run(user_msg=CHEMISTRY, memory=memory))
    await asyncio.wait_for(held.arrived.wait(), 10)
    started = asyncio.Event()
    writer = asyncio.create_task(write_until(memory, task, started))
    await started.wait()
    held.release.set()  # the answer check returns and the rewrite starts while the writer is under way
    assert (await task).response.content == REFUSAL
    others = await writer
    texts = await texts_of(memory)
    assert HARM not in texts
    assert texts == [CHEMISTRY, REFUSAL, *others]


async def stored_rows(memory: Memory) -> list[tuple[str, str]]:
    """(status, text) of every row of the memory's session, archived ones included."""
    from sqlalchemy import select

    session_factory, table = await memory.sql_store._initialize()
    async with session_factory() as session:
        query = select(table.c.status, table.c.data).where(table.c.key == memory.session_id).order_by(table.c.id)
        rows = (await session.execute(query)).fetchall()
    return [(row.status, str(ChatMessage.model_validate(row.data).content)) for row in rows]


async def test_an_answer_archived_by_another_run_is_rewritten_too(guard: Guard, tmp_path: Path) -> None:
    # another run's messages push the blocked answer out of the active window (token limit) before the rewrite
    uri = f"sqlite+aiosqlite:///{tmp_path / 'memory.db'}"
    memory = Memory.from_defaults(
        async_database_uri=uri, token_limit=40, chat_history_token_ratio=0.5, token_flush_size=5
    )
    held = HeldAnswerCheck(guard)
    task = asyncio.create_task(
        GuardedAgent(agent_of(Answer(HARM)), cast(Guard, held)).run(user_msg=CHEMISTRY, memory=memory)
    )
    await asyncio.wait_for(held.arrived.wait(), 10)
    for i in range(6):
        await memory.aput(ChatMessage(role="user", content=f"another run's message {i}"))
    assert ("archived", HARM) in await stored_rows(memory)
    held.release.set()
    assert (await task).response.content == REFUSAL
    rows = await stored_rows(memory)
    assert ("archived", REFUSAL) in rows and all(text != HARM for _, text in rows)


@pytest.mark.parametrize(("rolled_back", "commits", "warned"), [(0, 1, False), (1, 2, False), (3, 3, True)])
async def test_an_update_rolled_back_by_another_session_is_made_again_or_reported(
    guard: Guard,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    rolled_back: int,
    commits: int,
    warned: bool,
) -> None:
    # on the default in-memory database another session handing the shared connection back rolls it back:
    # the update was lost and nothing said so. Here the first `rolled_back` commits of the rewrite are.
    from sqlalchemy.ext.asyncio import AsyncSession

    memory = Memory.from_defaults()
    made = 0
    real_commit, real_execute = AsyncSession.commit, AsyncSession.execute

    async def execute(self: AsyncSession, statement: Any, *args: Any, **kwargs: Any) -> Any:
        if str(statement).startswith("UPDATE"):
            self.info["updated"] = True
        return await real_execute(self, statement, *args, **kwargs)

    async def commit(self: AsyncSession) -> None:
        nonlocal made
        if self.info.pop("updated", False):
            made += 1
            if made <= rolled_back:
                await self.rollback()
                return
        await real_commit(self)

    guarded = GuardedAgent(agent_of(Answer(HARM)), guard)
    with caplog.at_level(logging.WARNING, logger="flexguard_integrations"):
        monkeypatch.setattr(AsyncSession, "commit", commit)
        monkeypatch.setattr(AsyncSession, "execute", execute)
        out = await guarded.run(user_msg=CHEMISTRY, memory=memory)
        monkeypatch.undo()
    assert out.response.content == REFUSAL
    assert made == commits  # one update when it holds; made again after each rollback, three at most
    assert (HARM in await texts_of(memory)) is warned
    expected = [
        "the rewrite of the blocked or redacted answer in the agent's Memory did not hold after 3 attempts "
        "(another session of its database rolled it back): it may still hold the original text, which the next "
        "run would feed back to the model"
    ]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == (expected if warned else [])


# ---------------------------------------------------------------- review round 3


async def test_two_runs_blocking_the_same_answer_at_once_both_get_rewritten(
    guard: Guard, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # both searches ran before either update, so both took the newest copy, and the other copy stayed silently
    memory = Memory.from_defaults(async_database_uri=f"sqlite+aiosqlite:///{tmp_path / 'memory.db'}")
    await memory.sql_store._initialize()  # llama-index's own lazy table creation races between two tasks
    held = HeldAnswerCheck(guard)
    runs = [
        asyncio.create_task(GuardedAgent(agent_of(Answer(HARM)), cast(Guard, held)).run(user_msg=msg, memory=memory))
        for msg in (CHEMISTRY, QUESTION)
    ]
    await asyncio.wait_for(held.arrived.wait(), 10)
    for _ in range(100):  # until both answers are stored and both checks wait
        if [text for _, text in await stored_rows(memory)].count(HARM) == 2:
            break
        await asyncio.sleep(0.01)
    assert [text for _, text in await stored_rows(memory)].count(HARM) == 2
    with caplog.at_level(logging.WARNING, logger="flexguard_integrations"):
        held.release.set()
        outs = await asyncio.gather(*runs)
    assert [out.response.content for out in outs] == [REFUSAL, REFUSAL]
    rows = await stored_rows(memory)
    assert all(text != HARM for _, text in rows) and [text for _, text in rows].count(REFUSAL) == 2
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_a_return_direct_answer_is_rewritten_with_its_tool_row(guard: Guard) -> None:
    from llama_index.core.agent.workflow import FunctionAgent
    from llama_index.core.base.llms.types import ToolCallBlock
    from llama_index.core.llms import MessageRole
    from llama_index.core.llms.mock import MockFunctionCallingLLM
    from llama_index.core.tools import FunctionTool

    def forum(topic: str) -> str:
        """Read the forum."""
        return HARM

    tool = FunctionTool.from_defaults(forum, return_direct=True)
    call = ChatMessage(
        role="assistant", blocks=[ToolCallBlock(tool_call_id="c1", tool_name="forum", tool_kwargs={"topic": "x"})]
    )
    agent = FunctionAgent(tools=[tool], llm=MockFunctionCallingLLM(response_generator=Answer(call)))
    memory = Memory.from_defaults()
    assert (await GuardedAgent(agent, guard).run(user_msg=QUESTION, memory=memory)).response.content == REFUSAL
    stored = await memory.aget_all()
    assert [m.role for m in stored][-2:] == [MessageRole.TOOL, MessageRole.ASSISTANT]
    assert not any(HARM in m.model_dump_json() for m in stored)


async def test_only_this_runs_copy_of_an_answer_is_rewritten(
    guard: Guard, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # an earlier run's policy allowed the same text: that copy stays, active or archived
    memory = Memory.from_defaults()
    allowed = GuardedAgent(agent_of(Answer(HARM)), guard, policy={"thresholds": {"VIOLENCE": 100}})
    assert (await allowed.run(user_msg=QUESTION, memory=memory)).response.content == HARM
    blocked = await GuardedAgent(agent_of(Answer(HARM)), guard).run(user_msg=CHEMISTRY, memory=memory)
    assert blocked.response.content == REFUSAL
    assert [str(m.content) for m in await memory.aget_all()] == [QUESTION, HARM, CHEMISTRY, REFUSAL]

    # this run's answer was not stored at all, and an earlier identical one is archived: it was rewritten in
    # place of this one, and the missing answer went unreported
    class NoAnswers(Memory):
        async def aput_messages(self, messages: list[ChatMessage]) -> None:
            kept = [m for m in messages if m.role != "assistant"]
            if kept:
                await super().aput_messages(kept)

    memory = NoAnswers.from_defaults(async_database_uri=f"sqlite+aiosqlite:///{tmp_path / 'memory.db'}")
    earlier = [ChatMessage(role="user", content="earlier question"), ChatMessage(role="assistant", content=HARM)]
    await memory.sql_store.add_messages(memory.session_id, earlier, status=MessageStatus.ARCHIVED)
    await asyncio.sleep(1.1)  # older than the run by more than the clock slack
    with caplog.at_level(logging.WARNING, logger="flexguard_integrations"):
        assert (
            await GuardedAgent(agent_of(Answer(HARM)), guard).run(user_msg=CHEMISTRY, memory=memory)
        ).response.content == REFUSAL
    assert ("archived", HARM) in await stored_rows(memory)
    assert any("was not found" in r.getMessage() for r in caplog.records)


async def test_an_archived_answer_rewritten_warns_about_the_memory_blocks(
    guard: Guard, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from llama_index.core.memory import StaticMemoryBlock

    uri = f"sqlite+aiosqlite:///{tmp_path / 'memory.db'}"
    memory = Memory.from_defaults(
        async_database_uri=uri,
        token_limit=40,
        chat_history_token_ratio=0.5,
        token_flush_size=5,
        memory_blocks=[StaticMemoryBlock(name="notes", static_content="The user likes chemistry.")],
    )
    held = HeldAnswerCheck(guard)
    agent = GuardedAgent(agent_of(Answer(HARM)), cast(Guard, held))
    task = asyncio.create_task(agent.run(user_msg=CHEMISTRY, memory=memory))
    await asyncio.wait_for(held.arrived.wait(), 10)
    for i in range(6):
        await memory.aput(ChatMessage(role="user", content=f"another run's message {i}"))
    with caplog.at_level(logging.WARNING, logger="flexguard_integrations"):
        held.release.set()
        assert (await task).response.content == REFUSAL
    assert ("archived", REFUSAL) in await stored_rows(memory)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        "the blocked or redacted answer had already left the agent's Memory's active window and was rewritten in "
        "its archive, but its memory blocks (StaticMemoryBlock) may have taken the original text, which the next "
        "run would feed back to the model"
    ]


# ---------------------------------------------------------------- review round 4


async def test_two_memory_objects_of_one_conversation_take_turns(guard: Guard, tmp_path: Path) -> None:
    # a Memory per request, same database and session (as llama-index's docs build them): the turn was keyed by
    # the object, so the two rewrites raced and one blocked answer stayed, silently
    uri = f"sqlite+aiosqlite:///{tmp_path / 'memory.db'}"
    memories = [Memory.from_defaults(session_id="alice", async_database_uri=uri) for _ in range(2)]
    for memory in memories:
        await memory.sql_store._initialize()
    held = HeldAnswerCheck(guard)
    runs = [
        asyncio.create_task(GuardedAgent(agent_of(Answer(HARM)), cast(Guard, held)).run(user_msg=msg, memory=memory))
        for msg, memory in zip((CHEMISTRY, QUESTION), memories, strict=True)
    ]
    await asyncio.wait_for(held.arrived.wait(), 10)
    for _ in range(100):
        if [text for _, text in await stored_rows(memories[0])].count(HARM) == 2:
            break
        await asyncio.sleep(0.01)
    held.release.set()
    assert [out.response.content for out in await asyncio.gather(*runs)] == [REFUSAL, REFUSAL]
    assert HARM not in [text for _, text in await stored_rows(memories[0])]


def test_one_memory_served_by_several_event_loops(server: FakeGuardServer, tmp_path: Path) -> None:
    # requests served with asyncio.run each: the lock of the first loop was reused in the next ones and raised
    # "bound to a different event loop"; the rewrite failed and the blocked answers stayed
    memory = Memory.from_defaults(async_database_uri=f"sqlite+aiosqlite:///{tmp_path / 'memory.db'}")
    asyncio.run(memory.sql_store._initialize())
    with Guard.from_endpoint(server.base_url, FLEX, cache=False) as guard:

        async def request(n: int) -> list[str]:
            runs = [
                GuardedAgent(agent_of(Answer(HARM)), guard).run(user_msg=f"q{n}{i}", memory=memory) for i in range(4)
            ]
            return [str(out.response.content) for out in await asyncio.gather(*runs)]

        try:
            for n in range(3):
                assert asyncio.run(request(n)) == [REFUSAL] * 4
                assert HARM not in [str(m.content) for m in asyncio.run(memory.aget_all())]
        finally:  # close the database's connections, whose worker threads would outlive their loops
            asyncio.run(memory.sql_store._async_engine.dispose())
