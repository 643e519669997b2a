"""Classic merges through our CLI and through ``mergekit-yaml``, each in a fresh measured process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from .checkpoints import CACHE
from .configs import classic_config, write_yaml
from .measure import Measurement, run_measured

ROOT = Path(__file__).resolve().parents[2]
MERGEKIT_VENV = ROOT / "benchmarks" / ".venvs" / "mergekit"
#: mergekit-yaml 0.1.5 flags: CPU arithmetic (its default; it has no --cpu-only), lazy loading. Default shard
#: size (5B parameters: one shard here, as ours) and tokenizer copy (we copy tokenizer files too).
MERGEKIT_FLAGS = ["--no-cuda", "--lazy-unpickle"]


#: Runs our CLI's ``main`` (``divmerge merge ...``) with whatever ``divmerge_core`` is first on sys.path.
CLI_CODE = "import sys; from divmerge_core.cli import main; sys.exit(main())"


def ours_command(config: Path, out: Path) -> list[str]:
    """Our CLI, ``divmerge merge CONFIG --out OUT --device cpu`` (run as ``python -c`` so that
    ``PYTHONPATH`` can point it at an engine snapshot, see :func:`engine_snapshot`)."""
    return [sys.executable, "-c", CLI_CODE, "merge", str(config), "--out", str(out), "--device", "cpu"]


def engine_snapshot(ref: str = "HEAD", root: Path = CACHE / "engine") -> tuple[Path, str]:
    """Export ``divmerge_core`` at git ``ref`` into ``root/<sha>`` and return (that folder, sha).

    Other engineers edit the engine while the benchmark runs; every measurement of one run uses this
    frozen, committed copy (put first on ``PYTHONPATH``), so all its rows measure the same code.
    """
    sha = subprocess.run(
        ["git", "rev-parse", ref], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    dest = root / sha[:12]
    if not (dest / "divmerge_core" / "__init__.py").exists():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "archive", sha, "divmerge_core"], cwd=ROOT, capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest, sha


def engine_env(snapshot: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.pop("VIRTUAL_ENV", None)
    if snapshot is not None:  # snapshot first; no implicit cwd/script dir ahead of it (PYTHONSAFEPATH)
        env["PYTHONSAFEPATH"] = "1"
        env["PYTHONPATH"] = os.pathsep.join([str(snapshot), str(ROOT), env.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        )
    return env


def mergekit_command(config: Path, out: Path, flags: list[str] | None = None) -> list[str]:
    return [str(MERGEKIT_VENV / "bin" / "mergekit-yaml"), str(config), str(out), *(flags or MERGEKIT_FLAGS)]


def mergekit_available() -> bool:
    return (MERGEKIT_VENV / "bin" / "mergekit-yaml").exists()


def warm_cache(paths: list[Path]) -> None:
    """Read the checkpoints once so every measured run starts from the same (warm) page cache."""
    for p in paths:
        for f in Path(p).glob("*.safetensors"):
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def run_classic(
    tool: str,
    method: str,
    base: Path,
    experts: list[Path],
    tag: str,
    work: Path = CACHE / "runs",
    timeout: float = 1800,
    snapshot: Path | None = None,
) -> Measurement:
    """Run one merge with ``tool`` (``divmerge`` or ``mergekit``); the output stays in ``work/<tag>``."""
    work.mkdir(parents=True, exist_ok=True)
    cfg = write_yaml(classic_config(method, base, experts), work / f"{tag}.yaml")
    out = work / tag
    if out.exists():
        shutil.rmtree(out)
    cmd = ours_command(cfg, out) if tool == "divmerge" else mergekit_command(cfg, out)
    warm_cache([base, *experts])
    subprocess.run(["sync"], check=False)
    m = run_measured(cmd, env=engine_env(snapshot), cwd=ROOT, timeout=timeout)
    m.extra.update({"tool": tool, "method": method, "k": len(experts), "out": str(out)})
    return m


def output_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
