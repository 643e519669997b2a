"""Time our layer-level DivMerge optimisation steps (run in a fresh process: ``python -m ...``).

Prints one JSON line: per-step wall times (from the engine's progress events), the time to the first
step (data, tokenisation, task vectors, teacher outputs), and peak memory at the end of optimisation.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from .configs import divmerge_config
from .measure import proc_memory_mb


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--experts", nargs="+", required=True)
    ap.add_argument("--vocab", type=int, required=True)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--granularity", default="layer")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)

    import torch

    from divmerge_core.config import parse_config
    from divmerge_core.pipeline import run_merge

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = parse_config(
        divmerge_config(
            Path(args.base),
            [Path(e) for e in args.experts],
            texts_per_task=args.batch * args.steps,
            seq_len=args.seq_len,
            vocab_size=args.vocab,
            batch_size=args.batch,
            epochs=1,
            granularity=args.granularity,
        )
    )
    t0 = time.perf_counter()
    stamps: list[float] = []
    cpu_stamps: list[float] = []
    mem_at_end: dict[str, float] = {}
    first_step_at: list[float] = []
    first_cpu: list[float] = []

    def progress(ev) -> None:  # noqa: ANN001 - ProgressEvent
        now = time.perf_counter()
        if ev.stage == "teacher" and ev.step == ev.total:
            first_step_at.append(now)
            first_cpu.append(time.process_time())
        if ev.stage == "optimise":
            stamps.append(now)
            cpu_stamps.append(time.process_time())
            if ev.step == ev.total:
                mem_at_end.update(proc_memory_mb())

    with tempfile.TemporaryDirectory() as tmp:
        result = run_merge(cfg, Path(tmp) / "out", device="cpu", progress=progress)
    total = time.perf_counter() - t0
    start = first_step_at[-1] if first_step_at else t0
    times = [b - a for a, b in zip([start, *stamps[:-1]], stamps, strict=True)]
    cpu0 = first_cpu[-1] if first_cpu else 0.0
    cpu_times = [b - a for a, b in zip([cpu0, *cpu_stamps[:-1]], cpu_stamps, strict=True)]
    json.dump(
        {
            "tool": "divmerge",
            "granularity": args.granularity,
            "k": len(args.experts),
            "batch_per_task": args.batch,
            "seq_len": args.seq_len,
            "steps": len(times),
            "step_times_s": times,
            "step_cpu_s": cpu_times,
            "setup_s": start - t0,
            "total_s": total,
            "threads": torch.get_num_threads(),
            "coefficient_groups": len((result.coefficients or {}).get("groups", [])),
            **{f"opt_{k}": v for k, v in mem_at_end.items()},
            "final": proc_memory_mb(),
        },
        sys.stdout,
    )
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
