"""Stage 2 of a learned merge: the one module the forward runs, its tensor slots, and the coefficient groups."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError, IncompatibleModelsError
from ..io.lora import open_model
from ..plan import MergePlan
from .grouping import group_tensors, layer_group
from .reference import CAUSAL, build_module


@dataclass
class MergeModule:
    """A module built from the reference config.json and how the checkpoints' tensors map onto it."""

    module: torch.nn.Module
    #: checkpoint name -> the module's tensor (``.data``), one per tied set.
    slots: dict[str, torch.Tensor]
    #: canonical float tensor names the forward uses (what the coefficients merge), in checkpoint order.
    merged_names: list[str]
    #: tied checkpoint name -> its canonical name.
    aliases: dict[str, str]


def build_merge_module(
    plan: MergePlan, kind: str, dtype: torch.dtype, device: torch.device, tokenizer: Any
) -> MergeModule:
    module = build_module(plan.reference.path, kind, dtype, device)
    if kind != CAUSAL and getattr(module.config, "pad_token_id", None) is None:
        # ...ForSequenceClassification of decoder models finds each sequence's last token by its padding
        module.config.pad_token_id = tokenizer.pad_token_id
    slots, merged, aliases = module_slots(module, plan)
    return MergeModule(module, slots, merged, aliases)


def module_slots(
    module: torch.nn.Module, plan: MergePlan
) -> tuple[dict[str, torch.Tensor], list[str], dict[str, str]]:
    """Map checkpoint names to the module's tensors.

    Returns (name -> module tensor for every checkpoint tensor the module has, canonical float names the
    forward uses (one per tied set), alias -> canonical for tied checkpoint names).
    """
    tensors: dict[str, torch.Tensor] = {}
    named = list(module.named_parameters(remove_duplicate=False)) + list(
        module.named_buffers(remove_duplicate=False)
    )
    for name, t in named:
        tensors[name] = t
    slots = {n: tensors[n].data for n in plan.tensor_names if n in tensors}
    if not slots:
        raise ConfigError("none of the checkpoint's tensor names match the model built from config.json")
    # the first checkpoint name of each tied set is the one passed to functional_call
    chosen: dict[int, str] = {}
    merged: list[str] = []
    aliases: dict[str, str] = {}
    for n in plan.tensor_names:
        if n not in slots or not slots[n].is_floating_point():
            continue
        key = id(tensors[n])
        if key in chosen:
            aliases[n] = chosen[key]
            del slots[n]  # written through its canonical name
            continue
        chosen[key] = n
        merged.append(n)
    covered = {id(tensors[n]) for n in plan.tensor_names if n in tensors}
    uncovered = [name for name, p in module.named_parameters() if id(p) not in covered]
    if uncovered:
        raise IncompatibleModelsError(
            [f"the checkpoints have no tensor for parameter {u!r}" for u in uncovered[:20]]
        )
    return slots, merged, aliases


def coefficient_groups(plan: MergePlan, aliases: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """Groups over the base's float tensors; tied aliases join their canonical tensor's group.

    ``group_of`` covers every float tensor, and (task/layer granularity) the non-float ones as well.
    """
    with open_model(plan.base, plan.options) as base_ck:
        float_names = [n for n in plan.tensor_names if n in base_ck and base_ck.dtype(n).is_floating_point]
    granularity = plan.config.parameters.granularity
    groups, group_of = group_tensors(float_names, granularity)
    for alias, canonical in aliases.items():  # a tied copy follows the tensor the forward actually uses
        if alias in group_of and canonical in group_of:
            group_of[alias] = group_of[canonical]
    used = set(group_of.values())
    groups = [g for g in groups if g in used]
    if granularity != "tensor":
        for n in plan.tensor_names:
            group_of.setdefault(n, _fallback_group(n, granularity, groups))
    return groups, group_of


def _fallback_group(name: str, granularity: str, groups: list[str]) -> str:
    if granularity == "task":
        return groups[0]
    g = layer_group(name)
    return g if g in groups else groups[0]
