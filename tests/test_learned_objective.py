"""A learned method is pluggable: its registry entry declares its objective (the loss, whether it needs
teachers), and ``divmerge_core.learned`` runs that objective without comparing method names. Shown with
methods that exist only in this test module: one registry line each, no engine change."""

from __future__ import annotations

import json

import pytest
import torch

from divmerge_core.config import parse_config
from divmerge_core.methods import registry
from divmerge_core.methods.base import NoModelParameters
from divmerge_core.methods.learned_parameters import LearnedMethod, LearnedParameters, Objective
from divmerge_core.pipeline import run_merge

from .merge_models import bert_family

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: what the test losses saw: (loss name, whether a teacher store came with it)
seen: list[tuple[str, bool]] = []


def confidence(params, kind, store):
    """A test-only objective without teachers: make the merged model confident (minus its top log-prob)."""
    seen.append(("confidence", store is not None))
    return lambda logits, _: -torch.log_softmax(logits, dim=-1).max(dim=-1).values


def teacher_mse(params, kind, store):
    """A test-only objective with teachers: the squared distance to each task's teacher probabilities."""
    seen.append(("teacher_mse", store is not None))

    def loss(logits, picked):
        target, _ = store.targets(picked, logits.device)
        return (torch.softmax(logits, dim=-1) - target.exp()).pow(2).sum(-1)

    return loss


def method(name: str, loss: str, teachers: bool) -> LearnedMethod:
    return LearnedMethod(
        name=name,
        kind="learned",
        parameters=LearnedParameters,
        model_parameters=NoModelParameters,
        card=f"a test-only learned method ({loss})",
        reference="https://example.org",
        queue="gpu",
        objective=Objective(loss=loss, teachers=teachers),
    )


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    return bert_family(tmp_path_factory.mktemp("bert"), n=2)


def config(fam, name: str) -> dict:
    texts = [["a b c", "cat dog up", "red blue", "1 2 3"], ["good bad", "left right", "x y z", "9 8"]]
    return {
        "merge_method": name,
        "base_model": str(fam["base"]),
        "models": [{"model": str(fam[f"t{i + 1}"]), "data": {"texts": texts[i]}} for i in range(2)],
        "parameters": {"granularity": "layer", "epochs": 2, "batch_size_per_task": 2},
    }


@pytest.mark.parametrize(("loss", "teachers"), [("confidence", False), ("teacher_mse", True)])
def test_a_learned_method_is_one_module_and_a_registry_line(fam, tmp_path, monkeypatch, loss, teachers):
    monkeypatch.setitem(registry.METHODS, "toy", method("toy", f"{__name__}:{loss}", teachers))
    seen.clear()
    result = run_merge(parse_config(config(fam, "toy")), tmp_path / "out", device="cpu")
    assert seen == [(loss, teachers)]
    coeffs = json.loads((tmp_path / "out" / "coefficients.json").read_text())
    assert coeffs["method"] == "toy" and len(coeffs["groups"]) > 1
    assert result.metrics["final_loss"] is not None and (tmp_path / "out" / "model.safetensors").is_file()


def test_divmerges_objective_under_another_name_learns_divmerges_coefficients(fam, tmp_path, monkeypatch):
    """No code path depends on the name "divmerge": its objective, registered as "renamed", learns the
    same coefficients bit for bit."""
    entry = registry.METHODS["divmerge"]
    monkeypatch.setitem(registry.METHODS, "renamed", method("renamed", entry.objective.loss, True))
    monkeypatch.setenv("DIVMERGE_TEACHER_CACHE_DIR", str(tmp_path / "cache"))
    a = run_merge(parse_config(config(fam, "divmerge")), tmp_path / "a", device="cpu")
    b = run_merge(parse_config(config(fam, "renamed")), tmp_path / "b", device="cpu")
    assert a.coefficients["coefficients"] == b.coefficients["coefficients"]
    assert a.metrics["final_loss"] == b.metrics["final_loss"]


def test_every_registered_learned_method_declares_an_importable_objective():
    from divmerge_core.learned.objectives import loss_function

    for m in registry.METHODS.values():
        if m.learned:
            assert isinstance(m, LearnedMethod), m.name
            factory = m.objective.loss
            assert loss_function(Objective(factory, teachers=False), LearnedParameters(), "cls", None)
