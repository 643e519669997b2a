"""Learned merges of LoRA experts keep their task vectors as the adapters' factors (learned/lowrank.py).

The anchor: the same merge over the adapters pre-merged into full-weight experts (peft's merge_and_unload)
follows the same Gamma trajectory (losses, Gamma's gradient at every step, final Gamma) to fp32 rounding,
in every placement and granularity, with LoRA and full-weight experts mixed.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from divmerge_core.config import parse_config
from divmerge_core.errors import ConfigError
from divmerge_core.learned import estimate_learned_memory, learn_coefficients
from divmerge_core.learned import placement as placement_mod
from divmerge_core.learned.lowrank import DENSE, LOW_RANK, ZERO, expert_layouts
from divmerge_core.pipeline import prepare
from divmerge_core.progress import Reporter

from .tiny import make_gpt2, make_llama, make_tokenizer, perturbed, save

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]

DATA = [
    {"texts": ["a b c", "cat dog up", "red blue", "1 2 3 4"]},
    {"texts": ["good bad", "left right . up", "x y z", "9 8"]},
    {"texts": ["b c d e", "blue red", "7 7 7", "left"]},
]


def _lora(base, folder: Path, full_folder: Path, seed: int, save_embeddings: bool = True, **kw) -> None:
    """A peft adapter (random A and B) in ``folder`` and its merge_and_unload as a full model in
    ``full_folder``."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **kw))
    model.save_pretrained(folder, save_embedding_layers="auto" if save_embeddings else False)
    merged = model.merge_and_unload()
    save(merged, full_folder)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A Llama base, two LoRA experts (one with an embedding adapter and a modules_to_save head) with their
    merged copies, and one full-weight expert."""
    tmp = tmp_path_factory.mktemp("lora-learned")
    base = make_llama(0, num_hidden_layers=2)
    save(base, tmp / "base")
    _lora(
        base, tmp / "a1", tmp / "f1", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]
    )
    _lora(base, tmp / "a2", tmp / "f2", 2, r=2, lora_alpha=16, use_rslora=True, save_embeddings=False,
          target_modules=["o_proj", "gate_proj", "embed_tokens"], modules_to_save=["lm_head"])  # fmt: skip
    save(perturbed(base, 0.05, seed=3), tmp / "full3")
    return tmp


def _plan(base: Path, models: list[str], **params):
    kw = dict(granularity="layer", epochs=2, batch_size_per_task=2, lr=0.05, max_new_tokens=3) | params
    cfg = {
        "merge_method": "divmerge",
        "base_model": str(base),
        "models": [{"model": m, "data": d} for m, d in zip(models, DATA, strict=False)],
        "parameters": kw,
    }
    return prepare(parse_config(cfg))


def _trajectory(plan, monkeypatch=None, seen: list | None = None):
    grads: list[list[float]] = []
    if seen is not None:  # keep the placement the run used
        make = placement_mod.make_task_vectors

        def spy(*a, **kw):
            seen.append(make(*a, **kw))
            return seen[-1]

        monkeypatch.setattr("divmerge_core.learned.make_task_vectors", spy)
    c = learn_coefficients(
        plan,
        device=torch.device("cpu"),
        reporter=Reporter(),
        on_gradient=lambda g: grads.append(g.flatten().tolist()),
    )
    return c.losses, grads, c.values


def _assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(torch.tensor(x), torch.tensor(y), rtol=1e-5, atol=1e-6)


def _lora_refs(tmp: Path) -> list[str]:
    return [f"{tmp / 'base'}+{tmp / 'a1'}", f"{tmp / 'base'}+{tmp / 'a2'}", str(tmp / "full3")]


def _full_refs(tmp: Path) -> list[str]:
    return [str(tmp / "f1"), str(tmp / "f2"), str(tmp / "full3")]


@pytest.mark.parametrize(
    ("placement", "granularity", "teacher"),
    [
        ("resident", "layer", "cached"),
        ("resident", "task", "online"),
        ("offload", "layer", "online"),
        ("stream", "tensor", "cached"),
    ],
)
def test_lora_experts_follow_the_trajectory_of_their_merged_copies(
    llama, monkeypatch, placement, granularity, teacher
):
    kw = dict(placement=placement, granularity=granularity, teacher=teacher)
    seen: list = []
    got = _trajectory(_plan(llama / "base", _lora_refs(llama), **kw), monkeypatch, seen)
    ref = _trajectory(_plan(llama / "base", _full_refs(llama), **kw))
    assert len(got[0]) == 4 and any(abs(v - 1 / 3) > 1e-3 for row in ref[2] for v in row)
    _assert_same(ref, got)
    # the LoRA run kept factors, not full task vectors: the adapted tensors as factors, the head replaced
    # by modules_to_save as a dense task vector, every other tensor of a LoRA expert as nothing
    vectors = seen[0]
    q = "model.layers.0.self_attn.q_proj.weight"
    assert vectors.kinds[q] == [LOW_RANK, ZERO, DENSE]
    assert vectors.kinds["lm_head.weight"] == [ZERO, DENSE, DENSE]
    assert vectors.kinds["model.embed_tokens.weight"] == [ZERO, LOW_RANK, DENSE]
    assert vectors.kinds["model.norm.weight"] == [ZERO, ZERO, DENSE]
    assert set(vectors.factors[q]) == {0}
    if placement != "stream":
        assert vectors.tau[q].shape[0] == 1  # only the full-weight expert's


def test_gpt2_fan_in_fan_out_and_all_lora_merge_touches_only_the_adapted_tensors(tmp_path, monkeypatch):
    """Conv1D (fan_in_fan_out) adapters, tied embeddings, only LoRA experts: the tensors no adapter touches
    are left alone in offload (not leaves, not copied), and the trajectory is the merged copies'."""
    base = make_gpt2(seed=0)
    save(base, tmp_path / "base")
    for i in (1, 2):
        _lora(base, tmp_path / f"a{i}", tmp_path / f"f{i}", i, r=2, lora_alpha=4, fan_in_fan_out=True,
              target_modules=["c_attn", "c_fc"])  # fmt: skip
    lora = [f"{tmp_path / 'base'}+{tmp_path / f'a{i}'}" for i in (1, 2)]
    full = [str(tmp_path / f"f{i}") for i in (1, 2)]
    for placement in ("resident", "offload"):
        seen: list = []
        got = _trajectory(_plan(tmp_path / "base", lora, placement=placement), monkeypatch, seen)
        ref = _trajectory(_plan(tmp_path / "base", full, placement=placement))
        _assert_same(ref, got)
        vectors = seen[0]
        assert vectors.touched == {n for n in vectors.names if n.endswith((".c_attn.weight", ".c_fc.weight"))}
        if placement == "offload":
            assert set(vectors.theta0) == vectors.touched and not vectors.tau


def test_a_lora_expert_on_another_base_is_read_as_full_weight(llama, tmp_path):
    other = tmp_path / "other-base"
    save(perturbed(make_llama(0, num_hidden_layers=2), 0.01, seed=9), other)
    plan = _plan(llama / "base", [f"{other}+{llama / 'a1'}", f"{llama / 'base'}+{llama / 'a1'}"])
    layouts = expert_layouts(plan)
    assert not layouts[0].is_low_rank and layouts[1].is_low_rank


def _factor_bytes(folder: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        return sum(
            4 * f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1]
            for k in f.keys()  # noqa: SIM118 - safe_open handles are not iterable
            if ".lora_" in k
        )


def test_the_estimate_counts_lora_experts_at_their_factors(llama):
    lora = _plan(llama / "base", _lora_refs(llama)[:2])
    full = _plan(llama / "base", _full_refs(llama)[:2])
    e_lora, e_full = (estimate_learned_memory(p, "cpu") for p in (lora, full))
    json.dumps(e_lora)
    with open(llama / "base" / "config.json") as f:
        cfg = json.load(f)
    head = cfg["vocab_size"] * cfg["hidden_size"] * 4
    assert e_full["parts"]["task_vectors"] == 2 * e_full["parts"]["model"]
    assert e_full["parts"]["low_rank_factors"] == 0
    # LoRA: the factors, plus the head a2 replaces whole (modules_to_save) as a dense task vector
    factors = _factor_bytes(llama / "a1") + _factor_bytes(llama / "a2")
    assert e_lora["parts"]["low_rank_factors"] == factors
    assert e_lora["parts"]["task_vectors"] == head
    assert e_lora["parts"]["touched"] < e_full["parts"]["touched"] == e_full["parts"]["model"]
    model = e_full["parts"]["model"]
    for p in ("resident", "offload"):
        saved = e_full["placements"][p]["host"] - e_lora["placements"][p]["host"]
        assert saved >= 2 * model - head - factors  # at least the task vectors beyond the factors
    # resident with K LoRA experts: about the base (theta_0, the merged and dL/dW of the adapted tensors)
    # plus the factors, against 3 + K models for full-weight ones
    from divmerge_core.learned.memory import RUNTIME_BYTES

    weights = e_lora["placements"]["resident"]["host"] - e_lora["parts"]["activations"] - RUNTIME_BYTES
    assert weights == model + 2 * e_lora["parts"]["touched"] + head + factors
    assert weights < 3 * model + 2 * model


PEAK = """
import ctypes, gc, json, sys, torch
# every allocation of 64 KiB or more gets its own mapping, returned to the OS when freed: one run's freed
# tensors are not reused by the next, so each run's peak RSS above where it started is its own
ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD
torch.set_num_threads(1)
from divmerge_core.config import parse_config
from divmerge_core.learned import learn_coefficients
from divmerge_core.pipeline import prepare
from divmerge_core.progress import Reporter

def kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))

out = []
for cfg in json.loads(sys.argv[1]):
    plan = prepare(parse_config(cfg))
    gc.collect()
    start = kib("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    learn_coefficients(plan, device=torch.device("cpu"), reporter=Reporter())
    out.append((kib("VmHWM:") - start) / 1024)
    del plan
print(json.dumps(out))
"""


@pytest.mark.timeout(1800)
def test_peak_rss_grows_with_k_far_less_for_lora_experts(tmp_path):
    """Peak RSS above the start of K=1 and K=3 resident merges on a 9.5M-parameter Llama (36 MiB fp32), in
    one subprocess (VmHWM reset before each run)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs")
    torch.manual_seed(0)
    tok = make_tokenizer("gpt2")
    config = LlamaConfig(vocab_size=len(tok), hidden_size=384, intermediate_size=1536, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.eos_token_id)  # fmt: skip
    base = LlamaForCausalLM(config).eval()
    save(base, tmp_path / "base")
    for i in (1, 2, 3):
        _lora(base, tmp_path / f"a{i}", tmp_path / f"f{i}", i, r=4, lora_alpha=8,
              target_modules=["q_proj", "v_proj"])  # fmt: skip
    model_mib = sum(p.numel() for p in base.parameters()) * 4 / 2**20

    def cfg(models: list[str]) -> dict:
        return {
            "merge_method": "divmerge",
            "base_model": str(tmp_path / "base"),
            "models": [{"model": m, "data": {"texts": ["a b c", "cat dog"]}} for m in models],
            "parameters": {
                "placement": "resident",
                "epochs": 1,
                "batch_size_per_task": 2,
                "max_new_tokens": 2,
            },
        }

    lora = [f"{tmp_path / 'base'}+{tmp_path / f'a{i}'}" for i in (1, 2, 3)]
    full = [str(tmp_path / f"f{i}") for i in (1, 2, 3)]
    runs = [cfg(lora[:1]), cfg(lora), cfg(full[:1]), cfg(full)]
    out = subprocess.run([sys.executable, "-c", PEAK, json.dumps(runs)], cwd=ROOT, capture_output=True,
                         text=True, check=True)  # fmt: skip
    l1, l3, f1, f3 = json.loads(out.stdout.strip().splitlines()[-1])
    grow_lora, grow_full = l3 - l1, f3 - f1
    # full: two more task vectors (2 models) at least; LoRA: two more sets of factors (~0)
    assert grow_full > 1.5 * model_mib, (l1, l3, f1, f3, model_mib)
    assert grow_lora < 0.5 * model_mib, (l1, l3, f1, f3, model_mib)


@pytest.mark.parametrize(("params", "field"), [
    ({"tau_sparsify": "magnitude"}, "parameters.tau_sparsify"),
    ({"tau_consensus": "sign"}, "parameters.tau_consensus"),
])  # fmt: skip
def test_trimmed_task_vectors_refuse_lora_factors(llama, params, field):
    """Trimming needs dense task vectors; LoRA experts over the base keep factors: refused at prepare, by name
    (their merged full-weight copies are accepted)."""
    with pytest.raises(ConfigError) as err:
        _plan(llama / "base", _lora_refs(llama), **params)
    assert err.value.field == field and "LoRA" in str(err.value) and "[0, 1]" in str(err.value)
    assert _plan(llama / "base", _full_refs(llama), **params).config.parameters.tau_consensus is not None
