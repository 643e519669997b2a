"""Shared by every test: the teacher cache lives in the test's own temporary directory, never in ~/.cache."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _private_teacher_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DIVMERGE_TEACHER_CACHE_DIR", str(tmp_path_factory.mktemp("teacher-cache")))
