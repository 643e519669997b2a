"""Held-out divergence, best-Gamma selection, early stopping, lr schedules and init (parameters of the learned
methods, docs/engine.md#convergence), on tiny BERT classifiers whose experts are perturbed copies of the base."""

from __future__ import annotations

import importlib
import json
import math
import random

import pytest
import torch

from divmerge_core.config import parse_config
from divmerge_core.errors import ConfigError
from divmerge_core.learned import convergence as conv
from divmerge_core.learned import learn_coefficients
from divmerge_core.learned.ranks import Ranks
from divmerge_core.learned.schedule import initial_value, lr_factor, make_scheduler
from divmerge_core.methods.learned_parameters import LearnedParameters
from divmerge_core.progress import Reporter
from tests.test_learned import CPU, FILLER, make_plan
from tests.tiny import make_bert_classifier, perturbed, save

opt = importlib.import_module("divmerge_core.learned.optimise")  # the package exports the function optimise

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("conv")
    torch.set_num_threads(1)
    base = make_bert_classifier(seed=0)
    base_dir = save(base, root / "base")
    experts = [save(perturbed(base, 0.5, seed=s), root / f"expert{s}") for s in (1, 2)]
    rng = random.Random(0)
    texts = [
        [" ".join(rng.choice(FILLER) for _ in range(rng.randint(2, 6))) for _ in range(40)] for _ in (0, 1)
    ]
    return base_dir, experts, texts


def run(setup, *, events=None, **params):
    base, experts, texts = setup
    kw = dict(granularity="task", epochs=3, batch_size_per_task=8, lr=0.05) | params
    plan = make_plan(base, experts, [{"texts": t} for t in texts], **kw)
    reporter = Reporter(progress=events.append if events is not None else None)
    return learn_coefficients(plan, device=CPU, reporter=reporter)


@pytest.fixture
def scripted(monkeypatch):
    """Held-out values from a script (one mean per evaluation, epoch 0 first); records Gamma at each one."""
    state = {"values": [], "gammas": []}

    def fake(heldout, chunk_loss, **kw):
        value = state["values"][len(state["gammas"])]
        return [value if e else None for e in heldout]

    real_record = conv.Tracker.record

    def record(self, epoch, step, per_task, gamma):
        state["gammas"].append(gamma.detach().clone().tolist())
        return real_record(self, epoch, step, per_task, gamma)

    monkeypatch.setattr(opt, "heldout_values", fake)
    monkeypatch.setattr(conv.Tracker, "record", record)
    return state


# --- the split ---------------------------------------------------------------------------------------------
def test_heldout_count_rule():
    assert conv.heldout_count(19, 0.1) == 0  # too few: everything trains
    assert conv.heldout_count(20, 0.1) == 4  # at least 4
    assert conv.heldout_count(64, 0.1) == 6
    assert conv.heldout_count(200, 0.1) == 20
    assert conv.heldout_count(200, 0.0) == 0
    assert conv.heldout_count(200, 0.25) == 50


def test_heldout_split_is_seeded_disjoint_and_complete():
    a = conv.heldout_split([40, 100, 10], 0.1, seed=0)
    assert a == conv.heldout_split([40, 100, 10], 0.1, seed=0)
    assert a != conv.heldout_split([40, 100, 10], 0.1, seed=1)
    for split, n in zip(a, [40, 100, 10], strict=True):
        assert not set(split.train) & set(split.heldout)
        assert sorted(split.train + split.heldout) == list(range(n))
    assert [len(s.heldout) for s in a] == [4, 10, 0]
    assert a[0].heldout != list(range(4)) and a[0].heldout != a[1].heldout[:4]  # shuffled, per task


def test_training_never_sees_a_heldout_input(setup, monkeypatch):
    """Every input the optimisation steps go through is a training input; the held-out ones are scored apart."""
    seen = {"train": [], "heldout": []}
    mode = ["train"]
    real_collate, real_values = opt.collate, opt.heldout_values

    def collate(kind, chunk, *a, **kw):
        seen[mode[0]] += [(e.task, tuple(e.fields["input_ids"])) for e in chunk]
        return real_collate(kind, chunk, *a, **kw)

    def values(*a, **kw):
        mode[0] = "heldout"
        try:
            return real_values(*a, **kw)
        finally:
            mode[0] = "train"

    monkeypatch.setattr(opt, "collate", collate)
    monkeypatch.setattr(opt, "heldout_values", values)
    coeffs = run(setup, epochs=2)
    assert coeffs.convergence.heldout_inputs == [4, 4]
    train, held = set(seen["train"]), set(seen["heldout"])
    assert len(held) == 8 and not train & held
    assert len(train) == 72  # every training input was visited (2 epochs of 36)
    assert len(seen["heldout"]) == 3 * 8  # epoch 0 and after each of the 2 epochs


# --- held-out record, best Gamma, early stopping -----------------------------------------------------------
def test_heldout_is_recorded_per_epoch_and_matches_the_objective(setup):
    events = []
    coeffs = run(setup, epochs=3, events=events)
    c = coeffs.convergence
    assert c.steps_per_epoch == 5 and c.planned_steps == c.steps == len(coeffs.losses) == 15  # 36 train / 8
    assert [r[0] for r in c.heldout] == [0, 1, 2, 3] and [r[1] for r in c.heldout] == [0, 5, 10, 15]
    for row in c.heldout:
        assert row[2] == pytest.approx((row[3] + row[4]) / 2) and all(math.isfinite(v) for v in row[2:])
    assert c.heldout[-1][2] < c.heldout[0][2]  # the divergence falls on the inputs it never trained on
    values = [r[2] for r in c.heldout]
    assert c.best_epoch == values.index(min(values))
    held = [e.heldout for e in events if e.heldout is not None]
    assert [list(h) for h in held] == c.heldout
    assert all(e.loss is None for e in events if e.heldout is not None)
    # with no held-out share the steps see every input and nothing is recorded
    none = run(setup, epochs=1, heldout=0.0)
    assert none.convergence.heldout == [] and none.convergence.best_epoch is None
    assert none.convergence.converged is None and none.convergence.steps == 5  # ceil(40 / 8)


def test_heldout_divergence_is_the_training_objective(setup):
    """With lr ~ 0 the held-out value of epoch 0 equals the training loss on the same inputs."""
    from divmerge_core.learned.data import load_task_inputs

    base, experts, texts = setup
    full = make_plan(base, experts, [{"texts": t} for t in texts])
    loaded = [load_task_inputs(spec.data, full.options, 0).texts for spec in full.specs]  # the engine's order
    held = conv.heldout_split([40, 40], 0.1, seed=0)
    only = [[t[i] for i in s.heldout] for t, s in zip(loaded, held, strict=True)]
    coeffs = run(setup, epochs=1)
    plan = make_plan(
        base, experts, [{"texts": t} for t in only], granularity="task", epochs=1, batch_size_per_task=4
    )
    first = learn_coefficients(plan, device=CPU, reporter=Reporter()).losses[0]  # all 4 inputs of each task
    assert coeffs.convergence.heldout[0][2] == pytest.approx(first, rel=1e-5)


def test_best_gamma_is_kept_when_heldout_rises(setup, scripted):
    """Held-out falls to epoch 2 then rises: the result is epoch 2's Gamma, not the last."""
    scripted["values"] = [1.0, 0.6, 0.4, 0.5, 0.7]
    coeffs = run(setup, epochs=4)
    c = coeffs.convergence
    assert c.best_epoch == 2 and c.best_step == 10 and c.converged is True and c.stopped_early is False
    assert c.steps == 20
    assert coeffs.values == scripted["gammas"][2]
    assert coeffs.values != scripted["gammas"][4]


def test_last_gamma_when_still_improving(setup, scripted):
    scripted["values"] = [1.0, 0.9, 0.8, 0.7]
    coeffs = run(setup, epochs=3)
    assert coeffs.convergence.best_epoch == 3 and coeffs.convergence.converged is False
    assert coeffs.values == scripted["gammas"][3]


def test_early_stop_after_patience_epochs_without_improvement(setup, scripted):
    scripted["values"] = [1.0, 0.5, 0.55, 0.6] + [0.1] * 10  # would improve later: never reached
    coeffs = run(setup, epochs=10, patience=2)
    c = coeffs.convergence
    assert c.stopped_early is True and c.best_epoch == 1 and c.converged is True
    assert c.steps == len(coeffs.losses) == 3 * 5 and c.planned_steps == 50
    assert [r[0] for r in c.heldout] == [0, 1, 2, 3]
    assert coeffs.values == scripted["gammas"][1]
    # min_delta: a 1% gain does not count as one
    scripted["values"], scripted["gammas"] = [1.0, 0.5, 0.497, 0.496, 0.2], []
    c = run(setup, epochs=4, patience=2, min_delta=0.01).convergence
    assert c.stopped_early is True and c.best_epoch == 1 and c.steps == 15
    # no patience: every epoch runs
    scripted["values"], scripted["gammas"] = [1.0, 0.5, 0.55, 0.6, 0.7], []
    c = run(setup, epochs=4).convergence
    assert c.stopped_early is False and c.steps == 20 and c.best_epoch == 1


def test_ranks_agree_on_heldout_values():
    """Two ranks each score their share; after the all-reduce both hold the single process's values."""
    examples = [[torch.tensor([float(i + 10 * t)]) for i in range(n)] for t, n in enumerate([5, 4])]

    def chunk_loss(chunk):
        return torch.stack([x[0] for x in chunk])

    class Pair(Ranks):
        world, pending = 2, {}

        def __init__(self, rank):
            self.rank = rank

        def all_reduce_sum(self, tensor):  # rank 1 runs first and leaves its part to rank 0
            if self.rank == 1:
                Pair.pending["sums"] = tensor.clone()
            else:
                tensor += Pair.pending["sums"]
                Pair.pending["total"] = tensor.clone()

    one = conv.heldout_values(examples, chunk_loss, chunk_size=2, device=CPU)
    conv.heldout_values(examples, chunk_loss, chunk_size=2, device=CPU, ranks=Pair(1))
    zero = conv.heldout_values(examples, chunk_loss, chunk_size=2, device=CPU, ranks=Pair(0))
    assert zero == pytest.approx(one) and one == [2.0, 11.5]
    assert conv.heldout_values([[], examples[1]], chunk_loss, chunk_size=2, device=CPU)[0] is None


# --- lr schedule and init ----------------------------------------------------------------------------------
def test_lr_schedule_shapes():
    constant = [lr_factor(s, 10, "constant", 0) for s in range(1, 11)]
    assert constant == [1.0] * 10
    warm = [lr_factor(s, 10, "constant", 3) for s in range(1, 11)]
    assert warm == pytest.approx([0.25, 0.5, 0.75] + [1.0] * 7)
    cosine = [lr_factor(s, 10, "cosine", 0) for s in range(1, 11)]
    assert cosine[0] == 1.0 and all(a > b for a, b in zip(cosine, cosine[1:], strict=False))
    assert cosine[5] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert 0 < cosine[-1] < 0.03  # falls towards 0 at the last step, which still moves Gamma
    both = [lr_factor(s, 10, "cosine", 2) for s in range(1, 11)]
    assert both[:3] == pytest.approx([1 / 3, 2 / 3, 1.0]) and both[-1] < both[3] < 1.0


def test_scheduler_drives_the_optimiser():
    params = LearnedParameters()
    p = torch.nn.Parameter(torch.zeros(1))
    optimiser = torch.optim.Adam([p], lr=0.1)
    sched = make_scheduler(
        optimiser, params.model_copy(update={"lr_schedule": "cosine", "warmup_ratio": 0.2}), 10
    )
    lrs = []
    for _ in range(10):
        lrs.append(optimiser.param_groups[0]["lr"])
        optimiser.step()
        sched.step()
    assert lrs == pytest.approx([0.1 * lr_factor(s, 10, "cosine", 2) for s in range(1, 11)])
    sched = make_scheduler(torch.optim.Adam([p], lr=0.1), params, 10)
    assert sched.optimizer.param_groups[0]["lr"] == 0.1  # the default: constant, no warmup


def test_cosine_schedule_in_a_run_changes_the_steps_not_the_first(setup):
    constant = run(setup, epochs=1, heldout=0.0)
    cosine = run(setup, epochs=1, heldout=0.0, lr_schedule="cosine")
    assert cosine.losses[:2] == pytest.approx(constant.losses[:2], rel=1e-6)  # full lr on the first step
    assert cosine.values != constant.values
    warm = run(setup, epochs=1, heldout=0.0, warmup_steps=5)
    assert warm.losses[1] != pytest.approx(constant.losses[1], rel=1e-9)


def test_init_values(setup):
    assert initial_value(None, 4) == initial_value("1/n", 4) == 0.25
    assert initial_value("task_arithmetic", 4) == 1.0 and initial_value(-0.3, 4) == -0.3
    for init, expected in ((None, 0.5), ("1/n", 0.5), ("task_arithmetic", 1.0), (0.3, 0.3)):
        extra = {} if init is None else {"init": init}
        coeffs = run(setup, epochs=1, lr=1e-9, heldout=0.0, **extra)
        assert coeffs.values[0] == pytest.approx([expected, expected], abs=1e-6)
    with pytest.raises(ConfigError):
        parse_config(
            {
                "merge_method": "divmerge",
                "base_model": "b",
                "models": [{"model": "a", "data": {"texts": ["x"]}}],
                "parameters": {"init": "average"},
            }
        )


# --- what the run writes -----------------------------------------------------------------------------------
def test_coefficients_json_reports_convergence(setup, tmp_path):
    from divmerge_core.pipeline import run_merge

    base, experts, texts = setup
    plan = make_plan(
        base,
        experts,
        [{"texts": t} for t in texts],
        granularity="task",
        epochs=3,
        batch_size_per_task=8,
        lr=0.05,
        patience=1,
    )
    result = run_merge(plan.config, tmp_path / "out", device="cpu")
    saved = json.loads((tmp_path / "out" / "coefficients.json").read_text())
    for key in (
        "heldout",
        "heldout_inputs",
        "best_epoch",
        "best_step",
        "converged",
        "stopped_early",
        "steps",
    ):
        assert key in saved and key in result.coefficients
    assert saved["heldout_inputs"] == [4, 4] and saved["planned_steps"] == 15
    assert saved["steps"] == len(saved["losses"]) == result.metrics["steps"]
    assert len(saved["heldout"]) == saved["steps"] // 5 + 1 and len(saved["heldout"][0]) == 5
    assert isinstance(saved["converged"], bool) and isinstance(saved["stopped_early"], bool)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "held-out" in card and f"epoch {saved['best_epoch']}" in card


def test_two_gloo_ranks_take_the_single_process_decisions(setup):
    """Each rank scores its share of the held-out inputs; the all-reduced values, the best epoch, the early
    stop and the kept Gamma are the single process's."""
    from divmerge_core.learned.distributed import learn_distributed

    base, experts, texts = setup
    kw = dict(granularity="task", epochs=6, batch_size_per_task=8, lr=0.3, patience=1)
    plan = make_plan(base, experts, [{"texts": t} for t in texts], **kw)
    single = learn_coefficients(plan, device=CPU, reporter=Reporter())
    two = learn_distributed(plan, devices=2, device=CPU, reporter=Reporter())
    a, b = single.convergence, two.convergence
    assert a.stopped_early and a.best_epoch < a.heldout[-1][0]  # lr 0.3 overshoots: a real stop to agree on
    assert (a.best_epoch, a.stopped_early, a.steps) == (b.best_epoch, b.stopped_early, b.steps)
    assert [r[:2] for r in a.heldout] == [r[:2] for r in b.heldout]
    for ra, rb in zip(a.heldout, b.heldout, strict=True):
        assert rb[2:] == pytest.approx(ra[2:], rel=1e-4, abs=1e-7)
    assert two.values[0] == pytest.approx(single.values[0], rel=1e-4, abs=1e-6)


def test_cli_summary_names_the_kept_epoch():
    from divmerge_core.cli import _convergence_note

    assert _convergence_note(None) == "" and _convergence_note({"heldout": []}) == ""
    rows = [[0, 0, 1.0], [1, 5, 0.5], [2, 10, 0.6]]
    note = _convergence_note(
        {
            "heldout": rows,
            "best_epoch": 1,
            "converged": True,
            "stopped_early": True,
            "steps": 10,
            "planned_steps": 20,
        }
    )
    assert note == ", held-out best after epoch 1 of 2 (converged, stopped early at step 10 of 20)"
