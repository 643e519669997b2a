"""Task data: TSV loading, the union label head, and the train / merge / eval splits.

Each task folder holds ``train.tsv``, ``validation.tsv``, optional ``test.tsv`` (header ``text,label`` or
``text_a,text_b,label``) and ``labels.json``. Splits used by the benchmark:

* **train**: fine-tuning data of the expert (a seeded subset of ``train.tsv``).
* **merge pool**: unlabelled merge inputs, drawn from ``validation.tsv`` (labels are dropped).
* **eval**: accuracy split. ``test.tsv`` where it exists; otherwise a seeded half of ``validation.tsv``
  that is held out of the merge pool (the two halves are disjoint).
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

#: Canonical task order (the union head follows it; unknown tasks come after, sorted).
TASK_ORDER = ("sst2", "cola", "mrpc", "rte", "qnli", "qqp", "mnli", "snli")
#: The seven GLUE tasks of the ANP table.
GLUE_TASKS = ("sst2", "cola", "mrpc", "rte", "qnli", "qqp", "mnli")
#: Seed of the validation holdout for tasks without a test file.
HOLDOUT_SEED = 1234


@dataclass(frozen=True)
class Example:
    text_a: str
    text_b: str | None
    label: int


@dataclass
class Task:
    """One task's labels and splits."""

    name: str
    labels: list[str]
    columns: list[str]  # input columns: ["text"] or ["text_a", "text_b"]
    train: list[Example]
    merge_pool: list[Example]
    eval: list[Example]
    eval_source: str  # "test.tsv" or "validation.tsv holdout"
    digest: str = ""  # hash of the task's files (cache keys)

    @property
    def is_pair(self) -> bool:
        return len(self.columns) == 2


@dataclass(frozen=True)
class UnionHead:
    """One classification head over the union of the tasks' labels; task t owns a slice of it."""

    tasks: tuple[str, ...]
    sizes: tuple[int, ...]
    label_names: tuple[str, ...] = field(default=())

    def slice_of(self, task: str) -> slice:
        i = self.tasks.index(task)
        start = sum(self.sizes[:i])
        return slice(start, start + self.sizes[i])

    @property
    def num_labels(self) -> int:
        return sum(self.sizes)

    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.label_names))


def read_tsv(path: Path) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a tab-separated file (no quoting)."""
    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise ValueError(f"{path} is empty")
    return rows[0], rows[1:]


def read_examples(path: Path) -> tuple[list[str], list[Example]]:
    header, rows = read_tsv(path)
    if header[-1] != "label" or header[:-1] not in (["text"], ["text_a", "text_b"]):
        raise ValueError(f"{path}: expected header text,label or text_a,text_b,label, got {header}")
    cols = header[:-1]
    out = []
    for r in rows:
        if len(r) != len(header):
            raise ValueError(f"{path}: row with {len(r)} fields, expected {len(header)}")
        out.append(Example(r[0], r[1] if len(cols) == 2 else None, int(r[-1])))
    return cols, out


def list_tasks(data_dir: Path) -> list[str]:
    """Task folders of ``data_dir`` (those with labels.json), in canonical order."""
    found = {p.name for p in Path(data_dir).iterdir() if (p / "labels.json").is_file()}
    return [t for t in TASK_ORDER if t in found] + sorted(found - set(TASK_ORDER))


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.glob("*")):
        if p.is_file():
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def load_task(data_dir: Path, name: str) -> Task:
    folder = Path(data_dir) / name
    labels = json.loads((folder / "labels.json").read_text(encoding="utf-8"))
    cols, train = read_examples(folder / "train.tsv")
    _, val = read_examples(folder / "validation.tsv")
    if (folder / "test.tsv").is_file():
        _, test = read_examples(folder / "test.tsv")
        pool, ev, src = val, test, "test.tsv"
    else:
        idx = list(range(len(val)))
        random.Random(HOLDOUT_SEED).shuffle(idx)
        half = len(idx) // 2
        ev = [val[i] for i in sorted(idx[:half])]
        pool = [val[i] for i in sorted(idx[half:])]
        src = "validation.tsv holdout (seeded half, disjoint from merge inputs)"
    for ex in train + pool + ev:
        if not 0 <= ex.label < len(labels):
            raise ValueError(f"{name}: label {ex.label} outside labels.json ({len(labels)} labels)")
    return Task(name, labels, cols, train, pool, ev, src, _digest(folder))


def load_tasks(data_dir: Path, names: list[str] | None = None) -> dict[str, Task]:
    names = names or list_tasks(data_dir)
    return {n: load_task(data_dir, n) for n in names}


def union_head(data_dir: Path) -> UnionHead:
    """The union head over every task of ``data_dir`` (fixed, whatever subset a run uses)."""
    names, sizes, label_names = [], [], []
    for t in list_tasks(data_dir):
        labels = json.loads((Path(data_dir) / t / "labels.json").read_text(encoding="utf-8"))
        names.append(t)
        sizes.append(len(labels))
        label_names += [f"{t}:{lab}" for lab in labels]
    return UnionHead(tuple(names), tuple(sizes), tuple(label_names))


def subset(examples: list[Example], n: int | None, seed: int) -> list[Example]:
    """A seeded subset of ``n`` examples (all of them, shuffled, when n is None or too large)."""
    idx = list(range(len(examples)))
    random.Random(seed).shuffle(idx)
    return [examples[i] for i in idx[: n if n is not None else len(idx)]]


def write_merge_inputs(task: Task, path: Path) -> Path:
    """Write the task's merge pool as an unlabelled TSV (input columns only) for the engine's ``data.path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as fh:
        fh.write("\t".join(task.columns) + "\n")
        for ex in task.merge_pool:
            fh.write("\t".join([ex.text_a] if ex.text_b is None else [ex.text_a, ex.text_b]) + "\n")
    tmp.replace(path)
    return path


def default_data_dir(repo_root: Path) -> Path | None:
    cand = (repo_root / ".." / "shared" / "data").resolve()
    return cand if cand.is_dir() else None
