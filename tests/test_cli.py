"""The ``divmerge`` CLI: exit codes, one-line errors, nothing half-written, plugin subcommands."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from divmerge_core import cli

from .merge_models import bert_family, config_dict, write_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    return bert_family(tmp_path_factory.mktemp("bert"), n=2)


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("divmerge: error: ")
    assert "Traceback" not in err
    return lines[0]


def test_merge_and_validate(fam, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", config_dict("dare_ties", fam["base"], [fam["t1"], fam["t2"]]))
    code, out, _ = _run(capsys, "validate", str(config))
    assert code == 0 and "ok: dare_ties merge of 2 model(s), BertForSequenceClassification" in out
    code, out, _ = _run(capsys, "merge", str(config), "--out", str(tmp_path / "out"), "--device", "cpu")
    assert code == 0 and "merged" in out
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_merge_counts_the_task_models_only(fam, tmp_path, capsys):
    """The "merged N model(s)" line counts the task models, neither the base model nor the datasets
    (issue 16: a 3-expert task arithmetic said 4, a 3-expert DivMerge 7)."""
    config = write_config(
        tmp_path / "ta.yaml", config_dict("task_arithmetic", fam["base"], [fam["t1"], fam["t2"]])
    )
    code, out, _ = _run(capsys, "merge", str(config), "--out", str(tmp_path / "ta"), "--device", "cpu")
    assert code == 0 and "merged 2 model(s) with task_arithmetic" in out
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": f"a b {i}"}) + "\n" for i in range(4)))
    cfg = config_dict("divmerge", fam["base"], [fam["t1"], fam["t2"]], epochs=1, granularity="task")
    for m in cfg["models"]:
        m["data"] = {"path": str(rows)}
    config = write_config(tmp_path / "dm.yaml", cfg)
    code, out, _ = _run(capsys, "merge", str(config), "--out", str(tmp_path / "dm"), "--device", "cpu")
    assert code == 0 and "merged 2 model(s) with divmerge" in out


def _bad_inputs(fam, tmp: Path) -> dict[str, tuple[dict | str, str]]:
    """name -> (config, text the error must contain)."""
    gpt = tmp / "gpt2"
    if not gpt.exists():
        from .tiny import make_gpt2, save

        save(make_gpt2(), gpt)
    pickled = tmp / "pickled"
    if not pickled.exists():
        import torch
        from safetensors.torch import load_file

        shutil.copytree(fam["t1"], pickled)
        torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
        (pickled / "model.safetensors").unlink()
    quant = tmp / "quant"
    if not quant.exists():
        shutil.copytree(fam["t1"], quant)
        config = json.loads((quant / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "gptq"}
        (quant / "config.json").write_text(json.dumps(config))
    nan = config_dict("ties", fam["base"], [fam["t1"]])
    nan["models"][0]["parameters"] = {"weight": float("nan")}
    learned = config_dict("divmerge", fam["base"], [fam["t1"]])
    learned["models"][0]["data"] = {"texts": ["good cat"], "num_samples": 0}
    return {
        "architecture": (config_dict("ties", fam["base"], [gpt]), "architecture ['GPT2LMHeadModel']"),
        "pickle": (config_dict("ties", fam["base"], [pickled]), "pickle"),
        "quantized": (config_dict("ties", fam["base"], [quant]), "quantized (gptq)"),
        "missing_path": (config_dict("ties", fam["base"], [tmp / "nowhere"]), "does not exist"),
        "nan_weight": (nan, "models.0.parameters.weight"),
        "num_samples": (learned, "models.0.data.num_samples"),
        "not_yaml": ("models: [\n", "not valid YAML"),
    }


@pytest.mark.parametrize(
    "case", ["architecture", "pickle", "quantized", "missing_path", "nan_weight", "num_samples", "not_yaml"]
)
def test_bad_inputs_fail_with_one_line(fam, tmp_path_factory, tmp_path, capsys, case):
    shared = tmp_path_factory.getbasetemp() / "cli-bad-models"
    shared.mkdir(exist_ok=True)
    cfg, expected = _bad_inputs(fam, shared)[case]
    path = tmp_path / "c.yaml"
    if isinstance(cfg, str):
        path.write_text(cfg)
    else:
        write_config(path, cfg)
    out = tmp_path / "out"
    capsys.readouterr()  # drop the model-saving chatter
    code, _, err = _run(capsys, "merge", str(path), "--out", str(out))
    assert code == 2
    assert expected in _error_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]  # no output, no temp dir


def test_mergekit_no_op_knob_warns_and_unknown_parameter_fails(fam, tmp_path, capsys):
    cfg = config_dict("ties", fam["base"], [fam["t1"], fam["t2"]], int8_mask=True, density=0.5)
    code, out, err = _run(capsys, "validate", str(write_config(tmp_path / "a.yaml", cfg)))
    assert code == 0 and "ok: ties merge" in out
    assert "divmerge: warning: parameters.int8_mask: accepted for mergekit compatibility and ignored" in err
    cfg = config_dict("ties", fam["base"], [fam["t1"], fam["t2"]], epochs=3)
    code, _, err = _run(capsys, "validate", str(write_config(tmp_path / "b.yaml", cfg)))
    assert code == 2
    assert "parameters.epochs: merge_method 'ties' has no parameter 'epochs' (it takes: weight, density" in (
        _error_line(err)
    )


def test_nan_yaml_literal(fam, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(
        f"merge_method: ties\nbase_model: {fam['base']}\nmodels:\n"
        f"  - model: {fam['t1']}\n    parameters:\n      weight: .nan\n"
    )
    code, _, err = _run(capsys, "validate", str(path))
    assert code == 2 and "weight" in _error_line(err) and "finite" in err


def test_existing_output_refused(fam, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", config_dict("linear", None, [fam["t1"], fam["t2"]]))
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("keep")
    code, _, err = _run(capsys, "merge", str(config), "--out", str(out))
    assert code == 2 and "--force" in _error_line(err)
    assert (out / "x").read_text() == "keep"


def test_plugins_register_subcommands(monkeypatch, capsys):
    def register(subparsers):
        p = subparsers.add_parser("hello")
        p.set_defaults(func=lambda args: print("hi") or 0)

    def broken():
        raise ImportError("no such module")

    def service_extra_missing():  # `pip install divmerge` without [service]: serve/token are not offered
        raise ModuleNotFoundError("No module named 'fastapi'", name="fastapi")

    eps = [
        SimpleNamespace(name="good", load=lambda: SimpleNamespace(register=register)),
        SimpleNamespace(name="bad", load=broken),
        SimpleNamespace(name="serve", load=service_extra_missing),
    ]
    monkeypatch.setattr(cli, "entry_points", lambda group: eps if group == cli.PLUGIN_GROUP else [])
    code, out, err = _run(capsys, "hello")
    assert code == 0 and out.strip() == "hi"
    assert "plugin 'bad' failed to load" in err
    assert "serve" not in err


def _subprocess(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "divmerge_core.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_subprocess_merge_and_error(fam, tmp_path):
    good = write_config(tmp_path / "good.yaml", config_dict("task_arithmetic", fam["base"], [fam["t1"]]))
    proc = _subprocess("merge", str(good), "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "README.md").is_file()
    bad = write_config(tmp_path / "bad.yaml", config_dict("ties", fam["base"], [tmp_path / "gone"]))
    proc = _subprocess("merge", str(bad), "--out", str(tmp_path / "out2"))
    assert proc.returncode == 2
    assert "does not exist" in _error_line(proc.stderr)
    assert not (tmp_path / "out2").exists()


def test_validate_reads_the_data_and_names_a_wrong_column(fam, tmp_path, capsys):
    """`divmerge validate` reads a few rows of each dataset: a wrong column fails here, not in the merge."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(5)))
    cfg = config_dict("divmerge", fam["base"], [fam["t1"], fam["t2"]])
    cfg["models"][0]["data"] = {"path": str(rows), "text_columns": ["sentence"]}
    cfg["models"][1]["data"] = {"path": str(rows)}
    code, out, err = _run(capsys, "validate", str(write_config(tmp_path / "c.yaml", cfg)))
    assert code == 2 and not out
    assert "models.0.data" in err and "'sentence'" in err and "invalid_dataset" in err
    cfg["models"][0]["data"]["text_columns"] = ["text"]
    code, out, _ = _run(capsys, "validate", str(write_config(tmp_path / "c.yaml", cfg)))
    assert code == 0 and "2 dataset(s) read, columns found" in out and "estimate:" in out
