"""dare_linear (mergekit's): drop each task-vector entry with probability ``1 - density`` and
(``rescale``) scale the rest back to the vector's L1 norm (DARE), then a weighted sum.
``variant: peft`` gives peft's DARE (rescaled by ``1/density``) bit for bit."""

from __future__ import annotations

from . import generalized as g


class Parameters(g.TaskVectorParameters):
    normalize: bool = g.normalize_field(False, consensus=False)
    rescale: bool = g.rescale_field(True)
    seed: int = g.seed_field()
    variant: g.Variant = g.variant_field()


ModelParameters = g.TaskVectorModelParameters

METHOD = g.method(
    name="dare_linear",
    sparsification="random",
    consensus=None,
    parameters=Parameters,
    model_parameters=ModelParameters,
    card="DARE: task vectors randomly sparsified (drop and rescale), then summed with their weights",
    reference="https://arxiv.org/abs/2311.03099",
)
