"""Unlabelled task inputs: a Hub dataset, a local file, or inline texts, sampled with a seed.

Labels are never read. An input is a text, or a ``(text_a, text_b)`` pair when two columns are used.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..config import DataSpec, EvalSpec
from ..errors import DatasetError
from ..io.paths import check_local_path
from ..io.refs import resolve_dataset_repo
from ..options import EngineOptions

TaskInput = str | tuple[str, str]
T = TypeVar("T")

#: Column choices tried in order when ``text_columns`` is not given (the pair ``question``/``sentence``
#: comes before the single ``sentence`` so QNLI-style data is read as pairs).
_AUTO_COLUMNS: tuple[tuple[str, ...], ...] = (
    ("text",),
    ("text_a", "text_b"),
    ("question", "sentence"),
    ("sentence",),
    ("sentence1", "sentence2"),
    ("premise", "hypothesis"),
)
_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".txt", ".parquet")


@dataclass
class TaskInputs:
    texts: list[TaskInput]
    #: Where the inputs came from: the Hub dataset reference, the local path, or "inline".
    source: str
    #: Resolved Hub commit SHA (None for local files and inline texts).
    commit: str | None = None

    @property
    def is_pair(self) -> bool:
        return bool(self.texts) and isinstance(self.texts[0], tuple)

    def __len__(self) -> int:
        return len(self.texts)


def load_task_inputs(spec: DataSpec, options: EngineOptions, seed: int = 0) -> TaskInputs:
    """Load and sample ``spec.num_samples`` inputs (all of them if fewer), seeded by ``seed`` and ``spec.seed``."""
    rng = random.Random(f"{seed}/{spec.seed}")
    rows, source, commit = read_rows(spec, options)
    texts = sample(rows, extractor(spec, rows.columns, source), spec.num_samples, rng)
    if not texts:
        raise DatasetError(f"dataset {source!r} yielded no non-empty input text")
    return TaskInputs(texts=texts, source=source, commit=commit)


def read_rows(spec: DataSpec | EvalSpec, options: EngineOptions) -> tuple[Rows, str, str | None]:
    """The rows of ``spec``'s source (inline ``texts``, a local file or a Hub dataset), where they came
    from ("inline", the path or the dataset reference) and the dataset's resolved commit."""
    if spec.texts is not None:
        labels = spec.labels if isinstance(spec, EvalSpec) else None
        records = [{"text": t} | ({"label": labels[i]} if labels else {}) for i, t in enumerate(spec.texts)]
        return _ListRows(records, ["text", "label"] if labels else ["text"]), "inline", None
    if spec.path is not None:
        path = check_local_path(spec.path, options.local_roots, "dataset path")
        return _read_local(path, spec.path), spec.path, None
    assert spec.dataset is not None
    rows, commit = _read_hub(spec, options)
    return rows, spec.dataset, commit


# --- row sources -----------------------------------------------------------------------------------------
class Rows:
    columns: list[str]

    def __len__(self) -> int:
        raise NotImplementedError

    def get(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        raise NotImplementedError


class _ListRows(Rows):
    def __init__(self, rows: list[dict[str, Any]], columns: list[str]):
        self.rows, self.columns = rows, columns

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return [self.rows[i] for i in indices]


class _DatasetRows(Rows):
    """A ``datasets.Dataset``: only the sampled rows are materialised."""

    def __init__(self, ds: Any):
        self.ds, self.columns = ds, list(ds.column_names)

    def __len__(self) -> int:
        return len(self.ds)

    def get(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return self.ds.select(list(indices)).to_list() if indices else []


def _read_local(path: Path, shown: str) -> Rows:
    if not path.is_file():
        raise DatasetError(f"dataset file {shown!r} does not exist")
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise DatasetError(f"dataset file {shown!r}: unsupported type (use one of {', '.join(_SUFFIXES)})")
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            return _ListRows(table.to_pylist(), list(table.column_names))
        text = path.read_text(encoding="utf-8")
        if suffix == ".txt":
            return _ListRows([{"text": line} for line in text.splitlines()], ["text"])
        if suffix == ".jsonl":
            return _records([json.loads(line) for line in text.splitlines() if line.strip()], shown)
        if suffix == ".json":
            data = json.loads(text)
            if isinstance(data, dict) and isinstance(data.get("data"), list):
                data = data["data"]
            elif isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
                data = [dict(zip(data, vals, strict=False)) for vals in zip(*data.values(), strict=False)]
            return _records(data, shown)
        delimiter = "\t" if suffix == ".tsv" else ","
        quoting = csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL
        reader = csv.DictReader(text.splitlines(), delimiter=delimiter, quoting=quoting)
        return _ListRows(list(reader), list(reader.fieldnames or []))
    except (OSError, UnicodeDecodeError, ValueError, csv.Error) as err:
        raise DatasetError(f"cannot read dataset file {shown!r}: {err}") from None
    except Exception as err:  # noqa: BLE001 - pyarrow raises its own types
        raise DatasetError(f"cannot read dataset file {shown!r}: {type(err).__name__}: {err}") from None


def _records(data: Any, shown: str) -> Rows:
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DatasetError(f"dataset file {shown!r} must hold JSON objects (one per row)")
    columns = list(dict.fromkeys(k for r in data for k in r))
    return _ListRows(data, columns)


def _read_hub(spec: DataSpec | EvalSpec, options: EngineOptions) -> tuple[Rows, str | None]:
    import datasets

    assert spec.dataset is not None
    folder, commit = resolve_dataset_repo(spec.dataset, options)
    cache = str(options.cache_dir / "datasets") if options.cache_dir else None
    try:
        ds = datasets.load_dataset(str(folder), name=spec.config, split=spec.split, cache_dir=cache)
    except Exception as err:  # noqa: BLE001 - datasets raises many types (ValueError, FileNotFoundError, ...)
        raise DatasetError(f"dataset {spec.dataset!r}: cannot load split {spec.split!r}: {err}") from None
    if isinstance(ds, datasets.IterableDataset) or not hasattr(ds, "column_names"):
        raise DatasetError(f"dataset {spec.dataset!r}: split {spec.split!r} is not a table")
    return _DatasetRows(ds), commit


# --- columns and sampling --------------------------------------------------------------------------------
def extractor(
    spec: DataSpec | EvalSpec, columns: list[str], source: str
) -> Callable[[dict], TaskInput | None]:
    if spec.template is not None:
        template = spec.template

        def fmt(row: dict) -> TaskInput | None:
            try:
                text = template.format(**row)
            except KeyError as err:
                raise DatasetError(
                    f"dataset {source!r}: template names column {err.args[0]!r}; available columns: {columns}"
                ) from None
            except (IndexError, ValueError) as err:
                raise DatasetError(f"dataset {source!r}: bad template: {err}") from None
            return text if text.strip() else None

        return fmt
    cols = _choose_columns(spec, columns, source)

    def pick(row: dict) -> TaskInput | None:
        values = [row.get(c) for c in cols]
        if any(v is None or not str(v).strip() for v in values):
            return None
        return str(values[0]) if len(values) == 1 else (str(values[0]), str(values[1]))

    return pick


def _choose_columns(spec: DataSpec | EvalSpec, columns: list[str], source: str) -> tuple[str, ...]:
    if spec.text_columns:
        if len(spec.text_columns) > 2:
            raise DatasetError(
                f"dataset {source!r}: give one or two text_columns (or a template to combine more)"
            )
        missing = [c for c in spec.text_columns if c not in columns]
        if missing:
            raise DatasetError(
                f"dataset {source!r} has no column {missing[0]!r}; available columns: {columns}"
            )
        return tuple(spec.text_columns)
    for choice in _AUTO_COLUMNS:
        if all(c in columns for c in choice):
            return choice
    raise DatasetError(
        f"dataset {source!r}: cannot tell which column holds the text; set text_columns or template "
        f"(available columns: {columns})"
    )


def sample(rows: Rows, extract: Callable[[dict], T | None], n: int, rng: random.Random) -> list[T]:
    """Seeded sample without replacement of ``n`` rows that yield a text (rows without text are skipped)."""
    order = list(range(len(rows)))
    rng.shuffle(order)
    out: list[T] = []
    pos = 0
    while len(out) < n and pos < len(order):
        chunk = order[pos : pos + max(n - len(out), 16)]
        pos += len(chunk)
        for row in rows.get(chunk):
            value = extract(row)
            if value is not None:
                out.append(value)
                if len(out) == n:
                    break
    return out
