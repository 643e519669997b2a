"""``run_merge(staged=False)``: the caller's own staging folder is written in place (the service worker's
single staging folder), with no second staging folder of the engine's."""

from __future__ import annotations

import pytest

from divmerge_core import parse_config, run_merge

from .merge_models import bert_family, config_dict


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    return bert_family(tmp_path_factory.mktemp("bert"), n=2)


def test_unstaged_merge_writes_into_the_callers_folder(fam, tmp_path):
    cfg = parse_config(config_dict("task_arithmetic", fam["base"], [fam["t1"], fam["t2"]]))
    folder = tmp_path / ".merged.divmerge-job-j1-a1"
    folder.mkdir()
    inode = folder.stat().st_ino
    seen: set[str] = set()

    def progress(ev):
        if ev.stage == "write":
            seen.update(p.name for p in tmp_path.iterdir())

    result = run_merge(cfg, folder, staged=False, progress=progress)
    assert result.out_dir == folder and folder.stat().st_ino == inode
    assert seen == {folder.name}, "the engine staged into a folder of its own"
    assert {"model.safetensors", "config.json", "README.md"} <= {p.name for p in folder.iterdir()}


def test_staged_merge_builds_aside(fam, tmp_path):
    cfg = parse_config(config_dict("task_arithmetic", fam["base"], [fam["t1"], fam["t2"]]))
    seen: set[str] = set()

    def progress(ev):
        if ev.stage == "write":
            seen.update(p.name for p in tmp_path.iterdir())

    run_merge(cfg, tmp_path / "out", progress=progress)
    assert any(name.startswith(".out.divmerge-tmp-") for name in seen) and "out" not in seen
