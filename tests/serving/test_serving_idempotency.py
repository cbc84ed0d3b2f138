"""Claims of request ids on the database, on their own: the states a request id goes through, a claim
abandoned by a dead gateway, a late outcome of an attempt that was taken over, expiry and purge."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from scheduler.models import StoredResponse
from serving import idempotency
from serving.errors import RequestIdReused, RequestInProgress
from serving.idempotency import Claim, Stored, attempt_of, claim, finish, purge_expired, usage_id

pytestmark = pytest.mark.integration

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def _at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_a_request_id_runs_once_then_replays_until_it_expires(db_session):
    first = claim(db_session, "org-a", "rid", "h1", now=_at(0), lease_s=60)
    assert first == Claim("org-a", "rid", 1)
    with pytest.raises(RequestInProgress):
        claim(db_session, "org-a", "rid", "h1", now=_at(1), lease_s=60)
    with pytest.raises(RequestIdReused):  # another body, while it runs: retrying would not help
        claim(db_session, "org-a", "rid", "h2", now=_at(1), lease_s=60)
    assert claim(db_session, "org-b", "rid", "h2", now=_at(1), lease_s=60) == Claim("org-b", "rid", 1)  # ids are per org

    assert finish(db_session, first, b'{"answer": 1}', now=_at(2), ttl_s=100)
    assert claim(db_session, "org-a", "rid", "h1", now=_at(50), lease_s=60) == Stored(b'{"answer": 1}')
    with pytest.raises(RequestIdReused):
        claim(db_session, "org-a", "rid", "h2", now=_at(50), lease_s=60)

    assert purge_expired(db_session, now=_at(103)) == 1  # past its expiry: the answer goes, the row stays
    assert db_session.get(StoredResponse, ("org-a", "rid")).response is None
    # a new request under the old id, any body: the next attempt number, so its record is its own
    assert claim(db_session, "org-a", "rid", "h2", now=_at(103), lease_s=60) == Claim("org-a", "rid", 2)


def test_a_failed_or_abandoned_run_is_claimed_again_and_a_late_outcome_changes_nothing(db_session):
    first = claim(db_session, "org-a", "rid", "h", now=_at(0), lease_s=60)
    assert finish(db_session, first, None, now=_at(1), ttl_s=100)  # failed
    second = claim(db_session, "org-a", "rid", "h", now=_at(2), lease_s=60)
    assert second.attempt == 2
    # its gateway died without a restart on its journal: the id is blocked until the lease runs out
    with pytest.raises(RequestInProgress):
        claim(db_session, "org-a", "rid", "h", now=_at(61), lease_s=60)
    third = claim(db_session, "org-a", "rid", "h", now=_at(63), lease_s=60)
    assert third.attempt == 3
    assert not finish(db_session, second, b"late", now=_at(64), ttl_s=100)  # taken over: not its to finish
    assert finish(db_session, third, b"mine", now=_at(65), ttl_s=100)
    assert claim(db_session, "org-a", "rid", "h", now=_at(66), lease_s=60) == Stored(b"mine")


def test_released_claims_run_again_at_once(db_session):
    running = claim(db_session, "org-a", "rid", "h", now=_at(0), lease_s=3600)
    idempotency.release(db_session, [running, Claim("org-a", "unknown", 1)], now=_at(1))
    assert claim(db_session, "org-a", "rid", "h", now=_at(2), lease_s=3600).attempt == 2


@pytest.mark.parametrize("rid", ["a", "req_1", "x#y", "a:b-c.d", "9" * 128])
def test_a_usage_key_names_its_request_id_and_attempt(rid):
    for attempt in (1, 2, 37):
        if "#" not in rid:  # the gateway refuses "#" in an x-request-id (serving.middleware)
            assert attempt_of(usage_id(rid, attempt)) == (rid, attempt)
    assert usage_id(rid, 1) == rid and len(usage_id(rid, 10**9)) <= len(rid) + 11


def test_a_request_id_that_cannot_be_claimed_is_a_503_not_a_500():
    import asyncio
    import contextlib

    from serving.database import Database
    from serving.errors import DatabaseUnavailable

    @contextlib.contextmanager
    def down():
        raise ConnectionError("database unreachable")
        yield

    with pytest.raises(DatabaseUnavailable) as err:
        asyncio.run(idempotency.begin(Database(down), "org-a", "rid", "h", lease_s=60, ttl_s=60))
    assert (err.value.status_code, err.value.code, err.value.headers) == (503, "database_unavailable", {"Retry-After": "1"})
