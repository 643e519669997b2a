"""The worker's local delivery (``divmerge_worker.upload.deliver_local``): one rename of a hidden sibling into place,
and a kept result re-delivered from elsewhere never leaves half a model at the destination."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from divmerge_core.errors import OutputExistsError
from divmerge_service.contracts import LocalDestination
from divmerge_worker.upload import MARKER_FILE, UploadError, deliver_local


def _result(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "config.json").write_text("{}")
    return folder


def _hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_staged_sibling_is_renamed_into_place(tmp_path):
    dest = tmp_path / "out" / "merged"
    staged = _result(tmp_path / "out" / ".merged.divmerge-job-j1-a1")
    inode = staged.stat().st_ino
    assert deliver_local(staged, dest, "j1") == LocalDestination(path=str(dest))
    assert dest.stat().st_ino == inode, "not the staging folder renamed"
    assert json.loads((dest / MARKER_FILE).read_text()) == {"job_id": "j1"}
    assert _hidden(dest.parent) == []


def test_kept_result_is_copied_next_to_the_destination_then_renamed(tmp_path):
    kept = _result(tmp_path / "home" / "kept" / "j1")
    dest = tmp_path / "out" / "merged"
    deliver_local(kept, dest, "j1")
    assert (dest / "model.safetensors").read_bytes() == b"weights"
    assert not kept.exists() and _hidden(dest.parent) == []


def test_kept_result_onto_an_existing_output_stays_kept(tmp_path):
    kept = _result(tmp_path / "home" / "kept" / "j1")
    dest = _result(tmp_path / "out" / "merged")
    (dest / "model.safetensors").write_bytes(b"someone else's")
    with pytest.raises(OutputExistsError):
        deliver_local(kept, dest, "j1")
    assert (dest / "model.safetensors").read_bytes() == b"someone else's"
    assert (kept / "model.safetensors").is_file(), "the kept result is lost: POST /retry cannot deliver it"
    assert _hidden(dest.parent) == []


def test_a_copy_that_fails_leaves_nothing_at_the_destination(tmp_path):
    kept = _result(tmp_path / "home" / "kept" / "j1")
    os.symlink(tmp_path / "missing", kept / "tokenizer.json")  # unreadable: the copy fails half way
    dest = tmp_path / "out" / "merged"
    dest.parent.mkdir()
    with pytest.raises(UploadError, match="cannot copy"):
        deliver_local(kept, dest, "j1")
    assert list(dest.parent.iterdir()) == [], "half a model left next to the destination"
    assert (kept / "model.safetensors").is_file()
