"""Held-out divergence, best Gamma and early stopping on the quick classification zoo:
``python -m benchmarks.quality.convergence_check [--runs JSON]``.

Merges sst2 + cola + qqp (k=3, MiniLM-L6 experts of the quick zoo, built or read from ``--cache``) with
layer-level DivMerge once per named parameter set, evaluates each merge on 100 eval examples per task, and
prints one JSON line per run: steps run and planned, the kept epoch, the held-out rows and the ANP. One
torch thread. The figures in docs/engine.md#convergence come from it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

TASKS = ("sst2", "cola", "qqp")
DEFAULT_RUNS = {
    "e8": {"epochs": 8},
    "e8_patience2": {"epochs": 8, "patience": 2},
    "e8_patience1": {"epochs": 8, "patience": 1},
}


def main(argv: list[str] | None = None) -> None:
    from divmerge_core.config import parse_config
    from divmerge_core.pipeline import run_merge

    from .classification import ClassificationTrack
    from .data import default_data_dir
    from .metrics import anp
    from .zoo import RECIPES

    repo = Path(__file__).resolve().parents[2]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=default_data_dir(repo))
    ap.add_argument("--cache", type=Path, default=repo / "benchmarks" / ".cache")
    ap.add_argument("--num-samples", type=int, default=64, help="unlabelled inputs per task")
    ap.add_argument("--runs", default=json.dumps(DEFAULT_RUNS), help="JSON: name -> engine parameters")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    track = ClassificationTrack(a.data, a.cache, TASKS, RECIPES["quick"], 100)
    expert_acc = {}
    for t in TASKS:
        correct = track.evaluate(track.experts[t], [t])[t]
        expert_acc[t] = sum(correct) / len(correct)
    print(json.dumps({"experts": expert_acc}), flush=True)
    for name, params in json.loads(a.runs).items():
        cfg = {
            "merge_method": "divmerge",
            "base_model": str(track.base),
            "models": [
                {"model": str(track.experts[t]), "data": track.data_spec(t, a.num_samples)} for t in TASKS
            ],
            "parameters": {"granularity": "layer", "lr": 0.05, "batch_size_per_task": 4, "max_length": 64}
            | params,
        }
        with tempfile.TemporaryDirectory(prefix="divmerge-convergence-") as tmp:
            out = Path(tmp) / name
            t0 = time.time()
            result = run_merge(parse_config(cfg), out, device="cpu")
            wall = time.time() - t0
            correct = track.evaluate(out, list(TASKS))
            shutil.rmtree(out, ignore_errors=True)
        acc = {t: sum(c) / len(c) for t, c in correct.items()}
        c = result.coefficients or {}
        print(
            json.dumps(
                {
                    "name": name,
                    "params": params,
                    "wall_s": round(wall, 1),
                    "acc": acc,
                    "anp": anp(acc, expert_acc),
                    "steps": c.get("steps"),
                    "planned": c.get("planned_steps"),
                    "best_epoch": c.get("best_epoch"),
                    "converged": c.get("converged"),
                    "stopped_early": c.get("stopped_early"),
                    "heldout": [[r[0], r[1], round(r[2], 5)] for r in c.get("heldout", [])],
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
