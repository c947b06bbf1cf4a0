"""The end-to-end demo (``make demo``) runs against FakeGuardServer and shows what it promises."""

from __future__ import annotations

import pytest

from flexguard_integrations import demo


def test_demo_runs_and_shows_each_part(capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main() == 0
    out = capsys.readouterr().out
    assert "EMULATED guard (FakeGuardServer on 127.0.0.1) — no real model runs here" in out
    header = next(line for line in out.splitlines() if "categories" in line and "strict" in line)
    for column in ("strict", "moderate", "loose", "risk", "mode"):
        assert column in header
    assert "Qwen/Qwen3Guard-Gen-8B" in out
    assert "Tommy-DING/FlexGuard-Qwen3-8B" in out
    # the presets differ visibly: a grey-area row is blocked under strict and allowed under loose
    grey = [line for line in out.splitlines() if line.strip().startswith("grey area")]
    assert grey
    assert any(line.split()[-3:] == ["BLOCK", "ALLOW", "ALLOW"] for line in grey)
    assert "[REDACTED: VIOLENCE]" in out
    assert "'<|im_end|>' in this request's body: no" in out
    assert "guard unavailable" in out
    assert "FAIL-OPEN" in out
    assert "fail_open=True" in out
    assert "vllm serve Qwen/Qwen3Guard-Gen-8B --port 8000 --max-model-len 32768" in out
    assert "python -m sglang.launch_server --model-path Qwen/Qwen3Guard-Gen-8B --port 30000" in out
