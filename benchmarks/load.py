"""Sustained load on the production topology, on loopback, bounded in time.

``python -m benchmarks.load --clients 20 --duration-s 600`` starts, from nothing and on 127.0.0.1 only:

* a fresh PostgreSQL database ``divmerge_load_<random>`` on the machine's server (127.0.0.1:5432, trust auth),
  migrated with Alembic and dropped at the end;
* a private ``redis-server`` on a free port (no persistence), killed at the end;
* the API as the Docker image runs it: ``uvicorn --factory divmerge_api.main:create_app --workers N``;
* ``--celery-workers`` Celery workers as the compose file's ``worker-cpu`` (``-Q cpu -P solo --concurrency 1``),
  production intervals (lease, heartbeat, reconciler: the defaults);
* tiny BERT classifiers built in code (``tests/tiny.py``) under an allowed local root, and a token for each
  of ``--teams`` teams.

Then ``--clients`` asyncio clients (httpx, one connection pool each) run for ``--duration-s``: each keeps at
most ``--inflight`` of its jobs unfinished, and loops over submit (linear or task_arithmetic of two tiny
experts, to the default local output), poll (``GET /v1/merges/{id}``), list and events, with a think time
between calls. A sampler thread records every ``--sample-s``: the database's connections
(``pg_stat_activity``, by process role via ``application_name``), the jobs by status, the Redis queue
length and the CPU of each process role (psutil).

When the time is up the clients stop, the script waits (at most ``--drain-s``) for every job to finish, then
checks: no 5xx and no transport error, jobs accepted (202) = jobs in the database = jobs succeeded, each job
claimed once (``attempts`` = 1 and one ``claimed`` event), and the connections never above the pools'
bound (``pool_size + max_overflow`` per process). It writes ``<out-dir>/<name>.json`` and ``<name>.md``
(commit, command, machine, conditions, latencies per route and over time, CPU by role, queue depth, the
first bottleneck) and exits 1 if an invariant failed. Everything is torn down on exit, also on an error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

# the same loopback process helpers as the service tests (127.0.0.1 only)
from tests.service.procs import free_port, port_open, wait_until

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
HOST = "127.0.0.1"  # loopback only: every server binds here and every client connects here
#: The API's and the workers' SQLAlchemy pool (``divmerge_service.db.get_engine``): per process.
POOL_SIZE, MAX_OVERFLOW = 5, 5
ROUTES = ("POST /v1/merges", "GET /v1/merges/{id}", "GET /v1/merges", "GET /v1/merges/{id}/events")
APP_API, APP_WORKER, APP_SAMPLER = "divmerge-load-api", "divmerge-load-worker", "divmerge-load-sampler"


def git_commit() -> str:
    def git(*args: str) -> str:
        res = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
        return res.stdout.strip() if res.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    # the report itself may be the only change: it does not make the code dirty
    dirty = [ln for ln in git("status", "--porcelain").splitlines() if "benchmarks/results/" not in ln]
    return commit + ("+dirty" if dirty else "")


# --------------------------------------------------------------------------------------------- topology


@dataclass
class Topology:
    workdir: Path
    api_workers: int
    celery_workers: int
    teams: int
    healthcheck_s: int = 60
    db_name: str = field(default_factory=lambda: f"divmerge_load_{uuid.uuid4().hex[:10]}")
    db_created: bool = False
    redis: subprocess.Popen | None = None
    redis_port: int = 0
    api: subprocess.Popen | None = None
    api_port: int = 0
    workers: list[subprocess.Popen] = field(default_factory=list)
    tokens: dict[str, str] = field(default_factory=dict)
    models: dict[str, Path] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    logs: list = field(default_factory=list)

    @property
    def db_url(self) -> str:
        return f"postgresql+psycopg://postgres@{HOST}:5432/{self.db_name}"

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.api_port}"

    def _log(self, name: str):
        fh = open(self.workdir / f"{name}.log", "w")  # noqa: SIM115
        self.logs.append(fh)
        return fh

    def start(self, say, timeout: float = 600) -> None:
        import psycopg

        roots = self.workdir / "roots"
        # the tiny models are built in a process of their own while the rest starts (this process, the load
        # client, never imports torch)
        self.models = {name: roots / "models" / name for name in ("base", "ft1", "ft2")}
        say("building tiny models (in a subprocess)")
        builder = subprocess.Popen(
            [sys.executable, "-c", "import sys; from pathlib import Path; from benchmarks.load import make_models; "
             "make_models(Path(sys.argv[1]))", str(roots / "models")],
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
            stdout=self._log("models"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        say(f"creating database {self.db_name}")
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.db_name}"')
        self.db_created = True
        self.redis_port = free_port()
        self.redis = subprocess.Popen(
            ["redis-server", "--port", str(self.redis_port), "--bind", HOST, "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)],
            stdout=self._log("redis"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_until(lambda: port_open(self.redis_port), 20, what="redis-server")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DIVMERGE_", "HF_", "PG"))}
        env.update(
            DIVMERGE_HOME=str(self.workdir / "home"),
            DIVMERGE_LOCAL_ROOTS=str(roots),
            DIVMERGE_DATABASE_URL=self.db_url,
            DIVMERGE_BROKER_URL=f"redis://{HOST}:{self.redis_port}/0",
            DIVMERGE_DEVICE="cpu",
            DIVMERGE_TEACHER_CACHE_DIR=str(self.workdir / "teachers"),
            HF_HOME=str(self.workdir / "hf_home"),
            HF_HUB_OFFLINE="1",
            PYTHONPATH=str(REPO),
            OMP_NUM_THREADS="1",
            TOKENIZERS_PARALLELISM="false",
        )
        self.env = env
        say("migrating")
        from divmerge_service.db import get_engine, migrate

        migrate(self.db_url)
        self._make_tokens()
        get_engine(self.db_url).dispose()  # this process's connections are not the service's
        self.api_port = free_port()
        say(f"starting uvicorn --workers {self.api_workers} and {self.celery_workers} Celery workers")
        self.api = subprocess.Popen(
            [str(BIN / "uvicorn"), "--factory", "divmerge_api.main:create_app", "--host", HOST,
             "--port", str(self.api_port), "--workers", str(self.api_workers), "--no-server-header",
             "--timeout-worker-healthcheck", str(self.healthcheck_s)],
            cwd=REPO, env={**env, "PGAPPNAME": APP_API}, stdout=self._log("api"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        for i in range(self.celery_workers):
            self.workers.append(
                subprocess.Popen(
                    [
                        str(BIN / "celery"),
                        "-A",
                        "divmerge_worker.celery_app",
                        "worker",
                        "-Q",
                        "cpu",
                        "--concurrency",
                        "1",
                        "-P",
                        "solo",
                        "--hostname",
                        f"load{i + 1}@%h",
                        "--loglevel",
                        "INFO",
                        "--without-gossip",
                        "--without-mingle",
                    ],
                    cwd=REPO,
                    env={**env, "PGAPPNAME": f"{APP_WORKER}-{i + 1}"},
                    stdout=self._log(f"celery-{i + 1}"),
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )  # fmt: skip
            )
        api_log = self.workdir / "api.log"

        def api_ready():
            self._check_alive()
            return (
                api_log.read_text(errors="replace").count("Application startup complete.") >= self.api_workers
            )

        self._wait_logged(api_ready, timeout, f"{self.api_workers} uvicorn workers", "api")

        def workers_ready():
            self._check_alive()
            logs = [
                (self.workdir / f"celery-{i + 1}.log").read_text(errors="replace")
                for i in range(len(self.workers))
            ]
            return all(" ready." in log for log in logs)

        self._wait_logged(workers_ready, timeout, "the Celery workers", "celery-1")
        if builder.wait(timeout=timeout) != 0:
            raise RuntimeError(
                "building the tiny models failed:\n" + (self.workdir / "models.log").read_text()[-3000:]
            )
        say(f"topology up: API {self.base_url}, Redis :{self.redis_port}, database {self.db_name}")

    def _wait_logged(self, pred, timeout: float, what: str, log: str) -> None:
        try:
            wait_until(pred, timeout, what=what)
        except TimeoutError as err:
            tail = (self.workdir / f"{log}.log").read_text(errors="replace")[-2000:]
            raise TimeoutError(f"{err}; the end of {log}.log:\n{tail}") from None

    def _check_alive(self) -> None:
        for name, proc in [
            ("uvicorn", self.api),
            *((f"celery worker {i + 1}", w) for i, w in enumerate(self.workers)),
        ]:
            if proc is not None and proc.poll() is not None:
                log = "api" if name == "uvicorn" else f"celery-{name.split()[-1]}"
                tail = (self.workdir / f"{log}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{tail}")

    def _make_tokens(self) -> None:
        from divmerge_api.security import create_token
        from divmerge_service.db import session_scope

        for t in range(self.teams):
            team = f"load-team-{t + 1}"
            with session_scope(self.db_url) as s:
                _, self.tokens[team] = create_token(s, team, ("read", "submit"))

    def stop(self) -> None:
        procs = [p for p in [self.api, *self.workers] if p is not None and p.poll() is None]
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
        if self.redis is not None and self.redis.poll() is None:
            self.redis.kill()
            self.redis.wait(timeout=10)
        for fh in self.logs:
            fh.close()
        if self.db_created:
            import psycopg

            with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')
            self.db_created = False


def make_models(root: Path) -> dict[str, Path]:
    """A tiny BERT base and two perturbed experts (``tests/tiny.py``), as the service tests build them."""
    from tests.tiny import make_bert_classifier, perturbed, save

    bert = make_bert_classifier(seed=0)
    return {
        "base": save(bert, root / "base"),
        "ft1": save(perturbed(bert, 0.05, seed=1), root / "ft1"),
        "ft2": save(perturbed(bert, 0.05, seed=2), root / "ft2"),
    }


def job_body(models: dict[str, Path], rng: random.Random) -> dict:
    """A tiny classic merge to the default local output ($DIVMERGE_HOME/outputs/<job id>)."""
    experts = [{"model": str(models["ft1"])}, {"model": str(models["ft2"])}]
    if rng.random() < 0.5:
        return {"merge_method": "linear", "models": experts, "parameters": {"normalize": True}}
    return {"merge_method": "task_arithmetic", "base_model": str(models["base"]), "models": experts,
            "parameters": {"lambda": 0.5}}  # fmt: skip


# ---------------------------------------------------------------------------------------------- sampler


class Sampler(threading.Thread):
    """Every ``interval`` s: DB connections by role, jobs by status, Redis queue length, CPU by role."""

    def __init__(self, topo: Topology, interval: float, t0: float):
        super().__init__(daemon=True, name="load-sampler")
        self.topo, self.interval, self.t0 = topo, interval, t0
        self.samples: list[dict] = []
        self.stop_event = threading.Event()
        self.errors: list[str] = []
        self._procs: dict[int, object] = {}
        self._pg_pids: list[int] = []  # the backends serving this run's database (not the sampler's)

    def _proc(self, pid: int):
        import psutil

        p = self._procs.get(pid)
        if p is None:
            p = self._procs[pid] = psutil.Process(pid)
            p.cpu_percent(None)  # the first call starts the meter
        return p

    def _cpu(self, pids: list[int]) -> float:
        import psutil

        total = 0.0
        for pid in pids:
            try:
                total += self._proc(pid).cpu_percent(None) / 100
            except psutil.Error:
                self._procs.pop(pid, None)
        return total

    def _tree(self, proc: subprocess.Popen | None) -> list[int]:
        import psutil

        if proc is None or proc.poll() is not None:
            return []
        try:
            root = psutil.Process(proc.pid)
            return [root.pid, *(c.pid for c in root.children(recursive=True))]
        except psutil.Error:
            return []

    def _roles(self) -> dict[str, list[int]]:
        roles = {"api": self._tree(self.topo.api)}
        for i, w in enumerate(self.topo.workers):
            roles[f"worker-{i + 1}"] = self._tree(w)
        roles["redis"] = self._tree(self.topo.redis)
        roles["postgres"] = self._pg_pids
        roles["load client"] = [os.getpid()]
        return roles

    def run(self) -> None:
        import psutil
        import psycopg
        import redis

        conn = psycopg.connect(f"host={HOST} port=5432 user=postgres dbname={self.topo.db_name}",
                               autocommit=True, application_name=APP_SAMPLER)  # fmt: skip
        r = redis.Redis(host=HOST, port=self.topo.redis_port, socket_timeout=2)
        psutil.cpu_percent(None)
        self._cpu([pid for pids in self._roles().values() for pid in pids])
        try:
            while not self.stop_event.wait(self.interval):
                try:
                    self.samples.append(self._sample(conn, r))
                except Exception as err:  # noqa: BLE001  (a missed sample is reported, not fatal)
                    self.errors.append(f"{type(err).__name__}: {err}")
        finally:
            conn.close()

    def _sample(self, conn, r) -> dict:
        import psutil

        t = round(time.monotonic() - self.t0, 2)
        rows = conn.execute(
            "SELECT coalesce(application_name, ''), state, count(*) FROM pg_stat_activity "
            "WHERE datname = %s AND coalesce(application_name, '') <> %s GROUP BY 1, 2",
            (self.topo.db_name, APP_SAMPLER),
        ).fetchall()
        self._pg_pids = [
            pid
            for (pid,) in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND coalesce(application_name, '') <> %s",
                (self.topo.db_name, APP_SAMPLER),
            ).fetchall()
        ]
        by_app: dict[str, int] = {}
        by_state: dict[str, int] = {}
        for app, state, n in rows:
            by_app[app] = by_app.get(app, 0) + n
            by_state[state or "none"] = by_state.get(state or "none", 0) + n
        jobs = dict(conn.execute("SELECT status, count(*) FROM jobs GROUP BY status").fetchall())
        cpu = {role: round(self._cpu(pids), 3) for role, pids in self._roles().items()}
        busy = psutil.cpu_percent(None) / 100 * psutil.cpu_count()
        cpu["other (not this run)"] = round(max(0.0, busy - sum(cpu.values())), 3)
        return {
            "t": t,
            "db_connections": sum(by_app.values()),
            "db_connections_by_app": by_app,
            "db_connections_by_state": by_state,
            "jobs": jobs,
            "redis_queue": r.llen("cpu"),
            "redis_unacked": r.hlen("unacked"),
            "cpu_cores": cpu,
            "machine_busy_cores": round(busy, 3),
            "loadavg_1m": os.getloadavg()[0],
        }


# ---------------------------------------------------------------------------------------------- clients


@dataclass
class ClientStats:
    requests: list[tuple[float, str, str, float]] = field(default_factory=list)  # (t, route, status, s)
    submitted: list[str] = field(default_factory=list)  # ids of the jobs answered 202


async def run_clients(topo: Topology, args, t0: float) -> ClientStats:
    import httpx

    stats = ClientStats()
    end = t0 + args.duration_s
    teams = list(topo.tokens)

    async def call(c: httpx.AsyncClient, route: str, method: str, url: str, **kw):
        at, start = time.monotonic() - t0, time.perf_counter()
        try:
            r = await c.request(method, url, **kw)
            status = str(r.status_code)
        except httpx.HTTPError as err:
            r, status = None, f"error:{type(err).__name__}"
        stats.requests.append((round(at, 3), route, status, time.perf_counter() - start))
        return r

    async def client(i: int) -> None:
        rng = random.Random(args.seed * 1000 + i)
        headers = {"Authorization": f"Bearer {topo.tokens[teams[i % len(teams)]]}"}
        mine: list[str] = []  # this client's unfinished jobs
        seen: list[str] = []  # all of this client's jobs
        await asyncio.sleep(rng.uniform(0, args.think_max_s))  # do not start in lockstep
        async with httpx.AsyncClient(base_url=topo.base_url, headers=headers, timeout=args.timeout_s) as c:
            while time.monotonic() < end:
                x = rng.random()
                if len(mine) < args.inflight and (x < 0.25 or not seen):
                    body = job_body(topo.models, rng)
                    r = await call(c, ROUTES[0], "POST", "/v1/merges", json=body,
                                   headers={"Idempotency-Key": uuid.uuid4().hex})  # fmt: skip
                    if r is not None and r.status_code == 202:
                        job_id = r.json()["id"]
                        stats.submitted.append(job_id)
                        mine.append(job_id)
                        seen.append(job_id)
                elif mine and x < 0.70:
                    job_id = rng.choice(mine)
                    r = await call(c, ROUTES[1], "GET", f"/v1/merges/{job_id}")
                    if r is not None and r.status_code == 200 and r.json()["status"] in FINISHED:
                        mine.remove(job_id)
                elif x < 0.85 or not seen:
                    await call(c, ROUTES[2], "GET", "/v1/merges", params={"limit": 20})
                else:
                    await call(c, ROUTES[3], "GET", f"/v1/merges/{rng.choice(seen)}/events")
                await asyncio.sleep(rng.uniform(args.think_min_s, args.think_max_s))

    await asyncio.gather(*(client(i) for i in range(args.clients)))
    return stats


FINISHED = ("succeeded", "failed", "cancelled")


# ------------------------------------------------------------------------------------- drain and checks


def drain(topo: Topology, timeout: float) -> float:
    """Wait until no job is queued or running (at most ``timeout`` s); the seconds it took."""
    import psycopg

    start = time.monotonic()
    with psycopg.connect(f"host={HOST} port=5432 user=postgres dbname={topo.db_name}", autocommit=True,
                         application_name=APP_SAMPLER) as conn:  # fmt: skip

        def done():
            n = conn.execute("SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')").fetchone()[0]
            return n == 0

        with contextlib.suppress(TimeoutError):
            wait_until(done, timeout, interval=0.5, what="every job to finish")
    return time.monotonic() - start


def job_rows(topo: Topology) -> list[dict]:
    import psycopg

    with psycopg.connect(f"host={HOST} port=5432 user=postgres dbname={topo.db_name}", autocommit=True,
                         application_name=APP_SAMPLER) as conn:  # fmt: skip
        cur = conn.execute(
            "SELECT j.id, j.status, j.attempts, j.spec->>'merge_method', j.error_code, "
            "extract(epoch FROM j.started_at - j.created_at), extract(epoch FROM j.finished_at - j.started_at), "
            "extract(epoch FROM j.finished_at - j.created_at), extract(epoch FROM j.created_at), "
            "(SELECT count(*) FROM job_events e WHERE e.job_id = j.id AND e.kind = 'claimed'), "
            "(SELECT count(*) FROM job_events e WHERE e.job_id = j.id AND e.kind = 'succeeded') "
            "FROM jobs j ORDER BY j.created_at"
        )
        keys = ["id", "status", "attempts", "method", "error_code", "queue_wait_s", "run_s", "turnaround_s",
                "created_epoch", "claimed_events", "succeeded_events"]  # fmt: skip
        rows = [dict(zip(keys, row, strict=True)) for row in cur.fetchall()]
    for row in rows:
        for k in ("queue_wait_s", "run_s", "turnaround_s", "created_epoch"):
            row[k] = float(row[k]) if row[k] is not None else None
    return rows


# -------------------------------------------------------------------------------------------- summary


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def latency(values: list[float]) -> dict:
    ms = [v * 1000 for v in values]
    return {
        "n": len(ms),
        "p50_ms": _r(pct(ms, 0.5)),
        "p99_ms": _r(pct(ms, 0.99)),
        "max_ms": _r(max(ms) if ms else None),
    }


def _r(x, nd: int = 1):
    return None if x is None else round(x, nd)


def summarise(
    args, topo: Topology, stats: ClientStats, sampler: Sampler, rows: list[dict], drain_s: float
) -> dict:
    reqs = stats.requests
    statuses: dict[str, dict[str, int]] = {}
    for _, route, status, _ in reqs:
        statuses.setdefault(route, {}).setdefault(status, 0)
        statuses[route][status] += 1
    routes = {route: latency([s for _, r, _, s in reqs if r == route]) for route in ROUTES}
    for route in ROUTES:
        routes[route]["statuses"] = statuses.get(route, {})
    n5xx = sum(n for st in statuses.values() for code, n in st.items() if code.startswith("5"))
    nerr = sum(n for st in statuses.values() for code, n in st.items() if code.startswith("error"))
    n4xx = sum(n for st in statuses.values() for code, n in st.items() if code.startswith("4"))

    windows = max(1, min(args.windows, int(args.duration_s // 2) or 1))
    width = args.duration_s / windows
    over_time = []
    for w in range(windows):
        lo, hi = w * width, (w + 1) * width
        row = {"from_s": round(lo, 1), "to_s": round(hi, 1)}
        for route in ROUTES:
            row[route] = latency([s for t, r, _, s in reqs if r == route and lo <= t < hi])
        row["requests_per_s"] = round(sum(1 for t, *_ in reqs if lo <= t < hi) / width, 1)
        over_time.append(row)

    samples = sampler.samples
    bound = (POOL_SIZE + MAX_OVERFLOW) * (args.api_workers + args.celery_workers)
    max_by_app: dict[str, int] = {}
    for smp in samples:
        for app, n in smp["db_connections_by_app"].items():
            max_by_app[app] = max(max_by_app.get(app, 0), n)
    max_conn = max((smp["db_connections"] for smp in samples), default=0)
    run_samples = [smp for smp in samples if smp["t"] <= args.duration_s]
    cpu_roles = sorted({role for smp in samples for role in smp["cpu_cores"]})
    cpu = {role: {"mean_cores": _r(statistics.fmean([smp["cpu_cores"].get(role, 0) for smp in run_samples]), 3)
                  if run_samples else None,
                  "max_cores": _r(max((smp["cpu_cores"].get(role, 0) for smp in run_samples), default=None), 3)}
           for role in cpu_roles}  # fmt: skip
    queued = [smp["jobs"].get("queued", 0) for smp in samples]  # the drain included
    # CPU seconds of each role over the whole sampling (clients and drain): each sample's cores are the
    # average since the previous sample
    cpu_s: dict[str, float] = {}
    prev = 0.0
    for smp in samples:
        dt, prev = smp["t"] - prev, smp["t"]
        for role, cores in smp["cpu_cores"].items():
            cpu_s[role] = cpu_s.get(role, 0.0) + cores * dt

    submitted = set(stats.submitted)
    db_ids = {row["id"] for row in rows}
    succeeded = [row for row in rows if row["status"] == "succeeded"]
    run_twice = [row["id"] for row in rows if row["attempts"] > 1 or row["claimed_events"] > 1
                 or row["succeeded_events"] > 1]  # fmt: skip
    not_done = [row["id"] for row in rows if row["status"] != "succeeded"]
    checks = {
        "no_5xx": n5xx == 0,
        "no_transport_errors": nerr == 0,
        "accepted_equals_in_db": submitted == db_ids,
        "all_succeeded": len(succeeded) == len(rows) and not not_done,
        "none_run_twice": not run_twice,
        "db_connections_bounded": max_conn <= bound,
    }
    done = succeeded
    jobs = {
        "accepted_202": len(submitted),
        "in_db": len(rows),
        "succeeded": len(succeeded),
        "not_succeeded": not_done[:20],
        "run_twice": run_twice[:20],
        "by_method": {
            m: sum(1 for r in rows if r["method"] == m) for m in sorted({r["method"] for r in rows})
        },
        "throughput_per_s": _r(len(done) / args.duration_s, 2),
        "queue_wait_s": _dist([r["queue_wait_s"] for r in done]),
        "run_s": _dist([r["run_s"] for r in done]),
        "turnaround_s": _dist([r["turnaround_s"] for r in done]),
        "drain_s": _r(drain_s, 1),
    }
    # queue wait over time: jobs grouped by when they were created
    first = min((r["created_epoch"] for r in rows), default=0.0)
    jobs["queue_wait_over_time"] = []
    for w in range(windows):
        lo, hi = w * width, (w + 1) * width
        sel = [r["queue_wait_s"] for r in done if lo <= r["created_epoch"] - first < hi]
        jobs["queue_wait_over_time"].append({"from_s": round(lo, 1), "to_s": round(hi, 1), **_dist(sel)})

    result = {
        "commit": git_commit(),
        "command": shlex.join(["python", "-m", "benchmarks.load", *args.argv]),
        "started_at": args.started_at,
        "machine": machine(),
        "conditions": {
            "note": args.note,
            "loadavg_before": args.loadavg_before,
            "other_cpu_cores_mean": cpu.get("other (not this run)", {}).get("mean_cores"),
        },
        "config": {
            "clients": args.clients,
            "duration_s": args.duration_s,
            "inflight_per_client": args.inflight,
            "think_s": [args.think_min_s, args.think_max_s],
            "teams": args.teams,
            "api_workers": args.api_workers,
            "celery_workers": args.celery_workers,
            "sample_s": args.sample_s,
            "seed": args.seed,
        },  # fmt: skip
        "requests": {
            "total": len(reqs),
            "per_s": _r(len(reqs) / args.duration_s, 1),
            "5xx": n5xx,
            "4xx": n4xx,
            "transport_errors": nerr,
        },  # fmt: skip
        "routes": routes,
        "over_time": over_time,
        "jobs": jobs,
        "db_connections": {
            "max_total": max_conn,
            "max_by_app": max_by_app,
            "bound": bound,
            "bound_rule": f"(pool_size {POOL_SIZE} + max_overflow {MAX_OVERFLOW}) x ({args.api_workers} uvicorn "
            f"workers + {args.celery_workers} Celery workers); the sampler's own connection is not counted",
        },
        "queue": {
            "queued_max": max(queued, default=0),
            "queued_mean": _r(statistics.fmean(queued), 2) if queued else None,
            "redis_queue_max": max((smp["redis_queue"] for smp in samples), default=0),
        },
        "api_worker_restarts": (topo.workdir / "api.log").read_text(errors="replace").count("] died"),
        "cpu_cores": cpu,
        "cpu_cost": cpu_cost(cpu_s, len(reqs), len(succeeded), args, machine_cpus()),
        "sampler_errors": sampler.errors[:10],
        "checks": checks,
        "ok": all(checks.values()),
        "samples": samples,
    }
    result["bottleneck"] = bottleneck(result)
    return result


def machine_cpus() -> int:
    import psutil

    return psutil.cpu_count() or 1


def cpu_cost(cpu_s: dict[str, float], n_requests: int, n_jobs: int, args, ncpu: int) -> dict:
    """CPU time per unit of work (these hardly depend on how busy the machine is, unlike latencies), and
    the CPU-only ceilings they imply on ``ncpu`` cores of the same kind with nothing else running."""
    workers = sum(v for k, v in cpu_s.items() if k.startswith("worker-"))
    api, pg, client = cpu_s.get("api", 0.0), cpu_s.get("postgres", 0.0), cpu_s.get("load client", 0.0)
    out: dict = {"cpu_s": {k: round(v, 2) for k, v in sorted(cpu_s.items())}}
    if n_requests:
        out["api_ms_per_request"] = round(1000 * api / n_requests, 2)
        out["postgres_ms_per_request"] = round(1000 * pg / n_requests, 2)  # its job writes included
        out["client_ms_per_request"] = round(1000 * client / n_requests, 2)
    if n_jobs:
        out["worker_s_per_job"] = round(workers / n_jobs, 3)
        out["requests_per_job"] = round(n_requests / n_jobs, 1)
    if n_requests and n_jobs:
        per_job = (workers + api + pg) / n_jobs  # a job and its share of the requests, the client left out
        ceilings = {
            "jobs_per_s_workers": round(min(args.celery_workers, ncpu) * n_jobs / workers, 2)
            if workers
            else None,
            "requests_per_s_api": round(min(args.api_workers, ncpu) * n_requests / api, 1) if api else None,
            "jobs_per_s_machine": round(ncpu / per_job, 2) if per_job else None,
        }
        out["ceilings_cpu_only"] = ceilings
    return out


def _dist(values: list) -> dict:
    xs = [v for v in values if v is not None]
    return {
        "n": len(xs),
        "p50": _r(pct(xs, 0.5), 3),
        "p99": _r(pct(xs, 0.99), 3),
        "max": _r(max(xs) if xs else None, 3),
    }


def bottleneck(res: dict) -> dict:
    """The first bottleneck, from this run's evidence: where the time of a job goes (queue vs run), which
    route's p99 grows from the first windows to the last, and which processes hold the CPU."""
    findings: list[str] = []
    jobs, cpu = res["jobs"], res["cpu_cores"]
    wait, run = jobs["queue_wait_s"]["p50"], jobs["run_s"]["p50"]
    ncpu = res["machine"]["cpus"]
    busy = sum((v["mean_cores"] or 0) for v in cpu.values())
    ours = {k: v["mean_cores"] or 0 for k, v in cpu.items() if k != "other (not this run)"}
    top = sorted(ours.items(), key=lambda kv: -kv[1])
    findings.append("CPU by role (mean cores): " + ", ".join(f"{k} {v:.2f}" for k, v in top)
                    + f"; other processes {cpu.get('other (not this run)', {}).get('mean_cores') or 0:.2f}; "
                    f"machine {busy:.2f} of {ncpu}")  # fmt: skip
    if wait is not None and run is not None:
        findings.append(f"a job waits {wait:.2f} s queued (p50) and runs {run:.2f} s (p50); "
                        f"{jobs['throughput_per_s']} jobs/s; queued jobs at most {res['queue']['queued_max']}")  # fmt: skip
    growth = {}
    ot = [w for w in res["over_time"]]
    if len(ot) >= 2:
        half = max(1, len(ot) // 4)
        for route in ROUTES:
            head = [w[route]["p99_ms"] for w in ot[:half] if w[route]["n"] >= 5 and w[route]["p99_ms"]]
            tail = [w[route]["p99_ms"] for w in ot[-half:] if w[route]["n"] >= 5 and w[route]["p99_ms"]]
            if head and tail:
                growth[route] = round(statistics.fmean(tail) / statistics.fmean(head), 2)
        if growth:
            findings.append("p99 last/first windows: " + ", ".join(f"{k} x{v}" for k, v in growth.items()))
    cost = res["cpu_cost"]
    if "ceilings_cpu_only" in cost:
        c = cost["ceilings_cpu_only"]
        findings.append(
            f"CPU per unit: API {cost['api_ms_per_request']} ms/request, PostgreSQL {cost['postgres_ms_per_request']} "
            f"ms/request, workers {cost['worker_s_per_job']} s/job, client {cost['client_ms_per_request']} ms/request; "
            f"{cost['requests_per_job']} requests per job. CPU-only ceilings on {ncpu} idle cores: workers "
            f"{c['jobs_per_s_workers']} jobs/s, API {c['requests_per_s_api']} requests/s, the whole mix "
            f"{c['jobs_per_s_machine']} jobs/s"
        )
    slowest = max(ROUTES, key=lambda r: res["routes"][r]["p99_ms"] or 0)
    findings.append(f"highest p99: {slowest} ({res['routes'][slowest]['p99_ms']} ms)")
    workers = sum(v for k, v in ours.items() if k.startswith("worker-"))
    n_workers = res["config"]["celery_workers"]
    other = cpu.get("other (not this run)", {}).get("mean_cores") or 0
    if other >= 0.5 * ncpu:
        verdict = (f"not measurable here: processes outside this run held {other:.2f} of {ncpu} cores, so this "
                   f"run measured CPU starvation (its own processes got {sum(ours.values()):.2f} cores), not "
                   "the service; rerun on quiet cores")  # fmt: skip
    elif busy >= 0.9 * ncpu:
        verdict = (f"the CPU: the machine is saturated ({busy:.2f} of {ncpu} cores busy on average); of this "
                   f"run's processes {top[0][0]} takes the most ({top[0][1]:.2f} cores)")  # fmt: skip
    elif wait is not None and run is not None and wait > 2 * run:
        verdict = (f"the Celery workers: jobs wait {wait:.2f} s in the queue for {run:.2f} s of run "
                   f"({n_workers} solo workers, {workers:.2f} cores between them)")  # fmt: skip
    else:
        verdict = f"none saturated; the slowest route is {slowest}"
    return {"verdict": verdict, "findings": findings, "p99_growth": growth}


def machine() -> dict:
    import psutil

    model = ""
    with contextlib.suppress(OSError):
        names = [ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")]
        model = names[0].split(":", 1)[1].strip() if names else ""
    return {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": machine_cpus(),
        "cpu_model": model,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "postgres": _pg_version(),
        "redis": _redis_version(),
    }


def _pg_version() -> str:
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN) as conn:
            return conn.execute("SHOW server_version").fetchone()[0]
    except Exception:  # noqa: BLE001
        return "unknown"


def _redis_version() -> str:
    res = subprocess.run(["redis-server", "--version"], capture_output=True, text=True)
    return res.stdout.split()[2].removeprefix("v=") if res.returncode == 0 else "unknown"


# --------------------------------------------------------------------------------------------- report


def write_report(res: dict, out_dir: Path, name: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out_dir / f"{name}.json", out_dir / f"{name}.md"
    jpath.write_text(json.dumps(res, indent=1) + "\n")
    m, cfg, jobs, db = res["machine"], res["config"], res["jobs"], res["db_connections"]
    lines = [
        "# Sustained load",
        "",
        f"Commit {res['commit']}, started {res['started_at']}; `{res['command']}`.",
        "",
        f"Machine: {m['host']}, {m['cpus']} × {m['cpu_model'] or 'CPU'}, {m['memory_gb']} GiB, {m['platform']}, "
        f"Python {m['python']}, PostgreSQL {m['postgres']}, Redis {m['redis']}.",
        "",
        f"Conditions: {res['conditions']['note'] or 'no note given'} Load average before the run "
        f"{res['conditions']['loadavg_before']}; processes outside this run used "
        f"{res['conditions']['other_cpu_cores_mean']} cores on average during it.",
        "",
        f"Topology (loopback): uvicorn `--workers {cfg['api_workers']}`, {cfg['celery_workers']} Celery workers "
        f"(`-Q cpu -P solo`), PostgreSQL (fresh database), a private Redis; {cfg['clients']} clients for "
        f"{cfg['duration_s']} s, at most {cfg['inflight_per_client']} unfinished jobs each, think time "
        f"{cfg['think_s'][0]}–{cfg['think_s'][1]} s, {cfg['teams']} teams; tiny classic jobs (linear, "
        "task_arithmetic of two tiny BERTs) to a local output.",
        "",
        f"**Result: {'all checks hold' if res['ok'] else 'CHECKS FAILED'}**: "
        + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in res["checks"].items())
        + ".",
        "",
        "## Requests",
        "",
        f"{res['requests']['total']} requests ({res['requests']['per_s']}/s), 5xx: {res['requests']['5xx']}, "
        f"4xx: {res['requests']['4xx']}, transport errors: {res['requests']['transport_errors']}; uvicorn "
        f"worker processes killed and replaced by its supervisor: {res['api_worker_restarts']}.",
        "",
        "| route | n | p50 (ms) | p99 (ms) | max (ms) | statuses |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for route in ROUTES:
        r = res["routes"][route]
        codes = ", ".join(f"{k}: {v}" for k, v in sorted(r["statuses"].items()))
        lines.append(f"| `{route}` | {r['n']} | {r['p50_ms']} | {r['p99_ms']} | {r['max_ms']} | {codes} |")
    lines += ["", "p99 (ms) over time:", "", "| window (s) | req/s | " + " | ".join(f"`{r}`" for r in ROUTES) + " |",
              "|---|---:|" + "---:|" * len(ROUTES)]  # fmt: skip
    for w in res["over_time"]:
        cells = " | ".join(str(w[r]["p99_ms"]) if w[r]["n"] else "" for r in ROUTES)
        lines.append(f"| {w['from_s']:.0f}–{w['to_s']:.0f} | {w['requests_per_s']} | {cells} |")
    qw, rs, ta = jobs["queue_wait_s"], jobs["run_s"], jobs["turnaround_s"]
    lines += [
        "",
        "## Jobs",
        "",
        f"Accepted (202) {jobs['accepted_202']}, in the database {jobs['in_db']}, succeeded {jobs['succeeded']} "
        f"({', '.join(f'{k} {v}' for k, v in jobs['by_method'].items())}); run twice: {len(jobs['run_twice'])}; "
        f"{jobs['throughput_per_s']} jobs/s over the run; the last jobs finished {jobs['drain_s']} s after the "
        "clients stopped.",
        "",
        "| seconds | p50 | p99 | max |",
        "|---|---:|---:|---:|",
        f"| queued (created → started) | {qw['p50']} | {qw['p99']} | {qw['max']} |",
        f"| running (started → finished) | {rs['p50']} | {rs['p99']} | {rs['max']} |",
        f"| turnaround (created → finished) | {ta['p50']} | {ta['p99']} | {ta['max']} |",
        "",
        f"Queued jobs (sampled every {cfg['sample_s']} s, the drain included): at most {res['queue']['queued_max']}, mean "
        f"{res['queue']['queued_mean']}; Redis `cpu` list at most {res['queue']['redis_queue_max']}.",
        "",
        "## Database connections",
        "",
        f"At most {db['max_total']} connections to the run's database (bound {db['bound']}: {db['bound_rule']}); "
        "by process role at most: " + ", ".join(f"{k or '(unnamed)'} {v}" for k, v in sorted(db["max_by_app"].items())) + ".",
        "",
        "## CPU by process role (cores, sampled)",
        "",
        "| role | mean | max |",
        "|---|---:|---:|",
    ]  # fmt: skip
    for role, v in sorted(res["cpu_cores"].items(), key=lambda kv: -(kv[1]["mean_cores"] or 0)):
        lines.append(f"| {role} | {v['mean_cores']} | {v['max_cores']} |")
    cost = res["cpu_cost"]
    lines += [
        "",
        "CPU seconds over the run and the drain: "
        + ", ".join(f"{k} {v}" for k, v in cost["cpu_s"].items())
        + ".",
    ]
    if "ceilings_cpu_only" in cost:
        c = cost["ceilings_cpu_only"]
        lines += [
            "",
            "| CPU per unit of work | |",
            "|---|---:|",
            f"| API (all uvicorn processes), ms per request | {cost['api_ms_per_request']} |",
            f"| PostgreSQL (this database's backends), ms per request (job writes included) | {cost['postgres_ms_per_request']} |",
            f"| Celery workers, s per job | {cost['worker_s_per_job']} |",
            f"| load client, ms per request | {cost['client_ms_per_request']} |",
            f"| requests per job in this mix | {cost['requests_per_job']} |",
            "",
            f"CPU-only ceilings they imply on {res['machine']['cpus']} idle cores (an estimate, not a measurement): "
            f"the workers {c['jobs_per_s_workers']} jobs/s, the API {c['requests_per_s_api']} requests/s, this "
            f"mix as a whole {c['jobs_per_s_machine']} jobs/s. These per-unit figures include each process's "
            "start-up work (imports, first connections) and its idle work (heartbeats, the reconciler): they "
            "mean something only over a long run with many requests.",
        ]
    b = res["bottleneck"]
    lines += ["", "## First bottleneck", "", f"**{b['verdict']}**", ""] + [f"- {f}" for f in b["findings"]]
    if res["sampler_errors"]:
        lines += ["", "Sampler errors: " + "; ".join(res["sampler_errors"])]
    mpath.write_text("\n".join(lines) + "\n")
    return jpath, mpath


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--duration-s", type=float, default=600)
    p.add_argument("--api-workers", type=int, default=4, help="uvicorn --workers")
    p.add_argument("--celery-workers", type=int, default=2)
    p.add_argument("--teams", type=int, default=3)
    p.add_argument("--inflight", type=int, default=2, help="unfinished jobs per client at most")
    p.add_argument("--think-min-s", type=float, default=0.1)
    p.add_argument("--think-max-s", type=float, default=0.5)
    p.add_argument("--timeout-s", type=float, default=30, help="per request")
    p.add_argument("--drain-s", type=float, default=180, help="wait at most this long for the jobs to finish")
    p.add_argument("--sample-s", type=float, default=1.0)
    p.add_argument("--startup-timeout-s", type=float, default=600, help="for the servers to start")
    p.add_argument("--worker-healthcheck-s", type=int, default=60,
                   help="uvicorn --timeout-worker-healthcheck (its default, 5 s, kills workers still importing on "
                   "starved cores, in a loop)")  # fmt: skip
    p.add_argument("--windows", type=int, default=10, help="time windows of the latency-over-time table")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--name", default="load", help="report file names: <name>.json and <name>.md")
    p.add_argument("--note", default="", help="conditions of the run, written into the report")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, outputs)")
    p.add_argument("--render", type=Path, default=None, metavar="JSON",
                   help="only write the Markdown report of an earlier run's JSON, beside it")  # fmt: skip
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render is not None:  # the Markdown report again, from a JSON one (nothing is run)
        res = json.loads(args.render.read_text())
        _, mpath = write_report(res, args.render.parent, args.render.stem)
        print(f"wrote {mpath}")
        return 0
    args.started_at = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    args.loadavg_before = [round(x, 2) for x in os.getloadavg()]
    t_start = time.monotonic()

    def say(msg: str) -> None:
        print(f"[load {time.monotonic() - t_start:6.1f}s] {msg}", flush=True)

    def on_term(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    workdir = Path(tempfile.mkdtemp(prefix="divmerge-load-"))
    topo = Topology(workdir, args.api_workers, args.celery_workers, args.teams, args.worker_healthcheck_s)
    sampler = None
    try:
        topo.start(say, args.startup_timeout_s)
        t0 = time.monotonic()
        sampler = Sampler(topo, args.sample_s, t0)
        sampler.start()
        say(f"{args.clients} clients for {args.duration_s:.0f} s")
        stats = asyncio.run(run_clients(topo, args, t0))
        say(
            f"clients stopped: {len(stats.requests)} requests, {len(stats.submitted)} jobs accepted; draining"
        )
        drain_s = drain(topo, args.drain_s)
        time.sleep(min(2 * args.sample_s, 2))
        sampler.stop_event.set()
        sampler.join(timeout=10)
        topo._check_alive()
        rows = job_rows(topo)
        res = summarise(args, topo, stats, sampler, rows, drain_s)
        jpath, mpath = write_report(res, args.out_dir, args.name)
        r = res["requests"]
        say(f"{r['total']} requests, 5xx {r['5xx']}, errors {r['transport_errors']}; jobs accepted "
            f"{res['jobs']['accepted_202']}, succeeded {res['jobs']['succeeded']}, run twice "
            f"{len(res['jobs']['run_twice'])}; DB connections max {res['db_connections']['max_total']} "
            f"(bound {res['db_connections']['bound']})")  # fmt: skip
        say(f"first bottleneck: {res['bottleneck']['verdict']}")
        say(f"checks: {res['checks']}; wrote {mpath} and {jpath}")
        return 0 if res["ok"] else 1
    finally:
        # the teardown is bounded (SIGTERM, 30 s, SIGKILL): a second signal must not cut it short and leave
        # the database or the servers behind (coreutils `timeout` signals the whole process group)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if sampler is not None:
            sampler.stop_event.set()
        topo.stop()
        if args.keep:
            say(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
