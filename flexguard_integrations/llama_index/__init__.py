"""LlamaIndex integration (extra ``[llama-index]``): node postprocessor, guarded query engine, tool gating,
a whole-agent guard, a workflow step and instrumentation events.

The only place in the package that imports ``llama_index``.
"""

from .events import GuardVerdictEvent
from .postprocessor import GuardNodePostprocessor
from .query_engine import GuardedQueryEngine
from .tools import GuardedAgent, GuardedFunctionTool, GuardedTool, guard_tool, guard_tools
from .workflow import GuardCheckEvent, GuardPassedEvent, GuardStepMixin

__all__ = [
    "GuardCheckEvent",
    "GuardNodePostprocessor",
    "GuardPassedEvent",
    "GuardStepMixin",
    "GuardVerdictEvent",
    "GuardedAgent",
    "GuardedFunctionTool",
    "GuardedQueryEngine",
    "GuardedTool",
    "guard_tool",
    "guard_tools",
]
