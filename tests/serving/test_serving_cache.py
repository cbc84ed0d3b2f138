"""The gateway's lookup cache: entries expire after their TTL, concurrent misses of one key share one
load (no thundering herd on the database when an entry expires under load), an entry in use is
reloaded before it expires without anyone waiting, a failed or empty load is not kept (a reload that
finds the key gone drops it), a caller that goes away does not cancel the others' load, and an
invalidation during a load keeps the load's (older) answer out of the cache."""

from __future__ import annotations

import asyncio

import pytest

from serving.cache import TTLCache


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_entries_expire_after_their_ttl():
    clock = Clock()
    cache = TTLCache(5.0, clock=clock)
    cache.put("k", 1)
    clock.now = 4.9
    assert cache.get("k") == 1
    clock.now = 5.0
    assert cache.get("k") is None


def test_concurrent_misses_share_one_load():
    cache, calls = TTLCache(5.0), []

    async def load():
        calls.append(1)
        await asyncio.sleep(0.05)
        return "principal"

    async def main():
        results = await asyncio.gather(*(cache.get_or_load("k", load) for _ in range(50)))
        return results, await cache.get_or_load("k", load)

    results, again = asyncio.run(main())
    assert results == ["principal"] * 50 and again == "principal"
    assert len(calls) == 1  # one database lookup for 51 requests


@pytest.mark.parametrize("outcome", ["none", "error", "not kept"])
def test_a_miss_an_error_or_a_refused_value_is_not_cached(outcome):
    cache, calls = TTLCache(5.0), []

    async def load():
        calls.append(1)
        if outcome == "error":
            raise RuntimeError("database down")
        return None if outcome == "none" else "unchecked adapter"

    async def main():
        for _ in range(2):
            try:
                await cache.get_or_load("k", load, keep=lambda value: False)
            except RuntimeError:
                pass

    asyncio.run(main())
    assert len(calls) == 2 and len(cache) == 0


def test_a_caller_that_goes_away_does_not_cancel_the_shared_load():
    cache = TTLCache(5.0)

    async def load():
        await asyncio.sleep(0.05)
        return "value"

    async def main():
        first = asyncio.ensure_future(cache.get_or_load("k", load))
        second = asyncio.ensure_future(cache.get_or_load("k", load))
        await asyncio.sleep(0.01)
        first.cancel()  # its client disconnected
        return await second

    assert asyncio.run(main()) == "value" and cache.get("k") == "value"


def test_an_invalidation_during_a_load_keeps_its_answer_out():
    cache = TTLCache(5.0)

    async def load():
        await asyncio.sleep(0.05)
        return "before the promote"

    async def main():
        loading = asyncio.ensure_future(cache.get_or_load(("org", "ft:x"), load))
        await asyncio.sleep(0.01)
        cache.discard_where(lambda key: key[0] == "org")  # a promote through this gateway
        return await loading

    assert asyncio.run(main()) == "before the promote"  # the caller that asked gets its answer
    assert cache.get(("org", "ft:x")) is None  # but the next request reads the registry again


async def _settle():
    """Let background loads finish and their done callbacks run."""
    for _ in range(5):
        await asyncio.sleep(0)


def test_an_entry_in_use_is_reloaded_ahead_of_expiry_and_nobody_waits_for_it():
    clock = Clock()
    cache, calls = TTLCache(5.0, clock=clock), []

    async def main():
        release = asyncio.Event()

        async def load(value):
            calls.append(value)
            if value == "v2":
                await release.wait()  # a slow reload behind busy worker threads
            return value

        assert await cache.get_or_load("k", lambda: load("v1")) == "v1"
        clock.now = 3.9  # early in the TTL: served, no reload
        assert await cache.get_or_load("k", lambda: load("never")) == "v1"
        clock.now = 4.5  # in the last fifth: served from the entry at once, reloaded in the background
        answers = [await asyncio.wait_for(cache.get_or_load("k", lambda: load("v2")), 0.1) for _ in range(20)]
        assert answers == ["v1"] * 20
        release.set()
        await _settle()
        clock.now = 9.4  # the reload put a fresh entry at 4.5: valid until 9.5
        assert cache.get("k") == "v2"

    asyncio.run(main())
    assert calls == ["v1", "v2"]  # one reload for 20 requests, none before the last fifth


@pytest.mark.parametrize("outcome", ["none", "not kept"])
def test_a_reload_that_finds_the_key_gone_drops_the_entry(outcome):
    clock = Clock()
    cache = TTLCache(5.0, clock=clock)

    async def main():
        assert await cache.get_or_load("k", lambda: asyncio.sleep(0, "v1"), keep=lambda v: v == "v1") == "v1"
        clock.now = 4.5
        gone = None if outcome == "none" else "unchecked"
        assert await cache.get_or_load("k", lambda: asyncio.sleep(0, gone), keep=lambda v: v == "v1") == "v1"
        await _settle()
        assert cache.get("k") is None  # revoked: not served for the rest of its TTL

    asyncio.run(main())


def test_a_failed_background_reload_leaves_the_entry_to_expire():
    clock = Clock()
    cache = TTLCache(5.0, clock=clock)

    async def broken():
        raise RuntimeError("database down")

    async def main():
        assert await cache.get_or_load("k", lambda: asyncio.sleep(0, "v1")) == "v1"
        clock.now = 4.5
        assert await cache.get_or_load("k", broken) == "v1"
        await _settle()
        assert cache.get("k") == "v1"
        clock.now = 5.0
        with pytest.raises(RuntimeError):
            await cache.get_or_load("k", broken)  # expired: the caller waits for the load and sees its error

    asyncio.run(main())
