"""/v1/merges: submit, dry-run, read, list, cancel and retry merge jobs, their events and their results
(a team sees only its own)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import FileResponse
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from divmerge_core.io.paths import is_under
from divmerge_service import jobs
from divmerge_service.config import Settings
from divmerge_service.contracts import JobResult
from divmerge_service.models import Job, JobStatus, Team
from divmerge_service.queue import enqueue

from .. import crud, dryrun, placement, spec
from ..deps import ReaderDep, SessionDep, SettingsDep, SubmitterDep
from ..errors import ApiError
from ..schemas import (
    Coefficients,
    Evaluation,
    EventList,
    EventOut,
    FileList,
    HubLocation,
    JobList,
    JobOut,
    Status,
    ValidationReport,
)
from ..security import Caller

router = APIRouter(prefix="/v1/merges", tags=["merges"])

_ERRORS = {
    401: {"description": "missing, invalid, revoked or expired token"},
    403: {"description": "the token lacks the scope the route needs (`read`, or `submit` for writes)"},
    404: {"description": "no such job for this team"},
    503: {"description": "the database is unavailable (`Retry-After` says when to try again)"},
}
#: The request body: the engine's MergeConfig as JSON or YAML.
_CONFIG_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            media: {"schema": {"$ref": "#/components/schemas/MergeConfig"}} for media in spec.BODY_TYPES
        },
    }
}
#: The submit body: a MergeConfig with ``notify`` beside its fields (``SubmitBody``, see divmerge_api.main).
_SUBMIT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            media: {"schema": {"$ref": "#/components/schemas/SubmitBody"}} for media in spec.BODY_TYPES
        },
    }
}


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
        422: {
            "description": "invalid config, path outside the allowed roots, missing local model or data, "
            "no Hub write token for the team, a limit exceeded, a notify URL that is not allowed, or (dispatch "
            "by capability) a job no live worker can hold (`insufficient_memory`)"
        },
    },
    openapi_extra=_SUBMIT_BODY,
)
async def create_merge(
    request: Request,
    caller: Caller = SubmitterDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
    settings: Settings = SettingsDep,
    s: Session = SessionDep,
) -> JobOut:
    """Submit a merge: the body is the engine's MergeConfig, as JSON or as the CLI's YAML
    (``Content-Type: application/yaml``), with an optional ``notify: {url, events}`` beside it (a webhook
    for this job, overriding the team's). Cheap checks run now: a bad config, a missing local model or
    data file, an existing output path (unless ``output.overwrite``), a Hub output without a write token
    for the team, or a notify URL off the server's allow-list are refused before anything is queued."""
    raw = await _read_body(request, settings.max_body_bytes)
    body, notify = spec.split_notify(spec.load_body(raw, request.headers.get("content-type")))
    body, devices = spec.split_devices(body)
    config = spec.parse(body)
    notify = spec.check_notify(notify, settings)
    devices = spec.check_devices(devices, config, settings)
    spec.check_limits(config, settings)
    spec.check_paths(config, settings)
    await run_in_threadpool(spec.check_submit, config, settings, caller.team)
    stored = spec.normalise(config)
    method_queue = settings.queue_for(*spec.methods_run(config), evaluates=spec.evaluates(config))
    queue = await placement.choose_queue(config, settings, s, method_queue, devices)

    def _create():
        if notify is not None and not s.scalar(select(Team.webhook_secret).where(Team.id == caller.team_id)):
            raise ApiError(
                422,
                "no_webhook_secret",
                f"team {caller.team!r} has no webhook secret to sign with: an admin creates one with "
                f"POST /v1/admin/teams/{caller.team}/webhook-secret",
                "notify",
            )
        try:
            job, created = jobs.create_job(
                s,
                team_id=caller.team_id,
                spec=stored,
                spec_hash=spec.submit_hash(stored, notify, devices),
                queue=queue,
                idempotency_key=idempotency_key,
                notify=notify,
                devices_per_job=devices,
            )
        except jobs.IdempotencyConflict:
            raise ApiError(
                409, "idempotency_conflict", "this Idempotency-Key was used with a different body"
            ) from None
        out = JobOut.of(job)
        s.commit()  # before the task is sent: a worker must find the job
        return out, created

    out, created = await run_in_threadpool(_create)
    if created:
        await run_in_threadpool(enqueue, settings, out.id, out.queue)
    return out


@router.get("/{job_id}", response_model=JobOut, responses=_ERRORS)
def get_merge(job_id: str, caller: Caller = ReaderDep, s: Session = SessionDep) -> JobOut:
    return JobOut.of(_owned(s, caller, job_id))


@router.get("", response_model=JobList, responses={401: _ERRORS[401], 403: _ERRORS[403]})
def list_merges(
    caller: Caller = ReaderDep,
    status: Status | None = None,
    limit: Annotated[int, Query(ge=1)] = 20,
    cursor: str | None = None,
    settings: Settings = SettingsDep,
    s: Session = SessionDep,
) -> JobList:
    """The team's jobs, newest first, cursor-paginated."""
    if limit > settings.list_limit_max:
        raise ApiError(422, "invalid_request", f"limit must be at most {settings.list_limit_max}", "limit")
    try:
        rows, nxt = crud.list_jobs(s, caller.team_id, status=status, limit=limit, cursor=cursor)
    except ValueError:
        raise ApiError(422, "invalid_cursor", "the cursor is not valid", "cursor") from None
    return JobList(items=[JobOut.of(j) for j in rows], next_cursor=nxt)


@router.post(
    "/{job_id}/cancel",
    status_code=202,
    response_model=JobOut,
    responses={**_ERRORS, 409: {"description": "the job has already finished"}},
)
def cancel_merge(job_id: str, caller: Caller = SubmitterDep, s: Session = SessionDep) -> JobOut:
    """Queued: cancelled at once. Running: the worker stops at its next step and ends it cancelled."""
    try:
        job = jobs.cancel_job(s, caller.team_id, job_id)
    except jobs.NotCancellable:
        raise ApiError(409, "job_finished", "the job has already finished") from None
    if job is None:
        raise ApiError(404, "not_found", f"no merge job {job_id!r}")
    out = JobOut.of(job)
    s.commit()
    return out


@router.post(
    "/validate",
    response_model=ValidationReport,
    responses={401: _ERRORS[401], 403: _ERRORS[403], 413: {"description": "body too large"}},
    openapi_extra=_CONFIG_BODY,
)
async def validate_merge(
    request: Request, caller: Caller = SubmitterDep, settings: Settings = SettingsDep
) -> ValidationReport:
    """Dry run: what ``divmerge validate`` does (resolve every model and dataset, check they can be merged,
    read a few rows of each dataset and check its columns, estimate the work), nothing queued. Always 200:
    ``ok`` false with the ``problems`` found (each naming its field)."""
    raw = await _read_body(request, settings.max_body_bytes)
    return await dryrun.validate(raw, request.headers.get("content-type"), settings, caller.team)


def _owned(s: Session, caller: Caller, job_id: str) -> Job:
    """The caller's team's job; 404 ``not_found`` for a missing job or another team's."""
    job = crud.get_job(s, caller.team_id, job_id)
    if job is None:
        raise ApiError(404, "not_found", f"no merge job {job_id!r}")
    return job


@router.post(
    "/{job_id}/retry",
    status_code=202,
    response_model=JobOut,
    responses={**_ERRORS, 409: {"description": "only a failed job can be retried"}},
)
def retry_merge(
    job_id: str, caller: Caller = SubmitterDep, settings: Settings = SettingsDep, s: Session = SessionDep
) -> JobOut:
    """Run a failed job again: its kept result is re-delivered if the merge finished but the delivery
    failed (``kept`` in the job), else the merge runs from scratch."""
    try:
        job = jobs.retry_job(s, caller.team_id, job_id)
    except jobs.NotRetryable:
        raise ApiError(409, "not_retryable", "only a failed job can be retried") from None
    if job is None:
        raise ApiError(404, "not_found", f"no merge job {job_id!r}")
    out = JobOut.of(job)
    s.commit()  # before the task is sent: a worker must find the job queued
    enqueue(settings, out.id, out.queue)
    return out


@router.get("/{job_id}/events", response_model=EventList, responses=_ERRORS)
def merge_events(job_id: str, caller: Caller = ReaderDep, s: Session = SessionDep) -> EventList:
    """What happened to the job, oldest first: submitted, claimed (by which worker), each stage, retries
    and their reason, warnings, the outcome."""
    _owned(s, caller, job_id)
    return EventList(events=[EventOut.of(e) for e in jobs.list_events(s, job_id)])


def _malformed(err: crud.MalformedBlob) -> ApiError:
    """500 ``internal_error`` naming the job and the column (``field``) whose stored blob does not validate."""
    return ApiError(
        500,
        "internal_error",
        f"job {err.job_id}: its stored {err.column} is malformed (the server log says how)",
        err.column,
    )


def _stored_result(job: Job) -> JobResult | None:
    """The job's result blob (any status); a blob that does not validate is a 500 naming the job and the
    column (the details are in the server log: :func:`divmerge_api.crud.stored_result`)."""
    try:
        return crud.stored_result(job)
    except crud.MalformedBlob as err:
        raise _malformed(err) from None


def _finished_result(job: Job) -> JobResult:
    if job.status != JobStatus.SUCCEEDED or not job.result:
        raise ApiError(409, "no_result", f"the job is {job.status}: it has no output files yet")
    result = _stored_result(job)
    if result is None or result.destination is None:
        raise ApiError(
            500, "internal_error", f"job {job.id}: its stored result names no destination", "result"
        )
    return result


@router.get(
    "/{job_id}/files",
    response_model=FileList,
    responses={**_ERRORS, 409: {"description": "the job has not succeeded"}},
)
def merge_files(job_id: str, caller: Caller = ReaderDep, s: Session = SessionDep) -> FileList:
    """The output files (name, size, sha256); for Hub outputs also the repo and the upload commit."""
    result = _finished_result(_owned(s, caller, job_id))
    hub = HubLocation(repo_id=result.hub.repo_id, commit=result.hub.commit) if result.hub else None
    return FileList(files=[f.model_dump() for f in result.file_info], hub=hub)


@router.get(
    "/{job_id}/files/{name}",
    response_class=FileResponse,
    responses={**_ERRORS, 409: {"description": "the job has not succeeded, or its output is on the Hub"}},
)
def merge_file(
    job_id: str,
    name: str,
    caller: Caller = ReaderDep,
    settings: Settings = SettingsDep,
    s: Session = SessionDep,
) -> FileResponse:
    """Stream one output file of a local destination (names as listed by ``/files``)."""
    result = _finished_result(_owned(s, caller, job_id))
    s.close()  # the file streams after the handler returns: no connection held meanwhile
    if result.local_path is None:
        where = result.destination.uri if result.destination else "?"
        raise ApiError(409, "hub_output", f"the output is on the Hub ({where}): download it from there")
    if name not in {f.name for f in result.file_info}:
        raise ApiError(404, "not_found", f"no output file {name!r}", "name")
    folder = Path(os.path.realpath(result.local_path))
    path = Path(os.path.realpath(folder / name))
    inside = path.parent == folder and is_under(folder, settings.roots)
    if not inside or not path.is_file():
        raise ApiError(404, "not_found", f"output file {name!r} is no longer on the server", "name")
    return FileResponse(path, filename=name, media_type="application/octet-stream")


@router.get(
    "/{job_id}/coefficients",
    response_model=Coefficients,
    responses={
        **_ERRORS,
        404: {"description": "no such job for this team, or a classic method (no coefficients)"},
    },
)
def merge_coefficients(job_id: str, caller: Caller = ReaderDep, s: Session = SessionDep) -> Coefficients:
    """Learned methods: the coefficients per group and task (once done) and the loss at each step so far
    (live while the job runs)."""
    job = _owned(s, caller, job_id)
    stored = _stored_result(job) if job.status == JobStatus.SUCCEEDED else None
    coeffs = stored.coefficients if stored is not None else None
    if coeffs is None and not spec.is_learned(job.spec):
        raise ApiError(
            404, "not_found", f"merge_method {job.spec.get('merge_method')!r} learns no coefficients"
        )
    losses = list(job.losses or [])
    try:
        progress = crud.stored_progress(job)
    except crud.MalformedBlob as err:
        raise _malformed(err) from None
    live = list(progress.heldout or []) if progress is not None else []
    if coeffs is None:
        return Coefficients(
            groups=[], tasks=spec.task_names(job.spec), values=None, losses=losses, heldout=live
        )
    groups, tasks = coeffs["groups"], coeffs["tasks"]
    values = [[float(coeffs["coefficients"][g][t]) for t in tasks] for g in groups]
    done = {k: coeffs[k] for k in _CONVERGENCE if k in coeffs}
    return Coefficients(
        groups=groups, tasks=tasks, values=values, losses=losses, **({"heldout": live} | done)
    )


#: What a done job's coefficients add about its convergence (``LearnedCoefficients.convergence``).
_CONVERGENCE = (
    "heldout",
    "heldout_inputs",
    "best_epoch",
    "converged",
    "stopped_early",
    "steps",
    "planned_steps",
)


@router.get(
    "/{job_id}/evaluation",
    response_model=Evaluation,
    responses={
        **_ERRORS,
        404: {"description": "no such job for this team, or its models carry no 'eval' set"},
        409: {"description": "the evaluation has not run yet"},
    },
)
def merge_evaluation(job_id: str, caller: Caller = ReaderDep, s: Session = SessionDep) -> Evaluation:
    """Each task's expert and merged scores, the retention and the ANP, and every compared method's; once
    the merge is evaluated (also for a job whose delivery failed and whose result is kept). A failed
    evaluation stage answers with its ``error`` (the merge itself was kept)."""
    job = _owned(s, caller, job_id)
    stored = _stored_result(job)
    evaluation = stored.evaluation if stored is not None else None
    if evaluation is not None:
        return Evaluation(**evaluation)
    if not spec.has_evaluation(job.spec):
        raise ApiError(404, "not_found", "the job's models carry no 'eval' set: nothing is evaluated")
    raise ApiError(409, "no_evaluation", f"the job is {job.status}: it has no evaluation yet")
