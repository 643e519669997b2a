"""Learned merges at scale: placements, the memory estimate, micro-batching, checkpointing, bf16 (CPU, tiny models)."""

from __future__ import annotations

import json

import pytest
import torch

from divmerge_core import host_memory as host_mod
from divmerge_core.errors import InsufficientMemoryError
from divmerge_core.learned import estimate_learned_memory, learn_coefficients
from divmerge_core.learned import memory as memory_mod
from divmerge_core.progress import Reporter
from tests.test_learned import CPU, make_plan
from tests.tiny import make_bert_classifier, make_gpt2, perturbed, save

DATA = [
    {"texts": ["a b c", "cat dog up", "red blue", "1 2 3 4", "yes no yes", "up down"]},
    {"texts": ["good bad", "left right . up", "x y z", "9 8", "dog cat", "no yes"]},
    {"texts": ["b c d e", "blue red", "7 7 7", "left", "right up", "cat"]},
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """A causal family (GPT-2, tied embeddings) and a classifier family (BERT), three experts each."""
    root = tmp_path_factory.mktemp("scale")
    out = {}
    for name, make in (("gpt2", make_gpt2), ("bert", make_bert_classifier)):
        base = make(seed=0)
        out[name] = (
            save(base, root / f"{name}-base"),
            [save(perturbed(base, 0.3, seed=s), root / f"{name}-e{s}") for s in (1, 2, 3)],
        )
    return out


def trajectory(
    family, dtype: str = "float32", **params
) -> tuple[list[float], list[list[float]], list[list[float]]]:
    """(loss per step, Gamma's gradient per step, final Gamma) of one run."""
    base, experts = family
    kw = dict(granularity="layer", epochs=2, batch_size_per_task=3, lr=0.05, max_new_tokens=4) | params
    plan = make_plan(base, experts, DATA, **kw)
    plan.config = plan.config.model_copy(update={"dtype": dtype})
    grads: list[list[float]] = []
    coeffs = learn_coefficients(
        plan,
        device=CPU,
        reporter=Reporter(),
        on_gradient=lambda g: grads.append(g.flatten().tolist()),
    )
    return coeffs.losses, grads, coeffs.values


def assert_same(a, b, rtol: float, atol: float) -> None:
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(torch.tensor(x), torch.tensor(y), rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", ["gpt2", "bert"])
@pytest.mark.parametrize("placement", ["offload", "stream"])
def test_placements_follow_the_resident_trajectory_fp32(families, name, placement):
    ref = trajectory(families[name], placement="resident")
    got = trajectory(families[name], placement=placement)
    assert len(ref[0]) == len(got[0]) == 4 and all(abs(v - 1 / 3) > 1e-3 for row in ref[2] for v in row)
    assert_same(ref, got, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("placement", ["offload", "stream"])
def test_placements_follow_the_resident_trajectory_bf16(families, placement):
    """bf16 compute: weights and task vectors in bf16, Gamma, loss and divergence in fp32."""
    ref = trajectory(families["gpt2"], placement="resident", dtype="bfloat16")
    got = trajectory(families["gpt2"], placement=placement, dtype="bfloat16")
    assert all(isinstance(v, float) for row in got[2] for v in row)
    # resident differentiates the merge in bf16, offload/stream take fp32 inner products: close, not equal
    assert_same([ref[0]], [got[0]], rtol=2e-2, atol=2e-3)
    assert_same([ref[2]], [got[2]], rtol=1e-2, atol=1e-3)


def test_bf16_learned_merge_writes_a_bf16_model(families, tmp_path):
    from divmerge_core.io.loading import Checkpoint
    from divmerge_core.pipeline import run_merge

    base, experts = families["gpt2"]
    plan = make_plan(base, experts, DATA, epochs=2, batch_size_per_task=3, lr=0.05, max_new_tokens=4)
    config = plan.config.model_copy(update={"dtype": "bfloat16"})
    result = run_merge(config, tmp_path / "out", device="cpu")
    assert result.metrics["placement"] == "resident" and result.metrics["steps"] == 4
    losses = json.loads((tmp_path / "out" / "coefficients.json").read_text())["losses"]
    assert losses[-1] < losses[0]
    with Checkpoint(tmp_path / "out") as out:
        assert out.dtype("transformer.h.0.mlp.c_fc.weight") == torch.bfloat16


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_micro_batches_add_up_to_the_whole_batch(families, name):
    whole = trajectory(families[name])
    for micro in (1, 4):
        assert_same(whole, trajectory(families[name], micro_batch_size=micro), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("placement", ["resident", "stream"])
def test_gradient_checkpointing_changes_nothing(families, placement):
    plain = trajectory(families["gpt2"], placement=placement)
    ckpt = trajectory(families["gpt2"], placement=placement, gradient_checkpointing=True, micro_batch_size=4)
    assert_same(plain, ckpt, rtol=1e-5, atol=1e-6)


def test_estimate_is_plain_and_grows_with_k_only_where_it_should(families):
    base, experts = families["gpt2"]
    estimates = [
        estimate_learned_memory(make_plan(base, experts[:k], DATA[:k]), torch.device("cuda")) for k in (1, 3)
    ]
    json.dumps(estimates)  # a plain dict the service can return as is
    tau1 = estimates[0]["parts"]["task_vectors"]
    assert estimates[1]["parts"]["task_vectors"] == 3 * tau1 > 0

    def need(e: dict, placement: str, where: str) -> int:
        """The placement's need without the activations (they grow with the step's batch, K inputs)."""
        return e["placements"][placement][where] - (e["parts"]["activations"] if where == "device" else 0)

    one, three = estimates
    assert need(three, "resident", "device") - need(one, "resident", "device") == 2 * tau1
    assert need(three, "offload", "host") - need(one, "offload", "host") == 2 * tau1
    assert need(three, "stream", "host") == need(one, "stream", "host")
    assert need(three, "stream", "device") == need(one, "stream", "device")  # one tensor in transit, any K
    assert need(three, "offload", "device") == need(one, "offload", "device")


def test_auto_picks_the_fastest_placement_that_fits(families, monkeypatch):
    base, experts = families["gpt2"]
    plan = make_plan(base, experts, DATA)
    need = estimate_learned_memory(plan, CPU)["placements"]
    assert estimate_learned_memory(plan, CPU)["chosen"] == "resident"  # tiny models fit this machine
    room = (need["resident"]["host"] + need["stream"]["host"]) / 2 / memory_mod.HEADROOM
    assert need["stream"]["host"] < room * memory_mod.HEADROOM < need["resident"]["host"]
    monkeypatch.setattr(memory_mod, "free_memory", lambda device: {"device": 0, "host": int(room)})
    expected = "offload" if need["offload"]["host"] <= room * memory_mod.HEADROOM else "stream"
    coeffs = learn_coefficients(make_plan(base, experts, DATA, epochs=1), device=CPU, reporter=Reporter())
    assert coeffs.placement == expected


def _cgroup(tmp_path, files: dict[str, str], self_cgroup: str) -> tuple[int, int] | None:
    tmp_path.mkdir()
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    (tmp_path / "self").write_text(self_cgroup)
    return host_mod.cgroup_memory(tmp_path / "fs", tmp_path / "self")


def test_host_memory_is_the_containers_limit(tmp_path):
    """A worker in a container may use its memory cgroup's limit minus its usage (page cache that can be
    reclaimed not counted), not the host's MemAvailable: (limit, available); no limit reads as None."""
    gib = 1 << 30
    stat = f"anon 100\ninactive_file {gib}\n"
    v2 = {
        "fs/job/memory.max": str(8 * gib),
        "fs/job/memory.current": str(3 * gib),
        "fs/job/memory.stat": stat,
    }
    assert _cgroup(tmp_path / "a", v2, "0::/job\n") == (8 * gib, 6 * gib)
    assert _cgroup(tmp_path / "b", {"fs/memory.max": "max\n"}, "0::/\n") is None
    v1 = {
        "fs/memory/memory.limit_in_bytes": str(4 * gib),
        "fs/memory/memory.usage_in_bytes": str(gib),
        "fs/memory/memory.stat": f"total_inactive_file {gib // 2}\n",
    }  # Docker on cgroup v1 mounts the container's own cgroup at the root
    assert _cgroup(tmp_path / "c", v1, "4:memory:/docker/abc\n0::/\n") == (4 * gib, 3 * gib + gib // 2)
    unlimited = {
        "fs/memory/memory.limit_in_bytes": "9223372036854771712",
        "fs/memory/memory.usage_in_bytes": "5",
    }
    assert _cgroup(tmp_path / "d", unlimited, "4:memory:/\n") is None
    assert _cgroup(tmp_path / "e", {}, "") is None


def test_auto_respects_the_containers_limit(families, monkeypatch):
    """The host's memory is the machine's capped by the cgroup's limit and room, for the placement choice
    (free_memory: auto picks a placement that fits inside a container) and for the capacity a worker
    advertises alike."""
    from divmerge_service.config import Settings
    from divmerge_worker import capacity

    gib = 1 << 30
    monkeypatch.setattr(host_mod, "meminfo", lambda: (2048 * gib, 1024 * gib))
    monkeypatch.setattr(host_mod, "cgroup_memory", lambda: (2 * gib, gib))
    assert memory_mod.free_memory(torch.device("cpu"))["host"] == gib
    assert capacity.host_memory(Settings()) == (2 * gib, gib)
    monkeypatch.setattr(host_mod, "cgroup_memory", lambda: None)
    assert memory_mod.free_memory(torch.device("cpu"))["host"] == 1024 * gib
    assert capacity.host_memory(Settings()) == (2048 * gib, 1024 * gib)


def test_nothing_fits_is_refused_before_loading_anything(families, monkeypatch):
    base, experts = families["gpt2"]
    monkeypatch.setattr(memory_mod, "free_memory", lambda device: {"device": 0, "host": 1 << 20})
    events = []
    # the data file does not exist: loading it would fail with another error
    data = [{"path": "/nonexistent/inputs.jsonl"}] * 3
    with pytest.raises(InsufficientMemoryError) as err:
        learn_coefficients(make_plan(base, experts, data), device=CPU, reporter=Reporter(events.append))
    assert err.value.field == "parameters.placement" and err.value.code == "insufficient_memory"
    assert "stream" in str(err.value) and "micro_batch_size: 1" in str(err.value)
    assert err.value.estimate["chosen"] is None and not events
    # an explicit placement is run as asked
    coeffs = learn_coefficients(
        make_plan(base, experts, DATA, epochs=1, placement="stream"), device=CPU, reporter=Reporter()
    )
    assert coeffs.placement == "stream"


def test_validate_prints_the_memory_estimate(families, tmp_path, capsys):
    import yaml

    from divmerge_core.cli import main

    base, experts = families["gpt2"]
    plan = make_plan(base, experts, DATA, placement="stream")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(plan.config.model_dump(mode="json", by_alias=True)))
    assert main(["validate", str(tmp_path / "c.yaml"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "memory estimate on cpu (float32, K=3" in out
    for placement in ("resident", "offload", "stream"):
        assert f"  {placement} " in out
    assert "auto would use: resident" in out


@pytest.mark.parametrize("placement", ["offload", "stream"])
def test_online_teachers_work_with_every_placement(families, placement):
    """``teacher: online`` recomputes each teacher from theta_0 + tau_t, which offload/stream form per tensor."""
    ref = trajectory(families["gpt2"], placement="resident", teacher="online")
    assert_same(
        ref, trajectory(families["gpt2"], placement=placement, teacher="online"), rtol=1e-5, atol=1e-6
    )
