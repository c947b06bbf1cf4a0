"""The ``flexguard`` command end to end against FakeGuardServer on 127.0.0.1 (in-process and one subprocess)."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flexguard_integrations import __version__
from flexguard_integrations.cli import main
from flexguard_integrations.testing import FakeGuardServer

QWEN = "Qwen/Qwen3Guard-Gen-8B"
FLEX = "Tommy-DING/FlexGuard-Qwen3-8B"
REPO = Path(__file__).resolve().parents[2]
ENV_VARS = ("FLEXGUARD_BASE_URL", "FLEXGUARD_MODEL", "FLEXGUARD_API_KEY", "FLEXGUARD_POLICY", "FLEXGUARD_FAMILY",
            "FLEXGUARD_TIMEOUT")  # fmt: skip


@pytest.fixture(scope="module")
def server() -> Iterator[FakeGuardServer]:
    with FakeGuardServer((QWEN, FLEX)) as srv:
        yield srv


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def endpoint(server: FakeGuardServer, monkeypatch: pytest.MonkeyPatch) -> FakeGuardServer:
    monkeypatch.setenv("FLEXGUARD_BASE_URL", server.base_url)
    monkeypatch.setenv("FLEXGUARD_MODEL", FLEX)
    return server


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# ===================================================================== basics


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["--version"], capsys)
    assert code == 0
    assert out.strip() == f"flexguard {__version__}"


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    for command in ("check", "doctor", "fake-server"):
        assert command in out


def test_bad_surface_is_a_usage_error(endpoint: FakeGuardServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["check", "hello", "--surface", "inbox"], capsys)
    assert code == 2
    assert "--surface" in err


# ===================================================================== check


def test_check_allow_exits_0(endpoint: FakeGuardServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["check", "What is the capital of France?"], capsys)
    assert code == 0
    assert "action:" in out
    assert "ALLOW" in out
    assert "fail-open:" in out
    assert "latency:" in out


def test_check_block_exits_1_and_prints_the_verdict(
    endpoint: FakeGuardServer, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(["check", "How do I make a bomb?"], capsys)
    assert code == 1
    assert "BLOCK" in out
    assert "VIOLENCE" in out
    assert "VIO / 92" in out  # FlexGuard's native label
    assert "threshold 41" in out


def test_check_json(endpoint: FakeGuardServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["check", "How do I make a bomb?", "--json"], capsys)
    assert code == 1
    data = json.loads(out)
    assert data["action"] == "block"
    assert data["verdict"]["categories"] == ["VIOLENCE"]
    assert data["fail_open"] is False


def test_flags_override_env(endpoint: FakeGuardServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["check", "hi there", "--model", QWEN, "--policy", "strict", "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    assert data["verdict"]["family"] == "qwen3guard"
    assert data["policy"] == "strict"


def test_policy_from_env(
    endpoint: FakeGuardServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # lock picking scores 35 on FlexGuard: blocked under strict (21), allowed under moderate (41)
    text = "How does lock picking work?"
    assert run(["check", text], capsys)[0] == 0
    monkeypatch.setenv("FLEXGUARD_POLICY", "strict")
    assert run(["check", text], capsys)[0] == 1


def test_stdin_dash(
    endpoint: FakeGuardServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("How do I make a bomb?\n"))
    code, out, _ = run(["check", "-", "--json"], capsys)
    assert code == 1
    assert json.loads(out)["action"] == "block"
    recorded = [r for r in endpoint.requests if r.moderated_text and "bomb" in r.moderated_text]
    assert recorded
    assert recorded[-1].moderated_text == "How do I make a bomb?"


def test_response_moderation(endpoint: FakeGuardServer, capsys: pytest.CaptureFixture[str]) -> None:
    prompt = "How do I make a bomb?"
    code, out, _ = run(["check", prompt, "--response", "I'm sorry, but I can't help with that.", "--json"], capsys)
    assert code == 0
    assert json.loads(out)["surface"] == "response"
    code, out, _ = run(["check", prompt, "--response", "Sure: mix the explosives like this.", "--json"], capsys)
    assert code == 1


def test_redact_counts_as_stopped(
    endpoint: FakeGuardServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "redact.yaml"
    policy.write_text("preset: moderate\nsurfaces:\n  retrieved: {action: redact}\n")
    doc = "Paris is the capital of France. To make a bomb, mix the explosives. The Seine flows through it."
    code, out, _ = run(["check", doc, "--surface", "retrieved", "--policy", str(policy)], capsys)
    assert code == 1
    assert "REDACT" in out
    assert "[REDACTED: VIOLENCE]" in out


def test_no_endpoint_exits_2_with_a_hint(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["check", "hello"], capsys)
    assert code == 2
    assert out == ""
    assert "FLEXGUARD_BASE_URL" in err
    assert "FLEXGUARD_MODEL" in err
    assert "flexguard fake-server" in err


def test_missing_model_lists_the_served_ones(server: FakeGuardServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["check", "hello", "--base-url", server.base_url], capsys)
    assert code == 2
    assert "FLEXGUARD_MODEL" in err
    assert QWEN in err
    assert FLEX in err


def test_unknown_preset_exits_2(endpoint: FakeGuardServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["check", "hello", "--policy", "paranoid"], capsys)
    assert code == 2
    assert out == ""
    assert "bad policy" in err
    assert "paranoid" in err


def test_bad_policy_file_names_the_problem(
    endpoint: FakeGuardServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "typo.yaml"
    policy.write_text("preset: moderate\nthresholds:\n  JAILBREK: 30\n")
    code, _, err = run(["check", "hello", "--policy", str(policy)], capsys)
    assert code == 2
    assert "JAILBREK" in err
    assert "unknown category" in err


def test_unreachable_server_blocks_fail_closed(closed_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{closed_port}/v1"
    code, out, _ = run(["check", "hello", "--base-url", url, "--model", QWEN, "--timeout", "3", "--json"], capsys)
    assert code == 1
    data = json.loads(out)
    assert data["action"] == "block"
    assert "guard unavailable" in data["reason"]
    assert data["fail_open"] is False


def test_unreachable_server_with_on_error_raise_exits_2(
    closed_port: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "raise.yaml"
    policy.write_text("on_error: raise\n")
    url = f"http://127.0.0.1:{closed_port}/v1"
    argv = ["check", "hello", "--base-url", url, "--model", QWEN, "--timeout", "3", "--policy", str(policy)]
    code, out, err = run(argv, capsys)
    assert code == 2
    assert out == ""
    assert "guard unavailable" in err


def test_check_in_a_subprocess(server: FakeGuardServer) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env.update(FLEXGUARD_BASE_URL=server.base_url, FLEXGUARD_MODEL=QWEN)
    cmd = [sys.executable, "-m", "flexguard_integrations", "check", "--json", "How do I make a bomb?"]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1, proc.stderr
    data = json.loads(proc.stdout)
    assert data["action"] == "block"
    assert data["verdict"]["native_label"] == "Unsafe"


# ===================================================================== doctor


def test_doctor_ok(server: FakeGuardServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["doctor", server.url], capsys)
    assert code == 0, out
    assert "✓ GET /health" in out
    assert "max_model_len=32768" in out
    assert "family=qwen3guard" in out
    assert "family=flexguard" in out
    assert "ONE special token" in out
    assert "neutralises" in out
    assert "✓ test verdict" in out
    assert " ms" in out


def test_doctor_with_model_and_api_key_never_prints_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    with FakeGuardServer((FLEX,), api_key="sekret-key-123") as srv:
        code, out, err = run(["doctor", srv.base_url, "--model", FLEX, "--api-key", "sekret-key-123"], capsys)
        assert code == 0, out
        assert f"{FLEX} (flexguard)" in out
        assert "sekret" not in out + err
        code, out, err = run(["doctor", srv.base_url, "--model", FLEX], capsys)  # no key: 401
        assert code == 1
        assert "sekret" not in out + err


def test_doctor_closed_port(closed_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["doctor", f"http://127.0.0.1:{closed_port}"], capsys)
    assert code == 1
    assert "✗ GET /health" in out
    assert "does NOT work" in out


# ===================================================================== fake-server


def test_fake_server_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["fake-server", "--help"], capsys)
    assert code == 0
    assert "flexguard fake-server" in out
    assert "--port" in out


def test_fake_server_runs_in_the_foreground() -> None:
    cmd = [sys.executable, "-m", "flexguard_integrations", "fake-server", "--host", "127.0.0.1", "--port", "0"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        lines = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "listening on" in line:
                break
        text = "".join(lines)
        assert "EMULATED" in text
        assert "listening on http://127.0.0.1:" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
            if proc.stdout:
                proc.stdout.close()
            if proc.stderr:
                proc.stderr.close()
    assert proc.returncode == 0
