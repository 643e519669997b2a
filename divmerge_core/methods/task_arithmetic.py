"""task_arithmetic (mergekit's): ``base + lambda * sum_i w_i (theta_i - base)`` (/ ``sum w_i`` if normalize),
the generalized task arithmetic without sparsification or consensus (streamed one model at a time)."""

from __future__ import annotations

from pydantic import Field

from . import generalized
from .base import Lambda, MethodParameters, Weight, int8_mask_field, lambda_default, model_default


class Parameters(MethodParameters):
    weight: Weight | None = model_default("weight")
    normalize: bool = Field(False, description="divide the mixed task vector by the sum of the weights")
    lambda_: Lambda = lambda_default()
    int8_mask: bool | None = int8_mask_field()


class ModelParameters(MethodParameters):
    weight: Weight = 1.0


METHOD = generalized.method(
    name="task_arithmetic",
    sparsification=None,
    consensus=None,
    parameters=Parameters,
    model_parameters=ModelParameters,
    card="the base plus the weighted sum of the task vectors (theta_i - base), scaled by lambda",
    reference="https://arxiv.org/abs/2212.04089",
)
