"""Peak RSS of a causal DivMerge whose teacher outputs would need several GB in RAM (they live in the cache).

A GPT-2-shaped model with a large vocabulary and a tiny body (the teacher outputs scale with the vocabulary,
not the body), two experts = base + noise, ``--inputs`` prompts per task continued for ``--new-tokens``
tokens. Runs the merge three times in fresh processes: ``cached`` with an empty cache (the teachers run and
write their entries), ``cached`` again (a second job: every entry is a hit) and ``online``. Prints one JSON
line per run: wall time, teacher-stage and optimisation time, peak RSS, the cache's size on disk, and the
size the full-vocabulary fp32 teacher outputs (one row per generated token) would take in RAM.

    python -m benchmarks.speed.teacher_memory --vocab 32768 --inputs 64 --new-tokens 256 --threads 2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build(root: Path, vocab: int) -> tuple[Path, list[Path]]:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from .checkpoints import save_tokenizer

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=vocab, n_embd=64, n_layer=2, n_head=2, n_positions=512, bos_token_id=2, eos_token_id=1
    )
    base = GPT2LMHeadModel(cfg).eval()
    folders = []
    for i in range(3):
        model = base
        if i:
            model = GPT2LMHeadModel(cfg).eval()
            model.load_state_dict(base.state_dict())
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 0.02)
        folder = root / ("base" if i == 0 else f"expert{i}")
        model.save_pretrained(folder, safe_serialization=True)
        save_tokenizer(folder, 512)  # prompts use 512 words; the model's outputs span the whole vocabulary
        folders.append(folder)
    return folders[0], folders[1:]


def run_once(args: argparse.Namespace) -> dict:
    import torch
    from safetensors import safe_open

    from divmerge_core.config import parse_config
    from divmerge_core.options import EngineOptions
    from divmerge_core.pipeline import run_merge

    from .configs import random_texts

    torch.set_num_threads(args.threads)
    root = Path(args.root)
    base, experts = root / "base", [root / "expert1", root / "expert2"]
    cfg = parse_config(
        {
            "merge_method": "divmerge",
            "base_model": str(base),
            "models": [
                {"model": str(e), "data": {"texts": random_texts(args.inputs, 12, 512, seed=t)}}
                for t, e in enumerate(experts)
            ],
            "parameters": {
                "granularity": "layer",
                "epochs": 1,
                "batch_size_per_task": 2,
                "max_new_tokens": args.new_tokens,
                "teacher": args.teacher,
            },
        }
    )
    marks: dict[str, float] = {}
    start = time.perf_counter()

    def progress(ev) -> None:
        marks.setdefault(ev.stage, time.perf_counter() - start)  # each stage's first event
        if ev.stage == "data":
            marks["data_done"] = time.perf_counter() - start  # the teacher stage starts after the last one

    options = EngineOptions(teacher_cache_dir=root / "cache", teacher_cache_bytes=args.cache_bytes)
    with tempfile.TemporaryDirectory() as out:
        result = run_merge(cfg, Path(out) / "m", options=options, device="cpu", progress=progress)
    cache = root / "cache"
    entries = sorted(cache.glob("*.teacher.safetensors")) if cache.is_dir() else []
    on_disk = sum(p.stat().st_size for p in entries)
    rows = 0  # generated tokens over both tasks (a continuation may stop early at EOS)
    for p in entries:
        with safe_open(str(p), "pt") as f:
            rows += f.get_slice("logp").get_shape()[0]
    return {
        "teacher": args.teacher,
        "wall_s": round(time.perf_counter() - start, 1),
        # module, task vectors and every teacher (generation + scoring, or cache hits)
        "teacher_s": round(marks.get("optimise", 0) - marks.get("data_done", 0), 1),
        "optimise_s": round(marks.get("write", 0) - marks.get("optimise", 0), 1),
        "steps": result.metrics["steps"],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "cache_on_disk_mb": round(on_disk / 2**20),
        "teacher_rows": rows,
        "teacher_outputs_in_ram_would_be_mb": round(rows * args.vocab * 4 / 2**20),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=131072)
    ap.add_argument("--inputs", type=int, default=48, help="prompts per task (2 tasks)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-bytes", type=int, default=16 * 2**30)
    ap.add_argument("--root", help="working folder (default: a temporary one)")
    ap.add_argument("--teacher", default=None, help=argparse.SUPPRESS)  # one run, in this process
    args = ap.parse_args(argv)
    if args.teacher:
        print(json.dumps(run_once(args)), flush=True)
        return 0
    with tempfile.TemporaryDirectory(prefix="divmerge-teacher-mem-") as tmp:
        root = Path(args.root or tmp)
        build(root, args.vocab)
        common = [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("root", "teacher")
        ]
        for teacher in ("cached", "cached", "online"):
            cmd = [sys.executable, "-m", "benchmarks.speed.teacher_memory", *common, f"--root={root}"]
            subprocess.run([*cmd, f"--teacher={teacher}"], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
