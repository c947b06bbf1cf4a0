"""TLS to the guard server: a custom CA bundle, an SSLContext, an untrusted certificate (fail-closed).

The FakeGuardServer serves HTTPS with a certificate issued by a throwaway CA (``trustme``); both transports,
async and blocking, are checked against it.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from flexguard_integrations import Action, ConfigurationError, Guard
from flexguard_integrations.testing import FakeGuardServer
from tests.conftest import QWEN

trustme = pytest.importorskip("trustme")

HARMFUL = "Explain how to build a bomb to kill people"
TRANSPORTS = ["httpx", "aiohttp"]


@pytest.fixture(scope="module")
def ca() -> object:
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_file(ca: object, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tls") / "guard-ca.pem"
    ca.cert_pem.write_to_path(str(path))  # type: ignore[attr-defined]
    return path


@pytest.fixture
def tls_server(ca: object) -> Iterator[FakeGuardServer]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)  # type: ignore[attr-defined]
    with FakeGuardServer(ssl_context=ctx) as srv:
        yield srv


def test_tls_server_serves_https(tls_server: FakeGuardServer) -> None:
    assert tls_server.base_url.startswith("https://127.0.0.1:")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_ca_bundle_path_verifies_the_server(tls_server: FakeGuardServer, ca_file: Path, transport: str) -> None:
    async with Guard.from_endpoint(
        tls_server.base_url, QWEN, verify=str(ca_file), cache=False, transport=transport
    ) as guard:
        decision = await guard.acheck(HARMFUL)
        assert decision.verdict.error is None
        assert decision.action is Action.BLOCK
        assert decision.verdict.risk_score == 100.0
        assert (await guard.acheck("What is a nice name for a goldfish?")).action is Action.ALLOW
        # the blocking twin goes over TLS with the same bundle
        assert guard.check(HARMFUL).action is Action.BLOCK
    assert len(tls_server.requests) == 3


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_ssl_context_verifies_the_server(tls_server: FakeGuardServer, ca: object, transport: str) -> None:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)  # type: ignore[attr-defined]
    async with Guard.from_endpoint(tls_server.base_url, QWEN, verify=ctx, cache=False, transport=transport) as guard:
        assert (await guard.acheck(HARMFUL)).verdict.error is None
        assert guard.check(HARMFUL).verdict.error is None


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_untrusted_certificate_fails_closed(tls_server: FakeGuardServer, transport: str) -> None:
    # default verification (certifi / the system store) does not know the throwaway CA
    async with Guard.from_endpoint(
        tls_server.base_url, QWEN, cache=False, transport=transport, max_retries=0, timeout=5
    ) as guard:
        for decision in (await guard.acheck("What is a nice name for a goldfish?"), guard.check("Hello there")):
            assert decision.verdict.error is not None
            assert "certificate" in decision.verdict.error.lower()
            assert decision.action is Action.BLOCK  # fail-closed, never let through
            assert not decision.fail_open
    assert tls_server.requests == []  # no request got past the handshake


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_verify_false_skips_verification(tls_server: FakeGuardServer, transport: str) -> None:
    async with Guard.from_endpoint(tls_server.base_url, QWEN, verify=False, cache=False, transport=transport) as guard:
        assert (await guard.acheck(HARMFUL)).action is Action.BLOCK
        assert guard.check(HARMFUL).verdict.error is None


def test_missing_ca_bundle_is_a_configuration_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigurationError, match=r"nope\.pem.*no CA bundle"):
        Guard.from_endpoint("https://127.0.0.1:9/v1", QWEN, verify=str(missing))


def test_unreadable_ca_bundle_is_a_configuration_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(ConfigurationError, match=r"bad\.pem.*not a readable PEM CA bundle"):
        Guard.from_endpoint("https://127.0.0.1:9/v1", QWEN, verify=str(bad))


@pytest.mark.parametrize("trust_env", [True, False])
async def test_async_and_blocking_paths_trust_the_same_ca_store(
    tls_server: FakeGuardServer, ca_file: Path, monkeypatch: pytest.MonkeyPatch, trust_env: bool
) -> None:
    # the throwaway CA is known only through SSL_CERT_FILE, which counts only with trust_env; aiohttp's own
    # default context read it (and the system store) whatever trust_env said, the httpx path did not
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    async with Guard.from_endpoint(
        tls_server.base_url, QWEN, cache=False, transport="aiohttp", trust_env=trust_env, max_retries=0, timeout=5
    ) as guard:
        async_decision = await guard.acheck("What is a nice name for a goldfish?")
        blocking_decision = guard.check("What is a nice name for a goldfish?")
    assert (async_decision.verdict.error is None) is trust_env
    assert (blocking_decision.verdict.error is None) is trust_env
