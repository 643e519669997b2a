"""Orchestrates the speed/memory benchmark and writes ``benchmarks/results/speed.{md,json,png}``."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from .checkpoints import CACHE, SIZES, make_family
from .classic import MERGEKIT_VENV, ROOT, engine_env, engine_snapshot, mergekit_available, run_classic
from .compare import compare_checkpoints
from .configs import METHOD_SPECS
from .measure import median
from .report import floor_summary, plot, ratio, render_markdown, summarise_runs

RESULTS = ROOT / "benchmarks" / "results"
FUSIONBENCH_VENV = ROOT / "benchmarks" / ".venvs" / "fusionbench"
SECTIONS = ("headline", "floor", "methods", "correctness", "learned", "scaling", "learned_scaling")
#: Every classic method, in the order of the per-method table.
CLASSIC_METHODS = list(METHOD_SPECS)
#: The frozen engine copy every measurement of this run uses (set by main()).
SNAPSHOT: Path | None = None
ENGINE_SHA: str | None = None
#: Earlier mergekit runs to reuse (size, k, method) -> run records (mergekit does not change between runs).
REUSE_MERGEKIT: dict[tuple[str, int, str], list[dict]] = {}


def plan_for(quick: bool) -> dict[str, Any]:
    """What each mode measures. ``--quick`` finishes in a few minutes on 2 idle cores."""
    if quick:
        return {
            "headline": {"size": "25M", "k": 4, "methods": ["task_arithmetic", "ties"], "reps": 1},
            "floor": {"size": "25M", "k": 4, "reps": 1},
            "methods": {"size": "25M", "k": 4, "methods": CLASSIC_METHODS, "reps": 1},
            "correctness": {"size": "25M", "k": 4, "methods": ["linear", "task_arithmetic", "ties"]},
            "learned": {"size": "25M", "k": 2, "batch": 2, "seq_len": 32, "steps": 3},
            "scaling": {"sizes": ["25M"], "ks": [2, 4], "reps": 1, "mergekit": True},
            "learned_scaling": {"size": "25M", "ks": [2], "batch": 2, "seq_len": 32, "steps": 3},
        }
    return {
        "headline": {  # the shape the engine's speed targets are stated on (GPT-2 small, fp32)
            "size": "gpt2-124M",
            "k": 4,
            "methods": ["task_arithmetic", "ties"],
            "reps": 3,
            "reps_by_method": {"ties": 2},
        },
        "floor": {"size": "gpt2-124M", "k": 4, "reps": 3},
        # every classic method on the headline's shape, one run each, with its cross-check vs mergekit
        "methods": {"size": "gpt2-124M", "k": 4, "methods": CLASSIC_METHODS, "reps": 1},
        "correctness": {"size": "gpt2-124M", "k": 4, "methods": ["linear", "task_arithmetic", "ties"]},
        "learned": {"size": "100M", "k": 4, "batch": 4, "seq_len": 64, "steps": 4},
        "scaling": {
            "sizes": ["25M", "100M", "300M"],
            "ks": [2, 4, 8],
            "reps": 1,
            "mergekit": True,
            "max_k": {"300M": 2},
        },
        "learned_scaling": {
            "size": "25M",
            "ks": [2, 4, 8],
            "batch": 4,
            "seq_len": 64,
            "steps": 4,
            "fusionbench": True,
        },
    }


class Results:
    """The results dict, saved after every measurement so a cut run keeps what it measured."""

    def __init__(self, path: Path, meta: dict[str, Any]):
        self.path = path
        self.data: dict[str, Any] = {"meta": meta}

    def add(self, section: str, item: Any) -> None:
        self.data.setdefault(section, []).append(item)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1, default=str) + "\n", encoding="utf-8")


def _version(python: Path, module: str) -> str | None:
    if not python.exists():
        return None
    code = f"import importlib.metadata as m; print(m.version({module!r}))"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=False)
    return out.stdout.strip() or None


def _meta(quick: bool) -> dict[str, Any]:
    import torch

    return {
        "quick": quick,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
        f"{round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB RAM, torch threads "
        f"{torch.get_num_threads()}",
        "torch": torch.__version__,
        "mergekit": _version(MERGEKIT_VENV / "bin" / "python", "mergekit"),
        "fusion_bench": _version(FUSIONBENCH_VENV / "bin" / "python", "fusion-bench"),
        "load_average_start": os.getloadavg(),
    }


# --- classic ------------------------------------------------------------------------------------------
def classic_rows(
    res: Results,
    section: str,
    size: str,
    k: int,
    methods: list[str],
    reps: int,
    tools: list[str],
    reps_by_method: dict[str, int] | None = None,
) -> list[dict]:
    """Run each (method, tool) ``reps`` times, interleaving tools; add one row per (method, tool)."""
    base, experts = make_family(size, k)
    rows = []
    for method in methods:
        runs: dict[str, list[dict]] = {t: [] for t in tools}
        n_reps = (reps_by_method or {}).get(method, reps)
        reused = REUSE_MERGEKIT.get((size, k, method), []) if "mergekit" in tools else []
        if reused:
            runs["mergekit"] = [dict(r, reused=True) for r in reused]
            print(
                f"  {section}: reusing {len(reused)} earlier mergekit runs of {method} {size} K={k}",
                flush=True,
            )
        for rep in range(n_reps):
            for tool in tools if rep % 2 == 0 else list(reversed(tools)):
                if tool == "mergekit" and reused:
                    continue
                tag = f"{tool}-{method}-{size}-K{k}"
                m = run_classic(tool, method, base, experts, tag, snapshot=SNAPSHOT)
                runs[tool].append(m.to_json())
                print(
                    f"  {section}: {tag} rep {rep + 1}/{n_reps}: rc={m.rc} wall={m.wall_s:.1f}s "
                    f"cpu={(m.user_s or 0) + (m.sys_s or 0):.1f}s rss={m.max_rss_mb or 0:.0f}MiB "
                    f"load={os.getloadavg()[0]:.1f}",
                    flush=True,
                )
                if m.rc != 0:
                    print(m.stderr_tail[-1500:], file=sys.stderr)
        summaries = {t: summarise_runs(runs[t]) for t in tools}
        for tool in tools:
            row = {
                "size": size,
                "params_m": round(SIZES[size].n_params / 1e6, 1),
                "k": k,
                "k_used": min(k, METHOD_SPECS[method].n_models or k),
                "method": method,
                "tool": tool,
                "summary": summaries[tool],
                "runs": runs[tool],
                "engine_commit": ENGINE_SHA if tool == "divmerge" else None,
            }
            if tool == "divmerge" and "mergekit" in summaries:
                ours, mk = summaries["divmerge"], summaries["mergekit"]
                if ours.get("ok") and mk.get("ok"):
                    row["wall_ratio"] = ratio(ours["wall_s"], mk["wall_s"])
                    row["cpu_ratio"] = ratio(ours["cpu_s"], mk["cpu_s"])
                    row["rss_ratio"] = ratio(ours["max_rss_mb"], mk["max_rss_mb"])
                    row["anon_ratio"] = ratio(ours["tree_anon_mb"], mk["tree_anon_mb"])
            res.add(section, row)
            rows.append(row)
    return rows


def correctness(res: Results, size: str, k: int, methods: list[str]) -> None:
    base, experts = make_family(size, k)
    for method in methods:
        outs = {}
        for tool in ("divmerge", "mergekit"):
            tag = f"{tool}-{method}-{size}-K{k}"
            out = CACHE / "runs" / tag
            if not (out / "config.json").exists():
                m = run_classic(tool, method, base, experts, tag, snapshot=SNAPSHOT)
                if m.rc != 0:
                    res.add(
                        "correctness", {"method": method, "size": size, "k": k, "error": f"{tool} failed"}
                    )
                    break
            outs[tool] = out
        else:
            cmp = compare_checkpoints(outs["divmerge"], outs["mergekit"])
            cmp.update({"method": method, "size": size, "k": k})
            print(f"  correctness {method}: max abs diff {cmp.get('max_abs_diff')}", flush=True)
            res.add("correctness", cmp)


def floor(res: Results, size: str, k: int, reps: int) -> None:
    """The I/O floor (:mod:`benchmarks.speed.floor`): the K+1 inputs read once, one output written."""
    from .classic import warm_cache
    from .measure import run_measured

    base, experts = make_family(size, k)
    for rep in range(reps):
        out = CACHE / "runs" / f"floor-{size}-K{k}"
        cmd = [sys.executable, "-m", "benchmarks.speed.floor", "--inputs", str(base), *map(str, experts)]
        warm_cache([base, *experts])
        subprocess.run(["sync"], check=False)
        m = run_measured([*cmd, "--out", str(out)], env=engine_env(None), cwd=ROOT, timeout=1800)
        line = next((ln for ln in reversed(m.stdout.splitlines()) if ln.startswith("{")), None)
        row: dict[str, Any] = {"size": size, "k": k, "rep": rep, **m.to_json()}
        row["floor"] = json.loads(line) if m.rc == 0 and line else None
        print(
            f"  floor {size} K={k} rep {rep + 1}/{reps}: rc={m.rc} wall={m.wall_s:.1f}s {row['floor']}",
            flush=True,
        )
        res.add("floor", row)


def methods(res: Results, size: str, k: int, names: list[str], reps: int, tools: list[str]) -> None:
    """Every method side by side with mergekit, each output cross-checked against mergekit's."""
    for method in names:
        rows = classic_rows(res, "methods", size, k, [method], reps, tools)
        if "mergekit" not in tools:
            continue
        ours_row = next(r for r in rows if r["tool"] == "divmerge")
        outs = [Path(r["runs"][-1]["extra"]["out"]) for r in rows if r["runs"]]
        if not all(r["summary"].get("ok") for r in rows):
            check: dict[str, Any] = {"error": "a tool failed"}
        elif METHOD_SPECS[method].randomised:
            check = {"note": RANDOMISED_NOTE}
        else:
            check = compare_checkpoints(*outs)
            print(f"  vs mergekit {method}: max abs diff {check.get('max_abs_diff')}", flush=True)
        ours_row["vs_mergekit"] = check  # the row object res holds: saved below
        res.save()


RANDOMISED_NOTE = (
    "randomised masks (mergekit draws from torch's global generator, we from a per-tensor seed): "
    "not compared tensor by tensor; tests/test_mergekit_compat.py checks the kept fraction and rescaling"
)


# --- learned -------------------------------------------------------------------------------------------
def learned_run(
    tool: str, size: str, k: int, batch: int, seq_len: int, steps: int, granularity: str = "layer"
) -> dict:
    """One learned-merging measurement in a fresh process; the first step is dropped as warm-up."""
    from .measure import run_measured

    base, experts = make_family(size, k)
    args = [
        "--base", str(base), "--experts", *map(str, experts), "--vocab", str(SIZES[size].vocab),
        "--batch", str(batch), "--seq-len", str(seq_len), "--steps", str(steps),
    ]  # fmt: skip
    if tool == "divmerge":
        cmd = [sys.executable, "-m", "benchmarks.speed.learned_ours", *args, "--granularity", granularity]
    else:
        cmd = [str(FUSIONBENCH_VENV / "bin" / "python"), "-m", "benchmarks.speed.learned_fusionbench", *args]
    env = dict(engine_env(SNAPSHOT if tool == "divmerge" else None), TRANSFORMERS_OFFLINE="1")
    m = run_measured(cmd, env=env, cwd=ROOT, timeout=3600)
    row: dict[str, Any] = {"tool": tool, "size": size, "k": k, "ok": False, "max_rss_mb": m.max_rss_mb}
    row["engine_commit"] = ENGINE_SHA if tool == "divmerge" else None
    line = next((ln for ln in reversed(m.stdout.splitlines()) if ln.startswith("{")), None)
    if m.rc != 0 or line is None:
        row["error"] = m.stderr_tail[-800:]
        print(f"  learned {tool} {size} K={k} FAILED: {row['error'][-400:]}", flush=True)
        return row
    data = json.loads(line)
    times = data["step_times_s"][1:] or data["step_times_s"]
    cpu = data.get("step_cpu_s", [])[1:] or data.get("step_cpu_s", [])
    row.update(data)
    row.update(
        {
            "ok": True,
            "granularity": data.get("granularity", granularity),
            "coefficients": data.get("coefficient_groups"),
            "step_s": median(times),
            "step_cpu_s_median": median(cpu) if cpu else None,
            "peak_rss_mb": data.get("opt_hwm_mb"),
            "anon_mb": data.get("opt_anon_mb"),
            "process_max_rss_mb": m.max_rss_mb,
            "process_wall_s": m.wall_s,
        }
    )
    print(
        f"  learned {tool} ({row['granularity']}) {size} K={k}: step {row['step_s']:.2f}s "
        f"(cpu {row['step_cpu_s_median'] or 0:.2f}s) peak {row['peak_rss_mb']:.0f}MiB load={os.getloadavg()[0]:.1f}",
        flush=True,
    )
    return row


def learned(res: Results, spec: dict, fusionbench: bool) -> None:
    size, k, b, sl, steps = spec["size"], spec["k"], spec["batch"], spec["seq_len"], spec["steps"]
    rows = [learned_run("divmerge", size, k, b, sl, steps, "layer")]
    res.add("learned", rows[-1])
    if fusionbench:
        rows.append(learned_run("fusionbench", size, k, b, sl, steps))
        res.add("learned", rows[-1])
    rows.append(learned_run("divmerge", size, k, b, sl, steps, "tensor"))
    res.add("learned", rows[-1])


# --- verdict -------------------------------------------------------------------------------------------
#: The engine's stated targets (issue 12): (wall ratio, peak-RSS ratio) ours/mergekit; other methods: parity.
CLASSIC_TARGETS = {"task_arithmetic": (0.3, 0.3), "ties": (0.1, 0.3)}
#: Issue 21: every classic method within this factor of the I/O floor's wall time.
FLOOR_TARGET = 2.0


def verdict(data: dict[str, Any]) -> list[str]:
    out = []
    for row in data.get("headline", []):
        if row["tool"] != "divmerge" or row.get("wall_ratio") is None:
            continue
        max_wall, max_rss = CLASSIC_TARGETS.get(row["method"], (1.0, 1.0))
        ok_t = row["wall_ratio"] <= max_wall
        ok_m = row["rss_ratio"] <= max_rss
        out.append(
            f"{row['method']} {row['size']} K={row['k']}: wall ours/mergekit = {row['wall_ratio']:.2f} "
            f"(target <= {max_wall}: {'met' if ok_t else 'MISSED'}; CPU-time ratio {row['cpu_ratio']:.2f}), "
            f"peak RSS ours/mergekit = {row['rss_ratio']:.2f} (target <= {max_rss}: "
            f"{'met' if ok_m else 'MISSED'}; anonymous-memory ratio {row['anon_ratio']:.2f})"
        )
    f = floor_summary(data.get("floor", []))
    for row in data.get("methods", []):
        if row["tool"] != "divmerge" or not row["summary"].get("ok"):
            continue
        if row["method"] in CLASSIC_TARGETS and row.get("wall_ratio") is not None:
            max_wall, max_rss = CLASSIC_TARGETS[row["method"]]
            out.append(
                f"{row['method']} (methods table): wall ours/mergekit {row['wall_ratio']:.2f} (target <= {max_wall}: "
                f"{'met' if row['wall_ratio'] <= max_wall else 'MISSED'}), RSS {row['rss_ratio']:.2f} "
                f"(target <= {max_rss}: {'met' if row['rss_ratio'] <= max_rss else 'MISSED'})"
            )
    if f:
        over = {
            r["method"]: r["summary"]["wall_s"] / f["wall_s"]
            for r in data.get("methods", [])
            if r["tool"] == "divmerge" and r["summary"].get("ok")
        }
        if over:
            missed = sorted((m for m, v in over.items() if v > FLOOR_TARGET), key=over.get)
            out.append(
                f"within {FLOOR_TARGET}x of the I/O floor ({f['wall_s']:.2f} s): "
                f"{len(over) - len(missed)} of {len(over)} methods"
                + (f"; over it: {', '.join(f'{m} {over[m]:.1f}x' for m in missed)}" if missed else "")
            )
    learned_rows = [r for r in data.get("learned", []) if r.get("ok")]
    fb = next((r for r in learned_rows if r["tool"] == "fusionbench"), None)
    for r in learned_rows:
        if r["tool"] != "divmerge" or fb is None:
            continue
        st, mem = r["step_s"] / fb["step_s"], r["peak_rss_mb"] / fb["peak_rss_mb"]
        cpu = (
            r["step_cpu_s_median"] / fb["step_cpu_s_median"]
            if r.get("step_cpu_s_median") and fb.get("step_cpu_s_median")
            else None
        )
        out.append(
            f"DivMerge ({r['granularity']}, {r['coefficients']} coefficient groups) step / FusionBench AdaMerging "
            f"step = {st:.2f} ({'met' if st <= 1 else 'MISSED'}; CPU-time ratio {cpu if cpu is None else round(cpu, 2)}), "
            f"peak RSS ratio {mem:.2f} ({'met' if mem <= 1 else 'MISSED'})"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small models, one repetition: a few minutes")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    ap.add_argument("--reps", type=int, default=None, help="repetitions of every headline classic run")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    ap.add_argument(
        "--name", default=None, help="results file stem (default: speed, speed_quick for --quick)"
    )
    ap.add_argument(
        "--resume", action="store_true", help="keep the sections not run now from the results file"
    )
    ap.add_argument(
        "--engine-ref", default="HEAD", help="git ref of divmerge_core to benchmark (frozen copy)"
    )
    ap.add_argument(
        "--reuse-mergekit", type=Path, default=None, help="reuse mergekit runs from this results .json"
    )
    ap.add_argument("--methods", default=None, help="comma-separated subset of the methods section's methods")
    ap.add_argument("--render-only", action="store_true", help="rewrite the .md/.png from the results .json")
    args = ap.parse_args(argv)
    if args.render_only:
        stem = args.name or ("speed_quick" if args.quick else "speed")
        data = json.loads((args.out / f"{stem}.json").read_text(encoding="utf-8"))
        data["verdict"] = verdict(data)
        (args.out / f"{stem}.json").write_text(
            json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8"
        )
        return _render(data, args.out, stem)
    plan = plan_for(args.quick)
    if args.reps:
        plan["headline"]["reps"] = args.reps
        plan["headline"].pop("reps_by_method", None)
    if args.methods:
        chosen = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in chosen if m not in METHOD_SPECS]
        if unknown:
            ap.error(f"unknown methods {unknown}; known: {', '.join(METHOD_SPECS)}")
        plan["methods"]["methods"] = chosen
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        ap.error(f"unknown sections {bad}")
    stem = args.name or ("speed_quick" if args.quick else "speed")
    res = Results(args.out / f"{stem}.json", _meta(args.quick))
    if args.resume and res.path.exists():  # keep the other sections of an earlier run
        old = json.loads(res.path.read_text(encoding="utf-8"))
        for key in SECTIONS:
            if key in old and key not in sections:
                res.data[key] = old[key]
        res.data["meta"]["earlier_runs"] = [*old["meta"].get("earlier_runs", []), old["meta"]]
        res.data["notes"] = old.get("notes", [])
        res.data["section_runs"] = {
            key: run for key, run in old.get("section_runs", {}).items() if key not in sections
        }
        for key in SECTIONS:  # sections of runs older than this record: stamped with that run's meta
            if key in old and key not in sections and key not in res.data["section_runs"]:
                res.data["section_runs"][key] = {
                    "engine_commit": old["meta"].get("engine_commit"),
                    "date": old["meta"].get("date"),
                }
    res.data["plan"] = plan
    global SNAPSHOT, ENGINE_SHA
    SNAPSHOT, sha = engine_snapshot(args.engine_ref)
    ENGINE_SHA = sha
    res.data["meta"]["engine_commit"] = sha
    stamp = {"engine_commit": sha, "date": res.data["meta"]["date"]}
    res.data.setdefault("section_runs", {}).update({key: stamp for key in sections})
    print(f"engine: divmerge_core at {sha} (frozen copy in {SNAPSHOT})", flush=True)
    if args.reuse_mergekit and args.reuse_mergekit.exists():
        old_data = json.loads(args.reuse_mergekit.read_text(encoding="utf-8"))
        for sec in ("headline", "scaling"):
            for row in old_data.get(sec, []):
                if row["tool"] == "mergekit" and row["summary"].get("ok"):
                    REUSE_MERGEKIT.setdefault((row["size"], row["k"], row["method"]), row["runs"])
    have_mk = mergekit_available()
    have_fb = (FUSIONBENCH_VENV / "bin" / "python").exists()
    notes = res.data.setdefault("notes", [])
    if not have_mk and not args.resume:
        notes.append("mergekit venv missing (benchmarks/.venvs/mergekit): mergekit columns skipped")
    if not have_fb and not args.resume:
        notes.append("fusion-bench venv missing (benchmarks/.venvs/fusionbench): FusionBench rows skipped")
    tools = ["divmerge", "mergekit"] if have_mk else ["divmerge"]

    if "headline" in sections:
        h = plan["headline"]
        print(f"[headline] {h}", flush=True)
        classic_rows(
            res, "headline", h["size"], h["k"], h["methods"], h["reps"], tools, h.get("reps_by_method")
        )
    if "floor" in sections:
        f = plan["floor"]
        print(f"[floor] {f}", flush=True)
        floor(res, f["size"], f["k"], f["reps"])
    if "methods" in sections:
        m = plan["methods"]
        print(f"[methods] {m}", flush=True)
        methods(res, m["size"], m["k"], m["methods"], m["reps"], tools)
    if "correctness" in sections and have_mk:
        c = plan["correctness"]
        print(f"[correctness] {c}", flush=True)
        correctness(res, c["size"], c["k"], c["methods"])
    if "learned" in sections:
        print(f"[learned] {plan['learned']}", flush=True)
        learned(res, plan["learned"], have_fb)
    if "scaling" in sections:
        s = plan["scaling"]
        print(f"[scaling] {s}", flush=True)
        done = {
            (r["size"], r["k"], r["tool"])
            for r in res.data.get("headline", [])
            if r["method"] == "task_arithmetic"
        }
        for size in s["sizes"]:
            for k in s["ks"]:
                if k > s.get("max_k", {}).get(size, max(s["ks"])):
                    continue
                for row in res.data.get("headline", []):
                    if (
                        (row["size"], row["k"], row["tool"]) in done
                        and row["method"] == "task_arithmetic"
                        and (row["size"], row["k"]) == (size, k)
                    ):
                        res.add("scaling", row)
                if all((size, k, t) in done for t in tools):
                    continue
                classic_rows(
                    res,
                    "scaling",
                    size,
                    k,
                    ["task_arithmetic"],
                    s["reps"],
                    tools if s["mergekit"] else ["divmerge"],
                )
    if "learned_scaling" in sections:
        ls = plan["learned_scaling"]
        print(f"[learned_scaling] {ls}", flush=True)
        for k in ls["ks"]:
            res.add(
                "learned_scaling",
                learned_run("divmerge", ls["size"], k, ls["batch"], ls["seq_len"], ls["steps"]),
            )
            if ls.get("fusionbench") and have_fb:
                res.add(
                    "learned_scaling",
                    learned_run("fusionbench", ls["size"], k, ls["batch"], ls["seq_len"], ls["steps"]),
                )

    res.data["meta"]["load_average_end"] = os.getloadavg()
    res.data["verdict"] = verdict(res.data)
    res.save()
    return _render(res.data, args.out, stem)


def _render(data: dict[str, Any], out: Path, stem: str) -> int:
    md = render_markdown(data)
    (out / f"{stem}.md").write_text(md + "\n", encoding="utf-8")
    if plot(data, out / f"{stem}.png"):
        print(f"wrote {out / (stem + '.png')}")
    print(md)
    return 0
