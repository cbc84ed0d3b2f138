"""The database tables. The database is the source of truth for every tenant resource and every
job's state; a queue message only says "look at job X".

Every tenant-owned table carries ``org_id`` and every query for it is scoped by the caller's org.
Internal-only columns (key hashes, lease tokens) live here and in no public schema.
"""

from __future__ import annotations

import enum
import secrets
import string
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.expression import false
from sqlalchemy.types import TypeDecorator

_ALPHABET = string.ascii_letters + string.digits


def new_id(prefix: str, n: int = 24) -> str:
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(n))


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every database. SQLite keeps no zone, so values read back
    from it are naive; this makes them aware again (and converts aware input to UTC on write)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(timezone.utc)
        return value

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON, list[Any]: JSON}


class Role(str, enum.Enum):
    """What a principal may do inside its organization. OIDC groups map onto these."""

    admin = "admin"  # everything, including keys, quotas and billing of the org
    member = "member"  # files, jobs, inference
    viewer = "viewer"  # read-only and inference


class JobStatus(str, enum.Enum):
    validating_files = "validating_files"
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    paused = "paused"  # stopped at a checkpoint on the tenant's request; resume queues it again

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


class Organization(Base):
    __tablename__ = "organizations"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("org-"))
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("key-"))
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    # sha256 of the whole key; API keys are 32 random bytes, so a fast hash is enough.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    key_hint: Mapped[str] = mapped_column(String(16))  # "tf-…abcd", for display
    role: Mapped[Role] = mapped_column(Enum(Role, native_enum=False, length=20))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


class File(Base):
    __tablename__ = "files"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("file-"))
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"), index=True)
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(40))
    bytes: Mapped[int] = mapped_column(BigInteger)
    storage_key: Mapped[str] = mapped_column(String(512))
    examples: Mapped[int] = mapped_column(Integer, default=0)
    format: Mapped[str | None] = mapped_column(String(20))  # gpu_worker.contract.DataFormat, detected at upload
    status: Mapped[str] = mapped_column(String(20), default="processed")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # OpenAI's ``expires_after``: the scheduler deletes the file then (once no unfinished job uses it)
    expires_at: Mapped[datetime | None] = mapped_column(index=True)
    # The upload's duplicate report (gpu_worker.validation): {"exact": n, "near": n, "lines": [{"line",
    # "first_line", "exact"}, ...the first 20]}; None for files stored before it was kept, and job results
    duplicates: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class Upload(Base):
    """OpenAI's Upload: a file sent in parts (each up to 64 MB), joined into a File on completion."""

    __tablename__ = "uploads"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("upload_"))
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"), index=True)
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(40))
    mime_type: Mapped[str] = mapped_column(String(100))
    bytes: Mapped[int] = mapped_column(BigInteger)  # the whole file's, declared at creation
    status: Mapped[str] = mapped_column(String(20), default="pending", index=True)  # pending | completed | cancelled | expired
    file_id: Mapped[str | None] = mapped_column(String(40))  # the File it became
    file_expires_after: Mapped[int | None] = mapped_column(Integer)  # seconds: the File's ``expires_after``
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)


class UploadPart(Base):
    __tablename__ = "upload_parts"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("part_"))
    upload_id: Mapped[str] = mapped_column(ForeignKey("uploads.id", ondelete="CASCADE"), index=True)
    bytes: Mapped[int] = mapped_column(BigInteger)
    storage_key: Mapped[str] = mapped_column(String(512))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ftjob-"))
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"), index=True)
    model: Mapped[str] = mapped_column(String(512))
    training_file_id: Mapped[str] = mapped_column(String(40))
    validation_file_id: Mapped[str | None] = mapped_column(String(40))
    suffix: Mapped[str | None] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(Integer)
    method: Mapped[dict[str, Any]]  # the OpenAI `method` object with resolved hyperparameters
    spec: Mapped[dict[str, Any]]  # gpu_worker.contract.JobSpec as JSON
    status: Mapped[JobStatus] = mapped_column(Enum(JobStatus, native_enum=False, length=20), index=True)
    error: Mapped[dict[str, Any] | None]
    fine_tuned_model: Mapped[str | None] = mapped_column(String(512))
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger)
    estimated_tokens: Mapped[int | None] = mapped_column(BigInteger)  # trained tokens expected, all epochs
    queue: Mapped[str] = mapped_column(String(64), default="default")
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    estimated_finish: Mapped[datetime | None]
    # Lease: who runs the job now, proven by a token only the holder knows (fencing).
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_token: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None] = mapped_column(index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # a pause asked of a running job (shown as "pausing" until its worker stops it at a checkpoint), and
    # how many attempts ended in a pause: those are not the worker failures ``max_attempts`` counts
    pause_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    pauses: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    nudged_at: Mapped[datetime | None]
    result_files: Mapped[list[Any]] = mapped_column(default=list)
    # OpenAI's ``metadata``: the tenant's own key-value pairs, listed jobs filter on them (SQL NULL when none)
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON(none_as_null=True))

    __table_args__ = (Index("ix_jobs_org_created", "org_id", "created_at"),)


class JobEvent(Base):
    __tablename__ = "job_events"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ftevent-"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    org_id: Mapped[str] = mapped_column(String(40), index=True)
    seq: Mapped[int] = mapped_column(BigInteger)  # monotonic per job; events list newest first by it
    level: Mapped[str] = mapped_column(String(10), default="info")
    type: Mapped[str] = mapped_column(String(10), default="message")  # "message" | "metrics"
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (UniqueConstraint("job_id", "seq", name="uq_job_events_job_seq"),)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ftckpt-"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    org_id: Mapped[str] = mapped_column(String(40), index=True)
    step: Mapped[int] = mapped_column(Integer)
    storage_key: Mapped[str] = mapped_column(String(512))
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (UniqueConstraint("job_id", "step", name="uq_checkpoints_job_step"),)


class Adapter(Base):
    """A fine-tuned model servable by name: the adapter registry."""

    __tablename__ = "adapters"
    id: Mapped[str] = mapped_column(String(512), primary_key=True)  # "ft:{base}:{org}:{suffix}:{job}"
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), unique=True)
    base_model: Mapped[str] = mapped_column(String(512))
    storage_key: Mapped[str] = mapped_column(String(512))
    manifest: Mapped[dict[str, Any]]  # gpu_worker.contract.AdapterManifest
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Versioning (serving.adapter_registry): set when the compatibility check passes. ``name`` is the id
    # without its job part ("ft:{base}:{org}:{suffix}"); its active version is in ``AdapterAlias``.
    name: Mapped[str | None] = mapped_column(String(512), index=True)
    version: Mapped[int | None] = mapped_column(Integer)
    compatibility: Mapped[dict[str, Any] | None]  # the check's report: {"passed": bool, "reason", ...}
    checked_at: Mapped[datetime | None]
    deleted_at: Mapped[datetime | None]


class UsageRecord(Base):
    """One row per metered event (an inference request or a training job), exactly once: the
    (org, request id) pair is unique and writers insert-or-ignore."""

    __tablename__ = "usage_records"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    org_id: Mapped[str] = mapped_column(String(40), index=True)
    # An inference request's x-request-id (1-128 characters); a later attempt under the same id is
    # "<id>#<attempt>" (serving.idempotency), so each run an engine made is its own record.
    request_id: Mapped[str] = mapped_column(String(160))
    api_key_id: Mapped[str | None] = mapped_column(String(40))
    kind: Mapped[str] = mapped_column(String(20))  # "inference" | "training"
    model: Mapped[str] = mapped_column(String(512))  # base model
    adapter: Mapped[str | None] = mapped_column(String(512))
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    trained_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(20), default="ok")
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)

    __table_args__ = (UniqueConstraint("org_id", "request_id", name="uq_usage_records_org_request"),)


class StoredResponse(Base):
    """An inference request id's claim and, once it succeeded, its answer (serving.idempotency): a retry
    with the same id and body is answered from here, not run again. Rows stay after ``expires_at`` (the
    answer is dropped) so that a reused id's later attempts keep their own numbers."""

    __tablename__ = "stored_responses"
    org_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    body_hash: Mapped[str] = mapped_column(String(64))  # sha256 of the canonical request JSON
    state: Mapped[str] = mapped_column(String(16))  # "in_progress" | "succeeded" | "failed"
    attempts: Mapped[int] = mapped_column(Integer)  # runs claimed under this id so far
    response: Mapped[bytes | None] = mapped_column(LargeBinary)
    lease_until: Mapped[datetime | None]  # an unfinished claim blocks its id until then
    expires_at: Mapped[datetime | None] = mapped_column(index=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class AdapterAlias(Base):
    """A versionless fine-tuned model name and the version it resolves to, with the versions it
    resolved to before (newest last) so that a rollback knows where to go."""

    __tablename__ = "adapter_aliases"
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(512), primary_key=True)
    adapter_id: Mapped[str] = mapped_column(String(512))
    history: Mapped[list[Any]] = mapped_column(default=list)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class RateLimit(Base):
    """Requests per minute for inference: for one API key, or (``api_key_id`` NULL) the default of every
    key of the org. A key's own row wins over the org's."""

    __tablename__ = "rate_limits"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"), index=True)
    api_key_id: Mapped[str | None] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"))
    requests_per_minute: Mapped[int] = mapped_column(Integer)
    burst: Mapped[int | None] = mapped_column(Integer)  # bucket size; default: one minute's worth

    __table_args__ = (UniqueConstraint("org_id", "api_key_id", name="uq_rate_limits_org_key"),)


class InferenceQuota(Base):
    """An org's inference token allowance per UTC day or calendar month (prompt + completion tokens)."""

    __tablename__ = "inference_quotas"
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"), primary_key=True)
    tokens: Mapped[int] = mapped_column(BigInteger)
    period: Mapped[str] = mapped_column(String(10), default="month")  # "day" | "month"


class BaseModelEntitlement(Base):
    """Whether an organization may call a base model (and its fine-tuned models): a grant (``entitled``)
    or a revocation, overriding the platform default for that base (``Settings.default_base_models``).
    Set by the platform operator's admins (``scheduler.entitlements``)."""

    __tablename__ = "base_model_entitlements"
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"), primary_key=True)
    base_model: Mapped[str] = mapped_column(String(512), primary_key=True)
    entitled: Mapped[bool] = mapped_column(Boolean)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
