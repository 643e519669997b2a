"""The FastAPI app factory (``uvicorn --factory api.main:create_app``); OpenAPI docs at /docs, the web
dashboard at /."""

from __future__ import annotations

import logging

from fastapi import FastAPI

from divmerge_core.config import MergeConfig

from .core.config import Settings, get_settings
from .errors import install_handlers
from .metrics import Metrics
from .routers import dashboard, health, merges


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = FastAPI(
        title="DivMerge service",
        version="1",
        description="Submit model merges (the engine's MergeConfig as JSON) and follow them to completion.",
    )
    app.state.settings = settings
    app.state.metrics = Metrics(settings)
    app.middleware("http")(app.state.metrics.middleware)
    install_handlers(app)
    app.include_router(merges.router)
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
        return schema

    app.openapi = openapi
