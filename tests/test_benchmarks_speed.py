"""The speed benchmark's code paths on tiny inputs (checkpoints, configs, measurement parsing); no timings."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from benchmarks.speed import configs, learned_ours, measure, report
from benchmarks.speed.checkpoints import SIZES, make_family
from benchmarks.speed.classic import mergekit_command, ours_command
from benchmarks.speed.compare import compare_checkpoints
from benchmarks.speed.run import plan_for, verdict

TIME_V = """\tCommand being timed: "python x.py"
\tUser time (seconds): 12.34
\tSystem time (seconds): 0.56
\tPercent of CPU this job got: 95%
\tElapsed (wall clock) time (h:mm:ss or m:ss): 1:02.50
\tMaximum resident set size (kbytes): 2097152
\tExit status: 0
"""


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> tuple[Path, list[Path]]:
    return make_family("tiny", 2, root=tmp_path_factory.mktemp("ckpt"))


def test_shapes_match_transformers():
    from transformers import BertConfig, BertForSequenceClassification

    size = SIZES["tiny"]
    model = BertForSequenceClassification(BertConfig(**size.bert_config()))
    sd = model.state_dict()
    assert list(sd) == list(size.shapes())
    assert all(tuple(sd[n].shape) == s for n, s in size.shapes().items())
    assert size.n_params == sum(p.numel() for p in model.parameters())
    assert 95e6 < SIZES["100M"].n_params < 120e6


def test_gpt2_shapes_match_transformers():
    from dataclasses import replace

    from transformers import GPT2Config, GPT2LMHeadModel

    size = replace(SIZES["gpt2-124M"], hidden=32, layers=2, heads=2, vocab=512, max_positions=64)
    model = GPT2LMHeadModel(GPT2Config(**size.config()))
    sd = {n: t for n, t in model.state_dict().items() if n != "lm_head.weight"}  # tied: not saved
    assert list(sd) == list(size.shapes())
    assert all(tuple(sd[n].shape) == s for n, s in size.shapes().items())
    assert size.n_params == sum(p.numel() for p in model.parameters())
    assert 123e6 < SIZES["gpt2-124M"].n_params < 125e6


def test_family_is_base_plus_noise_and_reused(family, tmp_path):
    base, experts = family
    assert [e.name for e in experts] == ["expert0", "expert1"]
    for d in (base, *experts):
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in d.iterdir()}
    b, e0, e1 = (load_file(str(d / "model.safetensors")) for d in (base, *experts))
    w = "bert.encoder.layer.0.attention.self.query.weight"
    assert 0 < (e0[w] - b[w]).abs().max() < 0.05
    assert not torch.equal(e0[w], e1[w])
    mtime = (experts[0] / "model.safetensors").stat().st_mtime
    base2, experts3 = make_family("tiny", 3, root=base.parent.parent)  # a prefix is reused, not rewritten
    assert base2 == base and experts3[:2] == experts
    assert (experts[0] / "model.safetensors").stat().st_mtime == mtime


def test_tokenizer_gives_exact_sequence_length(family):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base, _ = family
    tok = AutoTokenizer.from_pretrained(base)
    texts = configs.random_texts(3, 10, SIZES["tiny"].vocab, seed=1)
    enc = tok(texts, padding=True, return_tensors="pt")
    assert enc["input_ids"].shape == (3, 12)
    assert (enc["input_ids"] != tok.unk_token_id).all()
    model = AutoModelForSequenceClassification.from_pretrained(base)
    assert model(**enc).logits.shape == (3, 2)


@pytest.mark.parametrize("method", list(configs.METHOD_SPECS))
def test_classic_config_is_valid_for_our_schema(family, tmp_path, method):
    from divmerge_core.config import load_config
    from divmerge_core.methods.registry import METHODS

    base, experts = family
    spec = configs.METHOD_SPECS[method]
    cfg = configs.classic_config(method, base, experts)
    assert ("base_model" in cfg) == spec.base
    assert all(("density" in m.get("parameters", {})) == ("density" in spec.per_model) for m in cfg["models"])
    parsed = load_config(configs.write_yaml(cfg, tmp_path / "c.yaml"))
    assert parsed.merge_method == method
    assert len(cfg["models"]) == (spec.n_models or len(experts))
    assert METHODS[method].name == method


def test_every_classic_method_has_a_benchmark_spec():
    from divmerge_core.methods.registry import METHODS

    learned = {"divmerge", "adamerging"}
    assert set(configs.METHOD_SPECS) == set(METHODS) - learned


def test_floor_reads_every_input_and_writes_the_first(family, tmp_path):
    import subprocess

    base, experts = family
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.speed.floor", "--inputs", str(base), *map(str, experts),
         "--out", str(tmp_path / "f")],
        capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    data = json.loads(out.stdout.strip().splitlines()[-1])
    sizes = sum((d / "model.safetensors").stat().st_size for d in (base, *experts))
    assert data["inputs"] == 3 and 0.9 * sizes < data["read_bytes"] <= sizes
    assert compare_checkpoints(tmp_path / "f", base)["max_abs_diff"] == 0
    rows = [{"size": "tiny", "k": 2, "rc": 0, "wall_s": 2.0, "user_s": 1.0, "sys_s": 0.1,
             "max_rss_mb": 100.0, "floor": data}]  # fmt: skip
    assert report.floor_summary(rows)["wall_s"] == 2.0
    assert "| tiny | 3 |" in "\n".join(report.floor_table(rows))


def test_divmerge_config_is_valid(family):
    from divmerge_core.config import parse_config

    base, experts = family
    cfg = parse_config(
        configs.divmerge_config(base, experts, texts_per_task=4, seq_len=8, vocab_size=64, batch_size=2)
    )
    assert cfg.merge_method == "divmerge" and cfg.parameters.batch_size_per_task == 2
    assert all(len(m.data.texts) == 4 and len(m.data.texts[0].split()) == 6 for m in cfg.models)


def test_task_arithmetic_config_through_engine_matches_formula(family, tmp_path):
    from divmerge_core.config import parse_config
    from divmerge_core.pipeline import run_merge

    base, experts = family
    run_merge(
        parse_config(configs.classic_config("task_arithmetic", base, experts)), tmp_path / "o", device="cpu"
    )
    b = load_file(str(base / "model.safetensors"))
    es = [load_file(str(e / "model.safetensors")) for e in experts]
    ref = tmp_path / "ref"
    ref.mkdir()
    save_file({n: b[n] + sum(0.5 * (e[n] - b[n]) for e in es) for n in b}, str(ref / "model.safetensors"))
    cmp = compare_checkpoints(tmp_path / "o", ref)
    assert cmp["tensors_compared"] == len(b) and not cmp["only_in_first"] and not cmp["only_in_second"]
    assert cmp["max_abs_diff"] < 1e-6


def test_compare_reports_worst_tensor(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    save_file(
        {"x": torch.zeros(3), "y": torch.ones(2), "only_a": torch.zeros(1)}, str(a / "model.safetensors")
    )
    save_file({"x": torch.tensor([0.0, 0.25, 0.0]), "y": torch.ones(2)}, str(b / "model.safetensors"))
    cmp = compare_checkpoints(a, b)
    assert cmp["max_abs_diff"] == pytest.approx(0.25) and cmp["worst_tensor"] == "x"
    assert cmp["only_in_first"] == ["only_a"] and cmp["tensors_compared"] == 2


def test_parse_time_v_and_proc_status():
    parsed = measure.parse_time_v(TIME_V)
    assert parsed == {"max_rss_mb": 2048.0, "wall_s": 62.5, "user_s": 12.34, "sys_s": 0.56}
    assert measure.parse_elapsed("1:00:01.5") == 3601.5
    assert measure.parse_time_v("garbage") == {}
    status = "Name:\tpython\nVmHWM:\t  900 kB\nVmRSS:\t  800 kB\nRssAnon:\t  300 kB\nRssFile:\t 500 kB\n"
    assert measure.parse_proc_status(status) == (800, 300)
    assert measure.median([3.0, 1.0, 2.0]) == 2.0 and measure.median([1.0, 4.0]) == 2.5


def test_run_measured_reports_memory_and_exit_code():
    code = "import sys; b = bytearray(64 * 2**20); sys.stdout.write('ok'); sys.exit(3)"
    m = measure.run_measured([sys.executable, "-c", code], interval=0.01)
    assert m.rc == 3 and m.stdout == "ok" and m.wall_s > 0
    if m.max_rss_mb is not None:  # /usr/bin/time present
        assert m.max_rss_mb > 60
    record = json.loads(json.dumps(m.to_json()))  # what the results file stores: the same numbers
    assert record["rc"] == 3 and record["wall_s"] == m.wall_s and record["max_rss_mb"] == m.max_rss_mb
    assert "stdout" not in record


def test_commands(tmp_path):
    ours = ours_command(tmp_path / "c.yaml", tmp_path / "o")
    assert (
        ours[-5:] == ["merge", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "o"), "--device", "cpu"][-5:]
    )
    assert "--device" in ours and ours[-1] == "cpu"
    mk = mergekit_command(tmp_path / "c.yaml", tmp_path / "o")
    assert mk[0].endswith("mergekit-yaml") and "--no-cuda" in mk


def test_learned_ours_script_runs_on_tiny(family, capsys):
    base, experts = family
    argv = ["--base", str(base), "--experts", *map(str, experts), "--vocab", str(SIZES["tiny"].vocab)]
    assert learned_ours.main([*argv, "--batch", "2", "--seq-len", "8", "--steps", "2"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["steps"] == 2 and len(out["step_times_s"]) == 2 and len(out["step_cpu_s"]) == 2
    assert out["opt_hwm_mb"] > 0 and out["coefficient_groups"] >= 3


def _row(tool: str, wall: float, rss: float, **extra) -> dict:
    runs = [
        {
            "rc": 0,
            "wall_s": wall,
            "user_s": wall,
            "sys_s": 0.0,
            "max_rss_mb": rss,
            "tree_rss_mb": rss,
            "tree_anon_mb": rss / 2,
        }
    ]
    return {
        "size": "tiny",
        "k": 2,
        "method": "task_arithmetic",
        "tool": tool,
        "summary": report.summarise_runs(runs),
        "runs": runs,
        **extra,
    }


def test_report_and_verdict_render():
    ours = _row("divmerge", 1.0, 100.0, wall_ratio=0.5, cpu_ratio=0.5, rss_ratio=0.5, anon_ratio=0.5)
    learned = [
        {"ok": True, "tool": "divmerge", "size": "tiny", "k": 2, "granularity": "layer", "coefficients": 4,
         "batch_per_task": 2, "seq_len": 8, "step_s": 1.0, "step_cpu_s_median": 1.0, "steps": 2, "peak_rss_mb": 50.0},
        {"ok": True, "tool": "fusionbench", "size": "tiny", "k": 2, "granularity": "per tensor", "coefficients": 9,
         "batch_per_task": 2, "seq_len": 8, "step_s": 2.0, "step_cpu_s_median": 2.0, "steps": 2, "peak_rss_mb": 40.0},
        {"ok": False, "tool": "fusionbench", "size": "tiny", "k": 8, "error": "boom"},
    ]  # fmt: skip
    data = {"meta": {"date": "now"}, "headline": [ours, _row("mergekit", 2.0, 200.0)], "learned": learned,
            "scaling": [ours], "correctness": [{"method": "linear", "size": "tiny", "k": 2, "tensors_compared": 3,
            "max_abs_diff": 0.0, "max_rel_diff": 0.0, "worst_tensor": "x", "only_in_first": [], "only_in_second": []}]}  # fmt: skip
    data["verdict"] = verdict(data)
    assert any("met" in v for v in data["verdict"]) and any("MISSED" in v for v in data["verdict"])
    md = report.render_markdown(data)
    assert "| tiny | 2 | task_arithmetic | divmerge | 1.00 |" in md and "failed: boom" in md
    assert report.summarise_runs([{"rc": 1, "stderr_tail": "bad"}]) == {"ok": False, "n": 0, "error": "bad"}


def test_methods_table_puts_each_method_beside_mergekit_and_the_floor():
    ties = _row("divmerge", 3.0, 100.0, wall_ratio=0.15, cpu_ratio=0.2, rss_ratio=0.3, anon_ratio=0.3)
    ties.update(
        method="ties", k_used=2, vs_mergekit={"max_abs_diff": 0.0, "only_in_first": [], "only_in_second": []}
    )
    dare = dict(_row("divmerge", 9.0, 100.0), method="dare_ties", k_used=2, vs_mergekit={"note": "random"})
    floor_rows = [{"size": "tiny", "k": 2, "rc": 0, "wall_s": 2.0, "user_s": 1.0, "sys_s": 0.0, "max_rss_mb": 50.0,
                   "floor": {"import_s": 1.0, "read_s": 0.5, "write_s": 0.2, "read_bytes": 10**9}}]  # fmt: skip
    data = {"meta": {"date": "now", "engine_commit": "abc"}, "floor": floor_rows,
            "methods": [ties, dict(_row("mergekit", 20.0, 300.0), method="ties"), dare],
            "section_runs": {"methods": {"engine_commit": "abc"}, "floor": {"engine_commit": "old", "date": "d"}}}  # fmt: skip
    md = report.render_markdown(data)
    assert "| ties | 2 | 3.00 | 20.00 | 0.15 |" in md and "| 1.50 | 0 |" in md  # 3 s over the 2 s floor
    assert "| dare_ties | 2 | 9.00 | — |" in md and "random masks: not compared" in md
    assert "_From an earlier run: engine old, d._" in md  # the floor section came from another engine
    lines = verdict(data)
    assert any("ties (methods table): wall ours/mergekit 0.15 (target <= 0.1: MISSED)" in v for v in lines)
    assert any("1 of 2 methods; over it: dare_ties 4.5x" in v for v in lines)


def test_quick_plan_is_small():
    plan = plan_for(quick=True)
    assert plan["headline"]["size"] == "25M" and plan["headline"]["reps"] == 1
    assert max(plan["scaling"]["ks"]) <= 4


def test_engine_snapshot_is_a_frozen_importable_copy(tmp_path):
    import subprocess

    from benchmarks.speed.classic import ROOT, engine_env, engine_snapshot

    snap, sha = engine_snapshot("HEAD", root=tmp_path)
    assert len(sha) == 40 and (snap / "divmerge_core" / "__init__.py").is_file()
    env = engine_env(snap)
    assert env["PYTHONPATH"].split(":")[0] == str(snap) and env["PYTHONSAFEPATH"] == "1"
    code = "import divmerge_core, benchmarks; print(divmerge_core.__file__)"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip().startswith(str(snap))
    assert "PYTHONSAFEPATH" not in engine_env(None)


def test_classic_merge_does_not_import_transformers(family, tmp_path):
    """Importing transformers costs ~1.5-2 s CPU per classic merge; validation must not need it when
    neither config.json states tie_word_embeddings (found by this benchmark's profile)."""
    import subprocess

    base, experts = family
    cfg = configs.write_yaml(configs.classic_config("task_arithmetic", base, experts), tmp_path / "c.yaml")
    code = (
        "import sys; from divmerge_core.config import load_config; from divmerge_core.pipeline import run_merge; "
        f"run_merge(load_config({str(cfg)!r}), {str(tmp_path / 'o')!r}, device='cpu'); "
        "print('transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"
