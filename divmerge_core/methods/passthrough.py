"""passthrough (mergekit's): one model's tensors as they are (times ``scale``, if set). With ``slices``
each taking one model's ``layer_range``, a model with the slices' layers stacked in order (a frankenmerge:
any layer count; config.json says how many; see :mod:`divmerge_core.relayer`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import MergeMethod, MethodParameters, TensorInputs, model_default, setting

if TYPE_CHECKING:
    import torch

Scale = setting("multiplies the model's tensors (filters pick which, e.g. o_proj/down_proj)")


class Parameters(MethodParameters):
    scale: Scale | None = model_default("scale")


class ModelParameters(MethodParameters):
    scale: Scale | None = None


def merge(x: TensorInputs) -> torch.Tensor:
    (t,) = x.models
    scale = x.per_model[0].get("scale")
    return t if scale is None else t * float(scale)


METHOD = MergeMethod(
    name="passthrough",
    kind="classic",
    parameters=Parameters,
    model_parameters=ModelParameters,
    card="passthrough: one model's tensors copied (optionally scaled); with slices, layer ranges of the "
    "models stacked into a new layer stack (frankenmerge)",
    reference="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
    base="unused",
    merge=merge,
    n_models=1,
    relayers=True,
)
