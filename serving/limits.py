"""Per-key request rate limits and the org's inference token quota, checked before a request reaches an
engine; either answers 429 with ``Retry-After`` (OpenAI's shapes: type ``requests`` for a rate limit,
type and code ``insufficient_quota`` for a spent quota).

Rate limits are token buckets (capacity ``burst``, refilled at ``requests_per_minute / 60`` per second)
keyed by API key. In production the buckets live in Redis (``TUNEFORGE_RATE_LIMIT_URL``) so every
gateway replica shares them; one Lua script takes a token atomically, with Redis' own clock. Embedded
(one process) they live in memory. The limits themselves are rows (``RateLimit``: per key, or the org's
default for its keys) read through a short cache so a request does not cost a query.

The quota is ``InferenceQuota.tokens`` per UTC day or calendar month, compared with the usage records
of the period (prompt + completion tokens). A request that starts under quota runs to the end, so the
quota can be exceeded by at most the requests in flight when it was reached, plus those of the last
``QUOTA_TTL_S`` and usage batch interval (records reach the database in batches: serving.usage_writer).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Protocol

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from scheduler.models import InferenceQuota, RateLimit, UsageRecord
from scheduler.tenancy import Principal
from serving.cache import TTLCache
from serving.errors import QuotaExceeded, RateLimited

# Limits change rarely (an admin edits them); seconds of staleness cost nothing and save a query a request.
CONFIG_TTL_S = 5.0
# The usage sum is a query over the period's records; a second of staleness bounds the overshoot.
QUOTA_TTL_S = 1.0


@dataclass(frozen=True)
class Limits:
    requests_per_minute: int | None
    burst: int | None
    quota_tokens: int | None
    quota_period: str


class Buckets(Protocol):
    async def take(self, key: str, rate_per_s: float, capacity: int) -> float:
        """Take one token; 0.0 if granted, else the seconds until one is available."""


class MemoryBuckets:
    """Token buckets in this process (embedded mode, one gateway)."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._state: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    async def take(self, key: str, rate_per_s: float, capacity: int) -> float:
        now = self._clock()
        tokens, at = self._state.get(key, (float(capacity), now))
        tokens = min(float(capacity), tokens + (now - at) * rate_per_s)
        if tokens >= 1.0:
            self._state[key] = (tokens - 1.0, now)
            return 0.0
        self._state[key] = (tokens, now)
        return (1.0 - tokens) / rate_per_s


# KEYS[1] bucket; ARGV rate/s, capacity. Redis' TIME keeps replicas with skewed clocks consistent.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local rate, cap = tonumber(ARGV[1]), tonumber(ARGV[2])
local s = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens, at = tonumber(s[1]) or cap, tonumber(s[2]) or now
tokens = math.min(cap, tokens + math.max(0, now - at) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(cap / rate) + 60)
return tostring(wait)
"""


class RedisBuckets:
    """Token buckets in Redis, shared by every gateway replica."""

    def __init__(self, url: str, prefix: str = "tuneforge:ratelimit:"):
        import redis.asyncio as aioredis

        self._redis = aioredis.from_url(url)
        self._script = self._redis.register_script(_TAKE)
        self._prefix = prefix

    async def take(self, key: str, rate_per_s: float, capacity: int) -> float:
        return float(await self._script(keys=[self._prefix + key], args=[rate_per_s, capacity]))

    async def aclose(self) -> None:
        await self._redis.aclose()


def read_limits(session: Session, principal: Principal) -> Limits:
    rows = session.scalars(
        select(RateLimit).where(
            RateLimit.org_id == principal.org_id, or_(RateLimit.api_key_id == principal.api_key_id, RateLimit.api_key_id.is_(None))
        )
    ).all()
    own = next((r for r in rows if r.api_key_id is not None), None) or next((r for r in rows if r.api_key_id is None), None)
    quota = session.get(InferenceQuota, principal.org_id)
    return Limits(
        requests_per_minute=own.requests_per_minute if own else None,
        burst=own.burst if own else None,
        quota_tokens=quota.tokens if quota else None,
        quota_period=quota.period if quota else "month",
    )


def period_bounds(period: str, now: datetime) -> tuple[datetime, datetime]:
    if period == "day":
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        return start, start + timedelta(days=1)
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return start, (start + timedelta(days=32)).replace(day=1)


def tokens_used(session: Session, org_id: str, since: datetime) -> int:
    total = session.scalar(
        select(func.coalesce(func.sum(UsageRecord.prompt_tokens + UsageRecord.completion_tokens), 0)).where(
            UsageRecord.org_id == org_id, UsageRecord.kind == "inference", UsageRecord.created_at >= since
        )
    )
    return int(total or 0)


class Limiter:
    """The gateway's admission check; ``check`` raises ``RateLimited`` (``QuotaExceeded``) or returns."""

    def __init__(self, buckets: Buckets, *, clock=time.monotonic, now=lambda: datetime.now(timezone.utc)):
        self.buckets = buckets
        self._now = now
        self._config: TTLCache[tuple[str, str | None], Limits] = TTLCache(CONFIG_TTL_S, clock=clock)
        self._used: TTLCache[tuple[str, datetime], int] = TTLCache(QUOTA_TTL_S, clock=clock)

    def forget(self) -> None:
        """Drop the cached limits and usage (tests; an admin changed a limit)."""
        self._config.clear()
        self._used.clear()

    async def check(self, db, principal: Principal) -> None:
        limits = await self._limits(db, principal)
        if limits.requests_per_minute is not None:
            if limits.requests_per_minute <= 0:
                # a bucket refilled at rate 0 never grants again (and its wait is a division by 0): an admin's
                # 0 blocks the key, and so does a negative value, rather than lifting the limit
                raise RateLimited(
                    f"Rate limit reached: this key's limit is {limits.requests_per_minute} requests per minute, so it "
                    "may send none; ask an administrator to raise it.",
                    retry_after=60.0,
                    code="rate_limit_exceeded",
                )
            rate = limits.requests_per_minute / 60.0
            # a burst below 1 could never hold a token: one minute's worth, as when none is set
            capacity = limits.burst if limits.burst and limits.burst > 0 else max(1, limits.requests_per_minute)
            wait = await self.buckets.take(f"key:{principal.api_key_id or principal.subject}", rate, capacity)
            if wait > 0:
                raise RateLimited(
                    f"Rate limit reached: {limits.requests_per_minute} requests per minute for this key. Retry in {wait:.1f}s.",
                    retry_after=wait,
                    code="rate_limit_exceeded",
                )
        if limits.quota_tokens is not None:
            now = self._now()
            start, end = period_bounds(limits.quota_period, now)
            used = await self._usage(db, principal.org_id, start)
            if used >= limits.quota_tokens:
                raise QuotaExceeded(
                    f"Your organization's inference quota of {limits.quota_tokens} tokens per {limits.quota_period} is used up "
                    f"({used} used); it resets at {end.isoformat()}.",
                    retry_after=(end - now).total_seconds(),
                )

    async def _limits(self, db, principal: Principal) -> Limits:
        key = (principal.org_id, principal.api_key_id)
        return await self._config.get_or_load(key, lambda: db.run(lambda s: read_limits(s, principal)))

    async def _usage(self, db, org_id: str, since: datetime) -> int:
        return await self._used.get_or_load((org_id, since), lambda: db.run(lambda s: tokens_used(s, org_id, since)))
