"""Retries under one ``x-request-id``: each run on an engine is claimed, and a success is answered again
from its stored response instead of running (and billing) again.

A request id of an org is a row of ``stored_responses``. Claiming it:
- no row, or the earlier run failed, was cut off, expired (``response_store_ttl_s``) or was abandoned
  by a gateway that died (its lease ran out): a new attempt, numbered; its usage record is keyed
  ``<id>`` for the first attempt and ``<id>#<n>`` for later ones, so every run the engine made is billed
  as its own record;
- a run still in progress: 409 ``request_in_progress``;
- the same id with another body (the hash of the endpoint and the canonical request JSON): 400
  ``request_id_reused``;
- a success with the same body: its stored response (the JSON as relayed, or a stream's transcript,
  serving.transcript), not billed again.

Claims and outcomes are written straight to the database (one round trip each) so that every gateway
replica sees them; a gateway that restarts on its journal fails the claims it left open
(serving.usage_writer).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import anyio
import structlog
from sqlalchemy import and_, bindparam, select, update
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session

from scheduler.models import StoredResponse
from serving.database import Database
from serving.errors import DatabaseUnavailable, RequestIdReused, RequestInProgress

log = structlog.get_logger(__name__)

IN_PROGRESS, SUCCEEDED, FAILED = "in_progress", "succeeded", "failed"
# A claim released by a restarted gateway keeps its id's body for this long, as a finished one does by
# default (the writer does not know the gateway's settings).
RELEASED_TTL_S = 86_400.0
_ATTEMPT = "#"  # not in the request id alphabet (serving.middleware): "<id>#<n>" never is a client's id


def body_hash(endpoint: str, body: dict[str, Any]) -> str:
    canonical = json.dumps({"endpoint": endpoint, "body": body}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def usage_id(request_id: str, attempt: int) -> str:
    return request_id if attempt == 1 else f"{request_id}{_ATTEMPT}{attempt}"


def attempt_of(usage_request_id: str) -> tuple[str, int]:
    """(request id, attempt) of a usage record's key: the inverse of ``usage_id``."""
    request_id, sep, n = usage_request_id.rpartition(_ATTEMPT)
    return (request_id, int(n)) if sep and n.isdigit() else (usage_request_id, 1)


@dataclass(frozen=True)
class Claim:
    org_id: str
    request_id: str
    attempt: int

    @property
    def usage_id(self) -> str:
        return usage_id(self.request_id, self.attempt)


@dataclass(frozen=True)
class Stored:
    """The response of the run that succeeded: relayed JSON, or a stream's transcript."""

    response: bytes


def claim(session: Session, org_id: str, request_id: str, digest: str, *, now: datetime, lease_s: float) -> Claim | Stored:
    table = StoredResponse.__table__
    lease_until = now + timedelta(seconds=lease_s)
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    first = dialect_insert(table).values(
        org_id=org_id, request_id=request_id, body_hash=digest, state=IN_PROGRESS, attempts=1, lease_until=lease_until, updated_at=now
    ).on_conflict_do_nothing(index_elements=["org_id", "request_id"]).returning(table.c.attempts)
    if session.execute(first).first() is not None:
        return Claim(org_id, request_id, 1)
    # Another replica may be claiming the same id right now: the row lock orders the two.
    row = session.execute(
        select(table.c.state, table.c.attempts, table.c.body_hash, table.c.response, table.c.lease_until, table.c.expires_at)
        .where(table.c.org_id == org_id, table.c.request_id == request_id)
        .with_for_update()
    ).one()
    running = row.state == IN_PROGRESS and row.lease_until is not None and _aware(row.lease_until) > now
    finished = row.state != IN_PROGRESS and row.expires_at is not None and _aware(row.expires_at) > now
    if (running or finished) and row.body_hash != digest:
        raise RequestIdReused(request_id)
    if running:
        raise RequestInProgress(request_id)
    if finished and row.state == SUCCEEDED and row.response is not None:
        return Stored(bytes(row.response))
    # Failed, cut off, expired or abandoned: run again, as the next attempt.
    attempt = row.attempts + 1
    session.execute(
        update(table)
        .where(table.c.org_id == org_id, table.c.request_id == request_id)
        .values(body_hash=digest, state=IN_PROGRESS, attempts=attempt, response=None, lease_until=lease_until, expires_at=None, updated_at=now)
    )
    return Claim(org_id, request_id, attempt)


def finish(session: Session, claim: Claim, response: bytes | None, *, now: datetime, ttl_s: float) -> bool:
    """Record the attempt's outcome (a response: it succeeded) unless a later attempt took the id over."""
    table = StoredResponse.__table__
    result = session.execute(
        update(table)
        .where(
            table.c.org_id == claim.org_id,
            table.c.request_id == claim.request_id,
            table.c.attempts == claim.attempt,
            table.c.state == IN_PROGRESS,
        )
        .values(
            state=SUCCEEDED if response is not None else FAILED,
            response=response,
            lease_until=None,
            expires_at=now + timedelta(seconds=ttl_s),
            updated_at=now,
        )
    )
    return result.rowcount == 1


def release(session: Session, claims: list[Claim], *, now: datetime) -> None:
    """Fail the claims a gateway left running when it died (its journal is being replayed), so that
    their ids run again at once instead of answering 409 until the lease runs out."""
    if not claims:
        return
    table = StoredResponse.__table__
    stmt = (
        update(table)
        .where(
            and_(
                table.c.org_id == bindparam("c_org"),
                table.c.request_id == bindparam("c_request"),
                table.c.attempts == bindparam("c_attempt"),
                table.c.state == IN_PROGRESS,
            )
        )
        .values(state=FAILED, lease_until=None, expires_at=now + timedelta(seconds=RELEASED_TTL_S), updated_at=now)
    )
    session.connection().execute(stmt, [{"c_org": c.org_id, "c_request": c.request_id, "c_attempt": c.attempt} for c in claims])


def purge_expired(session: Session, *, now: datetime) -> int:
    """Drop the stored answers past their expiry (the rows stay: they number the id's attempts)."""
    table = StoredResponse.__table__
    result = session.execute(
        update(table).where(table.c.expires_at <= now, table.c.response.is_not(None)).values(response=None)
    )
    return max(result.rowcount, 0)


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


class Attempt:
    """One claimed run of a request, finished exactly once: ``succeed`` with the response to replay, or
    ``fail``. A failure to write the outcome is logged, never raised: the client's answer is already
    decided, and the claim's lease bounds the harm (409s until it runs out)."""

    def __init__(self, db: Database, claim: Claim, *, ttl_s: float):
        self.claim = claim
        self._db = db
        self._ttl_s = ttl_s
        self._finished = False

    @property
    def usage_id(self) -> str:
        return self.claim.usage_id

    async def succeed(self, response: bytes) -> None:
        await self._finish(response)

    async def fail(self) -> None:
        await self._finish(None)

    async def _finish(self, response: bytes | None) -> None:
        if self._finished:
            return
        self._finished = True
        claim, ttl_s = self.claim, self._ttl_s
        with anyio.CancelScope(shield=True):  # also when the client left: the id must not stay blocked
            try:
                await self._db.run(lambda s: finish(s, claim, response, now=datetime.now(timezone.utc), ttl_s=ttl_s))
            except Exception:
                log.exception("could not record the outcome of a request id", attempt=claim.attempt, succeeded=response is not None)


async def begin(db: Database, org_id: str, request_id: str, digest: str, *, lease_s: float, ttl_s: float) -> Attempt | Stored:
    """Claim ``request_id`` for a run, or the stored answer of its successful run (raises 409/400, or
    503 while the database is unreachable: without the claim a retry could run and be billed twice)."""
    try:
        outcome = await db.run(lambda s: claim(s, org_id, request_id, digest, now=datetime.now(timezone.utc), lease_s=lease_s))
    except (OperationalError, InterfaceError, ConnectionError) as exc:
        log.error("could not claim a request id", error=repr(exc))
        raise DatabaseUnavailable("The service cannot record this request right now; try again shortly.") from exc
    if isinstance(outcome, Stored):
        log.info("answering a retry from the stored response")
        return outcome
    return Attempt(db, outcome, ttl_s=ttl_s)
