"""Response bodies of the v1 API.

A job's ``progress`` and ``result`` are read from the workers' blobs through their contracts
(:mod:`divmerge_service.contracts`, via :func:`divmerge_api.crud.stored_progress` / ``stored_result``) and
turned into the public shapes below, which are unchanged (``result.destination`` is still ``hf://<repo_id>``
or the local directory). A blob that does not validate is logged and served as null; the rest of the job is
served as usual.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from divmerge_service import contracts
from divmerge_service.contracts import Stage
from divmerge_service.models import Job, JobEvent, JobStatus, utcnow

from . import crud

log = logging.getLogger("divmerge.api")

#: The job statuses (:class:`divmerge_service.models.JobStatus`).
Status = JobStatus


class Progress(BaseModel):
    stage: Stage | None = Field(
        None,
        description="queued, starting, resolve, validate, eval_data, data, teacher, optimise, write, "
        "compare (a compared method's merge), evaluate, upload, upload_wait (a delivery retry is "
        "pending), done",
    )
    step: int | None = None
    total: int | None = None
    total_steps: int | None = Field(None, description="same as total (kept for older clients)")
    loss: float | None = None
    elapsed_s: float | None = Field(None, description="seconds since the job started (until it finished)")
    eta_s: float | None = Field(
        None, description="seconds left in this stage at its step rate; null if unknown"
    )
    updated_at: datetime | None = None
    heldout: list[list[float | None]] | None = Field(
        None,
        description="learned methods: the held-out rows so far, [epoch, step, mean, per-task ...] (as in "
        "/coefficients); null when nothing is held out",
    )


class JobError(BaseModel):
    code: str
    message: str


class KeptResult(BaseModel):
    until: datetime = Field(description="the merged result is kept until then; POST /retry re-delivers it")


class TaskEvaluation(BaseModel):
    metric: Literal["accuracy", "js_retention"]
    n: int = Field(description="examples scored")
    source: str | None = Field(None, description="the eval set: dataset id, file, or 'inline'")
    expert: float = Field(description="the task's expert (accuracy, or 1 for js_retention)")
    merged: float = Field(description="the output merge")
    base: float | None = Field(None, description="the base model (with evaluation.base)")
    unparsed: float = Field(0.0, description="causal LMs: share of the merge's answers with no answer word")
    expert_unparsed: float | None = None
    js: float | None = Field(None, description="js_retention: mean JS divergence to the expert (nats)")
    retained: float | None = Field(None, description="100 x merged / expert")
    sample_answers: list[str] | None = Field(None, description="causal LMs: a few of the merge's answers")


class ComparedTask(BaseModel):
    merged: float | None
    retained: float | None
    unparsed: float | None = None
    js: float | None = None


class ComparedMerge(BaseModel):
    label: str = Field(description="the method's name (numbered when it is compared more than once)")
    method: str
    parameters: dict[str, Any] = {}
    tasks: dict[str, ComparedTask]
    anp: float | None
    anp_ci95: list[float] | None = None


class Evaluation(BaseModel):
    """``evaluation.json``: how much of each expert the merge keeps (or ``error`` when the stage failed)."""

    metric: str | None = Field(None, description="accuracy, js_retention or mixed")
    kind: str | None = Field(None, description="classification or causal")
    method: str | None = Field(None, description="the method whose merge is the output")
    tasks: dict[str, TaskEvaluation] = {}
    anp: float | None = Field(
        None, description="mean retained over the tasks (average normalised performance)"
    )
    anp_ci95: list[float] | None = Field(None, description="95% bootstrap interval of the ANP")
    selected: str | None = Field(None, description="label of the output merge among 'compare'")
    select: str | None = None
    compare: list[ComparedMerge] = Field([], description="every merge scored, the job's own first")
    warnings: list[str] = []
    expert_cache: dict[str, int] | None = None
    wall_s: float | None = None
    error: str | None = Field(None, description="why the evaluation failed (the merge itself is kept)")
    code: str | None = None
    field: str | None = None


class JobResult(BaseModel):
    destination: str = Field(description="hf://<repo_id> or the local output directory")
    revision: str | None = Field(None, description="branch uploaded to (Hub)")
    commit: str | None = Field(None, description="upload commit oid (Hub)")
    files: list[str] = []
    coefficients: dict[str, Any] | None = None
    metrics: dict[str, Any] = {}
    evaluation: Evaluation | None = None


#: A webhook event (:data:`divmerge_service.webhooks.EVENTS`).
WebhookEvent = Literal["succeeded", "failed", "cancelled", "kept"]


class Notify(BaseModel):
    """A webhook: POST a signed JSON body to ``url`` when the job ends with one of ``events``."""

    model_config = {"extra": "forbid"}
    url: str = Field(
        max_length=2000,
        description="http(s) URL whose host is on the server's DIVMERGE_WEBHOOK_ALLOWED_HOSTS; no user:password@",
    )
    events: list[WebhookEvent] | None = Field(
        None,
        min_length=1,
        description="succeeded, failed, cancelled, kept (a failed delivery whose merged result is kept for "
        "POST /retry; sent beside failed); null: all of them",
    )


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
    last_error: JobError | None = Field(
        None, description="the reason of the failure, or of the retry the job is waiting for"
    )
    kept: KeptResult | None = None
    result: JobResult | None = None
    cancel_requested: bool = False
    notify: Notify | None = Field(None, description="the job's own webhook (the team's applies if null)")
    devices_per_job: int | None = Field(
        None, description="data-parallel devices (null: the worker's setting)"
    )

    @classmethod
    def of(cls, job: Job) -> JobOut:
        error = last = None
        if job.error_code:
            last = JobError(code=job.error_code, message=job.error_message or "")
            if job.status == JobStatus.FAILED:
                error = last
        return cls(
            id=job.id,
            status=job.status,  # type: ignore[arg-type]
            queue=job.queue,
            attempts=job.attempts,
            progress=_progress(job),
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            spec=job.spec,
            resolved=job.resolved,
            error=error,
            last_error=last,
            kept=KeptResult(until=job.kept["until"]) if job.kept else None,
            result=_result(job),
            cancel_requested=job.cancel_requested,
            notify=Notify(**job.notify) if job.notify else None,
            devices_per_job=job.devices_per_job,
        )


class JobList(BaseModel):
    items: list[JobOut]
    next_cursor: str | None = Field(None, description="pass as ?cursor= for the next (older) page")


def _progress(job: Job) -> Progress | None:
    """The job's progress (null, logged, if the stored blob does not validate as JobProgress)."""
    # a queued job (new, or back for another attempt) shows "queued", not the stage its last attempt reached
    if job.status == JobStatus.QUEUED or not job.progress:
        p: dict[str, Any] = {"stage": Stage.QUEUED}
    else:
        try:
            stored = crud.stored_progress(job)
        except crud.MalformedBlob:
            return None
        assert stored is not None
        p = stored.model_dump()
    if job.started_at is not None:
        end = job.finished_at or utcnow()
        p["elapsed_s"] = round((end - job.started_at).total_seconds(), 1)
    if job.status != JobStatus.RUNNING:
        p["eta_s"] = None
    return Progress(**{k: v for k, v in p.items() if k in Progress.model_fields})


def _result(job: Job) -> JobResult | None:
    """A succeeded job's result in its public shape (null, logged, if the stored blob does not validate as
    JobResult, names no destination, or holds an evaluation the public schema refuses)."""
    if job.status != JobStatus.SUCCEEDED or not job.result:
        return None
    try:
        stored = crud.stored_result(job)
    except crud.MalformedBlob:
        return None
    assert stored is not None
    if stored.destination is None:
        log.warning("job %s: succeeded, but its stored result names no destination; served as null", job.id)
        return None
    try:
        return public_result(stored)
    except ValidationError as err:
        log.warning("job %s: its stored result does not fit the response (%s); served as null", job.id, err)
        return None


def public_result(stored: contracts.JobResult) -> JobResult:
    """The HTTP shape of a delivered result: the destination as one string (``hf://<repo_id>`` or the
    directory) with the Hub's ``revision`` and ``commit`` beside it, as before the contract existed."""
    assert stored.destination is not None
    hub = stored.hub
    return JobResult(
        destination=stored.destination.uri,
        revision=hub.revision if hub else None,
        commit=hub.commit if hub else None,
        files=list(stored.files),
        coefficients=stored.coefficients,
        metrics=stored.metrics.model_dump(mode="json", exclude_unset=True),
        evaluation=Evaluation.model_validate(stored.evaluation) if stored.evaluation is not None else None,
    )


class EventOut(BaseModel):
    at: datetime
    kind: str = Field(description="submitted, claimed, stage, retry, delivery_retry, warning, kept, ...")
    message: str
    data: dict[str, Any] = {}

    @classmethod
    def of(cls, ev: JobEvent) -> EventOut:
        return cls(at=ev.at, kind=ev.kind, message=ev.message, data=ev.data or {})


class EventList(BaseModel):
    events: list[EventOut]


class FileOut(BaseModel):
    name: str
    size: int
    sha256: str


class HubLocation(BaseModel):
    repo_id: str
    commit: str | None


class FileList(BaseModel):
    files: list[FileOut]
    hub: HubLocation | None = Field(None, description="Hub outputs: the repo and the upload commit")


class Coefficients(BaseModel):
    groups: list[str] = Field(description="parameter groups (empty until the merge is done)")
    tasks: list[str]
    values: list[list[float]] | None = Field(None, description="[group][task]; null until the merge is done")
    losses: list[float] = Field(description="the (training) loss at each optimisation step so far")
    heldout: list[list[float | None]] = Field(
        default_factory=list,
        description="the objective on each task's held-out inputs, before the first step and after each "
        "epoch so far: rows [epoch, step, mean, value of task 0, task 1, ...] (a task's value is null when "
        "it holds no input out); empty when nothing is held out",
    )
    heldout_inputs: list[int] | None = Field(None, description="per task, its inputs held out (once done)")
    best_epoch: int | None = Field(
        None, description="the epoch whose coefficients were kept (lowest held-out value; once done)"
    )
    converged: bool | None = Field(
        None, description="whether the held-out value stopped improving before the end (once done)"
    )
    stopped_early: bool | None = Field(None, description="whether patience ended the run early (once done)")
    steps: int | None = Field(None, description="optimisation steps run (once done)")
    planned_steps: int | None = Field(None, description="epochs x steps per epoch (once done)")


class Problem(BaseModel):
    code: str
    message: str
    field: str | None = None


class ValidationReport(BaseModel):
    ok: bool
    problems: list[Problem]
    estimate: dict[str, Any] | None = None


# --- tokens, teams and the audit log (divmerge_api.routers.tokens)

#: A scope: ``read`` (GET routes), ``submit`` (also submit, cancel, retry, validate; list and revoke the
#: team's tokens), ``admin`` (also the /v1/admin routes). Each implies the weaker ones.
Scope = Literal["read", "submit", "admin"]
#: Longest lifetime a token can be given over HTTP: 366 days.
MAX_EXPIRES_IN_S = 366 * 24 * 3600
_TEAM_NAME = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="1-64 of A-Z a-z 0-9 . _ -")


class TeamCreate(BaseModel):
    model_config = {"extra": "forbid"}
    name: str = _TEAM_NAME


class TeamOut(BaseModel):
    id: int
    name: str
    created_at: datetime


class TeamList(BaseModel):
    items: list[TeamOut]


class TokenCreate(BaseModel):
    model_config = {"extra": "forbid"}
    team: str = _TEAM_NAME
    scopes: list[Scope] = Field(default_factory=lambda: ["read", "submit"], min_length=1, max_length=3)
    expires_in_s: int | None = Field(
        None, ge=60, le=MAX_EXPIRES_IN_S, description="lifetime in seconds (60 s to 366 days); null: never"
    )


class TokenOut(BaseModel):
    """A token as listed: never its plaintext nor its hash."""

    id: str
    team: str
    scopes: list[Scope]
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None = Field(None, description="updated on use, at most once a minute")
    revoked_at: datetime | None


class TokenCreated(TokenOut):
    token: str = Field(description="the plaintext token: shown once, only its sha256 is stored")


class TokenList(BaseModel):
    items: list[TokenOut]


class AuditOut(BaseModel):
    id: int
    at: datetime
    action: Literal[
        "team_created",
        "token_created",
        "token_revoked",
        "webhook_set",
        "webhook_cleared",
        "webhook_secret_rotated",
    ]
    actor: str = Field(
        description="the acting token's id and team, or `cli` (`divmerge token` on the server)"
    )
    actor_token_id: str | None
    team: str | None
    token_id: str | None
    data: dict[str, Any]


class AuditList(BaseModel):
    items: list[AuditOut]
    next_before: int | None = Field(None, description="pass as `before` for the next (older) page")


class TeamWebhookSet(BaseModel):
    """A team's default webhook (a job's own ``notify`` overrides it)."""

    model_config = {"extra": "forbid"}
    url: str = Field(max_length=2000, description="as Notify.url")
    events: list[WebhookEvent] | None = Field(None, min_length=1, description="null: all of them")


class TeamWebhookOut(BaseModel):
    team: str
    url: str | None = Field(None, description="the team's default webhook URL (null: none)")
    events: list[WebhookEvent] = []
    has_secret: bool = Field(description="whether a signing secret exists (it is never shown again)")
    secret_created_at: datetime | None = None


class WebhookSecretCreated(BaseModel):
    team: str
    secret: str = Field(
        description="the HMAC-SHA256 key of the team's webhooks: shown once; the previous one stops signing"
    )
    created_at: datetime
