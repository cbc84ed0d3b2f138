"""Per-key rate limits and the org's token quota: 429 with ``Retry-After`` in OpenAI's shape (the SDK's
``RateLimitError``), a key's own limit over the org default, other keys untouched, buckets that refill,
and the Redis buckets shared by two gateways."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from datetime import datetime, timezone

import openai
import pytest

from scheduler.models import ApiKey, InferenceQuota, RateLimit, Role
from scheduler.settings import BUILTIN_BASE_MODEL
from scheduler.tenancy import create_api_key
from serving.limits import MemoryBuckets, RedisBuckets, period_bounds

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "one two three"}]


def _ask(client):
    return client.chat.completions.create(model=BUILTIN_BASE_MODEL, messages=MESSAGES)


def test_key_rate_limit_is_429_with_retry_after(engines, gateway, make_org, db_session):
    gw = gateway({BUILTIN_BASE_MODEL: [engines().url]})
    org, key = make_org()
    limited = db_session.query(ApiKey).filter_by(org_id=org.id).one()
    _, other_key = create_api_key(db_session, org, "other", Role.member)
    db_session.add(RateLimit(org_id=org.id, api_key_id=limited.id, requests_per_minute=6, burst=2))
    db_session.flush()

    _ask(gw.client(key)), _ask(gw.client(key))
    with pytest.raises(openai.RateLimitError) as err:
        _ask(gw.client(key))
    assert err.value.code == "rate_limit_exceeded"
    assert err.value.body["type"] == "requests" and "6 requests per minute" in err.value.message
    assert 1 <= int(err.value.response.headers["retry-after"]) <= 10  # 6/min: one token every 10 s
    assert err.value.response.headers["x-request-id"]
    for _ in range(3):  # another key of the org has no limit of its own and the org has no default
        _ask(gw.client(other_key))


@pytest.mark.parametrize("rpm, burst", [(0, None), (-5, -1)])
def test_a_limit_of_no_requests_blocks_the_key_and_never_divides_by_zero(engines, gateway, make_org, db_session,
                                                                         rpm, burst):
    """0 (or a negative value, which no admin means as "unlimited") refills nothing: every request is a 429,
    where the bucket's wait was a division by zero (a 500)."""
    gw = gateway({BUILTIN_BASE_MODEL: [engines().url]})
    org, key = make_org()
    db_session.add(RateLimit(org_id=org.id, api_key_id=None, requests_per_minute=rpm, burst=burst))
    db_session.flush()
    for _ in range(2):
        with pytest.raises(openai.RateLimitError) as err:
            _ask(gw.client(key))
        assert err.value.code == "rate_limit_exceeded" and "may send none" in err.value.message


def test_a_burst_below_one_is_one_minutes_worth(engines, gateway, make_org, db_session):
    gw = gateway({BUILTIN_BASE_MODEL: [engines().url]})
    org, key = make_org()
    db_session.add(RateLimit(org_id=org.id, api_key_id=None, requests_per_minute=2, burst=0))
    db_session.flush()
    _ask(gw.client(key)), _ask(gw.client(key))
    with pytest.raises(openai.RateLimitError):
        _ask(gw.client(key))


def test_org_default_applies_to_keys_without_their_own(engines, gateway, make_org, db_session):
    gw = gateway({BUILTIN_BASE_MODEL: [engines().url]})
    org, key = make_org()
    db_session.add(RateLimit(org_id=org.id, api_key_id=None, requests_per_minute=60, burst=1))
    db_session.flush()
    _ask(gw.client(key))
    with pytest.raises(openai.RateLimitError):
        _ask(gw.client(key))
    _, other_org_key = make_org()
    _ask(gw.client(other_org_key)), _ask(gw.client(other_org_key))


def test_quota_is_429_until_the_period_ends(engines, gateway, make_org, db_session):
    gw = gateway({BUILTIN_BASE_MODEL: [engines().url]})
    org, key = make_org()
    db_session.add(InferenceQuota(org_id=org.id, tokens=10, period="day"))
    db_session.flush()
    used = 0
    with pytest.raises(openai.RateLimitError) as err:
        for _ in range(10):
            gw.app.state.usage_writer.flush_blocking()  # the records so far are in the database
            gw.app.state.limiter.forget()  # no usage cache: each request sees the records so far
            used += _ask(gw.client(key)).usage.total_tokens
    assert used >= 10  # refused only once the quota was used up
    # OpenAI's quota error, which its SDKs tell apart from a rate limit (type "requests")
    assert (err.value.code, err.value.body["type"]) == ("insufficient_quota", "insufficient_quota")
    start, end = period_bounds("day", datetime.now(timezone.utc))
    retry = int(err.value.response.headers["retry-after"])
    assert 0 < retry <= (end - start).total_seconds()


def test_memory_buckets_refill():
    now = [0.0]
    buckets = MemoryBuckets(clock=lambda: now[0])
    take = lambda: asyncio.run(buckets.take("k", 2.0, 3))  # noqa: E731
    assert [take(), take(), take()] == [0.0, 0.0, 0.0]
    assert take() == pytest.approx(0.5)
    now[0] += 0.5
    assert take() == 0.0
    assert take() == pytest.approx(0.5)


@pytest.fixture(scope="module")
def redis_url():
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([server, "--port", str(port), "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(5)


def test_redis_buckets_are_shared_between_gateways(redis_url):
    async def run():
        a, b = RedisBuckets(redis_url, prefix="t1:"), RedisBuckets(redis_url, prefix="t1:")
        try:
            waits = [await a.take("k", 1.0, 2), await b.take("k", 1.0, 2), await a.take("k", 1.0, 2), await b.take("k", 1.0, 2)]
            other = await b.take("other", 1.0, 2)
        finally:
            await a.aclose(), await b.aclose()
        return waits, other

    waits, other = asyncio.run(run())
    assert waits[:2] == [0.0, 0.0]
    assert 0.9 < waits[2] <= 1.0 and 0.9 < waits[3] <= 1.0  # the two replicas drew from one bucket
    assert other == 0.0


def test_gateway_with_redis_limits(engines, gateway, make_org, db_session, redis_url):
    gw = gateway({BUILTIN_BASE_MODEL: [engines().url]}, rate_limit_url=redis_url)
    org, key = make_org()
    db_session.add(RateLimit(org_id=org.id, api_key_id=None, requests_per_minute=60, burst=1))
    db_session.flush()
    _ask(gw.client(key))
    with pytest.raises(openai.RateLimitError) as err:
        _ask(gw.client(key))
    assert err.value.response.headers["retry-after"] == "1"
