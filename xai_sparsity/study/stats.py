"""The study's statistics: bootstrap by setting, paired differences with their smallest
detectable effect, and Holm's correction (docs/science.md).

Every interval is a 95 % interval. Bootstraps resample *settings* (a setting is a run's settings
without the seed), never single runs, so seeds of one setting stay together; they use a fixed
seed, so a report regenerates byte for byte.

>>> d = paired_difference([0.80, 0.82, 0.79, 0.85], [0.78, 0.80, 0.80, 0.81])
>>> d["n"], round(d["mean"], 4)
(4, 0.0175)
>>> holm([0.01, 0.04, 0.03])
[0.03, 0.06, 0.06]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

BOOTSTRAP_ROUNDS = 2000
"""Bootstrap resamples of every interval."""

BOOTSTRAP_SEED = 0
"""Seed of every bootstrap (reports are reproducible)."""


def bootstrap_by_group(
    groups: Sequence[Any] | np.ndarray,
    statistic: Callable[[np.ndarray], Any],
    *,
    rounds: int = BOOTSTRAP_ROUNDS,
    seed: int = BOOTSTRAP_SEED,
) -> np.ndarray:
    """Bootstrap replicates of ``statistic(rows)``, resampling whole groups with replacement.

    ``statistic`` receives the row indices of one resample (a group drawn twice contributes its
    rows twice) and returns a float or a fixed-length vector of floats (NaN allowed). Returns
    ``rounds`` replicates: shape ``(rounds,)`` or ``(rounds, k)``.

    >>> reps = bootstrap_by_group(["a", "a", "b"], lambda i: float(len(i)), rounds=200)
    >>> sorted(set(reps.tolist()))
    [2.0, 3.0, 4.0]
    """
    g = np.asarray(groups)
    names = list(dict.fromkeys(g.tolist()))
    members = [np.flatnonzero(g == n) for n in names]
    rng = np.random.default_rng(seed)
    if not names:
        return np.full(rounds, np.nan)
    reps = []
    for _ in range(rounds):
        pick = rng.integers(0, len(names), len(names))
        reps.append(np.asarray(statistic(np.concatenate([members[i] for i in pick])), dtype=float))
    return np.array(reps)


def percentile_interval(replicates: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of the finite replicates (NaN, NaN if there are none)."""
    r = np.asarray(replicates, dtype=float)
    r = r[np.isfinite(r)]
    if not len(r):
        return math.nan, math.nan
    a = (1 - level) / 2
    return float(np.quantile(r, a)), float(np.quantile(r, 1 - a))


def detectable_effect(sd: float, n: int, power: float = 0.8, alpha: float = 0.05) -> float:
    """The smallest mean difference a two-sided paired t-test at ``alpha`` detects with ``power``
    for ``n`` pairs of standard deviation ``sd``: ``(t_{1-alpha/2} + t_{power}) * sd / sqrt(n)``,
    both quantiles with ``n - 1`` degrees of freedom (NaN for fewer than 2 pairs)."""
    from scipy import stats

    if n < 2 or not math.isfinite(sd):
        return math.nan
    df = n - 1
    return float((stats.t.ppf(1 - alpha / 2, df) + stats.t.ppf(power, df)) * sd / math.sqrt(n))


def paired_difference(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    rounds: int = BOOTSTRAP_ROUNDS,
    seed: int = BOOTSTRAP_SEED,
) -> dict[str, Any]:
    """``a - b`` over pairs (one pair per seed): mean, paired SD, the t and bootstrap 95 %
    intervals of the mean, the paired t-test's two-sided p-value, the smallest detectable
    effect (:func:`detectable_effect`) and the pairs where ``a`` is larger.

    Pairs with a NaN are dropped.
    """
    from scipy import stats

    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    d = d[np.isfinite(d)]
    n = len(d)
    out: dict[str, Any] = {"n": n, "mean": float(d.mean()) if n else math.nan}
    sd = float(d.std(ddof=1)) if n >= 2 else math.nan
    out["sd"] = sd
    if n >= 2:
        half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
        out["t_low"], out["t_high"] = out["mean"] - half, out["mean"] + half
        # zero spread: p 0 for a non-zero mean, NaN (undefined) for a zero one
        out["p"] = (
            float(stats.ttest_1samp(d, 0.0).pvalue)
            if sd > 0
            else (0.0 if out["mean"] else math.nan)
        )
    else:
        out["t_low"] = out["t_high"] = out["p"] = math.nan
    reps = bootstrap_by_group(np.arange(n), lambda i: float(d[i].mean()), rounds=rounds, seed=seed)
    out["boot_low"], out["boot_high"] = percentile_interval(reps)
    out["mde"] = detectable_effect(sd, n)
    out["wins"] = int((d > 0).sum())
    return out


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (NaN stays NaN and does not count as a test)."""
    p = np.asarray(pvalues, dtype=float)
    finite = np.flatnonzero(np.isfinite(p))
    order = finite[np.argsort(p[finite], kind="stable")]
    m = len(order)
    adj = np.full(len(p), np.nan)
    running = 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (m - k) * p[i]))
        adj[i] = running
    return [round(float(x), 12) if math.isfinite(x) else math.nan for x in adj]


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman's rank correlation of the finite pairs (NaN for fewer than 3 or a constant)."""
    from scipy import stats

    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(stats.spearmanr(a, b).statistic)


__all__ = [
    "BOOTSTRAP_ROUNDS",
    "BOOTSTRAP_SEED",
    "bootstrap_by_group",
    "detectable_effect",
    "holm",
    "paired_difference",
    "percentile_interval",
    "spearman",
]
