"""Activation memory: gradient checkpointing of the module's layers under ``functional_call``.

transformers' own checkpointing runs only in training mode (which would turn dropout on), and its
recomputation in backward would see the module's own tensors rather than the merged weights passed to
``functional_call``. Here each layer's forward is wrapped in ``torch.utils.checkpoint`` with that layer's
merged weights passed in explicitly, so the recomputation uses the same weights and the gradient still
reaches Gamma.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError


def checkpointed_layers(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The module's repeated blocks (transformers' ``GradientCheckpointingLayer``s), with their names."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # older transformers have no common layer class
        layers = []
    else:
        layers = [(n, m) for n, m in module.named_modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ConfigError(
            f"gradient_checkpointing: {type(module).__name__} has no layers that can be checkpointed",
            field="parameters.gradient_checkpointing",
        )
    return layers


def enable_checkpointing(module: torch.nn.Module, current: Callable[[], dict[str, torch.Tensor]]) -> None:
    """Wrap every layer's forward; ``current()`` returns the weights of the forward under way (full names)."""
    for prefix, layer in checkpointed_layers(module):
        _wrap(layer, prefix + ".", current)


def _wrap(layer: torch.nn.Module, prefix: str, current: Callable[[], dict[str, torch.Tensor]]) -> None:
    plain = layer.forward
    inner = [False]

    def run(weights: dict[str, torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        inner[0] = True
        try:
            return functional_call(layer, weights, args, kwargs, strict=False)
        finally:
            inner[0] = False

    def forward(*args: Any, **kwargs: Any) -> Any:
        if inner[0] or not torch.is_grad_enabled():
            return plain(*args, **kwargs)
        weights = {n[len(prefix) :]: w for n, w in current().items() if n.startswith(prefix)}
        return checkpoint(run, weights, *args, use_reentrant=False, **kwargs)

    layer.forward = forward
