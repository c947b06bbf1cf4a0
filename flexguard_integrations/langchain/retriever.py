"""Retrieved documents: keep poisoned or harmful ones out of the prompt, one document at a time.

``guarded(retriever)`` judges a retriever's whole output as one reply: one bad document refuses the whole
retrieval. :class:`GuardedRetriever` wraps a retriever instead and checks each document it returns
(surface ``retrieved``, concurrently), then per the policy drops it (BLOCK, and REROUTE, which has no
meaning for a document; a REDACT that cannot be applied), redacts it (REDACT: ``page_content`` replaced by
its redacted text), or keeps it with the decision in ``metadata["flexguard"]`` (FLAG, and a fail-open
ALLOW, which is never indistinguishable from a clean pass). ``on_block="raise"`` raises
:class:`GuardBlockedError` instead of dropping. It is a ``BaseRetriever``, so it goes wherever the wrapped
retriever went (LCEL chains, ``create_retriever_tool``, agents). :class:`GuardDocumentCompressor` is the same
filter as a ``BaseDocumentCompressor`` (for ``ContextualCompressionRetriever`` from langchain-classic).

What is checked is ``page_content``, the text a prompt normally shows; documents are copied before they
are changed, never mutated (they may be a vector store's own objects).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextvars import ContextVar
from typing import Any, Literal

from langchain_core.callbacks import (
    AsyncCallbackManagerForRetrieverRun,
    CallbackManagerForRetrieverRun,
    Callbacks,
)
from langchain_core.documents import BaseDocumentCompressor, Document
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.config import ensure_config, patch_config
from pydantic import BaseModel, ConfigDict, Field

from ..errors import GuardBlockedError, GuardInputError
from ..guard import CheckRequest, Guard, scoped_policy
from ..verdict import Action, Decision, Surface
from ._common import adispatch_verdict, current_config_policy, dispatch_verdict, policy_from_config

METADATA_KEY = "flexguard"
_WHERE = "retriever"
_CALL_CONFIG: ContextVar[RunnableConfig | None] = ContextVar("flexguard_retriever_config", default=None)


class _DocumentFilter(BaseModel):
    """The shared part of :class:`GuardDocumentCompressor` and :class:`GuardedRetriever`: their options, and
    check, then apply."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    guard: Guard = Field(exclude=True, description="The Guard that checks each document.")
    policy: Any = Field(default=None, exclude=True, description="Policy override (preset, dict, path).")
    with_query: bool = Field(default=False, description="Show the query to the guard as context.")
    on_block: Literal["drop", "raise"] = Field(default="drop")
    drop_unchecked: bool = Field(default=False, description="Drop documents without text too.")
    metadata_key: str = Field(default=METADATA_KEY)

    def _policy(self, config: RunnableConfig | None) -> Any:
        """The call's policy (its config), else the enclosing run's, else ``policy_scope``, else ``self.policy``.

        Retriever tools and chains pass on callbacks only: the enclosing run's config is where the caller's
        ``flexguard_policy`` then is. (A ``ContextualCompressionRetriever`` invoked on its own sets no run
        config: its compressor sees ``policy_scope`` and the defaults only.)
        """
        return policy_from_config(config) or current_config_policy() or scoped_policy(self.policy)

    def _history(self, query: str) -> list[tuple[Literal["user", "assistant"], str]] | None:
        return [("user", query)] if self.with_query and query.strip() else None

    def _requests(self, documents: Sequence[Document], query: str, policy: Any) -> tuple[list[int], list[CheckRequest]]:
        _check_documents(documents)
        history = self._history(query)
        live = [i for i, doc in enumerate(documents) if doc.page_content.strip()]
        reqs = [
            CheckRequest(documents[i].page_content, surface=Surface.RETRIEVED, history=history, policy=policy)
            for i in live
        ]
        return live, reqs

    def _decisions(
        self, count: int, live: list[int], results: Sequence[Decision | BaseException], policy: Any
    ) -> list[Decision | None]:
        decisions: list[Decision | None] = [None] * count
        for i, result in zip(live, results, strict=True):
            if isinstance(result, GuardInputError):
                decisions[i] = self.guard._unchecked(result, Surface.RETRIEVED, policy)
            elif isinstance(result, BaseException):
                raise result
            else:
                decisions[i] = result
        return decisions

    def _filter(self, documents: Sequence[Document], query: str, config: RunnableConfig | None) -> list[Document]:
        policy = self._policy(config)
        live, reqs = self._requests(documents, query, policy)
        results = self.guard.batch(reqs, return_exceptions=True) if reqs else []
        decisions = self._decisions(len(documents), live, results, policy)
        for decision in decisions:
            if decision is not None:
                dispatch_verdict(decision, _WHERE, config)
        return self._apply(documents, decisions)

    async def _afilter(
        self, documents: Sequence[Document], query: str, config: RunnableConfig | None
    ) -> list[Document]:
        policy = self._policy(config)
        live, reqs = self._requests(documents, query, policy)
        results = await self.guard.abatch(reqs, return_exceptions=True) if reqs else []
        decisions = self._decisions(len(documents), live, results, policy)
        for decision in decisions:
            if decision is not None:
                await adispatch_verdict(decision, _WHERE, config)
        return self._apply(documents, decisions)

    def _apply(self, documents: Sequence[Document], decisions: Sequence[Decision | None]) -> list[Document]:
        kept: list[Document] = []
        for i, (doc, decision) in enumerate(zip(documents, decisions, strict=True)):
            if decision is None:  # no text for a prompt to show (an empty or image document)
                if not self.drop_unchecked:
                    kept.append(self._annotated(doc, {"unchecked": "document has no text"}))
                continue
            out = self._decided(doc, decision)
            if out is None:
                if self.on_block == "raise":
                    name = f"{doc.id!r}" if doc.id else f"#{i}"
                    raise GuardBlockedError(decision, f"retrieved document {name} blocked: {decision.reason}")
                continue
            kept.append(out)
        return kept

    def _decided(self, doc: Document, decision: Decision) -> Document | None:
        """The document as the decision leaves it, or None when it is dropped."""
        if decision.action is Action.ALLOW and not decision.fail_open:
            return doc
        if decision.action in (Action.ALLOW, Action.FLAG):  # a fail-open ALLOW is marked, never looks clean
            return self._annotated(doc, decision.to_dict())
        if decision.action is Action.REDACT:
            if decision.redacted_text is None:
                return None  # nothing safe to show: dropped rather than shown unredacted
            out = self._annotated(doc, decision.to_dict())
            out.page_content = decision.redacted_text
            return out
        return None  # BLOCK, and REROUTE, which has no meaning for a document

    def _annotated(self, doc: Document, data: dict[str, Any]) -> Document:
        """A copy of ``doc`` with ``data`` under our metadata key; ``doc`` and its metadata dict are untouched.

        Shallow: the metadata values are shared (they may be a client, a lock, an embedding), only the dict is
        new.
        """
        return doc.model_copy(update={"metadata": {**doc.metadata, self.metadata_key: data}})


class GuardDocumentCompressor(_DocumentFilter, BaseDocumentCompressor):
    """Check each document with a Guard (surface ``retrieved``) and drop, redact, flag or raise per the policy.

    A ``BaseDocumentCompressor``: give it to ``ContextualCompressionRetriever`` (langchain-classic) or call
    :meth:`compress_documents` / :meth:`acompress_documents` yourself. Kept documents keep their order.
    ``with_query=True`` shows the query to the guard as the user turn before the document.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    def compress_documents(
        self, documents: Sequence[Document], query: str, callbacks: Callbacks | None = None
    ) -> Sequence[Document]:
        return self._filter(documents, query, {"callbacks": callbacks} if callbacks is not None else None)

    async def acompress_documents(
        self, documents: Sequence[Document], query: str, callbacks: Callbacks | None = None
    ) -> Sequence[Document]:
        return await self._afilter(documents, query, {"callbacks": callbacks} if callbacks is not None else None)


class GuardedRetriever(_DocumentFilter, BaseRetriever):
    """A retriever whose documents are checked one by one before anyone reads them.

    ``GuardedRetriever(retriever=vectorstore.as_retriever(), guard=guard)``: the wrapped retriever runs as a
    child of this one (the caller's config and search arguments passed on); each document it returns is checked
    concurrently and dropped, redacted, flagged or raised on per the policy (see the module docs). The
    policy can be switched per call with ``config={"configurable": {"flexguard_policy": ...}}`` or
    :func:`~flexguard_integrations.policy_scope`; each decision is dispatched as a ``flexguard_verdict``
    custom event of this retriever's run.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    retriever: Runnable[str, list[Document]] = Field(
        description="The retriever whose documents are checked (a BaseRetriever, or any Runnable from a query "
        "to documents: a configurable retriever, a retrieval chain)."
    )

    def invoke(self, input: str, config: RunnableConfig | None = None, **kwargs: Any) -> list[Document]:
        # BaseRetriever hands _get_relevant_documents no config; ensure_config merges the enclosing run's (a
        # retriever tool passes on callbacks only, and the caller's flexguard_policy is there)
        token = _CALL_CONFIG.set(ensure_config(config))
        try:
            return super().invoke(input, config, **kwargs)
        finally:
            _CALL_CONFIG.reset(token)

    async def ainvoke(self, input: str, config: RunnableConfig | None = None, **kwargs: Any) -> list[Document]:
        token = _CALL_CONFIG.set(ensure_config(config))
        try:
            return await super().ainvoke(input, config, **kwargs)
        finally:
            _CALL_CONFIG.reset(token)

    @staticmethod
    def _child_config(manager: Any) -> RunnableConfig:
        """The config for the wrapped retriever: the caller's (tags, metadata, ``configurable``, limits) as a
        child of this run."""
        return patch_config(_CALL_CONFIG.get() or ensure_config(), callbacks=manager.get_child())

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[Document]:
        config = self._child_config(run_manager)
        documents = self.retriever.invoke(query, config=config, **kwargs)  # search kwargs (filter=, k=) go on
        return self._filter(documents, query, config)

    async def _aget_relevant_documents(
        self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[Document]:
        config = self._child_config(run_manager)
        documents = await self.retriever.ainvoke(query, config=config, **kwargs)
        return await self._afilter(documents, query, config)


def _check_documents(documents: Any) -> None:
    """Raise a TypeError that says what came back when the wrapped retriever did not return documents."""
    if isinstance(documents, (str, bytes, dict)) or not isinstance(documents, Sequence):
        raise TypeError(
            f"the wrapped retriever returned {type(documents).__name__}, not a list of Documents: GuardedRetriever "
            "needs a Runnable from a query to documents"
        )
    for i, doc in enumerate(documents):
        if not isinstance(doc, Document) or not isinstance(doc.page_content, str):
            what = type(doc).__name__ if not isinstance(doc, Document) else "a Document whose page_content is not a str"
            raise TypeError(f"the wrapped retriever returned {what} at position {i}, not a Document with text")


__all__ = ["METADATA_KEY", "GuardDocumentCompressor", "GuardedRetriever"]
