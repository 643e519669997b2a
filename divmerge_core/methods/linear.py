"""linear (mergekit's): ``sum_i w_i theta_i``, divided by ``sum_i w_i`` when ``normalize``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import Field

from .base import MergeMethod, MethodParameters, TensorInputs, Weight, model_default

if TYPE_CHECKING:
    import torch


class Parameters(MethodParameters):
    weight: Weight | None = model_default("weight")
    normalize: bool = Field(True, description="divide by the sum of the weights")


class ModelParameters(MethodParameters):
    weight: Weight = 1.0


def check_weight_sum(params: dict[str, Any], per_model: Sequence[dict[str, Any]]) -> str | None:
    """A normalized merge divides by the sum of the weights: it must not be 0."""
    if params["normalize"] and abs(sum(float(p["weight"]) for p in per_model)) < 1e-12:
        return "normalizes by the sum of the model weights, which is 0 (set normalize: false or change the weights)"
    return None


def merge(x: TensorInputs) -> torch.Tensor:
    """One model at a time (``x.models`` may refill one buffer)."""
    import torch

    out: torch.Tensor | None = None
    weights = x.column("weight")
    for t, w in zip(x.models, weights, strict=True):
        if out is None:  # a new tensor (t may be a reused buffer): 0 + w * t, exactly
            out = torch.mul(t, w)
        else:
            out.add_(t, alpha=w)
    assert out is not None
    return out.div_(sum(weights)) if x.params["normalize"] else out


METHOD = MergeMethod(
    name="linear",
    kind="classic",
    parameters=Parameters,
    model_parameters=ModelParameters,
    card="a weighted average of the models' parameters (model soup)",
    reference="https://arxiv.org/abs/2203.05482",
    base="unused",
    merge=merge,
    streams=True,
    check=check_weight_sum,
)
