"""Usage records: one row per inference request or training job, written exactly once.

Writers may be retried (a client resending the same request id, a worker reporting completion twice);
the unique (org, request id) constraint plus insert-or-ignore makes the second write a no-op.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from sqlalchemy.orm import Session

from scheduler.models import UsageRecord


@dataclass(frozen=True)
class Usage:
    org_id: str
    request_id: str
    kind: str  # "inference" | "training"
    model: str
    adapter: str | None = None
    api_key_id: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    trained_tokens: int = 0
    latency_ms: float | None = None
    status: str = "ok"


def record_usage(session: Session, usage: Usage) -> bool:
    """Insert the record unless one with the same (org, request id) exists; True if it was new."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    stmt = dialect_insert(UsageRecord).values(**asdict(usage))
    stmt = stmt.on_conflict_do_nothing(index_elements=["org_id", "request_id"]).returning(UsageRecord.id)
    return session.execute(stmt).first() is not None
