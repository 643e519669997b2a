"""Response bodies of the v1 API."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from .models import Job

Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class Progress(BaseModel):
    stage: str | None = None
    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    updated_at: datetime | None = None


class JobError(BaseModel):
    code: str
    message: str


class JobResult(BaseModel):
    destination: str = Field(description="hf://<repo_id> or the local output directory")
    revision: str | None = Field(None, description="branch uploaded to (Hub)")
    commit: str | None = Field(None, description="upload commit oid (Hub)")
    files: list[str] = []
    coefficients: dict[str, Any] | None = None
    metrics: dict[str, Any] = {}


class JobOut(BaseModel):
    id: str
    status: Status
    queue: str
    attempts: int
    progress: Progress | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    spec: dict[str, Any]
    resolved: dict[str, str | None] | None = Field(None, description="model/dataset reference -> commit SHA")
    error: JobError | None = None
    result: JobResult | None = None
    cancel_requested: bool = False

    @classmethod
    def of(cls, job: Job) -> JobOut:
        error = None
        if job.status == "failed" and job.error_code:
            error = JobError(code=job.error_code, message=job.error_message or "")
        return cls(
            id=job.id,
            status=job.status,  # type: ignore[arg-type]
            queue=job.queue,
            attempts=job.attempts,
            progress=Progress(**job.progress) if job.progress else None,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            spec=job.spec,
            resolved=job.resolved,
            error=error,
            result=JobResult(**job.result) if job.status == "succeeded" and job.result else None,
            cancel_requested=job.cancel_requested,
        )


class JobList(BaseModel):
    items: list[JobOut]
    next_cursor: str | None = Field(None, description="pass as ?cursor= for the next (older) page")
