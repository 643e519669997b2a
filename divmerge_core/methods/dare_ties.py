"""dare_ties (peft's arithmetic, bit for bit): DARE's random drop, then TIES' sign election and merge."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Density, Lambda, MergeMethod, MethodParameters, TensorInputs, Weight, lambda_default

if TYPE_CHECKING:
    import torch


class Parameters(MethodParameters):
    weight: Weight | None = None
    density: Density | None = None
    normalize: bool = True
    lambda_: Lambda = lambda_default()
    seed: int = 0
    int8_mask: bool | None = None


class ModelParameters(MethodParameters):
    weight: Weight = 1.0
    density: Density = 0.2


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
