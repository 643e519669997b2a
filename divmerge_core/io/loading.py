"""Lazy, safe access to a checkpoint's tensors.

safetensors files are opened with ``safe_open`` and tensors are read one at a time, so a streaming merge
holds only the tensors it is working on. Pickle checkpoints (``*.bin``) are refused unless the caller
allows them, and then loaded with ``torch.load(weights_only=True)``. Quantized checkpoints are refused.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..errors import ModelNotFoundError, UnsafeCheckpointError
from ..options import EngineOptions
from .paths import index_shards
from .safetensors_format import DTYPES as _ST_DTYPES
from .safetensors_format import pread_into, read_header

#: The config's ``dtype``/``out_dtype`` names.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_QUANT_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx", ".absmax", ".quant_map", ".SCB")


class Checkpoint:
    """The weights of one model folder, read lazily. Use as a context manager or call :meth:`close`."""

    def __init__(self, folder: str | Path, options: EngineOptions | None = None):
        self.folder = Path(folder)
        self.options = options or EngineOptions()
        self.config = read_model_config(self.folder)
        if self.config.get("quantization_config"):
            method = self.config["quantization_config"].get("quant_method", "unknown")
            raise UnsafeCheckpointError(
                f"model {str(self.folder)!r} is quantized ({method}); merge the full-precision checkpoints instead"
            )
        self._handles: dict[str, Any] = {}
        self._headers: dict[str, tuple[int, dict[str, Any]]] = {}  # file -> (data start, header)
        self._where: dict[str, str] = {}  # tensor name -> file name
        self._pickled: dict[str, torch.Tensor] | None = None
        self._fds: dict[str, int] = {}  # file name -> descriptor for positioned reads, opened on first use
        files = _safetensors_files(self.folder)
        if files:
            for fname in files:
                handle = safe_open(str(self.folder / fname), framework="pt")
                self._handles[fname] = handle
                self._headers[fname] = read_header(self.folder / fname)
                for name in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                    self._where[name] = fname
        else:
            self._pickled = self._load_pickle()
            self._where = {name: "pickle" for name in self._pickled}
        bad = [n for n in self._where if n.endswith(_QUANT_SUFFIXES)]
        if bad:
            raise UnsafeCheckpointError(
                f"model {str(self.folder)!r} holds quantized tensors (e.g. {bad[0]!r}); merge full-precision weights"
            )

    # --- tensor access -------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        if self._pickled is not None:
            return tuple(self._pickled[name].shape)
        info = self._headers[self._where[name]][1].get(name)
        if info is not None:
            return tuple(info["shape"])
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        if self._pickled is not None:
            return self._pickled[name].dtype
        info = self._headers[self._where[name]][1].get(name)
        if info is not None and info["dtype"] in _ST_DTYPES:
            return _ST_DTYPES[info["dtype"]]
        return _ST_DTYPES[self._handles[self._where[name]].get_slice(name).get_dtype()]

    def get(
        self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
    ) -> torch.Tensor:
        t = self._pickled[name] if self._pickled is not None else self._read(name)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.to(device)

    def get_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Read tensor ``name`` into ``out`` (same shape; cast to its dtype and device); return ``out``.

        When ``out`` is a contiguous CPU tensor of the stored dtype the bytes are read straight into it
        (no intermediate buffer), e.g. into one row of a stacked ``[K, ...]`` tensor.
        """
        if self._pickled is None and out.device.type == "cpu" and out.is_contiguous():
            info = self._headers[self._where[name]][1].get(name)
            if info is not None and _ST_DTYPES.get(info["dtype"]) == out.dtype:
                if tuple(info["shape"]) != tuple(out.shape):
                    raise ValueError(
                        f"tensor {name!r}: stored shape {info['shape']}, asked {tuple(out.shape)}"
                    )
                self._read_bytes(name, info, out)
                return out
        src = self.get(name)
        with torch.no_grad():
            out.copy_(src.reshape(out.shape))
        return out

    def _read(self, name: str) -> torch.Tensor:
        """Read one tensor with plain positioned reads into a fresh (uninitialised) tensor.

        ``safe_open`` memory-maps the file, and every page a merge touches then stays in the process's
        resident set until the file is closed: a streaming merge of K models would show K models' worth of
        RSS. A plain read keeps resident memory at the tensors actually alive.
        """
        fname = self._where[name]
        info = self._headers[fname][1].get(name)
        dtype = _ST_DTYPES.get(info["dtype"]) if info else None
        if dtype is None:  # a dtype we do not map (fp8, ...): let safetensors decode it
            return self._handles[fname].get_tensor(name)
        out = torch.empty(tuple(info["shape"]), dtype=dtype)
        self._read_bytes(name, info, out)
        return out

    def _read_bytes(self, name: str, info: dict[str, Any], out: torch.Tensor) -> None:
        """``os.preadv`` the tensor's bytes into the contiguous CPU tensor ``out`` (one call, usually)."""
        fname = self._where[name]
        begin, end = info["data_offsets"]
        size = end - begin
        if out.numel() * out.element_size() != size:
            raise ModelNotFoundError(f"{str(self.folder / fname)!r}: tensor {name!r} has a bad byte size")
        if size == 0:
            return
        fd = self._fds.get(fname)
        if fd is None:
            fd = self._fds[fname] = os.open(self.folder / fname, os.O_RDONLY)
        if pread_into(fd, out, self._headers[fname][0] + begin) < size:
            raise ModelNotFoundError(f"{str(self.folder / fname)!r} is truncated (tensor {name!r})")

    def state_dict(
        self, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
    ) -> dict[str, torch.Tensor]:
        return {n: self.get(n, dtype, device) for n in self.names}

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._handles.clear()
        self._pickled = None

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- pickle ----------------------------------------------------------------------------------
    def _load_pickle(self) -> dict[str, torch.Tensor]:
        bins = _pickle_files(self.folder)
        if not bins:
            raise ModelNotFoundError(f"no weights found in {str(self.folder)!r} (expected *.safetensors)")
        if not self.options.allow_pickle:
            raise UnsafeCheckpointError(
                f"model {str(self.folder)!r} has only pickle weights ({bins[0]}); pickle files can run code when "
                "loaded, so they are refused. Convert the model to safetensors, or enable allow_pickle "
                "(then loaded with torch.load(weights_only=True))"
            )
        state: dict[str, torch.Tensor] = {}
        for fname in bins:
            try:
                part = torch.load(self.folder / fname, map_location="cpu", weights_only=True, mmap=True)
            except Exception as err:  # noqa: BLE001 - torch raises many types for a bad pickle
                raise UnsafeCheckpointError(f"cannot load {fname!r} safely: {err}") from None
            state.update(part)
        return state


def read_model_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelNotFoundError(f"{str(folder)!r} is not a Hugging Face model folder (no config.json)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(f"cannot read {str(path)!r}: {err}") from None


def _safetensors_files(folder: Path) -> list[str]:
    if (folder / "model.safetensors.index.json").is_file():
        files = index_shards(folder, "model.safetensors.index.json")
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise ModelNotFoundError(f"{str(folder)!r}: shard {missing[0]!r} named in the index is missing")
        return files
    if (folder / "model.safetensors").is_file():
        return ["model.safetensors"]
    return sorted(p.name for p in folder.glob("*.safetensors"))


def _pickle_files(folder: Path) -> list[str]:
    if (folder / "pytorch_model.bin.index.json").is_file():
        return index_shards(folder, "pytorch_model.bin.index.json")
    return sorted(p.name for p in folder.glob("*.bin") if p.name != "training_args.bin")
