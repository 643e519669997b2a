"""multislerp (mergekit's): barycentric interpolation of the models on the hypersphere.

The (base-relative, when a base is given) tensors are projected on the unit sphere, mapped to the
tangent space at their weighted mean direction, averaged there, mapped back with the exponential map and
rescaled to the weighted mean norm. Unlike mergekit, tensors whose deltas are all zero (untouched by
every fine-tune) give the base instead of failing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated

from pydantic import Field

from .base import MergeMethod, MethodParameters, TensorInputs, Weight
from .linear import check_weight_sum

if TYPE_CHECKING:
    import torch


class Parameters(MethodParameters):
    weight: Weight | None = Field(None, description="default weight of every model (its own weight wins)")
    normalize: bool = Field(True, description="weights divided by their sum")
    eps: Annotated[float, Field(gt=0)] = Field(1e-8, description="norms below eps count as zero")


class ModelParameters(MethodParameters):
    weight: Weight = 1.0


def merge(x: TensorInputs) -> torch.Tensor:
    return multislerp_(
        x.stacked(),
        x.column("weight"),
        base=x.base,
        normalize=bool(x.params["normalize"]),
        eps=x.params["eps"],
    )


def multislerp_(
    stacked: torch.Tensor,
    weights: Sequence[float],
    *,
    base: torch.Tensor | None = None,
    normalize: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Multislerp of the stacked tensors ``[K, ...]``, which it overwrites."""
    import torch

    from ..errors import NumericalError

    if base is not None:
        stacked.sub_(base)
    flat = stacked.reshape(stacked.shape[0], -1)
    w = torch.tensor(list(weights), dtype=flat.dtype, device=flat.device)
    if normalize:
        w = w / w.sum()
    norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    if bool((norms < eps).all()):  # nothing to interpolate: every delta is zero
        out = (flat * w.view(-1, 1)).sum(0).view(stacked.shape[1:])
        return out if base is None else out + base
    # in place (same values) unless the antipodal-pair fallback below may still need the deltas
    unit = flat / (norms + eps) if stacked.shape[0] == 2 else flat.div_(norms + eps)
    mean = (unit * w.view(-1, 1)).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if stacked.shape[0] == 2:  # antipodal pair: fall back to linear interpolation
            out = (stacked[0] * w[0] + stacked[1] * w[1]).view(stacked.shape[1:])
            return out if base is None else out + base
        raise NumericalError(
            "multislerp: the weighted mean direction is zero (antipodal tensors whose weights cancel); "
            "use different weights"
        )
    mean = mean / mean_norm
    dots = (unit * mean).sum(-1, keepdim=True)
    tangent = unit
    for row, dot in zip(tangent, dots, strict=True):  # unit - dots * mean, one row at a time
        row.sub_(dot * mean)
    del dots
    t_mix = (tangent * w.view(-1, 1)).sum(0)
    t_norm = torch.linalg.vector_norm(t_mix) + eps
    out = mean * torch.cos(t_norm) + t_mix * (torch.sin(t_norm) / t_norm)
    out = (out * (norms.squeeze(-1) * w).sum()).view(stacked.shape[1:])
    return out if base is None else out + base


METHOD = MergeMethod(
    name="multislerp",
    kind="classic",
    parameters=Parameters,
    model_parameters=ModelParameters,
    card="multislerp: the models' weighted barycentre on the hypersphere (relative to the base, if any)",
    reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    base="optional",
    merge=merge,
    check=check_weight_sum,
)
