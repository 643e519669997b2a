"""dare_linear (peft's arithmetic, bit for bit): drop each task-vector entry with probability
``1 - density`` and rescale the rest by ``1/density`` (DARE), then a weighted sum."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from .base import MergeMethod, SparsifiedModelParameters, SparsifyingParameters, TensorInputs

if TYPE_CHECKING:
    import torch


class Parameters(SparsifyingParameters):
    normalize: bool = Field(False, description="divide the mixed task vector by the sum of the weights")
    seed: int = Field(
        0, description="seed of the random drop (each tensor draws from its own seeded generator)"
    )


ModelParameters = SparsifiedModelParameters


def merge(x: TensorInputs) -> torch.Tensor:
    from .sparsify import random_prune_, safe_divisor, weights_like
    from .task_vectors import add_to_base

    assert x.base is not None
    stacked = x.stacked().sub_(x.base)
    for row, p in zip(stacked, x.column("density"), strict=True):  # task by task, in order, as peft
        random_prune_(row, p, generator=x.generator)
    weights = x.column("weight")
    mixed = stacked.mul_(weights_like(weights, stacked)).sum(dim=0)
    if x.params["normalize"]:
        mixed.div_(safe_divisor(sum(weights)))
    return add_to_base(mixed, x.base, float(x.params["lambda_"]))


METHOD = MergeMethod(
    name="dare_linear",
    kind="classic",
    parameters=Parameters,
    model_parameters=ModelParameters,
    card="DARE: task vectors randomly sparsified (drop and rescale), then summed with their weights",
    reference="https://arxiv.org/abs/2311.03099",
    merge=merge,
    random=True,
)
