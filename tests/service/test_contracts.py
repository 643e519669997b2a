"""The worker/API contracts (:mod:`divmerge_service.contracts`) on a real PostgreSQL, Redis and Celery worker:
what a worker writes into a job's ``progress`` and ``result`` columns validates as ``JobProgress`` /
``JobResult`` and is served in the unchanged HTTP shape; result blobs of the old shape (a flat
``destination`` string) are still served; a malformed blob is logged and served as null, while the
endpoints that serve a part of it answer a 500 naming the job and the column."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from divmerge_service import jobs
from divmerge_service.contracts import (
    HubDestination,
    JobProgress,
    JobResult,
    LocalDestination,
    Stage,
)
from divmerge_service.db import session_scope
from divmerge_service.models import Job, Team

pytestmark = pytest.mark.service

REPO = Path(__file__).resolve().parents[2]


def raw_row(svc, job_id: str) -> tuple[dict | None, dict | None]:
    """The job's progress and result columns as stored (no API in between)."""
    with session_scope(svc.settings.db_url) as s:
        job = s.get(Job, job_id)
        return job.progress, job.result


def planted(svc, *, result: dict | None, progress: dict | None, status: str = "succeeded") -> str:
    """A finished job of team-a whose columns hold exactly ``result`` and ``progress`` (as an older worker,
    or a broken one, would have left them). Created and finished in one transaction: no worker sees it."""
    now = datetime.now(UTC)
    with session_scope(svc.settings.db_url) as s:
        team_id = s.scalar(select(Team.id).where(Team.name == "team-a"))
        job, _ = jobs.create_job(
            s, team_id=team_id, spec=svc.classic(), spec_hash="planted", queue="cpu", idempotency_key=None
        )
        s.execute(
            update(Job)
            .where(Job.id == job.id)
            .values(
                status=status,
                attempts=1,
                started_at=now - timedelta(seconds=5),
                finished_at=now,
                result=result,
                progress=progress,
            )
        )
        return job.id


# --- worker dump -> API validate, with the real worker


def test_progress_and_result_round_trip_from_the_worker(svc, fake_hub_uploads):
    """Every progress blob the worker writes while a job runs, and its final result, validate as the
    contract; a dump of the validated model validates to the same model; the API serves the old field names
    and values (``destination`` as one string, ``total_steps`` beside ``total``)."""
    svc.ensure_worker()
    job_id = svc.submit(svc.classic("deep_"))["id"]
    seen: list[dict] = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            progress, _ = raw_row(svc, job_id)
            if progress is not None and (not seen or seen[-1] != progress):
                seen.append(progress)
            stop.wait(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        done = svc.wait(job_id, timeout=120)
    finally:
        stop.set()
        watcher.join(timeout=5)
    assert done["status"] == "succeeded", done["error"]
    progress, result = raw_row(svc, job_id)
    seen.append(progress)
    stages = []
    for blob in seen:
        p = JobProgress.model_validate(blob)
        assert JobProgress.model_validate(p.model_dump(mode="json")) == p
        assert blob == p.model_dump(mode="json"), "the worker writes the model's dump, nothing else"
        stages.append(p.stage)
    assert Stage.WRITE in stages and stages[-1] == Stage.DONE

    stored = JobResult.model_validate(result)
    assert result == stored.model_dump(mode="json"), "the worker writes the model's dump, nothing else"
    out = Path(svc.settings.home) / "outputs" / job_id
    assert stored.destination == LocalDestination(path=str(out)) and stored.local_path == str(out)
    assert "model.safetensors" in {f.name for f in stored.file_info} and stored.metrics.tensors > 0
    assert stored.resolved is None, "resolved moves to its own column on delivery"

    assert done["result"]["destination"] == str(out)
    assert done["result"]["revision"] is None and done["result"]["commit"] is None
    assert done["result"]["files"] == stored.files and done["result"]["metrics"]["tensors"] > 0
    assert (
        done["progress"]["stage"] == "done" and done["progress"]["total_steps"] == done["progress"]["total"]
    )
    listing = svc.client.get(f"/v1/merges/{job_id}/files", headers=svc.h()).json()
    assert listing["hub"] is None and listing["files"] == [f.model_dump() for f in stored.file_info]

    hub_job = svc.wait(svc.submit(svc.classic(output={"repo_id": "team-a/contracts"}))["id"])
    assert hub_job["status"] == "succeeded", hub_job["error"]
    _, result = raw_row(svc, hub_job["id"])
    stored = JobResult.model_validate(result)
    up = next(u for u in fake_hub_uploads() if u["repo_id"] == "team-a/contracts")
    assert stored.destination == HubDestination(
        repo_id="team-a/contracts", revision="main", commit=up["commit"]
    )
    assert result["destination"] == {
        "kind": "hub",
        "repo_id": "team-a/contracts",
        "revision": "main",
        "commit": up["commit"],
    }
    assert hub_job["result"]["destination"] == "hf://team-a/contracts"
    assert hub_job["result"]["revision"] == "main" and hub_job["result"]["commit"] == up["commit"]
    listing = svc.client.get(f"/v1/merges/{hub_job['id']}/files", headers=svc.h()).json()
    assert listing["hub"] == {"repo_id": "team-a/contracts", "commit": up["commit"]}


def test_progress_writer_dump_round_trips_heldout_rows(svc):
    """The worker's progress of a learned merge (losses, held-out rows with a task holding nothing out)
    is a JobProgress dump the API validates back, served with its heldout rows."""
    from divmerge_service.config import Settings
    from divmerge_worker.runner import ProgressWriter

    writer = ProgressWriter(Settings(progress_interval_s=0), jobs.Claim("j", "w", 1), lease=None)
    writer.heldout = [[0, 0, 0.7, 0.6, None], [1, 4, 0.5, 0.4, None]]
    blob = writer.progress("optimise", 4, 8, 0.25).model_dump(mode="json")
    back = JobProgress.model_validate(blob)
    assert back.stage is Stage.OPTIMISE and back.loss == 0.25 and back.total_steps == 8
    assert back.heldout == [[0.0, 0.0, 0.7, 0.6, None], [1.0, 4.0, 0.5, 0.4, None]]
    job_id = planted(svc, result=None, progress=blob, status="failed")
    served = svc.get(job_id)["progress"]
    assert served["stage"] == "optimise" and served["heldout"] == back.heldout and served["eta_s"] is None


def test_every_stage_the_engine_or_worker_reports_is_a_stage():
    """A stage missing from :class:`Stage` would leave the job's progress unwritten: keep them in step."""
    names = set()
    for path in [*(REPO / "divmerge_core").rglob("*.py"), REPO / "divmerge_worker" / "runner.py"]:
        text = path.read_text(encoding="utf-8")
        names |= set(re.findall(r"\breport\(\s*\"(\w+)\"", text))
        names |= set(re.findall(r"\.write\(\s*\"(\w+)\"", text)) if path.name == "runner.py" else set()
    assert {"resolve", "write", "done", "starting", "upload", "upload_wait"} <= names
    assert names <= {s.value for s in Stage}, names - {s.value for s in Stage}


def test_the_service_package_imports_neither_the_api_nor_the_worker():
    code = (
        "import sys, pkgutil, importlib, divmerge_service;"
        "[importlib.import_module(f'divmerge_service.{m.name}') for m in pkgutil.iter_modules(divmerge_service.__path__)"
        " if m.name != 'migrations'];"
        "print(sorted({m.split('.')[0] for m in sys.modules if m.startswith(('divmerge_api', 'divmerge_worker', 'torch'))}))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- rows written before the contract


def test_old_shape_result_blobs_are_still_served(svc):
    """Result and progress blobs as workers wrote them before the contract (``destination`` a flat string,
    ``revision``/``commit`` beside it; progress with ``total_steps`` only) are served as before."""
    info = [{"name": "config.json", "size": 2, "sha256": "ab" * 32}]
    old_progress = {
        "stage": "done",
        "step": 1,
        "total_steps": 1,
        "loss": None,
        "updated_at": "2026-01-02T03:04:05",
    }
    hub_id = planted(
        svc,
        result={
            "destination": "hf://team-a/old-shape",
            "revision": "main",
            "commit": "c0ffee",
            "files": ["config.json"],
            "file_info": info,
            "coefficients": None,
            "metrics": {"wall_s": 1.5, "final_loss": None, "steps": 0},
            "evaluation": None,
        },
        progress=old_progress,
    )
    job = svc.get(hub_id)
    assert job["result"] == {
        "destination": "hf://team-a/old-shape",
        "revision": "main",
        "commit": "c0ffee",
        "files": ["config.json"],
        "coefficients": None,
        "metrics": {"wall_s": 1.5, "final_loss": None, "steps": 0},
        "evaluation": None,
    }
    assert (
        job["progress"]["stage"] == "done" and job["progress"]["total"] == job["progress"]["total_steps"] == 1
    )
    listing = svc.client.get(f"/v1/merges/{hub_id}/files", headers=svc.h()).json()
    assert listing == {"files": info, "hub": {"repo_id": "team-a/old-shape", "commit": "c0ffee"}}
    r = svc.client.get(f"/v1/merges/{hub_id}/files/config.json", headers=svc.h())
    assert r.status_code == 409 and r.json()["error"]["code"] == "hub_output"
    assert "hf://team-a/old-shape" in r.json()["error"]["message"]

    folder = Path(svc.env["DIVMERGE_LOCAL_ROOTS"]) / "outputs" / "old-shape"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    local_id = planted(
        svc,
        result={
            "destination": str(folder),
            "revision": None,
            "commit": None,
            "files": ["config.json"],
            "file_info": info,
            "metrics": {},
        },  # fmt: skip
        progress=old_progress,
    )
    job = svc.get(local_id)
    assert job["result"]["destination"] == str(folder) and job["result"]["commit"] is None
    r = svc.client.get(f"/v1/merges/{local_id}/files/config.json", headers=svc.h())
    assert r.status_code == 200 and r.content == b"{}"


# --- malformed blobs


@pytest.mark.parametrize(
    ("result", "progress"),
    [
        ({"destination": {"kind": "ftp", "path": "x"}, "files": "not a list"}, {"stage": "warp drive"}),
        ({"destination": 42}, {"stage": "write", "step": "many"}),
    ],
    ids=["unknown-kind-and-stage", "wrong-types"],
)
def test_a_malformed_blob_is_logged_and_served_as_null(svc, caplog, result, progress):
    """GET /v1/merges/{id} (and the list) still serve the job, with the broken column null and a warning in
    the server log naming the job and the column; /files and /evaluation, which serve a part of the
    result, answer 500 ``internal_error`` naming the job and ``result``; /coefficients also names
    ``progress``."""
    job_id = planted(svc, result=result, progress=progress)
    with caplog.at_level(logging.WARNING, logger="divmerge.api"):
        job = svc.get(job_id)
        again = svc.get(job_id)
    assert job["status"] == "succeeded" and job["id"] == job_id and job["spec"]["merge_method"]
    assert job["result"] is None and job["progress"] is None and again == job
    warned = [r.getMessage() for r in caplog.records if job_id in r.getMessage()]
    assert any("stored result does not validate as JobResult" in m for m in warned), warned
    assert any("stored progress does not validate as JobProgress" in m for m in warned), warned
    assert len(warned) == 2, "one warning per job and column, not one per request"

    listed = svc.client.get("/v1/merges", params={"limit": 100}, headers=svc.h()).json()["items"]
    assert next(j for j in listed if j["id"] == job_id)["result"] is None

    for path in ("files", "files/config.json", "evaluation"):
        r = svc.client.get(f"/v1/merges/{job_id}/{path}", headers=svc.h())
        assert r.status_code == 500, (path, r.text)
        err = r.json()["error"]
        assert err["code"] == "internal_error" and err["field"] == "result" and job_id in err["message"]

    with session_scope(svc.settings.db_url) as s:  # a learned job, so /coefficients reads the progress
        s.execute(update(Job).where(Job.id == job_id).values(spec={**job["spec"], "merge_method": "divmerge"},
                                                             status="failed", result=None))  # fmt: skip
    r = svc.client.get(f"/v1/merges/{job_id}/coefficients", headers=svc.h())
    assert r.status_code == 500 and r.json()["error"]["field"] == "progress" and job_id in r.text


def test_a_succeeded_result_without_destination_is_served_as_null(svc):
    """A kept (undelivered) result has no destination: valid as a result, but not as a succeeded one."""
    job_id = planted(svc, result={"files": ["config.json"], "metrics": {}}, progress={"stage": "done"})
    assert svc.get(job_id)["result"] is None
    r = svc.client.get(f"/v1/merges/{job_id}/files", headers=svc.h())
    assert r.status_code == 500 and r.json()["error"]["field"] == "result"


def test_a_journal_of_an_older_worker_still_records_its_delivery(tmp_path):
    """A delivery journal written before the contract (a flat destination in ``result``, ``upload`` beside
    it) loads as a DeliveryJournal whose columns are the new shape."""
    import json

    from divmerge_service.config import Settings
    from divmerge_worker.bookkeeping import journal_path, load_delivery

    settings = Settings(home=tmp_path)
    old = {
        "upload": {"destination": "hf://team-a/j", "revision": "main", "commit": "abc"},
        "result": {
            "files": ["a"],
            "metrics": {"steps": 0},
            "destination": "hf://team-a/j",
            "revision": "main",
            "commit": "abc",
        },  # fmt: skip
        "kept": None,
        "resolved": {"m": "sha"},
        "losses": [0.5],
    }
    journal_path(settings, "j").parent.mkdir(parents=True)
    journal_path(settings, "j").write_text(json.dumps(old))
    columns = load_delivery(settings, "j").columns()
    hub = {"kind": "hub", "repo_id": "team-a/j", "revision": "main", "commit": "abc"}
    assert columns["upload"] == hub and columns["result"]["destination"] == hub
    assert columns["resolved"] == {"m": "sha"} and columns["losses"] == [0.5] and columns["kept"] is None
    journal_path(settings, "j").write_text(json.dumps({"result": {"destination": 7}}))
    assert load_delivery(settings, "j") is None, "an unreadable journal is ignored (the job merges again)"
