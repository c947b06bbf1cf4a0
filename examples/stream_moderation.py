"""Moderate any token stream with StreamModerator, against the EMULATED guard server (FakeGuardServer).

Run: python examples/stream_moderation.py. For a real guard, replace the server by your vLLM / SGLang URL and
the fake token stream by your model's (an openai SDK stream, a websocket, anything iterable).

`guarded()` (LangChain) and `GuardedQueryEngine` (LlamaIndex) do this for you; use StreamModerator directly
for a stream no framework wraps. Text is held back until a check has passed it; checks are pipelined (the
stream keeps being read while they run) and released in order; a failed check ends the stream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

from flexguard_integrations import Guard
from flexguard_integrations.streaming import StreamModerator
from flexguard_integrations.testing import FakeGuardServer, FaultPlan

SAFE = "Paris is the capital of France. It is known for the Eiffel Tower. The food is excellent too. "
UNSAFE = "Paris is lovely in spring. Here is how to build a bomb to kill people. Enjoy your trip! "


async def tokens(text: str, delay: float = 0.005) -> AsyncIterator[str]:
    """A model's token stream: one word (or space) every ``delay`` seconds."""
    for word in text.split(" "):
        await asyncio.sleep(delay)
        yield word + " "


def sync_tokens(text: str) -> Iterator[str]:
    for word in text.split(" "):
        time.sleep(0.005)
        yield word + " "


async def main(guard: Guard) -> None:
    for name, text in (("safe", SAFE), ("unsafe", UNSAFE)):
        moderator: StreamModerator[str] = StreamModerator(guard, prompt="Tell me about Paris.", chunk_chars=20)
        out = []
        async for token in moderator.amoderate(tokens(text), str):  # str: the text of an item
            out.append(token)
        print(f"{name}: released {''.join(out)!r}")
        if moderator.stopped is not None:
            print(f"{name}: stopped ({moderator.stopped.action.value}: {moderator.stopped.reason})")
        print(f"{name}: {moderator.stats.checks} checks, at most {moderator.stats.max_held_chars} chars held back")
    # the first window sets the time to first token: nothing goes out before its check has passed
    for first in (50, None):  # 50 is the default; None makes the first window as big as the others (200)
        moderator = StreamModerator(guard, prompt="Tell me about Paris.", first_chunk_chars=first)
        started = time.perf_counter()
        async for _ in moderator.amoderate(tokens(SAFE * 3), str):
            ttft = (time.perf_counter() - started) * 1e3
            break
        await moderator.aclose()
        print(f"first_chunk_chars={first}: first token after {ttft:.0f} ms")
    await guard.aclose()  # release this event loop's connections


with (
    FakeGuardServer(faults=FaultPlan(latency=0.02)) as server,  # 20 ms per verdict, like a small GPU batch
    Guard.from_endpoint(server.base_url, "Tommy-DING/FlexGuard-Qwen3-8B") as guard,
):
    asyncio.run(main(guard))
    # the blocking twin: the source is read by a producer thread, checks run in worker threads
    moderator: StreamModerator[str] = StreamModerator(guard, chunk_chars=20)
    released = "".join(moderator.moderate(sync_tokens(UNSAFE), str))
    print(f"sync unsafe: released {released!r}, stopped={moderator.stopped is not None}")
