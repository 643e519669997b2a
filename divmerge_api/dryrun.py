"""``POST /v1/merges/validate``: the submit checks, then the engine's dry run (``python -m
divmerge_core.dryrun``) in a subprocess with a time limit, so the API process never imports torch and a
slow Hub cannot hold a request past ``validate_timeout_s``."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys

from starlette.concurrency import run_in_threadpool

from divmerge_service.config import Settings

from . import spec
from .errors import ApiError
from .schemas import Problem, ValidationReport

log = logging.getLogger("divmerge.api")
_MAX_REPORT_BYTES = 1_000_000


async def validate(raw: bytes, content_type: str | None, settings: Settings, team: str) -> ValidationReport:
    try:
        body, notify = spec.split_notify(spec.load_body(raw, content_type))
        body, devices = spec.split_devices(body)
        config = spec.parse(body)
        spec.check_notify(notify, settings)
        spec.check_devices(devices, config, settings)
        spec.check_limits(config, settings)
        spec.check_paths(config, settings)
        await run_in_threadpool(spec.check_submit, config, settings, team)
    except ApiError as err:
        return ValidationReport(
            ok=False, problems=[Problem(code=err.code, message=err.message, field=err.field)]
        )
    request, env = dry_run_request(config, settings)
    return await _run(request, env, settings.validate_timeout_s)


def dry_run_request(config, settings: Settings) -> tuple[dict, dict[str, str]]:
    """The dry run's stdin (config, the worker's own engine options, device) and environment (the Hub
    read token, no DIVMERGE_ settings)."""
    options = settings.engine_options()
    request = {
        "config": config.model_dump(mode="json", by_alias=True, exclude_none=True),
        "options": options.to_json(),
        "device": settings.device,
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIVMERGE_")}
    env.pop("HF_TOKEN", None)
    if options.hf_token is not None:
        env["HF_TOKEN"] = options.hf_token
    return request, env


async def spawn_dry_run(
    request: dict, env: dict[str, str], timeout_s: float
) -> tuple[int, bytes, bytes] | None:
    """Run ``python -m divmerge_core.dryrun`` on ``request`` (its exit code, stdout, stderr); None when it did
    not finish within ``timeout_s`` (then it is killed)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "divmerge_core.dryrun",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(json.dumps(request).encode()), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return None
    return proc.returncode if proc.returncode is not None else -1, out, err


async def _run(request: dict, env: dict[str, str], timeout_s: float) -> ValidationReport:
    done = await spawn_dry_run(request, env, timeout_s)
    if done is None:
        return ValidationReport(
            ok=False,
            problems=[
                Problem(
                    code="validate_timeout",
                    message=f"the dry run did not finish within {timeout_s:.0f}s (a slow Hub or large dataset)",
                )
            ],
        )
    returncode, out, err = done
    if returncode != 0 or len(out) > _MAX_REPORT_BYTES:
        last = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        log.error("dry run failed (exit %s): %s", returncode, last[0][:300])
        raise ApiError(
            503, "unavailable", "the dry run could not run on this server (is the engine installed?)"
        )
    return ValidationReport.model_validate(json.loads(out))
