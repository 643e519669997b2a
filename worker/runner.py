"""Run one job end to end: claim, resolve, merge, deliver, report. Shared by the Celery task and the
embedded worker; the database row is the only state, every write fenced on the claim."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from api import crud
from api.core.config import Settings
from api.db import is_unavailable, session_scope
from api.models import Team, utcnow
from divmerge_core.config import MergeConfig
from divmerge_core.errors import DivMergeError, MergeCancelled
from divmerge_core.options import EngineOptions
from divmerge_core.paths import check_local_path
from divmerge_core.progress import ProgressEvent, Reporter

from . import upload
from .bookkeeping import DatabaseUnavailable, drop_delivery, load_delivery, save_delivery, with_db

log = logging.getLogger("divmerge.worker")


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class Outcome:
    status: str  # dropped | succeeded | failed | cancelled | retry | lost
    retry_in: float | None = None


class Lease:
    """Heartbeat thread: renews the lease and watches for a cancel request or a lost lease."""

    def __init__(self, settings: Settings, claim: crud.Claim, time_left_s: float = float("inf")):
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
                    ours, cancel = crud.heartbeat(s, self.claim, self.settings.lease_s)
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
    """Writes progress to the job row, at most every ``progress_interval_s``."""

    def __init__(self, settings: Settings, claim: crud.Claim, lease: Lease):
        self.settings, self.claim, self.lease = settings, claim, lease
        self._last = 0.0

    def __call__(self, ev: ProgressEvent) -> None:
        if self.settings.step_delay_s:
            time.sleep(self.settings.step_delay_s)  # testing knob: makes tiny jobs long enough to interrupt
        now = time.monotonic()
        if now - self._last < self.settings.progress_interval_s and ev.stage != "done":
            return
        self._last = now
        progress = {
            "stage": ev.stage,
            "step": ev.step,
            "total_steps": ev.total,
            "loss": ev.loss,
            "updated_at": utcnow().isoformat(),
        }
        try:
            with session_scope(self.settings.db_url) as s:
                if not crud.update_running(s, self.claim, progress=progress):
                    self.lease.lost.set()
        except Exception as err:  # noqa: BLE001 - progress is best effort
            log.warning("progress write failed for job %s: %s", self.claim.job_id, type(err).__name__)


def is_transient(err: BaseException) -> bool:
    if is_unavailable(err):
        return True
    if isinstance(err, DivMergeError):
        return err.transient
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(status, int):
        return status >= 500 or status == 429
    return type(err).__module__.split(".")[0] in ("requests", "httpx", "urllib3", "redis")


def run_job(job_id: str, settings: Settings, worker_id: str | None = None) -> Outcome:
    """Claim and run one job. While the database is unreachable the claim waits (up to ``db_wait_s``, then
    :class:`DatabaseUnavailable` is raised and the caller gives the message back)."""
    worker_id = worker_id or new_worker_id()
    patience = time.monotonic() + settings.db_wait_s

    def _claim(s):
        cap = settings.max_running_per_team
        if cap and crud.team_at_capacity(s, job_id, cap):
            return "busy"
        return crud.claim(s, job_id, worker_id, lease_s=settings.lease_s, max_attempts=settings.max_attempts)

    claim = with_db(settings, f"claim of job {job_id}", _claim, patience)
    if claim == "busy":
        log.info(
            "job %s: its team already runs %d job(s); trying again later",
            job_id,
            settings.max_running_per_team,
        )
        return Outcome("retry", settings.retry_backoff_s)
    if claim is None:
        log.info("job %s: not claimable (running elsewhere, finished or cancelled); message dropped", job_id)
        return Outcome("dropped")
    log.info("job %s: claimed by %s (attempt %d)", job_id, worker_id, claim.attempt)

    def _load(s):
        job = crud.load(s, job_id)
        assert job is not None
        return job.spec, s.get(Team, job.team_id).name, (job.upload, job.result), job.started_at

    lease_end = time.monotonic() + settings.lease_s
    spec, team, done, started = with_db(settings, f"job {job_id}", _load, lease_end)
    journal = load_delivery(settings, job_id)
    if (done[0] is not None and done[1] is not None) or journal is not None:
        # delivered by an earlier attempt that could not record it (it died, or the database was down)
        def _record(s):
            crud.update_running(s, claim, **(journal or {}))
            crud.finish(s, claim, "succeeded", error_code=None, error_message=None)

        with_db(settings, f"job {job_id}: recording an earlier delivery", _record, lease_end)
        drop_delivery(settings, job_id)
        log.info("job %s: delivered by an earlier attempt; recorded without merging again", job_id)
        return Outcome("succeeded")
    time_left = settings.max_job_s - (utcnow() - started).total_seconds() if started else settings.max_job_s
    with Lease(settings, claim, time_left) as lease:
        return _run_claimed(claim, MergeConfig.model_validate(spec), team, settings, lease)


def _run_claimed(
    claim: crud.Claim, config: MergeConfig, team: str, settings: Settings, lease: Lease
) -> Outcome:
    from divmerge_core.output import check_output_dir
    from divmerge_core.pipeline import prepare, run_merge

    options = EngineOptions(
        allow_pickle=settings.allow_pickle,
        local_roots=settings.roots,
        hf_token=settings.hf_token.get_secret_value() if settings.hf_token else None,
        cache_dir=settings.hf_cache_dir,
        teacher_cache_dir=settings.teacher_cache,
        teacher_cache_bytes=settings.teacher_cache_bytes,
    )
    progress = ProgressWriter(settings, claim, lease)
    scratch = settings.home / "tmp" / f"{claim.job_id}-a{claim.attempt}"
    staged: Path | None = None
    try:
        _remove_leftovers(settings, claim.job_id)
        plan = prepare(config, options, Reporter(progress, lease.should_stop))
        _write(settings, claim, lease, resolved=dict(plan.resolved))
        dest = _local_dest(config, claim.job_id, settings, options)
        staged = (
            (dest.parent / f".{dest.name}.divmerge-job-{claim.job_id}-a{claim.attempt}")
            if dest
            else scratch / "model"
        )
        if dest is not None:
            _remove_local_leftovers(dest, claim.job_id)
            if not upload.local_already_delivered(dest, claim.job_id):
                check_output_dir(dest)  # fail fast (output_exists) before any work
        result = run_merge(
            config,
            staged,
            options=options,
            device=settings.device,
            progress=progress,
            should_stop=lease.should_stop,
            plan=plan,
            devices=settings.devices_per_job,
        )
        if lease.lost.is_set():
            raise MergeCancelled("lease lost")
        if dest is not None:
            delivery = upload.deliver_local(staged, dest, claim.job_id)
        else:
            assert config.output is not None and config.output.repo_id is not None
            uploader = upload.load_uploader(settings.hub_uploader, settings.hub_write_token(team))
            delivery = upload.deliver_hub(
                staged,
                config.output.repo_id,
                private=config.output.private,
                job_id=claim.job_id,
                uploader=uploader,
            )
        record: dict[str, Any] = {
            "destination": delivery.destination,
            "revision": delivery.revision,
            "commit": delivery.commit,
            "files": sorted(result.files),
            "coefficients": result.coefficients,
            "metrics": result.metrics,
        }
        values = {"resolved": dict(result.resolved), "upload": vars(delivery), "result": record}
        save_delivery(settings, claim.job_id, values)  # a later attempt records it, never merges again
        _finish(settings, claim, lease, "succeeded", error_code=None, error_message=None, **values)
        drop_delivery(settings, claim.job_id)
        log.info("job %s: succeeded -> %s", claim.job_id, delivery.destination)
        return Outcome("succeeded")
    except DatabaseUnavailable as err:
        log.warning("job %s: %s until the lease ran out; the next attempt takes over", claim.job_id, err)
        return Outcome("lost")
    except MergeCancelled:
        if lease.timed_out.is_set():
            message = f"the job ran longer than the limit of {settings.max_job_s:g} s"
            _finish(settings, claim, lease, "failed", error_code="timeout", error_message=message)
            log.info("job %s: failed (timeout)", claim.job_id)
            return Outcome("failed")
        if lease.lost.is_set() and not lease.cancel.is_set():
            log.warning("job %s: lease lost; leaving the job to its new owner", claim.job_id)
            return Outcome("lost")
        _finish(settings, claim, lease, "cancelled", error_code=None, error_message=None)
        log.info("job %s: cancelled", claim.job_id)
        return Outcome("cancelled")
    except Exception as err:  # noqa: BLE001 - every failure ends in the job row, never as a traceback
        code = err.code if isinstance(err, DivMergeError) else "internal_error"
        message = (
            str(err) if isinstance(err, DivMergeError) else f"unexpected {type(err).__name__} in the worker"
        )
        if not isinstance(err, DivMergeError):
            log.exception("job %s: unexpected error", claim.job_id)
        if is_transient(err) and claim.attempt < settings.max_attempts:
            delay = settings.retry_backoff_s * 2 ** (claim.attempt - 1)
            with_db(
                settings,
                f"job {claim.job_id}: requeue",
                lambda s: crud.requeue(s, claim, delay, code, message),
                lease.expires,
            )
            log.warning("job %s: transient %s, retry in %.1fs", claim.job_id, code, delay)
            return Outcome("retry", delay)
        _finish(settings, claim, lease, "failed", error_code=code, error_message=message[:2000])
        log.info("job %s: failed (%s)", claim.job_id, code)
        return Outcome("failed")
    finally:
        upload.remove(scratch)
        if staged is not None and staged != scratch / "model":
            upload.remove(staged)


def _write(settings: Settings, claim: crud.Claim, lease: Lease, **values: Any) -> None:
    """One write on the job we hold, retried through a database outage until the lease would expire."""
    with_db(settings, f"job {claim.job_id}", lambda s: crud.update_running(s, claim, **values), lease.expires)


def _finish(settings: Settings, claim: crud.Claim, lease: Lease, status: str, **values: Any) -> None:
    """The job's final write (retried like :func:`_write`)."""

    def write(s):
        crud.finish(s, claim, status, **values)

    with_db(settings, f"job {claim.job_id}: final write", write, lease.expires)


def _local_dest(config: MergeConfig, job_id: str, settings: Settings, options: EngineOptions) -> Path | None:
    """The local output directory (None for Hub outputs); default $DIVMERGE_HOME/outputs/<job id>."""
    if config.output is not None and config.output.repo_id is not None:
        return None
    raw = config.output.path if config.output is not None and config.output.path else None
    if raw is None:
        return settings.home / "outputs" / job_id
    return check_local_path(raw, options.local_roots, "output path")


def _remove_local_leftovers(dest: Path, job_id: str) -> None:
    """Staging folders an interrupted attempt left next to the local destination (ours and the engine's)."""
    if dest.parent.is_dir():
        for p in dest.parent.glob(f".*{dest.name}.divmerge-job-{job_id}-a*"):
            upload.remove(p)


def _remove_leftovers(settings: Settings, job_id: str) -> None:
    """Scratch space of earlier attempts of this job (a worker killed mid-job leaves it behind)."""
    tmp = settings.home / "tmp"
    if tmp.is_dir():
        for p in tmp.glob(f"{job_id}-a*"):
            upload.remove(p)
