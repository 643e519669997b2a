"""Liveness, readiness (database and broker reachable) and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text

from divmerge_service.db import get_engine

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}


def _check_db(url: str) -> str:
    try:
        with get_engine(url).connect() as conn:
            conn.execute(text("SELECT 1"))
        return "ok"
    except Exception as err:  # noqa: BLE001
        return f"unreachable ({type(err).__name__})"


def _check_broker(url: str | None) -> str:
    if not url:
        return "embedded"
    try:
        if url.startswith(("redis://", "rediss://")):
            import redis

            redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2).ping()
        else:
            from kombu import Connection

            with Connection(url, connect_timeout=2) as conn:
                conn.ensure_connection(max_retries=1)
        return "ok"
    except Exception as err:  # noqa: BLE001
        return f"unreachable ({type(err).__name__})"


@router.get("/readyz")
def readyz(request: Request):
    settings = request.app.state.settings
    checks = {"database": _check_db(settings.db_url), "broker": _check_broker(settings.broker_url)}
    ready = all(v in ("ok", "embedded") for v in checks.values())
    body = {"status": "ready" if ready else "unavailable", "checks": checks}
    if ready:
        return body
    return JSONResponse(
        {
            "error": {"code": "not_ready", "message": f"dependencies unreachable: {checks}", "field": None},
            **body,
        },
        status_code=503,
    )


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={
        200: {"description": "Prometheus text exposition format"},
        503: {"description": "the database is unavailable (job gauges are read from it)"},
    },
)
def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
