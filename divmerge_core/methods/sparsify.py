"""Task-vector primitives: peft's (``merge_utils``) and mergekit's (``sparsify.py``).

The first part is peft's arithmetic (the ``variant: peft`` of ties and DARE): same pruning, same sign
election, same random draw, so for equal densities and the same seed it gives bit-identical task-vector
mixes to peft's. The second part (``mk_*``) is mergekit 0.1.5's sparsification, which the generalized
task arithmetic (:mod:`.generalized`) uses by default. The sign election and the agreement test
(:func:`elected_sign`, :func:`agrees`) are written once here for both, and for the learned methods' trimmed
or sign-resolved task vectors (:mod:`divmerge_core.learned.trimming`), which also take
:func:`mk_magnitude_`, :func:`dare_drop_` and :func:`sign_consensus_` from here.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Literal

import torch

Tensor = torch.Tensor


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed, so DARE's masks do not depend on which other tensors are merged or in what order."""
    return (seed * 0x9E3779B1 + zlib.crc32(name.encode("utf-8"))) % (2**63 - 1)


def weights_like(weights: Sequence[float], stacked: Tensor) -> Tensor:
    """The per-task weights as a ``[K, 1, ...]`` tensor in ``stacked``'s dtype (peft's rounding)."""
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    return w.view(w.shape + (1,) * (stacked.dim() - 1))


def safe_divisor(total: float) -> float:
    """mergekit's guard: a weight sum of (almost) zero is not divided by."""
    return 1.0 if abs(total) < 1e-8 else total


#: float32 CPU tensors at least this large find the top-k threshold by radix selection (smaller: topk).
RADIX_MIN_NUMEL = 1 << 16


def _kth_largest_magnitude(tensor: Tensor, k: int) -> tuple[Tensor, int, int] | None:
    """(``|x|``'s bits as int32, the bits of the ``k``-th largest magnitude, how many are >= it).

    Radix selection: non-negative float32 values order like their bit patterns as integers (NaN above
    inf, as topk orders it), so two histograms (``bincount`` of the high 16 bits, then of the low 16
    bits inside the one bucket that holds the k-th value) give the exact k-th largest magnitude in a
    few streaming passes instead of a selection over the whole tensor. None if it does not apply.
    """
    if tensor.dtype != torch.float32 or tensor.device.type != "cpu" or not 0 < k <= tensor.numel():
        return None
    if tensor.numel() < RADIX_MIN_NUMEL:
        return None
    bits = tensor.reshape(-1).view(torch.int32).bitwise_and(0x7FFFFFFF)  # |x|, NaN payloads kept
    high = bits.bitwise_right_shift(16)
    above = torch.bincount(high, minlength=1 << 15).flip(0).cumsum_(0)  # [i]: count with high >= 32767-i
    i = int(torch.searchsorted(above, k))  # first bucket (from the top) reaching k entries
    bucket = (1 << 15) - 1 - i
    before = int(above[i - 1]) if i else 0
    low = bits[high == bucket].bitwise_and_(0xFFFF)
    inside = torch.bincount(low, minlength=1 << 16).flip(0).cumsum_(0)
    j = int(torch.searchsorted(inside, k - before))
    return bits, (bucket << 16) | ((1 << 16) - 1 - j), before + int(inside[j])


def _top_magnitude_mask(tensor: Tensor, k: int) -> Tensor | None:
    """A bool mask (same shape) of the ``k`` entries of largest magnitude, exactly the set peft's topk
    picks; None when keeping them leaves ``tensor`` as it is (the k-th largest magnitude is 0).

    The set is unique unless entries tie at the k-th magnitude with some kept and some not. The radix
    threshold (:func:`_kth_largest_magnitude`) is used when exactly ``k`` entries reach it, i.e. no tie
    straddles the cut; otherwise topk decides as peft's does. peft calls ``topk(|x|, k)``, sorted: on
    CPU the selection (``std::nth_element``, or ``partial_sort`` for small k) does not depend on
    ``sorted``, only the order of the returned indices does, so ``sorted=False`` gives the same set,
    ties included. Other devices keep peft's exact call.
    """
    flat = tensor.reshape(-1)
    found = _kth_largest_magnitude(tensor, k)
    if found is not None:
        bits, threshold, reaching = found
        if threshold == 0:  # the kept set holds every nonzero: x * mask is x, bit for bit (signed zeros too)
            return None
        if reaching == k:
            return (bits >= threshold).view(tensor.shape)
        magnitudes = bits.view(torch.float32)  # |x|, the same bits as flat.abs(): no second copy
        del found, bits
    elif not bool(tensor.any()):  # all zeros: topk over ties only would be slow, x * mask is x
        return None
    else:
        magnitudes = flat.abs()
    indices = torch.topk(magnitudes, k=k, largest=True, sorted=flat.device.type != "cpu").indices
    del magnitudes
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[indices] = True
    return keep.view(tensor.shape)


def magnitude_prune(tensor: Tensor, density: float) -> Tensor:
    """Keep the ``int(density * numel)`` entries of largest magnitude, zero the rest."""
    if density >= 1:
        return tensor
    return magnitude_prune_(tensor.clone(), density)


def magnitude_prune_(tensor: Tensor, density: float) -> Tensor:
    """:func:`magnitude_prune` in place."""
    if density >= 1:
        return tensor
    mask = _top_magnitude_mask(tensor, int(density * tensor.numel()))
    return tensor if mask is None else tensor.mul_(mask)


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


def elected_sign(stacked: Tensor, consensus: Literal["sum", "count"] = "sum") -> Tensor:
    """TIES sign election over the tasks of ``stacked`` ``[K, ...]``: +1 / -1 (NaN: -1) in its dtype.

    ``sum``: the sign of the total mass (the sum over tasks, >= 0 is +1), as peft and mergekit's ``sum``;
    ``count``: the sign of the majority of the entries' signs (mergekit's ``count``).
    """
    if consensus == "sum":
        majority = stacked.sum(dim=0).ge_(0)
    else:
        votes = torch.zeros_like(stacked[0])
        for row in stacked:
            votes.add_(row.sign())
        majority = votes.ge_(0)
    return majority.to(stacked.dtype).mul_(2).sub_(1)


def agrees(row: Tensor, majority: Tensor, out: Tensor, scratch: Tensor) -> Tensor:
    """``out`` (bool) = where ``sign(row) == majority``, as ``row * majority > 0``: multiplying by +-1 is
    exact, zero and NaN fail both tests. ``scratch`` is a buffer of ``majority``'s shape and dtype."""
    return torch.gt(torch.mul(row, majority, out=scratch), 0, out=out)


def majority_sign(stacked: Tensor) -> Tensor:
    """TIES sign election by total mass: +1 where the sum over tasks is >= 0, else -1 (NaN: -1), as peft."""
    return elected_sign(stacked, "sum")


def sign_consensus_(stacked: Tensor) -> Tensor:
    """TIES's sign election without the merge, in place on ``[K, ...]``: every entry whose sign is not the
    elected one (:func:`elected_sign` by total mass, the sum taken in float32) becomes 0; zeros stay 0."""
    total = stacked if stacked.dtype == torch.float32 else stacked.float()
    majority = elected_sign(total, "sum").to(stacked.dtype)
    del total
    keep = torch.empty(stacked.shape[1:], dtype=torch.bool, device=stacked.device)
    scratch = torch.empty_like(majority)
    for row in stacked:
        row.mul_(agrees(row, majority, keep, scratch))
    return stacked


def dare_drop_(tensor: Tensor, density: float, generator: torch.Generator | None = None) -> Tensor:
    """DARE's drop with rescale 1/density, in place, its mask drawn on the host.

    The draw is :func:`random_prune_`'s for a float32 CPU tensor (one ``Bernoulli(density)`` per entry from
    ``generator``, which must be a CPU generator), and so is the arithmetic (``x * mask / density``): on a
    float32 CPU tensor the two give the same bits. The mask is made on the host whatever ``tensor``'s
    device, so the entries kept do not depend on the device the task vector is formed on.
    """
    if density >= 1:
        return tensor
    mask = torch.full(tensor.shape, density, dtype=torch.float32)
    torch.bernoulli(mask, generator=generator, out=mask)
    tensor.mul_(mask.to(tensor.device, non_blocking=True))
    del mask
    return tensor.div_(density)


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
        agrees(row, majority, keep, scratch)
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


# --- mergekit's sparsification (mergekit/sparsify.py, 0.1.5), used by the generalized task arithmetic ---
#: mergekit's tolerance for a (near) zero norm: no rescaling then.
RESCALE_EPS = 1e-7


def l1_rescale_(masked: Tensor, l1_before: Tensor) -> Tensor:
    """mergekit's ``rescaled_masked_tensor`` with the L1 norm: ``masked * (|x|_1 / |masked|_1)``, in place,
    unless either norm is below 1e-7 (then ``masked`` as it is)."""
    after = masked.abs().sum()
    if l1_before < RESCALE_EPS or after < RESCALE_EPS:
        return masked
    return masked.mul_(l1_before / after)


def _mk_top_magnitude_mask(tensor: Tensor, k: int) -> Tensor | None:
    """A bool mask of the ``k`` entries mergekit keeps: ``argsort(|x|, descending=True)[:k]``; None when
    keeping them leaves ``tensor`` as it is.

    Large float32 CPU tensors take the radix threshold (:func:`_kth_largest_magnitude`) when exactly ``k``
    entries reach it: the set is then unique. When equal magnitudes straddle the cut (common in
    tensors of millions of entries), which of them are kept is up to the sort's order of ties (torch's
    CPU sort is not stable), so mergekit's own call decides, as for every other tensor.
    """
    found = _kth_largest_magnitude(tensor, k)
    if found is not None:
        bits, threshold, reaching = found
        if threshold == 0:  # every nonzero is kept: x * mask is x
            return None
        if reaching == k:
            return (bits >= threshold).view(tensor.shape)
        del found, bits
    w = tensor.abs().reshape(-1)
    if w.device.type == "cpu":
        w = w.float()
    keep = torch.zeros(tensor.numel(), dtype=torch.bool, device=tensor.device)
    keep[torch.argsort(w, descending=True)[:k]] = True
    return keep.view(tensor.shape)


def mk_magnitude_(tensor: Tensor, density: float, rescale: bool = False) -> Tensor:
    """mergekit's ``magnitude``: keep the ``max(1, int(density * numel))`` largest magnitudes (in place),
    the same entries as mergekit (:func:`_mk_top_magnitude_mask`)."""
    if density >= 1:
        return tensor
    if density <= 0 or tensor.numel() == 0:
        return tensor.zero_()
    before = tensor.abs().sum() if rescale else None
    mask = _mk_top_magnitude_mask(tensor, max(1, int(density * tensor.numel())))
    if mask is not None:
        tensor.mul_(mask)
    return l1_rescale_(tensor, before) if before is not None else tensor


def mk_magnitude_outliers_(tensor: Tensor, density: float, gamma: float, rescale: bool = False) -> Tensor:
    """mergekit's ``magnitude_outliers`` (Model Breadcrumbs), in place: drop the ``int(gamma * numel)``
    largest magnitudes, then the smallest, keeping ``int(density * numel)`` entries."""
    if density >= 1:
        return tensor
    n = tensor.numel()
    target = int(density * n)
    bottom = max(0, n - target - int(gamma * n))
    before = tensor.abs().sum() if rescale else None
    order = torch.sort(tensor.abs().reshape(-1), descending=False).indices  # mergekit's own call
    mask = torch.zeros(n, dtype=tensor.dtype, device=tensor.device)
    mask[order[bottom : bottom + target]] = 1
    del order
    tensor.mul_(mask.view(tensor.shape))
    return l1_rescale_(tensor, before) if before is not None else tensor


def mk_bernoulli_(
    tensor: Tensor, density: float, rescale: bool = True, generator: torch.Generator | None = None
) -> Tensor:
    """mergekit's ``bernoulli`` (DARE), in place: keep each entry with probability ``density``; with
    ``rescale`` the kept entries are scaled so the L1 norm is the original's (mergekit's ``rescale``)."""
    if density >= 1:
        return tensor
    before = tensor.abs().sum() if rescale else None
    mask = torch.full_like(tensor, density)
    torch.bernoulli(mask, generator=generator, out=mask)
    tensor.mul_(mask)
    del mask
    return l1_rescale_(tensor, before) if before is not None else tensor


def della_problem(density: float, epsilon: float) -> str | None:
    """mergekit refuses DELLA keep-probabilities outside (0, 1): density +/- epsilon must be inside."""
    if density >= 1 or density <= 0:
        return None
    if density + epsilon >= 1 or density - epsilon <= 0:
        return f"needs density +/- epsilon inside (0, 1) (density {density}, epsilon {epsilon})"
    return None


def mk_della_magprune_(
    tensor: Tensor,
    density: float,
    epsilon: float,
    rescale: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """mergekit's ``della_magprune`` (DELLA's MagPrune), in place: per row, the keep-probability grows
    linearly with the magnitude's rank from ``density - epsilon`` to ``density + epsilon``."""
    if density >= 1:
        return tensor
    if density <= 0:
        return tensor.zero_()
    problem = della_problem(density, epsilon)
    if problem:
        raise ValueError(f"della {problem}")
    rows = tensor.unsqueeze(0) if tensor.dim() < 2 else tensor
    before = tensor.abs().sum() if rescale else None
    ranks = torch.argsort(rows.abs(), dim=1, descending=False).argsort(dim=1).to(rows.dtype).add_(1)
    lo = ranks.min(dim=1, keepdim=True).values
    hi = ranks.max(dim=1, keepdim=True).values
    probs = ranks.sub_(lo).div_(hi - lo).clamp_(0, 1).mul_(2).mul_(epsilon).add_(density - epsilon)
    del lo, hi
    mask = torch.bernoulli(probs, generator=generator)
    del probs
    rows.mul_(mask)
    del mask
    return l1_rescale_(tensor, before) if before is not None else tensor
