"""How much of each expert's probability lies on its own task's labels of the union head.

``python -m benchmarks.quality.label_mass [--n 32]`` loads the full-recipe experts (training any that is
missing), runs each on the first ``n`` eval examples of its task and prints the mean softmax mass on the
task's own label slice. A small share means an unrestricted divergence over the whole head mostly compares
labels of other tasks: the reason for the ``+labels`` rows (``data.labels``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from .data import GLUE_TASKS, load_task, union_head
from .zoo import RECIPES, build_zoo, encode

REPO = Path(__file__).resolve().parents[2]


@torch.no_grad()
def own_label_mass(folder: Path, examples: list, label_slice: slice, max_length: int = 64) -> float:
    """Mean softmax probability on ``label_slice`` over ``examples``."""
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    probs = model(**encode(tok, examples, max_length)).logits.float().softmax(-1)
    return float(probs[:, label_slice].sum(-1).mean())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.quality.label_mass", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--cache", type=Path, default=REPO / "benchmarks" / ".cache")
    ap.add_argument("--n", type=int, default=32, help="eval examples per task")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    data = args.data.resolve()
    head = union_head(data)
    _, experts = build_zoo(data, args.cache, list(GLUE_TASKS), RECIPES["full"])
    for task, folder in experts.items():
        examples = load_task(data, task).eval[: args.n]
        mass = own_label_mass(folder, examples, head.slice_of(task))
        print(
            f"{task}: {100 * mass:.1f} % of the probability on its own {head.sizes[head.tasks.index(task)]} "
            f"of {head.num_labels} labels",
            flush=True,
        )


if __name__ == "__main__":
    main()
