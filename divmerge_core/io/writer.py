"""A streaming, sharded safetensors writer.

Every output tensor's name, shape and dtype is known before the merge starts (from the input headers),
so the whole shard layout is planned up front: each file gets its header written first and its size
fixed, then each tensor's bytes are written at their offset as soon as the tensor is produced. The
writer never holds more than the tensor it is given, so peak memory stays near the few tensors the
merge works on, never the model.

File names and the index follow Hugging Face's conventions: ``model.safetensors`` for one shard, else
``model-00001-of-0000N.safetensors`` plus ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from .safetensors_format import element_size, encode_header, layout, nbytes, tensor_bytes

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return nbytes(self.shape, self.dtype)


@dataclass
class _Shard:
    file: str
    specs: list[TensorSpec]
    offsets: dict[str, tuple[int, int]]
    header: bytes  # the length prefix and the padded JSON header
    handle: BinaryIO | None = None
    remaining: int = 0

    @property
    def data_start(self) -> int:
        return len(self.header)

    @property
    def size(self) -> int:
        return self.data_start + sum(e - b for b, e in self.offsets.values())


def plan_shards(specs: list[TensorSpec], max_shard_size: int) -> list[list[TensorSpec]]:
    """Greedy, in order: start a new shard when the next tensor would push this one past the limit.

    A tensor larger than the limit gets a shard of its own (as transformers does).
    """
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _header(specs: list[TensorSpec], metadata: dict[str, str]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    # Larger element sizes first, so that every tensor starts at an offset aligned to its element size
    # (the data section starts 8-byte aligned because the header is padded to 8 bytes).
    ordered = sorted(specs, key=lambda s: -element_size(s.dtype))
    entries, _ = layout((s.name, s.shape, s.dtype) for s in ordered)
    offsets = {name: tuple(e["data_offsets"]) for name, e in entries.items()}
    return encode_header(entries, metadata), offsets


class ShardedSafetensorsWriter:
    """Write ``specs`` into ``folder`` in any order, one tensor at a time. Call :meth:`close` at the end."""

    def __init__(
        self,
        folder: str | Path,
        specs: list[TensorSpec],
        max_shard_size: int,
        metadata: dict[str, str] | None = None,
    ):
        if max_shard_size <= 0:
            raise ValueError("max_shard_size must be positive")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names")
        self.folder = Path(folder)
        self._specs = {s.name: s for s in specs}
        self._written: set[str] = set()
        self._closed = False
        groups = plan_shards(list(specs), max_shard_size)
        n = len(groups)
        self._shards: list[_Shard] = []
        self._shard_of: dict[str, _Shard] = {}
        meta = {"format": "pt", **(metadata or {})}
        for i, group in enumerate(groups):
            fname = SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            header, offsets = _header(group, meta)
            shard = _Shard(fname, group, offsets, header, remaining=len(group))
            self._shards.append(shard)
            for spec in group:
                self._shard_of[spec.name] = shard
        try:
            for shard in self._shards:
                self._open(shard)
        except BaseException:
            self.abort()
            raise

    @property
    def files(self) -> list[str]:
        out = [s.file for s in self._shards]
        return out if len(out) == 1 else [*out, INDEX_FILE]

    def _open(self, shard: _Shard) -> None:
        handle = open(self.folder / shard.file, "wb")  # noqa: SIM115 - closed when its last tensor lands
        handle.write(shard.header)
        handle.truncate(shard.size)
        shard.handle = handle
        if shard.remaining == 0:
            self._close_shard(shard)

    def _close_shard(self, shard: _Shard) -> None:
        if shard.handle is not None:
            shard.handle.close()
            shard.handle = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self._specs.get(name)
        if spec is None:
            raise KeyError(f"tensor {name!r} is not in the planned layout")
        if name in self._written:
            raise ValueError(f"tensor {name!r} was already written")
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(
                f"tensor {name!r}: got {tuple(tensor.shape)} {tensor.dtype}, planned {spec.shape} {spec.dtype}"
            )
        shard = self._shard_of[name]
        begin, end = shard.offsets[name]
        data = tensor_bytes(tensor)
        assert data.nbytes == end - begin
        assert shard.handle is not None
        shard.handle.seek(shard.data_start + begin)
        shard.handle.write(data)
        self._written.add(name)
        shard.remaining -= 1
        if shard.remaining == 0:
            self._close_shard(shard)

    def close(self) -> list[str]:
        """Check every tensor was written, write the index (if sharded); return the files written."""
        if self._closed:
            return self.files
        for shard in self._shards:
            self._close_shard(shard)
        missing = [n for n in self._specs if n not in self._written]
        if missing:
            raise RuntimeError(f"{len(missing)} tensor(s) were never written, e.g. {missing[0]!r}")
        if len(self._shards) > 1:
            index = {
                "metadata": {"total_size": sum(s.nbytes for s in self._specs.values())},
                "weight_map": {n: self._shard_of[n].file for n in self._specs},
            }
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        self._closed = True
        return self.files

    def abort(self) -> None:
        """Close the files without checks (the caller removes the folder)."""
        for shard in self._shards:
            self._close_shard(shard)

    def __enter__(self) -> ShardedSafetensorsWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
