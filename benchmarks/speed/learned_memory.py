"""Peak RSS and step time of a layer-level DivMerge per placement and K, on 110M-parameter causal checkpoints (CPU).

    python -m benchmarks.speed.learned_memory            # K = 2, 4, 8 per placement, and K = 6 for stream
    python -m benchmarks.speed.learned_memory --ks 2 6 --placements stream

Each run is a fresh process (``benchmarks.gpu.case``: fp32 checkpoints and compute, a few optimisation steps,
the merged model written); its peak RSS is the process's ``ru_maxrss``. The runtime's own footprint is the
peak RSS of a process that only imports torch, transformers and the engine. Writes
``benchmarks/results/learned_memory.md`` (+ ``.json``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.gpu.run import CACHE, RESULTS, ROOT, _meta, run_one

GiB = float(1 << 30)
ORDER = ["resident", "offload", "stream"]
SPEC = dict(model="causal-110m", storage="float32", dtype="float32", inputs=3, epochs=1, batch_size_per_task=1,
            max_length=32, max_new_tokens=4, prompt_words=24, device="cpu", threads=2)  # fmt: skip


def runtime_rss_gib() -> float:
    code = (
        "import resource, torch, transformers, divmerge_core.learned, divmerge_core.pipeline; "
        "from transformers import AutoModelForCausalLM, AutoTokenizer; "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 2**20


def render(data: dict[str, Any]) -> str:
    model, runtime = data["model_gib"], data["runtime_gib"]
    lines = [
        "# Learned-merge memory on the CPU (issue 9)",
        "",
        f"{data['meta']['date']}, engine `{data['meta'].get('engine_commit')}`, {data['meta']['cpus']} CPUs "
        f"(shared), torch {data['meta'].get('torch')}. Command: `{data['command']}`.",
        "",
        f"Layer-level DivMerge of K experts of a 110M-parameter causal LM (Qwen2 layout, 768 wide, 12 layers, "
        f"32k vocabulary), fp32 checkpoints of {model:.2f} GiB each, fp32 compute, {SPEC['inputs']} inputs per "
        f"task, batch 1 per task, {SPEC['max_new_tokens']} generated tokens, {SPEC['threads']} threads. Peak RSS "
        f"is the whole run's (teachers, optimisation, writing); the runtime alone (torch + transformers + engine "
        f"imported) peaks at {runtime:.2f} GiB. Step time: median of the optimisation steps after the first.",
        "",
        "| placement | K | peak RSS GiB | (peak - runtime) / model | step s | end to end s | engine | status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in data["rows"]:
        r = row["result"]
        if not r.get("ok"):
            lines.append(
                f"| {row['placement']} | {row['k']} | | | | | | FAILED: {r.get('error', '?')[:160]} |"
            )
            continue
        step = f"{1 / r['steps_per_s']:.2f}" if r.get("steps_per_s") else "-"
        lines.append(
            f"| {row['placement']} | {row['k']} | {r['peak_host_rss_gib']:.2f} | "
            f"{(r['peak_host_rss_gib'] - runtime) / model:.2f} | {step} | {r['e2e_s']} | "
            f"`{row.get('engine_commit')}` | ok |"
        )
    lines += ["", "## Done-means (issue 9)", "", *verdict(data)]
    return "\n".join(lines) + "\n"


def verdict(data: dict[str, Any]) -> list[str]:
    rss = {
        (row["placement"], row["k"]): row["result"]["peak_host_rss_gib"]
        for row in data["rows"]
        if row["result"].get("ok")
    }
    out = []
    if ("stream", 2) in rss and ("stream", 6) in rss:
        ratio = rss[("stream", 6)] / rss[("stream", 2)]
        out.append(
            f"- stream, peak RSS K=6 / K=2: {ratio:.2f}x (target <= 1.3x: {'met' if ratio <= 1.3 else 'NOT met'})"
        )
    if rss:
        worst = (
            max(v for (p, _), v in rss.items() if p == "stream")
            if any(p == "stream" for p, _ in rss)
            else None
        )
        if worst is not None:
            limit = 3 * data["model_gib"] + data["runtime_gib"]
            mark = "met" if worst <= limit else "NOT met"
            out.append(
                f"- stream, largest peak RSS {worst:.2f} GiB vs 3 x model + runtime = {limit:.2f} GiB ({mark})"
            )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.speed.learned_memory")
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--placements", nargs="+", default=["resident", "offload", "stream"])
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--cache", type=Path, default=CACHE)
    args = ap.parse_args(argv)
    runs = [(p, k) for p in args.placements for k in args.ks]
    if "stream" in args.placements and 6 not in args.ks:
        runs.append(("stream", 6))
    build = run_one(dict(SPEC, name="build", placement="stream", k=max(k for _, k in runs), build_only=True,
                         cache=str(args.cache)), timeout=3600)  # fmt: skip
    if not build.get("ok"):
        print(f"building the checkpoints failed: {build}", flush=True)
        return 1
    data: dict[str, Any] = {
        "meta": _meta(False, 0),
        "command": "python -m benchmarks.speed.learned_memory " + " ".join(argv or sys.argv[1:]),
        "model_gib": build["built"]["bytes"] / GiB / (len(build["built"]["experts"]) + 1),
        "runtime_gib": runtime_rss_gib(),
        "rows": [],
    }
    previous = args.out / "learned_memory.json"
    if previous.is_file():  # rows of the runs not repeated now are kept (each names its engine commit)
        old = json.loads(previous.read_text())
        for row in old["rows"]:
            row.setdefault("engine_commit", old["meta"].get("engine_commit"))
        data["rows"] = [r for r in old["rows"] if (r["placement"], r["k"]) not in runs]
    for placement, k in runs:
        print(f"== {placement} K={k}", flush=True)
        t0 = time.monotonic()
        spec = dict(SPEC, name=f"{placement}-k{k}", placement=placement, k=k, cache=str(args.cache))
        result = run_one(spec, timeout=1800)
        print(f"   -> {json.dumps(result)} ({time.monotonic() - t0:.0f}s)", flush=True)
        commit = data["meta"].get("engine_commit")
        data["rows"].append({"placement": placement, "k": k, "engine_commit": commit, "result": result})
        data["rows"].sort(key=lambda r: (ORDER.index(r["placement"]), r["k"]))
        (args.out / "learned_memory.json").write_text(json.dumps(data, indent=1) + "\n")
        (args.out / "learned_memory.md").write_text(render(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
