"""Database access for the gateway: sync SQLAlchemy units of work run off the event loop.

The gateway is async but the shared data layer (tenancy, metering, the adapter registry) is sync
SQLAlchemy. ``Database.run`` runs one unit of work in a worker thread so a slow query never stalls the
streams the event loop is relaying. Tests swap the session scope for their rolled-back session.
"""

from __future__ import annotations

import functools
from typing import Callable, ContextManager, TypeVar

import anyio.to_thread
from sqlalchemy.orm import Session

from scheduler.db import session_scope

T = TypeVar("T")
SessionScope = Callable[[], ContextManager[Session]]


class Database:
    def __init__(self, scope: SessionScope):
        self._scope = scope

    @classmethod
    def from_url(cls, url: str) -> "Database":
        return cls(functools.partial(session_scope, url))

    def scope(self) -> ContextManager[Session]:
        """A unit of work (commit on success, rollback on error), for sync callers."""
        return self._scope()

    def run_sync(self, fn: Callable[[Session], T]) -> T:
        with self._scope() as session:
            return fn(session)

    async def run(self, fn: Callable[[Session], T]) -> T:
        """Run ``fn(session)`` in a worker thread inside one unit of work. ``fn`` must return plain
        data, not ORM objects: the session is closed once it returns."""
        return await anyio.to_thread.run_sync(self.run_sync, fn)

