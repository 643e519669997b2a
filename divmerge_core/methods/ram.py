"""ram (mergekit's Reinforced Agent Merging): entries changed by one model only (``|delta| > epsilon``)
keep that change; entries changed by several take the mean of those changes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import MergeMethod, MethodParameters, NoModelParameters, TensorInputs, setting

if TYPE_CHECKING:
    import torch

Epsilon = setting("a task-vector entry counts as changed when its magnitude is above epsilon")


class Parameters(MethodParameters):
    epsilon: Epsilon = 1e-5


def prepare(x: TensorInputs) -> tuple[torch.Tensor, ...]:
    """mergekit's ``_prepare_ram_vectors``: flat task vectors, changed mask, counts, overlap, unique."""
    assert x.base is not None
    stacked = x.stacked().sub_(x.base)
    tv = stacked.view(stacked.shape[0], -1)
    nonzero = tv.abs() > float(x.params["epsilon"])
    counts = nonzero.sum(dim=0, keepdim=True)
    return tv, nonzero, counts, counts > 1, counts == 1


def merge(x: TensorInputs) -> torch.Tensor:
    assert x.base is not None
    tv, nonzero, counts, overlap, unique = prepare(x)
    tv_z = tv * nonzero
    merged = ((tv_z * unique) + (tv_z * overlap / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    return x.base + merged.reshape_as(x.base)


METHOD = MergeMethod(
    name="ram",
    kind="classic",
    parameters=Parameters,
    model_parameters=NoModelParameters,
    card="RAM: changes made by one model kept as they are, changes made by several averaged",
    reference="https://arxiv.org/abs/2601.13572",
    merge=merge,
)
