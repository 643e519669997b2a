"""mergekit's own example configs (adapted to tiny local models) load and give mergekit's tensors.

The reference tensors come from ``mergekit-yaml`` 0.1.5 run in the test, in its own virtualenv
(``benchmarks/.venvs/mergekit``, made by ``scripts/setup.sh``: mergekit pins its own transformers/peft
range). Without that venv the comparisons are skipped, with the reason.
"""

from __future__ import annotations

import copy
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from divmerge_core import parse_config, run_merge
from divmerge_core.errors import ConfigError
from divmerge_core.methods.settings import evaluate
from divmerge_core.pipeline import prepare

from .merge_models import llama_family

ROOT = Path(__file__).resolve().parents[1]
MERGEKIT_YAML = ROOT / "benchmarks" / ".venvs" / "mergekit" / "bin" / "mergekit-yaml"
needs_mergekit = pytest.mark.skipif(
    not MERGEKIT_YAML.exists(),
    reason=f"mergekit venv missing ({MERGEKIT_YAML.parent.parent}; scripts/setup.sh creates it)",
)

# mergekit/examples/gradient-slerp.yml, with our tiny 4-layer models
GRADIENT_SLERP = {
    "slices": [
        {
            "sources": [
                {"model": "BASE", "layer_range": [0, 4]},
                {"model": "T1", "layer_range": [0, 4]},
            ]
        }
    ],
    "merge_method": "slerp",
    "base_model": "BASE",
    "parameters": {
        "t": [
            {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
            {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
            {"value": 0.5},
        ]
    },
    "dtype": "float32",
}
# mergekit/examples/ties.yml (density and weight gradients, a filtered weight, int8_mask)
TIES = {
    "models": [
        {"model": "T1", "parameters": {"density": [1, 0.7, 0.1], "weight": 1.0}},
        {"model": "T2", "parameters": {"density": 0.5, "weight": [0, 0.3, 0.7, 1]}},
        {
            "model": "T3",
            "parameters": {"density": 0.33, "weight": [{"filter": "mlp", "value": 0.5}, {"value": 0}]},
        },
    ],
    "merge_method": "ties",
    "base_model": "BASE",
    "parameters": {"normalize": True, "int8_mask": True},
    "dtype": "float32",
}
# mergekit/examples/linear.yml
LINEAR = {
    "models": [
        {"model": "T1", "parameters": {"weight": 1.0}},
        {"model": "T2", "parameters": {"weight": 0.3}},
        {"model": "T3", "parameters": {"weight": 0.5}},
    ],
    "merge_method": "linear",
    "dtype": "float32",
}
# task arithmetic with per-model and global gradients and filters
GRADIENT_TASK_ARITHMETIC = {
    "models": [
        {"model": "T1", "parameters": {"weight": [0.2, 0.8]}},
        {
            "model": "T2",
            "parameters": {"weight": [{"filter": "self_attn", "value": [1.0, 0.0, 0.5]}, {"value": 0.4}]},
        },
    ],
    "merge_method": "task_arithmetic",
    "base_model": "BASE",
    "parameters": {"lambda": [0.5, 1.0]},
    "dtype": "float32",
}


def _task_vector_config(method: str, **parameters) -> dict:
    """Three task models with their own weights and densities (and gradients), mergekit-style."""
    models = [
        {"model": "T1", "parameters": {"weight": 1.0, "density": [0.9, 0.4]}},
        {"model": "T2", "parameters": {"weight": [0.2, 0.9], "density": 0.5}},
        {"model": "T3", "parameters": {"weight": [{"filter": "mlp", "value": -0.4}, {"value": 0.6}]}},
    ]
    cfg = {"models": models, "merge_method": method, "base_model": "BASE", "dtype": "float32"}
    if parameters:
        cfg["parameters"] = parameters
    return cfg


#: Deterministic task-vector methods: every tensor equal to mergekit's.
TASK_VECTOR_EXAMPLES = {
    "ties_example": TIES,
    "ties": _task_vector_config("ties"),
    "ties_sum_lambda": _task_vector_config("ties", normalize=False, **{"lambda": 0.7}),
    "ties_rescaled": _task_vector_config("ties", rescale=True),
    "task_arithmetic_normalized": _task_vector_config("task_arithmetic", normalize=True),
    "breadcrumbs": _task_vector_config("breadcrumbs", gamma=0.05),
    "breadcrumbs_ties": _task_vector_config("breadcrumbs_ties", gamma=[0.0, 0.1], normalize=True),
}
for _cfg in TASK_VECTOR_EXAMPLES.values():
    if _cfg["merge_method"] == "task_arithmetic":
        for _m in _cfg["models"]:
            _m["parameters"].pop("density", None)


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    return llama_family(tmp_path_factory.mktemp("llama"), n=3)


def _fill(cfg: dict, fam: dict[str, Path]) -> dict:
    """The config with BASE/T1.. replaced by the model folders."""
    names = {"BASE": str(fam["base"]), **{f"T{i}": str(fam[f"t{i}"]) for i in range(1, 4)}}

    def walk(v):
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        return names.get(v, v) if isinstance(v, str) else v

    return walk(copy.deepcopy(cfg))


def _ours(cfg: dict, out: Path) -> dict[str, torch.Tensor]:
    result = run_merge(parse_config(cfg), out, device="cpu")
    return load_file(result.out_dir / "model.safetensors")


def _mergekit(cfg: dict, tmp: Path, extra: tuple[str, ...] = ("--lazy-unpickle",)) -> dict[str, torch.Tensor]:
    """``cfg`` through mergekit-yaml (``extra``: its options beside ``--no-cuda``); the written tensors."""
    config = tmp / "mergekit.yml"
    config.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    out = tmp / "mergekit-out"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [str(MERGEKIT_YAML), str(config), str(out), "--no-cuda", *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def _assert_same(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert set(ours) == set(theirs)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6, msg=name)


@needs_mergekit
@pytest.mark.parametrize(
    "example",
    ["gradient_slerp_slices", "gradient_slerp_models", "linear", "gradient_task_arithmetic"],
)
def test_mergekit_examples_give_mergekits_tensors(family, tmp_path, example):
    if example == "gradient_slerp_models":  # the example's "equivalent models: syntax"
        cfg = {k: v for k, v in GRADIENT_SLERP.items() if k != "slices"}
        cfg["models"] = [{"model": "BASE"}, {"model": "T1"}]
    else:
        cfg = {
            "gradient_slerp_slices": GRADIENT_SLERP,
            "linear": LINEAR,
            "gradient_task_arithmetic": GRADIENT_TASK_ARITHMETIC,
        }[example]
    cfg = _fill(cfg, family)
    ours = _ours(cfg, tmp_path / "ours")
    theirs = _mergekit(cfg, tmp_path)
    _assert_same(ours, theirs)
    base = load_file(family["base"] / "model.safetensors")
    assert any(not torch.equal(ours[n], base[n]) for n in ours)  # a merge happened


@needs_mergekit
@pytest.mark.parametrize("example", list(TASK_VECTOR_EXAMPLES))
def test_task_vector_methods_give_mergekits_tensors(family, tmp_path, example):
    """The generalized task arithmetic (ties, breadcrumbs*, task_arithmetic): mergekit's tensors."""
    cfg = _fill(TASK_VECTOR_EXAMPLES[example], family)
    ours = _ours(cfg, tmp_path / "ours")
    _assert_same(ours, _mergekit(cfg, tmp_path))
    base = load_file(family["base"] / "model.safetensors")
    assert any(not torch.equal(ours[n], base[n]) for n in ours)


def _models(method: str, n: int, base: bool = True, per_model: list | None = None, **parameters) -> dict:
    cfg: dict = {
        "models": [
            {"model": f"T{i}", **({"parameters": per_model[i - 1]} if per_model else {})}
            for i in range(1, n + 1)
        ],
        "merge_method": method,
        "dtype": "float32",
    }
    if base:
        cfg["base_model"] = "BASE"
    if parameters:
        cfg["parameters"] = parameters
    return cfg


#: The other deterministic methods: every tensor equal to mergekit's.
OTHER_EXAMPLES = {
    "model_stock": _models("model_stock", 3),
    "model_stock_filter_wise": _models("model_stock", 2, filter_wise=True),
    "nearswap": _models("nearswap", 1, t=[0.05, 0.5]),
    "karcher": _models("karcher", 3, base=False),
    "karcher_with_base": _models("karcher", 2, max_iter=5),
    "nuslerp": _models("nuslerp", 2, base=False, per_model=[{"weight": 0.3}, {"weight": 0.9}]),
    "nuslerp_task_vectors_rows": _models(
        "nuslerp", 2, per_model=[{"weight": 1.0}, {"weight": 0.4}], nuslerp_flatten=False
    ),
    "sce": _models("sce", 3),
    "sce_select_topk": _models("sce", 3, select_topk=0.4),
    "arcee_fusion": _models("arcee_fusion", 1),
    "ram": _models("ram", 3, epsilon=0.2),
    "ramplus_tl": _models("ramplus_tl", 3, epsilon=0.2, r=0.5, alpha=0.6),
    "passthrough": _models("passthrough", 1, base=False),
    "passthrough_scaled": _models(
        "passthrough",
        1,
        base=False,
        per_model=[{"scale": [{"filter": "o_proj", "value": 0.5}, {"value": 1.0}]}],
    ),
}

#: A frankenmerge: layers 0-2 of T1 then 1-3 of T2 (one scaled) and 3 of T1 again: 7 layers from 4.
FRANKENMERGE = {
    "slices": [
        {"sources": [{"model": "T1", "layer_range": [0, 3]}]},
        {
            "sources": [
                {
                    "model": "T2",
                    "layer_range": [1, 4],
                    "parameters": {"scale": [{"filter": "down_proj", "value": [0.2, 1.0]}, {"value": 1.0}]},
                }
            ]
        },
        {"sources": [{"model": "T1", "layer_range": [3, 4]}]},
    ],
    "merge_method": "passthrough",
    "dtype": "float32",
}


@needs_mergekit
def test_passthrough_slices_build_mergekits_frankenmerge(family, tmp_path):
    import json

    cfg = _fill(FRANKENMERGE, family)
    ours = _ours(cfg, tmp_path / "ours")
    theirs = _mergekit(cfg, tmp_path)
    _assert_same(ours, theirs)
    assert max(int(n.split(".")[2]) for n in ours if n.startswith("model.layers.")) == 6
    for out in (tmp_path / "ours", tmp_path / "mergekit-out"):
        assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 7
    t1, t2 = (load_file(family[k] / "model.safetensors") for k in ("t1", "t2"))
    name = "model.layers.{}.self_attn.q_proj.weight"
    assert torch.equal(ours[name.format(2)], t1[name.format(2)])
    assert torch.equal(ours[name.format(3)], t2[name.format(1)])
    assert torch.equal(ours[name.format(6)], t1[name.format(3)])
    assert torch.equal(ours["model.embed_tokens.weight"], t1["model.embed_tokens.weight"])
    assert torch.equal(ours["lm_head.weight"], t1["lm_head.weight"])
    # the merged model loads with its new layer count
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "ours").config.num_hidden_layers == 7


@needs_mergekit
@pytest.mark.parametrize("example", list(OTHER_EXAMPLES))
def test_other_methods_give_mergekits_tensors(family, tmp_path, example):
    cfg = _fill(OTHER_EXAMPLES[example], family)
    ours = _ours(cfg, tmp_path / "ours")
    _assert_same(ours, _mergekit(cfg, tmp_path))
    base = load_file(family["base"] / "model.safetensors")
    assert any(not torch.equal(ours[n], base[n]) for n in ours)


def _one_model(method: str, **model_parameters) -> dict:
    return {
        "models": [{"model": "T1", "parameters": {"weight": 1.0, **model_parameters}}],
        "merge_method": method,
        "base_model": "BASE",
        "dtype": "float32",
    }


#: Randomised methods: mergekit draws from torch's global generator in its own task order, we from a
#: generator seeded per tensor, so the masks differ; the kept fraction and the rescaling must not.
RANDOM_EXAMPLES = {
    "dare_linear": _one_model("dare_linear", density=0.5),
    "dare_ties": _one_model("dare_ties", density=0.3),
    "della": _one_model("della", density=0.5, epsilon=0.2),
    "della_linear": _one_model("della_linear", density=0.4, epsilon=0.3),
}


def _kept_statistics(merged, base, expert) -> tuple[float, float, float, float]:
    """(kept fraction, kept fraction among each row's larger half of |delta|, among its smaller half,
    worst relative L1-norm change of a tensor's task vector) over the float tensors."""
    kept = total = kept_big = n_big = kept_small = n_small = 0
    worst = 0.0
    for name, out in merged.items():
        delta = expert[name] - base[name]
        if not delta.is_floating_point() or not bool(delta.any()):
            continue
        tv = out - base[name]
        keep = tv != 0
        kept += int(keep.sum())
        total += keep.numel()
        rows = delta.abs().reshape(1, -1) if delta.dim() < 2 else delta.abs().reshape(delta.shape[0], -1)
        big = rows > rows.median(dim=1, keepdim=True).values
        flat_keep = keep.reshape(rows.shape)
        kept_big += int(flat_keep[big].sum())
        n_big += int(big.sum())
        kept_small += int(flat_keep[~big].sum())
        n_small += int((~big).sum())
        worst = max(worst, abs(tv.abs().sum().item() / delta.abs().sum().item() - 1))
    return kept / total, kept_big / n_big, kept_small / n_small, worst


@needs_mergekit
@pytest.mark.parametrize("example", list(RANDOM_EXAMPLES))
def test_random_methods_keep_mergekits_fraction_and_rescaling(family, tmp_path, example):
    cfg = _fill(RANDOM_EXAMPLES[example], family)
    p = cfg["models"][0]["parameters"]
    density, epsilon = p["density"], p.get("epsilon", 0.0)
    ours = _ours(cfg, tmp_path / "ours")
    theirs = _mergekit(cfg, tmp_path)
    assert set(ours) == set(theirs)
    base = load_file(family["base"] / "model.safetensors")
    expert = load_file(family["t1"] / "model.safetensors")
    mine, ref = _kept_statistics(ours, base, expert), _kept_statistics(theirs, base, expert)
    for kept, big, small, worst in (mine, ref):
        assert abs(kept - density) < 0.02
        # DELLA keeps the larger magnitudes more often: density +/- epsilon/2 on average per half
        assert abs(big - (density + epsilon / 2)) < 0.03 and abs(small - (density - epsilon / 2)) < 0.03
        assert worst < 1e-4  # each task vector rescaled back to its L1 norm
    assert all(abs(a - b) < 0.03 for a, b in zip(mine[:3], ref[:3], strict=True))


@needs_mergekit
def test_slerp_two_slices_with_their_own_t(family, tmp_path):
    """Two slices, each with its own gradient: t restarts at 0 in each slice, as in mergekit."""
    cfg = _fill(
        {
            "slices": [
                {
                    "sources": [{"model": m, "layer_range": [a, b]} for m in ("BASE", "T1")],
                    "parameters": {"t": t},
                }
                for (a, b), t in (((0, 2), [0.0, 1.0]), ((2, 4), [0.9, 0.2]))
            ],
            "merge_method": "slerp",
            "base_model": "BASE",
            "dtype": "float32",
        },
        family,
    )
    _assert_same(_ours(cfg, tmp_path / "ours"), _mergekit(cfg, tmp_path))


def test_ties_example_loads_and_warns_about_int8_mask(family):
    cfg = parse_config(_fill(TIES, family))
    assert cfg.warnings() == [
        "parameters.int8_mask: accepted for mergekit compatibility and ignored: masks are boolean tensors "
        "here, the int8 storage trick saves nothing"
    ]


def test_gradient_is_interpolated_over_the_layers_like_mergekit():
    """mergekit's evaluate_setting: linear interpolation at t, filters by substring, first match wins."""
    assert evaluate([0.0, 1.0], "x", 0.25) == 0.25
    assert evaluate([0, 0.5, 0.3, 0.7, 1], "x", 0.5) == 0.3
    assert evaluate([0, 0.5, 0.3, 0.7, 1], "x", 0.375) == pytest.approx(0.4)
    cfg = parse_config(
        {
            "merge_method": "slerp",
            "base_model": "/a",
            "models": [{"model": "/b"}],
            "parameters": GRADIENT_SLERP["parameters"],
        }
    )
    conds = cfg.parameters.t
    assert evaluate(conds, "model.layers.1.self_attn.q_proj.weight", 1.0) == 1
    assert evaluate(conds, "model.layers.1.mlp.up_proj.weight", 1.0) == 0
    assert evaluate(conds, "model.norm.weight", 1.0) == 0.5


def test_unmatched_filter_without_fallback_is_a_config_error(family):
    cfg = _fill(
        {
            "merge_method": "slerp",
            "base_model": "BASE",
            "models": [{"model": "BASE"}, {"model": "T1"}],
            "parameters": {"t": [{"filter": "mlp", "value": 0.5}]},
        },
        family,
    )
    with pytest.raises(ConfigError, match="'t' has no value for tensor") as err:
        prepare(parse_config(cfg))
    assert err.value.field == "parameters.t"


@pytest.mark.parametrize(
    ("slices", "message"),
    [
        ([((0, 2), (0, 2)), ((3, 4), (3, 4))], "starts at 3, expected 2"),
        ([((0, 4), (0, 3))], "same 'layer_range'"),
    ],
)
def test_slices_that_change_the_layer_layout_are_refused(slices, message):
    cfg = {
        "merge_method": "slerp",
        "base_model": "/a",
        "parameters": {"t": 0.5},
        "slices": [
            {"sources": [{"model": "/a", "layer_range": list(ra)}, {"model": "/b", "layer_range": list(rb)}]}
            for ra, rb in slices
        ],
    }
    with pytest.raises(ConfigError, match=message):
        parse_config(cfg)


def test_passthrough_slices_take_one_source_each_and_existing_layers(family):
    two = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": "/a", "layer_range": [0, 2]}, {"model": "/b", "layer_range": [0, 2]}]}
        ],
    }
    with pytest.raises(ConfigError, match="exactly one source") as err:
        parse_config(two)
    assert err.value.field == "slices.0.sources"
    beyond = _fill(
        {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": "T1", "layer_range": [0, 4]}]},
                {"sources": [{"model": "T2", "layer_range": [2, 6]}]},
            ],
        },
        family,
    )
    with pytest.raises(ConfigError, match="takes layers 2-6 of .* which has 4 layers") as err:
        prepare(parse_config(beyond))
    assert err.value.field == "slices.1.sources.0.layer_range"


def test_slices_must_cover_every_layer(family):
    cfg = _fill(
        {
            "merge_method": "slerp",
            "base_model": "BASE",
            "parameters": {"t": 0.5},
            "slices": [{"sources": [{"model": m, "layer_range": [0, 3]} for m in ("BASE", "T1")]}],
        },
        family,
    )
    with pytest.raises(ConfigError, match="cover layers 0-3, the models have 4 layers") as err:
        prepare(parse_config(cfg))
    assert err.value.field == "slices"


def test_bare_local_folder_name_is_resolved_locally(family, tmp_path, monkeypatch):
    """``model: my-expert`` (a folder in the current directory) is that folder, not a Hub id."""
    import shutil

    shutil.copytree(family["t1"], tmp_path / "my-expert")
    monkeypatch.chdir(tmp_path)
    cfg = parse_config(
        {"merge_method": "linear", "models": [{"model": "my-expert"}, {"model": str(family["t2"])}]}
    )
    plan = prepare(cfg)
    assert plan.models[0].path == (tmp_path / "my-expert").resolve() and plan.models[0].commit is None


@pytest.mark.parametrize(
    "cfg",
    [GRADIENT_SLERP, TIES, GRADIENT_TASK_ARITHMETIC, FRANKENMERGE],
    ids=["slerp", "ties", "ta", "passthrough"],
)
def test_a_dumped_config_loads_again(cfg):
    """merge_config.yaml and the service's stored spec (dumps of the config) validate as the same config."""
    config = parse_config(
        _fill(cfg, {"base": Path("/m/base"), **{f"t{i}": Path(f"/m/t{i}") for i in (1, 2, 3)}})
    )
    again = parse_config(yaml.safe_load(config.to_yaml()))
    assert again == config
    assert parse_config(config.model_dump(mode="json", by_alias=True, exclude_none=True)) == config
