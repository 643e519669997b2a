"""The API's reads of the job store: a team's jobs (one, or a page of them) and the metrics' counts. Every
job transition (submit, cancel, retry, and the workers' claims and writes) is in :mod:`divmerge_service.jobs`."""

from __future__ import annotations

import base64
from datetime import datetime

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from divmerge_service.jobs import get_job
from divmerge_service.models import Job, JobStatus

__all__ = ["count_by_status", "decode_cursor", "encode_cursor", "get_job", "list_jobs", "queued_by_queue"]


def encode_cursor(job: Job) -> str:
    raw = f"{job.created_at.isoformat()}|{job.id}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """Raises ValueError on a malformed cursor."""
    raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    stamp, _, job_id = raw.partition("|")
    if not job_id:
        raise ValueError("bad cursor")
    return datetime.fromisoformat(stamp), job_id


def list_jobs(
    session: Session, team_id: int, *, status: str | None, limit: int, cursor: str | None
) -> tuple[list[Job], str | None]:
    """Newest first; returns the page and the cursor of the next one (None at the end)."""
    q = select(Job).where(Job.team_id == team_id)
    if status:
        q = q.where(Job.status == status)
    if cursor:
        stamp, job_id = decode_cursor(cursor)
        q = q.where(or_(Job.created_at < stamp, and_(Job.created_at == stamp, Job.id < job_id)))
    rows = list(session.scalars(q.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
    nxt = encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    return rows[:limit], nxt


def count_by_status(session: Session) -> dict[str, int]:
    return dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())


def queued_by_queue(session: Session) -> dict[str, int]:
    rows = session.execute(
        select(Job.queue, func.count()).where(Job.status == JobStatus.QUEUED).group_by(Job.queue)
    )
    return dict(rows.all())


def recent_durations(session: Session, since: datetime, limit: int = 10_000) -> list[tuple[str, float]]:
    rows = session.execute(
        select(Job.status, Job.started_at, Job.finished_at)
        .where(Job.finished_at >= since, Job.started_at.is_not(None))
        .order_by(Job.finished_at.desc())
        .limit(limit)
    ).all()
    return [(s, (f - b).total_seconds()) for s, b, f in rows]
