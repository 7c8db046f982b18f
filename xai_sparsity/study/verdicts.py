"""The verdicts of docs/science.md: one primary test per claim, Holm-corrected across the claims,
each stated with its estimate, 95 % interval and the smallest effect the design could detect.

Primary tests (fixed before the study ran):

1. Claim 1: the ROC AUC of the repaired sparsity rule (``gated_perplexity``; the v1 EMA rule
   ``ew_perplexity`` where the repaired one has no data) against 0.5, by a bootstrap over
   settings. HELD also needs a median lead >= 0 and an AUC whose interval lies above every null
   rule's AUC (fixed epoch, training-loss plateau, training accuracy).
2. Claim 2: every penalty arm lowers the final perplexity sparsity of the deepest conv activation
   below the baseline's (paired by seed; intersection-union: the largest p).
3. Claim 3: the validation-selected penalty beats the baseline, dropout and weight decay in test
   accuracy at its validation-loss minimum (paired by seed; intersection-union).
4. Claim 4: the validation-selected penalty lowers the final filter correlation over IMAGES
   (density-independent) below the baseline's (paired by seed); every penalty arm when the study
   had no validation split.

A claim is HELD when its Holm-adjusted p-value is under 0.05 and its effect has the claimed sign
(and, for claim 1, the extra conditions); otherwise DID NOT HOLD; NOT TESTED when the study did
not measure what the test needs.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from xai_sparsity.study.claims import (
    CLAIM3_PRIMARY,
    arm_differences,
    claim3_table,
    has_validation,
    intersection_union_p,
    paired_families,
    role_runs,
    val_selected,
)
from xai_sparsity.study.tables import fmt

NOT_MEASURED = "not measured in this study"
NULL_RULES = ("fixed_epoch", "train_loss_plateau", "train_acc")


def interval(low: Any, high: Any, digits: int = 3) -> str:
    """``[low, high]`` formatted (``–`` for NaN)."""
    return f"[{fmt(low, digits)}, {fmt(high, digits)}]"


def primary_indicator(scores: pd.DataFrame) -> str | None:
    """The repaired rule when it was scored with data, else the v1 rule, else None."""
    by = _by_indicator(scores)
    for name in ("gated_perplexity", "ew_perplexity"):
        if name in by and by[name]["n_runs"] > 0 and np.isfinite(by[name]["auc"]):
            return name
    return None


def _by_indicator(scores: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """The score table as ``{indicator: {column: value}}``."""
    if scores.empty:
        return {}
    table: dict[Any, Any] = scores.set_index("indicator").to_dict("index")
    return {str(k): dict(v) for k, v in table.items()}


def _claim1(scores: pd.DataFrame) -> dict[str, Any]:
    name = primary_indicator(scores)
    if name is None:
        return {"claim": 1, "test": "AUC of the sparsity rule vs 0.5", "p": math.nan}
    s = _by_indicator(scores)[name]
    return {
        "claim": 1,
        "test": f"AUC of {name} (overfits vs clean) vs 0.5",
        "estimate": s["auc"],
        "low": s["auc_low"],
        "high": s["auc_high"],
        "p": s["auc_p"],
        "mde": s["auc_mde"],
        "sign_ok": s["auc"] > 0.5,
    }


def _iut_row(claim: int, test: str, table: pd.DataFrame, sign: int) -> dict[str, Any]:
    """Primary row of an intersection-union test over the rows of ``table`` (weakest row)."""
    if table.empty:
        return {"claim": claim, "test": test, "p": math.nan}
    ok = bool((sign * table["mean_diff"] > 0).all())
    ps = table["p"].to_numpy(dtype=float)
    if ok and np.isnan(ps).any():
        return {"claim": claim, "test": test, "p": math.nan}
    # the weakest comparison: the largest p when every sign is right, else the worst sign
    pick = int(np.argmax(ps)) if ok else int(np.argmin(sign * table["mean_diff"].to_numpy()))
    row = table.iloc[pick]
    return {
        "claim": claim,
        "test": test,
        "estimate": row["mean_diff"],
        "low": row["t_low"],
        "high": row["t_high"],
        "p": float(row["p"]) if ok else 1.0,
        "mde": row["mde"],
        "sign_ok": ok,
    }


def _claim3(summary: pd.DataFrame) -> dict[str, Any]:
    test = "validation-selected penalty minus baseline, dropout, weight decay (test accuracy)"
    table = claim3_table(summary)
    if table.empty:
        return {"claim": 3, "test": test, "p": math.nan}
    prim = pd.DataFrame(
        [
            table[(table["family"] == f) & (table["against"] == a)].iloc[0]
            for f, a in CLAIM3_PRIMARY
            if ((table["family"] == f) & (table["against"] == a)).any()
        ]
    )
    if len(prim) < len(CLAIM3_PRIMARY):
        return {"claim": 3, "test": test, "p": math.nan}
    row = _iut_row(3, test, prim, +1)
    row["p"] = intersection_union_p(table, CLAIM3_PRIMARY)
    return row


def _claim4(summary: pd.DataFrame) -> dict[str, Any]:
    from xai_sparsity.study.stats import paired_difference

    test = "penalty minus baseline, final filter correlation over images"
    pen = role_runs(summary, "penalty")
    col = "final_correlation_images"
    if pen.empty or col not in pen.columns or not pen[col].notna().any():
        return {"claim": 4, "test": test, "p": math.nan}
    if not has_validation(pen):
        return _iut_row(4, test + " (every penalty arm)", arm_differences(summary, col), -1)
    a, b = paired_families(val_selected(summary), "penalty", "baseline", col)
    d = paired_difference(a, b)
    return {
        "claim": 4,
        "test": test + " (validation-selected penalty)",
        "estimate": d["mean"],
        "low": d["t_low"],
        "high": d["t_high"],
        "p": d["p"],
        "mde": d["mde"],
        "sign_ok": d["mean"] < 0,
    }


def primary_tests(summary: pd.DataFrame, scores: pd.DataFrame) -> pd.DataFrame:
    """One row per claim: the test, estimate, 95 % interval, p, Holm-adjusted p, smallest
    detectable effect and the verdict word."""
    from xai_sparsity.study.stats import holm

    rows = [
        _claim1(scores),
        _iut_row(
            2,
            "every penalty arm minus baseline, final sparsity of the deepest conv activation",
            arm_differences(summary, "final_sparsity_deepest"),
            -1,
        ),
        _claim3(summary),
        _claim4(summary),
    ]
    df = pd.DataFrame(rows)
    for col in ("estimate", "low", "high", "mde"):
        if col not in df.columns:
            df[col] = math.nan
    if "sign_ok" not in df.columns:
        df["sign_ok"] = False
    df["p_holm"] = holm(df["p"].to_numpy(dtype=float).tolist())
    df["verdict"] = [_word(r, scores) for _, r in df.iterrows()]
    return df[["claim", "test", "estimate", "low", "high", "p", "p_holm", "mde", "verdict"]]


def _word(row: pd.Series, scores: pd.DataFrame) -> str:
    if not np.isfinite(row["p"]):
        return "NOT TESTED"
    held = bool(row["sign_ok"]) and row["p_holm"] < 0.05
    if held and row["claim"] == 1:
        held = _claim1_extra(scores)
    return "HELD" if held else "DID NOT HOLD"


def _claim1_extra(scores: pd.DataFrame) -> bool:
    """Claim 1's conditions beyond the AUC test: median lead >= 0 and the AUC interval above
    every scored null rule's AUC."""
    name = primary_indicator(scores)
    if name is None:
        return False
    by = _by_indicator(scores)
    nulls = [by[n]["auc"] for n in NULL_RULES if n in by and np.isfinite(by[n]["auc"])]
    lead_ok = bool(by[name]["lead_median"] >= 0)
    return lead_ok and all(by[name]["auc_low"] > a for a in nulls)


def verdict_lines(tests: pd.DataFrame, scores: pd.DataFrame) -> list[str]:
    """One bullet per claim: verdict, estimate, interval, p (raw and Holm) and the smallest
    detectable effect."""
    names = {
        1: "sparsity rises before the test loss turns, a label-free indicator",
        2: "the penalty makes targeted activations denser",
        3: "the targeted penalty beats the baseline, dropout and weight decay",
        4: "the penalty counteracts filter correlation",
    }
    out = []
    for _, r in tests.iterrows():
        head = f"**Claim {r['claim']} ({names[int(r['claim'])]}): {r['verdict']}.**"
        if r["verdict"] == "NOT TESTED":
            out.append(f"{head} {r['test']}: {NOT_MEASURED}.")
            continue
        out.append(
            f"{head} {r['test']}: {fmt(r['estimate'], 4)}, 95 % CI "
            f"{interval(r['low'], r['high'], 4)}, p {fmt(r['p'], 4)} (Holm {fmt(r['p_holm'], 4)}); "
            f"smallest effect the design could detect: {fmt(r['mde'], 4)}."
        )
    name = primary_indicator(scores)
    if name is not None:
        out.append(_competitors_line(scores, name))
    return out


def _competitors_line(scores: pd.DataFrame, name: str) -> str:
    by = _by_indicator(scores)
    ranked = sorted((n for n in by if np.isfinite(by[n]["auc"])), key=lambda n: -by[n]["auc"])
    top = ", ".join(
        f"{n} {fmt(by[n]['auc'])} {interval(by[n]['auc_low'], by[n]['auc_high'])}"
        for n in ranked[:5]
    )
    nulls = ", ".join(f"{n} {fmt(by[n]['auc'])}" for n in NULL_RULES if n in by)
    s = by[name]
    return (
        f"Indicators by AUC (leave-one-setting-out; 95 % CI by settings): {top}. Null rules: "
        f"{nulls or NOT_MEASURED}. {name}: recall {fmt(s['recall'])}, false-alarm rate "
        f"{fmt(s['false_alarm_rate'])}, median lead {fmt(s['lead_median'], 1)} epochs, "
        f"Spearman(firing epoch, t_L) {fmt(s['spearman_fire_tL'])}."
    )


__all__ = [
    "NOT_MEASURED",
    "NULL_RULES",
    "interval",
    "primary_indicator",
    "primary_tests",
    "verdict_lines",
]
