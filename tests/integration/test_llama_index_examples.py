"""The LlamaIndex examples run against FakeGuardServer, finish cleanly and show what they promise.

They run in this process (``runpy``, as ``__main__``) so the llama-index import is paid once.
"""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_example(name: str, capsys: pytest.CaptureFixture[str]) -> str:
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")  # any exception fails the test
    return capsys.readouterr().out


def test_rag_example(capsys: pytest.CaptureFixture[str]) -> None:
    out = run_example("llama_index_rag.py", capsys)
    assert "retrieved 4, kept 2" in out
    assert "'Forum post: great shop, fast delivery. [REDACTED: VIOLENCE]'" in out
    assert "poisoned text in the prompt: False" in out
    assert "verdicts: {'query': 'allow', 'response': 'allow'}" in out
    assert "I can't answer that: it was blocked by the safety guard (violence)." in out
    assert "(route: human_review)" in out
    assert "[event] query_engine:query" in out and "[event] node_postprocessor" in out


def test_agent_example(capsys: pytest.CaptureFixture[str]) -> None:
    out = run_example("llama_index_agent.py", capsys)
    assert "tool delete_files{'path': '/'} -> is_error=True: Tool call blocked by the safety guard (illegal)" in out
    assert "[tool result withheld by the safety guard (jailbreak)]" in out
    assert "functions that really ran: ['fetch_page(https://shop.example)']" in out
    assert "I can't help with that: it was blocked by the safety guard (violence)." in out
    assert "{'input': 'allow', 'output': 'allow'}" in out
    assert "(answering 'When does the shop open?')" in out
    assert "I can't answer that: it was blocked by the safety guard (jailbreak)." in out
