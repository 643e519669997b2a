"""The client against a live server (the embedded ``divmerge serve`` on a free port): ``divmerge submit
--wait``, ``jobs``, ``status``, ``logs``, ``download``, ``cancel``, ``retry``, and the Python ``Client``."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
import yaml

from .procs import BIN, REPO, DivmergeServe, checkout_plugins

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def live(svc, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("client")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIVMERGE_", "HF_"))}
    plugins = checkout_plugins(tmp / "plugins")
    env.update(
        DIVMERGE_HOME=str(tmp / "home"),
        DIVMERGE_LOCAL_ROOTS=str(svc.models["base"].parent),
        PYTHONPATH=os.pathsep.join([str(REPO), str(plugins)]),
        OMP_NUM_THREADS="1",
        # each progress event waits a little, so a tiny merge stays running across a few polls and
        # --wait's progress bar has a stage to show (without it a fast machine finishes between two polls)
        DIVMERGE_STEP_DELAY_S="0.05",
    )
    # the token first: it creates and migrates the SQLite database, which the server then finds ready
    token = svc.cli("token", "create", "--team", "client-team", env=env).strip().splitlines()[-1]
    server = DivmergeServe(env, tmp / "serve.log").start()
    url = server.url
    try:
        server.wait_ready()
        env.update(DIVMERGE_URL=url, DIVMERGE_TOKEN=token)
        yield env, tmp, url, token
    finally:
        server.stop()


def divmerge(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "divmerge"), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_submit_wait_jobs_status_logs_download(svc, live):
    env, tmp, _, _ = live
    config = tmp / "merge.yaml"
    config.write_text(yaml.safe_dump(svc.classic()))
    res = divmerge(env, "submit", str(config), "--wait", "--poll", "0.2")
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.splitlines()[0].strip()
    assert f"{job_id}  succeeded" in res.stdout
    stages = ("starting", "resolve", "validate", "write", "upload")
    assert any(f"{stage}: " in res.stderr for stage in stages)  # the progress bar named a stage

    res = divmerge(env, "jobs")
    assert res.returncode == 0 and job_id in res.stdout and "task_arithmetic" in res.stdout
    res = divmerge(env, "status", job_id)
    assert res.returncode == 0 and "succeeded" in res.stdout and "ANP" not in res.stdout
    res = divmerge(env, "logs", job_id)
    assert res.returncode == 0 and "claimed" in res.stdout and "succeeded" in res.stdout

    out = tmp / "downloaded"
    res = divmerge(env, "download", job_id, str(out))
    assert res.returncode == 0, res.stderr
    served = tmp / "home" / "outputs" / job_id
    for name in ("model.safetensors", "config.json", "README.md"):
        assert (
            hashlib.sha256((out / name).read_bytes()).digest()
            == hashlib.sha256((served / name).read_bytes()).digest()
        )


def test_submit_wait_exits_non_zero_when_the_job_fails(svc, live):
    env, tmp, _, _ = live
    body = svc.classic()
    body["models"][1]["model"] = str(svc.models["other"])
    config = tmp / "bad.yaml"
    config.write_text(yaml.safe_dump(body))
    res = divmerge(env, "submit", str(config), "--wait", "--poll", "0.2", "-q")
    assert res.returncode == 1
    assert "failed  incompatible_models" in res.stdout


def test_server_and_token_flags_and_refusals(svc, live):
    env, tmp, url, token = live
    bare = {k: v for k, v in env.items() if k not in ("DIVMERGE_URL", "DIVMERGE_TOKEN")}
    res = divmerge(bare, "jobs", "--server", url, "--token", token)
    assert res.returncode == 0, res.stderr
    res = divmerge(bare, "jobs", "--server", url, "--token", "dm_wrong")
    assert res.returncode == 2 and res.stderr.startswith("divmerge: error: unauthorized")
    config = tmp / "outside.yaml"
    config.write_text(yaml.safe_dump(svc.classic(output={"path": "/etc/x"})))
    res = divmerge(env, "submit", str(config))
    assert res.returncode == 2 and "path_not_allowed" in res.stderr and "(output.path)" in res.stderr


def test_python_client(svc, live):
    _, _, url, token = live
    from divmerge_client import Client, ClientError

    with Client(url, token) as c:
        c.wait_ready(timeout_s=5)
        report = c.validate(svc.classic())
        assert report["ok"] and report["estimate"]["tensors"] > 0
        job = c.submit(yaml.safe_dump(svc.classic()))
        done = c.wait(job["id"], poll_s=0.2)
        assert done["status"] == "succeeded"
        assert {f["name"] for f in c.files(job["id"])["files"]} >= {"model.safetensors"}
        with pytest.raises(ClientError) as err:
            c.retry(job["id"])
        assert err.value.status == 409 and err.value.code == "not_retryable"
        with pytest.raises(ClientError) as err:  # a job without an eval set
            c.evaluation(job["id"])
        assert err.value.status == 404, err.value


def test_client_imports_no_engine():
    code = (
        "import sys, divmerge_client, divmerge_client.cli; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'divmerge_core', 'divmerge_api', 'divmerge_worker')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_status_prints_the_evaluation_table(svc, live):
    env, tmp, _, _ = live
    body = svc.classic()
    body["models"][0]["eval"] = {"texts": ["cat dog", "red blue", "x y", "up"], "labels": [0, 1, 1, 0]}
    body["models"][1]["eval"] = {"texts": ["a b", "left right"]}
    config = tmp / "evaluated.yaml"
    config.write_text(yaml.safe_dump(body))
    res = divmerge(env, "submit", str(config), "--wait", "--poll", "0.2")
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.splitlines()[0].strip()
    res = divmerge(env, "status", job_id)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    header = next(line for line in lines if line.startswith("task "))
    assert "expert" in header and "merged (task_arithmetic)" in header and "unparsed" in header
    assert any(line.startswith("ft1 ") and " 4 " in line for line in lines)
    assert any(line.startswith("ft2 ") for line in lines) and any(line.startswith("ANP") for line in lines)
