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
from api.db import session_scope
from api.models import Team, utcnow
from divmerge_core.config import MergeConfig
from divmerge_core.errors import DivMergeError, MergeCancelled
from divmerge_core.options import EngineOptions
from divmerge_core.progress import ProgressEvent, Reporter
from divmerge_core.refs import check_local_path

from . import upload

log = logging.getLogger("divmerge.worker")


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class Outcome:
    status: str  # dropped | succeeded | failed | cancelled | retry | lost
    retry_in: float | None = None


class Lease:
    """Heartbeat thread: renews the lease and watches for a cancel request or a lost lease."""

    def __init__(self, settings: Settings, claim: crud.Claim):
        self.settings, self.claim = settings, claim
        self.cancel = threading.Event()
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{claim.job_id[:8]}", daemon=True)

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        last_ok = time.monotonic()
        while not self._stop.wait(self.settings.heartbeat_s):
            try:
                with session_scope(self.settings.db_url) as s:
                    ours, cancel = crud.heartbeat(s, self.claim, self.settings.lease_s)
                last_ok = time.monotonic()
                if cancel:
                    self.cancel.set()
                if not ours:
                    self.lost.set()
                    return
            except Exception as err:  # noqa: BLE001 - keep trying until the lease is surely gone
                log.warning("heartbeat failed for job %s: %s", self.claim.job_id, type(err).__name__)
                if time.monotonic() - last_ok > self.settings.lease_s:
                    self.lost.set()
                    return

    def should_stop(self) -> bool:
        return self.cancel.is_set() or self.lost.is_set()


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
    if isinstance(err, DivMergeError):
        return err.transient
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(status, int):
        return status >= 500 or status == 429
    return type(err).__module__.split(".")[0] in ("requests", "httpx", "urllib3", "redis")


def run_job(job_id: str, settings: Settings, worker_id: str | None = None) -> Outcome:
    worker_id = worker_id or new_worker_id()
    with session_scope(settings.db_url) as s:
        claim = crud.claim(s, job_id, worker_id, lease_s=settings.lease_s, max_attempts=settings.max_attempts)
    if claim is None:
        log.info("job %s: not claimable (running elsewhere, finished or cancelled); message dropped", job_id)
        return Outcome("dropped")
    log.info("job %s: claimed by %s (attempt %d)", job_id, worker_id, claim.attempt)
    with session_scope(settings.db_url) as s:
        job = crud.load(s, job_id)
        assert job is not None
        spec, team, done = job.spec, s.get(Team, job.team_id).name, (job.upload, job.result)
    if done[0] is not None and done[1] is not None:  # delivered by an earlier attempt that then died
        with session_scope(settings.db_url) as s:
            crud.finish(s, claim, "succeeded", error_code=None, error_message=None)
        return Outcome("succeeded")
    with Lease(settings, claim) as lease:
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
        _write(settings, claim, resolved=dict(plan.resolved))
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
        with session_scope(settings.db_url) as s:
            crud.update_running(
                s, claim, resolved=dict(result.resolved), upload=vars(delivery), result=record
            )
            crud.finish(s, claim, "succeeded", error_code=None, error_message=None)
        log.info("job %s: succeeded -> %s", claim.job_id, delivery.destination)
        return Outcome("succeeded")
    except MergeCancelled:
        if lease.lost.is_set() and not lease.cancel.is_set():
            log.warning("job %s: lease lost; leaving the job to its new owner", claim.job_id)
            return Outcome("lost")
        with session_scope(settings.db_url) as s:
            crud.finish(s, claim, "cancelled", error_code=None, error_message=None)
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
            with session_scope(settings.db_url) as s:
                crud.requeue(s, claim, delay, code, message)
            log.warning("job %s: transient %s, retry in %.1fs", claim.job_id, code, delay)
            return Outcome("retry", delay)
        with session_scope(settings.db_url) as s:
            crud.finish(s, claim, "failed", error_code=code, error_message=message[:2000])
        log.info("job %s: failed (%s)", claim.job_id, code)
        return Outcome("failed")
    finally:
        upload.remove(scratch)
        if staged is not None and staged != scratch / "model":
            upload.remove(staged)


def _write(settings: Settings, claim: crud.Claim, **values: Any) -> None:
    with session_scope(settings.db_url) as s:
        crud.update_running(s, claim, **values)


def _local_dest(config: MergeConfig, job_id: str, settings: Settings, options: EngineOptions) -> Path | None:
    """The local output directory (None for Hub outputs); default $DIVMERGE_HOME/outputs/<job id>."""
    if config.output is not None and config.output.repo_id is not None:
        return None
    raw = config.output.path if config.output is not None and config.output.path else None
    if raw is None:
        return settings.home / "outputs" / job_id
    raw = raw[len("file://") :] if raw.startswith("file://") else raw
    return check_local_path(Path(raw), options, "output path")


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
