"""One real evaluated job through the service: ``python -m benchmarks.quality.llm_service_example``.

SmolLM2-135M-Instruct experts (the llm track's ``strong`` recipe, trained and cached on first use: about
10-12 min each on one CPU thread) answer GLUE-family tasks in words through the chat template. The script
starts ``divmerge serve`` on its embedded default (SQLite + one worker, in a temporary home), creates a
token, POSTs a layer-level DivMerge job whose models carry ``data`` (unlabelled instruction prompts from
the merge pool) and ``eval`` (held-out labelled examples with each label's answer word), comparing task
arithmetic and TIES, polls it, and writes what ``GET /v1/merges/{id}/evaluation`` answered, with the
table ``divmerge status`` prints, to ``benchmarks/results/llm_service_example.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from divmerge_client import Client, ClientError
from divmerge_core.evaluation.table import table

from .data import load_tasks, subset
from .llm import ANSWERS, LLM_RECIPES, build_llm_base, instruction, train_llm_expert
from .run import REPO, engine_commit

DIVMERGE = [sys.executable, "-m", "divmerge_core.cli"]


def spec(base: Path, experts: dict[str, Path], tasks, recipe, n_data: int, n_eval: int, epochs: int) -> dict:
    models = []
    for name, folder in experts.items():
        task = tasks[name]
        held_out = subset(task.eval, n_eval, 0)
        models.append(
            {
                "model": str(folder),
                "name": name,
                "data": {
                    "texts": [
                        instruction(name, ex, recipe.max_words) for ex in subset(task.merge_pool, n_data, 0)
                    ],
                    "chat_template": True,
                    "system_prompt": recipe.system_prompt,
                },
                "eval": {
                    "texts": [instruction(name, ex, recipe.max_words) for ex in held_out],
                    "labels": [ANSWERS[name][ex.label] for ex in held_out],
                    "chat_template": True,
                    "system_prompt": recipe.system_prompt,
                    "max_new_tokens": 4,
                    "num_samples": n_eval,
                },
            }
        )
    return {
        "merge_method": "divmerge",
        "base_model": str(base),
        "models": models,
        "parameters": {"granularity": "layer", "epochs": epochs, "max_length": recipe.max_prompt_tokens},
        "evaluation": {"compare": ["task_arithmetic", "ties"], "base": True},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["sst2", "snli"])
    ap.add_argument("--n-data", type=int, default=48, help="unlabelled merge inputs per task")
    ap.add_argument("--n-eval", type=int, default=100, help="held-out labelled examples per task")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--cache", type=Path, default=REPO / "benchmarks" / ".cache")
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--port", type=int, default=8765)
    args = ap.parse_args(argv)
    recipe = LLM_RECIPES["cpu"]
    tasks = load_tasks(args.data, args.tasks)
    base = build_llm_base(args.cache)
    import torch

    experts = {
        t: train_llm_expert(base, tasks[t], recipe, args.cache, torch.device("cpu")) for t in args.tasks
    }
    body = spec(base, experts, tasks, recipe, args.n_data, args.n_eval, args.epochs)
    with tempfile.TemporaryDirectory() as home:
        env = {
            **os.environ,
            "DIVMERGE_HOME": home,
            "DIVMERGE_LOCAL_ROOTS": str(args.cache.resolve()),  # the base and the experts live there
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
        }
        token = subprocess.run([*DIVMERGE, "token", "create", "--team", "example"], env=env, check=True,
                               capture_output=True, text=True).stdout.strip().splitlines()[-1]  # fmt: skip
        server = subprocess.Popen(
            [*DIVMERGE, "serve", "--port", str(args.port), "--log-level", "warning"], env=env
        )
        client = Client(f"http://127.0.0.1:{args.port}", token)
        try:
            client.wait_ready(timeout_s=120)
            t0 = time.time()
            job = client.submit(body)
            last = None

            def show(job: dict) -> None:
                nonlocal last
                p = job.get("progress") or {}
                line = (
                    f"{job['status']} {p.get('stage')} {p.get('step')}/{p.get('total')} eta {p.get('eta_s')}"
                )
                if line != last:
                    print(f"[{time.time() - t0:6.0f}s] {line}", flush=True)
                    last = line

            job = client.wait(job["id"], on_update=show, poll_s=5)
            if job["status"] != "succeeded":
                print(json.dumps(job.get("error")), file=sys.stderr)
                return 1
            evaluation = client.evaluation(job["id"])
        finally:
            client.close()
            server.terminate()
            server.wait(timeout=60)
    wall = time.time() - t0
    experts_info = {t: json.loads((p / "benchmark.json").read_text()) for t, p in experts.items()}
    payload = {
        "engine_commit": engine_commit(),
        "recipe": recipe.__dict__,
        "expert_train_s": {t: e["train_s"] for t, e in experts_info.items()},
        "job_wall_s": round(wall, 1),
        "metrics": job["result"]["metrics"],
        "spec_summary": {
            "tasks": args.tasks,
            "n_data": args.n_data,
            "n_eval": args.n_eval,
            "epochs": args.epochs,
        },
        "evaluation": evaluation,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "llm_service_example.json").write_text(json.dumps(payload, indent=1) + "\n")
    lines = [
        "# An evaluated DivMerge job through the service (SmolLM2-135M-Instruct experts)",
        "",
        f"Engine commit {payload['engine_commit']}; `python -m benchmarks.quality.llm_service_example` on the CPU "
        f"(embedded `divmerge serve`, 2 shared cores). Tasks {', '.join(args.tasks)}: {args.n_data} unlabelled "
        f"merge inputs and {args.n_eval} held-out labelled examples each; layer-level DivMerge, {args.epochs} "
        f"epochs; compared with task arithmetic and TIES; the job took {wall / 60:.1f} min.",
        "",
        "What `divmerge status` prints from `GET /v1/merges/{id}/evaluation` (accuracy in %):",
        "",
        "```text",
        table(evaluation),
        "```",
        "",
    ]
    (args.results / "llm_service_example.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ClientError as err:  # the server refused a request: say why, without a traceback
        sys.exit(f"llm_service_example: {err}")
