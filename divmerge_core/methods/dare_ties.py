"""dare_ties (mergekit's): DARE's random drop (rescaled to the L1 norm), then TIES' sign election; the
agreeing entries are summed (``normalize``: divided by the sum of their weights).
``variant: peft`` gives peft's DARE-TIES bit for bit (with ``normalize: true``, peft's disjoint mean)."""

from __future__ import annotations

from . import generalized as g


class Parameters(g.TaskVectorParameters):
    normalize: bool = g.normalize_field(False, consensus=True)
    rescale: bool = g.rescale_field(True)
    seed: int = g.seed_field()
    variant: g.Variant = g.variant_field()


ModelParameters = g.TaskVectorModelParameters

METHOD = g.method(
    name="dare_ties",
    sparsification="random",
    consensus="sum",
    parameters=Parameters,
    model_parameters=ModelParameters,
    card="DARE + TIES: task vectors randomly sparsified (drop and rescale), signs elected, agreeing "
    "entries merged",
    reference="https://arxiv.org/abs/2311.03099",
)
