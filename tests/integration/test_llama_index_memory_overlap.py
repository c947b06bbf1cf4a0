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

from flexguard_integrations import Guard
from flexguard_integrations.llama_index import GuardedAgent
from flexguard_integrations.testing import FakeGuardServer
from tests.conftest import FLEX
from tests.integration.test_llama_index_review_fixes_2 import HARM, REFUSAL, Answer, agent_of
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
