"""Before/after check of the benchmark's evaluator: ``python -m benchmarks.quality.evaluator_check``.

The classification track used to score with its own code (plain transformers, argmax over the task's
slice of the union head); it now scores through the engine's evaluator (:mod:`.evaluate`). This runs both
on the same real checkpoints (the base, each expert of the quick zoo, and a task-arithmetic merge of them)
and the same eval examples, and writes per-example agreement and both accuracies to
``benchmarks/results/evaluator_check.{md,json}``. Identical predictions mean the committed figures of the
track are unchanged by the switch. ``reference_correctness`` below is the track's former evaluator, kept
verbatim as the reference.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from .classification import ClassificationTrack
from .data import Example, UnionHead
from .evaluate import evaluate_folder
from .run import REPO, engine_commit
from .zoo import RECIPES, encode


@torch.no_grad()
def reference_correctness(folder: Path, examples: list[Example], head: UnionHead, task: str, max_length: int):
    """The track's evaluator before the engine's: length-sorted batches of 64, argmax over the slice."""
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    order = sorted(
        range(len(examples)), key=lambda i: len(examples[i].text_a) + len(examples[i].text_b or "")
    )
    out = [False] * len(examples)
    for s in range(0, len(order), 64):
        ids = order[s : s + 64]
        batch = [examples[i] for i in ids]
        logits = model(**encode(tok, batch, max_length)).logits.float()
        pred = logits[:, head.slice_of(task)].argmax(dim=-1)
        for i, p, ex in zip(ids, pred.tolist(), batch, strict=True):
            out[i] = p == ex.label
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["sst2", "cola", "qqp"])
    ap.add_argument("--eval-n", type=int, default=300)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--cache", type=Path, default=REPO / "benchmarks" / ".cache")
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    recipe = RECIPES["quick"]
    track = ClassificationTrack(args.data, args.cache, tuple(args.tasks), recipe, args.eval_n)
    from divmerge_core.config import parse_config
    from divmerge_core.pipeline import run_merge

    merged = args.cache / "evaluator_check_merge"
    config = parse_config(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(track.base),
            "models": [{"model": str(track.experts[t])} for t in args.tasks],
            "parameters": {"lambda": 0.5},
        }
    )
    run_merge(config, merged, device="cpu", force=True)
    folders = {"base": track.base, **{f"expert {t}": track.experts[t] for t in args.tasks}, "merge": merged}
    rows, t_ref, t_engine = [], 0.0, 0.0
    for name, folder in folders.items():
        t0 = time.perf_counter()
        ref = {
            t: reference_correctness(folder, track.evals[t], track.head, t, recipe.max_length)
            for t in args.tasks
        }
        t1 = time.perf_counter()
        new = evaluate_folder(
            folder, {t: track.evals[t] for t in args.tasks}, track.head, max_length=recipe.max_length
        )
        t_ref, t_engine = t_ref + t1 - t0, t_engine + time.perf_counter() - t1
        for t in args.tasks:
            same = sum(a == b for a, b in zip(ref[t], new[t], strict=True))
            rows.append(
                {
                    "checkpoint": name,
                    "task": t,
                    "n": len(ref[t]),
                    "reference_acc": sum(ref[t]) / len(ref[t]),
                    "engine_acc": sum(new[t]) / len(new[t]),
                    "same_correctness": same,
                }
            )
    payload = {"engine_commit": engine_commit(), "recipe": recipe.__dict__, "rows": rows,
               "reference_s": round(t_ref, 1), "engine_s": round(t_engine, 1)}  # fmt: skip
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "evaluator_check.json").write_text(json.dumps(payload, indent=1) + "\n")
    lines = [
        "# The benchmark's evaluator, before and after the switch to the engine's",
        "",
        f"Engine commit {payload['engine_commit']}; `python -m benchmarks.quality.evaluator_check` "
        f"(quick zoo: tasks {', '.join(args.tasks)}, {args.eval_n} eval examples each, one torch thread).",
        "",
        "| checkpoint | task | n | before (reference) | after (engine) | same per-example result |",
        "|---|---|---:|---:|---:|---:|",
        *(
            f"| {r['checkpoint']} | {r['task']} | {r['n']} | {r['reference_acc']:.4f} | {r['engine_acc']:.4f} "
            f"| {r['same_correctness']}/{r['n']} |"
            for r in rows
        ),
        "",
        f"Scoring time: reference {payload['reference_s']} s, engine {payload['engine_s']} s "
        "(all checkpoints and tasks; the engine loads each checkpoint into one module it builds once per folder).",
        "",
    ]
    (args.results / "evaluator_check.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
