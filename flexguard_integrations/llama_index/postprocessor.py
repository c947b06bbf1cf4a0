"""``GuardNodePostprocessor``: keep poisoned or harmful retrieved documents out of the prompt.

Retrieved nodes (surface ``retrieved``) are checked concurrently, natively async in
``_apostprocess_nodes``. What is checked is what the LLM will read: the node's LLM view
(``get_content(MetadataMode.LLM)``, its text plus every metadata key not excluded from the LLM), so an
injection in a title or summary is caught too. Per the policy a node is dropped (BLOCK, and REROUTE, which
has no meaning for a node; REDACT that cannot be applied, see :meth:`GuardNodePostprocessor._redacted`),
redacted (REDACT: the text replaced by its redacted version, flagged metadata keys hidden from the LLM),
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
from llama_index.core.schema import BaseNode, MetadataMode, NodeWithScore, QueryBundle, TextNode

from ..errors import GuardBlockedError, GuardInputError
from ..guard import CheckRequest, Guard, scoped_policy
from ..verdict import Action, Decision, Surface
from .events import emit

METADATA_KEY = "flexguard"
_CONTENT_MARK = "\x00flexguard-content\x00"


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
        return self.guard._unchecked(exc, Surface.RETRIEVED, scoped_policy(self.policy))

    def _own_key_shown(self, node: BaseNode) -> bool:
        """True when ``node`` carries our metadata key in its LLM view (say, from the source document)."""
        return self.metadata_key in node.metadata and self.metadata_key not in node.excluded_llm_metadata_keys

    def _llm_view(self, node: BaseNode) -> str:
        """The text the LLM will read for ``node`` (our own metadata key is never part of it)."""
        if self._own_key_shown(node):
            hidden = [*node.excluded_llm_metadata_keys, self.metadata_key]
            node = node.model_copy(update={"excluded_llm_metadata_keys": hidden})
        return node.get_content(metadata_mode=MetadataMode.LLM)

    def _apply(self, nodes: list[NodeWithScore], decisions: list[Decision | None]) -> list[NodeWithScore]:
        kept: list[NodeWithScore] = []
        for nws, decision in zip(nodes, decisions, strict=True):
            if decision is None:  # nothing the LLM reads as text (an image node without metadata)
                if not self.drop_unchecked:
                    kept.append(self._annotated(nws, {"unchecked": "node has no text"}))
                continue
            emit(decision, "node_postprocessor")
            out = self._decided(nws, decision)
            if out is None:
                if self.on_block == "raise":
                    raise GuardBlockedError(decision, f"retrieved node {nws.node.node_id} blocked: {decision.reason}")
                continue
            if not nws.node.get_content(metadata_mode=MetadataMode.NONE).strip():
                # only its metadata (a caption) was checked: the image itself is not
                if self.drop_unchecked:
                    continue
                if decision.action is Action.ALLOW and not decision.fail_open:
                    out = self._annotated(out, {"unchecked": "node has no text"})
                else:  # already a copy annotated with the decision
                    out.node.metadata[self.metadata_key]["unchecked"] = "node has no text"
            kept.append(out)
        return kept

    def _decided(self, nws: NodeWithScore, decision: Decision) -> NodeWithScore | None:
        """The node as the decision leaves it, or None when it is dropped."""
        if decision.action is Action.ALLOW and decision.fail_open:
            # kept without a verdict (on_error: allow): never indistinguishable from a clean pass
            return self._annotated(nws, decision.to_dict())
        if decision.action is Action.ALLOW:
            return self._copy(nws) if self._own_key_shown(nws.node) else nws
        if decision.action is Action.FLAG:
            return self._annotated(nws, decision.to_dict())
        if decision.action is Action.REDACT:
            return self._redacted(nws, decision)  # None when the redaction cannot be applied
        return None  # BLOCK, and REROUTE, which has no meaning for a node

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

    def _redacted(self, nws: NodeWithScore, decision: Decision) -> NodeWithScore | None:
        """The node with the LLM view redacted, or None when that cannot be done (the node is then dropped).

        The guard redacted the whole LLM view (metadata header, text). A change confined to the text
        replaces the text; a change confined to the header hides each metadata key whose rendered line
        did not survive verbatim (all visible keys if none can be told) by adding it to
        ``excluded_llm_metadata_keys``, the value staying in ``node.metadata`` for the application. When
        both changed, the redacted view cannot be split back into text and metadata: the node is dropped
        rather than shown half-redacted. A node that is not a TextNode is dropped too.
        """
        redacted = decision.redacted_text
        node = nws.node
        if redacted is None or not isinstance(node, TextNode):
            return None
        view = self._llm_view(node)
        hidden: list[str] = []
        visible = [k for k in node.metadata if k not in node.excluded_llm_metadata_keys and k != self.metadata_key]
        if not visible:  # the view is the text
            text = redacted
        elif (split := _split_view(node, view, self.metadata_key)) is None:
            return None  # a view we cannot take apart: do not guess
        else:
            head, body, tail = split
            if redacted.startswith(head) and redacted.endswith(tail) and len(redacted) >= len(head) + len(tail):
                text = redacted[len(head) : len(redacted) - len(tail)]
            elif redacted.startswith(head + body) or redacted.endswith(body + tail):
                # the text survived unchanged: the flagged part is in the metadata header
                rest = (
                    head + redacted[len(head) + len(body) :]
                    if redacted.startswith(head + body)
                    else redacted[: len(redacted) - len(body) - len(tail)] + tail
                )
                text = node.get_content(metadata_mode=MetadataMode.NONE)
                # a key survives only if its whole rendered entry does: a flagged "z: X" must not pass for
                # surviving because an unflagged "zz: X" contains it
                entries = {piece.strip() for piece in rest.split(node.metadata_separator)}
                hidden = [k for k in visible if _rendered(node, k).strip() not in entries] or visible
            else:
                return None
        out = self._annotated(nws, decision.to_dict())
        out.node.set_content(text)
        if hidden:
            out.node.excluded_llm_metadata_keys = [*out.node.excluded_llm_metadata_keys, *hidden]
            out.node.metadata[self.metadata_key]["hidden_metadata_keys"] = hidden
        return out

    # ----------------------------------------------------------------- postprocess

    def _postprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        history = self._history(query_bundle)
        texts = [self._llm_view(nws.node) for nws in nodes]
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
            text = self._llm_view(nws.node)
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


def _rendered(node: TextNode, key: str) -> str:
    """One metadata entry as the node renders it for the LLM (``key: value``)."""
    return node.metadata_template.format(key=key, value=str(node.metadata[key]))


def _split_view(node: TextNode, view: str, own_key: str) -> tuple[str, str, str] | None:
    """``view`` as (metadata header, text, footer) per the node's template, or None if it does not fit."""
    hide = [*node.excluded_llm_metadata_keys, own_key]
    metadata_str = node.model_copy(update={"excluded_llm_metadata_keys": hide}).get_metadata_str(MetadataMode.LLM)
    try:
        parts = node.text_template.format(content=_CONTENT_MARK, metadata_str=metadata_str.strip()).split(_CONTENT_MARK)
    except (KeyError, IndexError, ValueError):
        return None
    if len(parts) != 2:
        return None
    text = node.get_content(metadata_mode=MetadataMode.NONE)
    raw = parts[0] + text + parts[1]
    lead = len(raw) - len(raw.lstrip())
    stripped = raw.strip()
    if stripped != view:
        return None
    start = min(max(len(parts[0]) - lead, 0), len(stripped))
    end = min(max(len(parts[0]) + len(text) - lead, start), len(stripped))
    return stripped[:start], stripped[start:end], stripped[end:]
