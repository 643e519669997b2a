"""LoRA adapters as merge inputs: ``base + B·A × scale``, computed tensor by tensor while streaming.

An adapter folder in peft's format (``adapter_config.json`` + ``adapter_model.safetensors``) is read
directly (peft is not needed). :class:`LoraCheckpoint` looks like a :class:`~.loading.Checkpoint` of the
merged expert: it has the base's tensor names, shapes and dtypes, and reading a tensor the adapter targets
reads the base tensor and adds that module's low-rank delta (in float32, rounded to the base's stored
dtype, as peft's ``merge_and_unload`` and mergekit's ``--lora-merge-cache`` store it). Full tensors the
adapter holds (``modules_to_save``, ``bias: all``, saved embedding layers) replace the base's. No full
copy of the expert is ever made: only the tensor being read and its two factors are alive.

Supported: ``peft_type: LORA`` on linear layers (``fan_in_fan_out`` included: GPT-2's Conv1D) and on
embeddings, ``lora_alpha / r`` or, with ``use_rslora``, ``lora_alpha / sqrt(r)``, ``rank_pattern`` and
``alpha_pattern``. Everything else (DoRA, LoRA biases, trainable tokens, convolutions, ...) is refused
with a message naming the adapter and the field.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import IncompatibleModelsError, ModelNotFoundError, UnsupportedAdapterError
from ..options import EngineOptions
from .loading import Checkpoint
from .refs import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter_config

_PREFIX = "base_model.model."

#: adapter_config.json fields that change what the adapter computes, refused when set (truthy).
_REFUSED = {
    "use_dora": "DoRA adapters (use_dora) are not supported; merge them with peft first",
    "lora_bias": "LoRA biases on lora_B (lora_bias) are not supported",
    "trainable_token_indices": "trainable token adapters (trainable_token_indices) are not supported",
    "layer_replication": "layer replication (layer_replication) is not supported",
    "use_qalora": "QA-LoRA adapters (use_qalora) are not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "target_parameters": "LoRA on parameters (target_parameters) is not supported",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not supported",
}


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's rank_pattern/alpha_pattern lookup: the first key matching the module name's end."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass(frozen=True)
class _Delta:
    a: str  # adapter tensor names
    b: str
    scale: float
    embedding: bool
    fan_in_fan_out: bool


class LoraAdapter:
    """An adapter folder, parsed and checked against the base checkpoint it applies to."""

    def __init__(self, folder: Path, label: str, base: Checkpoint):
        from safetensors import safe_open

        self.folder, self.label = Path(folder), label
        config = read_adapter_config(self.folder, label)
        kind = config.get("peft_type", "LORA")
        if str(kind).upper() != "LORA":
            raise UnsupportedAdapterError(
                f"adapter {label!r}: peft_type {kind!r} is not supported (only LORA)"
            )
        for key, why in _REFUSED.items():
            if config.get(key):
                raise UnsupportedAdapterError(f"adapter {label!r}: {why}")
        weights = self.folder / ADAPTER_WEIGHTS
        if not weights.is_file():
            if (self.folder / "adapter_model.bin").is_file():
                raise UnsupportedAdapterError(
                    f"adapter {label!r} has only pickle weights (adapter_model.bin); convert it to safetensors"
                )
            raise ModelNotFoundError(f"adapter {label!r} has no {ADAPTER_WEIGHTS}")
        self._file = safe_open(str(weights), framework="pt")
        keys = list(self._file.keys())  # noqa: SIM118 - safe_open handles are not iterable
        r0, alpha0 = config.get("r", 8), config.get("lora_alpha", 8)
        rslora, fifo = bool(config.get("use_rslora")), bool(config.get("fan_in_fan_out"))
        rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
        #: base tensor name -> its delta, and -> the adapter tensor replacing it.
        self.deltas: dict[str, _Delta] = {}
        self.full: dict[str, str] = {}
        factors: dict[str, dict[str, str]] = {}
        for key in keys:
            name = key[len(_PREFIX) :] if key.startswith(_PREFIX) else key
            m = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight|(.+)\.(lora_embedding_A|lora_embedding_B)", name)
            if m:
                module, part = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
                factors.setdefault(module, {})[part] = key
                continue
            if ".lora_" in name or "lora_magnitude" in name:
                raise UnsupportedAdapterError(f"adapter {label!r}: tensor {key!r} is of a kind not supported")
            target = name.replace(".modules_to_save.default.", ".").replace(".modules_to_save.", ".")
            target = target.replace(".base_layer.", ".")
            self.full[self._base_name(target, key, base)] = key
        for module, parts in factors.items():
            emb = "lora_embedding_A" in parts or "lora_embedding_B" in parts
            a, b = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A", "lora_B")
            if a not in parts or b not in parts:
                raise UnsupportedAdapterError(f"adapter {label!r}: module {module!r} has only one of {a}/{b}")
            target = self._base_name(f"{module}.weight", parts[a], base)
            sa, sb = self._shape(parts[a]), self._shape(parts[b])
            if len(sa) != 2 or len(sb) != 2:
                raise UnsupportedAdapterError(
                    f"adapter {label!r}: module {module!r} is not a linear or embedding layer "
                    "(convolution LoRA is not supported)"
                )
            rank = sa[0]
            want = (sa[1], sb[0]) if emb else (sb[0], sa[1])
            if fifo and not emb:
                want = want[::-1]
            if sb[1] != rank or tuple(base.shape(target)) != want:
                raise IncompatibleModelsError(
                    [
                        f"adapter {label!r}: module {module!r} (lora A {list(sa)}, B {list(sb)}) does not fit "
                        f"the base tensor {target!r} of shape {list(base.shape(target))}"
                    ]
                )
            r = _pattern_value(rank_pattern, module, r0)
            if r != rank:
                raise UnsupportedAdapterError(
                    f"adapter {label!r}: module {module!r} has rank {rank}, adapter_config.json says r={r}"
                )
            alpha = _pattern_value(alpha_pattern, module, alpha0)
            scale = alpha / math.sqrt(rank) if rslora else alpha / rank
            self.deltas[target] = _Delta(parts[a], parts[b], float(scale), emb, fifo and not emb)
        for target, key in self.full.items():
            if self._shape(key) != tuple(base.shape(target)):
                raise IncompatibleModelsError(
                    [
                        f"adapter {label!r}: tensor {key!r} has shape {list(self._shape(key))}, "
                        f"the base's {target!r} {list(base.shape(target))}"
                    ]
                )
        if not self.deltas and not self.full:
            raise UnsupportedAdapterError(f"adapter {label!r} holds no LoRA tensors")

    def _shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(key).get_shape())

    def _base_name(self, target: str, key: str, base: Checkpoint) -> str:
        if target not in base:
            raise IncompatibleModelsError(
                [f"adapter {self.label!r}: tensor {key!r} targets {target!r}, which the base model has not"]
            )
        return target

    def delta(self, name: str) -> torch.Tensor:
        """The float32 ``B·A × scale`` of base tensor ``name`` (in the base tensor's layout)."""
        d = self.deltas[name]
        a = self._file.get_tensor(d.a).float()
        b = self._file.get_tensor(d.b).float()
        out = b @ a
        if d.embedding or d.fan_in_fan_out:
            out = out.T
        return out.mul_(d.scale)

    def factors(
        self, name: str, device: str | torch.device = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor, float, bool]:
        """``(A, B, scale, transposed)`` of base tensor ``name``, A and B in float32 on ``device``: its delta is
        ``scale * B @ A``, transposed (``.T``) when ``transposed`` (embeddings, ``fan_in_fan_out``), exactly
        what :meth:`delta` forms."""
        d = self.deltas[name]
        a = self._file.get_tensor(d.a).to(device).float()
        b = self._file.get_tensor(d.b).to(device).float()
        return a, b, d.scale, d.embedding or d.fan_in_fan_out

    def factor_numel(self, name: str) -> int:
        """Elements of tensor ``name``'s two factors (read from the header only)."""
        d = self.deltas[name]
        return math.prod(self._shape(d.a)) + math.prod(self._shape(d.b))

    def tensor(self, name: str) -> torch.Tensor:
        return self._file.get_tensor(self.full[name])

    def close(self) -> None:
        self._file = None


class LoraCheckpoint:
    """The expert ``base + adapter``, read like a :class:`~.loading.Checkpoint` (same tensor names)."""

    def __init__(self, base_folder: Path, adapter_folder: Path, label: str, options: EngineOptions):
        self.base = Checkpoint(base_folder, options)
        try:
            self.adapter = LoraAdapter(adapter_folder, label, self.base)
        except BaseException:
            self.base.close()
            raise
        self.folder, self.options, self.config = self.base.folder, options, self.base.config

    @property
    def names(self) -> list[str]:
        return self.base.names

    def __contains__(self, name: str) -> bool:
        return name in self.base

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.base.dtype(name)

    def _merged(self, name: str) -> torch.Tensor | None:
        """The expert's tensor in the stored dtype, None when the adapter leaves it as the base's."""
        if name in self.adapter.full:
            t = self.adapter.tensor(name).to(self.base.dtype(name))
            if name not in self.adapter.deltas:
                return t
        elif name in self.adapter.deltas:
            t = self.base.get(name)
        else:
            return None
        stored = t.dtype
        return (t.float() + self.adapter.delta(name)).to(stored)

    def get(
        self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
    ) -> torch.Tensor:
        t = self._merged(name)
        if t is None:
            return self.base.get(name, dtype, device)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.to(device)

    def get_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        t = self._merged(name)
        if t is None:
            return self.base.get_into(name, out)
        with torch.no_grad():
            out.copy_(t.reshape(out.shape))
        return out

    def state_dict(
        self, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
    ) -> dict[str, torch.Tensor]:
        return {n: self.get(n, dtype, device) for n in self.names}

    def close(self) -> None:
        self.adapter.close()
        self.base.close()

    def __enter__(self) -> LoraCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_model(model: Any, options: EngineOptions | None = None) -> Checkpoint | LoraCheckpoint:
    """Open a resolved model's weights: a folder (``Path``) or a ``ResolvedModel``, whose ``adapter``
    (when set) is applied over the base folder ``path``."""
    options = options or EngineOptions()
    adapter = getattr(model, "adapter", None)
    if adapter is None:
        return Checkpoint(getattr(model, "path", model), options)
    return LoraCheckpoint(model.path, adapter.path, adapter.raw, options)


def adapter_identity(adapter: Any) -> str:
    """What identifies an adapter's weights cheaply (for caches keyed on an expert): its Hub commit, else
    its folder's adapter files with (size, inode, mtime_ns, ctime_ns)."""
    if adapter.commit:
        return f"hub:{adapter.commit}"
    real = Path(os.path.realpath(adapter.path))
    files = []
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        with contextlib.suppress(OSError):
            st = (real / name).stat()
            files.append([name, st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns])
    text = json.dumps({"folder": str(real), "files": files}, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
