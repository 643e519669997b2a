"""The benchmark driver: runs each case in its own process within a wall-clock budget, writing results as it goes.

python -m benchmarks.gpu                  # full plan on the GPU, ~8 minutes on one H100/H200
python -m benchmarks.gpu --budget-s 300   # stop starting cases after 300 s (the rest are marked skipped)
python -m benchmarks.gpu --quick          # tiny models on the CPU (what the test runs)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / "benchmarks" / ".cache" / "gpu"
#: a case is not started with less than this left of the budget
MIN_CASE_S = 20


def plan_for(quick: bool) -> list[dict[str, Any]]:
    """The cases, most important first (a short budget keeps the first ones)."""
    if quick:
        common = dict(model="tiny", k=2, inputs=6, epochs=1, batch_size_per_task=2, max_length=12,
                      max_new_tokens=3, prompt_words=6, device="cpu")  # fmt: skip
        return [dict(common, name=f"tiny-{p}", placement=p) for p in ("resident", "offload", "stream")]
    half = dict(model="qwen0.5b", k=7, max_length=64, max_new_tokens=32, prompt_words=48,
                batch_size_per_task=4, device="cuda")  # fmt: skip
    big = dict(model="qwen7b-4l", k=7, inputs=16, epochs=1, max_length=64, max_new_tokens=32, prompt_words=48,
               batch_size_per_task=4, device="cuda", memory_cap_gib=79)  # fmt: skip
    return [
        # the target: 7 experts, 400 inputs per task, 4 epochs, end to end < 5 min
        dict(half, name="0.5B K=7 full (auto)", placement="auto", inputs=400, epochs=4),
        dict(big, name="7B-class K=7 offload, 80 GB cap (79 GiB)", placement="offload"),
        dict(big, name="7B-class K=7 stream, 80 GB cap (79 GiB)", placement="stream"),
        dict(half, name="0.5B K=7 offload (40 inputs, 1 epoch)", placement="offload", inputs=40, epochs=1),
        dict(half, name="0.5B K=7 stream (40 inputs, 1 epoch)", placement="stream", inputs=40, epochs=1),
        dict(half, name="0.5B K=7 resident (40 inputs, 1 epoch)", placement="resident", inputs=40, epochs=1),
    ]


def _meta(quick: bool, budget: float) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "mode": "quick" if quick else "full",
        "budget_s": budget,
        "python": platform.python_version(),
        "host": platform.node(),
        "cpus": os.cpu_count(),
    }
    try:
        meta["engine_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        meta["engine_commit"] = os.environ.get("DIVMERGE_COMMIT")
    probe = (
        "import json, torch, transformers; d = torch.cuda.is_available(); print(json.dumps({'torch': "
        "torch.__version__, 'transformers': transformers.__version__, 'gpu': torch.cuda.get_device_name(0) "
        "if d else None, 'gpu_gib': round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if d "
        "else None}))"
    )
    try:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
        meta.update(json.loads(out.stdout.strip().splitlines()[-1]))
    except (subprocess.SubprocessError, ValueError, IndexError):
        pass
    return meta


def run_one(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run a case in a fresh process, echoing its progress; its RESULT line, or a failure row."""
    cmd = [sys.executable, "-u", "-m", "benchmarks.gpu.case", json.dumps(spec)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    result: dict[str, Any] | None = None
    tail: list[str] = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), True)
    for line in proc.stdout:
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
        else:
            print(line.rstrip(), flush=True)
            tail = (tail + [line.rstrip()])[-20:]
        if time.monotonic() > deadline:
            proc.kill()
            break
    try:
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if result is None:
        why = "timed out (budget)" if time.monotonic() > deadline else f"exit code {proc.returncode}"
        result = {"ok": False, "error": f"{why}; last output: " + " | ".join(tail[-5:])}
    return result


def render(data: dict[str, Any]) -> str:
    meta = data["meta"]
    lines = [
        "# Learned merges on one GPU (issue 9)",
        "",
        f"{meta['date']}, engine `{meta.get('engine_commit')}`, {meta.get('gpu') or 'CPU'}"
        f" ({meta.get('gpu_gib') or '-'} GiB), torch {meta.get('torch')}, transformers {meta.get('transformers')},"
        f" {meta['mode']} plan, budget {meta['budget_s']:.0f} s. Command: `{data['command']}`.",
        "",
        "Layer-level DivMerge, bf16 compute (Gamma, loss and divergence in fp32), random-weight Qwen2-shaped "
        "models built from config, experts = base + N(0, 0.002) noise, prompts of random vocabulary words, "
        "full-vocabulary teacher outputs. End to end = prepare + teachers + all epochs + writing the merged "
        "safetensors; time to first step includes data, tokenising, task vectors and teacher generation. Teacher "
        "outputs go to a teacher cache on disk of the case's own (cold), removed after the case.",
        "",
        "| case | shape | placement | inputs/task x epochs | steps | end to end s | teachers s | first step s "
        "| steps/s | write s | peak device GiB (alloc/reserved) | peak host RSS GiB | teacher cache GiB (disk) "
        "| estimate device/host GiB | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in data["cases"]:
        s, r = c["spec"], c["result"]
        shape = c.get("shape_label", s["model"])
        if not r.get("ok"):
            status = "skipped: " + r["skipped"] if "skipped" in r else "FAILED: " + r.get("error", "?")[:200]
            lines.append(
                f"| {s['name']} | {shape} | {s['placement']} | {s['inputs']} x {s['epochs']} | | | | | | | | | | | "
                f"{status.replace('|', '/')} |"
            )
            continue
        used = r.get("placement_used")
        est = r["estimate_gib"].get(used, {})
        dev = (
            f"{r['peak_device_allocated_gib']} / {r['peak_device_reserved_gib']}"
            if "peak_device_allocated_gib" in r
            else "-"
        )
        where = used if s["placement"] == used else f"{s['placement']} -> {used}"
        lines.append(
            f"| {s['name']} | {shape} | {where} "
            f"| {s['inputs']} x {s['epochs']} | {r['steps']} | {r['e2e_s']} | {r['teachers_s']} "
            f"| {r['time_to_first_step_s']} | {r['steps_per_s']} | {r['write_s']} | {dev} | {r['peak_host_rss_gib']} "
            f"| {r.get('teacher_cache_gib', '-')} "
            f"| {est.get('device', '-')} / {est.get('host', '-')} | ok |"
        )
    lines += ["", *verdict(data)]
    return "\n".join(lines) + "\n"


def verdict(data: dict[str, Any]) -> list[str]:
    out = ["## Targets", ""]
    by_name = {c["spec"]["name"]: c["result"] for c in data["cases"]}
    full = by_name.get("0.5B K=7 full (auto)")
    if full is not None:
        if full.get("ok"):
            mark = "met" if full["e2e_s"] < 300 else "NOT met"
            out.append(
                f"- 0.5B, 7 experts, 400 inputs/task, 4 epochs end to end: {full['e2e_s']} s (< 300 s: {mark})"
            )
        else:
            out.append("- 0.5B, 7 experts end to end: no figure (see the table)")
    big = [(n, r) for n, r in by_name.items() if n.startswith("7B-class")]
    for n, r in big:
        if r.get("ok"):
            out.append(
                f"- {n}: ran, peak device {r.get('peak_device_reserved_gib')} GiB reserved (cap 79 GiB, an 80 GB card)"
            )
        else:
            out.append(f"- {n}: did not run ({(r.get('skipped') or r.get('error', '?'))[:120]})")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny models on the CPU (smoke test)")
    ap.add_argument(
        "--budget-s", type=float, default=480.0, help="wall-clock budget; later cases are skipped"
    )
    ap.add_argument("--only", nargs="*", help="run only the cases whose name contains one of these")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for gpu.md/gpu.json")
    ap.add_argument("--cache", type=Path, default=CACHE, help="folder for the generated checkpoints")
    args = ap.parse_args(argv)
    start = time.monotonic()
    stem = "gpu_quick" if args.quick else "gpu"
    args.out.mkdir(parents=True, exist_ok=True)
    args.cache.mkdir(parents=True, exist_ok=True)
    cases = plan_for(args.quick)
    if args.only:
        cases = [c for c in cases if any(o in c["name"] for o in args.only)]
    data: dict[str, Any] = {
        "meta": _meta(args.quick, args.budget_s),
        "command": "python -m benchmarks.gpu " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cases": [],
    }

    from .models import SHAPES

    kept: list[dict[str, Any]] = []
    previous = args.out / f"{stem}.json"
    if args.only and previous.is_file():  # a partial run updates its cases and keeps the others' figures
        ran = {c["name"] for c in cases}
        kept = [c for c in json.loads(previous.read_text())["cases"] if c["spec"]["name"] not in ran]
    data["cases"] = kept
    for spec in cases:
        spec = dict(spec, cache=str(args.cache))
        left = args.budget_s - (time.monotonic() - start)
        print(f"== {spec['name']} ({left:.0f}s of budget left)", flush=True)
        if left < MIN_CASE_S:
            result: dict[str, Any] = {"ok": False, "skipped": f"budget spent ({args.budget_s:.0f} s)"}
        else:
            result = run_one(spec, left)
        print(f"   -> {json.dumps(result)}", flush=True)
        data["cases"].append({"spec": spec, "shape_label": SHAPES[spec["model"]].label, "result": result})
        (args.out / f"{stem}.json").write_text(json.dumps(data, indent=1) + "\n")
        (args.out / f"{stem}.md").write_text(render(data))
    print(f"wrote {args.out / (stem + '.md')} in {time.monotonic() - start:.0f}s", flush=True)
    return 0
