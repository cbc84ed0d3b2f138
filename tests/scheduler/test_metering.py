from sqlalchemy import func, select

from scheduler.metering import Usage, record_usage
from scheduler.models import UsageRecord


def test_usage_is_recorded_once_per_request_id(db_session, make_org):
    org, _ = make_org()
    usage = Usage(org_id=org.id, request_id="req-1", kind="inference", model="m", prompt_tokens=3, completion_tokens=5)
    assert record_usage(db_session, usage) is True
    assert record_usage(db_session, usage) is False
    other_org, _ = make_org()
    assert record_usage(db_session, Usage(org_id=other_org.id, request_id="req-1", kind="inference", model="m")) is True
    n = db_session.scalar(select(func.count()).select_from(UsageRecord).where(UsageRecord.request_id == "req-1"))
    assert n == 2
