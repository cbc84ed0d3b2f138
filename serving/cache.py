"""Short-lived caches for the lookups every inference request repeats: which principal an API key is,
and what a fine-tuned model name resolves to. Without them each request costs two database round trips
(each a hop to a worker thread and a pooled connection) before it reaches an engine.

Only successes are cached, so a new key or a newly registered adapter works at once. What can change
under a cached entry is bounded by the TTL: a revoked key keeps working for at most ``auth_cache_ttl_s``
on a gateway that had it cached, and a promote, rollback or delete made through another gateway
replica reaches this one within ``model_cache_ttl_s``. Changes made through this gateway (its adapter
registry routes) invalidate the org's entries at once. Both TTLs can be set to 0 to disable caching.
"""

from __future__ import annotations

import collections
import time
from typing import Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TTLCache(Generic[K, V]):
    """A bounded mapping whose entries expire ``ttl_s`` after they were put (least recently put
    evicted first when full). Event-loop use only: no locking."""

    def __init__(self, ttl_s: float, max_entries: int = 10_000, *, clock=time.monotonic):
        self.ttl_s = ttl_s
        self._max = max_entries
        self._clock = clock
        self._entries: collections.OrderedDict[K, tuple[float, V]] = collections.OrderedDict()

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

    def discard_where(self, predicate) -> None:
        """Drop every entry whose key satisfies ``predicate`` (an org's entries after a change)."""
        for key in [k for k in self._entries if predicate(k)]:
            del self._entries[key]

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
