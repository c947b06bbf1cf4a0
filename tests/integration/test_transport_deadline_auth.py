"""Transports: one total deadline on the blocking path too, credentials in the URL, the openai client's retries.

Against FakeGuardServer (127.0.0.1). A ``trickle`` answer sends its headers at once and its body one byte every
0.2 s: a read timeout that restarts at every byte never fires, so only a total deadline ends the check.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from flexguard_integrations import Action, ConfigurationError, Decision, Guard
from flexguard_integrations.models import create_model
from flexguard_integrations.testing import FakeGuardServer, FaultPlan
from flexguard_integrations.transport.http import HTTPTransport
from tests.conftest import QWEN

TRANSPORTS = ["httpx", "aiohttp"]
BENIGN = "What is a good name for a cat?"
LIVENESS = 30.0
"""Seconds after which a check that should end at its 1 s deadline is taken as stuck (the trickled answer
takes over 100 s); a bound on hanging, not a speed assertion."""


def chat_requests(srv: FakeGuardServer) -> list[Any]:
    return [r for r in srv.requests if r.path.endswith("/chat/completions")]


def check_in_thread(guard: Guard, text: str) -> Decision | None:
    """``guard.check(text)`` on a daemon thread; None when it has not returned after LIVENESS seconds."""
    out: list[Decision] = []
    worker = threading.Thread(target=lambda: out.append(guard.check(text)), daemon=True)
    worker.start()
    worker.join(LIVENESS)
    return out[0] if out else None


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_blocking_check_ends_at_its_deadline_when_the_answer_trickles(transport: str) -> None:
    with FakeGuardServer() as srv:
        srv.fail_next(1, fault="trickle")
        with Guard.from_endpoint(srv.base_url, QWEN, timeout=1.0, max_retries=0, cache=False, transport=transport) as g:
            decision = check_in_thread(g, BENIGN)
            assert decision is not None, "the blocking check outlived its deadline"
            assert decision.action is Action.BLOCK and not decision.fail_open  # fail-closed
            assert decision.verdict.error is not None and "deadline" in decision.verdict.error
            # the connection it gave up on does not poison the next check
            assert g.check(BENIGN).action is Action.ALLOW
        assert [r.fault for r in chat_requests(srv)] == ["trickle", None]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_async_check_ends_at_its_deadline_when_the_answer_trickles(transport: str) -> None:
    with FakeGuardServer() as srv:
        srv.fail_next(1, fault="trickle")
        async with Guard.from_endpoint(
            srv.base_url, QWEN, timeout=1.0, max_retries=0, cache=False, transport=transport
        ) as g:
            decision = await asyncio.wait_for(g.acheck(BENIGN), LIVENESS)
            assert decision.action is Action.BLOCK and not decision.fail_open
            assert decision.verdict.error is not None and "deadline" in decision.verdict.error
            assert (await g.acheck(BENIGN)).action is Action.ALLOW


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_credentials_in_base_url_authenticate_both_paths_and_stay_out_of_reprs(transport: str) -> None:
    with FakeGuardServer() as srv:
        url = srv.base_url.replace("http://", "http://gw%20user:s3cr3t-pass@")
        async with Guard.from_endpoint(url, QWEN, cache=False, transport=transport) as g:
            assert "s3cr3t" not in repr(g) and "s3cr3t" not in repr(g.transport)
            assert "gw" not in g.transport.base_url  # type: ignore[attr-defined]
            assert (await g.acheck(BENIGN)).action is Action.ALLOW
            assert g.check(BENIGN).action is Action.ALLOW
        # "gw user:s3cr3t-pass", percent-decoded, in Basic form; sent by acheck() and check() alike
        sent = [r.headers.get("authorization") for r in chat_requests(srv)]
        assert sent == ["Basic Z3cgdXNlcjpzM2NyM3QtcGFzcw=="] * 2


def test_credentials_in_base_url_and_an_api_key_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="user:password") as info:
        Guard.from_endpoint("http://me:s3cr3t@127.0.0.1:9/v1", QWEN, api_key="sk-other")
    assert "s3cr3t" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("me:s3cr3t@127.0.0.1:8000/v1", "***@127.0.0.1:8000/v1"),  # the scheme forgotten
        ("127.0.0.1:8000/v1?api_key=s3cr3t", "127.0.0.1:8000/v1"),
        ("http//me:s3cr3t@127.0.0.1/v1", "http//***@127.0.0.1/v1"),  # a typo in the scheme
        ("ftp://127.0.0.1/v1#s3cr3t", "ftp://127.0.0.1/v1"),
        # secrets holding "/", "#", "?" or a space were shown in part
        ("htps://apikey:s3cr3t/YmFy+x@127.0.0.1/v1", "htps://***@127.0.0.1/v1"),
        ("apikey:s3#cr3t@127.0.0.1/v1", "***@127.0.0.1/v1"),
        ("apikey:s3?cr3t@127.0.0.1/v1", "***@127.0.0.1/v1"),
        ("apikey:my s3cr3t@127.0.0.1/v1", "***@127.0.0.1/v1"),
    ],
)
def test_a_malformed_base_url_is_shown_without_its_secrets(url: str, shown: str) -> None:
    # the error echoed the whole value, password or key included, into exceptions and logs
    with pytest.raises(ConfigurationError, match="must start with http") as info:
        Guard.from_endpoint(url, QWEN)
    assert "s3cr3t" not in str(info.value) and "cr3t" not in str(info.value) and repr(shown) in str(info.value)


def test_openai_client_blocking_check_ends_at_its_deadline_when_the_answer_trickles() -> None:
    # the SDK's timeouts are per read: a body trickled one byte per 0.2 s held check() for minutes
    openai = pytest.importorskip("openai")
    with FakeGuardServer() as srv:
        srv.fail_next(1, fault="trickle")
        client = openai.OpenAI(base_url=srv.base_url, api_key="none", max_retries=0)
        g = Guard.from_openai_client(client, QWEN, timeout=1.0, max_retries=0, cache=False)
        decision = check_in_thread(g, BENIGN)
        assert decision is not None, "the blocking check outlived its deadline"
        assert decision.action is Action.BLOCK and not decision.fail_open
        assert "still arriving at the check's deadline" in (decision.verdict.error or "")
        assert g.check(BENIGN).action is Action.ALLOW  # the next check is fine
        assert [r.fault for r in chat_requests(srv)] == ["trickle", None]


@pytest.mark.parametrize(("fault", "error"), [("html", "non-JSON (text/html)"), ("bad_shape", "no choices")])
def test_openai_client_blocking_check_reads_a_bad_answer_as_an_error(fault: str, error: str) -> None:
    openai = pytest.importorskip("openai")
    with FakeGuardServer() as srv:
        srv.fail_next(1, fault=fault)
        client = openai.OpenAI(base_url=srv.base_url, api_key="none", max_retries=0)
        decision = Guard.from_openai_client(client, QWEN, max_retries=0, cache=False).check(BENIGN)
    assert decision.action is Action.BLOCK and error in (decision.verdict.error or "")


def test_openai_client_retries_fit_the_deadline() -> None:
    """The SDK's own retries are off: a Retry-After longer than what is left ends the check at once."""
    openai = pytest.importorskip("openai")
    with FakeGuardServer(faults=FaultPlan(retry_after=3.0)) as srv:
        srv.fail_next(5, fault="503")
        client = openai.OpenAI(base_url=srv.base_url, api_key="none")  # the SDK's default: 2 retries
        g = Guard.from_openai_client(client, QWEN, timeout=1.0, cache=False)
        decision = check_in_thread(g, BENIGN)
        assert decision is not None and decision.action is Action.BLOCK and decision.verdict.error is not None
        assert len(chat_requests(srv)) == 1  # before: 3, the SDK sleeping 3 s between them


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_openai_client_transport_retries_transient_failures_itself(mode: str) -> None:
    openai = pytest.importorskip("openai")
    with FakeGuardServer(faults=FaultPlan(retry_after=0.05)) as srv:
        srv.fail_next(2, fault="503")
        if mode == "sync":
            g = Guard.from_openai_client(openai.OpenAI(base_url=srv.base_url, api_key="none"), QWEN, cache=False)
            decision = g.check(BENIGN)
        else:
            client = openai.AsyncOpenAI(base_url=srv.base_url, api_key="none")
            g = Guard.from_openai_client(client, QWEN, cache=False)
            decision = await g.acheck(BENIGN)
        assert decision.action is Action.ALLOW and decision.verdict.error is None
        assert [r.fault for r in chat_requests(srv)] == ["503", "503", None]


def test_openai_client_max_retries_counts_the_guards_retries() -> None:
    openai = pytest.importorskip("openai")
    with FakeGuardServer(faults=FaultPlan(retry_after=0.05)) as srv:
        srv.fail_next(1, fault="503")
        g = Guard.from_openai_client(
            openai.OpenAI(base_url=srv.base_url, api_key="none"), QWEN, cache=False, max_retries=0
        )
        assert g.check(BENIGN).action is Action.BLOCK
        assert len(chat_requests(srv)) == 1
        srv.reset()
        srv.fail_next(1, fault="503")
        g = Guard.from_openai_client(
            openai.OpenAI(base_url=srv.base_url, api_key="none"), QWEN, cache=False, max_retries=1
        )
        assert g.check(BENIGN).action is Action.ALLOW
        assert [r.fault for r in chat_requests(srv)] == ["503", None]


class _StalledModels(HTTPTransport):
    """The real transport, except that ``GET /v1/models`` never finishes (what httpx sees of a server trickling
    it: its timeouts restart at every byte)."""

    async def amodels(self, *, deadline: float) -> list[dict[str, Any]]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_async_context_length_discovery_ends_at_the_check_deadline() -> None:
    long_text = "The weather today is mild and pleasant. " * 60  # over the size that asks /v1/models first
    with FakeGuardServer() as srv:
        guard = Guard(create_model(None, QWEN), _StalledModels(srv.base_url), model_name=QWEN, timeout=1.0)
        async with guard:
            decision = await asyncio.wait_for(guard.acheck(long_text), LIVENESS)
        assert decision.action is Action.BLOCK and not decision.fail_open
        assert decision.verdict.error is not None and "deadline" in decision.verdict.error
