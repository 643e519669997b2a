"""One benchmark case in its own process: ``python -m benchmarks.gpu.case '<json spec>'``.

Prints progress lines, then one line ``RESULT {json}`` with wall times (end to end, teachers, time to the
first optimisation step, steps/s, write), peak device memory (allocated and reserved) and peak host RSS.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

GiB = float(1 << 30)


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from divmerge_core.config import parse_config
    from divmerge_core.learned import estimate_learned_memory
    from divmerge_core.pipeline import prepare, run_merge

    from .models import SHAPES, ensure_family, task_texts

    device = torch.device(spec["device"])
    shape = SHAPES[spec["model"]]
    k = spec["k"]
    fam = ensure_family(shape, k, Path(spec["cache"]), device, dtype=spec.get("storage", "bfloat16"))
    print(f"  family ready ({fam['bytes'] / GiB:.1f} GiB on disk, built in {fam['build_s']}s)", flush=True)
    if spec.get("build_only"):
        return {"ok": True, "built": fam}
    config = parse_config(
        {
            "merge_method": "divmerge",
            "base_model": fam["base"],
            "models": [
                {
                    "model": e,
                    "data": {
                        "texts": task_texts(shape.vocab, spec["inputs"], spec["prompt_words"], t),
                        "num_samples": spec["inputs"],
                    },
                }
                for t, e in enumerate(fam["experts"])
            ],
            "dtype": spec.get("dtype", "bfloat16"),
            "parameters": {
                "granularity": "layer",
                "epochs": spec["epochs"],
                "batch_size_per_task": spec["batch_size_per_task"],
                "max_length": spec["max_length"],
                "max_new_tokens": spec["max_new_tokens"],
                "placement": spec["placement"],
                "gradient_checkpointing": spec.get("gradient_checkpointing", False),
                "micro_batch_size": spec.get("micro_batch_size"),
                "lr": 0.01,
            },
        }
    )
    cuda = device.type == "cuda"
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if cuda:
        torch.cuda.empty_cache()
        if spec.get("memory_cap_gib"):  # emulate a smaller card
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, spec["memory_cap_gib"] * GiB / total), device)
        torch.cuda.reset_peak_memory_stats(device)
    marks: dict[str, float] = {}
    steps: list[float] = []

    def progress(ev) -> None:  # noqa: ANN001 - ProgressEvent
        now = time.perf_counter()
        if ev.stage == "teacher":
            marks["teachers_done"] = now
            print(f"    teacher {ev.step}/{ev.total} at {now - t0:.1f}s", flush=True)
        elif ev.stage == "optimise":
            steps.append(now)
            if ev.step == 1 or ev.step == ev.total or ev.step % 50 == 0:
                print(f"    step {ev.step}/{ev.total} loss {ev.loss:.4g} at {now - t0:.1f}s", flush=True)
            if ev.step == ev.total:
                marks["optimise_done"] = now

    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401 - imported before the clock starts

    # a teacher cache of this case's own (cold: the teachers run), removed afterwards to free the disk
    teacher_cache = Path(tempfile.mkdtemp(prefix="teachers-", dir=spec["cache"]))
    os.environ["DIVMERGE_TEACHER_CACHE_DIR"] = str(teacher_cache)
    os.environ["DIVMERGE_TEACHER_CACHE_BYTES"] = str(1 << 40)
    try:
        t0 = time.perf_counter()
        plan = prepare(config)
        estimate = estimate_learned_memory(plan, device)
        with tempfile.TemporaryDirectory(dir=spec["cache"]) as tmp:
            result = run_merge(config, Path(tmp) / "out", device=str(device), progress=progress, plan=plan)
            out_bytes = sum(p.stat().st_size for p in (Path(tmp) / "out").iterdir())
        end = time.perf_counter()
        cache_bytes = sum(p.stat().st_size for p in teacher_cache.rglob("*") if p.is_file())
    finally:
        shutil.rmtree(teacher_cache, ignore_errors=True)
    row: dict[str, Any] = {
        "ok": True,
        "placement_used": result.metrics.get("placement"),
        "e2e_s": round(end - t0, 2),
        "teachers_s": round(marks.get("teachers_done", t0) - t0, 2),
        "time_to_first_step_s": round(steps[0] - t0, 2) if steps else None,
        "steps": len(steps),
        "steps_per_s": round((len(steps) - 1) / (steps[-1] - steps[0]), 3) if len(steps) > 1 else None,
        "write_s": round(end - marks.get("optimise_done", end), 2),
        "final_loss": result.metrics.get("final_loss"),
        "output_gib": round(out_bytes / GiB, 2),
        "teacher_cache_gib": round(cache_bytes / GiB, 2),
        "peak_host_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "family_build_s": fam["build_s"],
        "checkpoint_gib": round(fam["bytes"] / GiB / (k + 1), 2),
        "estimate_gib": {
            p: {w: round(v[w] / GiB, 2) for w in ("device", "host")}
            for p, v in estimate["placements"].items()
        },
        "estimate_chosen": estimate["chosen"],
    }
    if cuda:
        row["peak_device_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / GiB, 2)
        row["peak_device_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / GiB, 2)
    return row


def main(argv: list[str] | None = None) -> int:
    spec = json.loads((argv or sys.argv[1:])[0])
    try:
        row = run_case(spec)
    except Exception as err:  # noqa: BLE001 - every failure (OOM included) is recorded, not raised
        row = {"ok": False, "error": f"{type(err).__name__}: {str(err)[:600]}"}
        print(f"  FAILED: {row['error']}", flush=True)
    print("RESULT " + json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
