"""Shared by the LlamaIndex test modules: a recorder of GuardVerdictEvents (imported lazily by the
``verdicts`` fixture in conftest.py, so the other integration tests do not import llama_index)."""

from __future__ import annotations

from typing import Any

from llama_index.core.bridge.pydantic import Field
from llama_index.core.instrumentation.event_handlers import BaseEventHandler

from flexguard_integrations.llama_index import GuardVerdictEvent


class VerdictRecorder(BaseEventHandler):
    """Collects every GuardVerdictEvent seen by the root dispatcher."""

    events: list[GuardVerdictEvent] = Field(default_factory=list)

    @classmethod
    def class_name(cls) -> str:
        return "VerdictRecorder"

    def handle(self, event: Any, **kwargs: Any) -> None:
        if isinstance(event, GuardVerdictEvent):
            self.events.append(event)
