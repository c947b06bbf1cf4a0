"""Helpers shared by the LangChain integration: reading text out of LangChain objects, refusals, events."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from langchain_core.documents import Document
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.prompt_values import PromptValue
from langchain_core.runnables import RunnableConfig
from pydantic import BaseModel

from ..errors import GuardInputError
from ..verdict import Decision

logger = logging.getLogger("flexguard_integrations")

VERDICT_EVENT = "flexguard_verdict"
"""Name of the custom event dispatched for every verdict (seen by callbacks, LangSmith, astream_events)."""

POLICY_CONFIG_KEY = "flexguard_policy"
"""``config["configurable"][POLICY_CONFIG_KEY]`` selects the policy for one call (tenants, A/B...)."""

DEFAULT_REFUSAL = "I can't help with that: the request was blocked by the safety guard ({categories})."


def message_text(message: BaseMessage) -> str:
    """The text of a message whether its content is a string or a list of blocks (non-text blocks skipped)."""
    return str(message.text)


def with_text(message: BaseMessage, new_text: str) -> BaseMessage:
    """A copy of ``message`` (same id) whose text is ``new_text``; non-text blocks (images...) are kept."""
    content = message.content
    if isinstance(content, str):
        return message.model_copy(update={"content": new_text})
    blocks: list[Any] = []
    placed = False
    for block in content:
        is_text = isinstance(block, str) or (isinstance(block, Mapping) and block.get("type") == "text")
        if not is_text:
            blocks.append(block)
        elif not placed:
            blocks.append({"type": "text", "text": new_text})
            placed = True
    if not placed:
        blocks.insert(0, {"type": "text", "text": new_text})
    return message.model_copy(update={"content": blocks})


def render_tool_call(name: str, args: Any) -> str:
    """A tool call as the text the guard judges: ``name(arguments as JSON)``."""
    try:
        rendered = json.dumps(args, ensure_ascii=False, sort_keys=True, default=str)
    except (TypeError, ValueError):
        rendered = str(args)
    return f"{name}({rendered})"


def last_human_text(messages: Sequence[BaseMessage]) -> str:
    """The text of the last human message ('' when there is none)."""
    for msg in reversed(messages):
        if isinstance(msg, HumanMessage):
            return message_text(msg)
    return ""


def extract_input_text(value: Any, input_key: str | None = None) -> str:
    """The text to check from a Runnable input: str, message, list of messages, PromptValue or dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, PromptValue):
        return extract_input_text(value.to_messages())
    if isinstance(value, BaseMessage):
        return message_text(value)
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        msgs = [m for m in value if isinstance(m, BaseMessage)]
        if not msgs:
            if value and all(isinstance(m, tuple | Mapping) for m in value):
                return _text_of_message_likes(value)
            raise GuardInputError("the input is an empty list of messages; there is nothing to check")
        text = last_human_text(msgs)
        return text or message_text(msgs[-1])
    if isinstance(value, Mapping):
        keys = [input_key] if input_key else ["input", "question", "query", "messages", "text", "prompt"]
        for key in keys:
            if key in value:
                return extract_input_text(value[key])
        raise GuardInputError(
            f"cannot find the text to check in a dict input with keys {sorted(value)!r}; pass input_key="
        )
    raise GuardInputError(f"cannot read text from a {type(value).__name__} input")


def _text_of_message_likes(items: Sequence[Any]) -> str:
    for item in reversed(items):
        if isinstance(item, tuple) and len(item) == 2 and item[0] in ("user", "human"):
            return str(item[1])
        if isinstance(item, Mapping) and item.get("role") in ("user", "human"):
            return str(item.get("content", ""))
    raise GuardInputError("no user message in the input list")


def extract_output_text(value: Any, output_key: str | None = None) -> str | None:
    """The text of a Runnable output; None if it has none (``None``, an empty list, an object of another kind).

    A str, a message, a ``Document`` (its ``page_content``), a dict (``output_key``, else the first of the usual
    keys, else its last message), a Pydantic model (a structured output, as JSON), and a list or tuple of any of
    these (their texts, one per line; an item of another kind as JSON), so that no text is released unchecked
    because of its container. A dict whose text cannot be found raises ``GuardInputError`` (pass ``output_key``).
    """
    if isinstance(value, str):
        return value
    if isinstance(value, BaseMessage):
        return message_text(value)
    if isinstance(value, Document):
        return value.page_content
    if isinstance(value, BaseModel):
        return _as_json(value)
    if isinstance(value, Mapping):
        keys = [output_key] if output_key else ["output", "answer", "text", "result", "content"]
        for key in keys:
            if key in value:
                return extract_output_text(value[key])
        if value.get("messages"):
            return extract_output_text(value["messages"][-1])
        # never release a dict output unchecked because its text could not be found
        keys_seen = sorted(map(str, value))
        if output_key:
            raise GuardInputError(f"output has no key {output_key!r} (keys: {keys_seen!r})")
        raise GuardInputError(f"cannot find the text to check in an output with keys {keys_seen!r}; pass output_key=")
    if isinstance(value, list | tuple):
        try:
            parts = [item_text(item) for item in value]
        except RecursionError as exc:  # a list that contains itself, or nested thousands deep
            raise GuardInputError(
                f"cannot read the output to check it (a {type(value).__name__} nested too deep)"
            ) from exc
        return "\n".join(p for p in parts if p) if value else None
    return None


def item_text(item: Any) -> str:
    """The text of one item of a list output (or of a streamed chunk of no known kind): a str, a message or a
    ``Document`` by its text, a list by its items, anything else (a dict: all of it, not only a usual key) as
    JSON. An item that cannot be rendered raises ``GuardInputError``."""
    if item is None:
        return ""
    if isinstance(item, str | BaseMessage | Document | list | tuple):
        return extract_output_text(item) or ""
    return _as_json(item)


def _as_json(value: Any) -> str:
    """``value`` as JSON text for the guard to read; ``GuardInputError`` when it cannot be (a cycle, a field
    that does not serialise, nesting too deep)."""
    try:
        if isinstance(value, BaseModel):
            return value.model_dump_json(fallback=str)
        return json.dumps(value, ensure_ascii=False, default=str, sort_keys=True)
    except (ValueError, TypeError, RecursionError) as exc:  # PydanticSerializationError is a ValueError
        raise GuardInputError(
            f"cannot read the output to check it ({type(value).__name__}: {exc}); "
            "return text, or set check_output=False"
        ) from exc


def is_text_output(value: Any, output_key: str | None = None) -> bool:
    """Whether ``replace_output_text`` keeps the output's shape (a REDACT can be carried out): a str, a message,
    or a dict whose text is one of those (or its messages)."""
    if isinstance(value, str | BaseMessage):
        return True
    if isinstance(value, Mapping):
        keys = [output_key] if output_key else ["output", "answer", "text", "result", "content"]
        for key in keys:
            if key in value:
                return is_text_output(value[key])
        messages = value.get("messages")
        return isinstance(messages, list) and bool(messages) and isinstance(messages[-1], BaseMessage)
    return False


def replace_input_text(value: Any, new_text: str, input_key: str | None = None) -> Any:
    """A copy of the input with its checked text replaced (REDACT); message ids are kept."""
    if isinstance(value, str):
        return new_text
    if isinstance(value, PromptValue):
        return replace_input_text(value.to_messages(), new_text)
    if isinstance(value, BaseMessage):
        return with_text(value, new_text)
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        items = list(value)
        for i in range(len(items) - 1, -1, -1):
            if isinstance(items[i], HumanMessage):
                items[i] = with_text(items[i], new_text)
                return items
        if items and isinstance(items[-1], BaseMessage):
            items[-1] = with_text(items[-1], new_text)
        return items
    if isinstance(value, Mapping):
        keys = [input_key] if input_key else ["input", "question", "query", "messages", "text", "prompt"]
        for key in keys:
            if key in value:
                return {**value, key: replace_input_text(value[key], new_text)}
    return value


def replace_output_text(value: Any, new_text: str, output_key: str | None = None) -> Any:
    """A copy of the output with its text replaced (REDACT or refusal), in the same shape."""
    if isinstance(value, str):
        return new_text
    if isinstance(value, AIMessage):
        return value.model_copy(update={"content": new_text, "tool_calls": [], "invalid_tool_calls": []})
    if isinstance(value, BaseMessage):
        return value.model_copy(update={"content": new_text})
    if isinstance(value, Mapping):
        keys = [output_key] if output_key else ["output", "answer", "text", "result", "content"]
        for key in keys:
            if key in value:
                return {**value, key: replace_output_text(value[key], new_text)}
        messages = value.get("messages")
        if isinstance(messages, list) and messages and isinstance(messages[-1], BaseMessage):
            return {**value, "messages": [*messages[:-1], replace_output_text(messages[-1], new_text)]}
        return {**value, output_key or "output": new_text}
    if isinstance(value, list | tuple):  # a refusal in the container's shape: one item of the first item's kind
        first = value[0] if value else None
        item: Any = Document(page_content=new_text) if isinstance(first, Document) else new_text
        if isinstance(first, BaseMessage):
            item = replace_output_text(first, new_text)
        return type(value)([item]) if type(value) in (list, tuple) else [item]
    return new_text


def format_refusal(template: str, decision: Decision) -> str:
    """Fill ``{categories}``, ``{risk_score}``, ``{reason}`` and ``{action}`` into a refusal template."""
    cats = ", ".join(c.value.lower().replace("_", " ") for c in decision.verdict.categories)
    if not cats:
        cats = "guard unavailable" if decision.verdict.error else "policy violation"
    try:
        return template.format(
            categories=cats,
            risk_score=f"{decision.verdict.risk_score:g}",
            reason=decision.reason,
            action=decision.action.value,
        )
    except (KeyError, IndexError, ValueError):
        logger.warning("refusal template %r has unknown placeholders; sent as is", template)
        return template


def event_payload(decision: Decision, where: str) -> dict[str, Any]:
    """The data of a ``flexguard_verdict`` custom event."""
    return {"where": where, **decision.to_dict()}


def _listeners(manager: Any) -> bool:
    """True when a handler of ``manager`` takes custom events (``astream_events``, a GuardCallbackHandler...)."""
    return any(not getattr(h, "ignore_custom_event", False) for h in manager.handlers)


def dispatch_verdict(decision: Decision, where: str, config: RunnableConfig | None = None) -> None:
    """Dispatch ``flexguard_verdict`` when called inside a run; a no-op outside one.

    What ``dispatch_custom_event`` does, except that the payload is only built when a handler listens.
    """
    from langchain_core.runnables.config import ensure_config, get_callback_manager_for_config

    manager = get_callback_manager_for_config(ensure_config(config))
    if manager.parent_run_id is None:  # not inside a run: nobody to tell
        logger.debug("flexguard_verdict not dispatched (no parent run): %s", where)
        return
    if _listeners(manager):
        manager.on_custom_event(VERDICT_EVENT, event_payload(decision, where), run_id=manager.parent_run_id)


async def adispatch_verdict(decision: Decision, where: str, config: RunnableConfig | None = None) -> None:
    """Async twin of :func:`dispatch_verdict`."""
    from langchain_core.runnables.config import ensure_config, get_async_callback_manager_for_config

    manager = get_async_callback_manager_for_config(ensure_config(config))
    if manager.parent_run_id is None:
        logger.debug("flexguard_verdict not dispatched (no parent run): %s", where)
        return
    if _listeners(manager):
        await manager.on_custom_event(VERDICT_EVENT, event_payload(decision, where), run_id=manager.parent_run_id)


def policy_from_config(config: RunnableConfig | None) -> Any:
    """The per-call policy from ``config["configurable"]["flexguard_policy"]``, or None."""
    if not config:
        return None
    return (config.get("configurable") or {}).get(POLICY_CONFIG_KEY)


def current_config_policy() -> Any:
    """The per-call policy of the LangChain / LangGraph run this code executes in, or None."""
    from langchain_core.runnables.config import var_child_runnable_config

    return policy_from_config(var_child_runnable_config.get())


def tool_message_error(tool_call_id: str, name: str | None, content: str) -> ToolMessage:
    """The error result an agent gets instead of running a blocked tool."""
    return ToolMessage(content=content, tool_call_id=tool_call_id, name=name, status="error")
