"""The local guard's messages when the extra is missing, and the CLI's choice between endpoint and local guard.

These run in the main test job, with or without torch: the extra's presence is faked either way.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest

from flexguard_integrations import Guard
from flexguard_integrations.cli import main
from flexguard_integrations.errors import ConfigurationError
from flexguard_integrations.transport import local

ENV_VARS = ("FLEXGUARD_BASE_URL", "FLEXGUARD_MODEL", "FLEXGUARD_LOCAL_MODEL", "FLEXGUARD_POLICY", "FLEXGUARD_FAMILY")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def no_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any, **kwargs: Any) -> Any:
        return None if name == "torch" else real(name, *args, **kwargs)

    monkeypatch.setattr(local.importlib.util, "find_spec", find_spec)


@pytest.mark.usefixtures("no_torch")
def test_guard_local_without_the_extra_names_it() -> None:
    assert not local.local_extra_available()
    with pytest.raises(ConfigurationError) as info:
        Guard.local()
    message = str(info.value)
    assert "torch not installed" in message
    assert "pip install 'flexguard-integrations[local]'" in message
    assert "CPU build of torch" in message


@pytest.mark.usefixtures("no_torch")
def test_cli_without_endpoint_or_extra_says_how_to_get_either(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["check", "hello"])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert "FLEXGUARD_BASE_URL" in err
    assert "pip install 'flexguard-integrations[local]'" in err
    assert "flexguard fake-server" in err


def test_cli_passes_local_options_to_guard_local(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: dict[str, Any] = {}

    def fake_local(model: str, **kwargs: Any) -> Guard:
        seen.update(kwargs, model=model)
        raise ConfigurationError("stop here")

    monkeypatch.setattr(local, "local_extra_available", lambda: True)
    monkeypatch.setattr(Guard, "local", staticmethod(fake_local))
    monkeypatch.setenv("FLEXGUARD_LOCAL_MODEL", "Qwen/Qwen3Guard-Gen-4B")
    code = main(["check", "hello", "--policy", "strict", "--timeout", "9"])
    _, err = capsys.readouterr()
    assert code == 2
    assert seen == {"model": "Qwen/Qwen3Guard-Gen-4B", "family": None, "policy": "strict", "timeout": 9.0}
    assert "running Qwen/Qwen3Guard-Gen-4B" in err
    assert "stop here" in err
    assert "FLEXGUARD_BASE_URL" in err  # a failed local load still says how to use a server instead

    seen.clear()
    main(["check", "hello", "--local-model", "/models/qwen3guard"])
    assert seen["model"] == "/models/qwen3guard"


def test_an_endpoint_wins_over_the_local_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    called: list[str] = []
    monkeypatch.setattr(local, "local_extra_available", lambda: called.append("local") or True)
    monkeypatch.setenv("FLEXGUARD_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("FLEXGUARD_MODEL", "Qwen/Qwen3Guard-Gen-8B")
    main(["check", "hello", "--timeout", "0.5"])
    assert called == []
