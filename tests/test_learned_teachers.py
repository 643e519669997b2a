"""Teacher outputs in a learned merge: the cache across jobs, online teachers, labels: auto, several ranks."""

from __future__ import annotations

import contextlib
import dataclasses
import json

import pytest
import torch

from divmerge_core.errors import ConfigError
from divmerge_core.learned import learn_coefficients
from divmerge_core.learned.distributed import learn_distributed
from divmerge_core.progress import Reporter
from tests import test_learned
from tests.test_learned import CPU, _label_logp, make_plan
from tests.tiny import make_bert_classifier, make_tokenizer, perturbed, save

gpt2_setup = test_learned.gpt2_setup  # the module-scoped fixture: two tiny GPT-2 experts and their data


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@contextlib.contextmanager
def teacher_forwards():
    """Count forwards of whole models run without autograd (teachers: generation and scoring; never the
    student, whose forward builds a graph), through a real global forward hook."""
    calls = []

    def hook(module, args, output):
        name = type(module).__name__
        if name.endswith(("LMHeadModel", "ForSequenceClassification")) and not torch.is_grad_enabled():
            calls.append(name)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


def same_values(a, b) -> bool:
    return torch.allclose(torch.tensor(a.values), torch.tensor(b.values), rtol=1e-5, atol=1e-7)


def with_cache(plan, folder, max_bytes=None):
    plan.options = dataclasses.replace(plan.options, teacher_cache_dir=folder, teacher_cache_bytes=max_bytes)
    return plan


def entries(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".teacher.safetensors"))


GPT2_KW = dict(granularity="layer", epochs=2, batch_size_per_task=3, lr=0.05, max_new_tokens=4)


def test_a_second_job_with_the_same_expert_and_data_runs_no_teacher(gpt2_setup, tmp_path):
    base, experts, data = gpt2_setup
    cache = tmp_path / "cache"
    with teacher_forwards() as calls:
        first = learn_coefficients(
            with_cache(make_plan(base, experts, data, **GPT2_KW), cache), device=CPU, reporter=Reporter()
        )
    assert len(calls) > 0 and set(calls) == {"GPT2LMHeadModel"}
    assert len(entries(cache)) == 2  # one per (expert, task inputs)

    events = []
    with teacher_forwards() as calls:
        again = learn_coefficients(
            with_cache(make_plan(base, experts, data, method="divmerge", **GPT2_KW), cache),
            device=CPU,
            reporter=Reporter(events.append),
        )
    assert calls == []
    assert again.values == first.values and again.losses == first.losses
    assert [e.message for e in events if e.stage == "teacher"] == ["cached", "cached"]

    # anything that changes the teacher's outputs misses: another top_k, another expert for task 0
    with teacher_forwards() as calls:
        learn_coefficients(
            with_cache(make_plan(base, experts, data, **GPT2_KW, top_k=5), cache),
            device=CPU,
            reporter=Reporter(),
        )
    assert len(calls) > 0 and len(entries(cache)) == 4
    with teacher_forwards() as calls:
        swapped = [experts[1], experts[1]]
        learn_coefficients(
            with_cache(make_plan(base, swapped, data, **GPT2_KW), cache), device=CPU, reporter=Reporter()
        )
    assert len(calls) > 0 and len(entries(cache)) == 5  # task 1's entry was reused


def test_a_zero_byte_cache_keeps_nothing_after_the_job(gpt2_setup, tmp_path):
    base, experts, data = gpt2_setup
    cache = tmp_path / "cache"
    plan = with_cache(make_plan(base, experts, data, **GPT2_KW), cache, max_bytes=0)
    coeffs = learn_coefficients(plan, device=CPU, reporter=Reporter())
    assert entries(cache) == [] and list(cache.iterdir()) == []
    reference = learn_coefficients(
        with_cache(make_plan(base, experts, data, **GPT2_KW), tmp_path / "c2"),
        device=CPU,
        reporter=Reporter(),
    )
    assert coeffs.values == reference.values


def trajectory(plan):
    grads = []
    coeffs = learn_coefficients(
        plan, device=CPU, reporter=Reporter(), on_gradient=lambda g: grads.append(g.clone())
    )
    return coeffs, torch.stack(grads)


@pytest.mark.parametrize("top_k", [None, 5])
def test_online_teachers_follow_the_cached_trajectory(gpt2_setup, tmp_path, top_k):
    base, experts, data = gpt2_setup
    kw = dict(GPT2_KW, top_k=top_k)
    cached, g_cached = trajectory(with_cache(make_plan(base, experts, data, **kw), tmp_path / "c"))
    with teacher_forwards() as calls:
        online, g_online = trajectory(
            with_cache(make_plan(base, experts, data, teacher="online", **kw), tmp_path / "o")
        )
    assert not (tmp_path / "o").exists()  # nothing stored
    # continuations once per task, then one teacher forward per task at every step
    assert calls.count("GPT2LMHeadModel") > 2 * len(online.losses)
    assert torch.allclose(g_online, g_cached, rtol=1e-4, atol=1e-7)
    assert same_values(online, cached)
    assert online.losses == pytest.approx(cached.losses, rel=1e-5, abs=1e-8)


@pytest.mark.parametrize("placement", ["offload", "stream"])
def test_online_teachers_in_every_placement(gpt2_setup, tmp_path, placement):
    """The online teacher runs on theta_0 + tau_t from wherever the placement keeps the task vectors."""
    base, experts, data = gpt2_setup
    cached, _ = trajectory(with_cache(make_plan(base, experts, data, **GPT2_KW), tmp_path / "c"))
    online, _ = trajectory(
        with_cache(
            make_plan(base, experts, data, teacher="online", placement=placement, **GPT2_KW), tmp_path / "o"
        )
    )
    assert online.placement == placement and same_values(online, cached)


# --- labels: auto -------------------------------------------------------------------------------------------
NAMES = {0: "a:no", 1: "a:yes", 2: "b:x", 3: "b:y"}
TEXTS = [
    ["red cat up", "blue dog", "yes no yes", "a b c", "left dog", "9 8 7", "up up down"],
    ["left right", "bad . up down", "cat", "x y z", "good bad good", "1 2", "no . no"],
]


@pytest.fixture(scope="module")
def shared_head(tmp_path_factory):
    """Two experts of a 4-label classifier; each predicts a different pair of labels on its task's inputs."""
    root = tmp_path_factory.mktemp("shared")
    base = make_bert_classifier(
        seed=3, num_labels=4, id2label=NAMES, label2id={v: k for k, v in NAMES.items()}
    )
    experts = []
    for t, own in enumerate(([0, 1], [2, 3])):
        e = perturbed(base, 0.05, seed=t + 1)
        # the head separates the task's inputs along their main direction, on its own labels only
        with torch.no_grad():
            enc = make_tokenizer("bert")(TEXTS[t], padding=True, return_tensors="pt")
            pooled = e.bert(**enc).pooler_output
            centred = pooled - pooled.mean(0)
            direction = torch.linalg.svd(centred, full_matrices=False).Vh[0]
            e.classifier.weight.zero_()
            e.classifier.bias.fill_(-10.0)
            e.classifier.weight[own[0]] = 50 * direction
            e.classifier.weight[own[1]] = -50 * direction
            e.classifier.bias[own] = (50 * pooled.mean(0) @ direction) * torch.tensor([-1.0, 1.0])
        experts.append(e)
    return save(base, root / "base"), [save(e, root / f"e{i}") for i, e in enumerate(experts)], experts


def test_labels_auto_are_what_each_expert_predicts(shared_head, tmp_path):
    base_dir, expert_dirs, experts = shared_head
    predicted = [
        sorted(set(_label_logp(e, t, None).argmax(-1).tolist())) for e, t in zip(experts, TEXTS, strict=True)
    ]
    assert all(len(p) >= 2 for p in predicted) and predicted[0] != predicted[1]

    def run(labels, **kw):
        data = [{"texts": t, "labels": ls} for t, ls in zip(TEXTS, labels, strict=True)]
        plan = make_plan(
            base_dir, expert_dirs, data, epochs=1, batch_size_per_task=7, granularity="task", **kw
        )
        return learn_coefficients(with_cache(plan, tmp_path / "c"), device=CPU, reporter=Reporter())

    auto = run(["auto", "auto"])
    assert auto.labels == {str(d): [NAMES[i] for i in p] for d, p in zip(expert_dirs, predicted, strict=True)}
    assert auto.to_json()["labels"] == auto.labels
    explicit = run(predicted)
    assert auto.losses == pytest.approx(explicit.losses, rel=1e-6)
    assert run(["all", "all"]).losses[0] != pytest.approx(auto.losses[0], rel=1e-3)
    online = run(["auto", "auto"], teacher="online")
    assert online.labels == auto.labels and online.losses == pytest.approx(auto.losses, rel=1e-5)


def test_unset_labels_follow_the_experts_slices_of_a_shared_head(shared_head, tmp_path):
    """Without ``labels`` a task is scored on its expert's labels when no other expert predicts any of them
    (separate slices of one head), with cached and online teachers alike, and on every label otherwise."""
    base_dir, expert_dirs, experts = shared_head

    def run(dirs, labels, **kw):
        data = [{"texts": t} | ({"labels": ls} if ls else {}) for t, ls in zip(TEXTS, labels, strict=True)]
        plan = make_plan(base_dir, dirs, data, epochs=1, batch_size_per_task=7, granularity="task", **kw)
        return learn_coefficients(with_cache(plan, tmp_path / "c"), device=CPU, reporter=Reporter())

    auto, unset = run(expert_dirs, ["auto", "auto"]), run(expert_dirs, [None, None])
    assert unset.labels == auto.labels and unset.losses == pytest.approx(auto.losses, rel=1e-6)
    assert run(expert_dirs, [None, None], teacher="online").losses == pytest.approx(auto.losses, rel=1e-5)
    # the other task listing this task's labels leaves nothing disjoint: the unset task keeps every label
    first = [NAMES[i] for i in sorted(set(_label_logp(experts[0], TEXTS[0], None).argmax(-1).tolist()))]
    assert list(run(expert_dirs, [None, first]).labels) == [str(expert_dirs[1])]
    assert list(run(expert_dirs, [None, list(NAMES.values())[2:]]).labels) == [str(d) for d in expert_dirs]
    # one expert for both tasks: the same labels on both, so neither is restricted (the former default)
    same, every = run([expert_dirs[0]] * 2, [None, None]), run([expert_dirs[0]] * 2, ["all", "all"])
    assert same.labels is None and same.losses == every.losses


def test_labels_auto_needs_two_predicted_labels_and_a_classifier(shared_head, gpt2_setup, tmp_path):
    base_dir, expert_dirs, _ = shared_head
    data = [{"texts": TEXTS[0][:1], "labels": "auto"}, {"texts": TEXTS[1]}]
    plan = with_cache(make_plan(base_dir, expert_dirs, data, epochs=1), tmp_path / "c")
    with pytest.raises(ConfigError, match="predicts only label") as err:
        learn_coefficients(plan, device=CPU, reporter=Reporter())
    assert err.value.field == "models.0.data.labels"
    base, experts, gdata = gpt2_setup
    gdata = [dict(gdata[0]), dict(gdata[1], labels="auto")]
    with pytest.raises(ConfigError, match="sequence-classification") as err:
        learn_coefficients(make_plan(base, experts, gdata, epochs=1), device=CPU, reporter=Reporter())
    assert err.value.field == "models.1.data.labels"


# --- several ranks -----------------------------------------------------------------------------------------
def test_two_gloo_ranks_learn_what_one_process_learns(gpt2_setup, tmp_path):
    """Each rank continues and scores its share of the prompts (into one shared cache entry per task) and of
    every step's inputs; the summed gradient gives the single-process coefficients."""
    base, experts, data = gpt2_setup
    single = learn_coefficients(
        with_cache(make_plan(base, experts, data, **GPT2_KW), tmp_path / "one"),
        device=CPU,
        reporter=Reporter(),
    )
    events = []
    plan = with_cache(make_plan(base, experts, data, **GPT2_KW), tmp_path / "two")
    two = learn_distributed(plan, devices=2, device=CPU, reporter=Reporter(events.append))
    assert len(entries(tmp_path / "two")) == 2
    assert same_values(two, single)
    assert two.losses == pytest.approx(single.losses, rel=1e-5, abs=1e-8)
    assert [e.step for e in events if e.stage == "optimise"] == list(range(1, len(single.losses) + 1))
    # the entries the two ranks wrote are the ones a single process reads (same continuations, same rows)
    with teacher_forwards() as calls:
        reread = learn_coefficients(
            with_cache(make_plan(base, experts, data, **GPT2_KW), tmp_path / "two"),
            device=CPU,
            reporter=Reporter(),
        )
    assert calls == [] and same_values(reread, single)


def test_a_failing_rank_fails_the_job_with_the_engine_error(shared_head, tmp_path):
    base_dir, expert_dirs, _ = shared_head
    data = [{"texts": TEXTS[0][:1], "labels": "auto"}, {"texts": TEXTS[1]}]
    plan = with_cache(make_plan(base_dir, expert_dirs, data, epochs=1), tmp_path / "c")
    with pytest.raises(ConfigError, match="predicts only label") as err:
        learn_distributed(plan, devices=2, device=CPU, reporter=Reporter())
    assert err.value.field == "models.0.data.labels" and err.value.code == "invalid_config"


def test_coefficients_json_reports_the_labels(shared_head, tmp_path):
    from divmerge_core.pipeline import run_merge

    base_dir, expert_dirs, _ = shared_head
    data = [{"texts": t, "labels": "auto"} for t in TEXTS]
    plan = with_cache(make_plan(base_dir, expert_dirs, data, epochs=1, granularity="task"), tmp_path / "c")
    result = run_merge(plan.config, tmp_path / "out", device="cpu", options=plan.options)
    saved = json.loads((tmp_path / "out" / "coefficients.json").read_text())
    assert (
        set(saved["labels"]) == {str(d) for d in expert_dirs}
        and result.coefficients["labels"] == saved["labels"]
    )


def test_torchrun_ranks_write_one_output(gpt2_setup, tmp_path):
    """``torchrun -m divmerge_core.cli merge``: both ranks learn, rank 0 alone writes the same merge as one process."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from divmerge_core.pipeline import run_merge

    base, experts, data = gpt2_setup
    plan = make_plan(base, experts, data, **GPT2_KW)
    config = tmp_path / "merge.yaml"
    config.write_text(plan.config.to_yaml())
    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": str(root),
        "OMP_NUM_THREADS": "1",
        "DIVMERGE_TEACHER_CACHE_DIR": str(tmp_path / "c"),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += [
        "-m",
        "divmerge_core.cli",
        "merge",
        str(config),
        "--out",
        str(tmp_path / "out"),
        "--device",
        "cpu",
        "-q",
    ]
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=root,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:  # the agent and its ranks, all in their own session
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    res = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("merged 2 model(s)") == 1  # rank 0 only (the 2 experts)
    single = run_merge(plan.config, tmp_path / "single", device="cpu")
    two = json.loads((tmp_path / "out" / "coefficients.json").read_text())
    one = {
        g: [single.coefficients["coefficients"][g][t] for t in single.coefficients["tasks"]]
        for g in single.coefficients["groups"]
    }
    got = {g: [two["coefficients"][g][t] for t in two["tasks"]] for g in two["groups"]}
    assert torch.allclose(
        torch.tensor(list(got.values())), torch.tensor(list(one.values())), rtol=1e-5, atol=1e-7
    )
