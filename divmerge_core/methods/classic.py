"""The classic merge methods as pure per-tensor functions.

``linear``, ``task_arithmetic`` and ``multislerp`` follow mergekit's semantics. TIES and DARE follow peft's
``merge_utils`` exactly (same pruning, same sign election, same random draw), so for equal densities and
the same seed they give bit-identical task-vector mixes. Per-model ``weight`` and ``density`` apply per task.

Delta-level functions (``*_deltas``) take task vectors and return the mixed delta; :func:`merge_tensor`
takes the base and model tensors and returns the merged tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

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
def _top_magnitude_mask(tensor: Tensor, k: int) -> Tensor:
    """A bool mask (same shape) of the ``k`` entries of largest magnitude, exactly the set peft's topk picks.

    peft calls ``topk(|x|, k)``, sorted: with k ~ numel/2 most of its time goes into sorting the k kept
    entries, which a mask does not need. On CPU the selection itself (``std::nth_element``, or
    ``partial_sort`` for small k) does not depend on ``sorted``, only the order of the returned indices
    does, so ``sorted=False`` gives the same set, ties at the threshold included (~2.7x faster over a
    BERT-base task vector). Other devices keep peft's exact call.
    """
    flat = tensor.reshape(-1)
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    top = torch.topk(flat.abs(), k=k, largest=True, sorted=flat.device.type != "cpu")
    keep[top.indices] = True
    return keep.view(tensor.shape)


def magnitude_prune(tensor: Tensor, density: float) -> Tensor:
    """Keep the ``int(density * numel)`` entries of largest magnitude, zero the rest."""
    if density >= 1 or not bool(tensor.any()):  # an all-zero task vector (a frozen tensor) stays as it is
        return tensor
    return tensor * _top_magnitude_mask(tensor, int(density * tensor.numel()))


def magnitude_prune_(tensor: Tensor, density: float) -> Tensor:
    """:func:`magnitude_prune` in place."""
    if density >= 1 or not bool(tensor.any()):  # all zeros: topk over ties only would be slow, same result
        return tensor
    return tensor.mul_(_top_magnitude_mask(tensor, int(density * tensor.numel())))


def random_prune(
    tensor: Tensor, density: float, *, rescale: bool = True, generator: torch.Generator | None = None
) -> Tensor:
    """DARE's drop: keep each entry with probability ``density`` (a Bernoulli mask), rescale by 1/density.

    Draws exactly as peft does (``torch.bernoulli`` of a tensor filled with ``density``); ``generator``
    defaults to torch's global generator, which is what peft uses.
    """
    if density >= 1:
        return tensor
    return random_prune_(tensor.clone(), density, rescale=rescale, generator=generator)


def random_prune_(
    tensor: Tensor, density: float, *, rescale: bool = True, generator: torch.Generator | None = None
) -> Tensor:
    """:func:`random_prune` in place (the same draw and the same arithmetic)."""
    if density >= 1:
        return tensor
    mask = torch.full_like(tensor, density)
    torch.bernoulli(mask, generator=generator, out=mask)
    tensor.mul_(mask)
    del mask
    return tensor.div_(density) if rescale else tensor


def _majority(stacked: Tensor) -> Tensor:
    """TIES sign election by total mass: +1 where the sum over tasks is >= 0, else -1 (NaN: -1), as peft."""
    return stacked.sum(dim=0).ge_(0).to(stacked.dtype).mul_(2).sub_(1)


def _elect_and_merge_(stacked: Tensor, weights: Sequence[float], mean: bool) -> Tensor:
    """peft's sign election and disjoint merge of task vectors ``[K, ...]``, which it overwrites.

    peft: ``mask = sign(x) == majority; ((x * w) * mask).sum(0) / clamp(mask.sum(0), min=1)``. Here the
    same products are made row by row (``sign(x) == majority`` as ``x * majority > 0``: multiplying by
    +-1 is exact, zero and NaN fail both tests), the counts accumulate in uint8 (K < 256), and the sum
    over the stacked rows is the same reduction, so no [K, ...] mask or float sign tensor is built.
    """
    majority = _majority(stacked)
    keep = torch.empty(stacked.shape[1:], dtype=torch.bool, device=stacked.device)
    scratch = torch.empty_like(majority)
    small = stacked.shape[0] < 256
    count = torch.zeros(
        stacked.shape[1:], dtype=torch.uint8 if small else torch.float32, device=stacked.device
    )
    # the weights rounded to the tensors' dtype, as peft's weight tensor multiplies them
    for row, w in zip(stacked, _weights_like(weights, stacked).reshape(-1).tolist(), strict=True):
        torch.gt(torch.mul(row, majority, out=scratch), 0, out=keep)
        row.mul_(w).mul_(keep)
        if mean:
            count.add_(keep)
    del majority, scratch, keep
    mixed = stacked.sum(dim=0)
    if not mean:
        return mixed
    # float32 counts, as peft's clamp(int64 count, min=1.0) gives
    divisor = count.to(torch.float32).clamp_(min=1.0)
    return mixed.div_(divisor) if mixed.dtype == torch.float32 else mixed / divisor


def _stack(tensors: Sequence[Tensor]) -> Tensor:
    return torch.stack(list(tensors))


def ties_deltas(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    disjoint_mean: bool = True,
) -> Tensor:
    """TIES: trim each task vector to its top-``density`` magnitudes, elect signs, disjoint (mean) merge."""
    return ties_stacked_(_stack(deltas), weights, densities, disjoint_mean=disjoint_mean)


def ties_stacked_(
    stacked: Tensor, weights: Sequence[float], densities: Sequence[float], *, disjoint_mean: bool = True
) -> Tensor:
    """:func:`ties_deltas` on stacked task vectors ``[K, ...]``, which it overwrites."""
    for row, p in zip(stacked, densities, strict=True):
        magnitude_prune_(row, p)
    return _elect_and_merge_(stacked, weights, disjoint_mean)


def dare_linear_deltas(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DARE + weighted sum. Masks are drawn task by task, in order (as peft does)."""
    return dare_linear_stacked_(_stack(deltas), weights, densities, generator=generator)


def dare_linear_stacked_(
    stacked: Tensor,
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """:func:`dare_linear_deltas` on stacked task vectors ``[K, ...]``, which it overwrites."""
    for row, p in zip(stacked, densities, strict=True):
        random_prune_(row, p, generator=generator)
    return stacked.mul_(_weights_like(weights, stacked)).sum(dim=0)


def dare_ties_deltas(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    generator: torch.Generator | None = None,
    disjoint_mean: bool = True,
) -> Tensor:
    """DARE's random drop followed by TIES' sign election and disjoint merge."""
    return dare_ties_stacked_(
        _stack(deltas), weights, densities, generator=generator, disjoint_mean=disjoint_mean
    )


def dare_ties_stacked_(
    stacked: Tensor,
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    generator: torch.Generator | None = None,
    disjoint_mean: bool = True,
) -> Tensor:
    """:func:`dare_ties_deltas` on stacked task vectors ``[K, ...]``, which it overwrites."""
    for row, p in zip(stacked, densities, strict=True):
        random_prune_(row, p, generator=generator)
    return _elect_and_merge_(stacked, weights, disjoint_mean)


# --- model-level methods --------------------------------------------------------------------------------
def linear(tensors: Iterable[Tensor], weights: Sequence[float], *, normalize: bool = True) -> Tensor:
    """mergekit linear: ``sum w_i theta_i``, divided by ``sum w_i`` when ``normalize``.

    ``tensors`` may be any iterable (e.g. a generator refilling one read buffer): each is used once.
    """
    out: Tensor | None = None
    for t, w in zip(tensors, weights, strict=True):
        if out is None:
            out = torch.zeros_like(t)
        out.add_(t, alpha=float(w))
    if out is None:
        raise ValueError("linear: no tensors to merge")
    if normalize:
        total = float(sum(weights))
        if total == 0:
            raise NumericalError("linear merge with normalize: the model weights sum to 0")
        out.div_(total)
    return out


def task_arithmetic(
    base: Tensor,
    tensors: Iterable[Tensor],
    weights: Sequence[float],
    *,
    lambda_: float = 1.0,
    normalize: bool = False,
    inplace: bool = False,
) -> Tensor:
    """mergekit task arithmetic: ``base + lambda * sum w_i (theta_i - base)`` (/ ``sum w_i`` if normalize).

    ``tensors`` may be any iterable, each used once; ``inplace`` lets the deltas overwrite them.
    """
    mixed = torch.zeros_like(base)
    for t, w in zip(tensors, weights, strict=True):
        mixed.add_(t.sub_(base) if inplace else t - base, alpha=float(w))
    if normalize:
        mixed.div_(_safe_divisor(float(sum(weights))))
    if lambda_ != 1.0:
        mixed.mul_(lambda_)
    return mixed.add_(base)  # == base + lambda * mixed (addition commutes exactly)


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
    return multislerp_stacked_(_stack(tensors), weights, base=base, normalize=normalize, eps=eps)


def multislerp_stacked_(
    stacked: Tensor,
    weights: Sequence[float],
    *,
    base: Tensor | None = None,
    normalize: bool = True,
    eps: float = 1e-8,
) -> Tensor:
    """:func:`multislerp` on stacked tensors ``[K, ...]``, which it overwrites (same arithmetic)."""
    if stacked.shape[0] == 1:
        return stacked[0]
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
    if method == "task_arithmetic":
        if base is None:
            raise ValueError(f"merge_method {method!r} needs a base tensor")
        return task_arithmetic(base, tensors, weights, lambda_=lambda_, normalize=norm)
    if method == "multislerp" and len(tensors) == 1:
        return tensors[0]
    return merge_stacked_(
        method,
        base,
        _stack(tensors),
        weights,
        densities,
        lambda_=lambda_,
        normalize=normalize,
        eps=eps,
        generator=generator,
    )


def merge_stacked_(
    method: str,
    base: Tensor | None,
    stacked: Tensor | Iterable[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    lambda_: float = 1.0,
    normalize: bool | None = None,
    eps: float = 1e-8,
    generator: torch.Generator | None = None,
) -> Tensor:
    """:func:`merge_tensor` on tensors the caller hands over: they are overwritten.

    ``stacked`` is a ``[K, ...]`` tensor; for ``linear`` and ``task_arithmetic``, which use one model at a
    time, it may also be any iterable of tensors (e.g. a generator that refills one read buffer). The
    arithmetic is the same as :func:`merge_tensor`'s, so are the results.
    """
    norm = DEFAULT_NORMALIZE[method] if normalize is None else normalize
    if method == "linear":
        return linear(stacked, weights, normalize=norm)
    if method != "multislerp" and base is None:
        raise ValueError(f"merge_method {method!r} needs a base tensor")
    if method == "task_arithmetic":
        assert base is not None
        return task_arithmetic(base, stacked, weights, lambda_=lambda_, normalize=norm, inplace=True)
    if not isinstance(stacked, Tensor):
        stacked = _stack(list(stacked))
    if method == "multislerp":
        return multislerp_stacked_(stacked, weights, base=base, normalize=norm, eps=eps)
    assert base is not None
    stacked.sub_(base)  # the task vectors, the same values as t - base
    if method == "ties":
        mixed = ties_stacked_(stacked, weights, densities, disjoint_mean=norm)
    elif method == "dare_ties":
        mixed = dare_ties_stacked_(stacked, weights, densities, generator=generator, disjoint_mean=norm)
    elif method == "dare_linear":
        mixed = dare_linear_stacked_(stacked, weights, densities, generator=generator)
        if norm:
            mixed = mixed.div_(_safe_divisor(float(sum(weights))))
    else:
        raise ValueError(f"not a classic merge method: {method!r}")
    del stacked
    if lambda_ != 1.0:
        mixed = mixed.mul_(lambda_)
    return mixed.add_(base) if mixed.dtype == torch.promote_types(mixed.dtype, base.dtype) else base + mixed
