"""Submit-time dispatch by capability (``DIVMERGE_DISPATCH=capability``; docs/service.md#scheduling-by-capability):
a learned job's memory estimate (``python -m divmerge_core.dryrun`` in its ``placements`` mode, a subprocess
with a time limit: the API never imports torch) is matched against the live workers' classes
(:func:`divmerge_service.workers.route`). No class fits: 422 ``insufficient_memory``; else the job goes to
the queue of the smallest class that fits it.

Nothing is refused when no worker is registered (live) at all: workers may start later, and the claim-time
recheck still keeps the job off a worker that cannot hold it. Nor when the estimate cannot be made (a model
the API cannot resolve, a timeout): the job keeps the method's queue and the worker reports the real error.
"""

from __future__ import annotations

import json
import logging

from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from divmerge_core.config import MergeConfig
from divmerge_service import workers
from divmerge_service.config import Settings

from .dryrun import dry_run_request, spawn_dry_run
from .errors import ApiError

log = logging.getLogger("divmerge.api")


async def choose_queue(
    config: MergeConfig, settings: Settings, s: Session, default: str, devices_per_job: int | None
) -> str:
    """The queue for a job the method rule would send to ``default``; 422 ``insufficient_memory`` (naming
    the estimate and the largest live worker class) when no live worker can hold it."""
    if settings.dispatch != "capability" or not config.method.learned:
        return default

    def _pool():
        try:
            return workers.classes(workers.live(s, settings.worker_stale_s))
        finally:
            s.rollback()  # no transaction held while the estimate runs

    pool = await run_in_threadpool(_pool)
    if not pool:
        return default
    estimate = await estimate_needs(config, settings)
    if estimate is None:
        return default
    verdict = workers.route(estimate, pool, devices_per_job or settings.devices_per_job)
    if isinstance(verdict, workers.Refusal):
        raise ApiError(422, "insufficient_memory", verdict.message, verdict.field)
    return verdict.queue


async def estimate_needs(config: MergeConfig, settings: Settings) -> dict | None:
    """The job's needs per placement on a CUDA and a CPU-only worker, or None if they cannot be estimated."""
    request, env = dry_run_request(config, settings)
    request["mode"] = "placements"
    done = await spawn_dry_run(request, env, settings.validate_timeout_s)
    if done is None:
        log.warning(
            "memory estimate timed out after %.0fs: the job keeps its method's queue",
            settings.validate_timeout_s,
        )
        return None
    returncode, out, err = done
    try:
        report = json.loads(out) if returncode == 0 else None
    except ValueError:
        report = None
    if not report or not report.get("ok"):
        why = (report or {}).get("problems") or err.decode(errors="replace").strip().splitlines()[-1:]
        log.warning("no memory estimate (%s): the job keeps its method's queue", str(why)[:300])
        return None
    return report["needs"]
