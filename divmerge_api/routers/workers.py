"""``GET /v1/workers`` (admin): the live workers as their heartbeats report them, with their class, the
queues they consume, their devices and host memory (docs/service.md#scheduling-by-capability)."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from divmerge_service import workers
from divmerge_service.config import Settings

from ..deps import AdminDep, SessionDep, SettingsDep
from ..security import Caller

router = APIRouter(prefix="/v1/workers", tags=["admin"])


class DeviceOut(BaseModel):
    kind: str = Field(description="cuda or cpu")
    index: int
    name: str = Field(description="the CUDA device's name, 'cpu', or 'configured' (DIVMERGE_WORKER_DEVICES)")
    total: int = Field(description="bytes")
    free: int = Field(description="bytes, at the last heartbeat")


class WorkerOut(BaseModel):
    name: str = Field(description="the worker's node name")
    worker_class: str = Field(description="gpu-<G>g[-x<N>] or cpu-<H>g: the class queue it consumes")
    queues: list[str]
    devices: list[DeviceOut]
    device_count: int = Field(description="CUDA devices (0 for a CPU-only worker)")
    host_total: int = Field(description="bytes")
    host_available: int = Field(description="bytes, at the last heartbeat")
    started_at: datetime
    last_seen: datetime


class WorkerList(BaseModel):
    items: list[WorkerOut]
    stale_after_s: float = Field(description="a worker not heard from for this long is not listed")


@router.get(
    "",
    response_model=WorkerList,
    responses={
        401: {"description": "missing, invalid, revoked or expired token"},
        403: {"description": "the token lacks the 'admin' scope"},
    },
)
def list_workers(
    caller: Caller = AdminDep, settings: Settings = SettingsDep, s: Session = SessionDep
) -> WorkerList:
    """The live workers (heard from within ``DIVMERGE_WORKER_STALE_S``), by name."""
    items = [
        WorkerOut(
            name=w.name,
            worker_class=w.worker_class,
            queues=list(w.queues or []),
            devices=[DeviceOut(**d) for d in w.devices or []],
            device_count=sum(1 for d in w.devices or [] if d.get("kind") == "cuda"),
            host_total=w.host_total,
            host_available=w.host_available,
            started_at=w.started_at,
            last_seen=w.last_seen,
        )
        for w in workers.live(s, settings.worker_stale_s)
    ]
    return WorkerList(items=items, stale_after_s=settings.worker_stale_s)
