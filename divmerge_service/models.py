"""Tables: teams, API tokens (hashes only), the admin audit log, merge jobs and their events, and the
webhook outbox. The job row is the source of truth."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


class JobStatus(StrEnum):
    """A job's status: the one list, used by the tables, the job store, the worker, the API's schemas and
    (served by ``divmerge_api.routers.dashboard``) the dashboard. Members are plain strings: ``JobStatus.QUEUED ==
    "queued"``, and they are stored and serialised as such."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in FINISHED


STATUSES: tuple[JobStatus, ...] = tuple(JobStatus)
#: The statuses a job never leaves on its own (POST /retry takes a failed job back to queued).
FINISHED: tuple[JobStatus, ...] = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)
#: The statuses of a job not finished yet.
ACTIVE: tuple[JobStatus, ...] = (JobStatus.QUEUED, JobStatus.RUNNING)


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on both PostgreSQL and SQLite (which drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[float]: JSON, datetime: UTCDateTime}


class Team(Base):
    __tablename__ = "teams"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: The team's default webhook (a job's own ``notify`` overrides it): its URL and comma-separated events.
    webhook_url: Mapped[str | None] = mapped_column(Text, default=None)
    webhook_events: Mapped[str | None] = mapped_column(String(64), default=None)
    #: The HMAC key webhooks are signed with, as :func:`divmerge_service.webhooks.seal` stores it (encrypted
    #: when ``DIVMERGE_WEBHOOK_SECRET_KEY`` is set). Never returned after the answer that created it.
    webhook_secret: Mapped[str | None] = mapped_column(Text, default=None)
    webhook_secret_at: Mapped[datetime | None] = mapped_column(default=None)


class ApiToken(Base):
    __tablename__ = "api_tokens"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    team_id: Mapped[int] = mapped_column(ForeignKey("teams.id"))
    #: sha256 hex of the token; the token itself is shown once and never stored.
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    #: Comma-separated scopes (``read``, ``submit``, ``admin``); tokens made before scopes existed got
    #: ``read,submit`` from the migration.
    scopes: Mapped[str] = mapped_column(String(64), default="read,submit", server_default="read,submit")
    #: None: never expires.
    expires_at: Mapped[datetime | None] = mapped_column(default=None)
    #: Updated on use, at most once a minute per token (``divmerge_api.security.LAST_USED_EVERY_S``).
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)


class AuditEvent(Base):
    """Every admin action (team created, token created or revoked), by whom: append-only."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    #: team_created, token_created, token_revoked
    action: Mapped[str] = mapped_column(String(32))
    #: Who: the acting token's id and team, or ``cli`` (the server-side ``divmerge token`` command).
    actor_token_id: Mapped[str | None] = mapped_column(String(32), default=None)
    actor: Mapped[str] = mapped_column(String(100))
    #: What: the team and (for token actions) the token id concerned.
    team: Mapped[str | None] = mapped_column(String(100), default=None)
    token_id: Mapped[str | None] = mapped_column(String(32), default=None)
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("team_id", "idempotency_key", name="uq_jobs_team_idempotency_key"),
        Index("ix_jobs_team_created", "team_id", "created_at", "id"),
        Index("ix_jobs_status", "status"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    team_id: Mapped[int] = mapped_column(ForeignKey("teams.id"))
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED.value)
    #: The submitted MergeConfig (normalised JSON, no secrets) and its sha256 (idempotency check).
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    spec_hash: Mapped[str] = mapped_column(String(64))
    idempotency_key: Mapped[str | None] = mapped_column(String(200), default=None)
    queue: Mapped[str] = mapped_column(String(32))
    #: A ``divmerge_service.contracts.JobProgress`` dump (the worker's last progress write).
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    resolved: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    #: A ``divmerge_service.contracts.JobResult`` dump (older rows: a flat ``destination`` string; still valid).
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    #: Where the merge was delivered (a ``contracts.Destination`` dump), written with the job's success. Not
    #: read back: a later attempt knows a delivery from the worker's journal (``divmerge_worker.bookkeeping``) or the
    #: job's marker on the Hub commit / in the local output (``divmerge_worker.upload``).
    upload: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    #: A merged result whose delivery failed, kept for ``POST /retry``: {path, until} (None when nothing is kept).
    kept: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), default=None)
    #: The submit body's ``notify`` ({url, events}), or None (the team's webhook applies, if it has one).
    notify: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), default=None)
    #: The submit body's ``devices_per_job`` (a learned merge's data-parallel devices), or None (the worker's
    #: ``DIVMERGE_DEVICES_PER_JOB``).
    devices_per_job: Mapped[int | None] = mapped_column(Integer, default=None)
    #: Learned methods: the loss at each optimisation step so far (bounded by ``max_stored_losses``).
    losses: Mapped[list[float] | None] = mapped_column(JSON, default=None)
    #: The last error: the reason of a failure, or of the retry the job is waiting for.
    error_code: Mapped[str | None] = mapped_column(String(64), default=None)
    error_message: Mapped[str | None] = mapped_column(Text, default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker_id: Mapped[str | None] = mapped_column(String(200), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    #: Earliest time a queued job may run (transient-error backoff).
    run_after: Mapped[datetime | None] = mapped_column(default=None)
    enqueued_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)


class JobEvent(Base):
    """What happened to a job, in order: submitted, claimed (by which worker), stage changes, retries and
    their reason, warnings, the outcome. Append-only."""

    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job", "job_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class WebhookStatus(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    #: Given up: out of attempts (``webhook_attempts``) or refused (host no longer allowed).
    FAILED = "failed"


class WebhookDelivery(Base):
    """The webhook outbox: one row per (finished job, event), inserted in the transaction that finishes the
    job, and kept until it is delivered or given up. ``id`` is the delivery id the receiver dedupes on."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_job", "job_id"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    team_id: Mapped[int] = mapped_column(ForeignKey("teams.id"))
    #: succeeded, failed, cancelled or kept
    event: Mapped[str] = mapped_column(String(16))
    url: Mapped[str] = mapped_column(Text)
    #: The exact JSON body sent (and signed) on every attempt.
    body: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default=WebhookStatus.PENDING.value)
    #: Attempts started (a claim counts one before the POST: a worker killed mid-POST used one up).
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: When it is due: the next try, or (while a deliverer holds it) the end of that deliverer's claim.
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_status_code: Mapped[int | None] = mapped_column(Integer, default=None)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(default=None)


class Worker(Base):
    """A worker process as its last heartbeat reported it (``divmerge_worker.capacity``): what it consumes,
    its devices and host memory. Live while ``last_seen`` is within ``worker_stale_s``."""

    __tablename__ = "workers"

    #: The Celery node name (``w1@host``).
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    #: Its class (``gpu-80g``, ``gpu-80g-x2``, ``cpu-64g``: :func:`divmerge_service.workers.class_of`).
    worker_class: Mapped[str] = mapped_column(String(64))
    #: The queues it consumes.
    queues: Mapped[list[str]] = mapped_column(JSON, default=list)
    #: [{kind, index, name, total, free}] in bytes; a CPU-only worker reports one ``cpu`` device.
    devices: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    host_total: Mapped[int] = mapped_column(BigInteger, default=0)
    host_available: Mapped[int] = mapped_column(BigInteger, default=0)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(default=utcnow)
