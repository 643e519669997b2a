"""Shared fixtures: every test's teacher cache lives in its own temporary directory, never in ~/.cache; the
training tests run torch on one thread (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _private_teacher_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DIVMERGE_TEACHER_CACHE_DIR", str(tmp_path_factory.mktemp("teacher-cache")))


@pytest.fixture
def one_torch_thread():
    """torch on one intra-op thread for the test, restored after: the tests share 2 cores with other runs."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
