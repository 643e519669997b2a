"""ramplus_tl (mergekit's RAM+, tensor-local): RAM with each model's unique changes amplified by
``1 + r * clamp(shared / unique, 0, alpha)``, its counts of shared and unique changed entries."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import MergeMethod, MethodParameters, NoModelParameters, TensorInputs, setting
from .ram import Epsilon, prepare

if TYPE_CHECKING:
    import torch


R = setting("amplification of a model's unique changes per unit of overlap ratio")
Alpha = setting("cap of the overlap ratio")


class Parameters(MethodParameters):
    r: R = 0.1
    alpha: Alpha = 0.2
    epsilon: Epsilon = 1e-5


def merge(x: TensorInputs) -> torch.Tensor:
    assert x.base is not None
    tv, nonzero, counts, overlap, unique = prepare(x)
    eps, r, alpha = (float(x.params[k]) for k in ("epsilon", "r", "alpha"))
    shared_counts = (nonzero & overlap).sum(dim=1)
    unique_counts = (nonzero & unique).sum(dim=1)
    rho = shared_counts / unique_counts.clamp(min=eps)
    lambda_ = 1 + r * rho.clamp(min=0, max=alpha)
    tv_z = tv * nonzero
    merged = ((tv_z * unique * lambda_.unsqueeze(-1)) + (tv_z * overlap / counts.clamp(min=1))).sum(
        dim=0, keepdim=True
    )
    return x.base + merged.reshape_as(x.base)


METHOD = MergeMethod(
    name="ramplus_tl",
    kind="classic",
    parameters=Parameters,
    model_parameters=NoModelParameters,
    card="RAM+ (tensor-local): RAM with each model's unique changes amplified by its overlap ratio",
    reference="https://arxiv.org/abs/2601.13572",
    merge=merge,
)
