"""The issue's metering test, against the fake vLLM upstream (the built-in engine at this volume is
minutes of CPU on a shared 2-core machine; the same usage protocol, continuous usage stats included,
is tested on the built-in engine in tests/gpu_worker/engine/test_server.py): many concurrent requests,
10% of them streams cut off by the client, 5% retried with the same request id, some streams with two
choices. The engine counts what it billed per request it served (a retry that reaches it is another
request), as the usage on the last chunk it actually sent; the gateway's records must equal those
counts exactly, record for record, cut streams included, with no duplicates, and a retry of a request
that succeeded must not reach the engine at all."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import aiohttp
import openai
import pytest

from scheduler.settings import BUILTIN_BASE_MODEL
from serving.engines import Replica, Upstream
from serving.metering import Outcome
from serving.streaming import StreamRelay
from tests.serving.conftest import RecordingMeter

pytestmark = pytest.mark.integration

REQUESTS = 120


async def _one(client, rid: str, words: int, stream: bool, n: int, cut_after: int | None) -> int:
    """Send one request; the tokens the client saw."""
    messages = [{"role": "user", "content": " ".join(f"w{i}" for i in range(words))}]
    headers = {"x-request-id": rid}
    if not stream:
        answer = await client.chat.completions.create(model=BUILTIN_BASE_MODEL, messages=messages, max_tokens=12, n=n, extra_headers=headers)
        return answer.usage.completion_tokens
    response = await client.chat.completions.create(model=BUILTIN_BASE_MODEL, messages=messages, max_tokens=12, n=n, stream=True, extra_headers=headers)
    seen = 0
    async for chunk in response:
        seen += sum(1 for c in chunk.choices if c.delta.content)
        if cut_after is not None and seen >= cut_after:
            break  # the client walks away mid-stream
    await response.close()
    return seen


def test_billed_tokens_equal_the_engines_counts(engines, gateway, make_org, usage_rows):
    engine = engines(token_delay_s=0.02)
    gw = gateway({BUILTIN_BASE_MODEL: [engine.url]})
    org, key = make_org()
    rng = random.Random(6)
    plan = []
    for i in range(REQUESTS):
        stream = rng.random() < 0.6
        cut = rng.randint(1, 4) if stream and rng.random() < 0.10 / 0.6 else None
        n = 2 if stream and rng.random() < 0.25 else 1
        retried = rng.random() < 0.05 or (cut is not None and i % 3 == 0)
        plan.append((f"req-meter-{i}", rng.randint(1, 20), stream, n, cut, retried))
    cut_ids = {p[0] for p in plan if p[4]}
    retried_ids = {p[0] for p in plan if p[5]}
    assert len(cut_ids) >= REQUESTS * 0.05 and len(retried_ids - cut_ids) >= 2 and len(retried_ids & cut_ids) >= 2
    seen: dict[str, int] = {}

    async def run():
        # The SDK's own retries: a retry sent while the gateway is still closing the cut attempt gets a
        # 409 request_in_progress, which the SDK waits out and sends again.
        client = openai.AsyncOpenAI(api_key=key, base_url=gw.url + "/v1", max_retries=8, timeout=30)
        gate = asyncio.Semaphore(16)

        async def go(rid, words, stream, n, cut, retried):
            async with gate:
                seen[rid] = await _one(client, rid, words, stream, n, cut)
                if retried:  # the client did not get (all of) the answer, say, and sends the same request again
                    await _one(client, rid, words, stream, n, None)

        await asyncio.gather(*(go(*p) for p in plan))
        await client.close()

    asyncio.run(run())
    attempts = engine.state.attempts
    # A cut stream is billed when the gateway has seen the engine stop; give the last ones a moment.
    for _ in range(100):
        if len(usage_rows(org)) >= len(attempts):
            break
        asyncio.run(asyncio.sleep(0.05))

    rows = usage_rows(org)
    billed = {r.request_id: (r.prompt_tokens, r.completion_tokens) for r in rows}
    assert len(rows) == len(billed)  # no duplicates
    engine_counts = {a.request_id: a.counts for a in attempts}
    assert len(engine_counts) == len(attempts)  # each attempt reached the engine under its own id
    assert billed == engine_counts  # record for record, cut streams included
    assert sum(p + c for p, c in billed.values()) == sum(p + c for p, c in engine_counts.values())

    statuses = {r.request_id: r.status for r in rows}
    served = Counter(a.request_id.partition("#")[0] for a in attempts)
    for rid, words, stream, n, cut, retried in plan:
        if cut is None:
            assert statuses[rid] == "ok" and served[rid] == 1  # a retry of a success is replayed
        elif statuses[rid] == "client_disconnected":
            assert seen[rid] <= billed[rid][1]  # at least what the client saw
            assert served[rid] == 1 + retried  # a retry of a cut stream runs again
            if retried:
                assert statuses[f"{rid}#2"] == "ok"
    # A client's close travels through a loaded process (the client, gateway and engine share this
    # test's GIL): when it arrives after the engine's last token the stream completed ("ok", replayed if
    # retried). A quarter at least must be real cuts, so that the checks above ran for them.
    really_cut = {rid for rid in cut_ids if statuses[rid] == "client_disconnected"}
    assert len(really_cut) >= max(1, len(cut_ids) // 4), statuses


def test_a_client_leaving_after_the_engines_whole_answer_arrived_is_billed_all_of_it(engines):
    """A rare failure of the test above (once in CI), made deterministic: the relay was waiting on the client
    (at its ``yield``) while the rest of the engine's answer arrived, billed by the engine as sent, and
    the client then left. That rest waited unread in aiohttp's buffer, and aiohttp had already let the
    connection go, so there was nothing to half-close and the relay billed only what it had read. Here
    the engine is real (HTTP on loopback, read by aiohttp) and so is the connection's state; the client
    is the relay's event iterator, which takes the first event, waits for the answer to arrive, and
    closes."""
    engine = engines(token_delay_s=0.02)
    body = {"model": BUILTIN_BASE_MODEL, "messages": [{"role": "user", "content": "one two three four five"}],
            "max_tokens": 12, "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}

    async def run() -> list[Outcome]:
        meter = RecordingMeter()
        async with aiohttp.ClientSession() as session:
            response = await session.post(engine.url + "/v1/chat/completions", json=body)
            relay = StreamRelay(Upstream(Replica(base="m", url=engine.url, inflight=1), response), meter, wants_usage=False)
            events = relay.events()
            await anext(events)  # the role chunk, sent before the first token
            for _ in range(500):
                if response.content.is_eof():
                    break
                await asyncio.sleep(0.01)
            assert response.content.is_eof() and response.connection is None  # the case under test
            await events.aclose()  # the client is gone
        return meter.outcomes

    outcomes = asyncio.run(run())
    (attempt,) = engine.state.attempts
    assert attempt.counts == (5, 6)  # the model's name and the five words: all sent, all billed by the engine
    assert outcomes == [Outcome(*attempt.counts, "client_disconnected")]
