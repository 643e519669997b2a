"""Teacher outputs on disk: a content-addressed, size-bounded cache shared by every job of a worker.

An entry holds one expert's outputs on one task's inputs, as a safetensors file: ``logp`` ``[rows, width]``
(the teacher's log-probabilities, full vocabulary or top-k), ``index`` ``[rows, k]`` (top-k token ids, only
with top_k), and in the metadata the layout (each causal example's prompt + greedy continuation and its
scored span). Nothing of it lives on the heap: rows are read with positioned reads when a step needs
them, so the OS page cache does the caching and the process's resident set holds one step's targets.

* **Key**: the SHA-256 of a canonical JSON of everything that determines the outputs (see
  :func:`entry_key`; the caller lists the parts, :func:`expert_identity` and :func:`tokenizer_identity`
  identify the weights and the tokenizer cheaply).
* **Location**: ``EngineOptions.teacher_cache_dir``, else ``$DIVMERGE_TEACHER_CACHE_DIR``, else
  ``$XDG_CACHE_HOME/divmerge/teachers`` (``~/.cache/divmerge/teachers``).
* **Bound**: ``EngineOptions.teacher_cache_bytes``, else ``$DIVMERGE_TEACHER_CACHE_BYTES``, else 16 GiB.
  After an entry is written and when a job lets its entries go, least-recently-used entries are deleted
  until the total fits. An entry in use is never deleted, even if it alone exceeds the bound (``0``
  therefore means "keep nothing after the job").
* **Concurrency**: an entry is written to a temporary file in the same directory, fsynced, then renamed
  into place (atomic on POSIX), so readers never see a partial entry; two workers computing the same key
  both rename a complete file and the last one wins. Users hold a shared ``flock`` on the entry for as
  long as they read it; eviction takes an exclusive non-blocking ``flock`` and skips any entry it cannot
  lock, so an entry in use is never deleted. A reader that opened an entry just as it was evicted sees a
  link count of 0 after locking and treats it as a miss. Temporary files are locked by their writers;
  an unlocked temporary file older than :data:`STALE_TMP_S` (its writer died) is removed by eviction.
  ``flock`` needs a local file system (all ranks of one job and all workers sharing a cache on one node).
* **LRU**: every use touches the entry's mtime; eviction deletes the oldest mtimes first.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..io import safetensors_format as sf
from ..options import EngineOptions

#: Bumped whenever the entry layout or the way teacher outputs are computed changes.
FORMAT_VERSION = 1
ENV_DIR, ENV_BYTES = "DIVMERGE_TEACHER_CACHE_DIR", "DIVMERGE_TEACHER_CACHE_BYTES"
DEFAULT_BYTES = 16 * 1024**3
#: An unlocked temporary file untouched for this long belongs to a dead writer.
STALE_TMP_S = 600.0
_SUFFIX, _TMP = ".teacher.safetensors", ".tmp"


# --- settings ------------------------------------------------------------------------------------------
def cache_dir(options: EngineOptions) -> Path:
    if options.teacher_cache_dir is not None:
        return Path(options.teacher_cache_dir).expanduser()
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "divmerge" / "teachers"


def cache_bytes(options: EngineOptions) -> int:
    if options.teacher_cache_bytes is not None:
        return int(options.teacher_cache_bytes)
    raw = os.environ.get(ENV_BYTES, "").strip()
    if not raw:
        return DEFAULT_BYTES
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{ENV_BYTES} must be a whole number of bytes, got {raw!r}") from None
    if value < 0:
        raise ConfigError(f"{ENV_BYTES} must be >= 0, got {value}")
    return value


# --- identities and keys ---------------------------------------------------------------------------------
def expert_identity(folder: Path, commit: str | None) -> str:
    """What identifies an expert's weights, cheaply.

    A Hub snapshot is its commit SHA (snapshot files are immutable). A local folder is the list of its
    weight files with (size, inode, mtime_ns, ctime_ns): rewriting a file changes its ctime (which no tool
    can set back, unlike the mtime that ``cp -p``/``rsync -a`` preserve), so a changed checkpoint never
    hits an old entry; a touched or copied but identical one merely misses. Hashing the contents instead
    would read the whole checkpoint (seconds to minutes for LLMs) at every job.
    """
    if commit:
        return f"hub:{commit}"
    real = Path(os.path.realpath(folder))
    files = []
    for p in sorted(real.iterdir()):
        if p.is_file() and (p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json")):
            st = p.stat()
            files.append([p.name, st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns])
    return _digest({"folder": str(real), "files": files})


def tokenizer_identity(folder: Path) -> str:
    """SHA-256 over the tokenizer files' contents (small files; special tokens and vocabulary)."""
    h = hashlib.sha256()
    for p in sorted(Path(folder).iterdir()):
        name = p.name
        if p.is_file() and (
            name.startswith(("tokenizer", "special_tokens_map", "vocab", "merges", "added_tokens"))
            or name.endswith((".model", ".tiktoken"))
        ):
            h.update(name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def entry_key(parts: dict[str, Any]) -> str:
    """The entry name for these key parts (JSON-serialisable), format version included."""
    return _digest({"format": FORMAT_VERSION, **parts})


def _digest(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- entries ------------------------------------------------------------------------------------------------
class Entry:
    """One entry opened for reading; holds a shared lock (so it is never evicted) until :meth:`close`."""

    def __init__(self, path: Path, fd: int):
        self.path, self._fd = path, fd
        self._data_start, header = sf.read_header(path)
        self.layout: dict[str, Any] = json.loads(header.pop("__metadata__")["divmerge"])
        self._tensors = header
        self.width = int(header["logp"]["shape"][1])
        self.rows = int(header["logp"]["shape"][0])
        self.top_k = "index" in header

    def read(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows ``lo:hi`` of ``logp`` (and of ``index`` with top-k), as fresh CPU tensors."""
        logp = self._read("logp", lo, hi)
        return logp, (self._read("index", lo, hi) if self.top_k else None)

    def _read(self, name: str, lo: int, hi: int) -> torch.Tensor:
        info = self._tensors[name]
        dtype, width = sf.DTYPES[info["dtype"]], int(info["shape"][1])
        out = torch.empty((hi - lo, width), dtype=dtype)
        row = width * out.element_size()
        pos = self._data_start + info["data_offsets"][0] + lo * row
        got = sf.pread_into(self._fd, out, pos)
        if got < out.numel() * out.element_size():
            raise OSError(f"teacher cache entry truncated at byte {pos + got}")
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # releases the shared lock
            self._fd = -1

    def __del__(self) -> None:
        with contextlib.suppress(OSError):
            self.close()


class EntryWriter:
    """A temporary file with the entry's header and room for every row; rows are written where they go.

    Several processes (the ranks of one job) may :meth:`attach` to the same temporary file and write
    their own rows; one of them then calls :meth:`commit`.
    """

    def __init__(self, path: Path, final: Path, fd: int, header: dict[str, Any], data_start: int):
        self.path, self.final, self._fd = path, final, fd
        self.widths = {name: int(header[name]["shape"][1]) for name in ("logp", "index") if name in header}
        self.dtype = sf.DTYPES[header["logp"]["dtype"]]
        self._offsets = {}  # tensor name -> (first byte, bytes per row)
        for name in ("logp", "index"):
            if name in header:
                info = header[name]
                size = sf.element_size(sf.DTYPES[info["dtype"]])
                self._offsets[name] = (data_start + info["data_offsets"][0], int(info["shape"][1]) * size)

    @classmethod
    def create(
        cls,
        folder: Path,
        key: str,
        *,
        rows: int,
        width: int,
        dtype: torch.dtype,
        top_k: int | None,
        layout: dict[str, Any],
    ) -> EntryWriter:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{key}.{os.getpid()}.{secrets.token_hex(4)}{_TMP}"
        tensors = [("logp", (rows, width), dtype)]
        if top_k is not None:
            tensors.append(("index", (rows, top_k), torch.int32))
        entries, end = sf.layout(tensors)
        raw = sf.encode_header(entries, {"divmerge": json.dumps(layout, separators=(",", ":"))})
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        fcntl.flock(fd, fcntl.LOCK_SH)  # a live writer: eviction leaves the file alone
        sf.pwrite_all(fd, memoryview(raw), 0)
        os.ftruncate(fd, len(raw) + end)
        return cls(tmp, folder / f"{key}{_SUFFIX}", fd, entries, len(raw))

    @classmethod
    def attach(cls, path: Path) -> EntryWriter:
        fd = os.open(path, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_SH)
        data_start, header = sf.read_header(path)
        key = path.name[1:].split(".", 1)[0]
        return cls(path, path.parent / f"{key}{_SUFFIX}", fd, header, data_start)

    def write(self, lo: int, logp: torch.Tensor, index: torch.Tensor | None = None) -> None:
        """Write rows ``lo:lo+len(logp)`` (cast to the entry's dtypes)."""
        for name, value, dtype in (("logp", logp, self.dtype), ("index", index, torch.int32)):
            if value is None:
                continue
            start, row = self._offsets[name]
            if value.dim() != 2 or value.shape[1] != self.widths[name]:
                raise ValueError(
                    f"{name} rows of width {self.widths[name]} expected, got {tuple(value.shape)}"
                )
            value = value.detach().to("cpu", dtype).contiguous()
            sf.pwrite_all(self._fd, sf.tensor_bytes(value), start + lo * row)

    def commit(self) -> None:
        """fsync, then rename into place (atomic); the writer keeps its shared lock (see :meth:`close`)."""
        os.fsync(self._fd)
        os.rename(self.path, self.final)
        with contextlib.suppress(OSError):  # make the rename itself durable
            dfd = os.open(self.final.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def abort(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


# --- the cache --------------------------------------------------------------------------------------------
class TeacherCache:
    """The cache directory: look entries up, write new ones, and keep the total under the bound."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = Path(folder), int(max_bytes)

    @classmethod
    def from_options(cls, options: EngineOptions) -> TeacherCache:
        return cls(cache_dir(options), cache_bytes(options))

    def path(self, key: str) -> Path:
        return self.folder / f"{key}{_SUFFIX}"

    def open(self, key: str) -> Entry | None:
        """The entry for ``key`` with a shared lock held, or None (a miss). Touches it (LRU)."""
        path = self.path(key)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        fcntl.flock(fd, fcntl.LOCK_SH)  # waits out an eviction that holds the exclusive lock
        if os.fstat(fd).st_nlink == 0:  # evicted between our open and our lock
            os.close(fd)
            return None
        with contextlib.suppress(OSError):
            os.utime(fd)
        return Entry(path, fd)

    def create(self, key: str, **layout: Any) -> EntryWriter:
        return EntryWriter.create(self.folder, key, **layout)

    def evict(self) -> int:
        """Delete least-recently-used entries not in use until the total fits; return the bytes freed."""
        if not self.folder.is_dir():
            return 0
        entries, total, freed = [], 0, 0
        now = time.time()
        for p in self.folder.iterdir():
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            if p.name.endswith(_TMP):
                if now - st.st_mtime > STALE_TMP_S and _delete_unless_locked(p):
                    freed += st.st_size
                    continue
                total += st.st_size
            elif p.name.endswith(_SUFFIX):
                entries.append((st.st_mtime, st.st_size, p))
                total += st.st_size
        for _, size, p in sorted(entries):
            if total <= self.max_bytes:
                break
            if _delete_unless_locked(p):
                total -= size
                freed += size
        return freed

    def total_bytes(self) -> int:
        if not self.folder.is_dir():
            return 0
        return sum(p.stat().st_size for p in self.folder.iterdir() if p.name.endswith((_SUFFIX, _TMP)))


def _delete_unless_locked(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # in use
        try:
            if os.stat(path).st_ino != os.fstat(fd).st_ino:
                return False  # replaced by a newer copy since we listed it
        except FileNotFoundError:
            return False
        os.unlink(path)
        return True
    finally:
        os.close(fd)
