"""nuslerp (mergekit's): spherical interpolation between two models (or their task vectors, with a base)
at ``t = w_2 / (w_1 + w_2)``, over the whole tensor (``nuslerp_flatten``) or row by row."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from .base import MergeMethod, MethodParameters, TensorInputs, Weight, model_default

if TYPE_CHECKING:
    import torch


class Parameters(MethodParameters):
    weight: Weight | None = model_default("weight")
    nuslerp_row_wise: bool = Field(False, description="interpolate the columns (dim 0) rather than the rows")
    nuslerp_flatten: bool = Field(True, description="interpolate the whole tensor as one vector")


class ModelParameters(MethodParameters):
    weight: Weight = 1.0


def merge(x: TensorInputs) -> torch.Tensor:
    a, b = x.stacked()
    w = x.column("weight")
    total = sum(w)
    t = 0.5 if abs(total) < 1e-6 else w[1] / total
    dim = 0 if x.params["nuslerp_row_wise"] else -1
    flatten = bool(x.params["nuslerp_flatten"])
    if x.base is not None:
        return x.base + nuslerp(t, a - x.base, b - x.base, dim=dim, flatten=flatten)
    return nuslerp(t, a, b, dim=dim, flatten=flatten)


def nuslerp(
    t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int = -1, eps: float = 1e-8, flatten: bool = False
) -> torch.Tensor:
    """mergekit's ``nuslerp``, step for step."""
    import torch

    out_shape = v0.shape

    def _normalize(v: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
        return v / torch.norm(v, dim=-1, keepdim=True).clamp(min=eps)

    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    cos_theta = torch.sum(_normalize(v0) * _normalize(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    sin_theta = torch.sin(theta)
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(out_shape)


METHOD = MergeMethod(
    name="nuslerp",
    kind="classic",
    parameters=Parameters,
    model_parameters=ModelParameters,
    card="NuSLERP: spherical interpolation of two models (of their task vectors, given a base) by their "
    "weights",
    reference="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
    base="optional",
    merge=merge,
    n_models=2,
)
