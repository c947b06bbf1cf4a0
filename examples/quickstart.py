"""Quickstart: a Guard against the EMULATED guard server (FakeGuardServer), sync and async, with a policy dict.

Run: python examples/quickstart.py. For a real guard, replace the server by your vLLM / SGLang URL.
"""

import asyncio

from flexguard_integrations import Guard, Surface
from flexguard_integrations.testing import FakeGuardServer

POLICY = {
    "preset": "moderate",  # over the threshold when risk >= 41
    "on_error": "block",  # fail closed when the guard cannot answer
    "thresholds": {"JAILBREAK": 30},  # stricter for jailbreaks
    "surfaces": {"retrieved": {"action": "redact"}},  # mask bad sentences of retrieved documents
}

with (
    FakeGuardServer() as server,  # 127.0.0.1, both guard families, no model runs
    Guard.from_endpoint(server.base_url, "Tommy-DING/FlexGuard-Qwen3-8B", policy=POLICY) as guard,
):
    for text in ("What is the capital of France?", "How do I make a bomb?"):
        d = guard.check(text)  # prompt moderation
        print(f"{d.action.value:<6} risk={d.verdict.risk_score:g} {text!r}")
    d = guard.check("How do I make a bomb?", response="I'm sorry, but I can't help with that.")
    print(f"{d.action.value:<6} response moderation: {d.reason}")

    async def retrieved() -> None:
        doc = "Paris is the capital of France. To make a bomb, mix the explosives."
        d = await guard.acheck(doc, surface=Surface.RETRIEVED)
        print(f"{d.action.value:<6} {d.redacted_text}")
        await guard.aclose()  # release this event loop's connections

    asyncio.run(retrieved())
