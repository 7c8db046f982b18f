"""The statistical tests of claims 2-4 on a study summary (docs/science.md).

Claim 3 follows a validation protocol: in every seed of the penalty group each family of arms
(the penalty on the deepest conv layer, on the automatic choice, on all; dropout; weight decay;
any penalty) is represented by its arm with the lowest minimum VALIDATION loss, stopped at that
minimum; the number compared is the TEST accuracy at that epoch (``val_test_acc``). Families are
compared with the baseline (stopped at its own validation minimum) and with each other, paired by
seed: the mean difference with its t and bootstrap 95 % intervals, the paired t-test's p-value and
the smallest effect the design could detect (80 % power, two-sided 5 %, from the observed paired
SD).

Claim 4 compares filter correlation, over positions (grows with density, so confounded with the
penalty's own effect) and over images (density-independent): penalty against baseline, paired by
seed, and overfitting runs against clean negatives, at t_L and at the end, with intervals from a
bootstrap over settings.

>>> arm_family("penalty-deepest@0.3"), arm_family("weight_decay@1e-3"), arm_family("baseline")
('deepest', 'weight_decay', 'baseline')
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

VAL_COLUMNS = ("min_val_loss", "val_best_epoch", "val_test_acc")
"""Summary columns of the validation protocol (absent in studies without a validation split)."""

CLAIM3_COMPARISONS: tuple[tuple[str, str], ...] = (
    ("penalty", "baseline"),
    ("penalty", "dropout"),
    ("penalty", "weight_decay"),
    ("deepest", "baseline"),
    ("auto", "baseline"),
    ("all", "baseline"),
    ("dropout", "baseline"),
    ("weight_decay", "baseline"),
)
"""(family, comparator) pairs of claim 3; "penalty" is the best penalty arm of any targeting."""

CLAIM3_PRIMARY = (("penalty", "baseline"), ("penalty", "dropout"), ("penalty", "weight_decay"))
"""Claim 3 holds when the validation-selected penalty beats all three (intersection-union test:
its p-value is the largest of the three)."""

_PENALTY_FAMILIES = ("deepest", "auto", "all", "penalty")


def arm_family(arm: str) -> str:
    """The family of an arm: its name before ``@``, without a ``penalty-`` prefix."""
    base = str(arm).split("@", 1)[0]
    return base[len("penalty-") :] if base.startswith("penalty-") else base


def role_runs(summary: pd.DataFrame, role: str) -> pd.DataFrame:
    """The complete runs of the groups with ``role`` (every run when there are no roles)."""
    df = summary
    if "roles" in df.columns:
        df = df[df["roles"].astype(str).str.split(";").apply(lambda rs: role in rs)]
    if "status" in df.columns:
        df = df[df["status"] == "complete"]
    return df.copy()


def has_validation(summary: pd.DataFrame) -> bool:
    """Whether the summary holds the validation protocol's columns with values."""
    return all(c in summary.columns for c in VAL_COLUMNS) and bool(
        pd.to_numeric(summary["min_val_loss"], errors="coerce").notna().any()
    )


def val_selected(summary: pd.DataFrame, role: str = "penalty") -> pd.DataFrame:
    """Per (cell, seed) and family, the arm with the lowest minimum validation loss.

    Returns columns ``cell``, ``seed``, ``family``, ``arm``, ``min_val_loss``, ``val_best_epoch``,
    ``val_test_acc`` and the run's other columns; family ``"penalty"`` is chosen among every
    penalty arm (targets and lambda chosen on validation). Empty without validation columns.
    """
    df = role_runs(summary, role)
    if df.empty or not has_validation(df):
        return pd.DataFrame()
    df["family"] = df["arm"].map(arm_family)
    df["min_val_loss"] = pd.to_numeric(df["min_val_loss"], errors="coerce")
    pen = df[df["family"].isin(_PENALTY_FAMILIES)].assign(family="penalty")
    both = pd.concat([df, pen], ignore_index=True).dropna(subset=["min_val_loss"])
    idx = both.groupby(["cell", "seed", "family"], sort=False)["min_val_loss"].idxmin()
    return both.loc[idx].reset_index(drop=True)


def paired_families(
    chosen: pd.DataFrame, family: str, against: str, metric: str
) -> tuple[np.ndarray, np.ndarray]:
    """``metric`` of ``family`` and of ``against`` on the (cell, seed) pairs both have."""
    a = chosen[chosen["family"] == family].set_index(["cell", "seed"])
    b = chosen[chosen["family"] == against].set_index(["cell", "seed"])
    common = a.index.intersection(b.index)
    return (
        pd.to_numeric(a.loc[common, metric], errors="coerce").to_numpy(dtype=float),
        pd.to_numeric(b.loc[common, metric], errors="coerce").to_numpy(dtype=float),
    )


def _comparison_row(chosen: pd.DataFrame, fam: str, comp: str, metric: str) -> dict[str, Any]:
    from xai_sparsity.study.stats import paired_difference

    a, b = paired_families(chosen, fam, comp, metric)
    d = paired_difference(a, b)
    arms = chosen[chosen["family"] == fam]["arm"].value_counts()
    return {
        "family": fam,
        "against": comp,
        "metric": metric,
        "n_pairs": d["n"],
        "mean_diff": d["mean"],
        "t_low": d["t_low"],
        "t_high": d["t_high"],
        "boot_low": d["boot_low"],
        "boot_high": d["boot_high"],
        "p": d["p"],
        "mde": d["mde"],
        "wins": d["wins"],
        "chosen_arms": ", ".join(f"{k} x{v}" for k, v in arms.items()),
    }


def claim3_table(
    summary: pd.DataFrame,
    comparisons: Sequence[tuple[str, str]] = CLAIM3_COMPARISONS,
    metric: str = "val_test_acc",
) -> pd.DataFrame:
    """Claim 3's paired comparisons of validation-selected families (see the module docstring);
    one row per comparison present in the data. Empty without a validation split."""
    chosen = val_selected(summary)
    if chosen.empty:
        return pd.DataFrame()
    present = set(chosen["family"])
    rows = [
        _comparison_row(chosen, fam, comp, metric)
        for fam, comp in comparisons
        if fam in present and comp in present
    ]
    return pd.DataFrame(rows)


def intersection_union_p(table: pd.DataFrame, primary: Sequence[tuple[str, str]]) -> float:
    """The p-value of "the family beats every comparator in ``primary``": the largest of their
    p-values when every mean difference is positive, 1 otherwise; NaN when one is missing."""
    rows = []
    for fam, comp in primary:
        sel = table[(table["family"] == fam) & (table["against"] == comp)] if len(table) else table
        if sel.empty:
            return math.nan
        rows.append(sel.iloc[0])
    if any(not (r["mean_diff"] > 0) for r in rows):
        return 1.0
    return float(max(r["p"] for r in rows))


def arm_differences(summary: pd.DataFrame, metric: str, role: str = "penalty") -> pd.DataFrame:
    """Every penalty arm minus the baseline on ``metric``, paired by (cell, seed) (claims 2, 4)."""
    df = role_runs(summary, role)
    if df.empty or metric not in df.columns or "baseline" not in set(df["arm"]):
        return pd.DataFrame()
    df = df.assign(family=df["arm"].astype(str))
    rows = []
    for arm in [a for a in dict.fromkeys(df["arm"].astype(str)) if a.startswith("penalty")]:
        row = _comparison_row(df, arm, "baseline", metric)
        rows.append({"arm": arm, **{k: v for k, v in row.items() if k != "chosen_arms"}})
    out = pd.DataFrame(rows)
    return out.drop(columns=["family"]) if not out.empty else out


def _finite(df: pd.DataFrame, column: str) -> bool:
    return column in df.columns and bool(pd.to_numeric(df[column], errors="coerce").notna().any())


def group_difference(
    values: np.ndarray, positive: np.ndarray, groups: np.ndarray
) -> dict[str, float]:
    """Mean of ``values`` where ``positive`` minus where not: Welch's t-test p-value and a
    95 % interval from a bootstrap over ``groups`` (settings); the smallest detectable difference
    is 2.8 bootstrap standard errors (80 % power, two-sided 5 %)."""
    from scipy import stats

    from xai_sparsity.study.stats import bootstrap_by_group, percentile_interval

    keep = np.isfinite(values)
    v, y, g = values[keep], positive[keep], groups[keep]
    out: dict[str, float] = {"n_pos": int(y.sum()), "n_neg": int((~y).sum())}
    if out["n_pos"] < 2 or out["n_neg"] < 2:
        return {
            **out,
            "diff": math.nan,
            "low": math.nan,
            "high": math.nan,
            "p": math.nan,
            "mde": math.nan,
        }

    def diff(rows: np.ndarray) -> float:
        a, b = v[rows][y[rows]], v[rows][~y[rows]]
        return float(a.mean() - b.mean()) if len(a) and len(b) else math.nan

    reps = bootstrap_by_group(g, diff)
    low, high = percentile_interval(reps)
    with warnings.catch_warnings():  # nearly identical groups: scipy warns, p stays usable
        warnings.simplefilter("ignore", RuntimeWarning)
        p = float(stats.ttest_ind(v[y], v[~y], equal_var=False).pvalue)
    se = float(np.nanstd(reps, ddof=1))
    return {
        **out,
        "diff": diff(np.arange(len(v))),
        "low": low,
        "high": high,
        "p": p,
        "mde": 2.8 * se,
    }


def claim4_overfit_vs_clean(detection: pd.DataFrame) -> pd.DataFrame:
    """Filter correlation of overfitting runs minus clean negatives, over positions and over
    images, at t_L and at the end (rows only for columns the summary has)."""
    from xai_sparsity.study.indicators import run_labels, run_settings

    if detection.empty:
        return pd.DataFrame()
    labels = run_labels(detection)
    keep = np.isin(labels, ("overfits", "clean"))
    df, y = detection[keep], labels[keep] == "overfits"
    groups = run_settings(df)
    rows = []
    for column, over, when in (
        ("corr_tL", "positions", "t_L"),
        ("final_correlation", "positions", "end"),
        ("corr_images_tL", "images", "t_L"),
        ("final_correlation_images", "images", "end"),
    ):
        if _finite(df, column):
            v = pd.to_numeric(df[column], errors="coerce").to_numpy(dtype=float)
            rows.append({"over": over, "at": when, **group_difference(v, y, groups)})
    return pd.DataFrame(rows)


__all__ = [
    "CLAIM3_COMPARISONS",
    "CLAIM3_PRIMARY",
    "VAL_COLUMNS",
    "arm_differences",
    "arm_family",
    "claim3_table",
    "claim4_overfit_vs_clean",
    "group_difference",
    "has_validation",
    "intersection_union_p",
    "paired_families",
    "role_runs",
    "val_selected",
]
