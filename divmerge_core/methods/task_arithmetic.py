"""task_arithmetic (mergekit's): ``base + lambda * sum_i w_i (theta_i - base)`` (/ ``sum w_i`` if normalize)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from .base import (
    Lambda,
    MergeMethod,
    MethodParameters,
    TensorInputs,
    Weight,
    int8_mask_field,
    lambda_default,
    model_default,
)

if TYPE_CHECKING:
    import torch


class Parameters(MethodParameters):
    weight: Weight | None = model_default("weight")
    normalize: bool = Field(False, description="divide the mixed task vector by the sum of the weights")
    lambda_: Lambda = lambda_default()
    int8_mask: bool | None = int8_mask_field()


class ModelParameters(MethodParameters):
    weight: Weight = 1.0


def merge(x: TensorInputs) -> torch.Tensor:
    """One model at a time (``x.models`` may refill one buffer, overwritten with the task vector)."""
    import torch

    from .sparsify import safe_divisor
    from .task_vectors import add_to_base

    assert x.base is not None
    weights = x.column("weight")
    mixed: torch.Tensor | None = None
    for t, w in zip(x.models, weights, strict=True):
        if mixed is None:  # w * delta into a new tensor (t may be a reused buffer): 0 + w * delta, exactly
            mixed = torch.mul(t.sub_(x.base), w)
        else:
            mixed.add_(t.sub_(x.base), alpha=w)
    assert mixed is not None
    if x.params["normalize"]:
        mixed.div_(safe_divisor(sum(weights)))
    return add_to_base(mixed, x.base, float(x.params["lambda_"]))


METHOD = MergeMethod(
    name="task_arithmetic",
    kind="classic",
    parameters=Parameters,
    model_parameters=ModelParameters,
    card="the base plus the weighted sum of the task vectors (theta_i - base), scaled by lambda",
    reference="https://arxiv.org/abs/2212.04089",
    merge=merge,
    streams=True,
)
