"""Short-lived caches for the lookups every inference request repeats: which principal an API key is,
and what a fine-tuned model name resolves to. Without them each request costs two database round trips
(each a hop to a worker thread and a pooled connection) before it reaches an engine.

Only successes are cached, so a new key or a newly registered adapter works at once. What can change
under a cached entry is bounded by the TTL: a revoked key keeps working for at most ``auth_cache_ttl_s``
on a gateway that had it cached, and a promote, rollback or delete made through another gateway
replica reaches this one within ``model_cache_ttl_s``. Changes made through this gateway (its adapter
registry routes) invalidate the org's entries at once. Both TTLs can be set to 0 to disable caching.

Misses are single-flight (``get_or_load``): when an entry expires under load, the requests that miss it
together share one database lookup instead of each queueing its own behind the worker threads (which
showed as p99 spikes of tens of milliseconds every TTL at 500 requests/s).

Entries in use are refreshed ahead of expiry: the first request that finds an entry in the last
``REFRESH_AHEAD`` of its TTL starts its reload in the background and is answered from the entry, which
is still valid. Without it every request arriving while an expired entry reloaded waited for the
reload: at 500 requests/s one such wait of ~100-170 ms every TTL (worker thread behind the GIL and the
usage batches) held ~150 requests (bench/results/serving-results.md). An entry is never served after
its TTL, so the staleness bounds above hold; a reload that finds the key revoked or the value no
longer kept drops the entry at once.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Awaitable, Callable, Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

# Reload an entry in use during the last fifth of its TTL (1 s of the 5 s default): long enough for a
# reload behind busy worker threads (measured up to ~170 ms), short enough to add one reload per TTL.
REFRESH_AHEAD = 0.2


class TTLCache(Generic[K, V]):
    """A bounded mapping whose entries expire ``ttl_s`` after they were put (least recently put
    evicted first when full). Event-loop use only: no locking."""

    def __init__(self, ttl_s: float, max_entries: int = 10_000, *, clock=time.monotonic):
        self.ttl_s = ttl_s
        self._max = max_entries
        self._clock = clock
        self._entries: collections.OrderedDict[K, tuple[float, V]] = collections.OrderedDict()
        self._loading: dict[K, asyncio.Future] = {}
        self._generation = 0  # bumped by every invalidation: a load that began before one is not kept

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            del self._entries[key]
            return None
        return entry[1]

    def put(self, key: K, value: V) -> None:
        if self.ttl_s <= 0:
            return
        self._entries.pop(key, None)
        self._entries[key] = (self._clock() + self.ttl_s, value)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    async def get_or_load(self, key: K, load: Callable[[], Awaitable[V | None]], keep: Callable[[V], bool] = lambda value: True) -> V | None:
        """The cached value, else ``await load()``, kept when it is not None and ``keep(value)``.
        Concurrent misses of one key share one load; it runs as its own task, so a caller that goes
        away (a client disconnect) does not cancel it for the others. A value in the last
        ``REFRESH_AHEAD`` of its TTL is returned at once and reloaded in the background."""
        entry = self._entries.get(key)
        if entry is not None:
            remaining = entry[0] - self._clock()
            if remaining > 0:
                if remaining < self.ttl_s * REFRESH_AHEAD and key not in self._loading:
                    self._start_load(key, load, keep)
                return entry[1]
            del self._entries[key]
        task = self._loading.get(key) or self._start_load(key, load, keep)
        return await asyncio.shield(task)

    def _start_load(self, key: K, load: Callable[[], Awaitable[V | None]], keep: Callable[[V], bool]) -> asyncio.Future:
        task = asyncio.ensure_future(load())
        self._loading[key] = task
        task.add_done_callback(lambda done, generation=self._generation: self._loaded(key, done, generation, keep))
        return task

    def _loaded(self, key: K, task: asyncio.Future, generation: int, keep: Callable[[V], bool]) -> None:
        if self._loading.get(key) is task:
            del self._loading[key]
        if task.cancelled() or task.exception() is not None:  # exception(): retrieved, so never logged twice
            return  # a failed background reload leaves the entry to expire; the next miss loads again
        if generation != self._generation:
            return
        if task.result() is not None and keep(task.result()):
            self.put(key, task.result())
        else:
            self._entries.pop(key, None)  # gone (a revoked key) or no longer cacheable: not served again

    def discard_where(self, predicate) -> None:
        """Drop every entry whose key satisfies ``predicate`` (an org's entries after a change)."""
        self._generation += 1
        for key in [k for k in self._entries if predicate(k)]:
            del self._entries[key]

    def clear(self) -> None:
        self._generation += 1
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
