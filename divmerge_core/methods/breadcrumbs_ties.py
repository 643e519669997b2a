"""breadcrumbs_ties (mergekit's): Model Breadcrumbs' sparsification, then TIES' sign election."""

from __future__ import annotations

from . import generalized as g
from .breadcrumbs import ModelParameters as ModelParameters


class Parameters(g.TaskVectorParameters):
    gamma: g.Gamma | None = g.model_default("gamma")
    normalize: bool = g.normalize_field(False, consensus=True)
    rescale: bool = g.rescale_field(False)


METHOD = g.method(
    name="breadcrumbs_ties",
    sparsification="magnitude_outliers",
    consensus="sum",
    parameters=Parameters,
    model_parameters=ModelParameters,
    card="Model Breadcrumbs with TIES: task vectors without their largest and smallest entries, signs "
    "elected by total mass, agreeing entries merged",
    reference="https://arxiv.org/abs/2312.06795",
)
