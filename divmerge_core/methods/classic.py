"""The classic merge methods as pure per-tensor functions.

``linear``, ``task_arithmetic`` and ``multislerp`` follow mergekit's semantics. TIES and DARE follow peft's
``merge_utils`` exactly (same pruning, same sign election, same random draw), so for equal densities and
the same seed they give bit-identical task-vector mixes. Per-model ``weight`` and ``density`` apply per task.

Delta-level functions (``*_deltas``) take task vectors and return the mixed delta; :func:`merge_tensor`
takes the base and model tensors and returns the merged tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import NumericalError

Tensor = torch.Tensor

#: Default ``normalize`` per method (mergekit: linear normalizes, task arithmetic and dare_linear do not;
#: for ties/dare_ties True means peft's disjoint mean).
DEFAULT_NORMALIZE = {
    "linear": True,
    "task_arithmetic": False,
    "ties": True,
    "dare_linear": False,
    "dare_ties": True,
    "multislerp": True,
}


def _weights_like(weights: Sequence[float], stacked: Tensor) -> Tensor:
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    return w.view(w.shape + (1,) * (stacked.dim() - 1))


def _safe_divisor(total: float) -> float:
    """mergekit's guard: a weight sum of (almost) zero is not divided by."""
    return 1.0 if abs(total) < 1e-8 else total


# --- sparsification (peft.utils.merge_utils semantics) -------------------------------------------------
def magnitude_prune(tensor: Tensor, density: float) -> Tensor:
    """Keep the ``int(density * numel)`` entries of largest magnitude, zero the rest."""
    if density >= 1:
        return tensor
    mask = torch.zeros_like(tensor).reshape(-1)
    k = int(density * tensor.numel())
    top = torch.topk(tensor.abs().reshape(-1), k=k, largest=True)
    mask[top[1]] = 1
    return tensor * mask.reshape(tensor.shape)


def random_prune(
    tensor: Tensor, density: float, *, rescale: bool = True, generator: torch.Generator | None = None
) -> Tensor:
    """DARE's drop: keep each entry with probability ``density`` (a Bernoulli mask), rescale by 1/density.

    Draws exactly as peft does (``torch.bernoulli`` of a tensor filled with ``density``); ``generator``
    defaults to torch's global generator, which is what peft uses.
    """
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    pruned = tensor * mask
    return pruned / density if rescale else pruned


def _sign_mask(stacked: Tensor) -> Tensor:
    """TIES sign election by total mass: keep entries whose sign agrees with the sign of the sum."""
    total = stacked.sum(dim=0)
    majority = torch.where(total >= 0, 1.0, -1.0).to(stacked.dtype)  # same test as peft, without int64
    return stacked.sign() == majority


def _disjoint(weighted: Tensor, mask: Tensor, mean: bool) -> Tensor:
    mixed = (weighted * mask).sum(dim=0)
    return mixed / torch.clamp(mask.sum(dim=0), min=1.0) if mean else mixed


def ties_deltas(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    disjoint_mean: bool = True,
) -> Tensor:
    """TIES: trim each task vector to its top-``density`` magnitudes, elect signs, disjoint (mean) merge."""
    stacked = torch.stack([magnitude_prune(d, p) for d, p in zip(deltas, densities, strict=True)])
    mask = _sign_mask(stacked)
    return _disjoint(stacked * _weights_like(weights, stacked), mask, disjoint_mean)


def dare_linear_deltas(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DARE + weighted sum. Masks are drawn task by task, in order (as peft does)."""
    pruned = [random_prune(d, p, generator=generator) for d, p in zip(deltas, densities, strict=True)]
    stacked = torch.stack(pruned)
    return (stacked * _weights_like(weights, stacked)).sum(dim=0)


def dare_ties_deltas(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    generator: torch.Generator | None = None,
    disjoint_mean: bool = True,
) -> Tensor:
    """DARE's random drop followed by TIES' sign election and disjoint merge."""
    pruned = [random_prune(d, p, generator=generator) for d, p in zip(deltas, densities, strict=True)]
    stacked = torch.stack(pruned)
    mask = _sign_mask(stacked)
    return _disjoint(stacked * _weights_like(weights, stacked), mask, disjoint_mean)


# --- model-level methods --------------------------------------------------------------------------------
def linear(tensors: Sequence[Tensor], weights: Sequence[float], *, normalize: bool = True) -> Tensor:
    """mergekit linear: ``sum w_i theta_i``, divided by ``sum w_i`` when ``normalize``."""
    out = torch.zeros_like(tensors[0])
    for t, w in zip(tensors, weights, strict=True):
        out.add_(t, alpha=float(w))
    if normalize:
        total = float(sum(weights))
        if total == 0:
            raise NumericalError("linear merge with normalize: the model weights sum to 0")
        out.div_(total)
    return out


def task_arithmetic(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    *,
    lambda_: float = 1.0,
    normalize: bool = False,
) -> Tensor:
    """mergekit task arithmetic: ``base + lambda * sum w_i (theta_i - base)`` (/ ``sum w_i`` if normalize)."""
    mixed = torch.zeros_like(base)
    for t, w in zip(tensors, weights, strict=True):
        mixed.add_(t - base, alpha=float(w))
    if normalize:
        mixed.div_(_safe_divisor(float(sum(weights))))
    return base + lambda_ * mixed


def multislerp(
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    *,
    base: Tensor | None = None,
    normalize: bool = True,
    eps: float = 1e-8,
) -> Tensor:
    """mergekit's multislerp: barycentric interpolation on the hypersphere.

    The (base-relative) tensors are projected on the unit sphere, mapped to the tangent space at their
    weighted mean direction, averaged there, mapped back with the exponential map and rescaled to the
    weighted mean norm. Unlike mergekit, tensors whose deltas are all zero (untouched by every fine-tune)
    return the base instead of failing.
    """
    if len(tensors) == 1:
        return tensors[0]
    stacked = torch.stack(list(tensors))
    if base is not None:
        stacked = stacked - base
    flat = stacked.reshape(stacked.shape[0], -1)
    w = torch.tensor(list(weights), dtype=flat.dtype, device=flat.device)
    if normalize:
        w = w / w.sum()
    norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    if bool((norms < eps).all()):  # nothing to interpolate: every delta is zero
        out = (flat * w.view(-1, 1)).sum(0).view(stacked.shape[1:])
        return out if base is None else out + base
    unit = flat / (norms + eps)
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
    tangent = unit - (unit * mean).sum(-1, keepdim=True) * mean
    t_mix = (tangent * w.view(-1, 1)).sum(0)
    t_norm = torch.linalg.vector_norm(t_mix) + eps
    out = mean * torch.cos(t_norm) + t_mix * (torch.sin(t_norm) / t_norm)
    out = (out * (norms.squeeze(-1) * w).sum()).view(stacked.shape[1:])
    return out if base is None else out + base


def merge_tensor(
    method: str,
    base: Tensor | None,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    lambda_: float = 1.0,
    normalize: bool | None = None,
    eps: float = 1e-8,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Merge one tensor with a classic method. ``tensors`` are the task models' tensors (base excluded)."""
    norm = DEFAULT_NORMALIZE[method] if normalize is None else normalize
    if method == "linear":
        return linear(tensors, weights, normalize=norm)
    if method == "multislerp":
        return multislerp(tensors, weights, base=base, normalize=norm, eps=eps)
    if base is None:
        raise ValueError(f"merge_method {method!r} needs a base tensor")
    if method == "task_arithmetic":
        return task_arithmetic(base, tensors, weights, lambda_=lambda_, normalize=norm)
    deltas = [t - base for t in tensors]
    if method == "ties":
        mixed = ties_deltas(deltas, weights, densities, disjoint_mean=norm)
    elif method == "dare_ties":
        mixed = dare_ties_deltas(deltas, weights, densities, generator=generator, disjoint_mean=norm)
    elif method == "dare_linear":
        mixed = dare_linear_deltas(deltas, weights, densities, generator=generator)
        if norm:
            mixed = mixed / _safe_divisor(float(sum(weights)))
    else:
        raise ValueError(f"not a classic merge method: {method!r}")
    return base + lambda_ * mixed
