"""ANP (average normalized performance) and its confidence intervals.

ANP of one merge over tasks T (paper, Table 6): ``100 * mean_t acc_merged(t) / acc_expert(t)``.
For a method and a k, the benchmark reports the mean ANP over the sampled task combinations with a 95 %
Student-t interval across combinations (``mean ± t_{0.975,n-1} * sd / sqrt(n)``); with one combination
(k = 7 of 7 tasks) that interval does not exist, so a percentile bootstrap over the eval examples is given
as well (per task, examples resampled with replacement; the expert accuracies are held fixed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from divmerge_core.evaluation.report import bootstrap_anp

# two-sided 95 % Student-t quantiles t_{0.975, df}
_T975 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    11: 2.201,
    12: 2.179,
    13: 2.160,
    14: 2.145,
    15: 2.131,
    16: 2.120,
    17: 2.110,
    18: 2.101,
    19: 2.093,
    20: 2.086,
    25: 2.060,
    30: 2.042,
    40: 2.021,
    60: 2.000,
    120: 1.980,
}


def t975(df: int) -> float:
    """Two-sided 95 % Student-t quantile (table, nearest lower df; 1.96 beyond 120)."""
    if df < 1:
        raise ValueError("df must be >= 1")
    if df > 120:
        return 1.960
    return _T975[max(k for k in _T975 if k <= df)]


def anp(merged: dict[str, float], expert: dict[str, float]) -> float:
    """ANP (x100) of one merge: mean over its tasks of merged / expert accuracy."""
    if not merged:
        raise ValueError("no tasks")
    return 100.0 * sum(merged[t] / expert[t] for t in merged) / len(merged)


def mean_ci(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95 % Student-t interval (None for fewer than 2 values)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    m = sum(values) / n
    if n < 2:
        return m, None
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    return m, t975(n - 1) * sd / math.sqrt(n)


def bootstrap_anp_ci(
    correct: Sequence[dict[str, Sequence[bool]]],
    expert: dict[str, float],
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """95 % percentile interval of the mean ANP over combinations, resampling eval examples (the engine's
    ``evaluation.report.bootstrap_anp``). ``correct[c][t]`` holds per-example correctness of combination
    c's merge on task t."""
    return bootstrap_anp(correct, expert, n_boot=n_boot, seed=seed)
