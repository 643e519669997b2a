"""Diagnose a learned merge: the DivMerge objective at the initial and at the learned coefficients.

``python -m benchmarks.quality.probe <item.json> [--n 64] [--scale 1.0 1.5]`` recomputes, on the task's merge
inputs (the engine's own seeded sample, larger with ``--n``), the mean JS between each expert and the merged
model for: uniform coefficients 1/k, the learned coefficients, and the learned ones scaled by each
``--scale``. It tells an optimisation problem (objective not lower at the learned point) from an
objective/data problem (objective lower but accuracy not better).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from divmerge_core.config import DataSpec
from divmerge_core.learned.data import load_task_inputs
from divmerge_core.learned.divergence import js
from divmerge_core.learned.grouping import group_tensors
from divmerge_core.options import EngineOptions


@torch.no_grad()
def _logp(model, tok, texts: list, max_length: int) -> torch.Tensor:
    out = []
    for s in range(0, len(texts), 32):
        chunk = texts[s : s + 32]
        a = [x if isinstance(x, str) else x[0] for x in chunk]
        b = None if isinstance(chunk[0], str) else [x[1] for x in chunk]
        enc = tok(a, b, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        out.append(model(**enc).logits.float().log_softmax(-1))
    return torch.cat(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("item", type=Path)
    ap.add_argument("--n", type=int, default=None, help="inputs per task (default: the merge's num_samples)")
    ap.add_argument("--scale", type=float, nargs="*", default=[])
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    rec = json.loads(a.item.read_text())
    spec = rec["spec"]["parameters"]
    coeffs = rec["coefficients"]
    models = [Path(p) for p in coeffs["tasks"]]
    base_dir = models[0].parents[1] / next(
        p.name for p in models[0].parents[1].iterdir() if p.name.startswith("base-")
    )
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForSequenceClassification.from_pretrained(base_dir).eval()
    base = load_file(base_dir / "model.safetensors")
    experts = [load_file(p / "model.safetensors") for p in models]
    names = [n for n, t in base.items() if t.is_floating_point()]
    groups, group_of = group_tensors(names, coeffs["granularity"])
    learned = {g: [coeffs["coefficients"][g][str(p)] for p in models] for g in coeffs["coefficients"]}
    inputs = []
    merge_dir = Path(__file__).resolve().parents[1] / ".cache" / "merge_inputs"
    for t in rec["combo"]:
        f = next(merge_dir.glob(f"*/{t}.tsv"))
        cols = f.read_text().splitlines()[0].split("\t")
        ds = DataSpec(
            path=str(f), text_columns=cols, num_samples=a.n or rec.get("num_samples", 24)
        )  # engine seed/sample
        inputs.append(load_task_inputs(ds, EngineOptions(), spec.get("seed", 0)).texts)
    ml = spec.get("max_length", 128)
    teachers = []
    for sd, texts in zip(experts, inputs, strict=True):
        model.load_state_dict(sd, strict=False)
        teachers.append(_logp(model, tok, texts, ml))

    def objective(c: dict[str, list[float]]) -> list[float]:
        merged = {}
        for n in names:
            g = group_of[n]
            row = c.get(g) or c[next(iter(c))]
            merged[n] = base[n] + sum(w * (e[n] - base[n]) for w, e in zip(row, experts, strict=True))
        model.load_state_dict(merged, strict=False)
        return [float(js(t, _logp(model, tok, x, ml)).mean()) for t, x in zip(teachers, inputs, strict=True)]

    k = len(models)
    points = {"uniform 1/k": {g: [1.0 / k] * k for g in learned}, "learned": learned}
    for s in a.scale:
        points[f"learned x{s}"] = {g: [s * v for v in row] for g, row in learned.items()}
    for label, c in points.items():
        vals = objective(c)
        print(
            f"{label:>14}: mean JS {sum(vals) / len(vals):.5f}  per task "
            + ", ".join(f"{t} {v:.5f}" for t, v in zip(rec["combo"], vals, strict=True)),
            flush=True,
        )


if __name__ == "__main__":
    main()
