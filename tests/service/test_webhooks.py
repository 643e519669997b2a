"""Webhooks (issue 19.3) end to end: a real HTTP receiver on loopback (a threaded ``http.server`` on a free
port), the real Celery worker delivering from the outbox, and the outbox's rules on its own PostgreSQL.

The suite's settings (conftest.SERVICE_SETTINGS) allow-list ``127.0.0.1``, time a POST out after 1 s, retry
5 times from 0.2 s, and poll every 0.2 s. The jobs run for team ``team-hooks`` (its own secret and default
webhook, so no other test's jobs are reported)."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import select, text

from divmerge_service import jobs, webhooks
from divmerge_service.config import Settings
from divmerge_service.db import get_engine, migrate, new_session, session_scope
from divmerge_service.models import JobStatus, Team, WebhookDelivery

from .procs import PostgresDB, wait_until

pytestmark = pytest.mark.service
TEAM = "team-hooks"


class Receiver:
    """A webhook receiver on 127.0.0.1: records every request; ``plan(n)`` (n: 1-based request number) says
    (status, headers, seconds to hold the answer)."""

    def __init__(self, plan=None):
        self.requests: list[dict] = []
        self.plan = plan or (lambda n: (200, {}, 0))
        self.release = threading.Event()  # ends every held answer at once (close)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.requests.append(
                    {"headers": dict(self.headers), "body": body, "at": time.monotonic()}
                )
                status, headers, hold = receiver.plan(len(receiver.requests))
                if hold:
                    receiver.release.wait(hold)
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:  # the client gave up (timeout)
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook?source=divmerge"

    def wait_requests(self, n: int, timeout: float = 60) -> list[dict]:
        return wait_until(lambda: len(self.requests) >= n and self.requests, timeout, 0.02, f"{n} request(s)")

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    made: list[Receiver] = []

    def make(plan=None) -> Receiver:
        made.append(Receiver(plan))
        return made[-1]

    yield make
    for r in made:
        r.close()


def _bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def admin(svc) -> str:
    return svc.cli("token", "create", "--team", "hooks-admin", "--admin").strip().splitlines()[-1]


@pytest.fixture(scope="module")
def secret(svc, admin) -> str:
    """team-hooks, with a member token (svc.h(TEAM)) and a webhook secret (shown once, here)."""
    r = svc.client.post("/v1/admin/tokens", json={"team": TEAM}, headers=_bearer(admin))
    assert r.status_code == 201, r.text
    svc.tokens[TEAM] = r.json()["token"]
    r = svc.client.post(f"/v1/admin/teams/{TEAM}/webhook-secret", headers=_bearer(admin))
    assert r.status_code == 201, r.text
    assert r.json()["secret"].startswith("whsec_")
    return r.json()["secret"]


def submit(svc, notify: dict | None, **extra) -> dict:
    body = svc.classic(**extra) | ({"notify": notify} if notify is not None else {})
    return svc.submit(body, team=TEAM)


def attempts(svc, job_id: str) -> list[dict]:
    r = svc.client.get(f"/v1/merges/{job_id}/events", headers=svc.h(TEAM))
    assert r.status_code == 200, r.text
    return [
        e["data"] | {"message": e["message"]} for e in r.json()["events"] if e["kind"] == "webhook_attempt"
    ]


def wait_attempt(svc, job_id: str, outcome: str, timeout: float = 60) -> list[dict]:
    return wait_until(
        lambda: (a := attempts(svc, job_id)) and a[-1]["outcome"] == outcome and a,
        timeout,
        0.1,
        f"a webhook attempt of job {job_id} ending {outcome}",
    )


def verify(secret: str, req: dict) -> bool:
    """What a receiver does (docs/service.md): HMAC-SHA256 of the raw body, compared in constant time."""
    expected = "sha256=" + hmac.new(secret.encode(), req["body"], hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, req["headers"].get("X-DivMerge-Signature", ""))


# --- through the real worker


def test_succeeded_job_sends_one_signed_post(svc, secret, receiver):
    svc.ensure_worker()
    r = receiver()
    job = submit(svc, {"url": r.url, "events": ["succeeded", "failed"]})
    assert job["notify"] == {"url": r.url, "events": ["succeeded", "failed"]}
    assert svc.wait(job["id"], team=TEAM)["status"] == "succeeded"
    (req,) = r.wait_requests(1)
    wait_attempt(svc, job["id"], "delivered")
    time.sleep(1)
    assert len(r.requests) == 1, "delivered more than once"
    assert verify(secret, req), "the signature does not verify with the team's secret"
    assert not verify(secret + "x", req)
    payload = json.loads(req["body"])
    assert payload["job_id"] == job["id"] and payload["status"] == "succeeded"
    assert payload["event"] == "succeeded" and payload["team"] == TEAM and payload["timestamp"]
    assert req["headers"]["X-DivMerge-Event"] == "succeeded"
    assert req["headers"]["X-DivMerge-Delivery"] == payload["delivery_id"]
    assert req["headers"]["Content-Type"] == "application/json"
    (a,) = attempts(svc, job["id"])
    assert a["status_code"] == 200 and a["attempt"] == 1 and a["delivery"] == payload["delivery_id"]
    assert "source=divmerge" not in a["message"], "the URL's query (maybe a token) is shown"
    # the secret is sealed in the database (DIVMERGE_WEBHOOK_SECRET_KEY is set) and never logged
    with get_engine(svc.settings.db_url).connect() as conn:
        stored = conn.execute(text("SELECT webhook_secret FROM teams WHERE name = :n"), {"n": TEAM}).scalar()
    assert stored.startswith("fernet:") and secret not in stored
    assert secret not in svc.worker.log.read_text()
    got = svc.client.get(f"/v1/admin/teams/{TEAM}/webhook", headers=svc.h(TEAM))
    assert got.status_code == 403


def test_500_then_200_is_retried_with_the_same_delivery_id(svc, secret, receiver):
    svc.ensure_worker()
    r = receiver(lambda n: (500 if n == 1 else 200, {}, 0))
    job = submit(svc, {"url": r.url})
    svc.wait(job["id"], team=TEAM)
    first, second = r.wait_requests(2)
    done = wait_attempt(svc, job["id"], "delivered")
    assert [(a["attempt"], a["status_code"], a["outcome"]) for a in done] == [
        (1, 500, "retry"),
        (2, 200, "delivered"),
    ]
    assert done[0]["delay_s"] > 0
    assert first["body"] == second["body"], "a retry sends the same body"
    assert first["headers"]["X-DivMerge-Delivery"] == second["headers"]["X-DivMerge-Delivery"]
    assert verify(secret, second)


def test_redirect_is_not_followed_and_counts_as_a_failure(svc, secret, receiver):
    svc.ensure_worker()
    elsewhere = receiver()
    r = receiver(lambda n: (302, {"Location": elsewhere.url}, 0))
    job = submit(svc, {"url": r.url, "events": ["succeeded"]})
    svc.wait(job["id"], team=TEAM)
    done = wait_attempt(svc, job["id"], "failed")
    n = svc.settings.webhook_attempts
    assert [a["status_code"] for a in done] == [302] * n and all("redirect" in a["error"] for a in done)
    assert len(r.requests) == n and elsewhere.requests == [], "the redirect was followed"
    with session_scope(svc.settings.db_url) as s:
        row = s.scalar(select(WebhookDelivery).where(WebhookDelivery.job_id == job["id"]))
        assert row.status == "failed" and row.attempts == n and row.last_status_code == 302


def test_slow_receiver_times_out_and_the_worker_keeps_working(svc, secret, receiver):
    svc.ensure_worker()
    hold = 20.0
    slow = receiver(lambda n: (200, {}, hold))
    job = submit(svc, {"url": slow.url, "events": ["succeeded"]})
    svc.wait(job["id"], team=TEAM)
    (req,) = slow.wait_requests(1)
    other = submit(svc, None, parameters={"lambda": 0.3})  # a merge while the receiver holds the POST
    assert svc.wait(other["id"], team=TEAM, timeout=hold)["status"] == "succeeded"
    assert time.monotonic() - req["at"] < hold, "the other job waited for the slow receiver"
    first = wait_until(lambda: attempts(svc, job["id"]), 10, 0.1, "the timed-out attempt")[0]
    timeout = svc.settings.webhook_timeout_s
    assert first["status_code"] is None and first["error"].startswith("timeout")
    assert first["elapsed_s"] < timeout + 2, "the POST was not bounded by the timeout"
    assert first["outcome"] == "retry"


def test_notify_url_outside_the_allow_list_is_refused_at_submit(svc, secret, admin):
    bad = {
        "http://10.1.2.3/hook": "notify.url",  # not on the allow-list
        "http://localhost:8000/hook": "notify.url",  # a name for loopback, not allow-listed itself
        "ftp://127.0.0.1/hook": "notify.url",
        "http://user:pw@127.0.0.1/hook": "notify.url",
        "file:///etc/passwd": "notify.url",
    }
    before = svc.client.get("/v1/merges?limit=100", headers=svc.h(TEAM)).json()["items"]
    for url, field in bad.items():
        r = svc.client.post("/v1/merges", json=svc.classic() | {"notify": {"url": url}}, headers=svc.h(TEAM))
        assert r.status_code == 422, (url, r.text)
        assert r.json()["error"]["field"] == field and r.json()["error"]["code"] == "invalid_notify", url
    for notify, field in (
        ({"url": "http://127.0.0.1:1/", "events": ["exploded"]}, "notify.events"),
        ({"url": "http://127.0.0.1:1/", "secret": "x"}, "notify.secret"),
        ("http://127.0.0.1:1/", "notify"),
    ):
        r = svc.client.post("/v1/merges", json=svc.classic() | {"notify": notify}, headers=svc.h(TEAM))
        assert r.status_code == 422 and r.json()["error"]["field"] == field, r.text
    after = svc.client.get("/v1/merges?limit=100", headers=svc.h(TEAM)).json()["items"]
    assert len(after) == len(before), "a refused submit queued a job"
    r = svc.client.put(
        f"/v1/admin/teams/{TEAM}/webhook", json={"url": "http://10.1.2.3/"}, headers=_bearer(admin)
    )
    assert r.status_code == 422 and r.json()["error"]["field"] == "url"
    # a team without a secret cannot ask for webhooks (nothing could sign them)
    r = svc.client.post("/v1/merges", json=svc.classic() | {"notify": {"url": "http://127.0.0.1:1/"}},
                        headers=svc.h("team-b"))  # fmt: skip
    assert r.status_code == 422 and r.json()["error"]["code"] == "no_webhook_secret"


def test_team_webhook_applies_and_a_job_notify_overrides_it(svc, secret, admin, receiver):
    svc.ensure_worker()
    team_hook, job_hook = receiver(), receiver()
    r = svc.client.put(f"/v1/admin/teams/{TEAM}/webhook", json={"url": team_hook.url, "events": ["succeeded"]},
                       headers=_bearer(admin))  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json() == {"team": TEAM, "url": team_hook.url, "events": ["succeeded"], "has_secret": True,
                        "secret_created_at": r.json()["secret_created_at"]}  # fmt: skip
    try:
        plain = submit(svc, None)
        own = submit(svc, {"url": job_hook.url}, parameters={"lambda": 0.4})
        for job in (plain, own):
            svc.wait(job["id"], team=TEAM)
            wait_attempt(svc, job["id"], "delivered")
        assert [json.loads(q["body"])["job_id"] for q in team_hook.requests] == [plain["id"]]
        assert [json.loads(q["body"])["job_id"] for q in job_hook.requests] == [own["id"]]
        assert verify(secret, team_hook.requests[0]) and verify(secret, job_hook.requests[0])
    finally:
        r = svc.client.delete(f"/v1/admin/teams/{TEAM}/webhook", headers=_bearer(admin))
        assert r.status_code == 200 and r.json()["url"] is None
    audit = svc.client.get("/v1/admin/audit?limit=20", headers=_bearer(admin)).json()["items"]
    actions = [e["action"] for e in audit if e["team"] == TEAM]
    assert {"webhook_set", "webhook_cleared", "webhook_secret_rotated"} <= set(actions)
    assert secret not in json.dumps(audit) and team_hook.url not in json.dumps(audit)


def test_cancelled_queued_job_is_reported(svc, secret, receiver):
    """The API's cancel of a queued job is a finishing transition too: it queues the webhook."""
    from fastapi.testclient import TestClient

    from divmerge_api.main import create_app

    r = receiver()
    with TestClient(create_app(Settings(cpu_queue="idle", gpu_queue="idle"))) as idle:
        job = idle.post("/v1/merges", json=svc.classic() | {"notify": {"url": r.url, "events": ["cancelled"]}},
                        headers=svc.h(TEAM)).json()  # fmt: skip
        assert (
            idle.post(f"/v1/merges/{job['id']}/cancel", headers=svc.h(TEAM)).json()["status"] == "cancelled"
        )
    svc.ensure_worker()
    (req,) = r.wait_requests(1)
    assert json.loads(req["body"])["event"] == "cancelled" and verify(secret, req)


def test_worker_killed_mid_retry_delivers_after_restart(svc, secret, receiver):
    """Attempt 1 gets a 500; attempt 2 is held by the receiver and its worker is killed (-9) mid-POST. The
    row stays in the outbox; a new worker delivers it once the dead one's claim lapses."""
    svc.stop_worker()
    a = svc.new_worker()
    r = receiver(lambda n: {1: (500, {}, 0), 2: (200, {}, 30)}.get(n, (200, {}, 0)))
    job = submit(svc, {"url": r.url, "events": ["succeeded"]})
    svc.wait(job["id"], team=TEAM)
    r.wait_requests(2)
    a.kill9()
    delivery = r.requests[0]["headers"]["X-DivMerge-Delivery"]
    with session_scope(svc.settings.db_url) as s:
        row = s.get(WebhookDelivery, delivery)
        assert row.status == "pending" and row.attempts == 2, "the delivery left the outbox"
    b = svc.new_worker()
    done = wait_attempt(svc, job["id"], "delivered", timeout=60)
    assert len(r.requests) == 3 and {q["headers"]["X-DivMerge-Delivery"] for q in r.requests} == {delivery}
    assert verify(secret, r.requests[2])
    assert [(x["attempt"], x["outcome"]) for x in done] == [(1, "retry"), (3, "delivered")]
    assert f"webhook {delivery} succeeded (job {job['id']}) attempt 3: delivered" in b.log.read_text()


# --- the outbox on its own database (no worker)


@pytest.fixture(scope="module")
def store():
    db = PostgresDB().create()
    try:
        migrate(db.url)
        with session_scope(db.url) as s:
            s.add(Team(id=1, name="t", webhook_secret="plain:k"))
        yield db.url
    finally:
        get_engine(db.url).dispose()
        db.drop()


def _finished_job(url: str, commit: bool = True, notify: dict | None = None) -> str:
    with session_scope(url) as s:
        job, _ = jobs.create_job(s, team_id=1, spec={}, spec_hash="h", queue="q", idempotency_key=None,
                                 notify=notify or {"url": "http://127.0.0.1:1/", "events": list(webhooks.EVENTS)})  # fmt: skip
    with session_scope(url) as s:
        c = jobs.claim(s, job.id, "w", lease_s=60, max_attempts=3)
    s = new_session(url)
    try:
        assert jobs.finish(s, c, JobStatus.SUCCEEDED, "done")
        s.commit() if commit else s.rollback()
    finally:
        s.close()
    return job.id


def _rows(url: str, job_id: str) -> list[WebhookDelivery]:
    with session_scope(url) as s:
        return list(s.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)))


def test_outbox_row_commits_with_the_finish_or_not_at_all(store):
    rolled_back = _finished_job(store, commit=False)
    with session_scope(store) as s:
        status = jobs.load(s, rolled_back).status
    assert (status, _rows(store, rolled_back)) == ("running", []), "the finish and its outbox row split"
    done = _finished_job(store)
    (row,) = _rows(store, done)
    assert (
        row.event == "succeeded" and row.status == "pending" and json.loads(row.body)["delivery_id"] == row.id
    )


def test_concurrent_claims_take_different_rows(store):
    ids = {r.id for j in [_finished_job(store) for _ in range(4)] for r in _rows(store, j)}
    settings = Settings(database_url=store)
    s1, s2 = new_session(store), new_session(store)
    try:
        first = {c.id for c in webhooks.claim_due(s1, settings, 100)}  # rows locked until s1 commits
        second = {c.id for c in webhooks.claim_due(s2, settings, 100)}
        assert ids <= first and not (first & second), "a row was claimed twice"
        s1.commit()
        s2.commit()
        s3 = new_session(store)
        assert not ids & {c.id for c in webhooks.claim_due(s3, settings, 100)}, "a claimed row was due again"
        s3.rollback()
        s3.close()
    finally:
        s1.close()
        s2.close()


def test_a_stale_attempt_is_not_recorded_over_a_newer_claim(store):
    settings = Settings(database_url=store, webhook_attempts=3)
    job_id = _finished_job(store)
    s = new_session(store)
    (c,) = [c for c in webhooks.claim_due(s, settings, 100) if c.job_id == job_id]
    s.commit()
    newer = webhooks.Claimed(**{**vars(c), "attempt": c.attempt + 1})
    with session_scope(store) as s2:  # as if the claim had lapsed and another deliverer took the row
        s2.get(WebhookDelivery, c.id).attempts += 1
    with session_scope(store) as s3:
        assert webhooks.record_attempt(s3, settings, c, status_code=200, error=None) == "stale"
        assert webhooks.record_attempt(s3, settings, newer, status_code=500, error=None) == "retry"
    s.close()


# --- pure rules


def test_secret_sealing():
    sealed_settings = Settings(webhook_secret_key="k" * 32)
    secret = webhooks.new_secret()
    sealed = webhooks.seal(secret, sealed_settings)
    assert sealed.startswith("fernet:") and secret not in sealed
    assert webhooks.unseal(sealed, sealed_settings) == secret
    assert webhooks.seal(secret, sealed_settings) != sealed, "no nonce"
    with pytest.raises(webhooks.SecretUnavailable):
        webhooks.unseal(sealed, Settings(webhook_secret_key="another key"))
    with pytest.raises(webhooks.SecretUnavailable):
        webhooks.unseal(sealed, Settings(webhook_secret_key=None))
    tampered = sealed[:-6] + ("A" if sealed[-6] != "A" else "B") + sealed[-5:]
    with pytest.raises(webhooks.SecretUnavailable):
        webhooks.unseal(tampered, sealed_settings)
    unkeyed = Settings(webhook_secret_key=None)  # (the suite's environment sets a key)
    plain = webhooks.seal(secret, unkeyed)
    assert plain == "plain:" + secret and webhooks.unseal(plain, unkeyed) == secret


def test_allow_list_and_resolution_rules():
    s = Settings(webhook_allowed_hosts="127.0.0.1, Hooks.Example.com:8443,localhost")
    assert s.webhook_allowed_hosts == ["127.0.0.1", "hooks.example.com:8443", "localhost"]
    assert webhooks.check_url("http://127.0.0.1:9999/x", s).port == 9999
    assert webhooks.check_url("https://hooks.example.com:8443/x", s).host == "hooks.example.com"
    for url in ("https://hooks.example.com/x", "http://10.0.0.1/", "gopher://127.0.0.1/", "http://a@127.0.0.1/",
                "http://127.0.0.1/#frag", "http://127.0.0.1 /"):  # fmt: skip
        with pytest.raises(webhooks.InvalidWebhook):
            webhooks.check_url(url, s)
    with pytest.raises(webhooks.InvalidWebhook):
        webhooks.check_url("http://127.0.0.1/", Settings(webhook_allowed_hosts=[]))  # none by default
    assert webhooks.resolve(webhooks.parse_url("http://127.0.0.1:1/"), s) == "127.0.0.1"
    # a name on the list resolving to a private address is refused unless that address is listed itself
    only_name = Settings(webhook_allowed_hosts="localhost")
    with pytest.raises(webhooks.InvalidWebhook, match="non-public"):
        webhooks.resolve(webhooks.parse_url("http://localhost:1/"), only_name)
    listed = Settings(webhook_allowed_hosts="localhost,127.0.0.1,::1")
    assert webhooks.resolve(webhooks.parse_url("http://localhost:1/"), listed) in ("127.0.0.1", "::1")
    delays = [
        webhooks.backoff_s(Settings(webhook_backoff_s=10, webhook_backoff_max_s=60), n) for n in range(1, 8)
    ]
    assert 5 <= delays[0] <= 10 and all(30 <= d <= 60 for d in delays[3:])
