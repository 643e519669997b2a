"""Classic merge methods: identities, mergekit formulas, and exact agreement with peft's TIES/DARE."""

from __future__ import annotations

import pytest
import torch
from peft.utils import merge_utils as peft_merge
from safetensors.torch import load_file

from divmerge_core import parse_config, run_merge
from divmerge_core.errors import ConfigError
from divmerge_core.methods import registry, sparsify
from divmerge_core.methods.base import TensorInputs
from divmerge_core.pipeline import prepare

from .merge_models import bert_family, config_dict

METHODS = ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "multislerp"]


def merge_tensor(method, base, models, weights, densities, *, generator=None, stream=False, **params):
    """One tensor through a method's registered function, parameters at the method's defaults."""
    m = registry.get_method(method)
    values = {k: f.get_default() for k, f in m.parameters.model_fields.items() if not f.is_required()}
    values.update(params)
    defaults = {k: f.get_default() for k, f in m.model_parameters.model_fields.items() if not f.is_required()}
    per_model = [{**defaults, "weight": w, "density": d} for w, d in zip(weights, densities, strict=True)]
    copies = [t.clone() for t in models]
    stacked = (c for c in copies) if stream else torch.stack(copies)
    return m.merge(
        TensorInputs("t", None if base is None else base.clone(), stacked, per_model, values, generator)
    )


def ties_deltas(deltas, weights, densities, *, disjoint_mean=True):
    stacked = torch.stack([d.clone() for d in deltas])
    for row, p in zip(stacked, densities, strict=True):
        sparsify.magnitude_prune_(row, p)
    return sparsify.elect_and_merge_(stacked, weights, disjoint_mean)


def dare_deltas(deltas, weights, densities, *, generator, ties_merge):
    stacked = torch.stack([d.clone() for d in deltas])
    for row, p in zip(stacked, densities, strict=True):
        sparsify.random_prune_(row, p, generator=generator)
    if ties_merge:
        return sparsify.elect_and_merge_(stacked, weights, True)
    return stacked.mul_(sparsify.weights_like(weights, stacked)).sum(dim=0)


@pytest.fixture(scope="module")
def tensors():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(16, 12, generator=gen)
    models = [base + 0.1 * torch.randn(16, 12, generator=gen) for _ in range(3)]
    return base, models


# --- identities --------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_linear", "dare_ties"])
def test_zero_weights_give_the_base(tensors, method):
    base, models = tensors
    out = merge_tensor(method, base, models, [0.0] * 3, [0.5] * 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, base)


@pytest.mark.parametrize("method", METHODS)
def test_single_model_with_weight_one_is_that_model(tensors, method):
    base, models = tensors
    out = merge_tensor(method, base, models[:1], [1.0], [1.0])
    torch.testing.assert_close(out, models[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["linear", "multislerp"])
def test_merging_identical_models_gives_the_model(tensors, method):
    _, models = tensors
    out = merge_tensor(method, None, [models[0]] * 3, [0.2, 0.3, 0.5], [1.0] * 3)
    torch.testing.assert_close(out, models[0], rtol=1e-5, atol=1e-5)


# --- mergekit formulas --------------------------------------------------------------------------------
def test_linear_formula(tensors):
    _, (a, b, c) = tensors
    w = [1.0, 2.0, 3.0]
    torch.testing.assert_close(merge_tensor("linear", None, [a, b, c], w, [1.0] * 3), (a + 2 * b + 3 * c) / 6)
    torch.testing.assert_close(
        merge_tensor("linear", None, [a, b, c], w, [1.0] * 3, normalize=False), a + 2 * b + 3 * c
    )


def test_task_arithmetic_formula(tensors):
    base, (a, b, _) = tensors
    w = [0.5, 1.5]
    expected = base + 0.7 * (0.5 * (a - base) + 1.5 * (b - base))
    torch.testing.assert_close(
        merge_tensor("task_arithmetic", base, [a, b], w, [1.0] * 2, lambda_=0.7), expected
    )
    normalized = base + 0.7 * (0.5 * (a - base) + 1.5 * (b - base)) / 2.0
    torch.testing.assert_close(
        merge_tensor("task_arithmetic", base, [a, b], w, [1.0] * 2, lambda_=0.7, normalize=True), normalized
    )


def test_base_listed_among_models(tmp_path):
    """mergekit drops the base from the task models of task-vector methods; linear averages it in."""
    fam = bert_family(tmp_path, n=1)
    ta = parse_config(config_dict("task_arithmetic", fam["base"], [fam["base"], fam["t1"]]))
    assert [m.ref.raw for m in prepare(ta).models] == [str(fam["t1"])]
    lin = parse_config(config_dict("linear", fam["base"], [fam["base"], fam["t1"]]))
    assert len(prepare(lin).models) == 2


def test_pipeline_matches_formula(tmp_path):
    fam = bert_family(tmp_path, n=2)
    cfg = config_dict("task_arithmetic", fam["base"], [fam["t1"], fam["t2"]], **{"lambda": 0.5})
    cfg["models"][0]["parameters"] = {"weight": 0.3}
    config = parse_config(cfg)
    result = run_merge(config, tmp_path / "out", plan=prepare(config))  # a plan made earlier is reused
    merged = load_file(result.out_dir / "model.safetensors")
    base, t1, t2 = (load_file(fam[k] / "model.safetensors") for k in ("base", "t1", "t2"))
    for name, value in merged.items():
        expected = base[name] + 0.5 * (0.3 * (t1[name] - base[name]) + (t2[name] - base[name]))
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)


def test_linear_weights_summing_to_zero_is_a_config_error(tmp_path):
    fam = bert_family(tmp_path, n=2)
    cfg = config_dict("linear", None, [fam["t1"], fam["t2"]])
    cfg["models"][0]["parameters"] = {"weight": 1.0}
    cfg["models"][1]["parameters"] = {"weight": -1.0}
    with pytest.raises(ConfigError, match="sum of the model weights"):
        prepare(parse_config(cfg))


# --- peft agreement ------------------------------------------------------------------------------------
@pytest.mark.parametrize("density", [0.2, 0.5])
def test_ties_equals_peft(tensors, density):
    base, models = tensors
    deltas = [m - base for m in models]
    w = [0.5, 1.0, 0.8]
    ours = ties_deltas(deltas, w, [density] * 3)
    theirs = peft_merge.ties(deltas, torch.tensor(w), density)
    assert torch.equal(ours, theirs)
    # the registered method with variant: peft: base + peft's mix, bit for bit
    assert torch.equal(merge_tensor("ties", base, models, w, [density] * 3, variant="peft"), theirs + base)
    for d in deltas:
        assert torch.equal(
            sparsify.magnitude_prune(d, density), peft_merge.magnitude_based_pruning(d, density)
        )


@pytest.mark.parametrize("seed", [0, 7])
def test_dare_equals_peft(tensors, seed):
    base, models = tensors
    deltas = [m - base for m in models]
    w = [0.5, 1.0, 0.8]
    torch.manual_seed(seed)
    theirs_linear = peft_merge.dare_linear(deltas, torch.tensor(w), 0.3)
    torch.manual_seed(seed)
    theirs_ties = peft_merge.dare_ties(deltas, torch.tensor(w), 0.3)
    torch.manual_seed(seed)
    theirs_prune = peft_merge.random_pruning(deltas[0], 0.3, rescale=True)
    ours_linear = dare_deltas(
        deltas, w, [0.3] * 3, generator=torch.Generator().manual_seed(seed), ties_merge=False
    )
    ours_ties = dare_deltas(
        deltas, w, [0.3] * 3, generator=torch.Generator().manual_seed(seed), ties_merge=True
    )
    ours_prune = sparsify.random_prune(deltas[0], 0.3, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(ours_linear, theirs_linear)
    assert torch.equal(ours_ties, theirs_ties)
    assert torch.equal(ours_prune, theirs_prune)


@pytest.mark.parametrize("seed", [0, 7])
def test_dare_variant_peft_is_peft(tensors, seed):
    """The registered dare_* with variant: peft (dare_ties with normalize: true) give peft's mixes."""
    base, models = tensors
    deltas = [m - base for m in models]
    w = [0.5, 1.0, 0.8]
    for method, peft_fn, extra in (
        ("dare_linear", peft_merge.dare_linear, {}),
        ("dare_ties", peft_merge.dare_ties, {"normalize": True}),
    ):
        torch.manual_seed(seed)
        theirs = peft_fn(deltas, torch.tensor(w), 0.3)
        gen = torch.Generator().manual_seed(seed)
        ours = merge_tensor(method, base, models, w, [0.3] * 3, generator=gen, variant="peft", **extra)
        assert torch.equal(ours, theirs + base), method


def test_mergekit_variant_rescales_to_the_l1_norm(tensors):
    """mergekit's DARE: kept entries scaled so the task vector keeps its L1 norm (not 1/density)."""
    base, models = tensors
    delta = models[0] - base
    out = merge_tensor(
        "dare_linear", base, models[:1], [1.0], [0.25], generator=torch.Generator().manual_seed(0)
    )
    pruned = out - base
    kept = pruned != 0
    assert 0.1 < kept.float().mean().item() < 0.4
    torch.testing.assert_close(pruned.abs().sum(), delta.abs().sum(), rtol=1e-5, atol=0)
    ratio = pruned[kept] / delta[kept]
    torch.testing.assert_close(ratio, torch.full_like(ratio, ratio[0].item()), rtol=1e-4, atol=0)


def test_dare_keeps_density_and_rescales(tensors):
    base, models = tensors
    delta = models[0] - base
    pruned = sparsify.random_prune(delta, 0.25, generator=torch.Generator().manual_seed(0))
    kept = pruned != 0
    assert 0.1 < kept.float().mean().item() < 0.4
    torch.testing.assert_close(pruned[kept], delta[kept] / 0.25)


def test_per_model_density_applies_per_task(tensors):
    base, models = tensors
    deltas = [m - base for m in models[:2]]
    mixed = ties_deltas(deltas, [1.0, 0.0], [0.1, 1.0])
    assert (mixed != 0).sum().item() <= int(0.1 * deltas[0].numel())


# --- multislerp ---------------------------------------------------------------------------------------
def test_multislerp_two_orthogonal_vectors_stays_on_the_sphere():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    out = merge_tensor("multislerp", None, [a, b], [0.5, 0.5], [1.0, 1.0])
    torch.testing.assert_close(out, torch.tensor([2**-0.5, 2**-0.5]), rtol=1e-4, atol=1e-4)
    assert abs(out.norm().item() - 1.0) < 1e-4


def test_multislerp_relative_to_base(tensors):
    base, models = tensors
    out = merge_tensor("multislerp", base, models, [1.0, 1.0, 1.0], [1.0] * 3)
    norms = torch.stack([(m - base).norm() for m in models])
    assert out.shape == base.shape
    assert abs((out - base).norm().item() - norms.mean().item()) < 1e-3
    untouched = merge_tensor("multislerp", base, [base, base, base], [1.0, 1.0, 1.0], [1.0] * 3)
    assert torch.equal(untouched, base)


def test_dare_merge_is_reproducible_from_the_seed(tmp_path):
    fam = bert_family(tmp_path / "m", n=2)

    def merged(seed: int, out: str) -> dict[str, torch.Tensor]:
        cfg = config_dict("dare_ties", fam["base"], [fam["t1"], fam["t2"]], density=0.5, seed=seed)
        return load_file(run_merge(parse_config(cfg), tmp_path / out).out_dir / "model.safetensors")

    a, b, c = merged(3, "a"), merged(3, "b"), merged(4, "c")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)


# --- fast paths: unsorted topk mask and in-place stacked merges ----------------------------------------
def _peft_prune(t: torch.Tensor, density: float) -> torch.Tensor:
    return peft_merge.magnitude_based_pruning(t, density)


@pytest.mark.parametrize(
    "make",
    [
        lambda g: torch.randn(3000, generator=g),  # distinct magnitudes
        lambda g: torch.randint(-3, 4, (40, 25), generator=g).float(),  # many ties at the threshold
        lambda g: torch.randn(500, generator=g).round(decimals=1),  # a few ties
        lambda g: torch.randn(7, 11, generator=g).sign(),  # all magnitudes equal (or zero)
        lambda g: torch.zeros(64),
        lambda g: torch.cat([torch.randn(100, generator=g), torch.tensor([float("nan"), -float("inf")])]),
        lambda g: torch.randn(64, 32, generator=g).bfloat16(),  # coarse dtype: ties are common
        lambda g: torch.randn(64, 32, generator=g).half(),
        lambda g: torch.randn(300, generator=g).double(),
        lambda g: torch.randn(5000, generator=g) * torch.logspace(-30, 30, 5000),  # wide exponent range
    ],
)
@pytest.mark.parametrize("density", [0.001, 0.2, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("radix", [False, True], ids=["topk", "radix"])
def test_magnitude_prune_equals_peft_topk_with_ties(make, density, radix, monkeypatch):
    if radix:  # every float32 tensor takes the radix threshold (falling back to topk on a straddling tie)
        monkeypatch.setattr(sparsify, "RADIX_MIN_NUMEL", 1)
    t = make(torch.Generator().manual_seed(3))
    ours, theirs = sparsify.magnitude_prune(t, density), _peft_prune(t, density)
    assert torch.equal(ours.isnan(), theirs.isnan())
    assert torch.equal(ours.nan_to_num(), theirs.nan_to_num())
    inplace = sparsify.magnitude_prune_(t.clone(), density)
    assert torch.equal(inplace.nan_to_num(), theirs.nan_to_num())


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "breadcrumbs", "della_linear"])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_streaming_methods_give_the_same_from_one_buffer(method, k):
    """Methods without consensus read one model at a time (a generator refilling a buffer): same result."""
    gen = torch.Generator().manual_seed(k)
    base = torch.randn(33, 17, generator=gen)
    models = [base + 0.1 * torch.randn(33, 17, generator=gen) for _ in range(k)]
    w, d = [0.3 + 0.2 * i for i in range(k)], [0.4 + 0.1 * i for i in range(k)]
    kw = {"lambda_": 0.7} if method != "linear" else {}
    stacked = merge_tensor(method, base, models, w, d, generator=torch.Generator().manual_seed(1), **kw)
    streamed = merge_tensor(
        method, base, models, w, d, generator=torch.Generator().manual_seed(1), stream=True, **kw
    )
    assert registry.get_method(method).streams
    assert torch.equal(stacked, streamed)


def test_ties_large_tensor_equals_peft():
    gen = torch.Generator().manual_seed(5)
    deltas = [torch.randn(300, 400, generator=gen) for _ in range(4)]
    w = [0.4, 0.3, 0.2, 0.1]
    theirs = peft_merge.ties(deltas, torch.tensor(w), 0.35)
    assert torch.equal(ties_deltas(deltas, w, [0.35] * 4), theirs)


@pytest.mark.parametrize(
    "make",
    [
        lambda g: torch.randn(300_000, generator=g),
        lambda g: torch.randn(300_000, generator=g) * 1e-30,  # subnormal and tiny magnitudes
        lambda g: torch.randint(-2000, 2001, (300_000,), generator=g).float(),  # ties everywhere
        lambda g: torch.cat([torch.zeros(200_000), torch.randn(100_000, generator=g)]),  # k-th is zero
        lambda g: torch.cat([torch.randn(99_990, generator=g), torch.tensor([float("nan")] * 10)]),
    ],
)
@pytest.mark.parametrize("density", [1e-5, 0.1, 0.5, 0.77, 0.99999])
def test_radix_threshold_gives_peft_topk_set(make, density):
    """Large float32 tensors: the radix k-th magnitude is exact, and the mask is peft's wherever it applies."""
    t = make(torch.Generator().manual_seed(11))
    k = int(density * t.numel())
    bits, threshold, reaching = sparsify._kth_largest_magnitude(t, k)
    kth = torch.topk(t.abs(), k).values[-1]
    assert torch.equal(torch.tensor(threshold, dtype=torch.int32).view(torch.float32), kth) or kth.isnan()
    assert reaching == int((bits >= threshold).sum())
    ours, theirs = sparsify.magnitude_prune(t, density), _peft_prune(t, density)
    assert torch.equal(ours.isnan(), theirs.isnan())
    assert torch.equal(ours.nan_to_num().view(torch.int32), theirs.nan_to_num().view(torch.int32))


@pytest.mark.parametrize("n", [100, 1000, 70_001])
def test_unsorted_topk_selects_the_same_tied_entries(n):
    """The fallback relies on topk(sorted=False) picking the same set as peft's sorted topk."""
    x = torch.randint(0, 5, (n,), generator=torch.Generator().manual_seed(n)).float()
    for k in {1, n // 64, n // 64 + 1, n // 3, n // 2, n - 1}:
        a = torch.topk(x, k).indices.sort().values
        b = torch.topk(x, k, sorted=False).indices.sort().values
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_ties_in_low_precision_keeps_the_reference_arithmetic(dtype):
    """Weights rounded to the tensors' dtype, float32 counts: the formula the engine always used."""
    gen = torch.Generator().manual_seed(2)
    deltas = [torch.randn(40, 30, generator=gen).to(dtype) for _ in range(3)]
    w, dens = [0.3, 0.7, 1.1], [0.4, 0.5, 0.6]
    stacked = torch.stack([_peft_prune(d, p) for d, p in zip(deltas, dens, strict=True)])
    majority = torch.where(stacked.sum(0) >= 0, 1.0, -1.0).to(dtype)
    mask = stacked.sign() == majority
    weighted = stacked * torch.tensor(w, dtype=dtype).view(-1, 1, 1)
    expected = (weighted * mask).sum(0) / torch.clamp(mask.sum(0), min=1.0)
    ours = ties_deltas(deltas, w, dens)
    assert ours.dtype == expected.dtype and torch.equal(ours, expected)


def test_all_zero_task_vector_is_pruned_like_peft():
    """A tensor no fine-tune changed (frozen embeddings) skips the top-k but gives peft's result."""
    zero = torch.zeros(64, 32)
    assert torch.equal(sparsify.magnitude_prune(zero, 0.2), peft_merge.magnitude_based_pruning(zero, 0.2))
    deltas = [torch.zeros(64, 32), torch.zeros(64, 32)]
    assert torch.equal(
        ties_deltas(deltas, [1.0, 1.0], [0.2, 0.2]), peft_merge.ties(deltas, torch.ones(2), 0.2)
    )


def test_dare_masks_differ_across_tensors(tmp_path):
    """Each tensor draws its own DARE mask (seeded by its name): two same-shaped tensors do not share one."""
    fam = bert_family(tmp_path / "m", n=1)
    cfg = config_dict("dare_linear", fam["base"], [fam["t1"]], density=0.5)
    merged = load_file(run_merge(parse_config(cfg), tmp_path / "out").out_dir / "model.safetensors")
    base = load_file(fam["base"] / "model.safetensors")
    names = [f"bert.encoder.layer.0.attention.self.{p}.weight" for p in ("query", "key", "value")]
    masks = [merged[n] != base[n] for n in names]
    assert all(0.3 < m.float().mean().item() < 0.7 for m in masks)
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])


def test_multislerp_with_a_listed_base_leaves_it_out(tmp_path):
    """A base listed among the models is the sphere's origin, not one more model to interpolate."""
    fam = bert_family(tmp_path / "m", n=2)
    listed = config_dict("multislerp", fam["base"], [fam["base"], fam["t1"], fam["t2"]])
    plan = prepare(parse_config(listed))
    assert [m.ref.raw for m in plan.models] == [str(fam["t1"]), str(fam["t2"])]
    with_base = load_file(run_merge(parse_config(listed), tmp_path / "a").out_dir / "model.safetensors")
    unlisted = config_dict("multislerp", fam["base"], [fam["t1"], fam["t2"]])
    without = load_file(run_merge(parse_config(unlisted), tmp_path / "b").out_dir / "model.safetensors")
    assert all(torch.equal(with_base[n], without[n]) for n in with_base)
    base, t1, t2 = (load_file(fam[k] / "model.safetensors") for k in ("base", "t1", "t2"))
    name = "bert.encoder.layer.0.attention.self.query.weight"
    expected = sparsify_free_multislerp([t1[name] - base[name], t2[name] - base[name]]) + base[name]
    torch.testing.assert_close(with_base[name], expected, rtol=1e-5, atol=1e-6)


def sparsify_free_multislerp(deltas):
    """multislerp of two deltas with equal weights, written out: the slerp midpoint rescaled to the mean norm."""
    a, b = (d.reshape(-1) for d in deltas)
    ua, ub = a / a.norm(), b / b.norm()
    mid = (ua + ub) / (ua + ub).norm()
    return (mid * (a.norm() + b.norm()) / 2).view(deltas[0].shape)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties"])
def test_prefetched_reads_give_the_same_merge(tmp_path, monkeypatch, method):
    """Tensors read ahead in the reader thread merge exactly as tensors read when their turn comes."""
    from divmerge_core import pipeline

    fam = bert_family(tmp_path / "m", n=2)
    params = {} if method == "task_arithmetic" else {"density": 0.5}
    cfg = config_dict(method, fam["base"], [fam["t1"], fam["t2"]], **params)
    reads: list[tuple[str, bool]] = []
    original = pipeline._Merger.read

    def spy(self, name, whole=False):
        reads.append((name, whole))
        return original(self, name, whole)

    monkeypatch.setattr(pipeline._Merger, "read", spy)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the merge loop runs on 1 (a core left to the reader), then sets 2 back
    try:
        ahead = load_file(run_merge(parse_config(cfg), tmp_path / "a").out_dir / "model.safetensors")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert sum(whole for _, whole in reads) == len(ahead) - 1  # every tensor but the first read ahead
    reads.clear()
    monkeypatch.setattr(pipeline, "PREFETCH_BYTES", 0)
    in_turn = load_file(run_merge(parse_config(cfg), tmp_path / "b").out_dir / "model.safetensors")
    assert reads and not any(whole for _, whole in reads)
    assert ahead.keys() == in_turn.keys()
    assert all(torch.equal(ahead[n].view(torch.uint8), in_turn[n].view(torch.uint8)) for n in ahead)


def test_della_needs_density_plus_minus_epsilon_inside_0_1(tmp_path):
    """mergekit fails mid-merge on such keep-probabilities; here it is a config error before any read."""
    fam = bert_family(tmp_path, n=1)
    cfg = config_dict("della", fam["base"], [fam["t1"]], density=0.1, epsilon=0.15)
    with pytest.raises(ConfigError, match=r"density \+/- epsilon inside \(0, 1\)"):
        prepare(parse_config(cfg))
    with pytest.raises(ConfigError, match="density >= 0"):
        prepare(parse_config(config_dict("ties", fam["base"], [fam["t1"]], density=-0.5)))


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della", "breadcrumbs_ties"])
def test_consensus_methods_drop_entries_against_the_weighted_sign(tensors, method):
    """mergekit's election is on the weighted vectors: a negative weight flips a model's vote."""
    base, models = tensors
    gen = torch.Generator().manual_seed(0)
    one = merge_tensor(method, base, models[:1], [-1.0], [1.0], generator=gen, normalize=False)
    torch.testing.assert_close(one, base - (models[0] - base), rtol=0, atol=1e-6)
    # normalize divides by the agreeing weights' sum (-1 here): the model itself
    gen = torch.Generator().manual_seed(0)
    one = merge_tensor(method, base, models[:1], [-1.0], [1.0], generator=gen, normalize=True)
    torch.testing.assert_close(one, models[0], rtol=0, atol=1e-6)


def _mergekit_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    """mergekit 0.1.5's ``sparsify.magnitude``, verbatim (argsort over the whole tensor)."""
    k = max(1, int(density * t.numel()))
    mask = torch.zeros(t.numel(), dtype=t.dtype)
    mask[torch.argsort(t.abs().reshape(-1).float(), descending=True)[:k]] = 1
    return t * mask.reshape_as(t)


@pytest.mark.parametrize(
    "make",
    [
        lambda g: torch.randn(3000, generator=g),
        lambda g: torch.randint(-3, 4, (40, 25), generator=g).float(),  # ties at the cut
        lambda g: torch.randn(300_000, generator=g),  # radix, no tie at the cut
        lambda g: torch.randint(-2000, 2001, (300_000,), generator=g).float(),  # radix, ties at the cut
        lambda g: torch.cat([torch.zeros(200_000), torch.randn(100_000, generator=g)]),  # k-th is zero
        lambda g: torch.zeros(64),
    ],
)
@pytest.mark.parametrize("density", [1e-5, 0.3, 0.5, 0.9])
def test_mergekit_magnitude_keeps_mergekits_entries_ties_included(make, density):
    t = make(torch.Generator().manual_seed(4))
    expected = _mergekit_magnitude(t, density)
    assert torch.equal(sparsify.mk_magnitude_(t.clone(), density), expected)
