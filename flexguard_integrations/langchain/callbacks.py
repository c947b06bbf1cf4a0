"""``GuardCallbackHandler``: guard classic chains through callbacks, without changing the chain.

A **sync** handler with ``raise_error=True`` and ``run_inline=True``: an async handler's exception is
swallowed on a sync ``invoke`` whatever ``raise_error`` says (reference/apis.md §1), so a sync handler is
the one that can abort both sync and async runs. It checks chat-model inputs (the last user message) and
outputs, tool inputs and outputs, and retrieved documents, raises :class:`GuardBlockedError` for anything
that does not pass, and dispatches a ``flexguard_verdict`` custom event for every verdict.

Callbacks can only observe or abort: REDACT and REROUTE cannot be carried out here and count as a block.
An abort in ``on_llm_end`` comes after the model call has been paid for; use ``guarded`` or the agent
middleware to stop a request before it runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.messages import BaseMessage, ToolMessage
from langchain_core.outputs import LLMResult

from ..errors import GuardBlockedError
from ..guard import Guard, scoped_policy
from ..verdict import Decision, Surface
from ._common import (
    POLICY_CONFIG_KEY,
    VERDICT_EVENT,
    current_config_policy,
    event_payload,
    last_human_text,
    message_text,
)


class GuardCallbackHandler(BaseCallbackHandler):
    """Abort a run when the guard does not pass a prompt, response, tool input/output or document."""

    raise_error: bool = True
    run_inline: bool = True

    def __init__(
        self,
        guard: Guard,
        *,
        check_prompts: bool = True,
        check_responses: bool = True,
        check_tools: bool = True,
        check_documents: bool = True,
        policy: Any = None,
    ) -> None:
        self.guard = guard
        self.check_prompts = check_prompts
        self.check_responses = check_responses
        self.check_tools = check_tools
        self.check_documents = check_documents
        self.policy = policy
        self.decisions: list[Decision] = []
        self._prompts: dict[UUID, str] = {}
        self._run_policies: dict[UUID, Any] = {}  # per-call policies read from a run's metadata at its start
        self._checked_docs: dict[UUID, list[Document]] = {}  # documents a child run already checked, per parent

    @property
    def _policy(self) -> Any:
        return current_config_policy() or scoped_policy(self.policy)

    def _start_policy(self, run_id: UUID, kwargs: Mapping[str, Any]) -> Any:
        """The policy of a starting run, remembered for its end event.

        From the run's ``metadata`` (``config["metadata"]["flexguard_policy"]``: the carrier that reaches a chat
        model, tool or retriever invoked directly, since LangChain does not copy ``configurable`` into callback
        metadata), else the run context (inside a chain), else the handler's own policy.
        """
        policy = (kwargs.get("metadata") or {}).get(POLICY_CONFIG_KEY)
        if policy is None:
            policy = current_config_policy()
        if policy is None:
            return scoped_policy(self.policy)
        self._run_policies[run_id] = policy
        return policy

    def _end_policy(self, run_id: UUID) -> Any:
        policy = self._run_policies.pop(run_id, None)
        return self._policy if policy is None else policy

    def _handle(self, decision: Decision, where: str, run_id: UUID | None) -> None:
        self.decisions.append(decision)
        self._emit(decision, where, run_id)
        if not decision.action.passes:
            raise GuardBlockedError(decision)

    def _emit(self, decision: Decision, where: str, run_id: UUID | None) -> None:
        from langchain_core.callbacks import dispatch_custom_event

        payload = event_payload(decision, where)
        try:
            dispatch_custom_event(VERDICT_EVENT, payload)
        except RuntimeError:  # no parent run context (a chat model, tool or retriever invoked directly):
            # LangChain gives a handler no way to reach the run's other handlers; tell this handler's own
            # listeners (``handler.decisions`` has every decision either way)
            self.on_custom_event(VERDICT_EVENT, payload, run_id=run_id or UUID(int=0))

    def on_chat_model_start(
        self, serialized: dict[str, Any], messages: list[list[BaseMessage]], *, run_id: UUID, **kwargs: Any
    ) -> None:
        prompt = last_human_text(messages[0]) if messages else ""
        self._prompts[run_id] = prompt
        policy = self._start_policy(run_id, kwargs)
        if self.check_prompts and prompt.strip():
            self._handle(self.guard.check(prompt, surface=Surface.PROMPT, policy=policy), "chat_model_start", run_id)

    def on_llm_start(self, serialized: dict[str, Any], prompts: list[str], *, run_id: UUID, **kwargs: Any) -> None:
        prompt = prompts[0] if prompts else ""
        self._prompts[run_id] = prompt
        policy = self._start_policy(run_id, kwargs)
        if self.check_prompts and prompt.strip():
            self._handle(self.guard.check(prompt, surface=Surface.PROMPT, policy=policy), "llm_start", run_id)

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        prompt = self._prompts.pop(run_id, "")
        policy = self._end_policy(run_id)
        if not self.check_responses or not response.generations or not response.generations[0]:
            return
        text = response.generations[0][0].text
        if not text.strip():
            return
        decision = self.guard.check(prompt or " ", response=text, surface=Surface.RESPONSE, policy=policy)
        self._handle(decision, "llm_end", run_id)

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._prompts.pop(run_id, None)
        self._run_policies.pop(run_id, None)

    def on_tool_start(self, serialized: dict[str, Any], input_str: str, *, run_id: UUID, **kwargs: Any) -> None:
        policy = self._start_policy(run_id, kwargs)
        if not self.check_tools or not input_str.strip():
            return
        name = (serialized or {}).get("name") or kwargs.get("name") or "tool"
        text = f"{name}({input_str})"
        decision = self.guard.check(" ", response=text, surface=Surface.TOOL_CALL, policy=policy)
        self._handle(decision, "tool_start", run_id)

    def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        policy = self._end_policy(run_id)
        self._checked_docs.pop(run_id, None)
        if not self.check_tools:
            return
        text = message_text(output) if isinstance(output, ToolMessage) else str(output)
        if text.strip():
            self._handle(self.guard.check(text, surface=Surface.TOOL_RESULT, policy=policy), "tool_end", run_id)

    def on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._run_policies.pop(run_id, None)
        self._checked_docs.pop(run_id, None)

    def _check_documents(
        self, documents: Sequence[Document], where: str, run_id: UUID, parent_run_id: UUID | None, policy: Any
    ) -> None:
        texts = [d.page_content for d in documents if d.page_content.strip()]
        for decision in self.guard.batch(texts, surface=Surface.RETRIEVED, policy=policy):
            assert isinstance(decision, Decision)
            self._handle(decision, where, run_id)
        self._mark_checked(parent_run_id, documents)

    def _mark_checked(self, parent_run_id: UUID | None, documents: Sequence[Document]) -> None:
        """Remember documents a run returned after they were checked, so its parent does not check them again."""
        if parent_run_id is not None:
            self._checked_docs.setdefault(parent_run_id, []).extend(documents)

    def on_retriever_start(self, serialized: dict[str, Any], query: str, *, run_id: UUID, **kwargs: Any) -> None:
        self._start_policy(run_id, kwargs)

    def on_retriever_end(
        self, documents: Sequence[Document], *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any
    ) -> None:
        policy = self._end_policy(run_id)
        if self.check_documents:
            self._check_documents(documents, "retriever_end", run_id, parent_run_id, policy)

    def on_retriever_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._run_policies.pop(run_id, None)

    def on_chain_start(self, serialized: dict[str, Any], inputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        if (kwargs.get("metadata") or {}).get(POLICY_CONFIG_KEY) is not None:
            self._start_policy(run_id, kwargs)

    def on_chain_end(self, outputs: Any, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any) -> None:
        """Documents returned by a chain step (a retriever written as a RunnableLambda) are checked too, unless
        a retriever (or step) inside this run already checked them."""
        policy = self._end_policy(run_id)
        checked = self._checked_docs.pop(run_id, [])
        if not self.check_documents:
            return
        if isinstance(outputs, Document):
            documents = [outputs]
        elif isinstance(outputs, list | tuple) and outputs and all(isinstance(d, Document) for d in outputs):
            documents = list(outputs)
        else:
            return
        seen = {id(d) for d in checked}
        if all(id(d) in seen for d in documents):
            self._mark_checked(parent_run_id, documents)  # the same documents, passed on unchanged
            return
        self._check_documents(documents, "chain_end", run_id, parent_run_id, policy)

    def on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._run_policies.pop(run_id, None)
        self._checked_docs.pop(run_id, None)
