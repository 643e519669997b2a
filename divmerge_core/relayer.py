"""Merges that rebuild the layer stack: mergekit's ``passthrough`` with ``slices`` (frankenmerges).

Each slice takes one model's ``layer_range``; the output's layers are the slices' layers in order,
renumbered from 0, so the output may have more or fewer layers than the models (its config.json says how
many). Tensors outside the layers come from one model, as in mergekit: the embeddings (names matching
:data:`~divmerge_core.methods.settings._PRE`) from the first slice's model, the others (final norm, head)
from the last slice's. Parameters (``scale``) are evaluated per output tensor, ``t`` running over each
slice's output layers.

Still streaming: each output tensor is one tensor read from one model, written as soon as it is made.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError
from .methods.settings import _LAYER, _PRE, Slice, TensorSettings, layer_index

if TYPE_CHECKING:
    import torch

    from .config import MergeConfig, ModelSpec
    from .plan import MergePlan
    from .progress import Reporter

#: config.json keys holding the number of layers, by model family.
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass(frozen=True)
class Source:
    """Where one output tensor comes from: ``plan.models[model]``'s tensor ``name``."""

    model: int
    name: str


@dataclass
class Relayering:
    """The output tensors of a layer-rebuilding merge and their sources."""

    #: Output tensor names, in the order written.
    names: list[str]
    sources: dict[str, Source]
    #: The slices in output layer numbers (their parameters and their source's).
    slices: list[Slice]
    #: For each output layer, the input layer it is a copy of.
    layer_sources: list[int]
    #: The models' layer count.
    n_in: int

    @property
    def n_layers(self) -> int:
        return len(self.layer_sources)


def renumbered(name: str, index: int) -> str:
    """``name`` with its layer index replaced by ``index``."""
    m = _LAYER.search(name)
    assert m is not None
    return name[: m.start(1)] + str(index) + name[m.end(1) :]


def plan_layers(config: MergeConfig, specs: list[ModelSpec], tensor_names: list[str]) -> Relayering:
    """The output layout of ``config``'s slices over models whose tensors are ``tensor_names``."""
    assert config.slices is not None
    refs = [s.model for s in specs]
    layers: dict[int, list[str]] = {}
    pre, post = [], []
    for name in tensor_names:
        i = layer_index(name)
        if i is None:
            (pre if _PRE.search(name) else post).append(name)
        else:
            layers.setdefault(i, []).append(name)
    n_in = max(layers) + 1 if layers else 0
    sources: dict[str, Source] = {}
    out_slices: list[Slice] = []
    layered: list[str] = []
    layer_sources: list[int] = []
    j = 0
    for k, s in enumerate(config.slices):
        src = s.sources[0]
        start, stop = src.layer_range
        if stop > n_in:
            raise ConfigError(
                f"slice {k} takes layers {start}-{stop} of {src.model!r}, which has {n_in} layers",
                field=f"slices.{k}.sources.0.layer_range",
            )
        model = refs.index(src.model)
        out_slices.append(
            Slice(j, j + stop - start, s.parameters, {src.model: src.parameters} if src.parameters else {})
        )
        for i in range(start, stop):
            for name in layers.get(i, []):
                out = renumbered(name, j)
                sources[out] = Source(model, name)
                layered.append(out)
            layer_sources.append(i)
            j += 1
    first, last = (
        refs.index(config.slices[0].sources[0].model),
        refs.index(config.slices[-1].sources[0].model),
    )
    for name in pre:
        sources[name] = Source(first, name)
    for name in post:
        sources[name] = Source(last, name)
    return Relayering(pre + layered + post, sources, out_slices, layer_sources, n_in)


def relayered_config(model_config: dict[str, Any], layout: Relayering) -> dict[str, Any]:
    """config.json with the output's layer count (and a per-layer ``layer_types`` list rebuilt)."""
    out = dict(model_config)
    for key in LAYER_COUNT_KEYS:
        if key in out:
            out[key] = layout.n_layers
    per_layer = out.get("layer_types")
    if isinstance(per_layer, list) and len(per_layer) == layout.n_in:
        out["layer_types"] = [per_layer[i] for i in layout.layer_sources]
    return out


def write_relayered(plan: MergePlan, folder: Path, device: torch.device, reporter: Reporter) -> list[str]:
    """Stream the output tensors of ``plan.layout`` (each from its one source) into ``folder``."""
    import torch

    from .errors import NumericalError
    from .io.loading import DTYPES
    from .io.lora import open_model
    from .io.writer import ShardedSafetensorsWriter, TensorSpec
    from .methods.base import TensorInputs
    from .pipeline import all_finite

    layout = plan.layout
    assert layout is not None
    method = plan.config.method
    assert method.merge is not None
    cdtype, odtype = DTYPES[plan.config.dtype], DTYPES[plan.config.output_dtype]
    settings = TensorSettings(
        plan.config.parameters,
        [(s.model, s.parameters) for s in plan.specs],
        method.model_parameters,
        layout.slices,
        layout.n_layers,
    )
    with contextlib.ExitStack() as stack, torch.inference_mode():
        cks = [stack.enter_context(open_model(m, plan.options)) for m in plan.models]

        def spec(name: str) -> TensorSpec:
            src = layout.sources[name]
            dtype = cks[src.model].dtype(src.name)
            return TensorSpec(
                name, cks[src.model].shape(src.name), odtype if dtype.is_floating_point else dtype
            )

        writer = stack.enter_context(
            ShardedSafetensorsWriter(folder, [spec(n) for n in layout.names], plan.options.max_shard_size)
        )
        total = len(layout.names)
        reporter.report("write", 0, total)
        for i, name in enumerate(layout.names):
            reporter.check()
            src = layout.sources[name]
            ck = cks[src.model]
            if not ck.dtype(src.name).is_floating_point:
                out = ck.get(src.name)
            else:
                params, per_model = settings.for_tensor(name)
                t = ck.get(src.name, cdtype, device).unsqueeze(0)
                inputs = TensorInputs(name, None, t, [per_model[src.model]], params)
                out = method.merge(inputs).to(odtype)
                if not all_finite(out):
                    raise NumericalError(f"merged tensor {name!r} has NaN or inf values")
            writer.write(name, out)
            del out
            reporter.report("write", i + 1, total, message=name)
        return writer.close()
