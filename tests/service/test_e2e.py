"""End to end through the real worker: local models (classic and learned), the Hub download path against
a local olah Hub with uploads to a test double, and jobs that fail with the documented codes."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import yaml

from divmerge_service.queue import enqueue

pytestmark = pytest.mark.service


def card_front_matter(folder: Path) -> dict:
    text = (folder / "README.md").read_text()
    assert text.startswith("---")
    return yaml.safe_load(text.split("---")[1])


def test_classic_merge_to_local_path(svc):
    from transformers import AutoModelForSequenceClassification

    out = svc.models["base"].parent.parent / "outputs" / "classic"
    job = svc.submit(svc.classic(output={"path": str(out)}))
    assert job["status"] == "queued" and job["queue"] == "cpu"
    done = svc.wait(job["id"])
    assert done["status"] == "succeeded", done["error"]
    res = done["result"]
    assert res["destination"] == str(out) and res["coefficients"] is None
    assert {"config.json", "model.safetensors", "README.md", "merge_config.yaml"} <= set(res["files"])
    assert set(done["resolved"]) == {str(svc.models[k]) for k in ("base", "ft1", "ft2")}
    assert done["progress"]["stage"] == "done" and done["started_at"] <= done["finished_at"]
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.hidden_size == 32
    assert card_front_matter(out)
    assert "task_arithmetic" in (out / "README.md").read_text()
    assert not list(out.parent.glob(".*divmerge*")), "staging folders left behind"
    assert f"re-enqueued job {job['id']}" not in svc.worker.log.read_text(), "the API's own message was lost"


def test_divmerge_with_hub_dataset_and_inline_texts(svc):
    from transformers import AutoModelForCausalLM

    m = svc.models
    body = {
        "merge_method": "divmerge",
        "base_model": str(m["gpt_base"]),
        "models": [
            {"model": str(m["gpt_ft1"]), "data": {"dataset": "acme/tiny-texts", "num_samples": 4}},
            {"model": str(m["gpt_ft2"]), "data": {"texts": ["good bad", "left right . up", "x y z", "9 8"]}},
        ],
        "parameters": {"granularity": "task", "epochs": 2, "max_new_tokens": 4, "batch_size_per_task": 2},
    }
    teachers = svc.settings.home / "cache" / "teachers"
    before = set(teachers.glob("*.teacher.safetensors"))
    job = svc.submit(body)
    assert job["queue"] == "gpu"
    done = svc.wait(job["id"], timeout=120)
    assert done["status"] == "succeeded", done["error"]
    res = done["result"]
    coeffs = res["coefficients"]
    assert coeffs["method"] == "divmerge" and len(coeffs["tasks"]) == 2 and coeffs["coefficients"]
    assert res["metrics"]["steps"] > 0 and res["metrics"]["final_loss"] is not None
    assert (
        done["resolved"]["acme/tiny-texts"] == svc.olah.commits["acme/tiny-texts"]
    )  # dataset from the local Hub
    out = Path(res["destination"])
    assert out.parent == svc.settings.home / "outputs"
    AutoModelForCausalLM.from_pretrained(out)
    assert "divmerge" in (out / "README.md").read_text()
    # the teacher outputs went to the worker's teacher cache under its home, one entry per task
    assert len(set(teachers.glob("*.teacher.safetensors")) - before) == 2


def test_hub_models_via_local_hub_and_upload_once(svc, fake_hub_uploads):
    """Models come from olah (HF_ENDPOINT); the upload goes to FakeHubUploadDouble (olah cannot receive)."""
    body = {
        "merge_method": "ties",
        "base_model": "acme/tiny-base",
        "models": [{"model": "acme/tiny-ft1@main"}, {"model": "acme/tiny-ft2"}],
        "parameters": {"density": 0.5},
        "output": {"repo_id": "team-a/merged-ties"},
    }
    done = svc.wait(svc.submit(body)["id"])
    assert done["status"] == "succeeded", done["error"]
    commits = svc.olah.commits
    assert done["resolved"] == {
        "acme/tiny-base": commits["acme/tiny-base"],
        "acme/tiny-ft1@main": commits["acme/tiny-ft1"],
        "acme/tiny-ft2": commits["acme/tiny-ft2"],
    }
    uploads = [u for u in fake_hub_uploads() if u["repo_id"] == "team-a/merged-ties"]
    assert len(uploads) == 1
    up = uploads[0]
    assert done["result"]["destination"] == "hf://team-a/merged-ties"
    assert done["result"]["commit"] == up["commit"] and done["result"]["revision"] == "main"
    assert up["private"] is True and "README.md" in up["files"]
    assert up["token_sha256"] == hashlib.sha256(b"hf_team_a_secret_token").hexdigest()  # the team's token
    card = card_front_matter(svc.fake_hub / "repos" / "team-a/merged-ties" / up["commit"])
    assert commits["acme/tiny-ft1"] in json.dumps(card)
    assert not any((svc.settings.home / "tmp").glob(f"{done['id']}*")), "temp files left behind"


def test_transient_hub_error_is_retried_with_backoff(svc, fake_hub_uploads):
    """A Hub 503 on upload retries the delivery only: one merge, one attempt, one upload."""
    job = svc.submit(svc.classic(output={"repo_id": "team-a/flaky-repo", "private": False}))
    done = svc.wait(job["id"], timeout=60)
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 1 and done["error"] is None and done["last_error"] is None
    uploads = [u for u in fake_hub_uploads() if u["repo_id"] == "team-a/flaky-repo"]
    assert len(uploads) == 1 and uploads[0]["private"] is False
    events = svc.client.get(f"/v1/merges/{job['id']}/events", headers=svc.h()).json()["events"]
    retries = [e for e in events if e["kind"] == "delivery_retry"]
    assert len(retries) == 1 and "HTTP 503" in retries[0]["message"]
    assert [e["data"]["stage"] for e in events if e["kind"] == "stage"].count("write") == 1  # merged once


def test_secrets_never_reach_responses_rows_or_logs(svc, fake_hub_uploads):
    """The secrets really flow (a job downloads from the Hub with the deployment token and uploads with the
    team's token; a submit tries to carry a token), yet none of them is in any response, in any row of any
    table, in the worker logs or in any file the service wrote (outputs, kept results, journals, uploads)."""
    from sqlalchemy import text

    from divmerge_service.db import get_engine
    from divmerge_service.models import Base

    team_token, deployment_token = "hf_team_a_secret_token", "hf_deployment_secret_token"
    secrets = (team_token, deployment_token, svc.tokens["team-a"])
    smuggled = svc.client.post("/v1/merges", json={**svc.classic(), "hf_token": team_token}, headers=svc.h())
    assert smuggled.status_code == 422 and smuggled.json()["error"]["field"] == "hf_token", smuggled.text
    repo = "team-a/secrets-check"
    hub_job = {
        "merge_method": "task_arithmetic",
        "base_model": "acme/tiny-base",
        "models": [{"model": "acme/tiny-ft1"}, {"model": "acme/tiny-ft2"}],
        "output": {"repo_id": repo},
    }
    ids = [svc.submit(hub_job)["id"], svc.submit(svc.classic())["id"]]
    for job_id in ids:
        assert svc.wait(job_id)["status"] == "succeeded"
    uploads = [u for u in fake_hub_uploads() if u["repo_id"] == repo]  # the token did reach the uploader
    assert [u["token_sha256"] for u in uploads] == [hashlib.sha256(team_token.encode()).hexdigest()]

    responses = [smuggled.text, svc.client.get("/v1/merges?limit=100", headers=svc.h()).text]
    for job_id in ids:
        for tail in ("", "/events", "/files", "/coefficients", "/files/README.md", "/files/config.json"):
            responses.append(svc.client.get(f"/v1/merges/{job_id}{tail}", headers=svc.h()).text)
    with get_engine(svc.settings.db_url).connect() as conn:
        tables = {t: conn.execute(text(f"SELECT * FROM {t}")).all() for t in Base.metadata.tables}
    assert tables["jobs"] and tables["job_events"] and tables["api_tokens"]
    rows = json.dumps({t: [list(map(str, r)) for r in rs] for t, rs in tables.items()})
    logs = "".join(w.log.read_text() for w in svc.workers)
    written = [p for root in (svc.settings.home, svc.fake_hub) for p in Path(root).rglob("*") if p.is_file()]
    assert any(p.name == "model.safetensors" for p in written)
    for secret in secrets:
        assert not [r for r in responses if secret in r], "a secret in a response"
        assert secret not in rows, "a secret in a database row"
        assert secret not in logs, "a secret in the worker logs"
        assert not [p for p in written if secret.encode() in p.read_bytes()], "a secret in a written file"


def test_bad_inputs_fail_with_codes(svc):
    m = svc.models
    cases = {
        "model_not_found": {
            **svc.classic(),
            "models": [{"model": "acme/does-not-exist"}, {"model": str(m["ft1"])}],
        },
        "incompatible_models": {
            **svc.classic(),
            "models": [{"model": str(m["ft1"])}, {"model": str(m["other"])}],
        },
    }
    ids = {code: svc.submit(body)["id"] for code, body in cases.items()}
    for code, job_id in ids.items():
        done = svc.wait(job_id)
        assert done["status"] == "failed", done
        assert done["error"]["code"] == code.split(" ")[0], done["error"]
        assert done["attempts"] == 1  # not transient: no retry
        assert "Traceback" not in done["error"]["message"]


def test_duplicate_message_for_finished_job_is_dropped(svc):
    done = svc.wait(svc.submit(svc.classic())["id"])
    assert done["status"] == "succeeded"
    assert enqueue(svc.settings, done["id"], "cpu")
    time.sleep(2)
    again = svc.get(done["id"])
    assert again["attempts"] == done["attempts"] and again["finished_at"] == done["finished_at"]
    assert f"job {done['id']}: not claimable" in svc.worker.log.read_text()


def test_evaluated_job_compares_selects_and_reports(svc):
    """A classic job with eval sets (a Hub dataset with a label column, inline texts with labels): the
    worker merges, runs the compared method, scores everything, and the API, events and card say so."""
    m = svc.models
    body = svc.classic(parameters={"lambda": 0.0})  # the job's own merge is the base: a compared one wins
    body["models"][0]["eval"] = {"dataset": "acme/tiny-labelled", "text_columns": ["sentence"]}
    body["models"][1].update(
        name="inline", eval={"texts": ["cat dog", "red blue", "x y"], "labels": [1, 0, 1]}
    )
    body["evaluation"] = {"compare": ["linear"], "select": "best", "base": True}
    job = svc.submit(body)
    assert job["queue"] == "gpu"  # evaluating runs the models
    done = svc.wait(job["id"], timeout=120)
    assert done["status"] == "succeeded", done["error"]
    ev = done["result"]["evaluation"]
    assert set(ev["tasks"]) == {"ft1", "inline"} and ev["tasks"]["ft1"]["n"] == 12
    assert ev["tasks"]["ft1"]["source"] == "acme/tiny-labelled" and "base" in ev["tasks"]["inline"]
    assert [c["label"] for c in ev["compare"]] == ["task_arithmetic", "linear"]
    best = max(ev["compare"], key=lambda c: c["anp"])
    assert ev["selected"] == best["label"] and ev["anp"] == best["anp"]
    r = svc.client.get(f"/v1/merges/{job['id']}/evaluation", headers=svc.h())
    assert r.status_code == 200 and r.json()["anp"] == ev["anp"]
    assert svc.client.get(f"/v1/merges/{job['id']}/evaluation", headers=svc.h("team-b")).status_code == 404
    out = Path(done["result"]["destination"])
    assert json.loads((out / "evaluation.json").read_text())["anp"] == ev["anp"]
    assert "evaluation.json" in done["result"]["files"]
    index = card_front_matter(out)["model-index"][0]["results"]
    assert {r["task"]["name"] for r in index} == {"ft1", "inline"}
    events = svc.client.get(f"/v1/merges/{job['id']}/events", headers=svc.h()).json()["events"]
    assert any(e["kind"] == "evaluated" and e["data"]["selected"] == ev["selected"] for e in events)
    assert any(e["kind"] == "stage" and e["data"].get("stage") == "evaluate" for e in events)
    del m


def test_evaluation_route_without_eval_and_a_failed_evaluation(svc):
    plain = svc.wait(svc.submit(svc.classic())["id"])
    r = svc.client.get(f"/v1/merges/{plain['id']}/evaluation", headers=svc.h())
    assert r.status_code == 404 and "no 'eval' set" in r.json()["error"]["message"]
    # the tiny GPT-2 tokenizer has no chat template: the evaluation fails after the merge, which is kept
    m = svc.models
    body = {
        "merge_method": "linear",
        "models": [
            {
                "model": str(m["gpt_ft1"]),
                "eval": {"texts": ["a b"], "labels": ["yes"], "chat_template": True},
            },
            {"model": str(m["gpt_ft2"])},
        ],
    }
    done = svc.wait(svc.submit(body)["id"], timeout=120)
    assert done["status"] == "succeeded", done["error"]
    ev = svc.client.get(f"/v1/merges/{done['id']}/evaluation", headers=svc.h()).json()
    assert "chat template" in ev["error"] and ev["field"] == "models.0.eval.chat_template"
    assert (Path(done["result"]["destination"]) / "model.safetensors").is_file()
    events = svc.client.get(f"/v1/merges/{done['id']}/events", headers=svc.h()).json()["events"]
    assert any(e["kind"] == "evaluation_failed" for e in events)
