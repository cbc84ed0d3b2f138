"""Usage records written behind the response, in batches, each exactly once.

A request's record is appended to a local journal file (one JSON line, one ``write`` syscall, no
database) before the response completes, and written to the database with the records of the other
requests of the last ``interval_s`` in one insert-or-ignore statement. The journal is what makes this
safe: a gateway that crashes or is killed before a batch is written leaves the batch's segment on disk,
and the next gateway started on the same journal folder writes it at start-up. The unique
(org, request id) constraint makes every replay and every client retry a no-op, so each record
reaches the database exactly once. (A machine that loses power can lose the last lines the kernel had
not written to disk yet: the journal is not fsynced per request, which would cost more than the
database round trip it replaces.)

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
import uuid
from datetime import datetime, timezone
from pathlib import Path

import structlog
from sqlalchemy.orm import Session

from scheduler.metering import Usage
from scheduler.models import UsageRecord
from serving.database import Database

log = structlog.get_logger(__name__)

_LOCK = ".lock"
_FIELDS = tuple(f.name for f in dataclasses.fields(Usage))
# A database that is down is retried at this pace; records keep accumulating in the journal meanwhile.
_RETRY_S = 1.0


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
    return (json.dumps({**row, "created_at": row["created_at"].isoformat()}, separators=(",", ":")) + "\n").encode()


def _row(line: bytes) -> dict | None:
    try:
        row = json.loads(line)
        row["created_at"] = datetime.fromisoformat(row["created_at"])
        return row
    except (ValueError, KeyError, TypeError):
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
        self._flushing = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

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
        """Write everything still pending (the journal keeps whatever the database refused)."""
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
        if not self._unwritten and not self._rows:
            shutil.rmtree(self._dir, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    # --- the response path --------------------------------------------------------------------------

    def submit(self, usage: Usage) -> None:
        """Journal one record; the database gets it with the next batch. Call on the event loop."""
        # Field by field: dataclasses.asdict deep-copies, and this runs on every request.
        row = {name: getattr(usage, name) for name in _FIELDS}
        row["created_at"] = datetime.now(timezone.utc)
        if self._fd is None:  # a response finishing after shutdown: journaled for the next gateway
            self._dir.mkdir(parents=True, exist_ok=True)
            self._open_segment()
            log.warning("usage record after the writer closed; left in the journal for the next gateway", journal=str(self._dir))
        os.write(self._fd, _line(row))
        self._rows.append(row)
        if len(self._rows) >= self._max_batch:
            self._wake.set()

    # --- batches ------------------------------------------------------------------------------------

    async def flush(self) -> None:
        """Write every record submitted so far (raises if the database refuses; nothing is lost)."""
        async with self._flushing:
            if self._rows:
                self._unwritten.append((self._segment, self._rows))
                os.close(self._fd)
                self._open_segment()
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
            except Exception:
                log.exception("could not write usage records; kept in the journal, retrying", pending=sum(len(r) for _, r in self._unwritten))
                await asyncio.sleep(_RETRY_S)

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
                for segment in sorted(folder.glob("*.jsonl")):
                    rows = _read_segment(segment)
                    new = await self.db.run(lambda s: insert_usage(s, rows))
                    log.info("replayed usage journal", segment=str(segment), records=len(rows), new=new)
                    segment.unlink()
                shutil.rmtree(folder, ignore_errors=True)
            except Exception:  # the database is down: a later start (or another gateway) replays it
                log.exception("could not replay a usage journal; left for later", journal=str(folder))
            finally:
                os.close(fd)
