"""Run one job end to end: claim, resolve, merge, deliver, report. Shared by the Celery task and the
embedded worker; the database row is the only state, every write fenced on the claim.

Delivery is a stage of its own: a transient delivery failure is retried with backoff without merging
again, and a merged result that could not be delivered is kept (``keep_result_s``) for ``POST /retry``.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
import uuid
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from divmerge_core.config import MergeConfig
from divmerge_core.errors import DivMergeError, MergeCancelled, is_transient
from divmerge_core.io.paths import check_local_path
from divmerge_core.options import EngineOptions
from divmerge_core.progress import ProgressEvent, Reporter
from divmerge_service import jobs
from divmerge_service.config import Settings
from divmerge_service.contracts import JobProgress, JobResult, Metrics
from divmerge_service.db import is_unavailable, session_scope
from divmerge_service.models import JobStatus, Team, utcnow

from . import capacity, upload
from .bookkeeping import (
    DatabaseUnavailable,
    DeliveryJournal,
    drop_delivery,
    load_delivery,
    save_delivery,
    with_db,
)

log = logging.getLogger("divmerge.worker")


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class Outcome:
    status: str  # dropped | succeeded | failed | cancelled | retry | lost
    retry_in: float | None = None


class Lease:
    """Heartbeat thread: renews the lease and watches for a cancel request or a lost lease."""

    def __init__(self, settings: Settings, claim: jobs.Claim, time_left_s: float = float("inf")):
        self.settings, self.claim = settings, claim
        self.cancel = threading.Event()
        self.lost = threading.Event()
        self.timed_out = threading.Event()
        self.deadline = time.monotonic() + time_left_s  # the job's time limit (max_job_s)
        self.last_ok = time.monotonic()  # last time the lease was known renewed
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{claim.job_id[:8]}", daemon=True)

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_s):
            try:
                t = time.monotonic()
                with session_scope(self.settings.db_url) as s:
                    ours, cancel = jobs.heartbeat(s, self.claim, self.settings.lease_s)
                self.last_ok = t
                if cancel:
                    self.cancel.set()
                if not ours:
                    self.lost.set()
                    return
            except Exception as err:  # noqa: BLE001 - keep trying until the lease is surely gone
                log.warning("heartbeat failed for job %s: %s", self.claim.job_id, type(err).__name__)
                if time.monotonic() - self.last_ok > self.settings.lease_s:
                    self.lost.set()
                    return

    @property
    def expires(self) -> float:
        """The monotonic time the lease runs out unless renewed: writes are retried until then."""
        return self.last_ok + self.settings.lease_s

    def should_stop(self) -> bool:
        if time.monotonic() > self.deadline:
            self.timed_out.set()
        return self.cancel.is_set() or self.lost.is_set() or self.timed_out.is_set()


class ProgressWriter:
    """Writes progress to the job row: at every stage change (with a ``stage`` event) and otherwise at most
    every ``progress_interval_s``, with the step rate's ``eta_s`` and, for learned methods, the losses so far
    (the ``losses`` column: train losses) and the held-out measurements so far (``progress.heldout``: rows
    ``[epoch, step, mean, per-task ...]``, written at once when one arrives). The ``progress`` column holds a
    :class:`~divmerge_service.contracts.JobProgress` dump."""

    def __init__(self, settings: Settings, claim: jobs.Claim, lease: Lease):
        self.settings, self.claim, self.lease = settings, claim, lease
        self.losses: list[float] = []
        self.heldout: list[list[float | None]] = []
        self._heldout_dirty = False
        self._last = 0.0
        self._stage: str | None = None
        self._stage_t0 = time.monotonic()
        self._stage_step0 = 0
        self._losses_dirty = False

    def __call__(self, ev: ProgressEvent) -> None:
        if self.settings.step_delay_s:
            time.sleep(self.settings.step_delay_s)  # testing knob: makes tiny jobs long enough to interrupt
        if ev.stage == "done":
            return  # the runner ends the job, after the delivery
        if (
            ev.stage == "optimise"
            and ev.loss is not None
            and len(self.losses) < self.settings.max_stored_losses
        ):
            self.losses.append(ev.loss)
            self._losses_dirty = True
        if ev.stage == "optimise" and ev.heldout is not None:
            self.heldout.append(list(ev.heldout))
            self._heldout_dirty = True
        self.write(ev.stage, ev.step, ev.total, ev.loss)

    def progress(self, stage: str, step: int, total: int, loss: float | None = None) -> JobProgress:
        """The progress now (raises ValidationError for a stage that is not a
        :class:`~divmerge_service.contracts.Stage`)."""
        now = time.monotonic()
        if stage != self._stage:
            self._stage, self._stage_t0, self._stage_step0 = stage, now, step
        eta = None  # unknown until the stage has advanced past its first report
        if total and step >= total:
            eta = 0.0
        elif step > self._stage_step0:
            eta = round((now - self._stage_t0) / (step - self._stage_step0) * (total - step), 1)
        return JobProgress(
            stage=stage,  # type: ignore[arg-type]  # validated into a Stage
            step=step,
            total=total,
            loss=loss,
            eta_s=eta,
            updated_at=utcnow(),
            heldout=[list(r) for r in self.heldout] if self.heldout else None,
        )

    def write(
        self, stage: str, step: int = 0, total: int = 0, loss: float | None = None, **values: Any
    ) -> None:
        changed = stage != self._stage
        now = time.monotonic()
        if (
            not changed
            and not values
            and not self._heldout_dirty
            and now - self._last < self.settings.progress_interval_s
        ):
            return
        try:
            snapshot = self.progress(stage, step, total, loss)
        except ValidationError as err:  # a stage the contract does not know: never fail the merge for it
            log.warning(
                "job %s: progress %r does not fit JobProgress (%s); not written",
                self.claim.job_id,
                stage,
                err.errors()[0]["msg"],
            )
            return
        self._last, self._heldout_dirty = now, False
        values["progress"] = snapshot.model_dump(mode="json")
        if self._losses_dirty:
            values["losses"] = list(self.losses)
            self._losses_dirty = False
        try:
            with session_scope(self.settings.db_url) as s:
                if not jobs.update_running(s, self.claim, **values):
                    self.lease.lost.set()
                    return
                if changed:
                    jobs.add_event(s, self.claim.job_id, "stage", f"stage {stage}", stage=stage)
        except Exception as err:  # noqa: BLE001 - progress is best effort
            log.warning("progress write failed for job %s: %s", self.claim.job_id, type(err).__name__)


def retryable(err: BaseException) -> bool:
    """Transient: a database outage (:func:`divmerge_service.db.is_unavailable`) or what the engine's
    :func:`~divmerge_core.errors.is_transient` says (network, Hub 5xx and 429, by type and status)."""
    return is_unavailable(err) or is_transient(err)


def describe(err: BaseException) -> tuple[str, str]:
    """(code, message) for the job row: engine errors say it themselves; anything else stays vague."""
    if isinstance(err, DivMergeError):
        return err.code, str(err)
    return "internal_error", f"unexpected {type(err).__name__} in the worker"


@dataclass
class _Job:
    claim: jobs.Claim
    config: MergeConfig
    team: str
    settings: Settings
    lease: Lease
    progress: ProgressWriter
    devices: int = 1  # data-parallel devices: the job's devices_per_job, else the worker's setting


def run_job(job_id: str, settings: Settings, worker_id: str | None = None) -> Outcome:
    """Claim and run one job. While the database is unreachable the claim waits (up to ``db_wait_s``, then
    :class:`DatabaseUnavailable` is raised and the caller gives the message back)."""
    worker_id = worker_id or new_worker_id()
    patience = time.monotonic() + settings.db_wait_s

    def _claim(s):
        cap = settings.max_running_per_team
        if cap and jobs.team_at_capacity(s, job_id, cap):
            return "busy"
        got = jobs.claim(s, job_id, worker_id, lease_s=settings.lease_s, max_attempts=settings.max_attempts)
        return got if got is not None else jobs.due_in(s, job_id)

    claim = with_db(settings, f"claim of job {job_id}", _claim, patience)
    if claim == "busy":
        log.info(
            "job %s: its team already runs %d job(s); trying again later",
            job_id,
            settings.max_running_per_team,
        )
        return Outcome("retry", settings.retry_backoff_s)
    if isinstance(claim, float):  # the message came before the job's retry delay ran out
        log.info("job %s: not due for %.1fs; trying again then", job_id, claim)
        return Outcome("retry", claim)
    if claim is None:
        log.info("job %s: not claimable (running elsewhere, finished or cancelled); message dropped", job_id)
        return Outcome("dropped")
    log.info("job %s: claimed by %s (attempt %d)", job_id, worker_id, claim.attempt)

    def _load(s):
        job = jobs.load(s, job_id)
        assert job is not None
        team = s.get(Team, job.team_id).name
        return job.spec, team, job.kept, job.result, job.started_at, job.devices_per_job

    lease_end = time.monotonic() + settings.lease_s
    spec, team, kept, record, started, devices = with_db(settings, f"job {job_id}", _load, lease_end)
    journal = load_delivery(settings, job_id)
    if journal is not None:
        # delivered by an earlier attempt that could not record it (it died, or the database was down)
        def _record(s):
            jobs.update_running(s, claim, **journal.columns())
            jobs.finish(
                s,
                claim,
                JobStatus.SUCCEEDED,
                "recorded an earlier delivery",
                error_code=None,
                error_message=None,
            )

        with_db(settings, f"job {job_id}: recording an earlier delivery", _record, lease_end)
        drop_delivery(settings, job_id)
        log.info("job %s: delivered by an earlier attempt; recorded without merging again", job_id)
        return Outcome("succeeded")
    time_left = settings.max_job_s - (utcnow() - started).total_seconds() if started else settings.max_job_s
    with Lease(settings, claim, time_left) as lease:
        progress = ProgressWriter(settings, claim, lease)
        devices = devices or settings.devices_per_job
        ctx = _Job(claim, MergeConfig.model_validate(spec), team, settings, lease, progress, devices)
        progress.write("starting")
        try:
            kept_result = _kept_result(job_id, kept, record)
            if kept_result is not None:
                return _finish_delivery(ctx, Path(kept["path"]), kept_result)
            return _run_claimed(ctx)
        except DatabaseUnavailable as err:
            log.warning("job %s: %s until the lease ran out; the next attempt takes over", job_id, err)
            return Outcome("lost")


def _kept_result(job_id: str, kept: dict[str, Any] | None, record: dict[str, Any] | None) -> JobResult | None:
    """The result of a merge kept for ``POST /retry`` (None: nothing kept, or unreadable: merge again)."""
    if not (kept and record and Path(kept["path"]).is_dir()):
        return None
    try:
        return JobResult.model_validate(record)
    except ValidationError as err:
        log.warning("job %s: the kept result's record does not validate (%s); merging again", job_id, err)
        return None


def _run_claimed(ctx: _Job) -> Outcome:
    """Merge into this attempt's staging folder, then deliver it (:func:`_finish_delivery`).

    The staging folder is the only one: for a local destination a hidden sibling of it
    (``.<name>.divmerge-job-<id>-a<attempt>``), renamed into place once; for a Hub destination a folder of
    the attempt's scratch space, uploaded from there. The engine writes straight into it
    (``run_merge(staged=False)``); on a failure or a cancel it is removed, so nothing half-written stays.
    """
    from divmerge_core.io.output import check_output_dir
    from divmerge_core.pipeline import prepare, run_merge

    claim, config, settings, lease = ctx.claim, ctx.config, ctx.settings, ctx.lease
    options = settings.engine_options()
    scratch = _scratch(ctx)
    staged: Path | None = None
    try:
        _remove_leftovers(settings, claim.job_id)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plan = prepare(config, options, Reporter(ctx.progress, lease.should_stop))
            put_back = capacity.recheck(settings, plan, claim, ctx.devices) if config.method.learned else None
            if put_back is not None:
                return Outcome("retry", put_back)  # does not fit here: given back, attempt not counted
            _write(ctx, resolved=dict(plan.resolved))
            dest = _local_dest(config, claim.job_id, settings, options)
            staged = (
                (dest.parent / f".{dest.name}.divmerge-job-{claim.job_id}-a{claim.attempt}")
                if dest
                else scratch / "model"
            )
            if dest is not None:
                _remove_local_leftovers(dest, claim.job_id)
                if not _overwrite(config) and not upload.local_already_delivered(dest, claim.job_id):
                    check_output_dir(dest)  # fail fast (output_exists) before any work
            result = run_merge(
                config,
                staged,
                options=options,
                device=settings.device,
                progress=ctx.progress,
                should_stop=lease.should_stop,
                plan=plan,
                devices=ctx.devices,
                staged=False,  # ``staged`` is the one staging folder: written in place, renamed once
            )
        _record_warnings(ctx, caught)
        _record_evaluation(ctx, result.evaluation)
        if lease.lost.is_set():
            raise MergeCancelled("lease lost")
        record = JobResult(
            files=sorted(result.files),
            file_info=upload.file_info(staged),
            coefficients=result.coefficients,
            metrics=Metrics.model_validate(result.metrics),
            resolved=dict(result.resolved),
            evaluation=result.evaluation,
        )
    except MergeCancelled:
        upload.remove(scratch)
        upload.remove(staged)
        return _cancelled(ctx)
    except Exception as err:  # noqa: BLE001 - every failure ends in the job row, never as a traceback
        upload.remove(scratch)
        upload.remove(staged)
        code, message = describe(err)
        if not isinstance(err, DivMergeError):
            log.exception("job %s: unexpected error", claim.job_id)
        if retryable(err) and claim.attempt < settings.max_attempts:
            delay = settings.retry_backoff_s * 2 ** (claim.attempt - 1)
            with_db(
                settings,
                f"job {claim.job_id}: requeue",
                lambda s: jobs.requeue(s, claim, delay, code, message),
                lease.expires,
            )
            log.warning("job %s: transient %s, retry in %.1fs", claim.job_id, code, delay)
            return Outcome("retry", delay)
        return _failed(ctx, code, message)
    return _finish_delivery(ctx, staged, record)


def _finish_delivery(ctx: _Job, staged: Path, record: JobResult) -> Outcome:
    """Deliver a merged folder (retrying transient failures); keep it if it cannot be delivered."""
    claim, settings = ctx.claim, ctx.settings
    try:
        delivery = _deliver(ctx, staged)
    except MergeCancelled:
        upload.remove(staged)
        upload.remove(_scratch(ctx))
        return _cancelled(ctx, kept=None)
    except Exception as err:  # noqa: BLE001 - the merged result is kept whatever the delivery error
        code, message = describe(err)
        if not isinstance(err, DivMergeError):
            log.exception("job %s: unexpected delivery error", claim.job_id)
        return _keep(ctx, staged, record, code, message)
    journal = DeliveryJournal(
        result=record.model_copy(update={"destination": delivery, "resolved": None}),
        resolved=record.resolved,
        losses=list(ctx.progress.losses) or None,
    )
    values = journal.columns()
    save_delivery(settings, claim.job_id, journal)  # a later attempt records it, never merges again

    def _record(s):
        jobs.update_running(s, claim, **values)
        jobs.finish(
            s,
            claim,
            JobStatus.SUCCEEDED,
            f"delivered to {delivery.uri}",
            error_code=None,
            error_message=None,
            progress=ctx.progress.progress("done", 1, 1).model_dump(mode="json"),
        )

    with_db(settings, f"job {claim.job_id}: final write", _record, ctx.lease.expires)
    drop_delivery(settings, claim.job_id)
    upload.remove(staged)
    upload.remove(_scratch(ctx))
    log.info("job %s: succeeded -> %s", claim.job_id, delivery.uri)
    return Outcome("succeeded")


def _deliver(ctx: _Job, staged: Path) -> upload.Delivery:
    """Up to ``delivery_attempts`` tries; between them ``last_error`` shows the reason and the stage is
    ``upload_wait``. Non-transient errors are not retried."""
    config, settings, claim = ctx.config, ctx.settings, ctx.claim
    dest = _local_dest(config, claim.job_id, settings, settings.engine_options())
    for attempt in range(1, settings.delivery_attempts + 1):
        ctx.progress.write("upload", attempt - 1, settings.delivery_attempts)
        try:
            if dest is not None:
                return upload.deliver_local(staged, dest, claim.job_id, overwrite=_overwrite(config))
            assert config.output is not None and config.output.repo_id is not None
            uploader = upload.load_uploader(settings.hub_uploader, settings.hub_write_token(ctx.team))
            return upload.deliver_hub(
                staged,
                config.output.repo_id,
                private=config.output.private,
                job_id=claim.job_id,
                uploader=uploader,
            )
        except Exception as err:
            if not retryable(err) or attempt == settings.delivery_attempts:
                raise
            delay = min(settings.delivery_backoff_s * 2 ** (attempt - 1), settings.delivery_backoff_max_s)
            code, message = describe(err)
            log.warning(
                "job %s: delivery try %d failed (%s), next in %.1fs", claim.job_id, attempt, code, delay
            )
            ctx.progress.write(
                "upload_wait", attempt, settings.delivery_attempts, error_code=code, error_message=message
            )
            _event(
                ctx,
                "delivery_retry",
                f"delivery try {attempt} failed: {message}; next try in {delay:.0f}s",
                code=code,
                attempt=attempt,
                delay_s=delay,
            )
            if ctx.lease.cancel.wait(delay) or ctx.lease.lost.is_set():
                raise MergeCancelled() from None
    raise AssertionError("unreachable")


def _keep(ctx: _Job, staged: Path, record: JobResult, code: str, message: str) -> Outcome:
    """Move the merged folder to ``$DIVMERGE_HOME/kept/<job>`` and fail the job saying how to retry."""
    claim, settings = ctx.claim, ctx.settings
    kept = settings.home / "kept" / claim.job_id
    if staged != kept:
        upload.remove(kept)
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staged), str(kept))
    upload.remove(_scratch(ctx))
    until = utcnow() + timedelta(seconds=settings.keep_result_s)
    note = (
        f"{message} (the merged result is kept until {until:%Y-%m-%d %H:%M} UTC: "
        f"POST /v1/merges/{claim.job_id}/retry delivers it again)"
    )
    _write(ctx, kept={"path": str(kept), "until": until.isoformat()}, result=record.model_dump(mode="json"))
    _event(ctx, "kept", f"merged result kept until {until.isoformat()}", until=until.isoformat())
    log.info("job %s: delivery failed (%s); result kept", claim.job_id, code)
    return _failed(ctx, code, note)


def _failed(ctx: _Job, code: str, message: str) -> Outcome:
    _finish(ctx, JobStatus.FAILED, f"failed: {code}", error_code=code, error_message=message[:2000])
    log.info("job %s: failed (%s)", ctx.claim.job_id, code)
    return Outcome("failed")


def _cancelled(ctx: _Job, **values: Any) -> Outcome:
    """The merge or delivery stopped: the job's time limit, a lost lease, or a cancel request."""
    if ctx.lease.timed_out.is_set():
        message = f"the job ran longer than the limit of {ctx.settings.max_job_s:g} s"
        return _failed(ctx, "timeout", message)
    if ctx.lease.lost.is_set() and not ctx.lease.cancel.is_set():
        log.warning("job %s: lease lost; leaving the job to its new owner", ctx.claim.job_id)
        return Outcome("lost")
    _finish(ctx, JobStatus.CANCELLED, "cancelled", error_code=None, error_message=None, **values)
    log.info("job %s: cancelled", ctx.claim.job_id)
    return Outcome("cancelled")


def _record_warnings(ctx: _Job, caught: list[warnings.WarningMessage], limit: int = 20) -> None:
    """The engine's warnings during the merge become ``warning`` events (the first ``limit``, deduplicated)."""
    seen = list(dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught))[:limit]
    for text in seen:
        _event(ctx, "warning", text[:1000])


def _record_evaluation(ctx: _Job, evaluation: dict[str, Any] | None) -> None:
    """An ``evaluated`` event with the ANP, or an ``evaluation_failed`` one (the merge is kept either way)."""
    if evaluation is None:
        return
    if evaluation.get("error"):
        _event(
            ctx,
            "evaluation_failed",
            f"the evaluation failed (the merge is kept): {evaluation['error']}"[:1000],
        )
        return
    anp, selected = evaluation.get("anp"), evaluation.get("selected")
    shown = "n/a" if anp is None else f"{anp:.1f}"
    _event(ctx, "evaluated", f"ANP {shown} ({selected})", anp=anp, selected=selected)


def _scratch(ctx: _Job) -> Path:
    """This attempt's temp folder (Hub outputs are staged in it)."""
    return ctx.settings.home / "tmp" / f"{ctx.claim.job_id}-a{ctx.claim.attempt}"


def _overwrite(config: MergeConfig) -> bool:
    return config.output is not None and config.output.overwrite


def _write(ctx: _Job, **values: Any) -> None:
    """One write on the job we hold, retried through a database outage until the lease would expire."""
    claim = ctx.claim
    with_db(
        ctx.settings,
        f"job {claim.job_id}",
        lambda s: jobs.update_running(s, claim, **values),
        ctx.lease.expires,
    )


def _finish(ctx: _Job, status: JobStatus, message: str, **values: Any) -> None:
    """The job's final write (retried like :func:`_write`)."""
    claim = ctx.claim

    def write(s):
        jobs.finish(s, claim, status, message, **values)

    with_db(ctx.settings, f"job {claim.job_id}: final write", write, ctx.lease.expires)


def _event(ctx: _Job, kind: str, message: str, **data: Any) -> None:
    """Append to the job's history (best effort: an event is never worth failing the job)."""
    try:
        with session_scope(ctx.settings.db_url) as s:
            jobs.add_event(s, ctx.claim.job_id, kind, message, **data)
    except Exception as err:  # noqa: BLE001
        log.warning("event write failed for job %s: %s", ctx.claim.job_id, type(err).__name__)


def _local_dest(config: MergeConfig, job_id: str, settings: Settings, options: EngineOptions) -> Path | None:
    """The local output directory (None for Hub outputs); default $DIVMERGE_HOME/outputs/<job id>."""
    if config.output is not None and config.output.repo_id is not None:
        return None
    raw = config.output.path if config.output is not None and config.output.path else None
    if raw is None:
        return settings.home / "outputs" / job_id
    return check_local_path(raw, options.local_roots, "output path")


def _remove_local_leftovers(dest: Path, job_id: str) -> None:
    """Staging folders an interrupted attempt (a killed worker) left next to the local destination."""
    if dest.parent.is_dir():
        for p in dest.parent.glob(f".{dest.name}.divmerge-job-{job_id}-*"):
            upload.remove(p)


def _remove_leftovers(settings: Settings, job_id: str) -> None:
    """Scratch space of earlier attempts of this job (a worker killed mid-job leaves it behind)."""
    tmp = settings.home / "tmp"
    if tmp.is_dir():
        for p in tmp.glob(f"{job_id}-a*"):
            upload.remove(p)


def purge_kept(settings: Settings) -> int:
    """Delete kept results whose ``keep_result_s`` has passed (the reconciler and embedded worker call it)."""
    with session_scope(settings.db_url) as s:
        paths = jobs.expired_kept(s)
    for p in paths:
        upload.remove(Path(p))
    return len(paths)
