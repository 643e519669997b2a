"""model_stock (mergekit's Model Stock): the models' average pulled towards the base by a ratio from the
mean cosine between their task vectors, ``t = K cos / (1 + (K - 1) cos)``; ``base + t (avg - base)``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import Field

from .base import MergeMethod, MethodParameters, NoModelParameters, TensorInputs

if TYPE_CHECKING:
    import torch


class Parameters(MethodParameters):
    filter_wise: bool = Field(False, description="one ratio per row (filter) instead of one per tensor")


def check(params: dict[str, Any], per_model: Sequence[dict[str, Any]]) -> str | None:
    return None if len(per_model) >= 2 else "needs at least 2 models besides the base"


def merge(x: TensorInputs) -> torch.Tensor:
    """mergekit's arithmetic, step for step."""
    import torch

    assert x.base is not None
    w_0, ws = x.base, list(x.stacked())
    out_shape = w_0.shape
    if x.params["filter_wise"]:
        if w_0.dim() == 1:
            w_0 = w_0.unsqueeze(0)
            ws = [w.unsqueeze(0) for w in ws]
    else:
        w_0 = w_0.reshape(-1)
        ws = [w.reshape(-1) for w in ws]
    offsets = [w - w_0 for w in ws]
    cos_thetas = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            norm_product = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cos_thetas.append(((a * b).sum(dim=-1) / norm_product.clamp(min=1e-6)).clamp(-1, 1))
    del offsets
    cos_theta = torch.stack(cos_thetas).mean(dim=0).unsqueeze(-1)
    count = len(ws)
    denominator = 1 + (count - 1) * cos_theta
    singular = denominator.abs() < 1e-6  # no finite estimate: the base (mergekit's guard)
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos_theta), (count * cos_theta) / safe)
    average = sum(ws) / count
    return (t * average + (1 - t) * w_0).reshape(out_shape)


METHOD = MergeMethod(
    name="model_stock",
    kind="classic",
    parameters=Parameters,
    model_parameters=NoModelParameters,
    card="Model Stock: the models' average interpolated towards the base by the angle between their "
    "task vectors",
    reference="https://arxiv.org/abs/2403.19522",
    merge=merge,
    check=check,
)
