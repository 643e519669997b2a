"""The teacher cache on its own: entries, atomic publication, LRU eviction, in-use protection, identities."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from divmerge_core.errors import ConfigError
from divmerge_core.learned.teacher_cache import (
    STALE_TMP_S,
    EntryWriter,
    TeacherCache,
    cache_bytes,
    cache_dir,
    entry_key,
    expert_identity,
)
from divmerge_core.options import EngineOptions

ROOT = Path(__file__).resolve().parents[1]


def write_entry(cache: TeacherCache, key: str, rows: int = 8, width: int = 16, **kw) -> torch.Tensor:
    logp = torch.log_softmax(torch.randn(rows, width, generator=torch.Generator().manual_seed(rows)), -1)
    w = cache.create(
        key, rows=rows, width=width, dtype=kw.get("dtype", torch.float32), top_k=None, layout={"n": rows}
    )
    w.write(0, logp)
    w.commit()
    w.close()
    return logp


def test_entry_round_trip_and_atomic_publication(tmp_path):
    cache = TeacherCache(tmp_path, 1 << 30)
    key = entry_key({"x": 1})
    logp = torch.log_softmax(torch.randn(5, 7), -1)
    index = torch.randint(0, 1000, (5, 3))
    w = cache.create(key, rows=5, width=7, dtype=torch.float32, top_k=3, layout={"kind": "t"})
    w.write(3, logp[3:], index[3:])  # rows land where they go, in any order
    w.write(0, logp[:3], index[:3])
    assert cache.open(key) is None  # not visible before commit
    assert [p.name for p in tmp_path.iterdir()] == [w.path.name]
    with pytest.raises(ValueError, match="width 7"):
        w.write(0, logp[:, :6])
    w.commit()
    w.close()
    assert [p.name for p in tmp_path.iterdir()] == [f"{key}.teacher.safetensors"]
    entry = cache.open(key)
    assert entry.layout == {"kind": "t"} and entry.rows == 5 and entry.top_k
    got, got_index = entry.read(1, 4)
    assert torch.equal(got, logp[1:4]) and torch.equal(got_index.long(), index[1:4])
    entry.close()
    from safetensors import safe_open  # a plain safetensors file

    with safe_open(str(cache.path(key)), "pt") as f:
        assert torch.equal(f.get_tensor("logp"), logp)

    bf = entry_key({"x": 2})
    w = cache.create(bf, rows=5, width=7, dtype=torch.bfloat16, top_k=None, layout={})
    w.write(0, logp)
    w.commit()
    w.close()
    got, none = cache.open(bf).read(0, 5)
    assert got.dtype == torch.bfloat16 and none is None and torch.equal(got, logp.to(torch.bfloat16))


def test_lru_eviction_keeps_entries_in_use(tmp_path):
    cache = TeacherCache(tmp_path, 0)
    keys = [entry_key({"i": i}) for i in range(4)]
    for i, k in enumerate(keys):
        write_entry(cache, k)
        os.utime(cache.path(k), (1000 + i, 1000 + i))  # k0 oldest
    size = cache.path(keys[0]).stat().st_size
    cache.max_bytes = 2 * size
    held = cache.open(keys[0])  # the oldest, but in use (open() also touches it: make it oldest again)
    os.utime(cache.path(keys[0]), (900, 900))
    assert cache.evict() == 2 * size
    left = sorted(p.name.split(".")[0] for p in tmp_path.iterdir())
    assert left == sorted([keys[0], keys[3]])  # k1, k2 went; k0 is in use, k3 the most recent
    cache.open(keys[3]).close()  # a hit touches the entry: now the most recently used
    held.close()
    cache.max_bytes = size
    cache.evict()
    assert [p.name.split(".")[0] for p in tmp_path.iterdir()] == [keys[3]]
    cache.max_bytes = 0
    cache.evict()
    assert list(tmp_path.iterdir()) == []


def test_eviction_from_another_process_skips_an_entry_in_use(tmp_path):
    cache = TeacherCache(tmp_path, 0)
    keys = [entry_key({"i": i}) for i in range(2)]
    for k in keys:
        write_entry(cache, k)
    held = cache.open(keys[0])
    code = f"from divmerge_core.learned.teacher_cache import TeacherCache; TeacherCache({str(tmp_path)!r}, 0).evict()"
    subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert [p.name.split(".")[0] for p in tmp_path.iterdir()] == [keys[0]]
    assert held.read(0, 2)[0].shape == (2, 16)
    held.close()


def test_stale_temporary_files_go_live_ones_stay(tmp_path):
    cache = TeacherCache(tmp_path, 0)
    live = cache.create("a" * 64, rows=2, width=2, dtype=torch.float32, top_k=None, layout={})
    dead = cache.create("b" * 64, rows=2, width=2, dtype=torch.float32, top_k=None, layout={})
    dead.close()  # its writer is gone: no lock
    fresh = cache.create("c" * 64, rows=2, width=2, dtype=torch.float32, top_k=None, layout={})
    fresh.close()
    old = time.time() - STALE_TMP_S - 10
    for w in (live, dead):
        os.utime(w.path, (old, old))
    cache.evict()
    assert live.path.exists() and fresh.path.exists() and not dead.path.exists()
    live.abort()


def test_ranks_write_one_entry_through_attach(tmp_path):
    cache = TeacherCache(tmp_path, 1 << 30)
    key = entry_key({"ranks": 2})
    logp = torch.log_softmax(torch.randn(6, 4), -1)
    w0 = cache.create(key, rows=6, width=4, dtype=torch.float32, top_k=None, layout={})
    w1 = EntryWriter.attach(w0.path)
    w0.write(0, logp[0::2][:1])
    for r in (1, 3, 5):
        w1.write(r, logp[r : r + 1])
    for r in (2, 4):
        w0.write(r, logp[r : r + 1])
    w1.close()
    w0.commit()
    w0.close()
    assert torch.equal(cache.open(key).read(0, 6)[0], logp)


def test_concurrent_writers_of_one_key_leave_one_complete_entry(tmp_path):
    code = (
        "import sys, torch; from divmerge_core.learned.teacher_cache import TeacherCache\n"
        "c = TeacherCache(sys.argv[1], 1 << 30)\n"
        "for _ in range(20):\n"
        "    w = c.create('k' * 64, rows=64, width=512, dtype=torch.float32, top_k=None, layout={})\n"
        "    w.write(0, torch.full((64, 512), 1.5)); w.commit(); w.close()\n"
        "    e = c.open('k' * 64); assert bool((e.read(0, 64)[0] == 1.5).all()); e.close()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, env=env) for _ in range(2)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert [p.name for p in tmp_path.iterdir()] == ["k" * 64 + ".teacher.safetensors"]


def test_expert_identity_follows_rewrites_even_with_the_old_mtime(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"a" * 100)
    (folder / "README.md").write_text("x")
    first = expert_identity(folder, None)
    assert expert_identity(folder, None) == first
    (folder / "README.md").write_text("changed")  # not a weight file
    assert expert_identity(folder, None) == first
    st = (folder / "model.safetensors").stat()
    time.sleep(0.01)
    (folder / "model.safetensors").write_bytes(b"b" * 100)  # same size ...
    os.utime(folder / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns))  # ... and mtime (cp -p)
    assert expert_identity(folder, None) != first
    assert expert_identity(folder, "f" * 40) == "hub:" + "f" * 40


def test_settings_from_options_and_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DIVMERGE_TEACHER_CACHE_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("DIVMERGE_TEACHER_CACHE_BYTES", "123")
    assert cache_dir(EngineOptions()) == tmp_path / "env" and cache_bytes(EngineOptions()) == 123
    opts = EngineOptions(teacher_cache_dir=tmp_path / "opt", teacher_cache_bytes=7)
    assert cache_dir(opts) == tmp_path / "opt" and cache_bytes(opts) == 7
    monkeypatch.delenv("DIVMERGE_TEACHER_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir(EngineOptions()) == tmp_path / "xdg" / "divmerge" / "teachers"
    monkeypatch.setenv("DIVMERGE_TEACHER_CACHE_BYTES", "lots")
    with pytest.raises(ConfigError, match="DIVMERGE_TEACHER_CACHE_BYTES"):
        cache_bytes(EngineOptions())
