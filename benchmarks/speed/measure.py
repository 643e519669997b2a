"""Run a command in a fresh process and measure its wall time and peak memory.

Two independent peak-memory readings:

* ``max_rss_mb`` from ``/usr/bin/time -v`` ("Maximum resident set size"): the kernel's exact high-water
  mark of the largest single process in the tree (what most people quote);
* ``tree_rss_mb`` / ``tree_anon_mb`` from polling ``/proc`` every ``interval`` seconds: the peak of the
  summed RSS (and of the summed anonymous, i.e. non-file-backed, RSS) over the whole process tree. RSS
  counts pages of memory-mapped safetensors files that were touched; ``RssAnon`` does not, so it is the
  memory the tool really allocated.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

TIME_BIN = "/usr/bin/time"


@dataclass
class Measurement:
    cmd: list[str]
    rc: int
    wall_s: float
    max_rss_mb: float | None
    tree_rss_mb: float
    tree_anon_mb: float
    user_s: float | None = None
    sys_s: float | None = None
    stdout: str = ""
    stderr_tail: str = ""
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("stdout")
        return d


def parse_elapsed(text: str) -> float:
    """``/usr/bin/time`` elapsed format ``[h:]mm:ss.ss`` -> seconds."""
    parts = [float(p) for p in text.strip().split(":")]
    secs = 0.0
    for p in parts:
        secs = secs * 60 + p
    return secs


def parse_time_v(stderr: str) -> dict[str, float]:
    """Pull wall, user, sys seconds and max RSS (MiB) out of ``/usr/bin/time -v`` output."""
    out: dict[str, float] = {}
    m = re.search(r"Maximum resident set size \(kbytes\):\s*(\d+)", stderr)
    if m:
        out["max_rss_mb"] = int(m.group(1)) / 1024
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\):\s*([\d:.]+)", stderr)
    if m:
        out["wall_s"] = parse_elapsed(m.group(1))
    m = re.search(r"User time \(seconds\):\s*([\d.]+)", stderr)
    if m:
        out["user_s"] = float(m.group(1))
    m = re.search(r"System time \(seconds\):\s*([\d.]+)", stderr)
    if m:
        out["sys_s"] = float(m.group(1))
    return out


def read_proc_rss(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) of one process in kB, from /proc/<pid>/status; (0, 0) if it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0, 0
    return parse_proc_status(text)


def parse_proc_status(text: str) -> tuple[int, int]:
    rss = anon = 0
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
        elif line.startswith("RssAnon:"):
            anon = int(line.split()[1])
    return rss, anon


def proc_memory_mb() -> dict[str, float]:
    """VmHWM (peak RSS so far), VmRSS and RssAnon of this process, in MiB."""
    text = Path("/proc/self/status").read_text()
    rss, anon = parse_proc_status(text)
    hwm = 0
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1])
    return {"hwm_mb": hwm / 1024, "rss_mb": rss / 1024, "anon_mb": anon / 1024}


class TreePoller:
    """Poll the summed RSS / RssAnon of a process and its descendants in a background thread."""

    def __init__(self, pid: int, interval: float = 0.05):
        self.pid = pid
        self.interval = interval
        self.peak_rss_kb = 0
        self.peak_anon_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreePoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        try:
            root = psutil.Process(self.pid)
            pids = [self.pid] + [c.pid for c in root.children(recursive=True)]
        except psutil.Error:
            return
        rss = anon = 0
        for p in pids:
            r, a = read_proc_rss(p)
            rss += r
            anon += a
        self.peak_rss_kb = max(self.peak_rss_kb, rss)
        self.peak_anon_kb = max(self.peak_anon_kb, anon)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)


def run_measured(
    cmd: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout: float | None = None,
    interval: float = 0.05,
) -> Measurement:
    """Run ``cmd`` under ``/usr/bin/time -v`` (when present) while polling its process tree's memory."""
    use_time = shutil.which(TIME_BIN) is not None or os.path.exists(TIME_BIN)
    with tempfile.NamedTemporaryFile("r", suffix=".time", delete=False) as tf:
        time_file = tf.name
    full = [TIME_BIN, "-v", "-o", time_file, *cmd] if use_time else list(cmd)
    t0 = time.perf_counter()
    proc = subprocess.Popen(full, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with TreePoller(proc.pid, interval) as poller:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    parsed: dict[str, float] = {}
    if use_time:
        try:
            parsed = parse_time_v(Path(time_file).read_text())
        finally:
            os.unlink(time_file)
    return Measurement(
        cmd=list(cmd),
        rc=proc.returncode,
        wall_s=wall,
        max_rss_mb=parsed.get("max_rss_mb"),
        tree_rss_mb=poller.peak_rss_kb / 1024,
        tree_anon_mb=poller.peak_anon_kb / 1024,
        user_s=parsed.get("user_s"),
        sys_s=parsed.get("sys_s"),
        stdout=stdout,
        stderr_tail=stderr[-3000:],
    )


def median(values: list[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
