"""Peak RSS and time of a K=8 DivMerge of LoRA experts against the same merge of full-weight experts (CPU).

    python -m benchmarks.speed.lora_memory --base benchmarks/.cache/llm-base-smollm2-135m-instruct --layers 8
    python -m benchmarks.speed.lora_memory --base ... --placements auto stream

One base (the SmolLM2-135M base, fp32, Llama layout, tied embeddings), K random peft LoRA adapters over it
(rank 16 on q/k/v/o/gate/up/down, ``init_lora_weights=False``), and the same K experts as full-weight
checkpoints (peft's ``merge_and_unload``), built once under ``--work``. Each merge (layer-level DivMerge,
end to end: teachers, optimisation, writing the merged model) runs in its own process with one torch
thread and a cold teacher cache of its own; its peak RSS is the process's ``ru_maxrss``. Writes
``benchmarks/results/lora_memory.md`` (+ ``.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.gpu.run import RESULTS, ROOT, _meta
from benchmarks.speed.learned_memory import runtime_rss_gib

GiB = float(1 << 30)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TEXTS = ["the cat sat on the mat and looked at the door", "how do plants turn sunlight into sugar"]

BUILD = """
import copy, json, sys, torch
from pathlib import Path
import peft
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.set_num_threads(1)
base_dir, work, k, rank = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
targets, layers = json.loads(sys.argv[5]), int(sys.argv[6])
base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(base_dir)
if layers and layers < base.config.num_hidden_layers:  # the first layers only (a smaller, real model)
    base.model.layers = base.model.layers[:layers]
    base.config.num_hidden_layers = layers
    if getattr(base.config, "layer_types", None):
        base.config.layer_types = base.config.layer_types[:layers]
if not (work / "base" / "model.safetensors").is_file():
    base.save_pretrained(work / "base", safe_serialization=True)
    tok.save_pretrained(work / "base")
for t in range(k):
    lora, full = work / f"lora{t}", work / f"full{t}"
    if (full / "model.safetensors").is_file() and (lora / "adapter_model.safetensors").is_file():
        continue
    torch.manual_seed(t + 1)
    cfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False)
    model = peft.get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():  # small deltas, as a fine-tune's
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(0.01)
    model.save_pretrained(lora)
    merged = model.merge_and_unload()
    merged.save_pretrained(full, safe_serialization=True)
    tok.save_pretrained(full)
    print(f"built expert {t}", flush=True)
"""

RUN = """
import json, resource, sys, time, torch
torch.set_num_threads(1)
from divmerge_core.config import parse_config
from divmerge_core.learned import estimate_learned_memory
from divmerge_core.pipeline import prepare, run_merge
cfg, out = json.loads(sys.argv[1]), sys.argv[2]
t0 = time.perf_counter()
config = parse_config(cfg)
plan = prepare(config)
est = estimate_learned_memory(plan, "cpu")
result = run_merge(config, out, device="cpu", plan=plan, force=True)
print(json.dumps({
    "ok": True,
    "wall_s": round(time.perf_counter() - t0, 1),
    "cpu_s": round(time.process_time(), 1),
    "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    "placement": result.metrics.get("placement"),
    "steps": result.metrics.get("steps"),
    "estimate_host_gib": {p: v["host"] / 2**30 for p, v in est["placements"].items()},
    "estimate_parts": est["parts"],
}))
"""


def build(base: Path, work: Path, k: int, rank: int, layers: int) -> Path:
    """The experts (and the base, truncated to ``layers`` when set) under ``work``; returns the base."""
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = [str(base), str(work), str(k), str(rank), json.dumps(TARGETS), str(layers)]
    subprocess.run([sys.executable, "-c", BUILD, *args], cwd=ROOT, check=True, env=env)
    return (work / "base").resolve()


def config(base: Path, models: list[str], placement: str) -> dict[str, Any]:
    return {
        "merge_method": "divmerge",
        "base_model": str(base),
        "models": [{"model": m, "data": {"texts": TEXTS}} for m in models],
        "dtype": "float32",
        "parameters": {
            "granularity": "layer",
            "placement": placement,
            "epochs": 1,
            "batch_size_per_task": 1,
            "max_length": 32,
            "max_new_tokens": 4,
            "heldout": 0,
        },
    }


def run_case(cfg: dict[str, Any], timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="lora-memory-") as tmp:
        env = dict(os.environ, OMP_NUM_THREADS="1", DIVMERGE_TEACHER_CACHE_DIR=str(Path(tmp) / "teachers"))
        try:
            out = subprocess.run([sys.executable, "-c", RUN, json.dumps(cfg), str(Path(tmp) / "out")], cwd=ROOT,
                                 capture_output=True, text=True, env=env, timeout=timeout)  # fmt: skip
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"timed out after {timeout:.0f} s"}
    if out.returncode != 0:
        return {"ok": False, "error": (out.stderr or out.stdout).strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _params(folder: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118


def render(data: dict[str, Any]) -> str:
    meta, model, runtime = data["meta"], data["model_gib"], data["runtime_gib"]
    lines = [
        "# Learned merges of LoRA experts: memory (issue 21, item 3)",
        "",
        f"{meta['date']}, engine `{meta.get('engine_commit')}`, {meta['cpus']} CPUs ("
        f"{meta.get('conditions') or 'conditions not recorded'}), torch {meta.get('torch')}. "
        f"Command: `{data['command']}`.",
        "",
        f"Layer-level DivMerge, K={data['k']} experts of the SmolLM2-135M base"
        + (f" cut to its first {data['layers']} of 30 layers" if data.get("layers") else "")
        + f" ({data['params_m']:.1f}M parameters, fp32 checkpoint of {model:.2f} GiB, Llama layout, tied "
        f"embeddings): K peft LoRA adapters (rank {data['rank']} on "
        f"{', '.join(TARGETS)}; {data['adapter_mib']:.1f} MiB each) against the same K experts pre-merged into "
        f"full-weight checkpoints (peft `merge_and_unload`). {len(TEXTS)} inputs per task, batch 1 per task, "
        f"max_length 32, 4 generated tokens, 1 epoch, fp32 compute, one torch thread, each run in a fresh "
        f"process end to end (teachers, optimisation, writing the merged model), cold teacher cache. The "
        f"runtime alone (torch + transformers + engine imported) peaks at {runtime:.2f} GiB.",
        "",
        "| experts | placement asked | placement used | peak RSS GiB | (peak - runtime) / model | estimate GiB "
        "(host, used placement) | wall s | CPU s | steps |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in data["rows"]:
        r = row["result"]
        if not r.get("ok"):
            lines.append(f"| {row['experts']} | {row['placement']} | | | | | | | FAILED: {r.get('error')} |")
            continue
        est = r["estimate_host_gib"].get(r["placement"])
        lines.append(
            f"| {row['experts']} | {row['placement']} | {r['placement']} | {r['peak_rss_gib']:.2f} | "
            f"{(r['peak_rss_gib'] - runtime) / model:.2f} | {est:.2f} | {r['wall_s']} | {r['cpu_s']} | "
            f"{r['steps']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.speed.lora_memory")
    ap.add_argument(
        "--base", type=Path, default=ROOT / "benchmarks" / ".cache" / "llm-base-smollm2-135m-instruct"
    )
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".cache" / "lora_memory")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--layers", type=int, default=0, help="keep the base's first N layers (0: all)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--placements", nargs="+", default=["auto"])
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--keep", action="store_true", help="keep the built experts under --work")
    ap.add_argument(
        "--conditions", default="", help="how busy the machine was, written into the report (e.g. 'quiet')"
    )
    args = ap.parse_args(argv)
    base = build(args.base.resolve(), args.work, args.k, args.rank, args.layers)
    lora = [f"{base}+{args.work / f'lora{t}'}" for t in range(args.k)]
    full = [str(args.work / f"full{t}") for t in range(args.k)]
    data: dict[str, Any] = {
        "meta": {**_meta(False, 0), "conditions": args.conditions},
        "command": "python -m benchmarks.speed.lora_memory "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "k": args.k,
        "layers": args.layers,
        "params_m": _params(base) / 1e6,
        "rank": args.rank,
        "model_gib": (base / "model.safetensors").stat().st_size / GiB,
        "adapter_mib": (args.work / "lora0" / "adapter_model.safetensors").stat().st_size / 2**20,
        "runtime_gib": runtime_rss_gib(),
        "rows": [],
    }
    for placement in args.placements:
        for experts, models in (("LoRA", lora), ("full-weight", full)):
            print(f"== {experts} K={args.k} placement={placement}", flush=True)
            t0 = time.monotonic()
            result = run_case(config(base, models, placement), args.timeout)
            print(f"   -> {json.dumps(result)[:400]} ({time.monotonic() - t0:.0f}s)", flush=True)
            data["rows"].append({"experts": experts, "placement": placement, "result": result})
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "lora_memory.json").write_text(json.dumps(data, indent=1) + "\n")
            (args.out / "lora_memory.md").write_text(render(data))
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
