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


def ours_command(config: Path, out: Path) -> list[str]:
    """Our CLI (the console script next to this interpreter, else ``python -m divmerge_core.cli``)."""
    script = Path(sys.executable).parent / "divmerge"
    head = [str(script)] if script.exists() else [sys.executable, "-m", "divmerge_core.cli"]
    return [*head, "merge", str(config), "--out", str(out), "--device", "cpu"]


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
    keep: bool = False,
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
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.pop("VIRTUAL_ENV", None)
    m = run_measured(cmd, env=env, cwd=ROOT, timeout=timeout)
    m.extra.update({"tool": tool, "method": method, "k": len(experts), "out": str(out)})
    if not keep and m.rc == 0 and not tag.endswith("-keep"):
        pass
    return m


def output_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
