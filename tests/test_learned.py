"""End to end at CPU speed: tiny experts fine-tuned here, then DivMerge / AdaMerging coefficients."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from divmerge_core.config import parse_config
from divmerge_core.errors import ConfigError, MergeCancelled, NumericalError
from divmerge_core.io.loading import Checkpoint
from divmerge_core.io.refs import ResolvedModel, parse_model_ref
from divmerge_core.learned import learn_coefficients
from divmerge_core.learned.reference import CAUSAL, build_module
from divmerge_core.options import EngineOptions
from divmerge_core.pipeline import prepare
from divmerge_core.plan import LearnedCoefficients, MergePlan
from divmerge_core.progress import Reporter
from tests.tiny import make_bert_classifier, make_gpt2, make_tokenizer, perturbed, save

CPU = torch.device("cpu")
FILLER = ["red", "blue", "cat", "dog", "up", "down", "left", "right", "yes", "no", "bad", "."]
LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)]
DIGITS = [str(d) for d in range(10)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- synthetic tasks ---------------------------------------------------------------------------------------
def task_good(rng: random.Random) -> tuple[str, int]:
    """Label 1 iff the text contains 'good'."""
    words = [rng.choice(FILLER) for _ in range(rng.randint(3, 6))]
    label = rng.random() < 0.5
    if label:
        words.insert(rng.randrange(len(words) + 1), "good")
    return " ".join(words), int(label)


def task_digit(rng: random.Random) -> tuple[str, int]:
    """Label 1 iff the first token is a digit."""
    label = rng.random() < 0.5
    first = rng.choice(DIGITS if label else LETTERS)
    rest = [rng.choice(LETTERS + DIGITS) for _ in range(rng.randint(2, 5))]
    return " ".join([first, *rest]), int(label)


TASKS = [task_good, task_digit]


def sample(task, n: int, seed: int) -> tuple[list[str], list[int]]:
    rng = random.Random(seed)
    pairs = [task(rng) for _ in range(n)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def fine_tune(model, texts: list[str], labels: list[int], steps: int = 120, seed: int = 0):
    tok = make_tokenizer("bert")
    enc = tok(texts, padding=True, return_tensors="pt")
    y = torch.tensor(labels)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(texts), (32,))
        out = model(**{k: v[idx] for k, v in enc.items()}, labels=y[idx])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model, texts: list[str], labels: list[int]) -> float:
    enc = make_tokenizer("bert")(texts, padding=True, return_tensors="pt")
    pred = model(**enc).logits.argmax(-1)
    return (pred == torch.tensor(labels)).float().mean().item()


def merged_state(base: Path, experts: list[Path], coeffs: LearnedCoefficients | None) -> dict:
    """What the pipeline writes: base + sum_t coeff_t * tau_t (plain averaging when coeffs is None)."""
    out = {}
    with Checkpoint(base) as b:
        cks = [Checkpoint(e) for e in experts]
        for n in b.names:
            w = b.get(n)
            if w.is_floating_point():
                cs = coeffs.for_tensor(n) if coeffs else [1.0 / len(experts)] * len(experts)
                w = w + sum(c * (ck.get(n) - b.get(n)) for c, ck in zip(cs, cks, strict=True))
            out[n] = w
    return out


def make_plan(
    base: Path, experts: list[Path], data: list[dict], method: str = "divmerge", **params
) -> MergePlan:
    config = parse_config(
        {
            "merge_method": method,
            "base_model": str(base),
            "models": [{"model": str(e), "data": d} for e, d in zip(experts, data, strict=True)],
            "parameters": params,
        }
    )
    resolve = lambda p: ResolvedModel(ref=parse_model_ref(str(p)), path=Path(p), commit=None)  # noqa: E731
    with Checkpoint(base) as ck:
        names = ck.names
    return MergePlan(
        config=config,
        options=EngineOptions(),
        base=resolve(base),
        models=[resolve(e) for e in experts],
        specs=config.task_models(),
        reference=resolve(base),
        model_config=json.loads((Path(base) / "config.json").read_text()),
        tensor_names=names,
    )


# --- fixtures ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bert_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    torch.set_num_threads(1)
    base = make_bert_classifier(seed=0)
    base_dir = save(base, root / "base")
    experts, evals, unlabelled = [], [], []
    for t, task in enumerate(TASKS):
        texts, labels = sample(task, 400, seed=10 + t)
        expert = fine_tune(perturbed(base, 0.0, seed=t), texts, labels, seed=t)
        experts.append(save(expert, root / f"expert{t}"))
        evals.append(sample(task, 300, seed=100 + t))
        unlabelled.append(sample(task, 64, seed=200 + t)[0])
    return base_dir, experts, evals, unlabelled


@pytest.fixture(scope="module")
def gpt2_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2")
    base = make_gpt2(seed=0)
    base_dir = save(base, root / "base")
    experts = [save(perturbed(base, 0.3, seed=s), root / f"expert{s}") for s in (1, 2)]
    data = [
        {"texts": ["a b c", "cat dog up", "red blue", "1 2 3 4", "yes no yes"]},
        {"texts": ["good bad", "left right . up", "x y z", "9 8"]},
    ]
    return base_dir, experts, data


# --- tests -------------------------------------------------------------------------------------------------
def normalised_accuracy(state: dict, experts: list[Path], evals) -> float:
    model = make_bert_classifier()
    model.load_state_dict(state, strict=False)
    scores = []
    for expert_dir, (texts, labels) in zip(experts, evals, strict=True):
        expert = make_bert_classifier()
        with Checkpoint(expert_dir) as ck:
            expert.load_state_dict(ck.state_dict(), strict=False)
        scores.append(accuracy(model, texts, labels) / accuracy(expert, texts, labels))
    return sum(scores) / len(scores)


def test_divmerge_layer_beats_averaging(bert_setup):
    base, experts, evals, unlabelled = bert_setup
    data = [{"texts": u, "num_samples": 64} for u in unlabelled]
    events = []
    plan = make_plan(base, experts, data, granularity="layer", lr=0.05, epochs=4, batch_size_per_task=8)
    coeffs = learn_coefficients(plan, device=CPU, reporter=Reporter(progress=events.append))

    assert coeffs.tasks == [str(e) for e in experts]
    assert "embeddings" in coeffs.groups and "head" in coeffs.groups
    assert all(any(n.startswith(g) for n in coeffs.group_of) for g in coeffs.groups if "layer." in g)
    assert len(coeffs.losses) == 4 * 8
    assert sum(coeffs.losses[-4:]) < sum(coeffs.losses[:4])
    stages = {e.stage for e in events}
    assert {"data", "teacher", "optimise"} <= stages
    opt = [e for e in events if e.stage == "optimise"]
    assert opt[-1].step == opt[-1].total == len(coeffs.losses)

    averaged = normalised_accuracy(merged_state(base, experts, None), experts, evals)
    learned = normalised_accuracy(merged_state(base, experts, coeffs), experts, evals)
    print(f"normalised accuracy: averaging {averaged:.3f}, divmerge {learned:.3f}; {coeffs.values}")
    assert learned > averaged + 0.05


def test_divmerge_is_deterministic_and_kl_task_level(bert_setup):
    base, experts, _, unlabelled = bert_setup
    data = [{"texts": u[:16]} for u in unlabelled]
    kw = dict(granularity="task", divergence="kl", epochs=2, batch_size_per_task=4)
    a = learn_coefficients(make_plan(base, experts, data, **kw), device=CPU, reporter=Reporter())
    b = learn_coefficients(make_plan(base, experts, data, **kw), device=CPU, reporter=Reporter())
    assert a.groups == ["all"] and a.values == b.values and a.losses == b.losses
    assert set(a.group_of) == set(Checkpoint(base).names)


def test_adamerging_runs(bert_setup):
    base, experts, _, unlabelled = bert_setup
    data = [{"texts": u[:16]} for u in unlabelled]
    events = []
    plan = make_plan(base, experts, data, method="adamerging", epochs=2, batch_size_per_task=4, lr=0.05)
    coeffs = learn_coefficients(plan, device=CPU, reporter=Reporter(progress=events.append))
    assert coeffs.method == "adamerging" and len(coeffs.losses) == 8
    assert coeffs.losses[-1] < coeffs.losses[0]
    assert "teacher" not in {e.stage for e in events}


def test_cancellation_is_prompt(bert_setup):
    base, experts, _, unlabelled = bert_setup
    data = [{"texts": u[:16]} for u in unlabelled]
    steps = []

    def progress(event):
        if event.stage == "optimise":
            steps.append(event.step)

    plan = make_plan(base, experts, data, epochs=50, batch_size_per_task=4)
    with pytest.raises(MergeCancelled):
        learn_coefficients(plan, device=CPU, reporter=Reporter(progress, should_stop=lambda: len(steps) >= 2))
    assert steps == [1, 2]

    teachers = []

    def progress_teacher(event):
        if event.stage == "teacher":
            teachers.append(event.step)

    with pytest.raises(MergeCancelled):
        learn_coefficients(plan, device=CPU, reporter=Reporter(progress_teacher, lambda: bool(teachers)))
    assert teachers == [1]


def test_non_finite_loss_raises(bert_setup):
    base, experts, _, unlabelled = bert_setup
    data = [{"texts": u[:4]} for u in unlabelled]
    plan = make_plan(base, experts, data, granularity="task", init=1e38, epochs=1)
    with pytest.raises(NumericalError, match="loss"):
        learn_coefficients(plan, device=CPU, reporter=Reporter())


def test_tensor_granularity_covers_every_float_tensor(bert_setup):
    base, experts, _, unlabelled = bert_setup
    data = [{"texts": u[:8]} for u in unlabelled]
    plan = make_plan(base, experts, data, granularity="tensor", epochs=1, batch_size_per_task=4)
    coeffs = learn_coefficients(plan, device=CPU, reporter=Reporter())
    with Checkpoint(base) as ck:
        floats = [n for n in ck.names if ck.dtype(n).is_floating_point]
    assert coeffs.groups == floats
    assert all(len(coeffs.for_tensor(n)) == 2 for n in floats)


def test_causal_lm_generation_path(gpt2_setup):
    base, experts, data = gpt2_setup
    kw = dict(granularity="layer", epochs=6, batch_size_per_task=4, lr=0.05, max_new_tokens=6)
    coeffs = learn_coefficients(make_plan(base, experts, data, **kw), device=CPU, reporter=Reporter())
    assert coeffs.losses[-1] < coeffs.losses[0]
    # GPT-2's lm_head is tied to wte: only wte is in the checkpoint and it gets the embeddings group
    module = build_module(base, CAUSAL, torch.float32, CPU)
    assert module.lm_head.weight is module.transformer.wte.weight
    assert coeffs.group_of["transformer.wte.weight"] == "embeddings"
    assert "transformer.h.0" in coeffs.groups and "final_norm" in coeffs.groups

    top = learn_coefficients(make_plan(base, experts, data, top_k=5, **kw), device=CPU, reporter=Reporter())
    assert top.losses[-1] < top.losses[0]
    assert top.losses != coeffs.losses


def test_unsupported_architecture(tmp_path, gpt2_setup):
    base, experts, data = gpt2_setup
    plan = make_plan(base, experts, data)
    plan.model_config = {**plan.model_config, "architectures": ["GPT2Model"]}
    with pytest.raises(ConfigError, match="sequence-classification and causal-LM"):
        learn_coefficients(plan, device=CPU, reporter=Reporter())


def test_run_merge_writes_learned_merge(gpt2_setup, tmp_path):
    """Through the pipeline: the written tensors are base + sum_t coeff_t * tau_t with the learned coefficients."""
    from divmerge_core.pipeline import run_merge

    base, experts, data = gpt2_setup
    plan = make_plan(
        base, experts, data, granularity="layer", epochs=2, batch_size_per_task=4, max_new_tokens=4
    )
    result = run_merge(plan.config, tmp_path / "out", device="cpu")
    saved = json.loads((tmp_path / "out" / "coefficients.json").read_text())
    assert saved["method"] == "divmerge" and result.metrics["steps"] == 4
    coeffs = LearnedCoefficients(
        method="divmerge",
        granularity="layer",
        groups=saved["groups"],
        tasks=saved["tasks"],
        values=[[saved["coefficients"][g][t] for t in saved["tasks"]] for g in saved["groups"]],
        group_of=saved["group_of"],
        losses=saved["losses"],
    )
    expected = merged_state(base, experts, coeffs)
    with Checkpoint(tmp_path / "out") as out:
        for name in ("transformer.wte.weight", "transformer.h.1.mlp.c_fc.weight", "transformer.ln_f.bias"):
            assert torch.allclose(out.get(name), expected[name], atol=1e-6)


def test_teacher_targets_align_with_the_greedy_continuation(gpt2_setup):
    """The teacher's distribution at each generated position predicts exactly the token it generated."""
    from divmerge_core.learned.data import TaskInputs
    from divmerge_core.learned.encoding import encode
    from divmerge_core.learned.reference import load_tokenizer
    from divmerge_core.learned.teachers import continue_prompts, teacher_logp, top_k_support

    base, experts, data = gpt2_setup
    tok = load_tokenizer(experts[0])
    module = build_module(experts[0], CAUSAL, torch.float32, CPU)
    with Checkpoint(experts[0]) as ck:
        module.load_state_dict(ck.state_dict(), strict=False)
    config = json.loads((experts[0] / "config.json").read_text())
    examples = encode(CAUSAL, tok, TaskInputs(data[0]["texts"], "inline"), 0, 16, 5, config)
    prompts = [list(e.fields["input_ids"]) for e in examples]
    continue_prompts(module, tok, examples, batch_size=3, max_new_tokens=5, device=CPU)
    logp = teacher_logp(module, CAUSAL, tok, examples, CPU)
    counts = [e.stop - e.start for e in examples]
    for e, prompt, target in zip(examples, prompts, logp.split(counts), strict=True):
        ids = e.fields["input_ids"]
        assert ids[: len(prompt)] == prompt and e.start == len(prompt) - 1
        generated = ids[len(prompt) :]
        assert 1 <= len(generated) <= 5 and (len(generated) == 5 or generated[-1] == tok.eos_token_id)
        assert target.shape == (len(generated), len(tok))
        assert target.argmax(-1).tolist() == generated
        assert torch.allclose(target.exp().sum(-1), torch.ones(len(generated)), atol=1e-5)
    top, index = top_k_support(logp, 3)
    assert top.shape == index.shape == (sum(counts), 3)
    assert torch.allclose(top.exp().sum(-1), torch.ones(sum(counts)), atol=1e-5)
    assert index[:, 0].tolist() == logp.argmax(-1).tolist()


def _label_logp(model, texts: list[str], labels: list[int] | None) -> torch.Tensor:
    """``model``'s log-probabilities on ``texts``, renormalised over ``labels`` (all labels if None)."""
    tok = make_tokenizer("bert")
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits.float()
    if labels is not None:
        keep = torch.zeros(logits.shape[-1], dtype=torch.bool)
        keep[labels] = True
        logits = logits.masked_fill(~keep, float("-inf"))
    return torch.log_softmax(logits, dim=-1)


def test_labels_restrict_both_distributions(tmp_path):
    """With a head shared by two tasks, ``data.labels`` scores each task on its own labels only."""
    from divmerge_core.learned.divergence import js

    names = {0: "a:no", 1: "a:yes", 2: "b:x", 3: "b:y"}
    base = make_bert_classifier(
        seed=3, num_labels=4, id2label=names, label2id={v: k for k, v in names.items()}
    )
    base_dir = save(base, tmp_path / "base")
    experts = [perturbed(base, 0.3, seed=s) for s in (1, 2)]
    expert_dirs = [save(e, tmp_path / f"e{i}") for i, e in enumerate(experts)]
    texts = [["red cat up", "blue dog", "yes no yes"], ["left right", "bad . up down", "cat"]]
    own = [[0, 1], [2, 3]]
    averaged = make_bert_classifier(seed=3, num_labels=4)
    averaged.load_state_dict(merged_state(base_dir, expert_dirs, None), strict=False)

    def first_loss(data: list[dict]) -> float:
        plan = make_plan(base_dir, expert_dirs, data, epochs=1, batch_size_per_task=3, granularity="task")
        return learn_coefficients(plan, device=CPU, reporter=Reporter()).losses[0]

    for labels in (own, [None, None]):
        data = [{"texts": t} | ({"labels": ls} if ls else {}) for t, ls in zip(texts, labels, strict=True)]
        if labels[0] is not None:  # names and ids are both accepted
            data[0]["labels"] = ["a:no", "a:yes"]
        want = (
            sum(
                js(_label_logp(e, t, ls), _label_logp(averaged, t, ls)).mean()
                for e, t, ls in zip(experts, texts, labels, strict=True)
            )
            / 2
        )
        assert first_loss(data) == pytest.approx(float(want), rel=1e-4, abs=1e-7)
    assert first_loss([{"texts": texts[0], "labels": [0, 1]}, {"texts": texts[1]}]) != pytest.approx(
        first_loss([{"texts": t} for t in texts]), rel=1e-3
    )

    bad = [{"texts": texts[0], "labels": [0, 1]}, {"texts": texts[1], "labels": ["b:x", "c:nope"]}]
    with pytest.raises(ConfigError) as err:
        first_loss(bad)
    assert err.value.field == "models.1.data.labels" and "c:nope" in str(err.value)
    config = parse_config(
        {
            "merge_method": "divmerge",
            "base_model": str(base_dir),
            "models": [{"model": str(e), "data": d} for e, d in zip(expert_dirs, bad, strict=True)],
        }
    )
    with pytest.raises(ConfigError, match="c:nope"):  # `divmerge validate` and the worker see it up front
        prepare(config)
    with pytest.raises(ConfigError, match="at least two distinct labels") as err:
        parse_config(
            {
                "merge_method": "divmerge",
                "base_model": "b",
                "models": [{"model": "m", "data": {"texts": ["x"], "labels": [1, 1]}}],
            }
        )
    assert err.value.field == "models.0.data.labels"


def test_labels_refused_for_causal_lms(gpt2_setup):
    base, experts, data = gpt2_setup
    data = [dict(data[0], labels=[0, 1]), data[1]]
    with pytest.raises(ConfigError, match="sequence-classification") as err:
        learn_coefficients(make_plan(base, experts, data, epochs=1), device=CPU, reporter=Reporter())
    assert err.value.field == "models.0.data.labels"


def test_sampler_shuffles_each_task_and_covers_every_input():
    """Batches come from a seeded reshuffle per task (not input order), every input once per pass."""
    from divmerge_core.learned.optimise import Sampler as _Sampler

    def first_pass(seed: int) -> list[list[int]]:
        sampler = _Sampler([12, 12], batch=4, seed=seed)
        steps = [sampler.next() for _ in range(3)]
        return [[i for step in steps for i in step[t]] for t in range(2)]

    a, b = first_pass(0), first_pass(1)
    for order in a + b:
        assert sorted(order) == list(range(12))  # each input exactly once per pass
    assert a[0] not in (list(range(12)), list(range(11, -1, -1)))  # shuffled, not in (reversed) order
    assert a[0] != a[1]  # each task its own order
    assert a != b and first_pass(0) == a  # seeded: another seed, another order; same seed, same order
