"""Agent tool gating for ``FunctionAgent``, ``ReActAgent`` and ``AgentWorkflow``, and a whole-agent guard.

In llama-index 0.14 an exception raised inside a tool does not stop the agent: it goes back to the model
as an error result. So a blocked call returns an error ``ToolOutput`` carrying the refusal, and the real
function never runs. The arguments are checked before execution (surface ``tool_call``), the output after
(surface ``tool_result``: REDACT replaces it, BLOCK withholds it). The output check covers every content
block the agent sends to the model (``ToolOutput.blocks``: text, the text inside citable and citation
blocks, text documents); blocks whose content cannot be checked (images, audio, video, binary documents)
are withheld unless ``unchecked_blocks="pass"``. Error results are checked like any other: an error
``ToolOutput`` the tool returns, and the text of an exception it raises (which the agent would send the
model as ``str(exception)``); a withheld or redacted exception becomes an error ``ToolOutput``, a passing
one is re-raised as it was. Workflow control-flow exceptions (waiting for an event) are re-raised unchecked.

``GuardedAgent`` guards a workflow agent as a whole: the user message before the run, the final answer
after it (every content block and the structured response), in the output and in the agent's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import json
import logging
import time
import weakref
from collections.abc import AsyncIterator, Sequence
from contextvars import ContextVar
from dataclasses import replace
from typing import Any, Literal

from llama_index.core.base.llms.types import (
    CachePoint,
    CitableBlock,
    CitationBlock,
    DocumentBlock,
    TextBlock,
    ThinkingBlock,
)
from llama_index.core.llms import ChatMessage, MessageRole
from llama_index.core.tools import FunctionTool, ToolOutput
from llama_index.core.tools.types import AsyncBaseTool, BaseTool, ToolMetadata
from llama_index.core.workflow import Event

from ..errors import GuardBlockedError
from ..guard import Guard, policy_scope, scoped_policy
from ..verdict import Action, Decision, Surface
from .events import emit
from .query_engine import _refusal_text

logger = logging.getLogger("flexguard_integrations")

DEFAULT_TOOL_REFUSAL = "Tool call blocked by the safety guard ({categories}); the tool was not run."
DEFAULT_TOOL_RESULT_REFUSAL = "[tool result withheld by the safety guard ({categories})]"
DEFAULT_AGENT_REFUSAL = "I can't help with that: it was blocked by the safety guard ({categories})."
UNCHECKED_BLOCK_NOTICE = "[{kind} withheld by the safety guard: it cannot be checked]"
_TEXT_MIMETYPES = ("application/json", "application/xml", "application/yaml", "application/x-yaml", "application/csv")


def render_call(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """A tool call as the text the guard judges: ``name(arguments as JSON)``."""
    payload: Any = kwargs if kwargs else (args[0] if len(args) == 1 else list(args))
    try:
        rendered = json.dumps(payload, ensure_ascii=False, sort_keys=True, default=str)
    except (TypeError, ValueError):
        rendered = str(payload)
    return f"{name}({rendered})"


def _document_text(block: DocumentBlock) -> str | None:
    """The text of a text document held inline or in a local file; None for binary or remote ones."""
    mimetype = (block.document_mimetype or "").lower()
    if mimetype and not (mimetype.startswith("text/") or mimetype in _TEXT_MIMETYPES):
        return None
    if block.data is None and block.path is None:  # a URL only: never fetched here
        return None
    try:
        data: bytes = block.resolve_document().read()
        return data.decode("utf-8")
    except (OSError, ValueError):  # unreadable, empty, or not UTF-8 (UnicodeDecodeError is a ValueError)
        return None


@functools.cache
def _control_flow_exceptions() -> tuple[type[BaseException], ...]:
    """Exceptions the workflow runtime uses for control flow: a guarded tool re-raises them unchecked.

    ``WaitingForEvent`` (``ctx.wait_for_event`` in a tool: human in the loop) is the one the agents
    themselves re-raise instead of turning it into an error result.
    """
    from workflows.errors import WorkflowCancelledByUser, WorkflowDone, WorkflowTimeoutError

    found: list[type[BaseException]] = [WorkflowCancelledByUser, WorkflowDone, WorkflowTimeoutError]
    with contextlib.suppress(ImportError):  # workflows >= 2.9
        from workflows.runtime.types.results import WaitingForEvent

        found.append(WaitingForEvent)
    return tuple(found)


class _Screen:
    """The text of a tool result's content blocks, and the blocks as the model may see them.

    Blocks that cannot be checked are replaced by a notice (``withhold``) or kept (``pass``).
    """

    def __init__(self, blocks: Sequence[Any], withhold: bool) -> None:
        self.texts: list[str] = []
        self.withheld = 0
        self.withhold = withhold
        self.blocks = [self._block(b) for b in blocks]

    @property
    def text(self) -> str:
        return "\n".join(t for t in self.texts if t.strip())

    def _unchecked(self, block: Any) -> Any:
        if not self.withhold:
            return block
        self.withheld += 1
        kind = str(getattr(block, "block_type", None) or type(block).__name__)
        return TextBlock(text=UNCHECKED_BLOCK_NOTICE.format(kind=kind))

    def _block(self, block: Any) -> Any:
        if isinstance(block, TextBlock):
            self.texts.append(block.text)
        elif isinstance(block, ThinkingBlock):
            self.texts.append(block.content or "")
        elif isinstance(block, CachePoint):
            pass  # a caching marker, no content
        elif isinstance(block, CitableBlock):
            self.texts.extend((block.title, block.source))
            content = [self._block(b) for b in block.content]
            if any(new is not old for new, old in zip(content, block.content, strict=True)):
                return block.model_copy(update={"content": content})
        elif isinstance(block, CitationBlock):
            self.texts.extend((block.title, block.source))
            cited = self._block(block.cited_content)
            if cited is not block.cited_content:
                return block.model_copy(update={"cited_content": cited})
        elif isinstance(block, DocumentBlock) and (text := _document_text(block)) is not None:
            if block.title and block.title != "input_document":  # the default title says nothing
                self.texts.append(block.title)
            self.texts.append(text)
        else:  # images, audio, video, binary documents, anything unknown
            return self._unchecked(block)
        return block


class GuardedTool(AsyncBaseTool):
    """A LlamaIndex tool whose arguments and output go through a Guard (same metadata as the wrapped one)."""

    def __init__(
        self,
        tool: BaseTool,
        guard: Guard,
        *,
        check_args: bool = True,
        check_output: bool = True,
        violation_message: str = DEFAULT_TOOL_REFUSAL,
        output_violation_message: str = DEFAULT_TOOL_RESULT_REFUSAL,
        policy: Any = None,
        unchecked_blocks: Literal["withhold", "pass"] = "withhold",
    ) -> None:
        if unchecked_blocks not in ("withhold", "pass"):
            raise ValueError(f"unchecked_blocks must be 'withhold' or 'pass', got {unchecked_blocks!r}")
        self.tool = tool
        self.guard = guard
        self.check_args = check_args
        self.check_output = check_output
        self.violation_message = violation_message
        self.output_violation_message = output_violation_message
        self.policy = policy
        self.unchecked_blocks = unchecked_blocks

    @property
    def metadata(self) -> ToolMetadata:
        return self.tool.metadata

    @property
    def _name(self) -> str:
        return self.tool.metadata.get_name()

    def _raw_input(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """FunctionTool's ``raw_input`` shape, without an injected workflow Context (it must serialize)."""
        return {"args": args, "kwargs": self._visible_kwargs(kwargs)}

    def _blocked_output(
        self, decision: Decision, args: tuple[Any, ...], kwargs: dict[str, Any], template: str
    ) -> ToolOutput:
        text = _refusal_text(template, decision)
        return ToolOutput(
            content=text, tool_name=self._name, raw_input=self._raw_input(args, kwargs), raw_output=text, is_error=True
        )

    @staticmethod
    def _replaced(output: ToolOutput, blocks: list[Any]) -> ToolOutput:
        """``output`` with new blocks; ``raw_output`` follows them (it may reach the user, e.g. return_direct)."""
        new = ToolOutput(
            blocks=blocks, tool_name=output.tool_name, raw_input=output.raw_input, is_error=output.is_error
        )
        new.raw_output = new.content
        return new

    def _screen(self, output: ToolOutput) -> _Screen | None:
        """The output's blocks to check (error outputs included), or None when outputs are not checked."""
        if not self.check_output:
            return None
        return _Screen(output.blocks, withhold=self.unchecked_blocks == "withhold")

    def _screened(self, output: ToolOutput, screen: _Screen) -> ToolOutput:
        return self._replaced(output, screen.blocks) if screen.withheld else output

    def _after(
        self, output: ToolOutput, screen: _Screen, decision: Decision, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> ToolOutput:
        emit(decision, f"tool_result:{self._name}")
        if decision.action.passes:
            return self._screened(output, screen)
        if decision.action is Action.REDACT and decision.redacted_text is not None:
            return self._replaced(output, [TextBlock(text=decision.redacted_text)])
        return self._blocked_output(decision, args, kwargs, self.output_violation_message)

    def _error_text(self, exc: Exception) -> str | None:
        """The text an agent would send the model for ``exc`` (``str(exc)``), or None to re-raise it unchecked.

        Workflow control flow (waiting for an event, a cancelled or finished run) is re-raised untouched,
        as the agents do; so is everything when outputs are not checked, and an error without text.
        """
        if not self.check_output or isinstance(exc, _control_flow_exceptions()):
            return None
        text = str(exc)
        return text if text.strip() else None

    def _after_error(self, decision: Decision, args: tuple[Any, ...], kwargs: dict[str, Any]) -> ToolOutput | None:
        """The error result that replaces a withheld or redacted exception; None when it may go on as raised."""
        emit(decision, f"tool_result:{self._name}")
        if decision.action.passes:
            return None
        if decision.action is Action.REDACT and decision.redacted_text is not None:
            text = decision.redacted_text
            raw_input = self._raw_input(args, kwargs)
            return ToolOutput(content=text, tool_name=self._name, raw_input=raw_input, raw_output=text, is_error=True)
        return self._blocked_output(decision, args, kwargs, self.output_violation_message)

    def _visible_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The arguments the model chose (a workflow Context injected by the agent is not shown to the guard)."""
        ctx_name = getattr(self.tool, "ctx_param_name", None)
        return {k: v for k, v in kwargs.items() if k != ctx_name}

    def call(self, *args: Any, **kwargs: Any) -> ToolOutput:
        if self.check_args:
            text = render_call(self._name, args, self._visible_kwargs(kwargs))
            decision = self.guard.check(
                " ", response=text, surface=Surface.TOOL_CALL, policy=scoped_policy(self.policy)
            )
            emit(decision, f"tool_call:{self._name}")
            if not decision.action.passes:
                return self._blocked_output(decision, args, kwargs, self.violation_message)
        try:
            output = self.tool(*args, **kwargs)
        except Exception as exc:
            error = self._error_text(exc)
            if error is None:
                raise
            decision = self.guard.check(error, surface=Surface.TOOL_RESULT, policy=scoped_policy(self.policy))
            withheld = self._after_error(decision, args, kwargs)
            if withheld is None:
                raise
            return withheld
        screen = self._screen(output)
        if screen is None:
            return output
        if not screen.text.strip():
            return self._screened(output, screen)
        decision = self.guard.check(screen.text, surface=Surface.TOOL_RESULT, policy=scoped_policy(self.policy))
        return self._after(output, screen, decision, args, kwargs)

    async def acall(self, *args: Any, **kwargs: Any) -> ToolOutput:
        if self.check_args:
            text = render_call(self._name, args, self._visible_kwargs(kwargs))
            decision = await self.guard.acheck(
                " ", response=text, surface=Surface.TOOL_CALL, policy=scoped_policy(self.policy)
            )
            emit(decision, f"tool_call:{self._name}")
            if not decision.action.passes:
                return self._blocked_output(decision, args, kwargs, self.violation_message)
        try:
            if isinstance(self.tool, AsyncBaseTool):
                output = await self.tool.acall(*args, **kwargs)
            else:
                output = await asyncio.to_thread(self.tool, *args, **kwargs)
        except Exception as exc:
            error = self._error_text(exc)
            if error is None:
                raise
            decision = await self.guard.acheck(error, surface=Surface.TOOL_RESULT, policy=scoped_policy(self.policy))
            withheld = self._after_error(decision, args, kwargs)
            if withheld is None:
                raise
            return withheld
        screen = self._screen(output)
        if screen is None:
            return output
        if not screen.text.strip():
            return self._screened(output, screen)
        decision = await self.guard.acheck(screen.text, surface=Surface.TOOL_RESULT, policy=scoped_policy(self.policy))
        return self._after(output, screen, decision, args, kwargs)


class GuardedFunctionTool(FunctionTool):
    """A guarded ``FunctionTool``: still a FunctionTool, so agents inject a workflow ``Context`` into it."""

    _guarded: GuardedTool

    def call(self, *args: Any, **kwargs: Any) -> ToolOutput:
        return self._guarded.call(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> ToolOutput:
        return self._guarded.call(*args, **kwargs)

    async def acall(self, *args: Any, **kwargs: Any) -> ToolOutput:
        return await self._guarded.acall(*args, **kwargs)


def guard_tool(tool: BaseTool, guard: Guard, **options: Any) -> GuardedTool | GuardedFunctionTool:
    """Wrap one tool: arguments checked before it runs (a blocked call never runs it), output after.

    A ``FunctionTool`` stays a FunctionTool (so a ``ctx: Context`` parameter is still injected by agents).
    """
    guarded = GuardedTool(tool, guard, **options)
    if isinstance(tool, FunctionTool):
        wrapper = copy.copy(tool)
        wrapper.__class__ = GuardedFunctionTool
        wrapper._guarded = guarded  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]
    return guarded


def guard_tools(tools: Sequence[BaseTool], guard: Guard, **options: Any) -> list[GuardedTool | GuardedFunctionTool]:
    """:func:`guard_tool` for each tool, order kept."""
    return [guard_tool(t, guard, **options) for t in tools]


# ---------------------------------------------------------------------------------------------- GuardedAgent


class _RunRecord:
    """The decisions of one GuardedAgent run, as :attr:`GuardedAgent.last_decisions` reads them in a context.

    ``parent`` is the record the run's context inherited from the context that created its task (a run
    awaited through ``asyncio.wait_for``, ``create_task``, a ``TaskGroup`` or ``gather``); a finishing run
    writes its decisions there too, and on up the chain, so the creating context reads the newer run.
    """

    __slots__ = ("__weakref__", "decisions", "task", "up")

    def __init__(
        self, decisions: dict[str, Decision], parent: _RunRecord | None, task: asyncio.Task[Any] | None
    ) -> None:
        self.decisions = decisions
        # the ancestors, as one shared chain of links (a link per record, not a copied list per record: a
        # worker that keeps its finished tasks keeps their records, and copies would grow quadratically). A
        # link holds its record weakly: a record lives while a context can read it, and a collected one
        # (an ended task's) is skipped, never cutting off live records above it.
        self.up: _Link | None = _Link(parent, parent.up) if parent is not None else None
        self.task: weakref.ref[asyncio.Task[Any]] | None = weakref.ref(task) if task is not None else None

    @property
    def parent(self) -> _RunRecord | None:
        """The nearest ancestor record a context can still read."""
        link = self.up
        while link is not None:
            if (record := link.record()) is not None:
                return record
            link = link.next
        return None


class _Link:
    """One step up a chain of run records: the record (weakly) and the link above it."""

    __slots__ = ("next", "record")

    def __init__(self, record: _RunRecord, above: _Link | None) -> None:
        self.record = weakref.ref(record)
        self.next = above


#: Per-context runs of GuardedAgents: the agent → the record of its last run started in this context.
#: Copied on write, so a run in one asyncio task never changes which record another task reads; a record is
#: only written by its own run and, when they finish, by the runs of tasks created from its context.
_RUN_DECISIONS: ContextVar[weakref.WeakKeyDictionary[GuardedAgent, _RunRecord] | None] = ContextVar(
    "flexguard_llama_index_agent_decisions", default=None
)


def _message_text(message: Any) -> str:
    """The text of every content block of a chat message (text, thinking, citations, text documents)."""
    blocks = getattr(message, "blocks", None)
    if isinstance(blocks, list):
        return _Screen(blocks, withhold=False).text
    return str(getattr(message, "content", "") or "")


def _visible_text(message: Any) -> str:
    """The text the user is shown: the message's top-level text blocks, joined as ``ChatMessage.content`` does."""
    blocks = getattr(message, "blocks", None)
    if isinstance(blocks, list):
        return "\n".join(b.text for b in blocks if isinstance(b, TextBlock))
    return str(getattr(message, "content", "") or "")


def _hidden_text(message: Any) -> str:
    """The text of the blocks that are not visible text: thinking, citations, citable and text documents."""
    blocks = getattr(message, "blocks", None)
    if not isinstance(blocks, list):
        return ""
    return _Screen([b for b in blocks if not isinstance(b, TextBlock)], withhold=False).text


def _structured_text(structured: Any) -> str | None:
    """A structured response as the JSON text the guard judges; None when there is none.

    A value JSON cannot hold (a handle, an arbitrary object in a Pydantic model) is rendered with ``repr``,
    so the response is still judged rather than the run crashing.
    """
    if structured is None:
        return None
    if hasattr(structured, "model_dump_json"):
        try:
            return str(structured.model_dump_json(fallback=repr))
        except Exception:  # an older Pydantic without fallback=, or a serializer that fails anyway
            return repr(structured)
    try:
        return json.dumps(structured, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(structured)


def _rewritten(message: ChatMessage, text: str) -> ChatMessage:
    """``message`` with ``text`` as its only content; a tool message keeps the id of the call it answers."""
    keep = {k: v for k, v in message.additional_kwargs.items() if k in ("tool_call_id", "name")}
    return ChatMessage(role=message.role, content=text, additional_kwargs=keep)


def _is_answer(message: Any, full: str, visible: str) -> bool:
    """Whether ``message`` is the stored final answer: the exact text of its blocks (``full``, stripped).

    A ``FunctionAgent`` stores the answer message itself; a ``ReActAgent`` stores its reasoning, which ends
    with ``Answer: <the visible answer>``.
    """
    if getattr(message, "role", None) != MessageRole.ASSISTANT:
        return False
    text = _message_text(message).strip()
    return text == full or (bool(visible) and text.endswith(f"\nAnswer: {visible}"))


def _rewrite_answer(messages: list[ChatMessage], full: str, visible: str, text: str) -> list[int]:
    """Replace the run's final answer in ``messages`` by ``text``, in place; the indices of the messages
    rewritten (none when it is not there).

    The answer is searched from the end backwards by its exact content (``full``: the text of all its blocks;
    ``visible``: its visible text), so messages another run of the conversation added after it are left as
    they are. A ``return_direct`` tool result the agent repeated as its answer is the tool message just
    before it: it is rewritten too.
    """
    full, visible = full.strip(), visible.strip()
    if not full:
        return []
    for i in range(len(messages) - 1, -1, -1):
        if _is_answer(messages[i], full, visible):
            messages[i] = _rewritten(messages[i], text)
            before = messages[i - 1] if i > 0 else None
            if before is not None and before.role == MessageRole.TOOL and _message_text(before).strip() == full:
                messages[i - 1] = _rewritten(before, text)
                return [i - 1, i]
            return [i]
    return []


def _rewrite_chat_store(memory: Any, full: str, visible: str, text: str) -> bool:
    """Read, rewrite and write a chat-store memory's history in one go (run in a worker thread)."""
    messages = list(memory.get_all())
    if not _rewrite_answer(messages, full, visible, text):
        return False
    memory.set(messages)
    return True


async def _rewrite_sql_store(
    store: Any, key: str, full: str, visible: str, text: str, since_ns: int = 0
) -> tuple[bool, bool]:
    """Rewrite the answer's rows of a ``SQLAlchemyChatStore`` (a ``Memory``'s store) in one transaction;
    (found, found among the archived rows).

    Only the answer's own rows are updated, by row id, so messages another run of the conversation writes
    meanwhile are neither lost nor reordered (deleting and re-adding the history lost them, and could leave
    the original answer in place). Only rows the run may have stored are searched (``timestamp >= since_ns``,
    less a second of clock slack), so an identical answer of an earlier run is never taken for this one;
    archived rows (moved out of the active window by the token limit) are searched too, when the answer is
    not among the active ones. Rewrites of one conversation in one event loop take turns (two runs blocking
    the same answer at once both chose the newest copy, and the other copy stayed). The update is read back:
    on llama-index's default in-memory database every session shares one connection, and another session
    handing it back rolls it back, which undid the update silently; it is then made again (three attempts,
    then a WARNING). The store's public API has no update, so this uses its table (``_initialize``,
    llama-index-core 0.14).
    """
    from llama_index.core.storage.chat_store.base_db import MessageStatus
    from sqlalchemy import select, true, update

    session_factory, table = await store._initialize()
    recent = table.c.timestamp >= since_ns - 1_000_000_000 if since_ns else true()
    async with _conversation_turn(store, key):
        for _ in range(_SQL_REWRITE_ATTEMPTS):
            async with session_factory() as session:
                # the active window first (bounded by the token limit), then the run's archived rows
                archived = False
                for where in (table.c.status == MessageStatus.ACTIVE.value, true()):
                    query = select(table.c.id, table.c.data).where((table.c.key == key) & recent & where)
                    rows = (await session.execute(query.order_by(table.c.timestamp, table.c.id))).fetchall()
                    messages = [ChatMessage.model_validate(row.data) for row in rows]
                    changed = _rewrite_answer(messages, full, visible, text)
                    if changed:
                        break
                    archived = True  # not among the active rows: what the second pass finds is archived
                if not changed:
                    return False, False
                wanted = {rows[i].id: messages[i].model_dump(mode="json") for i in changed}
                for row_id, data in wanted.items():
                    await session.execute(update(table).where(table.c.id == row_id).values(data=data))
                await session.commit()
            async with session_factory() as session:
                check = select(table.c.id, table.c.data).where(table.c.id.in_(list(wanted)))
                stored = {row.id: row.data for row in (await session.execute(check)).fetchall()}
            if stored == wanted:
                return True, archived
    logger.warning(
        "the rewrite of the blocked or redacted answer in the agent's Memory did not hold after %d attempts "
        "(another session of its database rolled it back): %s",
        _SQL_REWRITE_ATTEMPTS,
        _UNREWRITTEN,
    )
    return True, archived  # found; the WARNING above already says it may still be there


# per event loop (an asyncio.Lock belongs to one loop), by conversation: (database, table, session key), so
# separate Memory objects on one database and session share it
_TURNS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, str, str], list[Any]]] = (
    weakref.WeakKeyDictionary()
)


@contextlib.asynccontextmanager
async def _conversation_turn(store: Any, key: str) -> AsyncIterator[None]:
    """Make the memory rewrites of one conversation in this event loop take turns; the lock is dropped when no
    rewrite holds or waits for it. Runs in other loops or processes are not covered (documented)."""
    engine = getattr(store, "_async_engine", None)
    database = str(engine.url) if engine is not None else str(getattr(store, "async_database_uri", ""))
    ident = (database, str(getattr(store, "table_name", "")), key)
    turns = _TURNS.setdefault(asyncio.get_running_loop(), {})
    entry = turns.setdefault(ident, [asyncio.Lock(), 0])
    entry[1] += 1
    try:
        async with entry[0]:
            yield
    finally:
        entry[1] -= 1
        if entry[1] == 0:
            turns.pop(ident, None)


_SQL_REWRITE_ATTEMPTS = 3


_UNREWRITTEN = "it may still hold the original text, which the next run would feed back to the model"


async def _rewrite_memory(memory: Any, full: str, visible: str, text: str, since_ns: int = 0) -> None:
    """Replace the final answer stored in an agent memory by ``text``; a WARNING when that cannot be done.

    Only memories known to hold a plain chat history are written: a ``Memory`` (on its SQL store the
    answer's rows, active or archived, see :func:`_rewrite_sql_store`; on another ``AsyncDBChatStore`` its
    active messages, read and written back whole), a chat-store memory (``ChatMemoryBuffer`` and any other
    ``BaseChatStoreMemory``, ``ChatSummaryMemoryBuffer``), and the primary memory of a
    ``SimpleComposableMemory`` (its secondary memories keep what they were given). Any other memory is
    left unchanged.
    """
    from llama_index.core.memory import ChatSummaryMemoryBuffer, Memory, SimpleComposableMemory
    from llama_index.core.memory.types import BaseChatStoreMemory
    from llama_index.core.storage.chat_store.base_db import MessageStatus
    from llama_index.core.storage.chat_store.simple_chat_store import SimpleChatStore
    from llama_index.core.storage.chat_store.sql import SQLAlchemyChatStore

    name = type(memory).__name__
    if isinstance(memory, SimpleComposableMemory):
        await _rewrite_memory(memory.primary_memory, full, visible, text, since_ns)
        if memory.secondary_memory_sources:
            kinds = ", ".join(type(m).__name__ for m in memory.secondary_memory_sources)
            logger.warning(
                "the secondary memories of the agent's %s (%s) were not rewritten: they may still hold the "
                "original text of the blocked or redacted answer, which the next run would feed back to the model",
                name,
                kinds,
            )
        return
    if isinstance(memory, Memory):
        store, key = memory.sql_store, memory.session_id
        if isinstance(store, SQLAlchemyChatStore):
            found, archived = await _rewrite_sql_store(store, key, full, visible, text, since_ns)
            if archived and getattr(memory, "memory_blocks", None):
                logger.warning(
                    "the blocked or redacted answer had already left the agent's Memory's active window and was "
                    "rewritten in its archive, but its memory blocks (%s) may have taken the original text, which "
                    "the next run would feed back to the model",
                    ", ".join(type(b).__name__ for b in memory.memory_blocks),
                )
        else:  # another AsyncDBChatStore: not atomic, a conversation's runs must not overlap (see the docs)
            messages = list(await store.get_messages(key, status=MessageStatus.ACTIVE))
            found = bool(_rewrite_answer(messages, full, visible, text))
            if found:
                await store.delete_messages(key, status=MessageStatus.ACTIVE)
                await store.add_messages(key, messages, status=MessageStatus.ACTIVE)
    elif isinstance(memory, (BaseChatStoreMemory, ChatSummaryMemoryBuffer)):
        if type(getattr(memory, "chat_store", None)) is SimpleChatStore:  # in memory: no I/O, so on the loop,
            found = _rewrite_chat_store(memory, full, visible, text)  # where no other run can write in between
        else:  # a store that may do I/O (Redis...): in a thread; runs of one conversation must not overlap
            found = await asyncio.to_thread(_rewrite_chat_store, memory, full, visible, text)
    else:
        logger.warning(
            "the agent's %s is not a chat history GuardedAgent can rewrite (a ChatMemoryBuffer or other "
            "chat-store memory, a Memory, the primary memory of a SimpleComposableMemory): it was not changed "
            "and %s",
            name,
            _UNREWRITTEN,
        )
        return
    if not found:
        logger.warning(
            "the blocked or redacted answer was not found at the end of the agent's %s: %s", name, _UNREWRITTEN
        )


class GuardedAgent:
    """Guard a workflow agent (``FunctionAgent``, ``ReActAgent``, ``AgentWorkflow``) as a whole.

    ``await GuardedAgent(agent, guard).run(user_msg=...)`` checks the user message before the run (a
    blocked one never starts the agent) and the final answer after it: the text of every content block of
    ``output.response`` (text, thinking, citations, text documents) and the structured response (as JSON),
    checked as one text. A blocked answer is replaced by the refusal, in the output and in the agent's
    memory; a redacted one by its redacted visible text (thinking, citation and document blocks are never
    shown). A run's decisions are attached to its output (``output["flexguard"]``, and
    ``output.raw["flexguard"]`` when ``raw`` is a dict); :attr:`last_decisions` reads them per context.
    Combine with :func:`guard_tools` to gate each tool call as well.
    """

    def __init__(
        self,
        agent: Any,
        guard: Guard,
        *,
        on_block: Literal["refuse", "raise"] = "refuse",
        refusal: str = DEFAULT_AGENT_REFUSAL,
        policy: Any = None,
    ) -> None:
        self.agent = agent
        self.guard = guard
        self.on_block = on_block
        self.refusal = refusal
        self.policy = policy
        self._last_finished: dict[str, Decision] = {}

    @property
    def last_decisions(self) -> dict[str, Decision]:
        """The decisions (``"input"``, ``"output"``) of this agent's last run in the current context.

        A run records its decisions in the context it runs in: the coroutine that awaits :meth:`run`, or
        the asyncio task it runs as. So concurrent runs (``asyncio.gather``, one task per request) each read
        their own run's decisions, never another's. A run in a task created from a context where this agent
        already ran (``asyncio.wait_for``, ``create_task``, a ``TaskGroup``, ``gather``) is also recorded
        there when it finishes, so that context reads the newer run. Read from a context where this agent
        never ran, it gives the decisions of the run that finished last on this instance, whichever context
        ran it. Under concurrency prefer the decisions attached to each output (``output["flexguard"]``).
        """
        runs = _RUN_DECISIONS.get()
        record = runs.get(self) if runs is not None else None
        return record.decisions if record is not None else self._last_finished

    def _start_run(self, decisions: dict[str, Decision]) -> _RunRecord:
        """A fresh record of ``decisions`` for one run, made visible to :attr:`last_decisions` in this context.

        Its parent is the record this context inherited when that came from another task (the context that
        created this run's task); a record of this same task is replaced, so sequential runs build no chain.
        """
        try:
            task: asyncio.Task[Any] | None = asyncio.current_task()
        except RuntimeError:  # no running loop (a coroutine driven by hand)
            task = None
        runs = _RUN_DECISIONS.get()
        inherited = runs.get(self) if runs is not None else None
        parent = inherited
        if inherited is not None and inherited.task is not None and inherited.task() is task:
            parent = inherited.parent
        record = _RunRecord(decisions, parent, task)
        mine: weakref.WeakKeyDictionary[GuardedAgent, _RunRecord] = weakref.WeakKeyDictionary(runs or {})
        mine[self] = record
        _RUN_DECISIONS.set(mine)
        return record

    def _finish_run(self, record: _RunRecord, decisions: dict[str, Decision]) -> None:
        """Make the finished run the last one of this instance, of its context and of the contexts above.

        The run's own record is set again: a run nested in this one (a tool calling this agent, in a task of
        its own) wrote its decisions there when it finished.
        """
        self._last_finished = decisions
        record.decisions = decisions
        below: _Link | None = None
        link = record.up
        while link is not None:
            ancestor = link.record()
            if ancestor is None:  # collected: unlink it, so later walks skip it
                if below is None:
                    record.up = link.next
                else:
                    below.next = link.next
            else:
                ancestor.decisions = decisions
                below = link
            link = link.next

    @staticmethod
    def _attach(output: Any, decisions: dict[str, Decision]) -> Any:
        """Attach the run's decisions (as dicts) to its output: ``output["flexguard"]`` and a dict ``raw``."""
        record = {k: v.to_dict() for k, v in decisions.items()}
        if isinstance(output, Event):
            output["flexguard"] = record
        raw = getattr(output, "raw", None)
        if isinstance(raw, dict):
            raw["flexguard"] = record
        return output

    def _refusal(self, decision: Decision, decisions: dict[str, Decision]) -> Any:
        if self.on_block == "raise":
            raise GuardBlockedError(decision)
        from llama_index.core.agent.workflow import AgentOutput

        output = AgentOutput(
            response=ChatMessage(role=MessageRole.ASSISTANT, content=_refusal_text(self.refusal, decision)),
            tool_calls=[],
            raw={},
            current_agent_name=getattr(self.agent, "name", "agent"),
        )
        return self._attach(output, decisions)

    async def run(self, user_msg: str, *, policy: Any = None, **kwargs: Any) -> Any:
        """Run the agent on ``user_msg`` with both checks; returns the agent's output (or the refusal).

        ``policy=`` overrides the policy for this run only: both checks and, through
        :func:`~flexguard_integrations.policy_scope`, the guarded tools the agent calls. Other keyword
        arguments go to ``agent.run`` (``memory=``, ``ctx=``, ``chat_history=``...).
        """
        decisions: dict[str, Decision] = {}
        record = self._start_run(decisions)
        try:
            with policy_scope(policy) if policy is not None else contextlib.nullcontext():
                return await self._run(user_msg, decisions, **kwargs)
        finally:
            self._finish_run(record, decisions)

    async def _run(self, user_msg: str, decisions: dict[str, Decision], **kwargs: Any) -> Any:
        decision = await self.guard.acheck(user_msg, surface=Surface.PROMPT, policy=scoped_policy(self.policy))
        emit(decision, "agent:input")
        decisions["input"] = decision
        run_msg = user_msg
        if decision.action is Action.REDACT and decision.redacted_text is not None:
            run_msg = decision.redacted_text
        elif not decision.action.passes:
            return self._refusal(decision, decisions)
        started_ns = time.time_ns()  # the memory rows this run stores are not older (a Memory's SQL store)
        handler = self.agent.run(user_msg=run_msg, **kwargs)
        output = await handler
        response = getattr(output, "response", None)
        answer = _message_text(response)
        structured = _structured_text(getattr(output, "structured_response", None))
        checked = "\n\n".join(t for t in (answer, structured) if t and t.strip())
        if not checked:
            return self._attach(output, decisions)
        decision = await self.guard.acheck(
            user_msg, response=checked, surface=Surface.RESPONSE, policy=scoped_policy(self.policy)
        )
        if decision.action is Action.REDACT:
            decision = await self._redaction(user_msg, response, structured, decision)
        emit(decision, "agent:output")
        decisions["output"] = decision
        if decision.action.passes:
            return self._attach(output, decisions)
        visible = _visible_text(response)
        if decision.action is Action.REDACT and decision.redacted_text is not None:
            await self._rewrite_run_memory(handler, kwargs, answer, visible, decision.redacted_text, started_ns)
            output.response = ChatMessage(role=MessageRole.ASSISTANT, content=decision.redacted_text)
            output.raw = {}  # the model's raw answer holds the unredacted text
            return self._attach(output, decisions)
        refusal = _refusal_text(self.refusal, decision)
        await self._rewrite_run_memory(handler, kwargs, answer, visible, refusal, started_ns)
        return self._refusal(decision, decisions)

    async def _redaction(self, user_msg: str, response: Any, structured: str | None, decision: Decision) -> Decision:
        """The decision that replaces a REDACT of the answer: only redacted visible text may reach the user.

        The first check judged every block; its redacted text would show thinking, citation titles and
        sources, and document text as answer text. So when the answer has such blocks, the visible text is
        checked again on its own: REDACT gives its redacted text, a pass keeps it as it is (the other blocks
        are dropped), anything else blocks, and so does a fail-open ALLOW of the re-check (no verdict: the
        answer as a whole was already judged over the threshold). A structured response, or an answer with
        no visible text, cannot be redacted: it is blocked, and the reason says so.
        """
        if structured is not None:
            reason = f"{decision.reason}; a structured response cannot be redacted: blocked"
            return replace(decision, action=Action.BLOCK, reason=reason, redacted_text=None)
        if not _hidden_text(response).strip():
            return decision  # only visible text was checked: its redaction is the answer
        visible = _visible_text(response)
        if not visible.strip():
            reason = f"{decision.reason}; the answer has no visible text to redact: blocked"
            return replace(decision, action=Action.BLOCK, reason=reason, redacted_text=None)
        second = await self.guard.acheck(
            user_msg, response=visible, surface=Surface.RESPONSE, policy=scoped_policy(self.policy)
        )
        if second.action.passes and (second.fail_open or second.verdict.error is not None):
            # a fail-open ALLOW is no verdict on the visible text alone: the answer was judged over the
            # threshold as a whole, and nothing says which part, so nothing of it is shown
            reason = f"{decision.reason}; the visible text could not be re-checked ({second.reason}): blocked"
            return replace(decision, action=Action.BLOCK, reason=reason, redacted_text=None)
        if second.action is Action.REDACT and second.redacted_text is not None:
            return replace(second, reason=f"{second.reason} (the visible text, checked on its own)")
        if second.action.passes:
            reason = (
                f"{decision.reason}; the visible text alone passes ({second.reason}): it is the answer, "
                "without the thinking, citation and document blocks"
            )
            return replace(decision, reason=reason, redacted_text=visible)
        return second

    @staticmethod
    async def _rewrite_run_memory(
        handler: Any, kwargs: dict[str, Any], full: str, visible: str, text: str, since_ns: int
    ) -> None:
        """Put ``text`` in place of the blocked or redacted answer in the memory the run used.

        Workflow agents keep their memory in the run's context store (``memory=`` given to ``run`` ends up
        there too); an agent without one falls back to the ``memory=`` argument. Nothing here raises: a
        failure is logged as a WARNING (with its traceback), and the run's refusal or redaction still
        comes out.
        """
        memory: Any = None
        try:
            ctx = getattr(handler, "ctx", None)
            store = getattr(ctx, "store", None)
            if store is not None:
                memory = await store.get("memory", default=None)
            if memory is None:
                memory = kwargs.get("memory")
            if memory is None:
                return
            if not full.strip():
                logger.warning(
                    "the blocked or redacted answer has no text (only a structured response): nothing to look "
                    "for in the agent's %s, which was not changed",
                    type(memory).__name__,
                )
                return
            await _rewrite_memory(memory, full, visible, text, since_ns)
        except Exception:
            logger.warning(
                "rewriting the blocked or redacted answer in the agent's %s failed: %s",
                type(memory).__name__ if memory is not None else "memory",
                _UNREWRITTEN,
                exc_info=True,
            )
