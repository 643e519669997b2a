"""The service as a team uses it (issue 10), through the real worker: fail fast at submit, the dry run,
delivery retried apart from the merge and kept for ``POST /retry``, progress and events, results over
HTTP, YAML bodies and the offline /docs."""

from __future__ import annotations

import hashlib

import pytest
from fastapi.testclient import TestClient

from divmerge_api.main import create_app
from divmerge_api.security import create_token
from divmerge_service.config import Settings
from divmerge_service.db import session_scope

from .doubles import FakeHubUploadDouble

pytestmark = pytest.mark.service


def events(svc, job_id: str) -> list[dict]:
    r = svc.client.get(f"/v1/merges/{job_id}/events", headers=svc.h())
    assert r.status_code == 200, r.text
    return r.json()["events"]


def refused(svc, body: dict, status: int) -> dict:
    r = svc.client.post("/v1/merges", json=body, headers=svc.h())
    assert r.status_code == status, r.text
    return r.json()["error"]


# ------------------------------------------------------------------ 1. fail fast at submit


def test_hub_output_without_a_write_token_is_refused_at_submit(svc):
    """team-c has no token of its own, and this server has no deployment-wide one."""
    with session_scope(svc.settings.db_url) as s:
        token = create_token(s, "team-c")[1]
    settings = Settings(hub_token=None, cpu_queue="idle", gpu_queue="idle")
    assert settings.hub_write_token("team-a") is not None and settings.hub_write_token("team-c") is None
    with TestClient(create_app(settings)) as client:
        h = {"Authorization": f"Bearer {token}"}
        r = client.post("/v1/merges", json=svc.classic(output={"repo_id": "team-c/x"}), headers=h)
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert (
            err["code"] == "no_hub_token" and err["field"] == "output.repo_id" and "team-c" in err["message"]
        )
        ok = client.post("/v1/merges", json=svc.classic(output={"repo_id": "team-a/x"}), headers=svc.h())
        assert ok.status_code == 202  # team-a has its own token


def test_existing_output_is_refused_unless_overwrite(svc):
    out = svc.models["base"].parent.parent / "outputs" / "existing"
    out.mkdir(parents=True)
    (out / "old.txt").write_text("previous result")
    err = refused(svc, svc.classic(output={"path": str(out)}), 409)
    assert err["code"] == "output_exists" and err["field"] == "output.path" and "overwrite" in err["message"]
    assert (out / "old.txt").exists()
    done = svc.wait(svc.submit(svc.classic(output={"path": str(out), "overwrite": True}))["id"])
    assert done["status"] == "succeeded", done["error"]
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    assert not list(out.parent.glob(".existing.divmerge-*")), "the replaced output was left behind"


def test_missing_local_model_or_data_is_refused_naming_the_field(svc):
    body = svc.classic()
    body["models"][1]["model"] = str(svc.models["base"].parent / "nope")
    err = refused(svc, body, 422)
    assert err["code"] == "model_not_found" and err["field"] == "models.1.model"
    m = svc.models
    learned = {
        "merge_method": "divmerge",
        "base_model": str(m["gpt_base"]),
        "models": [
            {"model": str(m["gpt_ft1"]), "data": {"path": str(m["gpt_base"].parent / "missing.jsonl")}},
            {"model": str(m["gpt_ft2"]), "data": {"texts": ["a b"]}},
        ],
    }
    err = refused(svc, learned, 422)
    assert err["code"] == "invalid_dataset" and err["field"] == "models.0.data.path"


def test_malformed_hub_ids_and_paths_outside_roots(svc):
    for ref, field in (("acme/bad--name", "models.0.model"), ("acme/x@../main", "models.0.model")):
        body = svc.classic()
        body["models"][0]["model"] = ref
        err = refused(svc, body, 422)
        assert err["code"] == "invalid_config" and err["field"] == field, err
    err = refused(svc, svc.classic(output={"path": "/etc/divmerge-out"}), 422)
    assert err["code"] == "path_not_allowed"
    for root in svc.settings.roots:  # the message says where paths may be
        assert str(root) in err["message"]


# ------------------------------------------------------------------ 2. dry run


def test_validate_names_a_missing_model_and_a_wrong_column(svc):
    m = svc.models
    bad = {
        "merge_method": "divmerge",
        "base_model": str(m["gpt_base"]),
        "models": [
            {"model": "acme/does-not-exist", "data": {"texts": ["a b", "c d"]}},
            {
                "model": str(m["gpt_ft2"]),
                "data": {"dataset": "acme/tiny-texts", "text_columns": ["sentence"]},
            },
        ],
    }
    r = svc.client.post("/v1/merges/validate", json=bad, headers=svc.h())
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["ok"] is False and report["estimate"] is None
    by_field = {p["field"]: p for p in report["problems"]}
    assert by_field["models.0.model"]["code"] == "model_not_found"
    assert by_field["models.1.data"]["code"] == "invalid_dataset"
    assert (
        "'sentence'" in by_field["models.1.data"]["message"]
        and "text" in by_field["models.1.data"]["message"]
    )
    before = svc.client.get("/v1/merges?limit=100", headers=svc.h()).json()["items"]

    good = svc.classic()
    r = svc.client.post("/v1/merges/validate", json=good, headers=svc.h())
    report = r.json()
    assert report == {"ok": True, "problems": [], "estimate": report["estimate"]}, report
    est = report["estimate"]
    assert est["tensors"] > 0 and est["parameters"] > 0 and est["output_bytes"] == 4 * est["parameters"]
    after = svc.client.get("/v1/merges?limit=100", headers=svc.h()).json()["items"]
    # newest first: a queued job would head the page even when the team already has 100 jobs or more
    assert [j["id"] for j in after] == [j["id"] for j in before], "the dry run queued a job"
    assert est["memory"] is None  # classic: streamed per tensor

    m = svc.models
    learned = {
        "merge_method": "divmerge",
        "base_model": str(m["gpt_base"]),
        "models": [{"model": str(m[n]), "data": {"texts": ["a b", "c d e"]}} for n in ("gpt_ft1", "gpt_ft2")],
    }
    report = svc.client.post("/v1/merges/validate", json=learned, headers=svc.h()).json()
    assert report["ok"], report
    memory = report["estimate"]["memory"]  # the engine's learned-memory estimate, per placement
    assert memory["n_tasks"] == 2 and memory["placements"] and memory["chosen"] in memory["placements"]


def test_validate_reports_submit_problems_and_incompatible_models(svc):
    body = svc.classic()
    body["models"][1]["model"] = str(svc.models["other"])
    report = svc.client.post("/v1/merges/validate", json=body, headers=svc.h()).json()
    assert not report["ok"] and {p["code"] for p in report["problems"]} == {"incompatible_models"}
    report = svc.client.post("/v1/merges/validate", json={"merge_method": "ties"}, headers=svc.h()).json()
    assert not report["ok"] and report["problems"][0]["code"] == "invalid_config"


# ------------------------------------------------------------------ 3. delivery, kept results, retry


def test_delivery_connection_errors_are_retried_without_merging_again(svc, fake_hub_uploads):
    repo = "team-a/connfail-2"
    done = svc.wait(svc.submit(svc.classic(output={"repo_id": repo}))["id"])
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 1 and done["last_error"] is None
    assert len([u for u in fake_hub_uploads() if u["repo_id"] == repo]) == 1
    evs = events(svc, done["id"])
    retries = [e for e in evs if e["kind"] == "delivery_retry"]
    assert len(retries) == 2 and all(e["data"]["code"] == "hub_unavailable" for e in retries)
    assert "ConnectError" in retries[0]["message"]
    stages = [e["data"]["stage"] for e in evs if e["kind"] == "stage"]
    assert stages.count("write") == 1 and "upload" in stages and "upload_wait" in stages


def test_retry_redelivers_a_kept_result(svc, fake_hub_uploads):
    repo = "team-a/down-repo"
    blocked = FakeHubUploadDouble.blocked_marker(svc.fake_hub, repo)
    svc.fake_hub.mkdir(parents=True, exist_ok=True)
    blocked.touch()
    failed = svc.wait(svc.submit(svc.classic(output={"repo_id": repo}))["id"])
    assert failed["status"] == "failed" and failed["error"]["code"] == "hub_unavailable"
    assert failed["attempts"] == 1 and failed["kept"] is not None
    assert f"/v1/merges/{failed['id']}/retry" in failed["error"]["message"]
    kept = svc.settings.home / "kept" / failed["id"]
    assert (kept / "model.safetensors").is_file()
    assert not [u for u in fake_hub_uploads() if u["repo_id"] == repo]

    blocked.unlink()
    r = svc.client.post(f"/v1/merges/{failed['id']}/retry", headers=svc.h())
    assert r.status_code == 202 and r.json()["status"] == "queued"
    done = svc.wait(failed["id"])
    assert done["status"] == "succeeded", done["error"]
    assert done["kept"] is None and done["result"]["destination"] == f"hf://{repo}"
    uploads = [u for u in fake_hub_uploads() if u["repo_id"] == repo]
    assert len(uploads) == 1 and done["result"]["commit"] == uploads[0]["commit"]
    assert not kept.exists()
    evs = events(svc, done["id"])
    assert [e["data"]["stage"] for e in evs if e["kind"] == "stage"].count("write") == 1  # not merged again
    assert any(e["kind"] == "retry_requested" and e["data"]["redeliver"] for e in evs)
    r = svc.client.post(f"/v1/merges/{done['id']}/retry", headers=svc.h())
    assert r.status_code == 409 and r.json()["error"]["code"] == "not_retryable"


def test_retry_without_a_kept_result_runs_the_merge_again(svc):
    body = svc.classic()
    body["models"][1]["model"] = str(svc.models["other"])
    failed = svc.wait(svc.submit(body)["id"])
    assert failed["status"] == "failed" and failed["kept"] is None
    r = svc.client.post(f"/v1/merges/{failed['id']}/retry", headers=svc.h())
    assert r.status_code == 202
    queued = r.json()
    assert queued["status"] == "queued" and queued["progress"]["stage"] == "queued"
    assert queued["error"] is None and queued["last_error"] is None
    again = svc.wait(failed["id"])
    assert again["status"] == "failed" and again["error"]["code"] == "incompatible_models"
    evs = events(svc, failed["id"])
    assert [e["kind"] for e in evs].count("claimed") == 2
    assert any(e["kind"] == "retry_requested" and not e["data"]["redeliver"] for e in evs)


# ------------------------------------------------------------------ 4. progress and events


def test_progress_has_elapsed_and_eta_while_running_and_events_name_the_worker(svc):
    svc.ensure_worker()
    job = svc.submit(svc.classic("deep_"))

    def writing():
        j = svc.get(job["id"])
        p = j["progress"]
        return j if j["status"] == "running" and p["stage"] == "write" and p["step"] >= 3 else None

    from .procs import wait_until

    running = wait_until(writing, 60, interval=0.05, what="the job writing")
    p = running["progress"]
    assert p["elapsed_s"] > 0 and p["eta_s"] is not None and p["eta_s"] > 0 and p["total"] > p["step"]
    done = svc.wait(job["id"])
    assert done["status"] == "succeeded" and done["progress"]["stage"] == "done"
    assert done["progress"]["eta_s"] is None and done["progress"]["elapsed_s"] > 0
    evs = events(svc, job["id"])
    kinds = [e["kind"] for e in evs]
    assert kinds[0] == "submitted" and kinds[-1] == "succeeded"
    claimed = next(e for e in evs if e["kind"] == "claimed")
    assert claimed["data"]["worker"] and claimed["data"]["worker"] in claimed["message"]
    stages = [e["data"]["stage"] for e in evs if e["kind"] == "stage"]
    assert stages == ["starting", "resolve", "validate", "write", "upload"]


def test_last_error_is_visible_while_a_delivery_waits_to_retry(svc):
    repo = "team-a/slow-down-repo"
    blocked = FakeHubUploadDouble.blocked_marker(svc.fake_hub, repo)
    svc.fake_hub.mkdir(parents=True, exist_ok=True)
    blocked.touch()
    try:
        job = svc.submit(svc.classic(output={"repo_id": repo}))
        from .procs import wait_until

        waiting = wait_until(
            lambda: (j := svc.get(job["id"]))["progress"]["stage"] == "upload_wait" and j,
            60,
            interval=0.02,
            what="the delivery to wait for a retry",
        )
        assert waiting["status"] == "running" and waiting["error"] is None
        assert waiting["last_error"]["code"] == "hub_unavailable"
    finally:
        blocked.unlink()
    assert svc.wait(job["id"])["status"] in ("succeeded", "failed")


# ------------------------------------------------------------------ 5. results over HTTP


def test_files_list_and_download_match_sha256(svc):
    out = svc.models["base"].parent.parent / "outputs" / "files"
    done = svc.wait(svc.submit(svc.classic(output={"path": str(out)}))["id"])
    assert done["status"] == "succeeded", done["error"]
    r = svc.client.get(f"/v1/merges/{done['id']}/files", headers=svc.h())
    assert r.status_code == 200, r.text
    listing = r.json()
    assert listing["hub"] is None
    names = {f["name"]: f for f in listing["files"]}
    assert {"model.safetensors", "config.json", "README.md"} <= set(names)
    for name in ("model.safetensors", "config.json"):
        got = svc.client.get(f"/v1/merges/{done['id']}/files/{name}", headers=svc.h())
        assert got.status_code == 200
        assert hashlib.sha256(got.content).hexdigest() == names[name]["sha256"]
        assert len(got.content) == names[name]["size"] == (out / name).stat().st_size
    for bad in ("..%2F..%2Fetc%2Fpasswd", ".divmerge-job.json", "missing.bin"):
        r = svc.client.get(f"/v1/merges/{done['id']}/files/{bad}", headers=svc.h())
        assert r.status_code == 404, (bad, r.status_code)
    r = svc.client.get(f"/v1/merges/{done['id']}/files", headers=svc.h("team-b"))
    assert r.status_code == 404


def test_hub_output_files_name_the_repo_and_commit(svc, fake_hub_uploads):
    done = svc.wait(svc.submit(svc.classic(output={"repo_id": "team-a/listed"}))["id"])
    assert done["status"] == "succeeded", done["error"]
    listing = svc.client.get(f"/v1/merges/{done['id']}/files", headers=svc.h()).json()
    up = next(u for u in fake_hub_uploads() if u["repo_id"] == "team-a/listed")
    assert listing["hub"] == {"repo_id": "team-a/listed", "commit": up["commit"]}
    assert {f["name"] for f in listing["files"]} == set(up["files"])
    r = svc.client.get(f"/v1/merges/{done['id']}/files/config.json", headers=svc.h())
    assert r.status_code == 409 and r.json()["error"]["code"] == "hub_output"


def test_coefficients_and_losses(svc):
    m = svc.models
    body = {
        "merge_method": "adamerging",
        "base_model": str(m["gpt_base"]),
        "models": [
            {"model": str(m["gpt_ft1"]), "data": {"texts": ["a b c", "d e", "f g h"]}},
            {"model": str(m["gpt_ft2"]), "data": {"texts": ["x y", "z w v", "q r"]}},
        ],
        "parameters": {"granularity": "layer", "epochs": 2, "batch_size_per_task": 2},
    }
    done = svc.wait(svc.submit(body)["id"], timeout=120)
    assert done["status"] == "succeeded", done["error"]
    c = svc.client.get(f"/v1/merges/{done['id']}/coefficients", headers=svc.h()).json()
    assert c["tasks"] == [str(m["gpt_ft1"]), str(m["gpt_ft2"])]
    assert len(c["values"]) == len(c["groups"]) > 1 and all(len(row) == 2 for row in c["values"])
    assert len(c["losses"]) == done["result"]["metrics"]["steps"]
    assert c["losses"][-1] == pytest.approx(done["result"]["metrics"]["final_loss"])
    assert c["heldout"] == [] and c["heldout_inputs"] == [0, 0] and c["converged"] is None  # 3 inputs each
    classic = svc.wait(svc.submit(svc.classic())["id"])
    r = svc.client.get(f"/v1/merges/{classic['id']}/coefficients", headers=svc.h())
    assert r.status_code == 404


def test_coefficients_report_heldout_and_convergence(svc):
    """A learned job with 21 inputs per task holds 4 out: the held-out row of each epoch is in the job's
    progress while it runs and in its coefficients, with the epoch kept, once done."""
    m = svc.models
    texts = [["a b c", "d e", "f g h"] * 7, ["x y", "z w v", "q r"] * 7]
    body = {
        "merge_method": "adamerging",
        "base_model": str(m["gpt_base"]),
        "models": [{"model": str(m[f"gpt_ft{i + 1}"]), "data": {"texts": t}} for i, t in enumerate(texts)],
        "parameters": {"granularity": "task", "epochs": 3, "batch_size_per_task": 6, "patience": 1},
    }
    done = svc.wait(svc.submit(body)["id"], timeout=120)
    assert done["status"] == "succeeded", done["error"]
    c = svc.client.get(f"/v1/merges/{done['id']}/coefficients", headers=svc.h()).json()
    assert c["heldout_inputs"] == [4, 4] and c["planned_steps"] == 9  # 17 training inputs, 6 per step
    assert c["steps"] == len(c["losses"]) and c["steps"] % 3 == 0
    assert [r[0] for r in c["heldout"]] == list(range(c["steps"] // 3 + 1))
    assert all(len(r) == 5 and r[2] == pytest.approx((r[3] + r[4]) / 2) for r in c["heldout"])
    assert c["best_epoch"] in [r[0] for r in c["heldout"]] and isinstance(c["converged"], bool)
    assert c["stopped_early"] == (c["steps"] < 9)
    assert done["progress"]["heldout"] == c["heldout"]


# ------------------------------------------------------------------ 6. YAML bodies, 7. offline /docs


def test_yaml_body_is_accepted(svc):
    import yaml

    text = yaml.safe_dump(svc.classic())
    h = {**svc.h(), "Content-Type": "application/yaml"}
    r = svc.client.post("/v1/merges", content=text, headers=h)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["spec"]["models"][0]["model"] == str(svc.models["ft1"])
    bomb = "a: &a [1, 2]\nb: [*a, *a]\n"
    r = svc.client.post("/v1/merges", content=bomb, headers=h)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_yaml"
    r = svc.client.post("/v1/merges", content="merge_method: [", headers=h)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_yaml"
    assert svc.wait(job["id"])["status"] == "succeeded"


def test_docs_work_offline_with_a_bearer_scheme(svc):
    html = svc.client.get("/docs").text
    assert "swagger-ui" in html.lower() and "https://" not in html and "http://" not in html
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        url = next(part.split('"')[0] for part in html.split('"/') if asset in part.split('"')[0])
        r = svc.client.get("/" + url)
        assert r.status_code == 200 and len(r.content) > 10_000, asset
    spec = svc.client.get("/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    assert any(s["type"] == "http" and s["scheme"] == "bearer" for s in schemes.values())
    assert spec["paths"]["/v1/merges"]["post"]["security"]
