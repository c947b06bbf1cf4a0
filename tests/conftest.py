"""Shared fixtures: a FakeGuardServer per test and Guards pointed at it (127.0.0.1 only)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

# No test may reach the Hugging Face hub: with the local extra installed, a hub name must fail at once
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from flexguard_integrations.testing import FakeGuardServer

QWEN = "Qwen/Qwen3Guard-Gen-8B"
FLEX = "Tommy-DING/FlexGuard-Qwen3-8B"


@pytest.fixture
def server() -> Iterator[FakeGuardServer]:
    with FakeGuardServer() as srv:
        yield srv


@pytest.fixture(params=[QWEN, FLEX], ids=["qwen3guard", "flexguard"])
def model_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def closed_port_url() -> str:
    """A loopback URL nothing listens on."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"
