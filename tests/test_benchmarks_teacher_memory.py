"""The teacher-memory benchmark runs end to end on a tiny configuration and reports what it claims."""

from __future__ import annotations

import argparse

from benchmarks.speed.teacher_memory import build, run_once


def test_teacher_memory_benchmark_reports_the_cache_size(tmp_path, one_torch_thread):
    build(tmp_path, 600)
    args = argparse.Namespace(
        vocab=600,
        inputs=3,
        new_tokens=5,
        threads=1,
        cache_bytes=1 << 30,
        root=str(tmp_path),
        teacher="cached",
    )
    first = run_once(args)
    entries = list((tmp_path / "cache").glob("*.teacher.safetensors"))
    assert len(entries) == 2 and first["steps"] == 2
    rows = first["teacher_rows"]
    assert 2 * 3 <= rows <= 2 * 3 * 5  # 1..new_tokens generated tokens per input
    assert first["teacher_outputs_in_ram_would_be_mb"] == round(rows * 600 * 4 / 2**20)
    assert first["cache_on_disk_mb"] == round(sum(p.stat().st_size for p in entries) / 2**20)
    assert sum(p.stat().st_size for p in entries) >= rows * 600 * 4  # every row is on disk
