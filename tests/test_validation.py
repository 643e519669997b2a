"""Compatibility checks before a merge: every mismatch is collected and named."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from divmerge_core import EngineOptions, parse_config, run_merge
from divmerge_core.errors import IncompatibleModelsError, ModelNotFoundError, UnsafeCheckpointError
from divmerge_core.io.loading import Checkpoint
from divmerge_core.pipeline import prepare

from .merge_models import bert_family, config_dict
from .tiny import make_bert_classifier, make_gpt2, save


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    return bert_family(tmp_path_factory.mktemp("bert"), n=1)


def _copy(src, dst, edit_config=None, edit_tensors=None):
    shutil.copytree(src, dst)
    if edit_config:
        path = dst / "config.json"
        config = json.loads(path.read_text())
        edit_config(config)
        path.write_text(json.dumps(config))
    if edit_tensors:
        tensors = load_file(dst / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _problems(fam, *models) -> list[str]:
    cfg = parse_config(config_dict("task_arithmetic", fam["base"], list(models)))
    with pytest.raises(IncompatibleModelsError) as info:
        prepare(cfg)
    return info.value.problems


def test_compatible_models_pass_without_reading_tensors(fam, monkeypatch):
    def no_reads(*args, **kwargs):
        raise AssertionError("validation must read headers only")

    monkeypatch.setattr(Checkpoint, "get", no_reads)
    plan = prepare(parse_config(config_dict("ties", fam["base"], [fam["t1"]])))
    assert "classifier.weight" in plan.tensor_names
    assert plan.model_config["model_type"] == "bert"


def test_mismatched_architecture(fam, tmp_path):
    other = save(make_gpt2(), tmp_path / "gpt2")
    problems = _problems(fam, other)
    text = " | ".join(problems)
    assert "architecture ['GPT2LMHeadModel']" in text and "model_type 'gpt2'" in text
    assert "lacks" in text  # the tensor names differ too


def test_every_mismatch_is_collected(fam, tmp_path):
    missing = _copy(fam["t1"], tmp_path / "missing", edit_tensors=lambda t: t.pop("bert.pooler.dense.bias"))
    shaped = save(make_bert_classifier(num_labels=3), tmp_path / "three_labels")
    problems = _problems(fam, missing, shaped)
    assert any("lacks 1 tensor(s)" in p and "bert.pooler.dense.bias" in p for p in problems)
    assert any("'classifier.weight' has shape [3, 32]" in p and "[2, 32]" in p for p in problems)
    assert all(str(tmp_path) in p for p in problems)  # each problem names the model


def test_vocab_tied_embeddings_and_dtype_family(fam, tmp_path):
    def edit(config):
        config["tie_word_embeddings"] = False

    untied = _copy(fam["t1"], tmp_path / "untied", edit_config=edit)
    ints = _copy(
        fam["t1"],
        tmp_path / "ints",
        edit_tensors=lambda t: t.update({"classifier.bias": torch.zeros(2, dtype=torch.int64)}),
    )
    bigger = save(make_bert_classifier(vocab_size=70), tmp_path / "vocab")
    problems = " | ".join(_problems(fam, untied, ints, bigger))
    assert "tie_word_embeddings False" in problems
    assert "'classifier.bias' is int64" in problems
    assert "vocab_size 70" in problems and "word_embeddings.weight' has shape [70, 32]" in problems


def test_pickle_only_is_refused_unless_allowed(fam, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(fam["t1"], folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    cfg = parse_config(config_dict("task_arithmetic", fam["base"], [folder]))
    with pytest.raises(UnsafeCheckpointError, match="pickle"):
        prepare(cfg)
    result = run_merge(cfg, tmp_path / "out", options=EngineOptions(allow_pickle=True))
    merged = load_file(result.out_dir / "model.safetensors")
    expected = load_file(fam["t1"] / "model.safetensors")
    for name, value in expected.items():
        torch.testing.assert_close(merged[name], value)


def test_quantized_model_is_refused(fam, tmp_path):
    def edit(config):
        config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}

    quantized = _copy(fam["t1"], tmp_path / "q", edit_config=edit)
    with pytest.raises(UnsafeCheckpointError, match="quantized \\(bitsandbytes\\)"):
        prepare(parse_config(config_dict("ties", fam["base"], [quantized])))


def test_missing_path(fam, tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        prepare(parse_config(config_dict("ties", fam["base"], [tmp_path / "nope"])))
