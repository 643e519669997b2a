"""dare_ties (peft's arithmetic, bit for bit): DARE's random drop, then TIES' sign election and merge."""

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
    seed: int = Field(
        0, description="seed of the random drop (each tensor draws from its own seeded generator)"
    )


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
