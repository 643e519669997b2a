"""Parameter values per tensor, the way mergekit evaluates them.

A setting is a number, a gradient ``[v0, v1, ...]`` or a list of ``{filter, value}`` conditions (the
first whose ``filter`` is unset, ``*`` or a substring of the tensor name applies). A gradient is
interpolated linearly at the tensor's position ``t`` in its layer slice: layer ``i`` of a slice of ``n``
layers has ``t = i / (n - 1)`` (``t = 1`` for a one-layer slice); tensors outside the layers
(embeddings, final norm, head) have ``t = 0``.

A per-model value is looked up in the model's own parameters (of its slice, with ``slices``), then in
the slice's parameters, then in the global ``parameters``, then the method's default; a global value in
the slice's parameters, the global ones, then the default. A condition list that matches nothing falls
through to the next place, as in mergekit.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from .base import Condition

#: ``<prefix>.<layers|layer|h|blocks|block>.<index>.`` in a tensor name.
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
#: Non-layer tensors before the layers (mergekit's ``pre_weights``): they take the first slice's values.
_PRE = re.compile(r"embed|wte|wpe|word_embeddings|position_embeddings|token_type")


def layer_index(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def evaluate(value: Any, tensor_name: str, t: float) -> Any:
    """mergekit's ``evaluate_setting``: the value for this tensor, or None when no condition matches."""
    if isinstance(value, list):
        if value and all(isinstance(v, Condition) for v in value):
            for cond in value:
                if cond.filter is None or cond.filter == "*" or cond.filter in tensor_name:
                    return evaluate(cond.value, tensor_name, t)
            return None
        scaled = t * (len(value) - 1)
        i0 = int(scaled)
        i1 = min(len(value) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * value[i0] + frac * value[i1]
    return value


def _set_values(params: BaseModel | None) -> dict[str, Any]:
    """The parameters written in the config (not the defaults)."""
    if params is None:
        return {}
    return {k: getattr(params, k) for k in params.model_fields_set}


@dataclass
class Slice:
    """Layers ``[start, end)`` with their own (optional) global and per-model parameters."""

    start: int
    end: int
    params: BaseModel | None = None
    #: model reference -> that model's parameters in this slice.
    model_params: dict[str, BaseModel] | None = None


class TensorSettings:
    """Evaluates a method's global and per-model parameters for any tensor name."""

    def __init__(
        self,
        params: BaseModel,
        model_params: Sequence[tuple[str, BaseModel]],
        default_model_params: type[BaseModel],
        slices: list[Slice] | None,
        n_layers: int,
    ):
        self.params = params
        self.model_params = list(model_params)
        self.global_defaults = {k: getattr(params, k) for k in type(params).model_fields}
        self.model_defaults = {
            k: f.default for k, f in default_model_params.model_fields.items() if not f.is_required()
        }
        self.model_keys = list(default_model_params.model_fields)
        self.n_layers = n_layers
        self.slices = slices or [Slice(0, n_layers)]

    def position(self, name: str) -> tuple[Slice, float]:
        """The tensor's slice and its ``t`` in it."""
        index = layer_index(name)
        if index is None:
            return (self.slices[0] if _PRE.search(name) else self.slices[-1]), 0.0
        for s in self.slices:
            if s.start <= index < s.end:
                n = s.end - s.start
                return s, (index - s.start) / (n - 1) if n > 1 else 1.0
        raise ValueError(f"tensor {name!r} (layer {index}) is in no slice")

    def for_tensor(self, name: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """(global values, one dict of per-model values per model) for tensor ``name``."""
        sl, t = self.position(name)
        scopes = [_set_values(sl.params), _set_values(self.params)]
        values = {
            k: self._lookup(k, scopes, name, t, self.global_defaults.get(k)) for k in self.global_defaults
        }
        per_model = []
        for ref, mp in self.model_params:
            own = sl.model_params.get(ref) if sl.model_params is not None else mp
            model_scopes = [_set_values(own), *scopes]
            per_model.append(
                {
                    k: self._lookup(k, model_scopes, name, t, self.model_defaults.get(k))
                    for k in self.model_keys
                }
            )
        return values, per_model

    @staticmethod
    def _lookup(key: str, scopes: list[dict[str, Any]], name: str, t: float, default: Any) -> Any:
        for scope in scopes:
            value = scope.get(key)
            if value is not None:
                value = evaluate(value, name, t)
                if value is not None:
                    return value
        if isinstance(default, list):  # a global default written as a gradient: evaluated the same way
            return evaluate(default, name, t)
        return default
