"""slerp (mergekit's): spherical interpolation from the base (``t = 0``) to the other model (``t = 1``).

As mergekit computes it: in float32 (float64 inputs stay float64) over the whole tensor; nearly collinear
pairs (``|cos| > 0.9995``) and near-zero tensors fall back to linear interpolation / no normalisation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import MergeMethod, MethodParameters, NoModelParameters, TensorInputs, setting

if TYPE_CHECKING:
    import torch

DOT_THRESHOLD = 0.9995
EPS = 1e-8


T = setting("interpolation factor: 0 gives the base, 1 the other model (number, gradient or filters)")


class Parameters(MethodParameters):
    t: T


def merge(x: TensorInputs) -> torch.Tensor:
    assert x.base is not None
    other = x.stacked()[0]
    return slerp(float(x.params["t"]), x.base, other).to(x.base.dtype)


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    import math

    import torch

    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a, b = v0.to(dtype), v1.to(dtype)
    norm_a, norm_b = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    norm_a = norm_a if norm_a > EPS else torch.ones_like(norm_a)
    norm_b = norm_b if norm_b > EPS else torch.ones_like(norm_b)
    dot = float(((a / norm_a) * (b / norm_b)).sum().clamp(-1, 1))
    if abs(dot) > DOT_THRESHOLD:
        return (1 - t) * a + t * b
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    return a.mul(math.sin((1 - t) * theta) / sin_theta).add_(b, alpha=math.sin(t * theta) / sin_theta)


METHOD = MergeMethod(
    name="slerp",
    kind="classic",
    parameters=Parameters,
    model_parameters=NoModelParameters,
    card="SLERP: spherical interpolation between the base and one other model",
    reference="https://en.wikipedia.org/wiki/Slerp",
    merge=merge,
    n_models=1,
)
