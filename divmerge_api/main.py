"""The FastAPI app factory (``uvicorn --factory divmerge_api.main:create_app``); OpenAPI docs at /docs and /redoc,
served with their assets from the ``fastapi-offline`` package (no CDN: they work offline); the web dashboard
at /."""

from __future__ import annotations

import logging

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from divmerge_core.config import MergeConfig
from divmerge_service.config import Settings, get_settings

from .errors import install_handlers
from .metrics import Metrics
from .routers import dashboard, health, merges, tokens, workers
from .schemas import Notify


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = FastAPIOffline(
        title="DivMerge service",
        version="1",
        description="Submit model merges (the engine's MergeConfig as JSON or YAML) and follow them to "
        "completion. Every /v1 call needs `Authorization: Bearer <token>` (the Authorize button).",
    )
    app.state.settings = settings
    app.state.metrics = Metrics(settings)
    app.middleware("http")(app.state.metrics.middleware)
    install_handlers(app)
    app.include_router(merges.router)
    app.include_router(tokens.admin)
    app.include_router(tokens.team)
    app.include_router(workers.router)
    app.include_router(health.router)
    dashboard.install(app)
    _add_config_schema(app)
    return app


def _add_config_schema(app: FastAPI) -> None:
    """Publish MergeConfig in the OpenAPI document (the body is read raw to enforce size limits first)."""
    base = app.openapi

    def openapi():
        if app.openapi_schema:
            return app.openapi_schema
        schema = base()
        cfg = MergeConfig.model_json_schema(ref_template="#/components/schemas/{model}")
        defs = cfg.pop("$defs", {})
        comps = schema.setdefault("components", {}).setdefault("schemas", {})
        comps.update(defs)
        comps["MergeConfig"] = cfg
        notify = Notify.model_json_schema(ref_template="#/components/schemas/{model}")
        comps["Notify"] = notify
        comps["SubmitBody"] = {  # POST /v1/merges: a MergeConfig with notify beside its fields
            **cfg,
            "title": "SubmitBody",
            "description": "A MergeConfig, with an optional `notify` (this job's webhook) and "
            "`devices_per_job` beside its fields.",
            "properties": {
                **cfg.get("properties", {}),
                "notify": {"$ref": "#/components/schemas/Notify"},
                "devices_per_job": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": app.state.settings.max_devices_per_job,
                    "description": "a learned merge's data-parallel devices; with dispatch by capability it "
                    "goes only to workers with that many CUDA devices (default: the worker's setting)",
                },
            },
        }
        for param in schema["paths"]["/v1/merges"]["get"].get("parameters", []):
            if param["name"] == "limit":  # the bound is a setting, checked in the handler
                param["schema"]["maximum"] = app.state.settings.list_limit_max
        return schema

    app.openapi = openapi
