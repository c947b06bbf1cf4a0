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
