"""The worker settings behind the teacher cache and multi-device learned merges."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service_core.config import Settings


def test_teacher_cache_and_devices_settings(tmp_path, monkeypatch):
    for name in ("DIVMERGE_TEACHER_CACHE_DIR", "DIVMERGE_TEACHER_CACHE_BYTES", "DIVMERGE_DEVICES_PER_JOB"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DIVMERGE_HOME", str(tmp_path / "home"))
    s = Settings()
    assert s.teacher_cache == tmp_path / "home" / "cache" / "teachers"
    assert s.teacher_cache_bytes is None and s.devices_per_job == 1
    monkeypatch.setenv("DIVMERGE_TEACHER_CACHE_DIR", str(tmp_path / "shared"))
    monkeypatch.setenv("DIVMERGE_TEACHER_CACHE_BYTES", "1000")
    monkeypatch.setenv("DIVMERGE_DEVICES_PER_JOB", "4")
    s = Settings()
    assert (s.teacher_cache, s.teacher_cache_bytes, s.devices_per_job) == (tmp_path / "shared", 1000, 4)
    monkeypatch.setenv("DIVMERGE_DEVICES_PER_JOB", "0")
    with pytest.raises(ValidationError, match="devices_per_job"):
        Settings()
