"""The public API is pinned, and the core imports no framework."""

from __future__ import annotations

import subprocess
import sys

import flexguard_integrations

EXPECTED_CORE = {
    "Action", "Category", "CheckRequest", "CircuitBreaker", "ConfigurationError", "ContextLengthExceededError",
    "Decision", "FlexGuardError", "Guard", "GuardAuthenticationError", "GuardBadRequestError", "GuardBlockedError",
    "GuardConnectionError", "GuardInputError", "GuardOverloadedError", "GuardResponseError", "GuardServerError",
    "GuardTimeoutError", "GuardTransportError", "GuardUnavailableError", "PRESETS", "PolicyError",
    "StrictnessPolicy", "Surface", "Verdict", "VerdictCache", "__version__", "policy_scope",
}  # fmt: skip


def test_public_core_names() -> None:
    assert set(flexguard_integrations.__all__) == EXPECTED_CORE
    for name in flexguard_integrations.__all__:
        assert getattr(flexguard_integrations, name) is not None


def test_langchain_public_names() -> None:
    from flexguard_integrations import langchain

    assert set(langchain.__all__) == {
        "DEFAULT_REFUSAL", "POLICY_CONFIG_KEY", "VERDICT_EVENT", "GuardCallbackHandler", "GuardDocumentCompressor",
        "GuardMiddleware", "GuardRunnable", "GuardedRetriever", "GuardedRunnable", "GuardedTool", "guard_tool",
        "guard_tools", "guarded",
    }  # fmt: skip


def test_llama_index_public_names() -> None:
    from flexguard_integrations import llama_index

    assert set(llama_index.__all__) == {
        "GuardCheckEvent", "GuardNodePostprocessor", "GuardPassedEvent", "GuardStepMixin", "GuardVerdictEvent",
        "GuardedAgent", "GuardedFunctionTool", "GuardedQueryEngine", "GuardedTool", "guard_tool", "guard_tools",
    }  # fmt: skip


def test_core_imports_no_framework() -> None:
    code = (
        "import sys\n"
        "import flexguard_integrations as f\n"
        "from flexguard_integrations import Guard, StrictnessPolicy, Verdict\n"
        "from flexguard_integrations.testing import FakeGuardServer\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('langchain', 'langchain_core', 'langgraph',"
        " 'llama_index', 'openai', 'torch', 'transformers'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_bare_import_is_lazy() -> None:
    code = (
        "import sys, flexguard_integrations\n"
        "print(sorted(m for m in ('httpx', 'pydantic', 'yaml') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
