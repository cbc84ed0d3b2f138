"""The usage writer behind the responses: every journaled record reaches the database exactly once,
whether it is written in a batch, journaled twice under the same key, left behind by a gateway that
crashed (replayed by the next one, however often), or held back while the database is down; a request
in flight when its gateway died is billed the last running count it journaled."""

from __future__ import annotations

import asyncio
import contextlib
import os
from datetime import datetime, timezone

import pytest
from sqlalchemy import select, update

from scheduler.metering import Usage
from scheduler.models import StoredResponse, UsageRecord
from serving import idempotency
from serving.cache import TTLCache
from serving.database import Database
from serving.usage_writer import UsageWriter

pytestmark = pytest.mark.integration


def _usage(org_id: str, rid: str, completion: int = 3) -> Usage:
    return Usage(org_id=org_id, request_id=rid, kind="inference", model="m", prompt_tokens=5, completion_tokens=completion)


def _rows(db: Database, org_id: str) -> list[tuple[str, int]]:
    with db.scope() as session:
        return [(r.request_id, r.completion_tokens) for r in session.scalars(select(UsageRecord).where(UsageRecord.org_id == org_id).order_by(UsageRecord.request_id))]


def _crash(writer: UsageWriter) -> None:
    """What a killed process leaves: its journal on disk, its flock released, nothing flushed."""
    writer._task.cancel()
    os.close(writer._fd)
    os.close(writer._lock_fd)


def test_a_batch_is_written_once_and_a_retried_request_id_is_one_record(test_db, make_org, tmp_path):
    org, _ = make_org()

    async def run():
        writer = UsageWriter(test_db, tmp_path, interval_s=60)
        await writer.start()
        for rid in ["a", "b", "a", "c"]:  # "a" retried by its client
            writer.submit(_usage(org.id, rid))
        assert _rows(test_db, org.id) == []  # nothing on the response path touched the database
        await writer.flush()
        await writer.flush()  # nothing left: writes nothing more
        await writer.aclose()

    asyncio.run(run())
    assert _rows(test_db, org.id) == [("a", 3), ("b", 3), ("c", 3)]
    assert list(tmp_path.iterdir()) == []  # a clean shutdown leaves no journal


def test_a_crashed_gateways_journal_is_replayed_exactly_once(test_db, make_org, tmp_path):
    org, _ = make_org()

    async def run():
        crashed = UsageWriter(test_db, tmp_path, interval_s=60)
        await crashed.start()
        crashed.submit(_usage(org.id, "before-flush", 1))
        await crashed.flush()
        for i in range(3):
            crashed.submit(_usage(org.id, f"lost-{i}", 2))
        os.write(crashed._fd, b'{"org_id": "torn mid-wri')  # the process died inside a write
        _crash(crashed)
        assert _rows(test_db, org.id) == [("before-flush", 1)]

        for _ in range(2):  # the next gateway replays it; one after that finds nothing left to do
            writer = UsageWriter(test_db, tmp_path, interval_s=60)
            await writer.start()
            await writer.aclose()

    asyncio.run(run())
    assert _rows(test_db, org.id) == [("before-flush", 1), ("lost-0", 2), ("lost-1", 2), ("lost-2", 2)]
    assert list(tmp_path.iterdir()) == []


def test_requests_in_flight_when_the_gateway_died_are_billed_their_last_journaled_count(test_db, make_org, tmp_path):
    org, _ = make_org()
    with test_db.scope() as session:  # the request ids the dead gateway had claimed
        for rid, attempt in (("streaming", 1), ("retried", 2)):
            idempotency.claim(session, org.id, rid, "h", now=datetime.now(timezone.utc), lease_s=3600)
            if attempt == 2:
                session.execute(update(StoredResponse).where(StoredResponse.request_id == rid).values(attempts=2))

    async def run():
        crashed = UsageWriter(test_db, tmp_path, interval_s=60)
        await crashed.start()
        crashed.open(_usage(org.id, "streaming", 0))
        crashed.open(_usage(org.id, "retried#2", 0))
        crashed.open(_usage(org.id, "never-reached", 0))
        crashed.open(_usage(org.id, "finished", 0))
        crashed.submit(_usage(org.id, "finished", 4))
        crashed.discard(org.id, "never-reached")  # no engine took it
        await crashed.flush()  # the segment with the open lines is written and removed...
        crashed.open(_usage(org.id, "streaming", 7))  # ...while two requests are still running
        _crash(crashed)
        assert _rows(test_db, org.id) == [("finished", 4)]
        writer = UsageWriter(test_db, tmp_path, interval_s=60)
        await writer.start()
        await writer.aclose()

    asyncio.run(run())
    assert _rows(test_db, org.id) == [("finished", 4), ("retried#2", 0), ("streaming", 7)]
    with test_db.scope() as session:
        statuses = dict(session.execute(select(UsageRecord.request_id, UsageRecord.status).where(UsageRecord.org_id == org.id)).all())
        claims = dict(session.execute(select(StoredResponse.request_id, StoredResponse.state).where(StoredResponse.org_id == org.id)).all())
    assert statuses == {"finished": "ok", "streaming": "gateway_restarted", "retried#2": "gateway_restarted"}
    # the dead gateway's claims are failed, so that their ids run again at once instead of answering 409
    assert claims == {"streaming": "failed", "retried": "failed"}
    assert list(tmp_path.iterdir()) == []


def test_a_live_gateways_journal_is_not_taken_over(test_db, make_org, tmp_path):
    org, _ = make_org()

    async def run():
        first = UsageWriter(test_db, tmp_path, interval_s=60)
        await first.start()
        first.submit(_usage(org.id, "mine"))
        second = UsageWriter(test_db, tmp_path, interval_s=60)
        await second.start()
        assert _rows(test_db, org.id) == []  # still first's to write
        await second.aclose()
        await first.aclose()

    asyncio.run(run())
    assert _rows(test_db, org.id) == [("mine", 3)]


def test_a_record_after_shutdown_is_journaled_for_the_next_gateway(test_db, make_org, tmp_path):
    org, _ = make_org()

    async def run():
        writer = UsageWriter(test_db, tmp_path, interval_s=60)
        await writer.start()
        await writer.aclose()
        writer.submit(_usage(org.id, "late"))  # a stream that ended after the lifespan shut down
        os.close(writer._fd)
        assert _rows(test_db, org.id) == []
        following = UsageWriter(test_db, tmp_path, interval_s=60)
        await following.start()
        await following.aclose()

    asyncio.run(run())
    assert _rows(test_db, org.id) == [("late", 3)]


def test_records_wait_in_the_journal_while_the_database_is_down(test_db, make_org, tmp_path):
    org, _ = make_org()
    down = True

    @contextlib.contextmanager
    def flaky_scope():
        if down:
            raise ConnectionError("database unreachable")
        with test_db.scope() as session:
            yield session

    async def run():
        nonlocal down
        writer = UsageWriter(Database(flaky_scope), tmp_path, interval_s=60)
        await writer.start()
        writer.submit(_usage(org.id, "x"))
        with pytest.raises(ConnectionError):
            await writer.flush()
        writer.submit(_usage(org.id, "y"))
        assert sorted(p.name for p in next(tmp_path.iterdir()).glob("*.jsonl"))  # on disk meanwhile
        down = False
        await writer.flush()
        await writer.aclose()

    asyncio.run(run())
    assert _rows(test_db, org.id) == [("x", 3), ("y", 3)]


def test_ttl_cache_expires_and_stays_bounded():
    now = [0.0]
    cache = TTLCache(5.0, max_entries=2, clock=lambda: now[0])
    cache.put("a", 1)
    cache.put("b", 2)
    cache.put("c", 3)  # "a" evicted
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (None, 2, 3)
    now[0] = 5.0
    assert cache.get("b") is None
    cache.put("d", 4)
    cache.discard_where(lambda key: key == "d")
    assert cache.get("d") is None
    disabled = TTLCache(0.0)
    disabled.put("a", 1)
    assert disabled.get("a") is None
