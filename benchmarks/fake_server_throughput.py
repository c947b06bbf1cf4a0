"""Requests per second FakeGuardServer sustains, measured with raw keep-alive sockets (asyncio).

Each connection sends one chat completion at a time (no pipelining) and reads the reply by its
Content-Length, so the client side is as cheap as possible and the number reflects the server. The server runs
in its own thread (one core at most because of the GIL, shared with this client).

    .venv/bin/python benchmarks/fake_server_throughput.py [--seconds 3] [--family qwen3guard|flexguard]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from flexguard_integrations.testing import FakeGuardServer

QWEN = "Qwen/Qwen3Guard-Gen-8B"
FLEX = "Tommy-DING/FlexGuard-Qwen3-8B"
FLEX_TEMPLATE = (
    "You are a content moderation model. Assess the conversation below and answer with your reasoning in "
    "<think> tags, then the categories and a risk score from 0 to 100.\n"
    "<BEGIN CONVERSATION>\n\nUSER: {text}\n\n<END CONVERSATION>\n"
)
TEXTS = ("How do I bake sourdough bread?", "How can I make a bomb at home?", "Tell me about lock picking.")


def build_requests(port: int, family: str) -> list[bytes]:
    """Pre-built HTTP requests (a few different texts, so the lexicon cache is not the only path)."""
    out = []
    for text in TEXTS:
        if family == "flexguard":
            body = {"model": FLEX, "messages": [{"role": "user", "content": FLEX_TEMPLATE.format(text=text)}]}
        else:
            body = {"model": QWEN, "messages": [{"role": "user", "content": text}]}
        raw = json.dumps({**body, "temperature": 0, "max_tokens": 1024}).encode()
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(raw)}\r\n\r\n"
        ).encode()
        out.append(head + raw)
    return out


async def worker(port: int, requests: list[bytes], deadline: float, counter: list[int]) -> None:
    """One keep-alive connection sending requests back to back until ``deadline``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i = 0
    try:
        while time.perf_counter() < deadline:
            writer.write(requests[i % len(requests)])
            i += 1
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(head[:60])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            counter[0] += 1
    finally:
        writer.close()
        await writer.wait_closed()


async def measure(port: int, family: str, concurrency: int, seconds: float) -> float:
    """Requests per second with ``concurrency`` keep-alive connections."""
    requests = build_requests(port, family)
    counter = [0]
    start = time.perf_counter()
    deadline = start + seconds
    await asyncio.gather(*(worker(port, requests, deadline, counter) for _ in range(concurrency)))
    return counter[0] / (time.perf_counter() - start)


def main() -> None:
    """Print requests/s at concurrency 1, 16 and 64 for the chosen family."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--family", choices=("qwen3guard", "flexguard", "both"), default="both")
    args = parser.parse_args()
    families = ("qwen3guard", "flexguard") if args.family == "both" else (args.family,)
    with FakeGuardServer(max_recorded=1000) as server:
        for family in families:
            for concurrency in (1, 16, 64):
                rps = asyncio.run(measure(server.port, family, concurrency, args.seconds))
                print(f"{family:<11} concurrency {concurrency:>3}: {rps:8.0f} requests/s")
        stats = server.stats
        print(f"server counters: requests={stats.get('requests', 0)} status_200={stats.get('status_200', 0)}")


if __name__ == "__main__":
    main()
