"""Session fixtures: a fresh PostgreSQL database, a private Redis, a local Hub (olah), tiny models, tokens
made with the CLI, a real Celery worker process, and the API app (in process, over HTTP semantics)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.tiny import make_bert_classifier, make_gpt2, perturbed, save

from .procs import BIN, REPO, CeleryWorker, Olah, PostgresDB, RedisServer, wait_until

FINISHED = ("succeeded", "failed", "cancelled")


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/service/" in str(item.fspath):
            item.add_marker(pytest.mark.service)


def make_models(root: Path) -> dict[str, Path]:
    """Tiny local models: BERT classifiers (classic merges), a deeper BERT (slow enough to interrupt),
    GPT-2 (learned merges with inline texts) and an incompatible BERT."""
    out: dict[str, Path] = {}
    bert = make_bert_classifier(seed=0)
    out["base"] = save(bert, root / "base")
    out["ft1"] = save(perturbed(bert, 0.05, seed=1), root / "ft1")
    out["ft2"] = save(perturbed(bert, 0.05, seed=2), root / "ft2")
    deep = make_bert_classifier(seed=0, num_hidden_layers=16)
    out["deep_base"] = save(deep, root / "deep_base")
    out["deep_ft1"] = save(perturbed(deep, 0.05, seed=1), root / "deep_ft1")
    out["deep_ft2"] = save(perturbed(deep, 0.05, seed=2), root / "deep_ft2")
    gpt = make_gpt2(seed=0)
    out["gpt_base"] = save(gpt, root / "gpt_base")
    out["gpt_ft1"] = save(perturbed(gpt, 0.3, seed=1), root / "gpt_ft1")
    out["gpt_ft2"] = save(perturbed(gpt, 0.3, seed=2), root / "gpt_ft2")
    out["other"] = save(make_bert_classifier(seed=3, hidden_size=48), root / "other")
    return out


@dataclass
class Service:
    tmp: Path
    env: dict[str, str]
    db: PostgresDB
    redis: RedisServer
    olah: Olah
    models: dict[str, Path]
    fake_hub: Path
    client: object = None
    settings: object = None
    tokens: dict[str, str] = field(default_factory=dict)
    worker: CeleryWorker | None = None
    workers: list[CeleryWorker] = field(default_factory=list)

    # --- processes
    def new_worker(self, wait: bool = True, **env: str) -> CeleryWorker:
        w = CeleryWorker({**self.env, **env}, self.tmp)
        self.workers.append(w)
        self.worker = w.start(wait=wait)
        return w

    def ensure_worker(self) -> CeleryWorker:
        if self.worker is None or not self.worker.alive():
            self.new_worker()
        return self.worker

    def stop_worker(self) -> None:
        if self.worker is not None:
            self.worker.stop()

    def cli(self, *args: str, env: dict | None = None) -> str:
        res = subprocess.run([str(BIN / "divmerge"), *args], env=env or self.env, capture_output=True, text=True,
                             timeout=60)  # fmt: skip
        assert res.returncode == 0, res.stderr
        return res.stdout

    # --- HTTP helpers
    def h(self, team: str = "team-a", key: str | None = None) -> dict:
        headers = {"Authorization": f"Bearer {self.tokens[team]}"}
        if key:
            headers["Idempotency-Key"] = key
        return headers

    def submit(self, body: dict, team: str = "team-a", key: str | None = None) -> dict:
        r = self.client.post("/v1/merges", json=body, headers=self.h(team, key))
        assert r.status_code == 202, r.text
        return r.json()

    def get(self, job_id: str, team: str = "team-a") -> dict:
        r = self.client.get(f"/v1/merges/{job_id}", headers=self.h(team))
        assert r.status_code == 200, r.text
        return r.json()

    def wait(self, job_id: str, until=FINISHED, timeout: float = 90, team: str = "team-a") -> dict:
        def check():
            job = self.get(job_id, team)
            return job if job["status"] in until else None

        return wait_until(check, timeout, interval=0.1, what=f"job {job_id} in {until}")

    def classic(self, prefix: str = "", **extra) -> dict:
        m = self.models
        return {
            "merge_method": "task_arithmetic",
            "base_model": str(m[f"{prefix}base"]),
            "models": [{"model": str(m[f"{prefix}ft1"])}, {"model": str(m[f"{prefix}ft2"])}],
            "parameters": {"lambda": 0.5},
            **extra,
        }


SERVICE_SETTINGS = {
    # short intervals so that the fault tests run in seconds (defaults are minutes)
    "DIVMERGE_LEASE_S": "3",
    "DIVMERGE_HEARTBEAT_S": "0.5",
    "DIVMERGE_PROGRESS_INTERVAL_S": "0.3",
    "DIVMERGE_RECONCILE_INTERVAL_S": "0.5",
    "DIVMERGE_QUEUED_STALE_S": "3",
    "DIVMERGE_RETRY_BACKOFF_S": "0.5",
    "DIVMERGE_MAX_ATTEMPTS": "3",
    "DIVMERGE_STEP_DELAY_S": "0.02",
    "DIVMERGE_DELIVERY_ATTEMPTS": "3",
    "DIVMERGE_DELIVERY_BACKOFF_S": "0.3",
    "DIVMERGE_HUB_UPLOADER": "tests.service.doubles:FakeHubUploadDouble",
    "DIVMERGE_HUB_TOKEN": "hf_deployment_secret_token",
    "DIVMERGE_TEAM_HUB_TOKENS": json.dumps({"team-a": "hf_team_a_secret_token"}),
    "DIVMERGE_MAX_MODELS": "4",
    "DIVMERGE_MAX_BODY_BYTES": "200000",
    "DIVMERGE_MAX_INLINE_TEXTS": "100",
    # webhooks (test_webhooks.py): receivers on loopback, short timeout and backoff
    "DIVMERGE_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
    "DIVMERGE_WEBHOOK_SECRET_KEY": "test-only webhook sealing key",
    "DIVMERGE_WEBHOOK_TIMEOUT_S": "1",
    "DIVMERGE_WEBHOOK_ATTEMPTS": "5",
    "DIVMERGE_WEBHOOK_BACKOFF_S": "0.2",
    "DIVMERGE_WEBHOOK_POLL_S": "0.2",
}


@pytest.fixture(scope="session")
def svc(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("service")
    roots = tmp / "roots"
    models = make_models(roots / "models")
    olah = Olah(tmp / "olah")
    for name in ("base", "ft1", "ft2"):
        olah.add_model(f"acme/tiny-{name}", models[name])
    texts = roots / "datasets" / "tiny-texts"
    texts.mkdir(parents=True)
    rows = ["a b c", "cat dog up", "red blue", "1 2 3 4", "yes no yes", "left right"]
    (texts / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    olah.add_model("acme/tiny-texts", texts, repo_type="datasets")
    labelled = roots / "datasets" / "tiny-labelled"
    labelled.mkdir(parents=True)
    (labelled / "validation.jsonl").write_text(
        "".join(json.dumps({"sentence": t, "label": i % 2}) + "\n" for i, t in enumerate(rows * 2))
    )
    olah.add_model("acme/tiny-labelled", labelled, repo_type="datasets")
    olah.start()
    redis = RedisServer(tmp / "redis").start()
    db = PostgresDB().create()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIVMERGE_", "HF_"))}
    env.update(SERVICE_SETTINGS)
    env.update(
        DIVMERGE_HOME=str(tmp / "home"),
        DIVMERGE_LOCAL_ROOTS=str(roots),
        DIVMERGE_DATABASE_URL=db.url,
        DIVMERGE_BROKER_URL=redis.url,
        DIVMERGE_TEST_FAKE_HUB_DIR=str(tmp / "fake_hub"),
        HF_ENDPOINT=olah.endpoint,
        HF_HOME=str(tmp / "hf_home"),
        PYTHONPATH=str(REPO),
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    service = Service(tmp, env, db, redis, olah, models, tmp / "fake_hub")
    mp = pytest.MonkeyPatch()
    for k in [k for k in os.environ if k.startswith("DIVMERGE_")]:
        mp.delenv(k)
    for k, v in env.items():
        if k.startswith("DIVMERGE_") or k in ("HF_ENDPOINT", "HF_HOME"):  # the API's dry-run subprocess
            mp.setenv(k, v)
    try:
        from fastapi.testclient import TestClient

        from divmerge_api.main import create_app
        from divmerge_service.config import Settings
        from divmerge_service.db import migrate

        migrate(db.url)
        service.settings = Settings()
        for team in ("team-a", "team-b"):
            service.tokens[team] = service.cli("token", "create", "--team", team).strip().splitlines()[-1]
        service.new_worker()
        with TestClient(create_app(service.settings)) as client:
            service.client = client
            yield service
    finally:
        for w in service.workers:
            w.stop()
        olah.stop()
        redis.kill()
        from divmerge_service.db import get_engine

        get_engine.cache_clear()
        time.sleep(0.2)
        db.drop()
        mp.undo()


@pytest.fixture
def fake_hub_uploads(svc):
    from .doubles import FakeHubUploadDouble

    return lambda: FakeHubUploadDouble.uploads(svc.fake_hub)


__all__ = ["FINISHED", "Service", "wait_until"]
