"""The safetensors file format, written once: dtype names, the header (its encoding and 8-byte padding)
and the positioned reads and writes of raw tensor bytes.

A file is an 8-byte little-endian header length, a JSON header ``{"__metadata__": {str: str}, name:
{"dtype", "shape", "data_offsets": [begin, end]}}`` padded with spaces to a multiple of 8 bytes, then the
data section (offsets are relative to its start).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

#: safetensors dtype name -> torch dtype (the dtypes the engine reads and writes itself; any other, e.g.
#: fp8, is left to the safetensors library)
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
#: torch dtype -> safetensors dtype name
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
#: the header is padded to this many bytes, so the data section (and, with the tensors ordered by
#: decreasing element size, every tensor) starts aligned
ALIGNMENT = 8
METADATA = "__metadata__"


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * element_size(dtype)


def tensor_entry(dtype: torch.dtype, shape: Sequence[int], begin: int, end: int) -> dict[str, Any]:
    """One tensor's header entry."""
    return {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [begin, end]}


def layout(
    tensors: Iterable[tuple[str, Sequence[int], torch.dtype]],
) -> tuple[dict[str, dict[str, Any]], int]:
    """Header entries for ``(name, shape, dtype)`` placed back to back in the given order, and the data
    section's size."""
    entries: dict[str, dict[str, Any]] = {}
    pos = 0
    for name, shape, dtype in tensors:
        size = nbytes(shape, dtype)
        entries[name] = tensor_entry(dtype, shape, pos, pos + size)
        pos += size
    return entries, pos


def encode_header(entries: Mapping[str, Mapping[str, Any]], metadata: Mapping[str, str] | None) -> bytes:
    """The file's first bytes: the length prefix and the compact JSON header, padded; the data section
    starts right after them (at ``len(result)``)."""
    header: dict[str, Any] = {METADATA: dict(metadata or {})}
    header.update(entries)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % ALIGNMENT)
    return len(raw).to_bytes(8, "little") + raw


def read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(offset of the data section, parsed JSON header) of a safetensors file."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return 8 + size, json.loads(f.read(size))


def pread_into(fd: int, out: torch.Tensor, pos: int) -> int:
    """Fill the contiguous CPU tensor ``out`` with the bytes of ``fd`` from ``pos`` (``os.preadv``, repeated
    until full); returns the bytes read, fewer than ``out``'s size only when the file ends first."""
    size = out.numel() * out.element_size()
    if size == 0:
        return 0
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
    got = 0
    while got < size:
        n = os.preadv(fd, [view[got:]], pos + got)
        if not n:
            break
        got += n
    return got


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes as stored (a CPU, contiguous copy when needed)."""
    return memoryview(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())


def pwrite_all(fd: int, view: memoryview, pos: int) -> None:
    """``os.pwrite`` all of ``view`` at ``pos`` (repeated until written)."""
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], pos + done)
