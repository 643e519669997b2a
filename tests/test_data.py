from __future__ import annotations

import json
from pathlib import Path

import pytest

from divmerge_core.config import DataSpec
from divmerge_core.errors import DatasetError, PathNotAllowedError
from divmerge_core.learned import data as data_mod
from divmerge_core.learned.data import load_task_inputs
from divmerge_core.options import EngineOptions

OPTS = EngineOptions()


def load(**kw):
    seed = kw.pop("seed_", 0)
    return load_task_inputs(DataSpec(**kw), OPTS, seed)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_inline_texts_sampled_without_replacement():
    texts = [f"t{i}" for i in range(50)]
    a = load(texts=texts, num_samples=10)
    assert len(a) == 10 and len(set(a.texts)) == 10 and set(a.texts) <= set(texts)
    assert a.source == "inline" and a.commit is None
    assert load(texts=texts, num_samples=10).texts == a.texts  # seeded
    assert load(texts=texts, num_samples=10, seed_=1).texts != a.texts
    assert load(texts=texts, num_samples=10, seed=3).texts != a.texts
    assert sorted(load(texts=texts[:5], num_samples=10).texts) == sorted(texts[:5])  # all rows if fewer


def test_jsonl_autodetect_text_and_pairs(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [{"text": "hello", "label": 1}, {"text": "", "label": 0}])
    got = load(path=str(p))
    assert got.texts == ["hello"] and got.source == str(p)  # empty text rows are skipped, labels unread
    p = write_jsonl(tmp_path / "b.jsonl", [{"premise": "p", "hypothesis": "h", "label": 2}])
    got = load(path=str(p))
    assert got.texts == [("p", "h")] and got.is_pair


def test_tsv_without_quoting(tmp_path):
    p = tmp_path / "d.tsv"
    p.write_text('sentence1\tsentence2\tlabel\n"a b\tc" d\t1\n', encoding="utf-8")
    assert load(path=str(p)).texts == [('"a b', 'c" d')]


def test_csv_text_columns_and_template(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('q,ctx,label\n"what, now",here,1\nwhy,there,0\n', encoding="utf-8")
    got = load(path=str(p), text_columns=["q"], num_samples=5)
    assert sorted(got.texts) == ["what, now", "why"]
    got = load(path=str(p), text_columns=["q", "ctx"], num_samples=1, seed=1)
    assert len(got) == 1 and isinstance(got.texts[0], tuple)
    got = load(path=str(p), template="Q: {q} C: {ctx}")
    assert sorted(got.texts) == ["Q: what, now C: here", "Q: why C: there"]
    with pytest.raises(DatasetError, match="nope"):
        load(path=str(p), template="{nope}")
    with pytest.raises(DatasetError, match="available columns"):
        load(path=str(p))  # no known text column
    with pytest.raises(DatasetError, match="has no column 'zz'"):
        load(path=str(p), text_columns=["zz"])


def test_txt_and_json_and_parquet(tmp_path):
    p = tmp_path / "d.txt"
    p.write_text("one\n\ntwo\n", encoding="utf-8")
    assert sorted(load(path=str(p)).texts) == ["one", "two"]
    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"sentence": "s1"}, {"sentence": "s2"}]), encoding="utf-8")
    assert sorted(load(path=str(p)).texts) == ["s1", "s2"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"question": ["q?"], "sentence": ["s."]}), p)
    assert load(path=str(p)).texts == [("q?", "s.")]


def test_empty_and_bad_files(tmp_path):
    p = tmp_path / "empty.txt"
    p.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DatasetError, match="empty.txt"):
        load(path=str(p))
    with pytest.raises(DatasetError, match="does not exist"):
        load(path=str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="cannot read"):
        load(path=str(bad))
    with pytest.raises(DatasetError, match="unsupported"):
        (tmp_path / "d.xml").write_text("<a/>")
        load(path=str(tmp_path / "d.xml"))


def test_path_outside_roots(tmp_path):
    inside, outside = tmp_path / "in", tmp_path / "out"
    inside.mkdir()
    outside.mkdir()
    (outside / "d.txt").write_text("x\n")
    (inside / "d.txt").write_text("y\n")
    opts = EngineOptions(local_roots=(inside,))
    assert load_task_inputs(DataSpec(path=str(inside / "d.txt")), opts).texts == ["y"]
    with pytest.raises(PathNotAllowedError):
        load_task_inputs(DataSpec(path=str(inside / ".." / "out" / "d.txt")), opts)


def test_hub_dataset_folder_through_load_dataset(tmp_path, monkeypatch):
    """A Hub-dataset-shaped snapshot (data/<split>.jsonl) is read with datasets.load_dataset, offline."""
    snap = tmp_path / "snapshots" / ("a" * 40)
    (snap / "data").mkdir(parents=True)
    write_jsonl(snap / "data" / "train.jsonl", [{"sentence": f"s{i}", "label": i % 2} for i in range(30)])
    write_jsonl(snap / "data" / "test.jsonl", [{"sentence": "only test", "label": 0}])
    seen = {}

    def fake_resolve(ref, options):
        seen["ref"] = ref
        return snap, "a" * 40

    monkeypatch.setattr(data_mod, "resolve_dataset_repo", fake_resolve)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    opts = EngineOptions(cache_dir=tmp_path / "cache")
    got = load_task_inputs(DataSpec(dataset="org/ds@main", num_samples=5), opts, 0)
    assert seen["ref"] == "org/ds@main"
    assert got.source == "org/ds@main" and got.commit == "a" * 40
    assert len(got) == 5 and all(t.startswith("s") for t in got.texts)
    got = load_task_inputs(DataSpec(dataset="org/ds", split="test"), opts, 0)
    assert got.texts == ["only test"]
    with pytest.raises(DatasetError, match="validation"):
        load_task_inputs(DataSpec(dataset="org/ds", split="validation"), opts, 0)
