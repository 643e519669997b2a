"""The local-path allow-list in the engine: every file read or copied from a model folder must resolve under
the allowed roots; index shards are plain names; nothing is written when a folder breaks the rules."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from divmerge_core.config import parse_config
from divmerge_core.errors import ConfigError, PathNotAllowedError
from divmerge_core.io.paths import check_local_path, plain_name
from divmerge_core.io.refs import resolve_model, snapshot_roots
from divmerge_core.options import EngineOptions
from divmerge_core.pipeline import prepare, run_merge
from tests.tiny import make_bert_classifier, perturbed, save

SECRET = "TOP-SECRET-VALUE-42"


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    src = tmp_path_factory.mktemp("family")
    bert = make_bert_classifier(seed=0)
    return {
        "base": save(bert, src / "base"),
        "ft1": save(perturbed(bert, 0.05, seed=1), src / "ft1"),
        "ft2": save(perturbed(bert, 0.05, seed=2), src / "ft2"),
    }


@pytest.fixture
def layout(tmp_path, family) -> dict[str, Path]:
    """Models copied under an allowed root, a secret outside it, an output folder under the root."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text(SECRET)
    shutil.copytree(family["ft1"], outside / "weights")
    for name, folder in family.items():
        shutil.copytree(folder, root / name)
    return {"root": root, "outside": outside, "out": root / "out"}


def _config(root: Path, method: str = "task_arithmetic"):
    return parse_config(
        {
            "merge_method": method,
            "base_model": str(root / "base"),
            "models": [{"model": str(root / "ft1")}, {"model": str(root / "ft2")}],
        }
    )


def _replace_with_link(path: Path, target: Path) -> None:
    path.unlink()
    os.symlink(target, path)


def _refused(layout, match: str, method: str = "task_arithmetic") -> str:
    opts = EngineOptions(local_roots=(layout["root"],))
    with pytest.raises(PathNotAllowedError, match=match) as err:
        run_merge(_config(layout["root"], method), layout["out"], options=opts, device="cpu")
    assert not layout["out"].exists() and not list(layout["root"].glob(".out*")), "something was written"
    assert str(layout["root"].resolve()) in str(err.value), "the message names the allowed roots"
    return str(err.value)


def test_symlinked_tokenizer_file_to_a_secret_is_refused(layout):
    os.symlink(layout["outside"] / "secret.txt", layout["root"] / "base" / "vocab.txt")
    _refused(layout, r"base.*vocab\.txt")


def test_symlink_to_proc_self_environ_is_refused(layout):
    os.symlink("/proc/self/environ", layout["root"] / "base" / "special_tokens_map.json")
    _refused(layout, "special_tokens_map.json")


def test_symlinked_weights_are_refused(layout):
    ft2 = layout["root"] / "ft2" / "model.safetensors"
    _replace_with_link(ft2, layout["outside"] / "weights" / "model.safetensors")
    _refused(layout, r"ft2.*model\.safetensors")


def test_index_naming_a_shard_outside_the_folder_is_refused(layout):
    ft1 = layout["root"] / "ft1"
    (ft1 / "model.safetensors").unlink()
    shard = "../../outside/weights/model.safetensors"
    from safetensors import safe_open

    with safe_open(str(layout["outside"] / "weights" / "model.safetensors"), "pt") as f:
        weight_map = {k: shard for k in f.keys()}  # noqa: SIM118
    (ft1 / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _refused(layout, "shards must be plain file names")


def test_shard_names_must_be_plain_even_without_roots(tmp_path):
    for bad in ("../x.safetensors", "/etc/passwd", "sub/x.safetensors", "..", "", "a\\b", 3):
        with pytest.raises(PathNotAllowedError):
            plain_name(bad, tmp_path, "model.safetensors.index.json")
    assert plain_name("model-00001-of-00002.safetensors", tmp_path, "i.json") == (
        "model-00001-of-00002.safetensors"
    )


def test_links_inside_the_roots_and_no_roots_keep_working(layout, tmp_path):
    # a symlink to a file elsewhere under the roots is fine
    vocab = layout["root"] / "shared-vocab.txt"
    vocab.write_text("[PAD]\n")
    os.symlink(vocab, layout["root"] / "base" / "vocab.txt")
    opts = EngineOptions(local_roots=(layout["root"],))
    result = run_merge(_config(layout["root"]), layout["out"], options=opts, device="cpu")
    assert (layout["out"] / "vocab.txt").read_text() == "[PAD]\n"
    # no roots (the CLI): any local folder, even with a link leading outside the working tree
    os.symlink(layout["outside"] / "secret.txt", layout["root"] / "ft1" / "notes.txt")
    run_merge(_config(layout["root"]), tmp_path / "cli-out", options=EngineOptions(), device="cpu")
    assert result.files


def test_check_local_path_rules(tmp_path):
    root = tmp_path / "root"
    (root / "m").mkdir(parents=True)
    roots = (root,)
    assert check_local_path(f"file://{root}/m", roots, "model") == (root / "m").resolve()
    for bad, why in [
        ("m", "absolute"),
        (f"{root}/m/../../x", r"'\.\.'"),
        (f"{root}/m\x00", "NUL"),
        ("/etc", "outside the allowed local roots"),
        (f"{root}x/m", "outside the allowed local roots"),  # a prefix of the root's name is not inside it
    ]:
        with pytest.raises(PathNotAllowedError, match=why):
            check_local_path(bad, roots, "model path")
    assert check_local_path("~", None, "x") == Path(os.path.expanduser("~")).resolve()


def test_hub_snapshot_files_may_only_point_into_their_blobs(tmp_path, family):
    """The HF cache layout: snapshots/<sha>/<file> -> ../../blobs/<hash>. Links into the repo's blobs are
    allowed; a link anywhere else is not."""
    repo = tmp_path / "hub" / "models--acme--m"
    snap = repo / "snapshots" / ("a" * 40)
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in family["base"].iterdir():
        blob = repo / "blobs" / f"blob-{f.name}"
        shutil.copyfile(f, blob)
        os.symlink(Path("../../blobs") / blob.name, snap / f.name)
    opts = EngineOptions(local_roots=(tmp_path / "elsewhere",))
    allowed = snapshot_roots(snap, opts)
    assert allowed == ((snap.resolve(), (repo / "blobs").resolve()))
    from divmerge_core.io.paths import check_folder

    check_folder(snap, allowed, "model 'acme/m'")
    os.symlink("/proc/self/environ", snap / "vocab.txt")
    with pytest.raises(PathNotAllowedError, match="vocab.txt"):
        check_folder(snap, allowed, "model 'acme/m'")
    assert snapshot_roots(snap, EngineOptions()) is None


def test_resolve_model_checks_the_folder(layout):
    os.symlink(layout["outside"] / "secret.txt", layout["root"] / "ft1" / "merges.txt")
    opts = EngineOptions(local_roots=(layout["root"],))
    with pytest.raises(PathNotAllowedError, match="merges.txt"):
        resolve_model(str(layout["root"] / "ft1"), opts)


def test_learned_merge_refuses_a_base_without_tokenizer_files(layout):
    base = layout["root"] / "base"
    for f in base.glob("tokenizer*"):
        f.unlink()
    config = parse_config(
        {
            "merge_method": "divmerge",
            "base_model": str(base),
            "models": [
                {"model": str(layout["root"] / n), "data": {"texts": ["a b", "c d"]}} for n in ("ft1", "ft2")
            ],
        }
    )
    with pytest.raises(ConfigError, match=r"has no tokenizer files") as err:
        prepare(config, EngineOptions(local_roots=(layout["root"],)))
    assert str(base) in str(err.value) and err.value.field == "base_model"


def test_tokenizer_copy_checks_again_at_copy_time(layout):
    """The folder is clean when resolved, then a tokenizer file becomes a link to a secret before the copy:
    the copy refuses it (nothing is written at the output)."""
    opts = EngineOptions(local_roots=(layout["root"],))
    config = _config(layout["root"])
    plan = prepare(config, opts)
    _replace_with_link(layout["root"] / "base" / "tokenizer.json", layout["outside"] / "secret.txt")
    with pytest.raises(PathNotAllowedError, match="tokenizer.json"):
        run_merge(config, layout["out"], options=opts, device="cpu", plan=plan)
    assert not layout["out"].exists()
