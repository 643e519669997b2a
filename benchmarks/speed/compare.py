"""Tensor-by-tensor comparison of two merged checkpoints (any sharding)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open


def tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file holding it."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {n: folder / f for n, f in weight_map.items()}
    out: dict[str, Path] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for n in h.keys():  # noqa: SIM118 - safe_open handles are not iterable
                out[n] = f
    return out


def compare_checkpoints(a: Path, b: Path) -> dict:
    """Max abs diff over all shared tensors, the worst tensor, and the names only one side has."""
    fa, fb = tensor_files(a), tensor_files(b)
    shared = [n for n in fa if n in fb]
    worst_name, worst, max_rel = None, 0.0, 0.0
    dtype_mismatch = []
    for n in shared:
        with safe_open(str(fa[n]), framework="pt") as ha, safe_open(str(fb[n]), framework="pt") as hb:
            ta, tb = ha.get_tensor(n), hb.get_tensor(n)
        if ta.dtype != tb.dtype:
            dtype_mismatch.append(n)
        if ta.shape != tb.shape:
            return {"error": f"shape mismatch for {n}: {tuple(ta.shape)} vs {tuple(tb.shape)}"}
        d = (ta.double() - tb.double()).abs().max().item() if ta.numel() else 0.0
        scale = tb.double().abs().max().item() if tb.numel() else 0.0
        if d > worst or worst_name is None:
            worst, worst_name = d, n
        if scale > 0:
            max_rel = max(max_rel, d / scale)
    return {
        "tensors_compared": len(shared),
        "max_abs_diff": worst,
        "max_rel_diff": max_rel,
        "worst_tensor": worst_name,
        "only_in_first": sorted(set(fa) - set(fb)),
        "only_in_second": sorted(set(fb) - set(fa)),
        "dtype_mismatch": dtype_mismatch[:5],
    }


def checkpoint_dtype(folder: Path) -> str | None:
    files = tensor_files(folder)
    if not files:
        return None
    name, f = next(iter(files.items()))
    with safe_open(str(f), framework="pt") as h:
        return str(h.get_tensor(name).dtype).replace("torch.", "")


__all__ = ["checkpoint_dtype", "compare_checkpoints", "tensor_files", "torch"]
