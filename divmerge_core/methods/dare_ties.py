"""dare_ties (peft's arithmetic, bit for bit): DARE's random drop, then TIES' sign election and merge."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from .base import (
    Density,
    Lambda,
    MergeMethod,
    MethodParameters,
    SparsifiedModelParameters,
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
    density: Density | None = model_default("density")
    normalize: bool = Field(
        True, description="disjoint mean (divide by the number of agreeing models, as peft); false: their sum"
    )
    lambda_: Lambda = lambda_default()
    seed: int = Field(
        0, description="seed of the random drop (each tensor draws from its own seeded generator)"
    )
    int8_mask: bool | None = int8_mask_field()


ModelParameters = SparsifiedModelParameters


def merge(x: TensorInputs) -> torch.Tensor:
    from .sparsify import elect_and_merge_, random_prune_
    from .task_vectors import add_to_base

    assert x.base is not None
    stacked = x.stacked().sub_(x.base)
    for row, p in zip(stacked, x.column("density"), strict=True):
        random_prune_(row, p, generator=x.generator)
    mixed = elect_and_merge_(stacked, x.column("weight"), bool(x.params["normalize"]))
    return add_to_base(mixed, x.base, float(x.params["lambda_"]))


METHOD = MergeMethod(
    name="dare_ties",
    kind="classic",
    parameters=Parameters,
    model_parameters=ModelParameters,
    card="DARE + TIES: task vectors randomly sparsified (drop and rescale), signs elected, agreeing "
    "entries averaged",
    reference="https://arxiv.org/abs/2311.03099",
    merge=merge,
    random=True,
)
