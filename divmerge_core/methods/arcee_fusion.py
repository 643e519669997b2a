"""arcee_fusion (mergekit's Arcee Fusion): the other model's changes kept only where their importance
(``|delta|`` times the KL divergence of the rows' softmaxes) reaches ``median + 1.5 IQR``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from .base import MergeMethod, MethodParameters, NoModelParameters, TensorInputs

if TYPE_CHECKING:
    import torch

#: mergekit estimates the quantiles of larger tensors from this many entries drawn at random.
QUANTILE_SAMPLE_SIZE = 1_000_000


class Parameters(MethodParameters):
    seed: int = Field(
        0, description="seed of the quantile sample of tensors above 1M entries (each tensor its own draw)"
    )


def merge(x: TensorInputs) -> torch.Tensor:
    """mergekit's arithmetic, step for step (its sample comes from torch's global generator)."""
    import torch
    import torch.nn.functional as F

    assert x.base is not None
    base, other = x.base, x.stacked()[0]
    diff = (other - base).abs()
    p = F.softmax(other, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    importance = diff * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    del diff, p, q
    flat = importance.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE_SIZE:
        idx = torch.randint(flat.numel(), (QUANTILE_SAMPLE_SIZE,), generator=x.generator, device=flat.device)
        flat = flat[idx]
    ordered, _ = torch.sort(flat)
    q1, median, q3 = ordered[(torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long()]
    mask = (importance >= median + 1.5 * (q3 - q1)).float()
    return base + (other - base) * mask


METHOD = MergeMethod(
    name="arcee_fusion",
    kind="classic",
    parameters=Parameters,
    model_parameters=NoModelParameters,
    card="Arcee Fusion: the other model's changes kept only where their importance is an outlier",
    reference="https://arcee.ai",
    merge=merge,
    n_models=1,
    random=True,
)
