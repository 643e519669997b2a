"""nearswap (mergekit's): take the other model's value where it is within ``t`` of the base's,
interpolating by ``t / |base - other|`` (clamped to [0, 1]) elsewhere."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import MergeMethod, MethodParameters, NoModelParameters, TensorInputs, setting

if TYPE_CHECKING:
    import torch


T = setting("similarity threshold: entries closer than t take the other model's value")


class Parameters(MethodParameters):
    t: T


def merge(x: TensorInputs) -> torch.Tensor:
    import torch

    assert x.base is not None
    a, b = x.base, x.stacked()[0]
    absdiff = torch.abs(a - b)
    weight = (float(x.params["t"]) / absdiff.clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * b + (1 - weight) * a


METHOD = MergeMethod(
    name="nearswap",
    kind="classic",
    parameters=Parameters,
    model_parameters=NoModelParameters,
    card="NearSwap: the base's entries swapped for the other model's where the two are close",
    reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    merge=merge,
    n_models=1,
)
