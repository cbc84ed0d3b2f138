"""GET /v1/usage: daily aggregates of the org's usage records, grouped as asked; a member sees only its
own key, an admin the org or any key; another org's records never appear."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from scheduler.metering import Usage, record_usage
from scheduler.models import ApiKey, Role, UsageRecord
from scheduler.tenancy import create_api_key, hash_key


def _key_id(db_session, key: str) -> str:
    return db_session.query(ApiKey).filter_by(key_hash=hash_key(key)).one().id


@pytest.fixture
def records(db_session, org_a, make_org):
    org, admin_key = org_a
    member_row, member_key = create_api_key(db_session, org, "member", Role.member)
    admin_id = _key_id(db_session, admin_key)
    other_org, _ = make_org("org-b")
    today = datetime.now(timezone.utc).replace(hour=12)
    rows = [
        (org.id, "r1", admin_id, "base", None, 10, 5, today),
        (org.id, "r2", admin_id, "base", "ft:base:org-a:x:1", 7, 3, today),
        (org.id, "r3", member_row.id, "base", "ft:base:org-a:x:1", 4, 4, today),
        (org.id, "r4", member_row.id, "base", None, 1, 1, today - timedelta(days=1)),
        (other_org.id, "r1", None, "base", None, 1000, 1000, today),
    ]
    for org_id, rid, key_id, model, adapter, p, c, at in rows:
        record_usage(db_session, Usage(org_id=org_id, request_id=rid, kind="inference", model=model, adapter=adapter, api_key_id=key_id, prompt_tokens=p, completion_tokens=c))
        db_session.query(UsageRecord).filter_by(org_id=org_id, request_id=rid).update({"created_at": at})
    db_session.flush()
    return {"admin": admin_key, "member": member_key, "member_id": member_row.id, "admin_id": admin_id, "today": today.date()}


def test_admin_sees_the_org_per_day_and_adapter(http, records):
    answer = http.get("/v1/usage", params={"group_by": "adapter"}, headers={"Authorization": f"Bearer {records['admin']}"})
    assert answer.status_code == 200, answer.text
    got = {(b["date"], b["adapter"]): (b["requests"], b["prompt_tokens"], b["completion_tokens"], b["total_tokens"]) for b in answer.json()["data"]}
    today, yesterday = records["today"].isoformat(), (records["today"] - timedelta(days=1)).isoformat()
    assert got == {
        (today, None): (1, 10, 5, 15),
        (today, "ft:base:org-a:x:1"): (2, 11, 7, 18),
        (yesterday, None): (1, 1, 1, 2),
    }


def test_member_sees_only_its_own_key(http, records):
    member = {"Authorization": f"Bearer {records['member']}"}
    answer = http.get("/v1/usage", params={"group_by": ["api_key", "model"]}, headers=member)
    assert {b["api_key_id"] for b in answer.json()["data"]} == {records["member_id"]}
    assert sum(b["total_tokens"] for b in answer.json()["data"]) == 10
    denied = http.get("/v1/usage", params={"api_key_id": records["admin_id"]}, headers=member)
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "insufficient_permissions"
    admin = http.get("/v1/usage", params={"api_key_id": records["member_id"]}, headers={"Authorization": f"Bearer {records['admin']}"})
    assert sum(b["total_tokens"] for b in admin.json()["data"]) == 10


def test_date_range_is_checked(http, records):
    auth = {"Authorization": f"Bearer {records['admin']}"}
    bad = http.get("/v1/usage", params={"start_date": "2026-02-02", "end_date": "2026-02-01"}, headers=auth)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "start_date"
    only_yesterday = (records["today"] - timedelta(days=1)).isoformat()
    answer = http.get("/v1/usage", params={"start_date": only_yesterday, "end_date": only_yesterday}, headers=auth)
    assert [b["total_tokens"] for b in answer.json()["data"]] == [2]


@pytest.mark.parametrize("params,param", [
    ({"end_date": "0001-01-01"}, "end_date"),  # the default 30-day window would start before year 1
    ({"end_date": "0001-01-15"}, "end_date"),
    ({"end_date": "9999-12-31"}, "end_date"),  # the query runs to the day after end_date
    ({"start_date": "9999-12-30", "end_date": "9999-12-31"}, "end_date"),
])
def test_a_window_that_leaves_the_calendar_is_400_naming_the_field(http, records, params, param):
    answer = http.get("/v1/usage", params=params, headers={"Authorization": f"Bearer {records['admin']}"})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert (error["param"], error["type"], error["code"]) == (param, "invalid_request_error", "invalid_value") and error["message"]


@pytest.mark.parametrize("params", [
    {"start_date": "0001-01-01", "end_date": "0001-01-01"},  # an explicit start needs no default window
    {"end_date": "0001-01-30"},  # the first end_date whose default window fits
    {"start_date": "9999-12-29", "end_date": "9999-12-30"},
])
def test_the_calendar_edges_that_fit_are_answered(http, records, params):
    answer = http.get("/v1/usage", params=params, headers={"Authorization": f"Bearer {records['admin']}"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["data"] == []
