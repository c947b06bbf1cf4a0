"""``GuardNodePostprocessor``: keep poisoned or harmful retrieved documents out of the prompt.

Retrieved nodes (surface ``retrieved``) are checked concurrently, natively async in
``_apostprocess_nodes``. Per the policy a node is dropped (BLOCK, and REROUTE, which has no meaning for a
node; REDACT of a node that is not a TextNode), has its text replaced by the redacted version (REDACT),
or is kept with the verdict in
``node.metadata["flexguard"]`` (FLAG) — that key is excluded from the LLM and embedding views. With
``on_block="raise"`` a blocked node raises :class:`GuardBlockedError` instead. A node kept because the
guard could not answer under ``on_error: allow`` carries the fail-open decision in that metadata key.
The policy can be switched per call with :func:`~flexguard_integrations.policy_scope`. Kept nodes keep their order
and scores; nodes are copied, never mutated in place (they may be the index's own objects).
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from llama_index.core.bridge.pydantic import ConfigDict, Field
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode

from ..errors import GuardBlockedError, GuardInputError
from ..guard import CheckRequest, Guard, scoped_policy
from ..verdict import Action, Decision, Surface, Verdict
from .events import emit

METADATA_KEY = "flexguard"


class GuardNodePostprocessor(BaseNodePostprocessor):
    """Check retrieved nodes with a Guard and drop, redact, flag or raise per the policy."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    guard: Guard = Field(exclude=True, description="The Guard that checks each node.")
    policy: Any = Field(default=None, exclude=True, description="Policy override (preset, dict, path).")
    with_query: bool = Field(default=False, description="Show the query to the guard as context.")
    on_block: Literal["drop", "raise"] = Field(default="drop")
    drop_unchecked: bool = Field(default=False, description="Drop nodes without text (images) too.")
    metadata_key: str = Field(default=METADATA_KEY)

    @classmethod
    def class_name(cls) -> str:
        return "GuardNodePostprocessor"

    # ----------------------------------------------------------------- decisions

    def _history(self, query_bundle: QueryBundle | None) -> list[tuple[Literal["user", "assistant"], str]] | None:
        if self.with_query and query_bundle is not None and query_bundle.query_str.strip():
            return [("user", query_bundle.query_str)]
        return None

    def _failed(self, exc: GuardInputError) -> Decision:
        policy = self.guard._resolve_policy(scoped_policy(self.policy))
        return policy.decide(Verdict.failed(str(exc), surface=Surface.RETRIEVED), Surface.RETRIEVED)

    def _apply(self, nodes: list[NodeWithScore], decisions: list[Decision | None]) -> list[NodeWithScore]:
        kept: list[NodeWithScore] = []
        for nws, decision in zip(nodes, decisions, strict=True):
            if decision is None:  # no text to check (an image node)
                if self.drop_unchecked:
                    continue
                kept.append(self._annotated(nws, {"unchecked": "node has no text"}))
                continue
            emit(decision, "node_postprocessor")
            if decision.action is Action.ALLOW and decision.fail_open:
                # kept without a verdict (on_error: allow): never indistinguishable from a clean pass
                kept.append(self._annotated(nws, decision.to_dict()))
            elif decision.action is Action.ALLOW:
                kept.append(nws)
            elif decision.action is Action.FLAG:
                kept.append(self._annotated(nws, decision.to_dict()))
            elif (
                decision.action is Action.REDACT
                and decision.redacted_text is not None
                and isinstance(nws.node, TextNode)
            ):
                kept.append(self._redacted(nws, decision))
            elif self.on_block == "raise":
                raise GuardBlockedError(decision, f"retrieved node {nws.node.node_id} blocked: {decision.reason}")
        return kept

    def _copy(self, nws: NodeWithScore) -> NodeWithScore:
        node = nws.node.model_copy(deep=True)
        for attr in ("excluded_llm_metadata_keys", "excluded_embed_metadata_keys"):
            keys = list(getattr(node, attr))
            if self.metadata_key not in keys:
                keys.append(self.metadata_key)
            setattr(node, attr, keys)
        return NodeWithScore(node=node, score=nws.score)

    def _annotated(self, nws: NodeWithScore, data: dict[str, Any]) -> NodeWithScore:
        out = self._copy(nws)
        out.node.metadata[self.metadata_key] = data
        return out

    def _redacted(self, nws: NodeWithScore, decision: Decision) -> NodeWithScore:
        out = self._annotated(nws, decision.to_dict())
        out.node.set_content(decision.redacted_text or "")
        return out

    # ----------------------------------------------------------------- postprocess

    def _postprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        history = self._history(query_bundle)
        texts = [nws.node.get_content() for nws in nodes]
        live = [i for i, t in enumerate(texts) if t.strip()]
        requests = [
            CheckRequest(texts[i], surface=Surface.RETRIEVED, history=history, policy=scoped_policy(self.policy))
            for i in live
        ]
        results = self.guard.batch(requests, return_exceptions=True)
        decisions: list[Decision | None] = [None] * len(nodes)
        for i, result in zip(live, results, strict=True):
            if isinstance(result, GuardInputError):
                decisions[i] = self._failed(result)
            elif isinstance(result, BaseException):
                raise result
            else:
                decisions[i] = result
        return self._apply(nodes, decisions)

    async def _apostprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        history = self._history(query_bundle)

        async def one(nws: NodeWithScore) -> Decision | None:
            text = nws.node.get_content()
            if not text.strip():
                return None
            try:
                return await self.guard.acheck(
                    text, surface=Surface.RETRIEVED, policy=scoped_policy(self.policy), history=history
                )
            except GuardInputError as exc:
                return self._failed(exc)

        decisions = list(await asyncio.gather(*(one(n) for n in nodes)))
        return self._apply(nodes, decisions)
