"""The merge methods of the table and the benchmark modes (sizes of each run)."""

from __future__ import annotations

import dataclasses
import itertools
import random
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class MethodSpec:
    """One row of the table: an engine ``merge_method`` with fixed parameters."""

    name: str
    merge_method: str
    parameters: dict[str, Any] = field(default_factory=dict)
    learned: bool = False
    #: pass the base model (task-vector methods); averaging and multislerp merge the experts only
    with_base: bool = True
    #: score each task on its own slice of the union head (``data.labels``; classification track only)
    own_labels: bool = False


def method_specs(learned: dict[str, Any], own_labels: bool = False) -> list[MethodSpec]:
    """The table's rows. ``learned`` holds the shared optimisation parameters of the learned methods.

    ``own_labels`` adds ``+labels`` rows: the learned methods scored on each task's own labels only.
    """
    rows = [
        MethodSpec("averaging", "linear", {}, with_base=False),
        MethodSpec("task_arithmetic", "task_arithmetic", {"weight": 0.3}),
        MethodSpec("ties", "ties", {"density": 0.2, "weight": 1.0}),
        MethodSpec("dare_ties", "dare_ties", {"density": 0.5, "weight": 1.0, "seed": 0}),
        MethodSpec("multislerp", "multislerp", {}, with_base=False),
    ]
    for gran in ("task", "layer"):
        rows.append(MethodSpec(f"adamerging_{gran}", "adamerging", {**learned, "granularity": gran}, True))
    for div in ("js", "kl"):
        for gran in ("task", "layer"):
            rows.append(
                MethodSpec(
                    f"divmerge_{gran}_{div}",
                    "divmerge",
                    {**learned, "granularity": gran, "divergence": div},
                    True,
                )
            )
    # early stopping: the same budget, stopped once the held-out divergence has not improved for an epoch
    rows.append(
        MethodSpec(
            "divmerge_layer_js_es",
            "divmerge",
            {**learned, "granularity": "layer", "divergence": "js", "patience": 1},
            True,
        )
    )
    # past the paper (docs/engine.md#learned-merge-variants): learned coefficients over TIES-trimmed and
    # sign-resolved task vectors (the density of the ties row), over DARE-dropped ones (dare_ties' density),
    # tensor coefficients pulled toward their layer's mean, and top-k teacher distributions
    variants = {
        "divmerge_layer_js_trim": {"tau_sparsify": "magnitude", "tau_density": 0.2, "tau_consensus": "sign"},
        "divmerge_layer_js_dare": {"tau_sparsify": "random", "tau_density": 0.5},
        "divmerge_tensor_js_pull": {"granularity": "tensor", "pull": 1.0},
        "divmerge_layer_js_topk": {"top_k": 32},
    }
    for name, extra in variants.items():
        parameters = {**learned, "granularity": "layer", "divergence": "js", **extra}
        rows.append(MethodSpec(name, "divmerge", parameters, True))
    if own_labels:
        for name in ("adamerging_layer", "divmerge_task_js", "divmerge_layer_js"):
            spec = next(r for r in rows if r.name == name)
            rows.append(dataclasses.replace(spec, name=f"{name}+labels", own_labels=True))
    return rows


#: Variant rows that run only where a mode names them (``Mode.rows``).
VARIANT_ROWS = (
    "divmerge_layer_js_es",
    "divmerge_layer_js_trim",
    "divmerge_layer_js_dare",
    "divmerge_tensor_js_pull",
    "divmerge_layer_js_topk",
)
#: The ``variants`` modes' rows: the references and the variants (top-k only where teachers are causal LMs).
VARIANTS_BASELINES = ("ties", "task_arithmetic", "divmerge_layer_js", "divmerge_layer_js_es")
VARIANTS_CLS = (
    *VARIANTS_BASELINES,
    "divmerge_layer_js_trim",
    "divmerge_layer_js_dare",
    "divmerge_tensor_js_pull",
)
VARIANTS_CAUSAL = (*VARIANTS_CLS, "divmerge_layer_js_topk")

#: The rows of the llm track (the paper's table): no task-level AdaMerging, KL only at layer level.
LLM_ROWS = (
    "averaging",
    "task_arithmetic",
    "ties",
    "dare_ties",
    "multislerp",
    "adamerging_layer",
    "divmerge_task_js",
    "divmerge_layer_js",
    "divmerge_layer_kl",
)


@dataclass(frozen=True)
class Mode:
    """Sizes of one benchmark run."""

    name: str
    tasks: tuple[str, ...]
    ks: tuple[int, ...]
    #: combinations sampled per k (None: all of them)
    combos_per_k: dict[int, int | None]
    eval_n: int
    num_samples: int
    learned: dict[str, Any]
    seed: int = 0
    #: merge inputs per task of the layer-level learned methods (default: num_samples)
    layer_num_samples: int | None = None
    #: the table's rows (default: every row of the track)
    rows: tuple[str, ...] | None = None

    def combos(self, k: int) -> list[tuple[str, ...]]:
        return sample_combos(self.tasks, k, self.combos_per_k.get(k), self.seed)

    def samples_for(self, spec: MethodSpec) -> int:
        """Merge inputs per task of one table row."""
        if self.layer_num_samples is not None and spec.parameters.get("granularity") == "layer":
            return self.layer_num_samples
        return self.num_samples


def sample_combos(tasks: tuple[str, ...], k: int, n: int | None, seed: int = 0) -> list[tuple[str, ...]]:
    """A seeded sample of ``n`` k-subsets of ``tasks`` (prefix-stable: a larger n extends a smaller one)."""
    allc = list(itertools.combinations(tasks, k))
    random.Random(seed * 1000 + k).shuffle(allc)
    return allc if n is None else allc[:n]


def mode_rows(kind: str, mode: Mode, specs: list[MethodSpec]) -> list[MethodSpec]:
    """The rows one track runs in ``mode``: the mode's own list, else the track's rows without variants."""
    if mode.rows is not None:
        return [s for s in specs if s.name in mode.rows]
    return [s for s in specs if s.name not in VARIANT_ROWS and (kind != "llm" or s.name in LLM_ROWS)]
