"""/v1/merges: submit, read, list and cancel merge jobs (a team sees only its own)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from starlette.concurrency import run_in_threadpool

from .. import crud, spec
from ..core.config import Settings
from ..db import session_scope
from ..errors import ApiError
from ..queue import enqueue
from ..schemas import JobList, JobOut, Status
from ..security import Caller, CallerDep

router = APIRouter(prefix="/v1/merges", tags=["merges"])

_ERRORS = {
    401: {"description": "missing, invalid or revoked token"},
    404: {"description": "no such job for this team"},
    503: {"description": "the database is unavailable (`Retry-After` says when to try again)"},
}


def _settings(request: Request) -> Settings:
    return request.app.state.settings


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "payload_too_large", f"the body is {declared} bytes, the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "payload_too_large", f"the body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


@router.post(
    "",
    status_code=202,
    response_model=JobOut,
    responses={
        **_ERRORS,
        409: {"description": "Idempotency-Key reused with a different body"},
        413: {"description": "body or inline texts too large"},
        422: {"description": "invalid config, path outside the allowed roots, or a limit exceeded"},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/MergeConfig"}}},
        }
    },
)
async def create_merge(
    request: Request,
    caller: Caller = CallerDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JobOut:
    """Submit a merge: the body is the engine's MergeConfig (the CLI's YAML, as JSON)."""
    settings = _settings(request)
    raw = await _read_body(request, settings.max_body_bytes)
    config = spec.parse(spec.load_json(raw))
    spec.check_limits(config, settings)
    spec.check_paths(config, settings)
    stored = spec.normalise(config)

    def _create():
        with session_scope(settings.db_url) as s:
            try:
                job, created = crud.create_job(
                    s,
                    team_id=caller.team_id,
                    spec=stored,
                    spec_hash=spec.spec_hash(stored),
                    queue=settings.queue_for(config.merge_method),
                    idempotency_key=idempotency_key,
                )
            except crud.IdempotencyConflict:
                raise ApiError(
                    409, "idempotency_conflict", "this Idempotency-Key was used with a different body"
                ) from None
            return JobOut.of(job), created

    out, created = await run_in_threadpool(_create)
    if created:
        await run_in_threadpool(enqueue, settings, out.id, out.queue)
    return out


@router.get("/{job_id}", response_model=JobOut, responses=_ERRORS)
def get_merge(job_id: str, request: Request, caller: Caller = CallerDep) -> JobOut:
    with session_scope(_settings(request).db_url) as s:
        job = crud.get_job(s, caller.team_id, job_id)
        if job is None:
            raise ApiError(404, "not_found", f"no merge job {job_id!r}")
        return JobOut.of(job)


@router.get("", response_model=JobList, responses={401: _ERRORS[401]})
def list_merges(
    request: Request,
    caller: Caller = CallerDep,
    status: Status | None = None,
    limit: Annotated[int, Query(ge=1)] = 20,
    cursor: str | None = None,
) -> JobList:
    """The team's jobs, newest first, cursor-paginated."""
    settings = _settings(request)
    if limit > settings.list_limit_max:
        raise ApiError(422, "invalid_request", f"limit must be at most {settings.list_limit_max}", "limit")
    with session_scope(settings.db_url) as s:
        try:
            jobs, nxt = crud.list_jobs(s, caller.team_id, status=status, limit=limit, cursor=cursor)
        except ValueError:
            raise ApiError(422, "invalid_cursor", "the cursor is not valid", "cursor") from None
        return JobList(items=[JobOut.of(j) for j in jobs], next_cursor=nxt)


@router.post(
    "/{job_id}/cancel",
    status_code=202,
    response_model=JobOut,
    responses={**_ERRORS, 409: {"description": "the job has already finished"}},
)
def cancel_merge(job_id: str, request: Request, caller: Caller = CallerDep) -> JobOut:
    """Queued: cancelled at once. Running: the worker stops at its next step and ends it cancelled."""
    with session_scope(_settings(request).db_url) as s:
        try:
            job = crud.cancel_job(s, caller.team_id, job_id)
        except crud.NotCancellable:
            raise ApiError(409, "job_finished", "the job has already finished") from None
        if job is None:
            raise ApiError(404, "not_found", f"no merge job {job_id!r}")
        return JobOut.of(job)
