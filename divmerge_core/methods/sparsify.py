"""Task-vector primitives shared by TIES and DARE, exactly as peft's ``merge_utils`` computes them.

Same pruning, same sign election, same random draw: for equal densities and the same seed the methods
built on them give bit-identical task-vector mixes to peft's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Tensor = torch.Tensor


def weights_like(weights: Sequence[float], stacked: Tensor) -> Tensor:
    """The per-task weights as a ``[K, 1, ...]`` tensor in ``stacked``'s dtype (peft's rounding)."""
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    return w.view(w.shape + (1,) * (stacked.dim() - 1))


def safe_divisor(total: float) -> float:
    """mergekit's guard: a weight sum of (almost) zero is not divided by."""
    return 1.0 if abs(total) < 1e-8 else total


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


def majority_sign(stacked: Tensor) -> Tensor:
    """TIES sign election by total mass: +1 where the sum over tasks is >= 0, else -1 (NaN: -1), as peft."""
    return stacked.sum(dim=0).ge_(0).to(stacked.dtype).mul_(2).sub_(1)


def elect_and_merge_(stacked: Tensor, weights: Sequence[float], mean: bool) -> Tensor:
    """peft's sign election and disjoint merge of task vectors ``[K, ...]``, which it overwrites.

    peft: ``mask = sign(x) == majority; ((x * w) * mask).sum(0) / clamp(mask.sum(0), min=1)``. Here the
    same products are made row by row (``sign(x) == majority`` as ``x * majority > 0``: multiplying by
    +-1 is exact, zero and NaN fail both tests), the counts accumulate in uint8 (K < 256), and the sum
    over the stacked rows is the same reduction, so no [K, ...] mask or float sign tensor is built.
    """
    majority = majority_sign(stacked)
    keep = torch.empty(stacked.shape[1:], dtype=torch.bool, device=stacked.device)
    scratch = torch.empty_like(majority)
    small = stacked.shape[0] < 256
    count = torch.zeros(
        stacked.shape[1:], dtype=torch.uint8 if small else torch.float32, device=stacked.device
    )
    # the weights rounded to the tensors' dtype, as peft's weight tensor multiplies them
    for row, w in zip(stacked, weights_like(weights, stacked).reshape(-1).tolist(), strict=True):
        torch.gt(torch.mul(row, majority, out=scratch), 0, out=keep)
        if w != 1.0:  # x * 1.0 is x exactly: skip the pass
            row.mul_(w)
        row.mul_(keep)
        if mean:
            count.add_(keep)
    del majority, scratch, keep
    mixed = stacked.sum(dim=0)
    if not mean:
        return mixed
    # float32 counts, as peft's clamp(int64 count, min=1.0) gives
    divisor = count.to(torch.float32).clamp_(min=1.0)
    return mixed.div_(divisor) if mixed.dtype == torch.float32 else mixed / divisor
