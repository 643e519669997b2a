"""The streaming sharded safetensors writer and the merged output directory."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from divmerge_core import EngineOptions, parse_config, run_merge
from divmerge_core.errors import MergeCancelled, OutputExistsError
from divmerge_core.io.loading import Checkpoint
from divmerge_core.io.writer import INDEX_FILE, ShardedSafetensorsWriter, TensorSpec

from .merge_models import bert_family, config_dict, gpt2_family


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(8, 4, generator=gen),
        "b.half": torch.randn(10, generator=gen).half(),
        "c.ids": torch.arange(6),
        "d.bf16": torch.randn(3, 3, generator=gen).bfloat16(),
        "e.flag": torch.tensor([True, False, True]),
        "f.scalar": torch.tensor(3.5),
        "g.empty": torch.zeros(0, 3),
    }


def _specs(tensors):
    return [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]


def test_sharded_round_trip(tmp_path):
    tensors = _tensors()
    with ShardedSafetensorsWriter(tmp_path, _specs(tensors), max_shard_size=64) as writer:
        for name in reversed(list(tensors)):  # any order: each tensor goes to its planned offset
            writer.write(name, tensors[name])
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*files, INDEX_FILE])
    assert writer.close() == [*files, INDEX_FILE]
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert set(index["weight_map"]) == set(tensors)
    for name, fname in index["weight_map"].items():
        with safe_open(str(tmp_path / fname), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert torch.equal(f.get_tensor(name), tensors[name])
        raw = (tmp_path / fname).read_bytes()
        assert int.from_bytes(raw[:8], "little") % 8 == 0
    (tmp_path / "config.json").write_text("{}")
    with Checkpoint(tmp_path) as ckpt:  # the engine's own positioned reads agree
        for name, tensor in tensors.items():
            assert ckpt.dtype(name) == tensor.dtype and torch.equal(ckpt.get(name), tensor)


def test_single_file_when_it_fits(tmp_path):
    tensors = _tensors()
    with ShardedSafetensorsWriter(tmp_path, _specs(tensors), max_shard_size=10**6) as writer:
        for name, t in tensors.items():
            writer.write(name, t)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_writer_rejects_wrong_tensors_and_missing_ones(tmp_path):
    tensors = _tensors()
    writer = ShardedSafetensorsWriter(tmp_path, _specs(tensors), max_shard_size=10**6)
    with pytest.raises(ValueError, match="planned"):
        writer.write("a.weight", torch.zeros(4, 8))
    writer.write("a.weight", tensors["a.weight"])
    with pytest.raises(RuntimeError, match="never written"):
        writer.close()


def test_merged_bert_loads_with_from_pretrained(tmp_path):
    fam = bert_family(tmp_path / "m")
    cfg = parse_config(config_dict("ties", fam["base"], [fam["t1"], fam["t2"]], density=0.5))
    result = run_merge(cfg, tmp_path / "out", options=EngineOptions(max_shard_size=30_000))
    out = result.out_dir
    assert (out / INDEX_FILE).is_file() and "model-00001" in result.files[0]
    for name in ("config.json", "tokenizer.json", "README.md", "merge_config.yaml"):
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert yaml.safe_load((out / "merge_config.yaml").read_text())["merge_method"] == "ties"
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["tags"] == ["merge", "divmerge"] and front["merge_method"] == "ties"
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # no temp dir left
    model = AutoModelForSequenceClassification.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    logits = model(**tok(["good cat ."], return_tensors="pt")).logits
    assert logits.shape == (1, 2) and torch.isfinite(logits).all()


def test_merged_gpt2_keeps_tied_embeddings_and_out_dtype(tmp_path):
    fam = gpt2_family(tmp_path / "m")
    cfg = config_dict("task_arithmetic", fam["base"], [fam["t1"], fam["t2"]])
    cfg["out_dtype"] = "bfloat16"
    result = run_merge(parse_config(cfg), tmp_path / "out", options=EngineOptions(max_shard_size=10_000))
    config = json.loads((result.out_dir / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["tie_word_embeddings"] is True
    model = AutoModelForCausalLM.from_pretrained(result.out_dir)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert model.dtype == torch.bfloat16
    assert (result.out_dir / "generation_config.json").is_file()


def test_existing_output_is_refused_unless_forced(tmp_path):
    fam = bert_family(tmp_path / "m", n=1)
    cfg = parse_config(config_dict("linear", None, [fam["base"], fam["t1"]]))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError):
        run_merge(cfg, out)
    assert (out / "keep.txt").is_file()
    run_merge(cfg, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_cancellation_leaves_nothing(tmp_path):
    fam = bert_family(tmp_path / "m", n=1)
    cfg = parse_config(config_dict("linear", None, [fam["base"], fam["t1"]]))
    seen = []

    def stop() -> bool:
        return len(seen) > 5

    with pytest.raises(MergeCancelled):
        run_merge(
            cfg,
            tmp_path / "out",
            progress=lambda e: seen.append(e) if e.stage == "write" else None,
            should_stop=stop,
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_learned_metadata_files(tmp_path):
    """For learned methods the card has a coefficient table and coefficients.json holds everything."""
    from divmerge_core.pipeline import prepare, write_metadata
    from divmerge_core.plan import LearnedCoefficients

    fam = bert_family(tmp_path / "m")
    cfg = config_dict("divmerge", fam["base"], [fam["t1"], fam["t2"]])
    for spec in cfg["models"]:
        spec["data"] = {"texts": ["good cat ."]}
    plan = prepare(parse_config(cfg))
    coeffs = LearnedCoefficients(
        method="divmerge",
        granularity="task",
        groups=["all"],
        tasks=[m.ref.raw for m in plan.models],
        values=[[0.25, 0.75]],
        group_of={n: "all" for n in plan.tensor_names},
        losses=[0.5, 0.25],
    )
    folder = tmp_path / "meta"
    folder.mkdir()
    files = write_metadata(plan, folder, coeffs)
    assert "coefficients.json" in files
    saved = json.loads((folder / "coefficients.json").read_text())
    assert saved["coefficients"]["all"] == {str(fam["t1"]): 0.25, str(fam["t2"]): 0.75}
    assert saved["losses"] == [0.5, 0.25] and set(saved["group_of"]) == set(plan.tensor_names)
    card = (folder / "README.md").read_text()
    assert "| all | 0.2500 | 0.7500 |" in card and "final loss 0.25" in card
    front = yaml.safe_load(card.split("---")[1])
    assert front["merge_method"] == "divmerge" and "lr" in front["parameters"]
    assert "density" not in front["parameters"]


def test_overflow_to_inf_is_a_numerical_error(tmp_path):
    from safetensors.torch import load_file, save_file

    from divmerge_core.errors import NumericalError

    fam = bert_family(tmp_path / "m", n=1)
    tensors = load_file(fam["t1"] / "model.safetensors")
    tensors["classifier.weight"] = tensors["classifier.weight"] * 1e6  # beyond float16's range
    save_file(tensors, fam["t1"] / "model.safetensors", metadata={"format": "pt"})
    cfg = config_dict("task_arithmetic", fam["base"], [fam["t1"]])
    cfg["out_dtype"] = "float16"
    with pytest.raises(NumericalError, match="classifier.weight"):
        run_merge(parse_config(cfg), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_checkpoint_get_into_reads_in_place_or_casts(tmp_path):
    tensors = _tensors()
    with ShardedSafetensorsWriter(tmp_path, _specs(tensors), max_shard_size=64) as writer:
        for name, t in tensors.items():
            writer.write(name, t)
    (tmp_path / "config.json").write_text("{}")
    with Checkpoint(tmp_path) as ckpt:
        for name, tensor in tensors.items():
            out = torch.empty((2, *tensor.shape), dtype=tensor.dtype)
            assert ckpt.get_into(name, out[1]) is not None and torch.equal(out[1], tensor)  # straight read
            if tensor.is_floating_point():
                cast = torch.empty(tensor.shape, dtype=torch.float32)
                assert torch.equal(ckpt.get_into(name, cast), tensor.float())
        with pytest.raises(ValueError):
            ckpt.get_into("a.weight", torch.empty(4, 8))


def test_finiteness_check_is_exact():
    """The fast check (a finite sum) never passes NaN/inf, and finite values whose sum overflows pass."""
    import torch

    from divmerge_core.pipeline import all_finite

    assert all_finite(torch.full((4,), 3e38))  # the float32 sum overflows to inf; the values are finite
    assert all_finite(torch.randn(100, 7).bfloat16())
    for bad in (float("nan"), float("inf"), -float("inf")):
        assert not all_finite(torch.tensor([1.0, bad, 2.0]))
    assert not all_finite(torch.tensor([float("inf"), -float("inf")]))  # sum NaN


def test_one_safetensors_format_for_reader_writer_and_cache(tmp_path):
    """divmerge_core.io.safetensors_format: a header it encodes is what the safetensors library reads, and
    the dtype names are the library's."""
    from divmerge_core.io import safetensors_format as sf

    tensors = _tensors()
    entries, size = sf.layout((n, tuple(t.shape), t.dtype) for n, t in tensors.items())
    head = sf.encode_header(entries, {"format": "pt"})
    assert len(head) % 8 == 0
    path = tmp_path / "x.safetensors"
    path.write_bytes(head + b"".join(bytes(sf.tensor_bytes(t)) for t in tensors.values()))
    assert path.stat().st_size == len(head) + size
    assert sf.read_header(path)[0] == len(head)
    with safe_open(str(path), framework="pt") as f:
        for name, t in tensors.items():
            assert torch.equal(f.get_tensor(name), t)
            assert f.get_slice(name).get_dtype() == sf.DTYPE_NAMES[t.dtype]
