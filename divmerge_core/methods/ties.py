"""ties (mergekit's): trim each task vector to its top-``density`` magnitudes, elect the sign of the total
(weighted) mass, sum the agreeing entries and (``normalize``) divide by the sum of their weights.
``variant: peft`` gives peft's TIES bit for bit (see docs/methods.md)."""

from __future__ import annotations

from . import generalized as g


class Parameters(g.TaskVectorParameters):
    normalize: bool = g.normalize_field(True, consensus=True)
    rescale: bool = g.rescale_field(False)
    variant: g.Variant = g.variant_field()


ModelParameters = g.TaskVectorModelParameters

METHOD = g.method(
    name="ties",
    sparsification="magnitude",
    consensus="sum",
    parameters=Parameters,
    model_parameters=ModelParameters,
    card="TIES: task vectors trimmed to their largest entries, signs elected by total mass, agreeing "
    "entries averaged",
    reference="https://arxiv.org/abs/2306.01708",
)
