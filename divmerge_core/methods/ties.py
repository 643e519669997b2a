"""ties (peft's arithmetic, bit for bit): trim each task vector to its top-``density`` magnitudes, elect
the sign of the total mass, average the agreeing entries (``normalize``) or sum them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from .base import MergeMethod, SparsifiedModelParameters, SparsifyingParameters, TensorInputs

if TYPE_CHECKING:
    import torch


class Parameters(SparsifyingParameters):
    normalize: bool = Field(
        True, description="disjoint mean (divide by the number of agreeing models, as peft); false: their sum"
    )


ModelParameters = SparsifiedModelParameters


def merge(x: TensorInputs) -> torch.Tensor:
    from .sparsify import elect_and_merge_, magnitude_prune_
    from .task_vectors import add_to_base

    assert x.base is not None
    stacked = x.stacked().sub_(x.base)  # the task vectors, the same values as t - base
    for row, p in zip(stacked, x.column("density"), strict=True):
        magnitude_prune_(row, p)
    mixed = elect_and_merge_(stacked, x.column("weight"), bool(x.params["normalize"]))
    return add_to_base(mixed, x.base, float(x.params["lambda_"]))


METHOD = MergeMethod(
    name="ties",
    kind="classic",
    parameters=Parameters,
    model_parameters=ModelParameters,
    card="TIES: task vectors trimmed to their largest entries, signs elected by total mass, agreeing "
    "entries averaged",
    reference="https://arxiv.org/abs/2306.01708",
    merge=merge,
)
