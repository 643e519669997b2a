"""The worker settings behind the teacher cache and multi-device learned merges."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from divmerge_service.config import Settings


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


def test_the_dry_run_gets_the_workers_engine_options(tmp_path, monkeypatch):
    """Settings.engine_options() is the one Settings -> EngineOptions rule: the worker merges with it and the
    API's dry run receives the same options (the dry run's copy once dropped the teacher-cache ones)."""
    from divmerge_api.dryrun import dry_run_request
    from divmerge_core.config import parse_config
    from divmerge_core.options import EngineOptions

    for name in ("DIVMERGE_TEACHER_CACHE_DIR", "DIVMERGE_TEACHER_CACHE_BYTES", "DIVMERGE_LOCAL_ROOTS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DIVMERGE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DIVMERGE_LOCAL_ROOTS", str(tmp_path))
    monkeypatch.setenv("DIVMERGE_TEACHER_CACHE_DIR", str(tmp_path / "teachers"))
    monkeypatch.setenv("DIVMERGE_TEACHER_CACHE_BYTES", "1000")
    monkeypatch.setenv("DIVMERGE_ALLOW_PICKLE", "true")
    monkeypatch.setenv("DIVMERGE_HF_TOKEN", "hf_read")
    settings = Settings()
    options = settings.engine_options()
    assert options.teacher_cache_dir == tmp_path / "teachers" and options.teacher_cache_bytes == 1000
    assert options.allow_pickle and options.hf_token == "hf_read"
    config = parse_config({"merge_method": "linear", "models": [{"model": "org/a"}, {"model": "org/b"}]})
    request, env = dry_run_request(config, settings)
    assert "hf_read" not in str(request) and env["HF_TOKEN"] == "hf_read"
    assert EngineOptions.from_json(request["options"], hf_token=env["HF_TOKEN"]) == options
