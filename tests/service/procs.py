"""Real server processes for the service tests: a private redis-server, Celery workers, olah, PostgreSQL DBs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(pred, timeout: float, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class PostgresDB:
    """A fresh database ``divmerge_test_<random>`` on the machine's PostgreSQL, dropped at the end."""

    def __init__(self):
        self.name = f"divmerge_test_{uuid.uuid4().hex[:10]}"
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{self.name}"

    def create(self) -> PostgresDB:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        return self

    def drop(self) -> None:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


class RedisServer:
    """A private redis-server (no persistence) this suite may kill and restart freely."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: port_open(self.port), 10, what="redis-server")
        return self

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()


class CeleryWorker:
    """``celery -A divmerge_worker.celery_app worker -P solo --concurrency 1``: the task runs in the worker's main
    process, so ``kill -9`` of that pid is the loss of the whole worker (machine) mid-job."""

    count = 0

    def __init__(self, env: dict[str, str], logdir: Path):
        CeleryWorker.count += 1
        self.name = f"w{CeleryWorker.count}"
        self.env = env
        self.log = logdir / f"celery-{self.name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> CeleryWorker:
        cmd = [str(BIN / "celery"), "-A", "divmerge_worker.celery_app", "worker", "-Q", "gpu,cpu", "--concurrency", "1",
               "-P", "solo", "--hostname", f"{self.name}@%h", "--loglevel", "INFO",
               "--without-gossip", "--without-mingle", "--without-heartbeat"]  # fmt: skip
        self._fh = open(self.log, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=self._fh, stderr=subprocess.STDOUT)
        if wait:
            wait_until(lambda: " ready." in self.log.read_text() or self.proc.poll() is not None, 60,
                       interval=0.2, what=f"celery worker {self.name}")  # fmt: skip
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill9()
        self._fh.close()


class Olah:
    """A local Hub (olah, offline) serving git repos of tiny models under ``acme/``."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.commits: dict[str, str] = {}

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add_model(self, repo_id: str, folder: Path, repo_type: str = "models") -> str:
        import shutil

        dest = self.workdir / "mirrors" / repo_type / repo_id
        shutil.copytree(folder, dest)
        git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
        subprocess.run(["git", "init", "-q", "-b", "main"], cwd=dest, check=True)
        subprocess.run(git + ["add", "-A"], cwd=dest, check=True)
        subprocess.run(git + ["commit", "-qm", "init"], cwd=dest, check=True)
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=dest, check=True, capture_output=True, text=True
        )
        self.commits[repo_id] = sha.stdout.strip()
        return self.commits[repo_id]

    def start(self) -> Olah:
        (self.workdir / "olah.toml").write_text(
            f'[basic]\nhost = "127.0.0.1"\nport = {self.port}\nrepos-path = "./olah-repos"\n'
            f'mirrors-path = ["./mirrors"]\n[accessibility]\noffline = true\n'
        )
        self.proc = subprocess.Popen(
            [str(BIN / "olah-cli"), "-c", "olah.toml"],
            cwd=self.workdir,
            stdout=open(self.workdir / "olah.log", "w"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        wait_until(lambda: port_open(self.port), 30, what="olah")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def checkout_plugins(folder: Path) -> Path:
    """A dist-info declaring this checkout's ``divmerge.commands`` entry points (read from pyproject.toml),
    to put on PYTHONPATH: the ``divmerge`` command then loads the plugins of the code under test even when
    the installed package's metadata predates them."""
    import tomllib

    eps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["divmerge.commands"]
    info = folder / "divmerge_checkout_plugins-0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: divmerge-checkout-plugins\nVersion: 0\n")
    lines = ["[divmerge.commands]", *(f"{name} = {target}" for name, target in eps.items())]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return folder


class PrivatePostgres:
    """A PostgreSQL cluster of our own (initdb + pg_ctl on a free port, in a temp dir) that a test may stop
    and start at will; the machine's shared PostgreSQL is never touched. Run as the ``postgres`` user when
    the tests run as root (PostgreSQL refuses to run as root)."""

    def __init__(self):
        import glob
        import tempfile

        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        if not bins:
            raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
        self.bin = Path(bins[-1]).parent
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="divmerge-pg-"))
        self.data = self.dir / "data"
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            import shutil

            shutil.chown(self.dir, "postgres")
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/divmerge"

    def _run(self, *args: str) -> None:
        subprocess.run([*self.as_user, *args], check=True, capture_output=True, timeout=60)

    def init(self) -> PrivatePostgres:
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                  "--no-sync", "-E", "UTF8")  # fmt: skip
        self.start()
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as conn:  # fmt: skip
            conn.execute("CREATE DATABASE divmerge")
        return self

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.dir / "pg.log"),
                  "-w", "start")  # fmt: skip

    def stop(self) -> None:
        """``pg_ctl stop -m fast``: open connections are closed, new ones refused."""
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def destroy(self) -> None:
        import shutil

        subprocess.run([*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                        "stop"], capture_output=True, timeout=60)  # fmt: skip
        shutil.rmtree(self.dir, ignore_errors=True)


class DivmergeServe:
    """``divmerge serve`` (uvicorn) on a free port in its own process group, logging to ``log``.
    ``start()`` launches it, ``wait_ready()`` waits for /readyz to answer 200, ``stop()`` sends SIGTERM and
    kills the group when it has not exited within 30 s."""

    def __init__(self, env: dict, log: Path, *args: str):
        self.env, self.log, self.args = env, log, args
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> DivmergeServe:
        self._log = open(self.log, "w")  # noqa: SIM115
        cmd = [str(BIN / "divmerge"), "serve", *self.args, "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)  # fmt: skip
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        import httpx

        def up():
            try:
                return httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, timeout, interval=0.2, what="divmerge serve")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self._log.close()
