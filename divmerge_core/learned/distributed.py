"""A learned merge as one data-parallel job over N processes (``torch.distributed``; gloo on CPU, NCCL on CUDA).

:func:`learn_distributed` spawns N ranks (``torch.multiprocessing``, spawn start method), each running
:func:`~divmerge_core.learned.learn_coefficients` with a :class:`~.ranks.Distributed` group: every rank takes
its share of every task's teacher generation and of every step's inputs, and Gamma's gradient is summed
over the ranks (see :mod:`.optimise`), so the result equals the single-process run's up to float rounding.
Rank ``r`` uses ``cuda:r`` when the device is CUDA (``CUDA_VISIBLE_DEVICES`` picks which), else the CPU.
The calling process stays the coordinator: it relays rank 0's progress, polls ``should_stop`` and ends every
rank when one fails or the caller cancels; rank 0 hands back the coefficients and the caller writes the
outputs, so only one process ever writes them.

Launching under ``torchrun`` instead is :func:`torchrun_ranks`: the group is initialised from the
environment and every process runs the whole merge; only rank 0 writes outputs.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import queue as queue_mod
import tempfile
from datetime import timedelta
from typing import Any

import torch

from ..errors import DivMergeError, MergeCancelled
from ..plan import LearnedCoefficients, MergePlan
from ..progress import ProgressEvent, Reporter
from .ranks import Distributed

_POLL_S = 0.2


def learn_distributed(
    plan: MergePlan, *, devices: int, device: torch.device, reporter: Reporter
) -> LearnedCoefficients:
    """Learn the coefficients of ``plan`` with ``devices`` processes as one job."""
    if devices < 2:
        raise ValueError("learn_distributed needs at least 2 devices")
    if device.type == "cuda" and torch.cuda.device_count() < devices:
        raise DivMergeError(
            f"{devices} devices were asked for but {torch.cuda.device_count()} CUDA devices are visible"
        )
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    threads = max(1, torch.get_num_threads() // devices)
    with tempfile.TemporaryDirectory(prefix="divmerge-dist-") as tmp:
        init = f"file://{os.path.join(tmp, 'rendezvous')}"
        procs = [
            ctx.Process(
                target=_rank_main,
                args=(rank, devices, init, _portable(plan), device.type, threads, events),
                name=f"divmerge-rank-{rank}",
            )
            for rank in range(devices)
        ]
        for p in procs:
            p.start()
        try:
            return _coordinate(procs, events, reporter)
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
            for p in procs:
                p.join(timeout=30)


def _coordinate(procs: list[Any], events: Any, reporter: Reporter) -> LearnedCoefficients:
    while True:
        reporter.check()  # raises MergeCancelled; the caller's finally ends every rank
        try:
            kind, payload = events.get(timeout=_POLL_S)
        except queue_mod.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise DivMergeError(
                    f"rank process {dead[0].name} died (exit code {dead[0].exitcode})"
                ) from None
            continue
        if kind == "progress":
            reporter.report(*payload)
        elif kind == "error":
            raise _rebuild(payload)
        elif kind == "done":
            return payload


def _portable(plan: MergePlan) -> MergePlan:
    """``plan`` with its config as a plain dict: the config classes are built per method and cannot be pickled."""
    config = plan.config.model_dump(mode="json", by_alias=True, exclude_none=True)
    return dataclasses.replace(plan, config=config, specs=[])  # type: ignore[arg-type]


def _rank_main(
    rank: int, world: int, init: str, plan: MergePlan, device_type: str, threads: int, events: Any
) -> None:
    import torch.distributed as dist

    from ..config import parse_config
    from . import learn_coefficients

    config = parse_config(plan.config)  # see _portable
    plan = dataclasses.replace(plan, config=config, specs=config.task_models())

    torch.set_num_threads(threads)
    if device_type == "cuda":
        torch.cuda.set_device(rank)
        device, backend = torch.device("cuda", rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    try:
        dist.init_process_group(
            backend, init_method=init, rank=rank, world_size=world, timeout=timedelta(minutes=30)
        )
        progress = (lambda ev: events.put(("progress", _event_args(ev)))) if rank == 0 else None
        coeffs = learn_coefficients(plan, device=device, reporter=Reporter(progress), ranks=Distributed())
        if rank == 0:
            events.put(("done", coeffs))
    except BaseException as err:  # noqa: BLE001 - every failure goes back to the coordinator
        events.put(("error", _describe(err)))
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        # the queue's feeder thread must flush before the process ends
        events.close()
        events.join_thread()


def torchrun_ranks() -> Distributed | None:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment): initialise the group, return its ranks."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
        # torchrun ranks exit through the CLI: tear the group down first (an undestroyed gloo group can
        # abort the process at exit with 'terminate called without an active exception')
        atexit.register(dist.destroy_process_group)
    return Distributed()


def _event_args(ev: ProgressEvent) -> tuple:
    return (ev.stage, ev.step, ev.total, ev.loss, ev.message, ev.heldout)


def _describe(err: BaseException) -> tuple[str, str, str | None, str]:
    """A rank's error as plain data: (class name, message, field, code)."""
    if isinstance(err, DivMergeError):
        return type(err).__name__, err.message, err.field, err.code
    return type(err).__name__, f"unexpected {type(err).__name__} in a rank: {err}", None, "merge_failed"


def _rebuild(info: tuple[str, str, str | None, str]) -> DivMergeError:
    """The same engine error class in the coordinator (the service keys on its ``code``)."""
    from .. import errors

    name, message, field, code = info
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, DivMergeError)):
        cls = DivMergeError
    if cls is MergeCancelled:
        return MergeCancelled(message)
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.message, err.field = message, field
    if cls is DivMergeError:
        err.code = code
    if cls is errors.IncompatibleModelsError:
        err.problems = [message]
    return err
