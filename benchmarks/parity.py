"""Our merged tensors against ``mergekit-yaml`` 0.1.5's, config by config: ``python -m benchmarks.parity``.

Runs every config of ``tests/test_mergekit_compat.py`` (tiny 4-layer Llama models built in code) through
our engine and through mergekit (``benchmarks/.venvs/mergekit``) and writes the max abs / max rel
difference over all tensors (rel: max |ours - mergekit| of a tensor over max |mergekit| of that tensor,
as in benchmarks/results/speed.md) to ``benchmarks/results/parity.md``. For the randomised methods, whose
masks differ (mergekit draws from torch's global generator, we per tensor), it reports the kept fraction
and the worst L1-norm change of a task vector instead.

``--gpt2`` adds the speed benchmark's TIES cross-check (4 synthetic GPT-2-124M experts, density 0.5,
weights 0.25): ours by default, ours with ``variant: peft``, and mergekit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import yaml
from safetensors.torch import load_file

from benchmarks.speed.compare import compare_checkpoints
from divmerge_core import parse_config, run_merge
from tests import test_mergekit_compat as compat
from tests.merge_models import llama_family

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def mergekit(cfg: dict, out: Path) -> None:
    config = out.parent / f"{out.name}.yml"
    config.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [str(compat.MERGEKIT_YAML), str(config), str(out), "--no-cuda", "--lazy-unpickle"],
        capture_output=True,
        text=True,
        env=env,
        timeout=3600,
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])


def examples() -> dict[str, tuple[dict, bool]]:
    """name -> (config with BASE/T1.. placeholders, randomised?)."""
    out: dict[str, tuple[dict, bool]] = {
        "slerp (gradient-slerp.yml)": (compat.GRADIENT_SLERP, False),
        "linear (linear.yml)": (compat.LINEAR, False),
        "task_arithmetic (gradients)": (compat.GRADIENT_TASK_ARITHMETIC, False),
    }
    for group, rnd in ((compat.TASK_VECTOR_EXAMPLES, False), (compat.OTHER_EXAMPLES, False)):
        out.update({name: (cfg, rnd) for name, cfg in group.items()})
    out["passthrough (frankenmerge, 7 layers)"] = (compat.FRANKENMERGE, False)
    out.update({name: (cfg, True) for name, cfg in compat.RANDOM_EXAMPLES.items()})
    return out


def tiny_rows(work: Path) -> list[dict]:
    fam = llama_family(work / "models", n=3)
    base = load_file(fam["base"] / "model.safetensors")
    expert = load_file(fam["t1"] / "model.safetensors")
    rows = []
    for name, (template, randomised) in examples().items():
        cfg = compat._fill(template, fam)
        ours, theirs = work / "ours", work / "mergekit"
        for d in (ours, theirs):
            shutil.rmtree(d, ignore_errors=True)
        run_merge(parse_config(cfg), ours, device="cpu", force=True)
        mergekit(cfg, theirs)
        row = {"example": name, "method": cfg["merge_method"], **compare_checkpoints(ours, theirs)}
        if randomised:
            a = compat._kept_statistics(load_file(ours / "model.safetensors"), base, expert)
            b = compat._kept_statistics(load_file(theirs / "model.safetensors"), base, expert)
            row["kept"] = {"ours": a, "mergekit": b}
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("example", "max_abs_diff", "max_rel_diff")}), flush=True)
        if cfg["merge_method"] == "ties" and not cfg.get("parameters", {}).get("rescale"):
            # peft's arithmetic (which never rescales) against the same mergekit output
            peft = {**cfg, "parameters": {**cfg.get("parameters", {}), "variant": "peft"}}
            run_merge(parse_config(peft), ours, device="cpu", force=True)
            rows.append(
                {"example": f"{name}, ours with variant: peft", "method": "ties"}
                | compare_checkpoints(ours, theirs)
            )
            print(
                json.dumps({k: rows[-1][k] for k in ("example", "max_abs_diff", "max_rel_diff")}), flush=True
            )
    return rows


def gpt2_rows(work: Path) -> list[dict]:
    from benchmarks.speed.checkpoints import make_family
    from benchmarks.speed.configs import classic_config

    base, experts = make_family("gpt2-124M", 4)
    cfg = classic_config("ties", base, experts)
    outs = {}
    for label, extra in (("ours", {}), ("ours variant: peft", {"variant": "peft"})):
        c = {**cfg, "parameters": {**cfg["parameters"], **extra}}
        outs[label] = work / label.replace(" ", "_").replace(":", "")
        start = time.perf_counter()
        run_merge(parse_config(c), outs[label], device="cpu", force=True)
        print(f"{label}: {time.perf_counter() - start:.1f} s", flush=True)
    outs["mergekit"] = work / "gpt2-mergekit"
    shutil.rmtree(outs["mergekit"], ignore_errors=True)
    start = time.perf_counter()
    mergekit(cfg, outs["mergekit"])
    print(f"mergekit: {time.perf_counter() - start:.1f} s", flush=True)
    rows = []
    for a, b in (("ours", "mergekit"), ("ours variant: peft", "mergekit"), ("ours variant: peft", "ours")):
        rows.append(
            {"example": f"ties gpt2-124M K=4: {a} vs {b}", "method": "ties"}
            | compare_checkpoints(outs[a], outs[b])
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict], commit: str) -> str:
    lines = [
        "# Parity with mergekit-yaml 0.1.5",
        "",
        f"Generated by `python -m benchmarks.parity` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"engine commit {commit}. Configs: `tests/test_mergekit_compat.py` on tiny 4-layer Llama models "
        "(3 experts = base + N(0, 0.3²)); max rel = max |ours − mergekit| of a tensor / max |mergekit| of it.",
        "",
        "| config | method | tensors | max abs diff | max rel diff | worst tensor | kept fraction ours / mergekit | worst L1 change ours / mergekit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kept = r.get("kept")
        k = f"{kept['ours'][0]:.3f} / {kept['mergekit'][0]:.3f}" if kept else "—"
        l1 = f"{kept['ours'][3]:.1e} / {kept['mergekit'][3]:.1e}" if kept else "—"
        note = " (random masks)" if kept else ""
        lines.append(
            f"| {r['example']} | `{r['method']}` | {r['tensors_compared']} | {r['max_abs_diff']:.3g}{note} | "
            f"{r['max_rel_diff']:.3g} | `{r['worst_tensor']}` | {k} | {l1} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpt2", action="store_true", help="add the GPT-2-124M TIES cross-check (minutes)")
    ap.add_argument("--only-gpt2", action="store_true", help="only the GPT-2-124M TIES cross-check")
    ap.add_argument("--out", type=Path, default=RESULTS / "parity.md")
    args = ap.parse_args()
    if not compat.MERGEKIT_YAML.exists():
        raise SystemExit(f"mergekit venv missing: {compat.MERGEKIT_YAML} (scripts/setup.sh makes it)")
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [] if args.only_gpt2 else tiny_rows(Path(tmp))
        if args.gpt2 or args.only_gpt2:
            rows += gpt2_rows(Path(tmp))
    args.out.write_text(markdown(rows, commit), encoding="utf-8")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
