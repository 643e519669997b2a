"""Hardening through the real service: files of a model folder that escape the roots, a spec that must
round-trip exactly, bounded and finite inputs, Hub id rules, deep JSON, HTTP details, the job time limit."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from divmerge_core.config import MergeConfig, config_class
from tests.tiny import make_bert_classifier, perturbed, save

pytestmark = pytest.mark.service

SECRET = "TOP-SECRET-VALUE-42"


@pytest.fixture
def hostile(svc, tmp_path):
    """A copy of the tiny family under the allowed roots, and a secret outside them."""
    root = svc.models["base"].parent / f"hostile-{tmp_path.name}"
    for name in ("base", "ft1", "ft2"):
        shutil.copytree(svc.models[name], root / name)
    (tmp_path / "secret.txt").write_text(SECRET)
    shutil.copytree(svc.models["ft1"], tmp_path / "weights")
    yield {"root": root, "secret": tmp_path / "secret.txt", "weights": tmp_path / "weights"}
    shutil.rmtree(root, ignore_errors=True)


def _body(root: Path, out: Path) -> dict:
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(root / "base"),
        "models": [{"model": str(root / "ft1")}, {"model": str(root / "ft2")}],
        "output": {"path": str(out)},
    }


def _symlink_vocab(h):
    os.symlink(h["secret"], h["root"] / "base" / "vocab.txt")
    return "base_model", "vocab.txt"


def _symlink_environ(h):
    os.symlink("/proc/self/environ", h["root"] / "base" / "tokenizer_config.json.bak")
    return "base_model", "tokenizer_config.json.bak"


def _symlink_weights(h):
    (h["root"] / "ft2" / "model.safetensors").unlink()
    os.symlink(h["weights"] / "model.safetensors", h["root"] / "ft2" / "model.safetensors")
    return "models.1.model", "model.safetensors"


def _index_escape(h):
    ft1 = h["root"] / "ft1"
    (ft1 / "model.safetensors").unlink()
    shard = os.path.relpath(h["weights"] / "model.safetensors", ft1)
    assert shard.startswith("../")
    with safe_open(str(h["weights"] / "model.safetensors"), "pt") as f:
        index = {"weight_map": {k: shard for k in f.keys()}}  # noqa: SIM118
    (ft1 / "model.safetensors.index.json").write_text(json.dumps(index))
    return "models.0.model", "shards must be plain file names"


ESCAPES = [_symlink_vocab, _symlink_environ, _symlink_weights, _index_escape]


@pytest.mark.parametrize("escape", ESCAPES, ids=lambda f: f.__name__)
def test_model_folder_escapes_are_refused_at_submit(svc, hostile, escape):
    field, named = escape(hostile)
    out = hostile["root"] / "out"
    r = svc.client.post("/v1/merges", json=_body(hostile["root"], out), headers=svc.h())
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "path_not_allowed" and err["field"] == field, err
    assert named in err["message"], err
    assert not out.exists()


@pytest.mark.parametrize("escape", ESCAPES, ids=lambda f: f.__name__)
def test_model_folder_escapes_fail_the_job_in_the_worker(svc, hostile, escape):
    """The folder is clean when submitted and turns hostile before the worker runs: the worker's own check
    fails the job with path_not_allowed, and nothing is written (no output, no secret anywhere)."""
    svc.stop_worker()
    out = hostile["root"] / "out"
    job = svc.submit(_body(hostile["root"], out))
    escape(hostile)
    svc.ensure_worker()
    done = svc.wait(job["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "path_not_allowed", done
    assert not out.exists() and not list(out.parent.glob(".out*"))


def _leaves(model: type, prefix: str = "") -> set[str]:
    """Every leaf field path of a pydantic model (lists of models are walked as their item model)."""
    out: set[str] = set()
    for name, f in model.model_fields.items():
        key = f.serialization_alias or f.alias or name
        inner = [a for a in getattr(f.annotation, "__args__", (f.annotation,)) if hasattr(a, "model_fields")]
        for a in getattr(f.annotation, "__args__", ()):  # list[ModelSpec]
            inner += [b for b in getattr(a, "__args__", ()) if hasattr(b, "model_fields")]
        if hasattr(f.annotation, "model_fields"):
            inner.append(f.annotation)
        if inner:
            for m in inner:
                out |= _leaves(m, f"{prefix}{key}.")
        else:
            out.add(f"{prefix}{key}")
    return out


#: schema fields whose value is a free-form mapping (a leaf, whatever keys it holds)
_MAPPINGS = {"evaluation.compare.parameters", "models.eval.answers"}


def _set_leaves(value, prefix: str = "") -> set[str]:
    if isinstance(value, dict) and prefix.rstrip(".") not in _MAPPINGS:
        return set().union(*(_set_leaves(v, f"{prefix}{k}.") for k, v in value.items()))
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return set().union(*(_set_leaves(v, prefix) for v in value))
    return {prefix.rstrip(".")}


def test_every_field_round_trips_to_the_worker(svc):
    """A divmerge config with every schema field set to a non-default value: GET returns it unchanged, the
    worker's merge_config.yaml holds all of it (max_new_tokens included), and changing one value under the
    same Idempotency-Key is a 409."""
    roots = svc.models["base"].parent.parent
    bert = make_bert_classifier(seed=0, num_labels=3)  # config.json lists id2label (data.labels needs it)
    m = {n: save(perturbed(bert, 0.05, seed=i) if i else bert, roots / "models" / f"rt-{n}")
         for i, n in enumerate(("base", "ft1", "ft2"))}  # fmt: skip
    data = roots / "datasets" / "roundtrip.jsonl"
    data.write_text("".join(json.dumps({"text": t, "x": t}) + "\n" for t in ["a b c", "red blue", "cat dog"]))
    held_out = roots / "datasets" / "roundtrip-eval.jsonl"
    held_out.write_text(
        "".join(json.dumps({"x": t, "gold": i % 3}) + "\n" for i, t in enumerate(["up", "x y", "9"]))
    )
    out = roots / "outputs" / "roundtrip"
    config = {
        "merge_method": "divmerge",
        "base_model": str(m["base"]),
        "models": [
            {"model": str(m["base"]), "data": {"texts": ["yes no", "up down"]}},
            {
                "model": str(m["ft1"]),
                "data": {
                    "dataset": "acme/tiny-texts",
                    "config": "default",
                    "split": "train[:5]",
                    "text_columns": ["text"],
                    "num_samples": 4,
                    "seed": 3,
                    "labels": ["LABEL_2", 0],
                },
                "name": "first",
                "eval": {
                    "dataset": "acme/tiny-labelled",
                    "config": "default",
                    "split": "validation[:8]",
                    "text_columns": ["sentence"],
                    "label_column": "label",
                    "num_samples": 6,
                    "seed": 2,
                },
            },
            {
                "model": str(m["ft2"]),
                "data": {"path": str(data), "template": "{x} .", "num_samples": 3},
                "eval": {"path": str(held_out), "template": "{x} !", "label_column": "gold"},
            },
        ],
        "evaluation": {
            "compare": [{"merge_method": "task_arithmetic", "parameters": {"lambda": 0.5}}],
            "select": "best",
            "base": True,
        },
        "parameters": {
            "seed": 7,
            "granularity": "tensor",
            "divergence": "kl",
            "lr": 0.02,
            "epochs": 2,
            "batch_size_per_task": 2,
            "init": 0.4,
            "max_length": 64,
            "max_new_tokens": 7,
            "top_k": 5,
            "placement": "resident",
            "gradient_checkpointing": False,
            "micro_batch_size": 2,
            "teacher": "cached",
            "lr_schedule": "cosine",
            "warmup_steps": 1,
            "warmup_ratio": 0.1,
            "heldout": 0.2,
            "patience": 3,
            "min_delta": 0.01,
            "tau_sparsify": "magnitude",
            "tau_density": 0.3,
            "tau_consensus": "sign",
            "pull": 0.5,
        },
        "chat_template": "chatml",
        "dtype": "bfloat16",
        "out_dtype": "float32",
        "output": {"path": str(out), "private": False, "overwrite": True},
    }
    hub_output = {"repo_id": "team-a/roundtrip"}  # the alternative to output.path (exactly one is given)
    chat = {"models.data.chat_template", "models.data.system_prompt"}  # causal LMs only: checked below
    chat |= {f"models.eval.{f}" for f in ("chat_template", "system_prompt", "answers", "max_new_tokens")}
    chat |= {"models.eval.texts", "models.eval.labels"}  # the causal job's eval set
    # slices and the tokenizer sources: classic merges only (refused with learned methods; the tokenizer
    # fields are checked against mergekit in tests/test_tokenizer_sources.py)
    classic_only = ("slices.", "tokenizer.", "tokenizer_source")
    schema = {f for f in _leaves(config_class("divmerge")) if not f.startswith(classic_only)}
    covered = _set_leaves(config) | {"output.repo_id"} | chat
    assert covered == schema, f"set these fields too: {schema - covered}"
    expected = MergeConfig.model_validate(config).model_dump(mode="json", by_alias=True, exclude_none=True)
    assert _within(config, expected), "normalising keeps every value (it only adds defaults)"

    job = svc.submit(config, key="roundtrip")
    assert job["spec"] == expected
    r = svc.client.post(
        "/v1/merges",
        json={**config, "parameters": {**config["parameters"], "max_new_tokens": 8}},
        headers=svc.h(key="roundtrip"),
    )
    assert r.status_code == 409, r.text
    svc.ensure_worker()
    done = svc.wait(job["id"], timeout=180)
    assert done["status"] == "succeeded", done["error"]
    assert done["spec"] == expected
    assert yaml.safe_load((out / "merge_config.yaml").read_text()) == expected
    # the chat fields (causal LMs): stored exactly as sent
    causal = {
        "merge_method": "divmerge",
        "base_model": str(svc.models["gpt_base"]),
        "models": [
            {"model": str(svc.models[f"gpt_ft{i}"]),
             "data": {"texts": ["a b"], "chat_template": True, "system_prompt": f"Task {i}."},
             "eval": {"texts": ["c d", "e f"], "labels": ["yes", "no"], "chat_template": True,
                      "system_prompt": f"Eval {i}.", "answers": {"yes": ["yes", "y"], "no": "no"},
                      "max_new_tokens": 3}}
            for i in (1, 2)
        ],
    }  # fmt: skip
    chat_job = svc.submit(causal)
    svc.client.post(f"/v1/merges/{chat_job['id']}/cancel", headers=svc.h())
    stored = svc.get(chat_job["id"])["spec"]["models"]
    assert [(d["data"]["chat_template"], d["data"]["system_prompt"]) for d in stored] == [
        (True, "Task 1."),
        (True, "Task 2."),
    ]
    assert all(_within(m["eval"], d["eval"]) for m, d in zip(causal["models"], stored, strict=True))
    alt = svc.submit({**config, "output": hub_output}, key="roundtrip-hub")
    svc.client.post(f"/v1/merges/{alt['id']}/cancel", headers=svc.h())
    assert svc.get(alt["id"])["spec"]["output"] == {**hub_output, "private": True, "overwrite": False}


def _within(part, whole) -> bool:
    """Every value of ``part`` is in ``whole`` at the same place (``whole`` may hold more keys)."""
    if isinstance(part, dict):
        return isinstance(whole, dict) and all(k in whole and _within(v, whole[k]) for k, v in part.items())
    if isinstance(part, list) and part and isinstance(part[0], dict):
        return len(part) == len(whole) and all(_within(a, b) for a, b in zip(part, whole, strict=True))
    return part == whole


def _post(svc, body):
    return svc.client.post("/v1/merges", json=body, headers=svc.h())


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"epochs": 10**12}, "parameters.epochs"),
        ({"max_length": 10**7}, "parameters.max_length"),
        ({"batch_size_per_task": 100_000}, "parameters.batch_size_per_task"),
        ({"max_new_tokens": 100_000}, "parameters.max_new_tokens"),
    ],
)
def test_unbounded_work_is_422_naming_the_field(svc, params, field):
    m = svc.models
    learned = {"merge_method": "divmerge", "base_model": str(m["gpt_base"]),
               "models": [{"model": str(m[n]), "data": {"texts": ["a b"]}} for n in ("gpt_ft1", "gpt_ft2")]}  # fmt: skip
    r = _post(svc, {**learned, "parameters": params})
    assert r.status_code == 422 and r.json()["error"]["code"] == "limit_exceeded", r.text
    assert r.json()["error"]["field"] == field


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b'"lr": 1e999', "parameters.lr"),
        (b'"lambda": -1e400', "parameters.lambda"),
        (b'"eps": NaN', "parameters.eps"),
        (b'"init": Infinity', "parameters.init"),
    ],
)
def test_non_finite_numbers_are_422(svc, raw, field):
    body = json.dumps(svc.classic()).encode()[:-1] + b', "parameters": {' + raw + b"}}"
    body = body.replace(b'"parameters": {"lambda": 0.5}, ', b"")
    r = svc.client.post("/v1/merges", content=body, headers={**svc.h(), "content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == field and "finite" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    ("ref", "where"),
    [
        ("a/..@../../../../etc", "models"),
        ("acme/tiny@../../x", "models"),
        ("acme/ti--ny", "models"),
        ("acme/tiny@main//x", "models"),
        ("acme/tiny@.hidden", "models"),
        ("-acme/tiny", "models"),
        ("", "models"),
        ("acme/../x", "dataset"),
    ],
)
def test_bad_hub_ids_and_revisions_are_422(svc, ref, where):
    body = svc.classic()
    if where == "models":
        body["models"][0]["model"] = ref
        field = "models.0.model"
    else:
        body = {"merge_method": "divmerge", "base_model": "acme/b",
                "models": [{"model": "acme/a", "data": {"dataset": ref}}]}  # fmt: skip
        field = "models.0.data"
    r = _post(svc, body)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_config", r.text
    assert r.json()["error"]["field"] == field


def test_good_hub_ids_are_accepted(svc):
    from fastapi.testclient import TestClient

    from divmerge_api.main import create_app
    from divmerge_service.config import Settings

    refs = ("acme/tiny-base", "acme/tiny.base@v1.0", "acme/tiny_base@refs/pr/1", "gpt2", "a/b@" + "f" * 40)
    with TestClient(create_app(Settings(cpu_queue="idle", gpu_queue="idle"))) as idle:
        for ref in refs:
            body = svc.classic()
            body["models"][0]["model"] = ref
            r = idle.post("/v1/merges", json=body, headers=svc.h())
            assert r.status_code == 202, (ref, r.text)
            idle.post(f"/v1/merges/{r.json()['id']}/cancel", headers=svc.h())


@pytest.mark.parametrize("opener", [b"[", b'{"a":'])
def test_deeply_nested_json_is_422(svc, opener):
    depth = 100_000 if opener == b"[" else 50_000
    closer = b"]" if opener == b"[" else b"}"
    body = opener * depth + (b"1" if opener != b"[" else b"") + closer * depth
    r = svc.client.post("/v1/merges", content=body, headers={**svc.h(), "content-type": "application/json"})
    assert r.status_code in (413, 422), r.text
    if len(body) <= svc.settings.max_body_bytes:
        assert r.json()["error"]["code"] == "invalid_json"
    shallow = b"[" * 40 + b"]" * 40  # small enough for the body limit: still refused for its depth
    r = svc.client.post(
        "/v1/merges", content=shallow, headers={**svc.h(), "content-type": "application/json"}
    )
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_json"
    assert "levels deep" in r.json()["error"]["message"]


def test_405_keeps_allow_and_openapi_details(svc):
    r = svc.client.put("/v1/merges", headers=svc.h())
    assert r.status_code == 405 and "POST" in r.headers["allow"]  # Starlette names the first matching route's
    assert r.json()["error"]["code"] == "method_not_allowed"
    doc = svc.client.get("/openapi.json").json()
    assert set(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    limit = next(p for p in doc["paths"]["/v1/merges"]["get"]["parameters"] if p["name"] == "limit")
    assert limit["schema"]["maximum"] == svc.settings.list_limit_max == 100
    spec = doc["components"]["schemas"]
    assert spec["ModelSpec"]["properties"]["model"]["minLength"] == 1
    base = spec["MergeConfig"]["properties"]["base_model"]["anyOf"]
    assert {"type": "string", "minLength": 1} in base


def test_job_time_limit_fails_with_timeout_and_cleans_up(svc):
    svc.stop_worker()
    w = svc.new_worker(DIVMERGE_MAX_JOB_S="3", DIVMERGE_STEP_DELAY_S="0.1")  # the deep merge takes ~27 s
    try:
        out = svc.models["base"].parent.parent / "outputs" / "too-slow"
        job = svc.submit(svc.classic("deep_", output={"path": str(out)}))
        done = svc.wait(job["id"], timeout=60)
        assert done["status"] == "failed" and done["error"]["code"] == "timeout", done
        assert "3 s" in done["error"]["message"] and done["attempts"] == 1
        assert not out.exists() and not list(out.parent.glob(".too-slow*")), "partial output left behind"
        started, finished = done["started_at"], done["finished_at"]
        assert started and finished
    finally:
        w.stop()
        svc.new_worker()


def test_json_depth_ignores_brackets_inside_strings():
    from divmerge_api.spec import json_depth

    assert json_depth(json.dumps({"a": "[[[{{{", "b": [['\\"]]]', {"c": "\\"}]]})) == 4
    assert json_depth("[" * 50 + "]" * 50, stop_above=32) == 33  # the scan stops past the limit
    assert json_depth('"no nesting"') == 0


def test_per_team_cap_on_running_jobs(svc):
    """MAX_RUNNING_PER_TEAM=1 with two workers: team-a's second job waits for its first, while team-b's job
    runs alongside."""
    svc.stop_worker()
    cap = {"DIVMERGE_MAX_RUNNING_PER_TEAM": "1", "DIVMERGE_STEP_DELAY_S": "0.02"}
    workers = [svc.new_worker(**cap), svc.new_worker(**cap)]
    try:
        a = [svc.submit(svc.classic("deep_")) for _ in range(2)]
        b = svc.submit(svc.classic("deep_"), team="team-b")
        done_a = sorted((svc.wait(j["id"], timeout=120) for j in a), key=lambda j: j["started_at"])
        done_b = svc.wait(b["id"], timeout=120, team="team-b")
        assert all(j["status"] == "succeeded" for j in [*done_a, done_b])
        assert done_a[1]["started_at"] >= done_a[0]["finished_at"], "team-a ran two jobs at once"
        assert done_b["started_at"] < done_a[0]["finished_at"], "team-b was held back by team-a's cap"
        assert any("its team already runs 1 job(s)" in w.log.read_text() for w in workers)
    finally:
        for w in workers:
            w.stop()
        svc.new_worker()
