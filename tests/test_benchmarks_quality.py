"""Benchmark code paths on tiny inputs: data, union-head slicing, ANP/CI math, harness and report."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch

from benchmarks.quality import data as qdata
from benchmarks.quality.causal import CausalRecipe, clip_words, prompt, score_correctness
from benchmarks.quality.evaluate import evaluate_folder
from benchmarks.quality.harness import merge_config, run_items
from benchmarks.quality.methods import LLM_ROWS, VARIANT_ROWS, Mode, method_specs, mode_rows, sample_combos
from benchmarks.quality.metrics import anp, bootstrap_anp_ci, mean_ci, t975
from benchmarks.quality.report import aggregate, write_report
from benchmarks.quality.run import CAUSAL_MODES, LLM_MODES, MODES
from divmerge_core.config import parse_config
from tests.tiny import make_bert_classifier, make_gpt2, make_tokenizer, perturbed, save

SINGLE = [("a good cat", 1), ("a bad dog", 0), ("red up", 1), ("blue down", 0), ("yes", 1), ("no", 0)]
PAIR = [
    ("a cat", "a dog", 0),
    ("red", "red", 1),
    ("up", "down", 2),
    ("left", "right", 0),
    ("yes", "no", 1),
    ("cat", "cat", 2),
]


def _write(folder: Path, header: list[str], rows: list[tuple]) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.write_text("\t".join(header) + "\n" + "".join("\t".join(map(str, r)) + "\n" for r in rows))


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    for split in ("train", "validation", "test"):
        _write(d / "sst2" / f"{split}.tsv", ["text", "label"], SINGLE)
    (d / "sst2" / "labels.json").write_text(json.dumps(["negative", "positive"]))
    for split in ("train", "validation"):  # no test: eval = a validation holdout
        _write(d / "mnli" / f"{split}.tsv", ["text_a", "text_b", "label"], PAIR)
    (d / "mnli" / "labels.json").write_text(json.dumps(["entailment", "neutral", "contradiction"]))
    return d


def test_load_tasks_and_splits(data_dir: Path) -> None:
    assert qdata.list_tasks(data_dir) == ["sst2", "mnli"]
    tasks = qdata.load_tasks(data_dir)
    sst2, mnli = tasks["sst2"], tasks["mnli"]
    assert not sst2.is_pair and mnli.is_pair
    assert sst2.eval_source == "test.tsv" and len(sst2.merge_pool) == 6
    assert mnli.eval[0].text_b is not None
    # holdout: disjoint halves covering the validation file
    assert len(mnli.eval) == 3 and len(mnli.merge_pool) == 3
    assert {(e.text_a, e.text_b) for e in mnli.eval}.isdisjoint(
        {(e.text_a, e.text_b) for e in mnli.merge_pool}
    )
    out = qdata.write_merge_inputs(mnli, data_dir.parent / "m" / "mnli.tsv")
    lines = out.read_text().splitlines()
    assert lines[0] == "text_a\ttext_b" and len(lines) == 4 and all(line.count("\t") == 1 for line in lines)


def test_bad_label_and_header(data_dir: Path) -> None:
    _write(data_dir / "sst2" / "train.tsv", ["text", "label"], [("x", 5)])
    with pytest.raises(ValueError, match="outside labels.json"):
        qdata.load_task(data_dir, "sst2")
    _write(data_dir / "sst2" / "train.tsv", ["sentence", "label"], [("x", 1)])
    with pytest.raises(ValueError, match="expected header"):
        qdata.load_task(data_dir, "sst2")


def test_union_head_slices(data_dir: Path) -> None:
    head = qdata.union_head(data_dir)
    assert (
        head.num_labels == 5 and head.slice_of("sst2") == slice(0, 2) and head.slice_of("mnli") == slice(2, 5)
    )
    assert head.label_names[2] == "mnli:entailment"


def test_correctness_with_tiny_bert(data_dir: Path, tmp_path: Path) -> None:
    """The benchmark scores through the engine's evaluator: argmax within the task's slice of the head."""
    head = qdata.union_head(data_dir)
    model = make_bert_classifier(num_labels=head.num_labels)
    tasks = qdata.load_tasks(data_dir)
    folder = save(model, tmp_path / "model")
    c = evaluate_folder(folder, {"mnli": tasks["mnli"].eval}, head)["mnli"]
    with torch.no_grad():
        enc = make_tokenizer("bert")(
            [e.text_a for e in tasks["mnli"].eval],
            [e.text_b for e in tasks["mnli"].eval],
            padding=True,
            return_tensors="pt",
        )
        pred = model(**enc).logits[:, 2:5].argmax(-1).tolist()
    assert c == [p == e.label for p, e in zip(pred, tasks["mnli"].eval, strict=True)]


def test_anp_and_ci_math() -> None:
    assert anp({"a": 0.8, "b": 0.45}, {"a": 0.8, "b": 0.9}) == pytest.approx(75.0)
    m, half = mean_ci([90.0, 92.0, 94.0])
    assert m == pytest.approx(92.0) and half == pytest.approx(4.303 * 2.0 / math.sqrt(3))
    assert mean_ci([80.0]) == (80.0, None)
    assert t975(1) == 12.706 and t975(35) == 2.042 and t975(500) == 1.96
    lo, hi = bootstrap_anp_ci([{"a": [1] * 10}], {"a": 1.0})
    assert lo == hi == 100.0  # no variance to resample
    lo, hi = bootstrap_anp_ci([{"a": [1, 0] * 50}], {"a": 0.5}, n_boot=400)
    assert lo < 100.0 < hi and hi - lo < 50


def test_sample_combos_prefix_stable() -> None:
    tasks = ("a", "b", "c", "d", "e")
    assert len(sample_combos(tasks, 2, None)) == 10
    assert sample_combos(tasks, 3, 4)[:2] == sample_combos(tasks, 3, 2)
    assert sample_combos(tasks, 5, 3) == [tasks]


def test_method_rows() -> None:
    rows = {s.name: s for s in method_specs({"lr": 0.1, "epochs": 1})}
    assert len(rows) == 16
    assert rows["divmerge_layer_js_es"].parameters["patience"] == 1
    assert rows["divmerge_layer_js_trim"].parameters == {
        "lr": 0.1, "epochs": 1, "granularity": "layer", "divergence": "js",
        "tau_sparsify": "magnitude", "tau_density": 0.2, "tau_consensus": "sign",
    }  # fmt: skip
    assert rows["divmerge_layer_js_dare"].parameters["tau_sparsify"] == "random"
    assert rows["divmerge_layer_js_dare"].parameters["tau_density"] == 0.5
    pull = rows["divmerge_tensor_js_pull"].parameters
    assert pull["granularity"] == "tensor" and pull["pull"] == 1.0
    assert rows["divmerge_layer_js_topk"].parameters["top_k"] == 32
    for name in VARIANT_ROWS:  # every variant row is a valid engine config
        model = {"model": "/e", "data": {"texts": ["x"]}}
        parse_config(
            {
                "merge_method": "divmerge",
                "base_model": "/b",
                "models": [model],
                "parameters": rows[name].parameters,
            }
        )
    assert rows["divmerge_layer_js"].parameters == {
        "lr": 0.1,
        "epochs": 1,
        "granularity": "layer",
        "divergence": "js",
    }
    assert not rows["averaging"].with_base and rows["ties"].with_base
    extra = {s.name: s for s in method_specs({"lr": 0.1}, own_labels=True)}.keys() - rows.keys()
    assert extra == {"adamerging_layer+labels", "divmerge_task_js+labels", "divmerge_layer_js+labels"}


def test_mode_rows_run_variants_only_where_named() -> None:
    specs = method_specs({"lr": 0.1})
    cls = {s.name for s in mode_rows("cls", MODES["quick"], specs)}
    assert "divmerge_layer_js_es" not in cls and "divmerge_layer_kl" in cls
    assert {s.name for s in mode_rows("llm", LLM_MODES["quick"], specs)} == set(LLM_ROWS)
    cpu = {s.name for s in mode_rows("llm", LLM_MODES["cpu"], specs)}
    assert cpu == set(LLM_ROWS) - {"multislerp", "adamerging_layer", "divmerge_layer_kl"}
    for modes in (MODES, CAUSAL_MODES, LLM_MODES):  # no other mode runs the new variants
        for name, mode in modes.items():
            if name != "variants":
                got = {s.name for s in mode_rows("cls", mode, specs)}
                assert not got & (set(VARIANT_ROWS) - {"divmerge_layer_js_es"}), name


def test_variants_modes_run_the_variants_beside_their_references() -> None:
    from benchmarks.quality.llm import LLM_RECIPES
    from benchmarks.quality.run import report_stem

    specs = method_specs({"lr": 0.1}, own_labels=True)
    refs = {"ties", "task_arithmetic", "divmerge_layer_js", "divmerge_layer_js_es"}
    new = {"divmerge_layer_js_trim", "divmerge_layer_js_dare", "divmerge_tensor_js_pull"}
    cls = {s.name for s in mode_rows("cls", MODES["variants"], specs)}
    assert cls == refs | new  # top-k only changes causal-LM teachers
    for kind, modes in (("causal", CAUSAL_MODES), ("llm", LLM_MODES)):
        assert {s.name for s in mode_rows(kind, modes["variants"], specs)} == refs | new | {
            "divmerge_layer_js_topk"
        }
    assert MODES["variants"].ks == CAUSAL_MODES["variants"].ks == LLM_MODES["variants"].ks == (2, 3)
    assert CAUSAL_MODES["variants"].tasks == CAUSAL_MODES["reduced"].tasks
    llm = LLM_MODES["variants"]
    assert llm.tasks == ("sst2", "snli", "qnli") and llm.combos_per_k == {2: 1, 3: 1}
    assert (llm.eval_n, llm.num_samples, llm.learned) == (100, 40, LLM_MODES["cpu"].learned)
    assert LLM_RECIPES["variants"] == LLM_RECIPES["cpu"]  # the cpu mode's experts, from the cache
    assert [report_stem(k, "variants") for k in ("cls", "causal", "llm")] == [
        "quality_variants", "quality_causal_variants", "quality_llm_variants"
    ]  # fmt: skip


class _TinyTrack:
    """A harness track over tiny BERT experts (noise 'fine-tunes' of one base)."""

    name = "tiny"

    def __init__(self, root: Path, data_dir: Path):
        self.head = qdata.union_head(data_dir)
        self.tasks = qdata.load_tasks(data_dir)
        base = make_bert_classifier(num_labels=self.head.num_labels)
        self.base = save(base, root / "base")
        self.experts = {
            t: save(perturbed(base, 0.02, seed=i + 1), root / t) for i, t in enumerate(self.tasks)
        }
        self.files = {
            t: qdata.write_merge_inputs(task, root / "in" / f"{t}.tsv") for t, task in self.tasks.items()
        }

    def data_spec(self, task: str, num_samples: int, own_labels: bool = False) -> dict:
        spec = {
            "path": str(self.files[task]),
            "text_columns": self.tasks[task].columns,
            "num_samples": num_samples,
        }
        if own_labels:  # the tiny models' labels are unnamed: pass the slice's ids
            sl = self.head.slice_of(task)
            spec["labels"] = list(range(sl.start, sl.stop))
        return spec

    def evaluate(self, folder: Path, tasks: list[str]) -> dict[str, list[bool]]:
        from benchmarks.quality.evaluate import evaluate_folder

        return evaluate_folder(folder, {t: self.tasks[t].eval for t in tasks}, self.head)

    def fingerprint(self) -> str:
        return "tiny"


def test_harness_and_report(tmp_path: Path, data_dir: Path) -> None:
    track = _TinyTrack(tmp_path / "models", data_dir)
    mode = Mode(
        "test",
        ("sst2", "mnli"),
        (2,),
        {2: None},
        eval_n=6,
        num_samples=3,
        learned={"lr": 0.05, "epochs": 1, "batch_size_per_task": 2, "max_length": 32},
    )
    names = ("averaging", "ties", "divmerge_layer_js", "divmerge_layer_js+labels")
    specs = [s for s in method_specs(mode.learned, own_labels=True) if s.name in names]
    cfg = merge_config(track, specs[2], ("sst2", "mnli"), mode)
    assert cfg["base_model"] == str(track.base) and cfg["models"][1]["data"]["text_columns"] == [
        "text_a",
        "text_b",
    ]
    assert "data" not in merge_config(track, specs[0], ("sst2", "mnli"), mode)["models"][0]
    assert "labels" not in cfg["models"][1]["data"]
    sl = track.head.slice_of("mnli")
    labelled = merge_config(track, specs[3], ("sst2", "mnli"), mode)["models"][1]["data"]
    assert labelled["labels"] == list(range(sl.start, sl.stop))
    cache = tmp_path / "cache"
    records = run_items(track, mode, specs, cache, log=lambda m: None)
    assert [r["status"] for r in records] == ["ok"] * 4, records
    assert records[2]["coefficients"]["granularity"] == "layer"
    # cached: a rerun runs nothing new
    again = run_items(track, mode, specs, cache, log=lambda m: (_ for _ in ()).throw(AssertionError(m)))
    assert [r["anp"] for r in again] == [r["anp"] for r in records]
    experts = {t: 1.0 for t in mode.tasks}
    table = aggregate(records, experts, [s.name for s in specs], [2])
    assert table["ties"][2]["n"] == 1 and table["ties"][2]["ci_t"] is None
    files = write_report(
        tmp_path / "res",
        "q",
        "T",
        {
            "ks": [2],
            "table": table,
            "records": records,
            "experts": {
                "sst2": {"acc": 1.0, "n": 6, "majority": 0.5},
                "mnli": {"acc": 0.4, "n": 3, "majority": 0.4},
            },
        },
        "setup",
        ["a note"],
    )
    md = files[0].read_text()
    assert "| divmerge_layer_js |" in md and "†" in md and "a note" in md
    assert "divmerge_layer_js (sst2+mnli): sst2 " in md and "loss " in md
    # each item records the merge's peak RSS; the learned ones their convergence (steps run of planned)
    assert all(r["merge_peak_rss_mb"] >= r["rss_before_mb"] > 0 for r in records)
    assert "peak RSS in GiB" in md and "## Convergence of the learned merges" in md
    planned = records[2]["coefficients"]["planned_steps"]
    assert f"| divmerge_layer_js | 2 | 1 | {records[2]['coefficients']['steps']} / {planned} |" in md
    assert files[2].stat().st_size > 1000 and json.loads(files[1].read_text())["ks"] == [2]
    # mnli's expert is not above its majority baseline: a second table scores sst2 only
    assert "informative tasks only (sst2)" in md and "(not above baseline)" in md
    only = json.loads(files[1].read_text())["table_informative"]["table"]["ties"]["2"]
    sst2_only = [r for r in records if r["method"] == "ties"][0]["acc"]["sst2"]
    assert only["anp"] == pytest.approx(100.0 * sst2_only / 1.0)


def test_peak_rss_sees_a_transient_allocation() -> None:
    from benchmarks.quality.harness import PeakRss

    with PeakRss(every_s=0.01) as rss:
        x = torch.ones(64 * 2**20 // 4 * 4)  # 256 MiB, touched
        time.sleep(0.2)
        del x
    assert rss.peak_mb - rss.before_mb > 200, (rss.before_mb, rss.peak_mb)


def test_causal_prompt_and_scoring(data_dir: Path) -> None:
    assert clip_words("Hello, World! a b", 3) == "hello , world"
    task = qdata.load_task(data_dir, "mnli")
    assert prompt("mnli", task.eval[0], 5).endswith("answer :") and " | " in prompt("mnli", task.eval[0], 5)
    tok = make_tokenizer("gpt2")
    c = score_correctness(make_gpt2(), tok, task, task.eval, CausalRecipe(), batch_size=4)
    assert len(c) == len(task.eval) and all(isinstance(x, bool) for x in c)


def test_harness_shards_share_the_cache(tmp_path: Path, data_dir: Path) -> None:
    track = _TinyTrack(tmp_path / "models", data_dir)
    mode = Mode("test", ("sst2", "mnli"), (2,), {2: None}, eval_n=4, num_samples=2, learned={})
    names = ("averaging", "task_arithmetic", "ties")
    specs = [s for s in method_specs({}) if s.name in names]
    cache = tmp_path / "cache"
    # items in order: one pair x 3 methods; shard 0/2 takes items 0 and 2
    first = run_items(track, mode, specs, cache, shard=(0, 2), log=lambda m: None)
    assert [r["method"] for r in first] == ["averaging", "ties"]
    assert run_items(track, mode, specs, cache, run_new=False, log=lambda m: None) == first
    second = run_items(track, mode, specs, cache, shard=(1, 2), log=lambda m: None)
    assert [r["method"] for r in second] == list(names)


def test_ablation_overrides_rename_the_mode() -> None:
    import argparse

    from benchmarks.quality.run import MODES, _with_overrides, report_stem

    full = MODES["full"]
    plain = argparse.Namespace(ks=None, num_samples=None, epochs=None, lr=None)
    assert _with_overrides(full, plain) is full
    args = argparse.Namespace(ks=[7], num_samples=200, epochs=4, lr=None)
    mode = _with_overrides(full, args)
    assert mode.name == "full-custom" and mode.ks == (7,) and mode.num_samples == 200
    assert mode.learned == {**full.learned, "epochs": 4} and mode.combos(7) == full.combos(7)
    # an ablation never overwrites the full run's committed report
    assert report_stem("cls", mode.name) == "quality_full_custom"
    assert report_stem("cls", "full") == "quality" and report_stem("causal", "full") == "quality_causal"
    assert report_stem("causal", "quick") == "quality_causal_quick"
    assert report_stem("causal", mode.name, "abl") == "abl_causal"


def test_own_label_mass_sums_to_one_over_the_slices(tmp_path: Path, data_dir: Path) -> None:
    from benchmarks.quality.label_mass import own_label_mass

    head = qdata.union_head(data_dir)
    folder = save(make_bert_classifier(num_labels=head.num_labels), tmp_path / "m")
    examples = qdata.load_task(data_dir, "sst2").eval[:4]
    masses = [own_label_mass(folder, examples, head.slice_of(t)) for t in head.tasks]
    assert all(0 < m < 1 for m in masses) and sum(masses) == pytest.approx(1.0, abs=1e-5)
