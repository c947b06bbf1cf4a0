"""Fixtures shared by the integration tests (the server fixture is in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture
def verdicts() -> Iterator[list[Any]]:
    """Every ``GuardVerdictEvent`` the LlamaIndex root dispatcher sees during the test, in order."""
    from llama_index.core.instrumentation import get_dispatcher

    from tests.integration.llama_index_support import VerdictRecorder

    recorder = VerdictRecorder()
    root = get_dispatcher()
    root.add_event_handler(recorder)
    try:
        yield recorder.events
    finally:
        root.event_handlers.remove(recorder)


@pytest.fixture(autouse=True)
def _dispose_chat_store_engines(request: pytest.FixtureRequest) -> Iterator[None]:
    """Close the SQL engines LlamaIndex's ``Memory`` creates (also implicitly, as an agent's default memory).

    Their aiosqlite connections live in worker threads bound to the test's event loop; left to the garbage
    collector, they close after that loop has, and the thread's "Event loop is closed" is reported as a
    warning under whichever later test is running.
    """
    if "llama_index" not in request.node.path.name:
        yield
        return
    import asyncio

    from llama_index.core.storage.chat_store import sql

    engines: list[Any] = []
    create = sql.create_async_engine

    def recording(*args: Any, **kwargs: Any) -> Any:
        engine = create(*args, **kwargs)
        engines.append(engine)
        return engine

    sql.create_async_engine = recording  # type: ignore[assignment]
    try:
        yield
    finally:
        sql.create_async_engine = create  # type: ignore[assignment]
        for engine in engines:
            asyncio.run(engine.dispose())
