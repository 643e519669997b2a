"""The HTTP contract: auth, team isolation, idempotency, pagination, cancel of queued jobs, input checks,
health and metrics. Jobs that must stay queued go through an app whose queues no worker consumes."""

from __future__ import annotations

import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from divmerge_api.main import create_app
from divmerge_api.security import create_token
from divmerge_service.config import Settings
from divmerge_service.db import session_scope

from .procs import REPO

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def idle(svc):
    """An API whose jobs go to a queue nobody listens to: they stay queued."""
    settings = Settings(cpu_queue="idle", gpu_queue="idle")
    with TestClient(create_app(settings)) as client:
        yield client


def new_team_token(svc, team: str) -> str:
    with session_scope(svc.settings.db_url) as s:
        return create_token(s, team)[1]


def test_401_without_or_with_bad_token(svc):
    for headers in ({}, {"Authorization": "Bearer dm_nope"}, {"Authorization": "Basic abc"}):
        r = svc.client.get("/v1/merges", headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "unauthorized"
    assert svc.client.post("/v1/merges", json=svc.classic()).status_code == 401


def test_revoked_token_is_refused(svc):
    out = svc.cli("token", "create", "--team", "team-r")
    token = out.strip().splitlines()[-1]
    token_id = next(line.split()[2] for line in out.splitlines() if line.startswith("token id:"))
    assert svc.client.get("/v1/merges", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    svc.cli("token", "revoke", token_id)
    r = svc.client.get("/v1/merges", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 401


def test_tokens_are_stored_as_hashes(svc):
    from sqlalchemy import text

    from divmerge_service.db import get_engine

    with get_engine(svc.settings.db_url).connect() as conn:
        hashes = [r[0] for r in conn.execute(text("SELECT token_hash FROM api_tokens"))]
    assert hashes and all(len(h) == 64 for h in hashes)
    assert svc.tokens["team-a"] not in hashes


def test_team_isolation(svc, idle):
    job = idle.post("/v1/merges", json=svc.classic(), headers=svc.h("team-a")).json()
    other = svc.h("team-b")
    r = svc.client.get(f"/v1/merges/{job['id']}", headers=other)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert svc.client.post(f"/v1/merges/{job['id']}/cancel", headers=other).status_code == 404
    listed = svc.client.get("/v1/merges?limit=100", headers=other).json()["items"]
    assert job["id"] not in {j["id"] for j in listed}


def test_idempotency(svc, idle):
    body = svc.classic()
    a = idle.post("/v1/merges", json=body, headers=svc.h("team-a", key="k-1"))
    b = idle.post("/v1/merges", json=body, headers=svc.h("team-a", key="k-1"))
    assert a.status_code == b.status_code == 202
    assert a.json()["id"] == b.json()["id"]
    c = idle.post(
        "/v1/merges", json=svc.classic(parameters={"lambda": 0.7}), headers=svc.h("team-a", key="k-1")
    )
    assert c.status_code == 409 and c.json()["error"]["code"] == "idempotency_conflict"
    d = idle.post("/v1/merges", json=body, headers=svc.h("team-b", key="k-1"))  # keys are per team
    assert d.status_code == 202 and d.json()["id"] != a.json()["id"]


def test_list_is_paginated_newest_first(svc, idle):
    token = new_team_token(svc, "team-list")
    h = {"Authorization": f"Bearer {token}"}
    ids = [idle.post("/v1/merges", json=svc.classic(), headers=h).json()["id"] for _ in range(3)]
    page1 = svc.client.get("/v1/merges?limit=2", headers=h).json()
    assert [j["id"] for j in page1["items"]] == ids[::-1][:2]
    page2 = svc.client.get(f"/v1/merges?limit=2&cursor={page1['next_cursor']}", headers=h).json()
    assert [j["id"] for j in page2["items"]] == ids[:1] and page2["next_cursor"] is None
    assert svc.client.post(f"/v1/merges/{ids[0]}/cancel", headers=h).json()["status"] == "cancelled"
    only = svc.client.get("/v1/merges?status=cancelled", headers=h).json()["items"]
    assert [j["id"] for j in only] == [ids[0]]
    assert svc.client.get("/v1/merges?cursor=garbage", headers=h).json()["error"]["code"] == "invalid_cursor"
    assert svc.client.get("/v1/merges?status=bogus", headers=h).status_code == 422


def test_cancel_queued_then_finished_is_409(svc, idle):
    job = idle.post("/v1/merges", json=svc.classic(), headers=svc.h()).json()
    assert job["status"] == "queued"
    r = svc.client.post(f"/v1/merges/{job['id']}/cancel", headers=svc.h())
    assert r.status_code == 202 and r.json()["status"] == "cancelled" and r.json()["finished_at"]
    again = svc.client.post(f"/v1/merges/{job['id']}/cancel", headers=svc.h())
    assert again.status_code == 409 and again.json()["error"]["code"] == "job_finished"


@pytest.mark.parametrize(
    ("mutate", "field", "offending"),
    [
        (lambda b, r: b["models"][0].update(model="/etc"), "models.0.model", "/etc"),
        (lambda b, r: b.update(base_model=f"{r}/../../etc"), "base_model", "{r}/../../etc"),
        (lambda b, r: b["models"][1].update(model="file:///etc/passwd"), "models.1.model", "/etc/passwd"),
        (lambda b, r: b["models"][0].update(model="./models/ft1"), "models.0.model", "./models/ft1"),
        (lambda b, r: b.update(output={"path": "/tmp/elsewhere"}), "output.path", "/tmp/elsewhere"),
        # models read only for their tokenizer are under the allow-list too
        (lambda b, r: b.update(tokenizer_source="model:/etc"), "tokenizer_source", "/etc"),
        (lambda b, r: b.update(tokenizer={"source": "/srv/other"}), "tokenizer.source", "/srv/other"),
        (
            lambda b, r: b.update(
                merge_method="divmerge",
                parameters={},  # task_arithmetic's lambda is not a divmerge parameter
                models=[{"model": m["model"], "data": {"path": "/etc/hosts"}} for m in b["models"]],
            ),
            "models.0.data.path",
            "/etc/hosts",
        ),
    ],
)
def test_paths_outside_roots_are_422(svc, mutate, field, offending):
    """Refused with the field, and a message naming the offending path and the allowed roots."""
    body = svc.classic()
    parent = str(svc.models["base"].parent)
    mutate(body, parent)
    r = svc.client.post("/v1/merges", json=body, headers=svc.h())
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert (error["code"], error["field"]) == ("path_not_allowed", field), error
    assert repr(offending.format(r=parent)) in error["message"], error["message"]
    for root in svc.settings.roots:  # the allow-list: DIVMERGE_HOME and DIVMERGE_LOCAL_ROOTS
        assert repr(str(root)) in error["message"], error["message"]


def test_invalid_configs_and_limits(svc):
    post = lambda body, **kw: svc.client.post("/v1/merges", json=body, headers=svc.h(), **kw)  # noqa: E731
    no_base = svc.classic()
    del no_base["base_model"]
    r = post(no_base)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_config"
    r = post({**svc.classic(), "models": [{"model": "acme/x", "parameters": {"density": 2}}]})
    assert r.json()["error"]["field"] == "models.0.parameters.density"
    r = post({**svc.classic(), "models": [{"model": f"acme/m{i}"} for i in range(5)]})
    assert r.status_code == 422 and r.json()["error"] == {
        "code": "limit_exceeded", "message": "the number of models is 5, the limit is 4", "field": "models"
    }  # fmt: skip
    texts = {"merge_method": "divmerge", "base_model": "acme/b",
             "models": [{"model": "acme/a", "data": {"texts": ["a b"] * 101}}]}  # fmt: skip
    r = post(texts)
    assert r.status_code == 422 and r.json()["error"]["field"] == "models.0.data.texts"
    r = post({**texts, "models": [{"model": "acme/a", "data": {"texts": ["a"], "num_samples": 10**6}}]})
    assert r.json()["error"]["field"] == "models.0.data.num_samples"
    r = post({**texts, "models": [{"model": "acme/a", "data": {"texts": ["x " * 150_000]}}]})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    r = svc.client.post(
        "/v1/merges", content=b"{not json", headers={**svc.h(), "content-type": "application/json"}
    )
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_json"


def test_health_ready_metrics(svc):
    assert svc.client.get("/healthz").json() == {"status": "ok"}
    ready = svc.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "broker": "ok"}
    svc.client.get("/v1/merges", headers=svc.h())
    text = svc.client.get("/metrics").text
    assert 'divmerge_queue_depth{queue="gpu"}' in text and 'divmerge_queue_depth{queue="cpu"}' in text
    for name in ("divmerge_jobs{", "divmerge_queue_depth", "divmerge_job_duration_seconds_bucket",
                 "divmerge_http_request_duration_seconds_bucket"):  # fmt: skip
        assert name in text
    assert 'route="/v1/merges",status="200"' in text


def test_readyz_reports_a_dead_broker(svc):
    settings = Settings(broker_url="redis://127.0.0.1:1/0")
    with TestClient(create_app(settings)) as client:
        r = client.get("/readyz")
    assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"


def test_openapi_documents_the_merge_config(svc):
    schema = svc.client.get("/openapi.json").json()
    assert "MergeConfig" in schema["components"]["schemas"]
    assert svc.client.get("/docs").status_code == 200


def test_api_imports_neither_torch_nor_worker():
    code = "import sys, divmerge_api.main, divmerge_api.cli; bad = [m for m in ('torch', 'divmerge_worker') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_worker_imports_no_api_routes():
    code = (
        "import sys, divmerge_worker.runner, divmerge_worker.reconciler, divmerge_worker.embedded, divmerge_worker.upload;"
        "print([m for m in sys.modules if m.startswith(('divmerge_api.routers', 'divmerge_api.main', 'divmerge_api.security'))])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_one_database_session_per_request(tmp_path):
    """divmerge_api.deps: the token lookup and the handler share the request's one session (the caller dependency
    used to open a second one on every request)."""
    from fastapi.testclient import TestClient
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    from divmerge_api.main import create_app
    from divmerge_api.security import create_token
    from divmerge_service.config import Settings
    from divmerge_service.db import migrate, session_scope

    settings = Settings(home=tmp_path / "home", database_url=f"sqlite:///{tmp_path / 'one.db'}")
    migrate(settings.db_url)
    with session_scope(settings.db_url) as s:
        _, token = create_token(s, "one-session")
    sessions: set[int] = set()

    def began(session, _transaction, _connection):
        sessions.add(id(session))

    event.listen(Session, "after_begin", began)
    try:
        client = TestClient(create_app(settings))
        headers = {"Authorization": f"Bearer {token}"}
        for path, status in (("/v1/merges", 200), ("/v1/merges/nope", 404), ("/v1/merges/nope/events", 404)):
            sessions.clear()
            assert client.get(path, headers=headers).status_code == status
            assert len(sessions) == 1, f"GET {path} opened {len(sessions)} sessions"
    finally:
        event.remove(Session, "after_begin", began)
