"""What this worker can hold, told to the others (a heartbeat into the ``workers`` table), and the claim-time
recheck: a learned job this worker cannot fit goes back to the queue of a class that fits it, its attempt
not counted (docs/service.md#scheduling-by-capability, docs/reliability.md).

Devices come from ``torch.cuda`` (total and free memory of each device), or one ``cpu`` device; host memory
from ``/proc/meminfo`` (psutil where there is none), capped by the worker's memory cgroup (a container's
limit; :mod:`divmerge_core.host_memory`). ``DIVMERGE_WORKER_DEVICES`` and
``DIVMERGE_WORKER_HOST_MEMORY`` replace what is detected (operators without GPUs, the tests).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from divmerge_core.errors import InsufficientMemoryError
from divmerge_core.host_memory import host_memory as machine_memory
from divmerge_service import jobs, workers
from divmerge_service.config import Settings
from divmerge_service.db import session_scope
from divmerge_service.models import utcnow

log = logging.getLogger("divmerge.worker")


# --- what this machine has ---------------------------------------------------------------------------------
def host_memory(settings: Settings) -> tuple[int, int]:
    """(total, available) bytes of host memory (the configured figures, else what this process may use)."""
    if settings.worker_host_memory:
        return workers.parse_host(settings.worker_host_memory)
    return machine_memory() or (0, 0)


def devices(settings: Settings, host: tuple[int, int]) -> list[dict[str, Any]]:
    """[{kind, index, name, total, free}]: the configured devices, else every CUDA device, else one ``cpu``."""
    if settings.worker_devices:
        return workers.parse_devices(settings.worker_devices)
    try:
        import torch

        if torch.cuda.is_available():
            out = []
            for i in range(torch.cuda.device_count()):
                free, total = torch.cuda.mem_get_info(i)
                name = torch.cuda.get_device_name(i)
                out.append({"kind": "cuda", "index": i, "name": name, "total": int(total), "free": int(free)})
            return out
    except Exception as err:  # noqa: BLE001 - a broken CUDA setup reports a CPU worker
        log.warning("could not read the CUDA devices: %s", err)
    return [{"kind": "cpu", "index": 0, "name": "cpu", "total": host[0], "free": host[1]}]


def snapshot(settings: Settings) -> tuple[list[dict[str, Any]], int, int]:
    host = host_memory(settings)
    return devices(settings, host), host[0], host[1]


def own_capacity(settings: Settings, *, free: bool) -> workers.Capacity:
    devs, total, available = snapshot(settings)
    return workers.capacity_of(devs, available if free else total, free=free)


# --- the heartbeat ---------------------------------------------------------------------------------------
class Heartbeat:
    """A thread that reports this worker every ``worker_heartbeat_s`` and, with ``dispatch: capability``,
    makes it consume the queue of every live class it dominates (``add_queue``: how the Celery consumer
    is told)."""

    def __init__(self, settings: Settings, name: str, queues: list[str], add_now=None, add_later=None):
        self.settings, self.name = settings, name
        self.queues = list(dict.fromkeys(queues))
        self.add_queue = add_now  # the first beat runs in the caller's thread
        self._add_later = add_later
        self.started_at = utcnow()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self.beat()
        self.add_queue = self._add_later
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            with session_scope(self.settings.db_url) as s:
                workers.forget(s, self.name)
        except Exception as err:  # noqa: BLE001 - the row goes stale instead
            log.warning(
                "could not remove worker %s from the workers table: %s", self.name, type(err).__name__
            )

    def _run(self) -> None:
        while not self._stop.wait(self.settings.worker_heartbeat_s):
            try:
                self.beat()
            except Exception as err:  # noqa: BLE001 - the next beat tries again
                log.warning("worker heartbeat failed: %s", type(err).__name__)

    def beat(self) -> None:
        devs, total, available = snapshot(self.settings)
        with session_scope(self.settings.db_url) as s:
            if self.settings.dispatch == "capability":
                pool = workers.classes(
                    [w for w in workers.live(s, self.settings.worker_stale_s) if w.name != self.name]
                )
                own = workers.capacity_of(devs, total)
                for q in workers.consumed_classes(own, pool):
                    if q not in self.queues:
                        self.queues.append(q)
                        if self.add_queue is not None:
                            self.add_queue(q)
                        log.info("worker %s: consuming class queue %s", self.name, q)
            workers.report(
                s,
                self.name,
                queues=self.queues,
                devices=devs,
                host_total=total,
                host_available=available,
                started_at=self.started_at,
            )


# --- the claim-time recheck --------------------------------------------------------------------------------
def recheck(settings: Settings, plan, claim: jobs.Claim, devices_per_job: int) -> float | None:
    """With ``dispatch: capability``, before a learned merge starts: does it fit this worker now (free
    memory, ``devices_per_job`` devices with room)? If so None. If not, the job goes back (attempt not
    counted) to the queue of the smallest live class that fits it, and the delay before it may run is
    returned; if no live class fits it, or it was given back ``max_placement_requeues`` times,
    :class:`InsufficientMemoryError`."""
    if settings.dispatch != "capability":
        return None
    from divmerge_core.learned.memory import placement_needs

    estimate = placement_needs(plan)
    here = own_capacity(settings, free=True)
    placement = workers.placement_for(estimate, here, devices_per_job)
    if placement is not None:
        return None
    with session_scope(settings.db_url) as s:
        pool = workers.classes(workers.live(s, settings.worker_stale_s))
        given_back = jobs.times_not_placed(s, claim.job_id)
    target = workers.route(estimate, pool, devices_per_job) if pool else None
    needs = workers.describe_needs(estimate, devices_per_job)
    if not isinstance(target, workers.Route):
        why = target.message if target else f"it needs {needs}"
        raise InsufficientMemoryError(f"this job fits no live worker: {why}", estimate)
    if given_back >= settings.max_placement_requeues:
        raise InsufficientMemoryError(
            f"workers gave this job back {given_back} times (it did not fit their free memory): it needs {needs}",
            estimate,
        )
    delay = settings.retry_backoff_s
    message = (
        f"does not fit worker {claim.worker_id} now ({here.describe()} free): it needs {needs}; "
        f"queued again on {target.queue}, attempt not counted"
    )
    with session_scope(settings.db_url) as s:
        jobs.unclaim(s, claim, queue=target.queue, delay_s=delay, message=message, free=here.describe())
    log.info("job %s: %s", claim.job_id, message)
    return delay
