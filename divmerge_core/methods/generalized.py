"""The generalized task arithmetic behind every task-vector method (mergekit's
``generalized_task_arithmetic.py``, 0.1.5): one implementation, a pluggable sparsification and consensus.

For each tensor, each task vector ``delta_i = theta_i - base`` is sparsified (``magnitude``: TIES' trim,
``random``: DARE's drop, ``magnitude_outliers``: Model Breadcrumbs, ``della_magprune``: DELLA), with
``rescale`` scaled back to its L1 norm, and multiplied by its weight. Without consensus the weighted
vectors are summed (``normalize``: divided by the sum of the weights); with consensus (``sum``: the sign of
the total mass, ``count``: the sign of the majority) only the entries agreeing with the elected sign are
summed (``normalize``: divided by the sum of the agreeing weights). The result is
``base + lambda * mixed``.

The methods differ only in the two choices and in their defaults (:func:`method` builds each). ``ties``,
``dare_ties`` and ``dare_linear`` also take ``variant: peft``, peft's ``merge_utils`` arithmetic
(:mod:`.sparsify`), which this engine followed before it matched mergekit (see docs/methods.md).

Without consensus the models are used one at a time, so those methods stream (one buffer whatever K).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from .base import (
    Lambda,
    MergeMethod,
    MethodParameters,
    TensorInputs,
    Weight,
    int8_mask_field,
    lambda_default,
    model_default,
    setting,
)

if TYPE_CHECKING:
    import torch

Sparsification = Literal["magnitude", "random", "magnitude_outliers", "della_magprune"]
Consensus = Literal["sum", "count"]
Variant = Literal["mergekit", "peft"]

#: mergekit's density: 0 keeps nothing, 1 everything (the default).
Density = setting("fraction of each task vector kept (0 <= density <= 1)", gt=None, le=1.0)
Gamma = setting("fraction of the largest magnitudes removed as outliers (Model Breadcrumbs)")
Epsilon = setting(
    "DELLA: keep-probabilities range over density +/- epsilon, growing with the magnitude's rank"
)


def normalize_field(default: bool, consensus: bool) -> Any:
    what = "the sum of the agreeing models' weights" if consensus else "the sum of the weights"
    return Field(default, description=f"divide the mixed task vector by {what}")


def rescale_field(default: bool) -> Any:
    return Field(default, description="scale each sparsified task vector back to its L1 norm (mergekit's)")


def seed_field() -> Any:
    return Field(0, description="seed of the random drop (each tensor draws from its own seeded generator)")


def variant_field() -> Any:
    return Field(
        "mergekit",
        description="mergekit: mergekit 0.1.5's arithmetic; peft: peft's merge_utils (signs elected on the "
        "unweighted trimmed vectors, normalize divides by the number of agreeing models, DARE rescales by "
        "1/density)",
    )


class TaskVectorParameters(MethodParameters):
    """Global parameters of every sparsifying task-vector method; each adds ``normalize``, ``rescale``
    (mergekit's defaults differ by method) and, when random, ``seed``."""

    weight: Weight | None = model_default("weight")
    density: Density | None = model_default("density")
    lambda_: Lambda = lambda_default()
    int8_mask: bool | None = int8_mask_field()


class TaskVectorModelParameters(MethodParameters):
    """Per-model parameters of every sparsifying task-vector method (mergekit's density default 1)."""

    weight: Weight = 1.0
    density: Density = 1.0


def _rounded(weights: Sequence[float], like: torch.Tensor) -> list[float]:
    """The weights rounded to the tensors' dtype, as mergekit's weight tensor holds them."""
    import torch

    return torch.tensor(list(weights), dtype=like.dtype).tolist()


def _sparsify_(
    delta: torch.Tensor,
    p: dict[str, Any],
    how: Sparsification | None,
    rescale: bool,
    generator: torch.Generator | None,
) -> torch.Tensor:
    from . import sparsify as sp

    density = float(p.get("density", 1.0))
    if how is None:
        return delta
    if how == "magnitude":
        return sp.mk_magnitude_(delta, density, rescale)
    if how == "random":
        return sp.mk_bernoulli_(delta, density, rescale, generator)
    if how == "magnitude_outliers":
        return sp.mk_magnitude_outliers_(delta, density, float(p["gamma"]), rescale)
    return sp.mk_della_magprune_(delta, density, float(p["epsilon"]), rescale, generator)


def merge_task_vectors(
    x: TensorInputs, *, sparsification: Sparsification | None, consensus: Consensus | None
) -> torch.Tensor:
    """One tensor of a task-vector method (``x.models`` may be a one-buffer iterable when no consensus)."""
    import torch

    from . import sparsify as sp
    from .task_vectors import add_to_base

    if x.params.get("variant") == "peft":
        return _merge_peft(x, sparsification, consensus)
    base = x.base
    assert base is not None
    rescale = bool(x.params.get("rescale", False))
    normalize = bool(x.params.get("normalize", False))
    weights = _rounded(x.column("weight"), base)
    if consensus is None:
        mixed: torch.Tensor | None = None
        for t, p, w in zip(x.models, x.per_model, weights, strict=True):
            delta = _sparsify_(t.sub_(base), p, sparsification, rescale, x.generator)
            if mixed is None:  # a new tensor (t may be a reused buffer)
                mixed = torch.mul(delta, w)
            else:  # w * delta, then the sum: mergekit's two roundings (not a fused multiply-add)
                mixed.add_(delta.mul_(w) if w != 1.0 else delta)
        assert mixed is not None
        if normalize:
            total = float(torch.tensor(weights, dtype=base.dtype).sum())
            mixed.div_(1.0 if abs(total) < 1e-8 else total)
        return add_to_base(mixed, base, float(x.params["lambda_"]))

    stacked = x.stacked().sub_(base)
    for row, p, w in zip(stacked, x.per_model, weights, strict=True):
        _sparsify_(row, p, sparsification, rescale, x.generator)
        if w != 1.0:
            row.mul_(w)
    majority = sp.elected_sign(stacked, consensus)  # +1 / -1 (NaN: -1), mergekit's majority sign
    keep = torch.empty(stacked.shape[1:], dtype=torch.bool, device=stacked.device)
    scratch = torch.empty_like(majority)
    divisor = torch.zeros_like(majority)
    for row, w in zip(stacked, weights, strict=True):
        row.mul_(sp.agrees(row, majority, keep, scratch))  # sign(row) == majority (zero and NaN fail)
        divisor.add_(keep, alpha=w)
    del majority, scratch, keep
    mixed = stacked.sum(dim=0)
    if normalize:
        mixed.div_(divisor.masked_fill_(divisor == 0, 1.0))
    del divisor
    return add_to_base(mixed, base, float(x.params["lambda_"]))


def _merge_peft(
    x: TensorInputs, sparsification: Sparsification | None, consensus: Consensus | None
) -> torch.Tensor:
    """peft's ``merge_utils`` arithmetic (ties, dare_ties, dare_linear), bit for bit."""
    from . import sparsify as sp
    from .task_vectors import add_to_base

    assert x.base is not None
    stacked = x.stacked().sub_(x.base)
    rescale = bool(x.params.get("rescale", True))
    for row, p in zip(stacked, x.column("density"), strict=True):  # task by task, in order, as peft
        if sparsification == "magnitude":
            sp.magnitude_prune_(row, p)
        else:
            sp.random_prune_(row, p, rescale=rescale, generator=x.generator)
    weights = x.column("weight")
    if consensus is not None:
        mixed = sp.elect_and_merge_(stacked, weights, bool(x.params["normalize"]))
    else:
        mixed = stacked.mul_(sp.weights_like(weights, stacked)).sum(dim=0)
        if x.params["normalize"]:
            mixed.div_(sp.safe_divisor(sum(weights)))
    return add_to_base(mixed, x.base, float(x.params["lambda_"]))


def _check(
    sparsification: Sparsification | None, params: dict[str, Any], per_model: Sequence[dict[str, Any]]
) -> str | None:
    from .sparsify import della_problem

    if params.get("variant") == "peft" and sparsification == "magnitude" and params.get("rescale"):
        return "with variant: peft does not rescale (peft's TIES trims without rescaling)"
    for i, p in enumerate(per_model):
        if sparsification == "della_magprune":
            problem = della_problem(float(p["density"]), float(p["epsilon"]))
            if problem:
                return f"{problem} for model {i}"
        if sparsification == "magnitude_outliers" and not 0 <= float(p["gamma"]) <= 1:
            return f"needs 0 <= gamma <= 1 (model {i} has {p['gamma']})"
        if float(p.get("density", 1.0)) < 0:
            return f"needs density >= 0 (model {i} has {p['density']})"
    return None


def method(
    *,
    name: str,
    sparsification: Sparsification | None,
    consensus: Consensus | None,
    parameters: type[MethodParameters],
    model_parameters: type[MethodParameters],
    card: str,
    reference: str,
) -> MergeMethod:
    """A task-vector method: the generalized merge with this sparsification and consensus."""
    merge: Callable[[TensorInputs], Any] = partial(
        merge_task_vectors, sparsification=sparsification, consensus=consensus
    )
    peft = "variant" in parameters.model_fields
    return MergeMethod(
        name=name,
        kind="classic",
        parameters=parameters,
        model_parameters=model_parameters,
        card=card,
        reference=reference,
        merge=merge,
        # one model at a time without consensus (peft's variant stacks them, as peft does)
        streams=consensus is None and not peft,
        random=sparsification in ("random", "della_magprune"),
        check=partial(_check, sparsification),
    )
