"""karcher (mergekit's Karcher mean): the models' equal-weight Riemannian (Karcher) mean direction on the
unit hypersphere, by fixed-point iteration, scaled by their mean norm. A ``base_model`` is one of the
averaged models, as in mergekit (it adds the base to the inputs)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from pydantic import Field

from .base import MergeMethod, MethodParameters, NoModelParameters, TensorInputs

if TYPE_CHECKING:
    import torch


class Parameters(MethodParameters):
    max_iter: Annotated[int, Field(ge=1)] = Field(10, description="most fixed-point iterations")
    tol: Annotated[float, Field(gt=0)] = Field(
        1e-5, description="convergence tolerance (and zero-norm cut-off)"
    )


def merge(x: TensorInputs) -> torch.Tensor:
    tensors = list(x.stacked())
    if x.base is not None:  # mergekit appends the base model to the inputs
        tensors.append(x.base)
    return karcher_mean(tensors, int(x.params["max_iter"]), float(x.params["tol"]))


def karcher_mean(tensors: list[torch.Tensor], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """mergekit's ``karcher_merge_tensors`` with equal weights, step for step."""
    import torch

    if len(tensors) == 1:
        return tensors[0]
    alphas = [1.0 / len(tensors)] * len(tensors)
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms, units = [], []
    for tensor in tensors:
        norm = torch.linalg.vector_norm(tensor.to(dtype))
        norms.append(norm)
        units.append(torch.zeros_like(tensor) if norm.item() == 0.0 else (tensor / norm).to(tensor.dtype))
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return tensors[0] * 0
    valid_alphas = [alphas[i] for i in valid]
    total = sum(valid_alphas)
    weights = [a / total for a in valid_alphas]
    valid_units = [units[i] for i in valid]
    mean = torch.zeros_like(valid_units[0])
    for a, u in zip(weights, valid_units, strict=True):
        mean += a * u
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    mean = valid_units[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(weights, valid_units, strict=True):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent.to(dtype))
        if tangent_norm.item() < tol:
            break
        mean = (torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)).to(
            mean.dtype
        )
        unit_norm = torch.linalg.vector_norm(mean.to(dtype))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)
    scale = sum(a * n for a, n in zip(alphas, norms, strict=True))
    return scale * mean


METHOD = MergeMethod(
    name="karcher",
    kind="classic",
    parameters=Parameters,
    model_parameters=NoModelParameters,
    card="Karcher mean: the models' Riemannian barycentre on the hypersphere, scaled by their mean norm",
    reference="https://arxiv.org/abs/2603.04972",
    base="optional",
    merge=merge,
)
