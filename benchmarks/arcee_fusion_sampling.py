"""How random mergekit's arcee_fusion is above 1M entries, against ours.

mergekit 0.1.5 estimates the quartiles of a tensor's importance from 1M entries drawn with torch's global
generator when the tensor is larger, so two mergekit runs differ on large tensors. This runs mergekit's own
functions twice (two seeds) and ours once on a GPT-2-sized embedding (50257 x 768, base N(0, 0.1^2), expert
= base + N(0, 0.01^2)) and prints the differences as ``benchmarks.speed`` measures them (max |a - b| / max |b|).

Run in mergekit's virtualenv, from the repository root:
``PYTHONPATH=. benchmarks/.venvs/mergekit/bin/python -m benchmarks.arcee_fusion_sampling``
"""

from __future__ import annotations

import torch
from mergekit.merge_methods.arcee_fusion import DynamicThresholdFusion, _compute_importance

from divmerge_core.methods.arcee_fusion import merge as ours
from divmerge_core.methods.base import TensorInputs


def mergekit(base: torch.Tensor, other: torch.Tensor, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    mask, _ = DynamicThresholdFusion().compute_fusion_mask(_compute_importance(other, base))
    return base + (other - base) * mask


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def main() -> None:
    gen = torch.Generator().manual_seed(123)
    base = torch.randn(50257, 768, generator=gen) * 0.1
    other = base + torch.randn(50257, 768, generator=gen) * 0.01
    m0, m1 = mergekit(base, other, 0), mergekit(base, other, 1)
    mine = ours(
        TensorInputs("wte", base, other[None], [{}], {"seed": 0}, generator=torch.Generator().manual_seed(0))
    )
    print(
        f"mergekit seed 0 vs mergekit seed 1: max rel diff {rel(m0, m1):.3g}, entries differing {(m0 != m1).sum().item()}"
    )
    print(
        f"ours (seed 0) vs mergekit seed 0: max rel diff {rel(mine, m0):.3g}, entries differing {(mine != m0).sum().item()}"
    )
    print(f"of {base.numel()} entries")


if __name__ == "__main__":
    main()
