"""LangChain integration (extra ``[langchain]``): Runnables, agent middleware, tool gating, retrievers,
callbacks.

The only place in the package that imports ``langchain_core`` / ``langchain``.
"""

from ._common import DEFAULT_REFUSAL, POLICY_CONFIG_KEY, VERDICT_EVENT
from .callbacks import GuardCallbackHandler
from .middleware import GuardMiddleware
from .retriever import GuardDocumentCompressor, GuardedRetriever
from .runnable import GuardedRunnable, GuardRunnable, guarded
from .tools import GuardedTool, guard_tool, guard_tools

__all__ = [
    "DEFAULT_REFUSAL",
    "POLICY_CONFIG_KEY",
    "VERDICT_EVENT",
    "GuardCallbackHandler",
    "GuardDocumentCompressor",
    "GuardMiddleware",
    "GuardRunnable",
    "GuardedRetriever",
    "GuardedRunnable",
    "GuardedTool",
    "guard_tool",
    "guard_tools",
    "guarded",
]
