"""benchmarks.plot draws a results JSON (a tiny fake one here) into deterministic SVGs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("matplotlib")
plot = pytest.importorskip("benchmarks.plot")  # the benchmarks folder is not in the sdist


def _client(label: str, p50: float, p99: float) -> dict[str, Any]:
    return {"label": label, "n": 100, "p50_us": p50, "p99_us": p99, "mean_us": p50, "errors": 0}


def _rate(label: str, rate: float, **extra: Any) -> dict[str, Any]:
    return {"label": label, "rate": rate, "capped": False, "errors": 0, **extra}


def fake_results() -> dict[str, Any]:
    overhead = {
        "raw_httpx": _client("raw httpx.AsyncClient.post", 900, 2600),
        "guard_httpx": _client("Guard.acheck (httpx, default)", 1000, 2700),
        "openai": _client("openai AsyncOpenAI chat.completions.create", 1700, 3900),
        "langchain_openai": _client("LangChain ChatOpenAI.ainvoke", 2400, 4300),
        "guard_aiohttp_noenv": _client("diagnostic, not plotted", 500, 900),
    }
    levels = {
        str(level): {
            "raw_socket": _rate("raw asyncio socket (server ceiling)", 4000 * level**0.3),
            "guard_httpx": _rate("Guard.acheck (httpx, default)", 900 / level**0.2),
            "openai": _rate("openai AsyncOpenAI chat.completions.create", 560),
        }
        for level in (1, 16, 64, 256)
    }
    levels["64"]["langchain_openai"] = _rate("LangChain ChatOpenAI.ainvoke", 400, errors=3)
    return {
        "started": "2026-11-23T07:27:24+00:00",
        "quick": False,
        "machine": {"cpu": "Test CPU", "hypervisor": "KVM", "nproc": 2, "python": "3.11.7", "git_commit": "abc1234"},
        "sections": {
            "overhead": {"results": {"clients": overhead}, "targets": []},
            "throughput": {"results": {"levels": levels}, "targets": []},
        },
    }


def test_writes_both_svgs_with_the_clients_and_the_run(tmp_path: Path) -> None:
    written = plot.plot(fake_results(), tmp_path)
    assert sorted(p.name for p in written) == ["bench-overhead.svg", "bench-throughput.svg"]
    overhead = (tmp_path / "bench-overhead.svg").read_text()
    throughput = (tmp_path / "bench-throughput.svg").read_text()
    for name in ("raw httpx.AsyncClient.post", "openai AsyncOpenAI chat.completions.create", "ChatOpenAI.ainvoke"):
        assert name in overhead
    assert "diagnostic, not plotted" not in overhead
    assert "raw asyncio socket (server ceiling)" in throughput
    assert "ChatOpenAI.ainvoke (capped or failed at c=64)" in throughput
    for text in (overhead, throughput):
        assert "commit abc1234" in text
        assert "Test CPU, 2 CPUs (KVM)" in text
        assert "<dc:date>" not in text


def test_output_is_deterministic(tmp_path: Path) -> None:
    first = [p.read_bytes() for p in plot.plot(fake_results(), tmp_path / "a")]
    second = [p.read_bytes() for p in plot.plot(fake_results(), tmp_path / "b")]
    assert first == second


def test_missing_clients_and_sections_are_skipped(tmp_path: Path) -> None:
    doc = fake_results()
    del doc["sections"]["throughput"]
    del doc["sections"]["overhead"]["results"]["clients"]["langchain_openai"]
    written = plot.plot(doc, tmp_path)
    assert [p.name for p in written] == ["bench-overhead.svg"]
    assert "ChatOpenAI" not in written[0].read_text()
    assert plot.plot({"sections": {}}, tmp_path / "empty") == []


def test_cli_reads_a_results_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = tmp_path / "latest.json"
    results.write_text(json.dumps(fake_results()))
    assert plot.main([str(results), "--out", str(tmp_path / "img")]) == 0
    assert (tmp_path / "img" / "bench-throughput.svg").is_file()
    assert "plot written to" in capsys.readouterr().out
