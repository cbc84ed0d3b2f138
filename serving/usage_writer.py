"""Usage records written behind the response, in batches, each exactly once.

A request's record is appended to a local journal file (one JSON line, one ``write`` syscall, no
database) before the response completes, and written to the database with the records of the other
requests of the last ``interval_s`` in one insert-or-ignore statement. The journal is what makes this
safe: a gateway that crashes or is killed before a batch is written leaves the batch's segment on disk,
and the next gateway started on the same journal folder writes it at start-up. The unique
(org, request id) constraint makes every replay a no-op, so each record reaches the database exactly
once. (A machine that loses power can lose the last lines the kernel had not written to disk yet: the
journal is not fsynced per request, which would cost more than the database round trip it replaces.)

A request in flight is journaled too: an ``open`` line when it is sent to an engine, again with its
running token count as it streams (serving.metering bounds the rate), and a ``discard`` line if it
never reached one. The record of a request killed with its gateway is its last open line, status
``gateway_restarted``: the next gateway writes it, and fails the request id's claim
(serving.idempotency) so that a retry runs at once. A segment that is written and removed hands the
open lines of the requests still running on to the next segment, so the journal always holds them.

Layout: ``<journal>/<writer id>/<n>.jsonl``. Each writer holds an exclusive ``flock`` on its own folder
while it lives; at start a writer replays and removes every sibling folder whose lock it can take (its
writer is gone), so several gateway processes can share one journal root.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import json
import os
import shutil
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import structlog
from sqlalchemy.orm import Session

from scheduler.metering import Usage
from scheduler.models import UsageRecord
from serving import idempotency
from serving.database import Database

log = structlog.get_logger(__name__)

_LOCK = ".lock"
_FIELDS = tuple(f.name for f in dataclasses.fields(Usage))
# A database that is down is retried at this pace; records keep accumulating in the journal meanwhile.
_RETRY_S = 1.0
# Stored responses past their expiry are dropped this often (one UPDATE over an indexed column).
_PURGE_S = 3600.0
GATEWAY_RESTARTED = "gateway_restarted"
# The kind of a journal line that is not a finished record (finished records have no such key, as in
# journals written before requests in flight were journaled).
_KIND = "journal"
_OPEN, _DISCARD = "open", "discard"


def insert_usage(session: Session, rows: list[dict]) -> int:
    """Insert-or-ignore many usage rows in one round trip (one statement, executed for many rows: it
    compiles once and is cached, where a VALUES list of a new length each batch compiled every time)."""
    if not rows:
        return 0
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    stmt = dialect_insert(UsageRecord.__table__).on_conflict_do_nothing(index_elements=["org_id", "request_id"])
    result = session.connection().execute(stmt, rows)  # Core: no ORM bulk-insert bookkeeping
    return max(result.rowcount, 0)


def _line(row: dict) -> bytes:
    if "created_at" in row:
        row = {**row, "created_at": row["created_at"].isoformat()}
    return (json.dumps(row, separators=(",", ":")) + "\n").encode()


def _row(line: bytes) -> dict | None:
    try:
        row = json.loads(line)
        if row.get(_KIND) != _DISCARD:
            row["created_at"] = datetime.fromisoformat(row["created_at"])
        return row
    except (ValueError, KeyError, TypeError, AttributeError):
        return None  # a line torn by a crash mid-write: its request never got its response either


def _read_segment(path: Path) -> list[dict]:
    rows = []
    for line in path.read_bytes().splitlines():
        row = _row(line)
        if row is None:
            log.warning("skipping unreadable usage journal line", segment=str(path))
        else:
            rows.append(row)
    return rows


def replayed_records(lines: list[dict]) -> list[dict]:
    """The records a dead writer's journal lines (oldest first) stand for: every finished record, and
    the last state of each request still open, as ``gateway_restarted``."""
    finished: list[dict] = []
    running: dict[tuple[str, str], dict] = {}
    for line in lines:
        kind = line.pop(_KIND, None)
        key = (line.get("org_id"), line.get("request_id"))
        if kind == _OPEN:
            running[key] = {**line, "status": GATEWAY_RESTARTED}
        elif kind == _DISCARD:
            running.pop(key, None)
        else:
            running.pop(key, None)
            finished.append(line)
    return finished + list(running.values())


def _write_replayed(session: Session, rows: list[dict]) -> int:
    """Insert a dead writer's records and fail the request ids it left claimed, in one transaction."""
    new = insert_usage(session, rows)
    claims = []
    for row in rows:
        request_id, attempt = idempotency.attempt_of(row["request_id"])
        claims.append(idempotency.Claim(row["org_id"], request_id, attempt))
    idempotency.release(session, claims, now=datetime.now(timezone.utc))
    return new


class UsageWriter:
    def __init__(self, db: Database, journal_root: Path, *, interval_s: float = 0.1, max_batch: int = 1000):
        self.db = db
        self._root = journal_root
        self._interval_s = interval_s
        self._max_batch = max_batch
        self._dir = journal_root / uuid.uuid4().hex
        self._lock_fd: int | None = None
        self._fd: int | None = None  # the open segment
        self._segment: Path | None = None
        self._next = 0
        self._rows: list[dict] = []  # the open segment's records
        self._unwritten: list[tuple[Path, list[dict]]] = []  # closed segments not in the database yet
        self._running: dict[tuple[str, str], dict] = {}  # (org, request id) -> its last open line
        self._flushing = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._purged_at = 0.0

    # --- life cycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self._dir / _LOCK, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._open_segment()
        await self._adopt_orphans()
        self._task = asyncio.create_task(self._run(), name="usage-writer")

    async def aclose(self) -> None:
        """Write everything still pending (the journal keeps whatever the database refused, and the
        requests still running: a response finishing after this is journaled for the next gateway)."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        try:
            await self.flush()
        except Exception:
            log.exception("usage records left in the journal for the next gateway", journal=str(self._dir))
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if not self._unwritten and not self._rows and not self._running:
            shutil.rmtree(self._dir, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    # --- the response path --------------------------------------------------------------------------

    def submit(self, usage: Usage) -> None:
        """Journal one record; the database gets it with the next batch. Call on the event loop."""
        row = self._row_of(usage)
        self._running.pop((usage.org_id, usage.request_id), None)
        self._write(_line(row))
        self._rows.append(row)
        if len(self._rows) >= self._max_batch:
            self._wake.set()

    def open(self, usage: Usage) -> None:
        """Journal a request in flight, or its new running count: the record it stands for if this
        gateway dies before ``submit``."""
        row = self._row_of(usage)
        line = {_KIND: _OPEN, **row}
        self._running[(usage.org_id, usage.request_id)] = line
        self._write(_line(line))

    def discard(self, org_id: str, request_id: str) -> None:
        """Forget a request journaled as open that never reached an engine (no record)."""
        if self._running.pop((org_id, request_id), None) is not None:
            self._write(_line({_KIND: _DISCARD, "org_id": org_id, "request_id": request_id}))

    @staticmethod
    def _row_of(usage: Usage) -> dict:
        # Field by field: dataclasses.asdict deep-copies, and this runs on every request.
        row = {name: getattr(usage, name) for name in _FIELDS}
        row["created_at"] = datetime.now(timezone.utc)
        return row

    def _write(self, line: bytes) -> None:
        if self._fd is None:  # a response finishing after shutdown: journaled for the next gateway
            self._dir.mkdir(parents=True, exist_ok=True)
            self._open_segment()
            log.warning("usage record after the writer closed; left in the journal for the next gateway", journal=str(self._dir))
        os.write(self._fd, line)

    # --- batches ------------------------------------------------------------------------------------

    async def flush(self) -> None:
        """Write every record submitted so far (raises if the database refuses; nothing is lost)."""
        async with self._flushing:
            if self._rows:
                self._unwritten.append((self._segment, self._rows))
                os.close(self._fd)
                self._open_segment()
                # The requests still running move on to the new segment before the old one can go.
                if self._running:
                    os.write(self._fd, b"".join(_line(line) for line in self._running.values()))
            while self._unwritten:
                segment, rows = self._unwritten[0]
                new = await self.db.run(lambda s: insert_usage(s, rows))
                segment.unlink(missing_ok=True)
                self._unwritten.pop(0)
                log.debug("usage batch written", records=len(rows), new=new)

    def flush_blocking(self, timeout: float = 10.0) -> None:
        """``flush`` from another thread (tests; an operator's hook)."""
        asyncio.run_coroutine_threadsafe(self.flush(), self._loop).result(timeout)

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self._interval_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.flush()
                await self._purge()
            except Exception:
                log.exception("could not write usage records; kept in the journal, retrying", pending=sum(len(r) for _, r in self._unwritten))
                await asyncio.sleep(_RETRY_S)

    async def _purge(self) -> None:
        now = time.monotonic()
        if now - self._purged_at < _PURGE_S:
            return
        self._purged_at = now
        dropped = await self.db.run(lambda s: idempotency.purge_expired(s, now=datetime.now(timezone.utc)))
        log.debug("expired stored responses dropped", responses=dropped)

    def _open_segment(self) -> None:
        self._segment = self._dir / f"{self._next:08d}.jsonl"
        self._next += 1
        self._fd = os.open(self._segment, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)
        self._rows = []

    async def _adopt_orphans(self) -> None:
        """Replay the journals of writers that are gone (crashed or killed before their last batch)."""
        for folder in sorted(p for p in self._root.iterdir() if p.is_dir() and p != self._dir):
            try:
                fd = os.open(folder / _LOCK, os.O_CREAT | os.O_RDWR, 0o600)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue  # a live writer's
            try:
                # All segments at once: a request open in one segment may finish in a later one.
                segments = sorted(folder.glob("*.jsonl"))
                rows = replayed_records([line for segment in segments for line in _read_segment(segment)])
                new = await self.db.run(lambda s: _write_replayed(s, rows))
                restarted = sum(1 for row in rows if row["status"] == GATEWAY_RESTARTED)
                log.info("replayed usage journal", journal=str(folder), records=len(rows), new=new, in_flight=restarted)
                for segment in segments:
                    segment.unlink()
                shutil.rmtree(folder, ignore_errors=True)
            except Exception:  # the database is down: a later start (or another gateway) replays it
                log.exception("could not replay a usage journal; left for later", journal=str(folder))
            finally:
                os.close(fd)
