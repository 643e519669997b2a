"""Coefficient groups: which tensors share one learned coefficient per task.

* ``task``: one group ``"all"``.
* ``layer``: one group per transformer block (named by the block's prefix, e.g.
  ``bert.encoder.layer.3``), plus ``embeddings``, ``final_norm`` and ``head``
  (lm_head/classifier/score/pooler); any other tensor is grouped by its parent module path.
* ``tensor``: one group per tensor (named like the tensor).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

#: ``...layer.3.``, ``...layers.3.``, ``...h.3.``, ``...blocks.3.``, ``...block.3.`` (the last index wins
#: only for nested blocks, so ``encoder.block.0.layer.1.x`` stays in ``encoder.block.0``).
_BLOCK = re.compile(r"^(.*?(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+))\.")
_HEAD = {"lm_head", "classifier", "score", "pooler", "cls", "qa_outputs", "head", "heads", "embed_out"}
_EMBED = re.compile(r"(^|\.)(embeddings?|wte|wpe|embed_tokens|embed_positions|word_embeddings)(\.|$)")
_FINAL_NORM = re.compile(r"(^|\.)(ln_f|norm|norm_f|final_layer_norm|final_layernorm|final_norm|ln_final)\.")

EMBEDDINGS, FINAL_NORM, HEAD, ALL = "embeddings", "final_norm", "head", "all"


def layer_group(name: str) -> str:
    """The layer-granularity group of a tensor name."""
    m = _BLOCK.match(name)
    if m:
        return m.group(1)
    parts = name.split(".")
    if any(p in _HEAD for p in parts[:-1]):
        return HEAD
    if _EMBED.search(name):
        return EMBEDDINGS
    if _FINAL_NORM.search(name):
        return FINAL_NORM
    return ".".join(parts[:-1]) or name


def _layer_order(group: str) -> tuple:
    if group == EMBEDDINGS:
        return (0,)
    if group == FINAL_NORM:
        return (3,)
    if group == HEAD:
        return (4,)
    m = re.match(r"^(.*)\.(\d+)$", group)
    if m and _BLOCK.match(group + "."):
        return (1, m.group(1), int(m.group(2)))
    return (2, group)


def group_tensors(names: Iterable[str], granularity: str) -> tuple[list[str], dict[str, str]]:
    """Return the ordered group list and the tensor-name -> group map for ``names``."""
    names = list(names)
    if granularity == "task":
        return [ALL], dict.fromkeys(names, ALL)
    if granularity == "tensor":
        return list(names), {n: n for n in names}
    if granularity != "layer":
        raise ValueError(f"unknown granularity {granularity!r}")
    group_of = {n: layer_group(n) for n in names}
    groups = sorted(set(group_of.values()), key=_layer_order)
    return groups, group_of
