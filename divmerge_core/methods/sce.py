"""sce (mergekit's SCE): select the ``select_topk`` fraction of entries where the task vectors vary most,
weight each task vector by its mean squared entry, erase the entries disagreeing with the elected sign,
and average the rest by those weights."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import MergeMethod, MethodParameters, NoModelParameters, TensorInputs, int8_mask_field, setting

if TYPE_CHECKING:
    import torch


SelectTopk = setting("fraction of entries kept, those of largest variance across the models", le=1.0)


class Parameters(MethodParameters):
    int8_mask: bool | None = int8_mask_field()
    select_topk: SelectTopk = 1.0


def merge(x: TensorInputs) -> torch.Tensor:
    """mergekit's arithmetic, step for step."""
    import torch

    assert x.base is not None
    base = x.base
    tvs = x.stacked().sub_(base)
    topk = float(x.params["select_topk"])
    if topk < 1:
        tvs = tvs.mul_(_mask(tvs, topk).unsqueeze(0))
    majority = (tvs.sum(dim=0) >= 0).to(tvs.dtype) * 2 - 1
    erase = tvs.sign() == majority
    weights = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    total = torch.sum(weights).item()
    weights = torch.ones_like(weights) / weights.shape[0] if abs(total) < 1e-6 else weights / total
    weights = weights.view((-1,) + (1,) * (tvs.dim() - 1))
    erased = weights * erase
    del erase
    merged = (tvs * erased).sum(dim=0)
    return base + merged / torch.sum(erased, dim=0).clamp(min=1e-6)


def _mask(tvs: torch.Tensor, density: float) -> torch.Tensor:
    import torch

    if density <= 0:
        return torch.zeros_like(tvs[0])
    var = torch.var(tvs, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * density)
    if k == 0:
        return torch.zeros_like(var)
    _, indices = torch.topk(var.abs().view(-1), k=k, largest=True)
    mask = torch.zeros_like(var)
    mask.view(-1)[indices] = 1
    return mask


METHOD = MergeMethod(
    name="sce",
    kind="classic",
    parameters=Parameters,
    model_parameters=NoModelParameters,
    card="SCE: task vectors selected where they vary most, weighted by their energy, signs elected, "
    "agreeing entries averaged",
    reference="https://arxiv.org/abs/2408.07990",
    merge=merge,
)
