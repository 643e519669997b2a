"""Built-in evaluation (``eval`` blocks, ``evaluation.json``, compare/select), on tiny models of both kinds.

Every score is checked against an independent computation with plain transformers (``from_pretrained``,
one example at a time), so the engine's batching, padding, label restriction and answer matching are what
is under test.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from divmerge_core.cli import main as cli_main
from divmerge_core.config import parse_config
from divmerge_core.errors import ConfigError, DatasetError
from divmerge_core.evaluation.scoring import match_answer
from divmerge_core.io.loading import Checkpoint
from divmerge_core.options import EngineOptions
from divmerge_core.pipeline import run_merge
from tests.merge_models import write_config
from tests.tiny import make_bert_classifier, make_gpt2, perturbed, save

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS = [
    "cat dog up",
    "red blue left",
    "1 2 3 4",
    "yes no yes",
    "x y z",
    "good bad cat",
    "down right 7",
    "a b c d e",
    "blue dog 9",
    "left up no",
    "q r s",
    "cat 5 red",
]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A 3-label tiny BERT base and two experts far enough from it that their predictions differ."""
    root = tmp_path_factory.mktemp("evalbert")
    base = make_bert_classifier(seed=0, num_labels=3, id2label={0: "neg", 1: "neu", 2: "pos"})
    return {
        "base": save(base, root / "base"),
        "e1": save(perturbed(base, 0.5, seed=1), root / "e1"),
        "e2": save(perturbed(base, 0.5, seed=2), root / "e2"),
    }


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalgpt2")
    base = make_gpt2(seed=0)
    return {
        "base": save(base, root / "base"),
        "e1": save(perturbed(base, 0.8, seed=1), root / "e1"),
        "e2": save(perturbed(base, 0.8, seed=2), root / "e2"),
    }


@pytest.fixture
def options(tmp_path):
    return EngineOptions(teacher_cache_dir=tmp_path / "cache")


@torch.no_grad()
def cls_predictions(folder: Path, texts: list[str], allowed: list[int] | None = None) -> list[int]:
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    out = []
    for t in texts:
        logits = model(**tok(t, return_tensors="pt")).logits[0]
        if allowed is not None:
            keep = torch.full_like(logits, -math.inf)
            keep[allowed] = 0
            logits = logits + keep
        out.append(int(logits.argmax()))
    return out


@torch.no_grad()
def greedy_answers(folder: Path, texts: list[str], max_new_tokens: int) -> list[str]:
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    out = []
    for t in texts:
        ids = tok(t, return_tensors="pt")
        gen = model.generate(
            **ids, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id
        )
        out.append(tok.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
    return out


def cls_config(bert, labels_of: dict[str, list[int]], method="task_arithmetic", **extra):
    models = []
    for name in ("e1", "e2"):
        models.append(
            {"model": str(bert[name]), "eval": {"texts": TEXTS, "labels": labels_of[name]}}
            | extra.get(name, {})
        )
    cfg = {"merge_method": method, "base_model": str(bert["base"]), "models": models}
    cfg.update({k: v for k, v in extra.items() if k not in ("e1", "e2")})
    return cfg


def test_classification_scores_match_an_independent_computation(bert, tmp_path, options):
    # gold labels: expert 1's own predictions for task e1, a fixed labelling for e2
    gold1 = cls_predictions(bert["e1"], TEXTS)
    gold2 = [i % 3 for i in range(len(TEXTS))]
    config = parse_config(cls_config(bert, {"e1": gold1, "e2": gold2}))
    result = run_merge(config, tmp_path / "out", options=options, device="cpu")
    ev = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert ev == result.evaluation and "evaluation.json" in result.files
    merged1 = cls_predictions(tmp_path / "out", TEXTS)
    e2 = cls_predictions(bert["e2"], TEXTS)
    merged2 = merged1  # one head: the same predictions, scored against each task's labels
    acc = lambda p, g: sum(a == b for a, b in zip(p, g, strict=True)) / len(g)  # noqa: E731
    t1, t2 = ev["tasks"]["e1"], ev["tasks"]["e2"]
    assert t1["n"] == t2["n"] == len(TEXTS)
    assert t1["expert"] == 1.0
    assert t1["merged"] == pytest.approx(acc(merged1, gold1), abs=1e-4)
    assert t2["expert"] == pytest.approx(acc(e2, gold2), abs=1e-4)
    assert t2["merged"] == pytest.approx(acc(merged2, gold2), abs=1e-4)
    assert t1["retained"] == pytest.approx(100 * t1["merged"] / t1["expert"], abs=0.01)
    assert ev["anp"] == pytest.approx((t1["retained"] + t2["retained"]) / 2, abs=0.01)
    lo, hi = ev["anp_ci95"]
    assert lo <= ev["anp"] <= hi
    assert ev["metric"] == "accuracy" and ev["selected"] == "task_arithmetic"
    assert "base" not in t1
    card = (tmp_path / "out" / "README.md").read_text()
    assert "model-index:" in card and "## Evaluation" in card


def test_classification_argmax_is_restricted_to_the_tasks_labels(bert, tmp_path, options):
    gold = [2 if i % 2 else 1 for i in range(len(TEXTS))]
    cfg = cls_config(
        bert,
        {"e1": gold, "e2": gold},
        e1={"data": {"texts": TEXTS, "labels": ["neu", "pos"]}},
        e2={"data": {"texts": ["dog cat", "up down"]}},
    )
    result = run_merge(parse_config(cfg), tmp_path / "out", options=options, device="cpu")
    ev = result.evaluation
    restricted = cls_predictions(bert["e1"], TEXTS, allowed=[1, 2])
    free = cls_predictions(bert["e2"], TEXTS)
    acc = lambda p: sum(a == b for a, b in zip(p, gold, strict=True)) / len(gold)  # noqa: E731
    assert ev["tasks"]["e1"]["expert"] == pytest.approx(acc(restricted), abs=1e-4)
    assert ev["tasks"]["e2"]["expert"] == pytest.approx(acc(free), abs=1e-4)
    # the task's data is also what the eval set holds: the score is flagged optimistic
    assert any("models.0.eval" in w and "optimistic" in w for w in ev["warnings"])
    assert not any("models.1.eval" in w and "optimistic" in w for w in ev["warnings"])


def test_unset_labels_restrict_the_argmax_where_tasks_use_separate_classes(bert, tmp_path, options):
    """Without ``data.labels`` a task whose gold classes no other task uses is scored on them (the tasks sit
    on separate slices of one head); ``labels: all`` keeps the whole head."""
    gold1, gold2 = [2 if i % 2 else 1 for i in range(len(TEXTS))], [0] * len(TEXTS)
    acc = lambda p: sum(a == b for a, b in zip(p, gold1, strict=True)) / len(gold1)  # noqa: E731
    restricted, free = cls_predictions(bert["e1"], TEXTS, allowed=[1, 2]), cls_predictions(bert["e1"], TEXTS)
    assert acc(restricted) != acc(free)
    for data, expected in ((None, restricted), ({"texts": TEXTS, "labels": "all"}, free)):
        cfg = cls_config(bert, {"e1": gold1, "e2": gold2}, e1={"data": data} if data else {})
        ev = run_merge(
            parse_config(cfg), tmp_path / str(data is None), options=options, device="cpu"
        ).evaluation
        assert ev["tasks"]["e1"]["expert"] == pytest.approx(acc(expected), abs=1e-4)


def test_causal_generation_and_answer_words(gpt2, tmp_path, options):
    answers1 = greedy_answers(gpt2["e1"], TEXTS, 6)
    words = {"yes": "yes", "no": "no", "cat": ["cat", "dog"], "red": ["red", "blue"]}
    flat = {k: [v] if isinstance(v, str) else v for k, v in words.items()}
    gold = [match_answer(a, flat) or "yes" for a in answers1]
    cfg = {
        "merge_method": "linear",
        "models": [
            {
                "model": str(gpt2[n]),
                "name": f"task-{n}",
                "eval": {"texts": TEXTS, "labels": gold, "answers": words, "max_new_tokens": 6},
            }
            for n in ("e1", "e2")
        ],
    }
    result = run_merge(parse_config(cfg), tmp_path / "out", options=options, device="cpu")
    ev = result.evaluation
    merged = greedy_answers(tmp_path / "out", TEXTS, 6)
    pred = [match_answer(a, flat) for a in merged]
    t = ev["tasks"]["task-e1"]
    assert t["expert"] == pytest.approx(
        sum(g == match_answer(a, flat) for a, g in zip(answers1, gold, strict=True)) / 12, abs=1e-4
    )
    assert t["merged"] == pytest.approx(sum(p == g for p, g in zip(pred, gold, strict=True)) / 12, abs=1e-4)
    assert t["unparsed"] == pytest.approx(sum(p is None for p in pred) / 12, abs=1e-4)
    assert ev["kind"] == "causal"


def test_answer_matching_takes_the_earliest_whole_word():
    answers = {"0": ["yes"], "1": ["no"], "2": ["not sure", "unsure"]}
    assert match_answer("No, yes", answers) == "1"
    assert match_answer("the answer: YES.", answers) == "0"
    assert match_answer("nothing here", answers) is None  # 'no' is not a whole word of 'nothing'
    assert match_answer("I am not sure, no", answers) == "2"
    assert match_answer("unsure", answers) == "2"
    assert match_answer("", answers) is None


def test_label_free_task_scores_js_retention(bert, tmp_path, options):
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(bert["base"]),
        "models": [{"model": str(bert[n]), "eval": {"texts": TEXTS}} for n in ("e1", "e2")],
        "evaluation": {"base": True},
    }
    ev = run_merge(parse_config(cfg), tmp_path / "out", options=options, device="cpu").evaluation
    assert ev["metric"] == "js_retention"

    @torch.no_grad()
    def logp(folder):
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        return torch.cat([F.log_softmax(model(**tok(t, return_tensors="pt")).logits, -1) for t in TEXTS])

    from divmerge_core.learned.divergence import js

    expected = js(logp(bert["e1"]), logp(tmp_path / "out")).mean().item()
    t = ev["tasks"]["e1"]
    assert t["expert"] == 1.0 and t["js"] == pytest.approx(expected, rel=1e-3, abs=1e-6)
    assert t["merged"] == pytest.approx(1 - expected / math.log(2), abs=1e-4)
    assert t["retained"] < 100 and "base" in t


def test_compare_and_select_best_keeps_the_best_merge(bert, tmp_path, options):
    gold1 = cls_predictions(bert["e1"], TEXTS)
    gold2 = cls_predictions(bert["e2"], TEXTS)
    # the job's own merge is the base itself (lambda 0): every expert-informed merge beats it
    cfg = cls_config(
        bert,
        {"e1": gold1, "e2": gold2},
        parameters={"lambda": 0.0},
        evaluation={
            "compare": ["linear", {"method": "ties", "parameters": {"density": 0.5}}],
            "select": "best",
        },
    )
    ev = run_merge(parse_config(cfg), tmp_path / "out", options=options, device="cpu").evaluation
    labels = [c["label"] for c in ev["compare"]]
    assert labels == ["task_arithmetic", "linear", "ties"]
    best = max(ev["compare"], key=lambda c: c["anp"])
    assert ev["selected"] == best["label"] != "task_arithmetic" and ev["anp"] == best["anp"]
    # the output holds the selected method's weights: merge it alone and compare tensors
    alone = parse_config(
        {
            "merge_method": best["method"],
            "base_model": str(bert["base"]),
            "models": [{"model": str(bert[n])} for n in ("e1", "e2")],
            "parameters": best["parameters"],
        }
    )
    run_merge(alone, tmp_path / "alone", options=options, device="cpu")
    with Checkpoint(tmp_path / "out") as a, Checkpoint(tmp_path / "alone") as b:
        for name in a.names:
            assert torch.equal(a.get(name), b.get(name)), name
    assert not list(tmp_path.glob(".*compare*")), "compared merges' folders are removed"
    assert not (tmp_path / "out" / ".divmerge-compare").exists()
    assert "merge_method: " + best["method"] in (tmp_path / "out" / "merge_config.yaml").read_text()


def test_expert_scores_are_cached(bert, tmp_path, options):
    cfg = parse_config(cls_config(bert, {"e1": [0] * 12, "e2": [1] * 12}))
    first = run_merge(cfg, tmp_path / "a", options=options, device="cpu").evaluation
    second = run_merge(cfg, tmp_path / "b", options=options, device="cpu").evaluation
    assert first["expert_cache"] == {"hits": 0, "misses": 2}
    assert second["expert_cache"] == {"hits": 2, "misses": 0}
    assert first["tasks"] == second["tasks"]


def test_bad_eval_input_fails_before_merging(gpt2, bert, tmp_path, options):
    out = tmp_path / "out"
    missing = {
        "merge_method": "linear",
        "models": [
            {
                "model": str(gpt2["e1"]),
                "eval": {"texts": ["a b", "c d"], "labels": ["yes", "maybe"], "answers": {"yes": "yes"}},
            },
            {"model": str(gpt2["e2"])},
        ],
    }
    with pytest.raises(ConfigError, match="maybe") as err:
        run_merge(parse_config(missing), out, options=options, device="cpu")
    assert err.value.field == "models.0.eval.answers" and not out.exists()
    numeric = dict(
        missing,
        models=[
            {"model": str(gpt2["e1"]), "eval": {"texts": ["a b"], "labels": [0]}},
            {"model": str(gpt2["e2"])},
        ],
    )
    with pytest.raises(ConfigError, match="not words"):
        run_merge(parse_config(numeric), out, options=options, device="cpu")
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"sentence": "", "label": 1}\n')
    no_rows = {
        "merge_method": "linear",
        "models": [{"model": str(bert["e1"]), "eval": {"path": str(empty)}}, {"model": str(bert["e2"])}],
    }
    with pytest.raises(DatasetError, match="no example"):
        run_merge(parse_config(no_rows), out, options=options, device="cpu")
    unknown = dict(
        no_rows,
        models=[
            {"model": str(bert["e1"]), "eval": {"texts": ["a"], "labels": ["great"]}},
            {"model": str(bert["e2"])},
        ],
    )
    with pytest.raises(ConfigError, match="great") as err:
        run_merge(parse_config(unknown), out, options=options, device="cpu")
    assert err.value.field == "models.0.eval.labels" and not out.exists()
    with pytest.raises(ConfigError, match=r"models\.0\.eval\.num_samples"):
        parse_config(dict(no_rows, models=[{"model": "./x", "eval": {"texts": ["a"], "num_samples": 10**6}}]))
    with pytest.raises(ConfigError, match=r"models\.1\.name: .*two models are named 'e1'"):
        parse_config(
            {
                "merge_method": "linear",
                "models": [
                    {"model": "./a/e1", "eval": {"texts": ["a"]}},
                    {"model": "./b/e1", "eval": {"texts": ["b"]}},
                ],
            }
        )
    # the same expert twice (two tasks' data) is fine while only one of them is evaluated
    parse_config(
        {
            "merge_method": "linear",
            "models": [{"model": "./a/e1"}, {"model": "./b/e1", "eval": {"texts": ["b"]}}],
        }
    )
    with pytest.raises(ConfigError, match=r"evaluation: .*needs an 'eval'"):
        parse_config(
            {"merge_method": "linear", "models": [{"model": "./a"}, {"model": "./b"}], "evaluation": {}}
        )
    with pytest.raises(ConfigError, match=r"evaluation\.compare\.0"):
        parse_config(
            cls_config(
                bert,
                {"e1": [0] * 12, "e2": [0] * 12},
                evaluation={"compare": [{"method": "ties", "parameters": {"density": 7}}]},
            )
        )


def test_a_failed_evaluation_keeps_the_merge(gpt2, tmp_path, options):
    # the tiny GPT-2 tokenizer has no chat template: scoring fails after the merge is written
    cfg = {
        "merge_method": "linear",
        "models": [
            {"model": str(gpt2["e1"]), "eval": {"texts": ["a b"], "labels": ["yes"], "chat_template": True}},
            {"model": str(gpt2["e2"])},
        ],
    }
    result = run_merge(parse_config(cfg), tmp_path / "out", options=options, device="cpu")
    assert "chat template" in result.evaluation["error"]
    assert result.evaluation["field"] == "models.0.eval.chat_template"
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "out" / "evaluation.json").read_text())["error"]


def test_cli_merge_prints_the_table_and_eval_scores_a_folder(bert, tmp_path, options, capsys, monkeypatch):
    monkeypatch.setenv("DIVMERGE_TEACHER_CACHE_DIR", str(tmp_path / "cache"))
    cfg = write_config(tmp_path / "m.yaml", cls_config(bert, {"e1": [0] * 12, "e2": [2] * 12}))
    assert cli_main(["merge", str(cfg), "--out", str(tmp_path / "out"), "-q", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "merged 2 model(s) with task_arithmetic" in printed
    assert re.search(r"^e1\s+12\s+", printed, re.M) and "ANP" in printed
    merged = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    report = tmp_path / "again.json"
    code = cli_main(["eval", str(cfg), str(tmp_path / "out"), "--json", str(report), "-q", "--device", "cpu"])
    assert code == 0
    again = json.loads(report.read_text())
    assert {t: v["merged"] for t, v in again["tasks"].items()} == {
        t: v["merged"] for t, v in merged["tasks"].items()
    }
    assert again["expert_cache"]["hits"] == 2


def test_validate_reads_the_eval_sets_and_names_the_bad_field(gpt2, tmp_path, capsys):
    good = {
        "merge_method": "linear",
        "models": [
            {"model": str(gpt2["e1"]), "eval": {"texts": ["a b", "c d"], "labels": ["yes", "no"]}},
            {"model": str(gpt2["e2"])},
        ],
    }
    assert cli_main(["validate", str(write_config(tmp_path / "good.yaml", good))]) == 0
    assert "eval set of e1: 2 examples, labels checked" in capsys.readouterr().out
    bad = json.loads(json.dumps(good))
    bad["models"][0]["eval"]["answers"] = {"yes": "yes"}
    assert cli_main(["validate", str(write_config(tmp_path / "bad.yaml", bad))]) == 2
    err = capsys.readouterr().err
    assert "models.0.eval.answers:" in err and "'no'" in err


def test_a_learned_merge_is_evaluated_like_a_classic_one(gpt2, tmp_path, options):
    """divmerge with eval sets: the learned merge is scored, and a classic method compared beside it."""
    texts = ["cat dog up", "red blue left", "yes no yes", "x y z"]
    cfg = {
        "merge_method": "divmerge",
        "base_model": str(gpt2["base"]),
        "models": [
            {"model": str(gpt2[n]), "data": {"texts": texts}, "eval": {"texts": TEXTS[:6]}}
            for n in ("e1", "e2")
        ],
        "parameters": {"granularity": "task", "epochs": 1, "max_new_tokens": 3, "batch_size_per_task": 2},
        "evaluation": {"compare": ["task_arithmetic"]},
    }
    result = run_merge(parse_config(cfg), tmp_path / "out", options=options, device="cpu")
    ev = result.evaluation
    assert [c["label"] for c in ev["compare"]] == ["divmerge", "task_arithmetic"]
    assert ev["selected"] == "divmerge" and result.coefficients is not None
    assert all(0 < t["merged"] <= 1 for t in ev["tasks"].values())
    assert (tmp_path / "out" / "coefficients.json").is_file()
    assert "## Learned coefficients" in (tmp_path / "out" / "README.md").read_text()


def test_cancel_during_the_evaluation_stage_leaves_nothing(bert, tmp_path, options):
    from divmerge_core.errors import MergeCancelled

    seen: list[str] = []
    cfg = parse_config(cls_config(bert, {"e1": [0] * 12, "e2": [1] * 12}))
    with pytest.raises(MergeCancelled):
        run_merge(
            cfg,
            tmp_path / "out",
            options=options,
            device="cpu",
            progress=lambda ev: seen.append(ev.stage),
            should_stop=lambda: "evaluate" in seen,
        )
    assert "write" in seen and "evaluate" in seen
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
