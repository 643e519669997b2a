"""The worker pool as its heartbeats report it, and the one rule matching a job's memory estimate against it
(docs/service.md#scheduling-by-capability). Shared by the API (submit: refuse or pick a queue) and the
workers (their class queues, the claim-time recheck). No torch: the estimate comes in as JSON, from
:func:`divmerge_core.learned.memory.placement_needs`.

A worker's **class** is what decides where a job can go: ``gpu-<G>g`` (its smallest CUDA device, in GiB,
rounded), ``gpu-<G>g-x<N>`` with N CUDA devices, or ``cpu-<H>g`` (CPU only, its host memory). The class's
queue has the class's name; a worker consumes its own class queue and the queue of every live class it
dominates (same kind, at least as much device memory, as many devices and as much host memory), so that
every consumer of a class queue fits whatever fits that class.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from .models import Worker, utcnow

GiB = 1 << 30
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": GiB, "tib": 1 << 40}  # fmt: skip
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


class CapacityError(ValueError):
    """A malformed ``DIVMERGE_WORKER_DEVICES`` or ``DIVMERGE_WORKER_HOST_MEMORY``."""


def parse_bytes(text: str) -> int:
    """``80GiB``, ``24 GB``, ``1.5TiB``, ``1000000`` -> bytes."""
    m = _SIZE.match(str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise CapacityError(f"not a memory size: {text!r} (e.g. 80GiB, 24GB, 1000000)")
    return int(float(m.group(1)) * _UNITS[unit])


def _total_free(text: str) -> tuple[int, int]:
    total, _, free = text.partition("/")
    t = parse_bytes(total)
    f = parse_bytes(free) if free else t
    if f > t:
        raise CapacityError(f"{text!r}: free memory exceeds the total")
    return t, f


def parse_devices(text: str) -> list[dict[str, Any]]:
    """``cuda:80GiB,cuda:80GiB/70GiB`` (kind:total[/free], free defaulting to the total) or JSON
    ``[{"kind": "cuda", "total": ..., "free": ...}]`` -> device entries."""
    text = text.strip()
    if text.startswith("["):
        try:
            raw = json.loads(text)
            items = [(str(d["kind"]), str(d["total"]), str(d.get("free", d["total"]))) for d in raw]
        except (ValueError, TypeError, KeyError) as err:
            raise CapacityError(
                f"DIVMERGE_WORKER_DEVICES is not a JSON list of {{kind, total, free}}: {err}"
            ) from None
        specs = [(k, f"{t}/{f}") for k, t, f in items]
    else:
        specs = []
        for part in filter(None, (p.strip() for p in text.split(","))):
            kind, sep, size = part.partition(":")
            if not sep:
                raise CapacityError(f"device {part!r}: expected kind:size, e.g. cuda:80GiB")
            specs.append((kind.strip(), size))
    out = []
    for i, (kind, size) in enumerate(specs):
        if kind not in ("cuda", "cpu"):
            raise CapacityError(f"device kind {kind!r}: cuda or cpu")
        total, free = _total_free(size)
        out.append({"kind": kind, "index": i, "name": "configured", "total": total, "free": free})
    if not out:
        raise CapacityError("DIVMERGE_WORKER_DEVICES names no device")
    return out


def parse_host(text: str) -> tuple[int, int]:
    """``256GiB`` or ``256GiB/200GiB`` -> (total, available)."""
    return _total_free(text)


# --- classes -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Capacity:
    """What a worker (or the weakest of a class) offers: kind, per-device memory (the smallest device's),
    the number of devices, host memory; totals at submit, free memory at claim."""

    kind: str  # cuda | cpu
    device_bytes: tuple[int, ...]  # per CUDA device; () for cpu
    host: int

    @property
    def count(self) -> int:
        return len(self.device_bytes) if self.kind == "cuda" else 1

    @property
    def per_device(self) -> int:
        return min(self.device_bytes) if self.device_bytes else 0

    def dominates(self, other: Capacity) -> bool:
        """Fits everything ``other`` fits (the estimate only grows with what a worker must hold)."""
        return (
            self.kind == other.kind
            and self.per_device >= other.per_device
            and self.count >= other.count
            and self.host >= other.host
        )

    def describe(self) -> str:
        if self.kind == "cuda":
            return f"{self.count} x {_gib(self.per_device)} CUDA, {_gib(self.host)} host memory"
        return f"CPU only, {_gib(self.host)} host memory"


def capacity_of(devices: list[dict[str, Any]], host: int, *, free: bool = False) -> Capacity:
    key = "free" if free else "total"
    cuda = tuple(int(d[key]) for d in devices if d.get("kind") == "cuda")
    return Capacity("cuda" if cuda else "cpu", cuda, int(host))


def class_of(cap: Capacity) -> str:
    """``gpu-80g``, ``gpu-80g-x2``, ``cpu-64g`` (GiB, rounded; MiB under 1 GiB: ``gpu-512m``)."""
    if cap.kind == "cuda":
        per = cap.per_device
        name = f"gpu-{round(per / GiB)}g" if per >= GiB else f"gpu-{round(per / (1 << 20))}m"
        return name + (f"-x{cap.count}" if cap.count > 1 else "")
    return f"cpu-{round(cap.host / GiB)}g"


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


# --- the registry ------------------------------------------------------------------------------------------
def report(
    session: Session,
    name: str,
    *,
    queues: list[str],
    devices: list[dict[str, Any]],
    host_total: int,
    host_available: int,
    started_at: datetime,
) -> str:
    """A worker's heartbeat: insert or update its row. Returns its class."""
    cls = class_of(capacity_of(devices, host_total))
    row = session.get(Worker, name)
    values = dict(
        worker_class=cls,
        queues=list(queues),
        devices=devices,
        host_total=int(host_total),
        host_available=int(host_available),
        started_at=started_at,
        last_seen=utcnow(),
    )
    if row is None:
        session.add(Worker(name=name, **values))
    else:
        for k, v in values.items():
            setattr(row, k, v)
    return cls


def forget(session: Session, name: str) -> None:
    """A worker shutting down removes its row (a killed one just goes stale)."""
    row = session.get(Worker, name)
    if row is not None:
        session.delete(row)


def live(session: Session, stale_s: float) -> list[Worker]:
    """Workers heard from within ``stale_s``, by name."""
    since = utcnow() - timedelta(seconds=stale_s)
    return list(session.scalars(select(Worker).where(Worker.last_seen >= since).order_by(Worker.name)))


def classes(workers: list[Worker]) -> dict[str, Capacity]:
    """Each live class and the capacity all its workers have (the weakest member's, dimension by dimension)."""
    out: dict[str, Capacity] = {}
    for w in workers:
        cap = capacity_of(w.devices, w.host_total)
        seen = out.get(w.worker_class)
        if seen is None:
            out[w.worker_class] = cap
        else:
            n = min(seen.count, cap.count)
            per = min(seen.per_device, cap.per_device)
            out[w.worker_class] = Capacity(
                cap.kind, (per,) * n if cap.kind == "cuda" else (), min(seen.host, cap.host)
            )
    return out


def consumed_classes(own: Capacity, pool: dict[str, Capacity]) -> list[str]:
    """The class queues a worker of capacity ``own`` consumes: its own class's and every one it dominates."""
    mine = class_of(own)
    return [mine, *sorted(c for c, cap in pool.items() if c != mine and own.dominates(cap))]


# --- matching an estimate ----------------------------------------------------------------------------------
def placement_for(estimate: dict[str, Any], cap: Capacity, devices_per_job: int = 1) -> str | None:
    """The placement ``auto`` would pick on a worker of capacity ``cap`` (the configured one, if the job
    fixes it), or None if the job does not fit there. ``devices_per_job`` CUDA devices must each hold the
    device need; each process needs the host need."""
    if devices_per_job > 1 and (cap.kind != "cuda" or cap.count < devices_per_job):
        return None
    table, headroom = estimate["needs"][cap.kind], estimate["headroom"]
    order = estimate["order"] if estimate["placement"] == "auto" else [estimate["placement"]]
    for p in order:
        need = table[p]
        if need["host"] * devices_per_job > headroom * cap.host:
            continue
        if cap.kind == "cuda":
            fitting = sum(1 for d in cap.device_bytes if need["device"] <= headroom * d)
            if fitting < devices_per_job:
                continue
        return p
    return None


def _rank(cap: Capacity) -> tuple:
    # GPU classes first, then the smallest that fits: big workers stay free for big jobs
    return (cap.kind != "cuda", cap.per_device, cap.count, cap.host)


@dataclass(frozen=True)
class Route:
    queue: str
    placement: str


@dataclass(frozen=True)
class Refusal:
    message: str
    field: str


def route(estimate: dict[str, Any], pool: dict[str, Capacity], devices_per_job: int = 1) -> Route | Refusal:
    """The queue of the smallest live class that fits the job (GPU classes before CPU ones), or why none
    does. ``pool`` must not be empty (an empty pool refuses nothing: the caller keeps the method's queue)."""
    fitting = [(c, p) for c, cap in pool.items() if (p := placement_for(estimate, cap, devices_per_job))]
    if fitting:
        cls, placement = min(fitting, key=lambda cp: _rank(pool[cp[0]]))
        return Route(cls, placement)
    largest_cls, largest = max(
        pool.items(), key=lambda kv: (kv[1].kind == "cuda", kv[1].per_device * kv[1].count, kv[1].host)
    )
    most = max((c.count for c in pool.values() if c.kind == "cuda"), default=0)
    if devices_per_job > 1 and most < devices_per_job:
        return Refusal(
            f"devices_per_job is {devices_per_job} but no live worker has that many CUDA devices (the most: "
            f"{most}; largest worker class {largest_cls}: {largest.describe()})",
            "devices_per_job",
        )
    return Refusal(
        f"no live worker can hold this job: it needs {describe_needs(estimate, devices_per_job)}; the largest "
        f"worker class, {largest_cls}, has {largest.describe()}",
        "parameters",
    )


def describe_needs(estimate: dict[str, Any], devices_per_job: int = 1) -> str:
    """The smallest need per kind, for messages: the placement that needs the least device memory on a GPU
    worker, and what a CPU-only worker would need."""
    order = estimate["order"] if estimate["placement"] == "auto" else [estimate["placement"]]
    cuda = min((estimate["needs"]["cuda"][p] | {"p": p} for p in order), key=lambda n: n["device"])
    cpu = min((estimate["needs"]["cpu"][p] | {"p": p} for p in order), key=lambda n: n["host"])
    per = f" on each of {devices_per_job} devices" if devices_per_job > 1 else ""
    return (
        f"{_gib(cuda['device'])} of CUDA memory{per} and {_gib(cuda['host'] * devices_per_job)} of host memory "
        f"(placement {cuda['p']!r}, the smallest), or {_gib(cpu['host'])} of host memory on a CPU-only worker "
        f"(headroom {estimate['headroom']:.0%} of each)"
    )
