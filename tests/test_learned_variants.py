"""Learned-merge variants past the paper (docs/engine.md#learned-merge-variants): coefficients learned over
trimmed or sign-resolved task vectors (``tau_sparsify``, ``tau_density``, ``tau_consensus``) and tensor
coefficients pulled toward their layer's mean (``pull``), on tiny BERT classifiers (CPU)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from divmerge_core import run_merge
from divmerge_core.config import parse_config
from divmerge_core.errors import ConfigError
from divmerge_core.io.loading import Checkpoint
from divmerge_core.learned import learn_coefficients
from divmerge_core.learned import placement as placement_mod
from divmerge_core.learned.apply import merged_tensor
from divmerge_core.learned.grouping import layer_group
from divmerge_core.learned.pull import layer_pull, layer_spread
from divmerge_core.learned.trimming import TauRule, tau_rule
from divmerge_core.methods import sparsify as sp
from divmerge_core.methods.learned_parameters import LearnedParameters
from divmerge_core.progress import Reporter
from tests.test_learned import CPU, make_plan
from tests.tiny import make_bert_classifier, perturbed, save

DATA = [
    {"texts": ["a b c", "cat dog up", "red blue", "1 2 3 4", "yes no yes", "up down"]},
    {"texts": ["good bad", "left right . up", "x y z", "9 8", "dog cat", "no yes"]},
    {"texts": ["b c d e", "blue red", "7 7 7", "left", "right up", "cat"]},
]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A BERT classifier base and three noise 'fine-tunes' of it."""
    root = tmp_path_factory.mktemp("variants")
    torch.set_num_threads(1)
    base = make_bert_classifier(seed=0)
    return save(base, root / "base"), [save(perturbed(base, 0.3, seed=s), root / f"e{s}") for s in (1, 2, 3)]


def learn(family, seen: list | None = None, monkeypatch=None, **params):
    """One learned run; ``seen`` (with ``monkeypatch``) keeps the placement's task vectors."""
    base, experts = family
    kw = dict(granularity="layer", epochs=2, batch_size_per_task=3, lr=0.05, heldout=0.0) | params
    plan = make_plan(base, experts, DATA, **kw)
    grads: list[list[float]] = []
    if seen is not None:
        make = placement_mod.make_task_vectors

        def spy(*a, **k):
            seen.append(make(*a, **k))
            return seen[-1]

        monkeypatch.setattr("divmerge_core.learned.make_task_vectors", spy)
    coeffs = learn_coefficients(
        plan, device=CPU, reporter=Reporter(), on_gradient=lambda g: grads.append(g.flatten().tolist())
    )
    return coeffs, grads


def task_vectors(family) -> dict[str, list[torch.Tensor]]:
    """Every float tensor's plain task vectors theta_t - theta_0 (fp32)."""
    base, experts = family
    out = {}
    with Checkpoint(base) as b:
        cks = [Checkpoint(e) for e in experts]
        for n in b.names:
            w = b.get(n)
            if w.is_floating_point():
                out[n] = [ck.get(n).float() - w.float() for ck in cks]
    return out


# --- the rule, tensor by tensor ----------------------------------------------------------------------------
def test_magnitude_keeps_the_density_share_of_largest_entries_with_their_signs():
    rule = TauRule("magnitude", 0.2)
    gen = torch.Generator().manual_seed(0)
    for shape in [(37, 11), (5,), (2,)]:
        x = torch.randn(shape, generator=gen)
        got = rule.sparsify_("w", 0, x.clone())
        kept = got != 0
        assert int(kept.sum()) == max(1, int(0.2 * x.numel()))
        assert torch.equal(got[kept], x[kept])  # values and signs untouched
        if (~kept).any():  # nothing dropped is larger than anything kept
            assert x[~kept].abs().max() <= x[kept].abs().min()


def test_random_drop_keeps_about_the_density_rescaled_and_draws_per_tensor_and_task():
    rule = TauRule("random", 0.5, seed=7)
    x = torch.randn(200, 100, generator=torch.Generator().manual_seed(1))
    got = rule.sparsify_("w", 0, x.clone())
    kept = got != 0
    assert abs(kept.float().mean().item() - 0.5) < 0.02
    torch.testing.assert_close(got[kept], x[kept] / 0.5, rtol=0, atol=0)
    # the same (tensor, task) draws the same mask, each call; another task or tensor another one
    assert torch.equal(rule.sparsify_("w", 0, x.clone()), got)
    assert not torch.equal(rule.sparsify_("w", 1, x.clone()) != 0, kept)
    assert not torch.equal(rule.sparsify_("v", 0, x.clone()) != 0, kept)
    # DARE's own draw and arithmetic (the classic random_prune_) on a float32 CPU tensor: the same bits
    classic = sp.random_prune_(x.clone(), 0.5, generator=rule.generator("w", 0))
    assert torch.equal(classic, got)
    # a tied alias draws its canonical tensor's mask
    tied = TauRule("random", 0.5, seed=7, aliases={"lm_head.weight": "w"})
    assert torch.equal(tied.sparsify_("lm_head.weight", 0, x.clone()), got)


def test_sign_consensus_drops_the_entries_that_disagree_with_the_mass():
    stacked = torch.tensor([[1.0, -2.0, 0.5, 3.0], [-0.5, -1.0, -1.0, 0.0], [2.0, 4.0, -0.1, -1.0]])
    mass_sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)  # [+, +, -, +]
    got = TauRule(consensus="sign").resolve_(stacked.clone())
    expected = torch.where(torch.sign(stacked) == mass_sign, stacked, torch.zeros(()))
    assert torch.equal(got, expected)
    assert torch.equal(got[:, 1], torch.tensor([0.0, 0.0, 4.0]))  # sum +1: the negatives go
    assert torch.equal(got[:, 2], torch.tensor([0.0, -1.0, -0.1]))  # sum -0.6: the positive goes


def test_the_rule_is_none_without_the_parameters():
    assert tau_rule(LearnedParameters()) is None
    assert tau_rule(LearnedParameters(tau_density=0.5)) is None  # a density alone sparsifies nothing
    rule = tau_rule(LearnedParameters(tau_sparsify="random", tau_density=0.5, seed=3))
    assert rule == TauRule("random", 0.5, "none", 3)


# --- in the learned merge ----------------------------------------------------------------------------------
def test_the_placement_holds_the_trimmed_sign_resolved_task_vectors(family, monkeypatch):
    seen: list = []
    coeffs, _ = learn(
        family, seen, monkeypatch, tau_sparsify="magnitude", tau_density=0.2, tau_consensus="sign",
        placement="resident", epochs=1,
    )  # fmt: skip
    vectors = seen[0]
    plain = task_vectors(family)
    assert vectors.tau
    for name, stack in vectors.tau.items():
        taus = plain[name]
        numel = taus[0].numel()
        for t, tau in enumerate(stack):
            kept = tau != 0
            # at most the trimmed share survives, and every survivor is the expert's own entry
            assert int(kept.sum()) <= max(1, int(0.2 * numel))
            assert torch.equal(tau[kept], taus[t][kept])
        # every surviving entry has the elected sign of the trimmed vectors' sum
        trimmed = torch.stack([sp.mk_magnitude_(x.clone(), 0.2) for x in taus])
        mass = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0)
        assert torch.equal(stack, torch.where(torch.sign(trimmed) == mass, trimmed, torch.zeros(())))
    assert coeffs.task_vectors == {"sparsify": "magnitude", "density": 0.2, "consensus": "sign"}


@pytest.mark.parametrize("placement", ["offload", "stream"])
def test_every_placement_follows_the_resident_trajectory(family, placement):
    """Stream forms the trimmed task vectors again at every step (random: the same draws)."""
    kw = dict(tau_sparsify="random", tau_density=0.5, tau_consensus="sign")
    ref, ref_grads = learn(family, placement="resident", **kw)
    got, got_grads = learn(family, placement=placement, **kw)
    assert any(abs(v - 1 / 3) > 1e-3 for row in ref.values for v in row)
    for a, b in [(ref.losses, got.losses), (ref_grads, got_grads), (ref.values, got.values)]:
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-6)


def test_none_none_is_the_plain_merge(family):
    default, default_grads = learn(family)
    explicit, explicit_grads = learn(family, tau_sparsify="none", tau_consensus="none", pull=0.0)
    assert explicit.losses == default.losses and explicit.values == default.values
    assert explicit_grads == default_grads
    assert default.task_vectors is None and "task_vectors" not in default.to_json()
    trimmed, _ = learn(family, tau_sparsify="magnitude")
    assert trimmed.values != default.values  # the parameter does change the run
    # the final merge of plain coefficients is base + sum_t c_t * (theta_t - theta_0)
    base, experts = family
    with Checkpoint(base) as b:
        cks = [Checkpoint(e) for e in experts]
        name = "bert.encoder.layer.0.attention.self.query.weight"
        w0 = b.get(name)
        got = merged_tensor(default, name, w0, [ck.get(name) for ck in cks])
        c = default.for_tensor(name)
        want = w0.clone()
        for ck, ct in zip(cks, c, strict=True):
            want.add_(ck.get(name) - w0, alpha=ct)
        assert torch.equal(got, want)


def test_run_merge_writes_the_merge_of_the_trimmed_task_vectors(family, tmp_path):
    """The written model applies the learned coefficients to the same trimmed, sign-resolved vectors, and
    coefficients.json and the model card record how they were formed."""
    base, experts = family
    params = dict(granularity="layer", epochs=1, batch_size_per_task=3, lr=0.05, heldout=0.0)
    params |= dict(tau_sparsify="random", tau_density=0.5, tau_consensus="sign", seed=5)
    config = parse_config(
        {
            "merge_method": "divmerge",
            "base_model": str(base),
            "models": [{"model": str(e), "data": d} for e, d in zip(experts, DATA, strict=True)],
            "parameters": params,
        }
    )
    result = run_merge(config, tmp_path / "out", device="cpu")
    out = tmp_path / "out"
    record = json.loads((out / "coefficients.json").read_text())
    assert record["task_vectors"] == {"sparsify": "random", "density": 0.5, "consensus": "sign", "seed": 5}
    assert "randomly dropped to a 0.5 share" in (out / "README.md").read_text()
    rule = TauRule("random", 0.5, "sign", 5)
    plain = task_vectors(family)
    with Checkpoint(out) as merged, Checkpoint(base) as b:
        for name in ("bert.encoder.layer.1.output.dense.weight", "classifier.bias"):
            taus = rule.resolve_(
                torch.stack([rule.sparsify_(name, t, x.clone()) for t, x in enumerate(plain[name])])
            )
            group = record["group_of"][name]
            coeffs = [record["coefficients"][group][t] for t in record["tasks"]]
            want = b.get(name).clone()
            for tau, c in zip(taus, coeffs, strict=True):
                want.add_(tau, alpha=c)
            torch.testing.assert_close(merged.get(name), want, rtol=0, atol=0)
    assert result.coefficients is not None and result.coefficients["task_vectors"]["sparsify"] == "random"


# --- pull ------------------------------------------------------------------------------------------------
def test_pull_term_is_the_mean_squared_distance_to_the_layer_mean():
    groups = ["enc.layer.0.a", "enc.layer.0.b", "enc.layer.1.a", "classifier.weight"]
    assert [layer_group(g) for g in groups] == ["enc.layer.0", "enc.layer.0", "enc.layer.1", "head"]
    gamma = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0], [7.0, 1.0]], requires_grad=True)
    # layer 0's means: (2, 1); the others are alone in their layer
    expected = (1 + 1 + 1 + 1 + 0 + 0 + 0 + 0) / 8
    penalty = layer_pull(groups, 2.0, CPU)
    assert penalty is not None and layer_pull(groups, 0.0, CPU) is None
    assert math.isclose(float(penalty(gamma).detach()), 2.0 * expected)
    assert math.isclose(layer_spread(groups, gamma.tolist()), expected)
    penalty(gamma).backward()  # d/dGamma of pull * mean((g - mean)^2), through the mean as well
    assert torch.allclose(gamma.grad, torch.tensor([[-0.5, -0.5], [0.5, 0.5], [0.0, 0.0], [0.0, 0.0]]))


def test_pull_brings_the_tensor_coefficients_of_a_layer_together(family):
    free, _ = learn(family, granularity="tensor", epochs=3)
    pulled, _ = learn(family, granularity="tensor", epochs=3, pull=50.0)
    spread_free = layer_spread(free.groups, free.values)
    spread_pulled = layer_spread(pulled.groups, pulled.values)
    assert spread_free > 1e-5
    assert spread_pulled < 0.5 * spread_free
    # the step loss counts the term; the first step's is the objective alone (Gamma starts uniform)
    assert pulled.losses[0] == pytest.approx(free.losses[0], rel=1e-6)


# --- validation --------------------------------------------------------------------------------------------
def _config(**params):
    return {
        "merge_method": "adamerging",
        "base_model": "/base",
        "models": [{"model": "/e1", "data": {"texts": ["a"]}}],
        "parameters": params,
    }


@pytest.mark.parametrize(
    ("params", "field", "words"),
    [
        ({"pull": 1.0}, "parameters.pull", "granularity: tensor"),
        ({"pull": 1.0, "granularity": "task"}, "parameters.pull", "granularity: tensor"),
        ({"pull": -0.5, "granularity": "tensor"}, "parameters.pull", "greater than or equal to 0"),
        ({"tau_density": 0.0}, "parameters.tau_density", "greater than 0"),
        ({"tau_density": 1.5}, "parameters.tau_density", "less than or equal to 1"),
        ({"tau_sparsify": "topk"}, "parameters.tau_sparsify", "magnitude"),
        ({"tau_consensus": "count"}, "parameters.tau_consensus", "sign"),
        ({"tau_sparsify": "magnitude", "teacher": "online"}, "parameters.tau_sparsify", "teacher: cached"),
        ({"tau_consensus": "sign", "teacher": "online"}, "parameters.tau_consensus", "teacher: cached"),
    ],
)
def test_validation_names_the_field(params, field, words):
    with pytest.raises(ConfigError) as err:
        parse_config(_config(**params))
    assert err.value.field == field and words in str(err.value)


def test_valid_variant_configs_load():
    ok = parse_config(_config(granularity="tensor", pull=1.0, tau_sparsify="random", tau_density=1.0))
    assert ok.parameters.pull == 1.0 and ok.parameters.tau_density == 1.0
    assert parse_config(_config(pull=0.0)).parameters.granularity == "layer"  # pull 0 at any granularity
    assert parse_config(_config(teacher="online", tau_sparsify="none", tau_consensus="none"))
