"""Held-out divergence, best Gamma and early stopping, one merge per named parameter set:
``python -m benchmarks.quality.convergence_check [--track cls|llm] [--runs JSON] [--out FILE]``.

``cls`` (default): merges sst2 + cola + qqp (k=3, MiniLM-L6 experts of the quick zoo) with layer-level
DivMerge at lr 0.05, 4 inputs per task per step, 64 inputs per task. ``llm``: merges snli + qnli + qqp
(k=3, the SmolLM2-135M-Instruct experts of the llm track's cpu recipe, built or read from ``--cache``) with
the cpu mode's learned budget (40 inputs per task, 2 per task per step, the engine's lr). Each merge is
evaluated on 100 eval examples per task; one JSON line per run (steps run and planned, the kept epoch, the
held-out rows, the ANP) goes to stdout and to ``--out``. One torch thread. The figures in
docs/engine.md#convergence come from it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

TASKS = {"cls": ("sst2", "cola", "qqp"), "llm": ("snli", "qnli", "qqp")}
#: what the track's merges share (the runs' parameters override it)
BASE_PARAMETERS = {
    "cls": {"granularity": "layer", "lr": 0.05, "batch_size_per_task": 4, "max_length": 64},
    "llm": {"granularity": "layer", "batch_size_per_task": 2, "max_length": 128, "max_new_tokens": 4},
}
NUM_SAMPLES = {"cls": 64, "llm": 40}
DEFAULT_RUNS = {
    "e8": {"epochs": 8},
    "e8_patience2": {"epochs": 8, "patience": 2},
    "e8_patience1": {"epochs": 8, "patience": 1},
}


def main(argv: list[str] | None = None) -> None:
    from divmerge_core.config import parse_config
    from divmerge_core.pipeline import run_merge

    from .data import default_data_dir
    from .metrics import anp
    from .run import engine_commit

    repo = Path(__file__).resolve().parents[2]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--track", choices=sorted(TASKS), default="cls")
    ap.add_argument("--data", type=Path, default=default_data_dir(repo))
    ap.add_argument("--cache", type=Path, default=repo / "benchmarks" / ".cache")
    ap.add_argument("--num-samples", type=int, help="unlabelled inputs per task (default: the track's)")
    ap.add_argument("--runs", default=json.dumps(DEFAULT_RUNS), help="JSON: name -> engine parameters")
    ap.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    tasks, num_samples = TASKS[a.track], a.num_samples or NUM_SAMPLES[a.track]
    if a.track == "cls":
        from .classification import ClassificationTrack
        from .zoo import RECIPES

        track = ClassificationTrack(a.data, a.cache, tasks, RECIPES["quick"], 100)
    else:
        from .llm import LLM_RECIPES, LlmTrack

        track = LlmTrack(a.data, a.cache, tasks, LLM_RECIPES["cpu"], 100, torch.device("cpu"))

    def emit(line: dict) -> None:
        text = json.dumps(line)
        print(text, flush=True)
        if a.out is not None:
            with a.out.open("a") as f:
                f.write(text + "\n")

    expert_acc = {}
    for t in tasks:
        correct = track.evaluate(track.experts[t], [t])[t]
        expert_acc[t] = sum(correct) / len(correct)
    emit({"track": a.track, "engine_commit": engine_commit(), "experts": expert_acc})
    for name, params in json.loads(a.runs).items():
        cfg = {
            "merge_method": "divmerge",
            "base_model": str(track.base),
            "models": [
                {"model": str(track.experts[t]), "data": track.data_spec(t, num_samples)} for t in tasks
            ],
            "parameters": BASE_PARAMETERS[a.track] | params,
        }
        with tempfile.TemporaryDirectory(prefix="divmerge-convergence-") as tmp:
            out = Path(tmp) / name
            t0 = time.time()
            result = run_merge(parse_config(cfg), out, device="cpu")
            wall = time.time() - t0
            correct = track.evaluate(out, list(tasks))
            shutil.rmtree(out, ignore_errors=True)
        acc = {t: sum(c) / len(c) for t, c in correct.items()}
        c = result.coefficients or {}
        emit(
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
        )


if __name__ == "__main__":
    main()
