"""LoRA adapters as experts: ``base+adapter`` and bare adapter folders give peft's ``merge_and_unload``."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from divmerge_core.config import parse_config
from divmerge_core.errors import ModelNotFoundError, UnsupportedAdapterError
from divmerge_core.pipeline import run_merge

from .tiny import make_llama, save

peft = pytest.importorskip("peft")


def _adapter(base_model, folder, seed: int, **kw):
    """A real peft adapter (random A and B) over a copy of ``base_model``; returns the merged weights."""
    import copy

    torch.manual_seed(seed)
    cfg = peft.LoraConfig(init_lora_weights=False, **kw)
    model = peft.get_peft_model(copy.deepcopy(base_model), cfg)
    model.save_pretrained(folder)
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


@pytest.fixture(scope="module")
def lora_family(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    base = make_llama(0, num_hidden_layers=2)
    save(base, tmp / "base")
    merged = {
        "a1": _adapter(base, tmp / "a1", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "a2": _adapter(
            base,
            tmp / "a2",
            2,
            r=2,
            lora_alpha=16,
            use_rslora=True,
            target_modules=["o_proj", "gate_proj", "embed_tokens"],
            modules_to_save=["lm_head"],
        ),
    }
    return tmp, merged


def _linear(tmp, models, weights=(0.3, 0.7)):
    return parse_config(
        {
            "merge_method": "linear",
            "models": [
                {"model": m, "parameters": {"weight": w}} for m, w in zip(models, weights, strict=True)
            ],
            "parameters": {"normalize": False},
        }
    )


def test_base_plus_adapter_is_peft_merge_and_unload(lora_family, tmp_path):
    tmp, merged = lora_family
    for name in ("a1", "a2"):
        cfg = _linear(tmp, [f"{tmp / 'base'}+{tmp / name}"], weights=(1.0,))
        out = load_file(run_merge(cfg, tmp_path / name, device="cpu").out_dir / "model.safetensors")
        ref = merged[name]
        assert set(out) <= set(ref)
        for k, v in out.items():
            torch.testing.assert_close(v, ref[k], rtol=1e-6, atol=1e-7, msg=k)
        assert any(not torch.equal(out[k], load_file(tmp / "base" / "model.safetensors")[k]) for k in out)


def test_an_existing_folder_with_a_plus_in_its_name_is_a_model_not_a_lora_pair(lora_family, tmp_path):
    """Merge outputs are often named after their parts (``out/sst2+qnli``): reading one back must not
    split it into a base and an adapter."""
    import shutil

    tmp, _ = lora_family
    plus = tmp_path / "divmerge+labels-sst2+qnli"  # as the quality harness names its outputs
    shutil.copytree(tmp / "base", plus)
    cfg = _linear(tmp, [str(plus)], weights=(1.0,))
    out = load_file(run_merge(cfg, tmp_path / "out", device="cpu").out_dir / "model.safetensors")
    base = load_file(tmp / "base" / "model.safetensors")
    assert set(out) <= set(base) and all(torch.equal(v, base[k]) for k, v in out.items())


def test_linear_of_two_lora_experts(lora_family, tmp_path):
    tmp, merged = lora_family
    cfg = _linear(tmp, [f"{tmp / 'base'}+{tmp / 'a1'}", f"{tmp / 'base'}+{tmp / 'a2'}"])
    out = load_file(run_merge(cfg, tmp_path / "out", device="cpu").out_dir / "model.safetensors")
    for k, v in out.items():
        torch.testing.assert_close(
            v, 0.3 * merged["a1"][k] + 0.7 * merged["a2"][k], rtol=1e-5, atol=1e-6, msg=k
        )


def test_bare_adapter_folder_names_its_base(lora_family, tmp_path):
    tmp, merged = lora_family
    conf = tmp_path / "bare"
    conf.mkdir()
    for f in ("adapter_model.safetensors",):
        (conf / f).write_bytes((tmp / "a1" / f).read_bytes())
    ac = json.loads((tmp / "a1" / "adapter_config.json").read_text())
    ac["base_model_name_or_path"] = str(tmp / "base")
    (conf / "adapter_config.json").write_text(json.dumps(ac))
    cfg = parse_config(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(tmp / "base"),
            "models": [{"model": str(conf), "parameters": {"weight": 0.5}}],
        }
    )
    out = load_file(run_merge(cfg, tmp_path / "out", device="cpu").out_dir / "model.safetensors")
    base = load_file(tmp / "base" / "model.safetensors")
    for k, v in out.items():
        torch.testing.assert_close(
            v, base[k] + 0.5 * (merged["a1"][k] - base[k]), rtol=1e-5, atol=1e-6, msg=k
        )


def test_missing_and_unsupported_adapters_are_refused(lora_family, tmp_path):
    tmp, _ = lora_family
    with pytest.raises(ModelNotFoundError, match="adapter directory"):
        run_merge(
            _linear(tmp, [f"{tmp / 'base'}+{tmp_path / 'nope'}"], (1.0,)), tmp_path / "o1", device="cpu"
        )
    dora = tmp_path / "dora"
    dora.mkdir()
    (dora / "adapter_model.safetensors").write_bytes((tmp / "a1" / "adapter_model.safetensors").read_bytes())
    ac = json.loads((tmp / "a1" / "adapter_config.json").read_text()) | {"use_dora": True}
    (dora / "adapter_config.json").write_text(json.dumps(ac))
    with pytest.raises(UnsupportedAdapterError, match="use_dora"):
        run_merge(_linear(tmp, [f"{tmp / 'base'}+{dora}"], (1.0,)), tmp_path / "o2", device="cpu")
    bare = tmp_path / "nobase"
    bare.mkdir()
    (bare / "adapter_model.safetensors").write_bytes((tmp / "a1" / "adapter_model.safetensors").read_bytes())
    (bare / "adapter_config.json").write_text(
        json.dumps(ac | {"use_dora": False, "base_model_name_or_path": None})
    )
    with pytest.raises(UnsupportedAdapterError, match="base_model_name_or_path"):
        run_merge(_linear(tmp, [str(bare)], (1.0,)), tmp_path / "o3", device="cpu")
    with pytest.raises(Exception, match="more than one"):
        _linear(tmp, [f"{tmp / 'base'}+{tmp / 'a1'}+{tmp / 'a2'}"], (1.0,))


def test_task_arithmetic_of_lora_experts_gives_mergekits_tensors(lora_family, tmp_path):
    """The same YAML through mergekit-yaml --lora-merge-cache (peft merges each adapter, then mergekit)."""
    from .test_mergekit_compat import MERGEKIT_YAML, _assert_same, _mergekit

    if not MERGEKIT_YAML.exists():
        pytest.skip("mergekit venv missing (scripts/setup.sh creates it)")
    tmp, _ = lora_family
    base = str(tmp / "base")
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "models": [
            {"model": f"{base}+{tmp / 'a1'}", "parameters": {"weight": 0.6}},
            {"model": f"{base}+{tmp / 'a2'}", "parameters": {"weight": 0.4}},
        ],
        "dtype": "float32",
    }
    ours = load_file(
        run_merge(parse_config(cfg), tmp_path / "ours", device="cpu").out_dir / "model.safetensors"
    )
    _assert_same(ours, _mergekit(cfg, tmp_path, extra=("--lora-merge-cache", str(tmp_path / "cache"))))


def test_divmerge_of_lora_experts_equals_divmerge_of_their_merged_checkpoints(tmp_path):
    """A learned merge reads LoRA experts through the same loader: GPT-2 (Conv1D, fan_in_fan_out) adapters
    give the coefficients and tensors of the same merge over the peft-merged expert folders (teachers too)."""
    from .tiny import make_gpt2, make_tokenizer

    base = make_gpt2(seed=0)
    save(base, tmp_path / "base")
    for i in (1, 2):
        merged = _adapter(
            base,
            tmp_path / f"lora{i}",
            i,
            r=2,
            lora_alpha=4,
            fan_in_fan_out=True,
            target_modules=["c_attn", "c_fc"],
        )
        full = make_gpt2(seed=0)
        full.load_state_dict(merged, strict=False)
        full.save_pretrained(tmp_path / f"full{i}", safe_serialization=True)
        make_tokenizer("gpt2").save_pretrained(tmp_path / f"full{i}")
    data = [{"texts": ["a b c", "cat dog up", "red blue"]}, {"texts": ["good bad", "x y z", "9 8"]}]

    def run(models, out):
        cfg = {
            "merge_method": "divmerge",
            "base_model": str(tmp_path / "base"),
            "models": [{"model": m, "data": d} for m, d in zip(models, data, strict=True)],
            "parameters": {
                "granularity": "layer",
                "epochs": 1,
                "batch_size_per_task": 3,
                "max_new_tokens": 3,
            },
        }
        run_merge(parse_config(cfg), out, device="cpu")
        return json.loads((out / "coefficients.json").read_text()), load_file(out / "model.safetensors")

    b = tmp_path / "base"
    c_lora, t_lora = run([f"{b}+{tmp_path / 'lora1'}", f"{b}+{tmp_path / 'lora2'}"], tmp_path / "o-lora")
    c_full, t_full = run([str(tmp_path / "full1"), str(tmp_path / "full2")], tmp_path / "o-full")
    assert c_lora["losses"] == pytest.approx(c_full["losses"], rel=1e-5)
    for g in c_full["coefficients"]:
        assert list(c_lora["coefficients"][g].values()) == pytest.approx(
            list(c_full["coefficients"][g].values()), rel=1e-5, abs=1e-6
        )
    for k in t_full:
        torch.testing.assert_close(t_lora[k], t_full[k], rtol=1e-5, atol=1e-6, msg=k)


def test_adapter_and_base_obey_the_allow_list(lora_family, tmp_path):
    """Each side of base+adapter, and the base a bare adapter names, must lie under the allowed roots."""
    from divmerge_core.errors import PathNotAllowedError
    from divmerge_core.io.refs import resolve_model
    from divmerge_core.options import EngineOptions

    tmp, _ = lora_family
    only_base = EngineOptions(local_roots=[tmp / "base"])
    with pytest.raises(PathNotAllowedError, match="adapter path"):
        resolve_model(f"{tmp / 'base'}+{tmp / 'a1'}", only_base)
    with pytest.raises(PathNotAllowedError, match="model path"):
        resolve_model(f"{tmp / 'base'}+{tmp / 'a1'}", EngineOptions(local_roots=[tmp / "a1"]))
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "adapter_model.safetensors").write_bytes((tmp / "a1" / "adapter_model.safetensors").read_bytes())
    ac = json.loads((tmp / "a1" / "adapter_config.json").read_text()) | {
        "base_model_name_or_path": str(tmp / "base")
    }
    (bare / "adapter_config.json").write_text(json.dumps(ac))
    with pytest.raises(PathNotAllowedError, match="model path"):
        resolve_model(str(bare), EngineOptions(local_roots=[tmp_path]))
    ok = resolve_model(str(bare), EngineOptions(local_roots=[tmp_path, tmp / "base"]))
    assert ok.adapter is not None and ok.path == (tmp / "base").resolve()
