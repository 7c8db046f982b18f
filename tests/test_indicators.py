"""Indicator definitions and their scoring on constructed histories with known answers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xai_sparsity import XaiSparsityError
from xai_sparsity.runs.analysis import EarlyWarning
from xai_sparsity.study.indicators import (
    INDICATORS,
    RunData,
    choose_threshold,
    confusion,
    evaluate_run,
    feature_layers,
    fire_column,
    get_indicator,
    max_qualifying_rise,
    roc_auc,
    score_indicators,
    split_runs,
)

LAYERS = ["features.relu1", "features.relu2"]


def history(
    sparsity: list[list[float]],
    *,
    train_acc: list[float] | None = None,
    train_sparsity: list[list[float]] | None = None,
    correlation: list[list[float]] | None = None,
) -> pd.DataFrame:
    n = len(sparsity[0])
    d: dict[str, object] = {
        "epoch": np.arange(1, n + 1),
        "train_loss": np.linspace(1, 0.1, n),
        "train_acc": train_acc if train_acc is not None else np.linspace(0.5, 1.0, n),
        "test_loss": np.ones(n),
        "test_acc": np.full(n, 0.8),
    }
    for i, layer in enumerate(LAYERS):
        d[f"sparsity:{layer}"] = sparsity[i]
        d[f"zero_fraction:{layer}"] = sparsity[i]
        d[f"hoyer:{layer}"] = sparsity[i]
        if train_sparsity is not None:
            d[f"train_sparsity:{layer}"] = train_sparsity[i]
        if correlation is not None:
            d[f"correlation:{layer}"] = correlation[i]
    d["sparsity:classifier.relu"] = np.linspace(0.9, 0.1, n)  # never watched
    return pd.DataFrame(d)


FLAT = [0.5] * 12
RISE_AT_6 = [0.5] * 5 + [0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85]


def test_feature_layers_skip_the_classifier() -> None:
    assert feature_layers(history([FLAT, FLAT])) == LAYERS


def test_flat_run_never_fires_and_rising_run_fires() -> None:
    flat = evaluate_run(history([FLAT, FLAT]), ["ew_perplexity", "ew_hoyer"])
    assert flat["fire:ew_perplexity"] is None
    assert flat["score:ew_perplexity"] == 0.0
    rising = evaluate_run(history([RISE_AT_6, FLAT]), ["ew_perplexity", "ew_perplexity_deepest"])
    # one of two layers rises: min_layers=0.5 needs one layer -> fires; the deepest layer is flat.
    assert rising["fire:ew_perplexity"] is not None
    assert rising["fire:ew_perplexity_deepest"] is None


def test_firing_epoch_equals_the_harness_early_warning() -> None:
    h = history([RISE_AT_6, RISE_AT_6])
    w = EarlyWarning(LAYERS, min_rise=0.02)
    fired = [w(row) for row in h[["epoch", *[f"sparsity:{n}" for n in LAYERS]]].to_dict("records")]
    expected = int(h["epoch"][int(np.argmax(fired))])
    assert get_indicator("ew_perplexity").firing_epoch(RunData(h)) == expected


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0.0, 1.0), min_size=4, max_size=25),
    st.sampled_from([0.001, 0.005, 0.01, 0.02, 0.05, 0.1]),
)
def test_score_is_the_largest_threshold_that_fires(values: list[float], theta: float) -> None:
    epochs = np.arange(1, len(values) + 1)
    score = max_qualifying_rise(values, epochs)
    w = EarlyWarning(["a"], min_rise=theta, min_layers=1)
    fired = any(w.update(int(e), {"a": v}) for e, v in zip(epochs, values, strict=True))
    assert fired == (score >= theta)


def test_train_gap_and_correlation_and_level_baseline() -> None:
    gap_rise = [[0.5] * 5 + [0.5 + 0.02 * k for k in range(1, 8)]] * 2
    h = history([FLAT, FLAT], train_sparsity=gap_rise, correlation=[RISE_AT_6, RISE_AT_6])
    out = evaluate_run(h, ["train_gap", "correlation", "train_acc"])
    assert out["fire:train_gap"] is not None
    assert out["fire:correlation"] is not None
    h2 = history([FLAT, FLAT], train_acc=[0.5, 0.9, 0.985, 0.991, 1.0] + [1.0] * 7)
    out2 = evaluate_run(h2, ["train_acc"])
    assert out2["fire:train_acc"] == 4
    assert out2[fire_column("train_acc", 0.98)] == 3
    assert out2[fire_column("train_acc", 0.8)] == 2
    assert out2["score:train_acc"] == 1.0


def test_channel_and_lifetime_indicators_read_the_arrays() -> None:
    h = history([FLAT, FLAT])
    arrays = {
        int(e): {f"channel:{n}": np.array([0.4, 0.5, 0.5 + 0.04 * max(0, e - 5)]) for n in LAYERS}
        | {f"lifetime:{n}": np.array([0.3, 0.3 + 0.03 * max(0, e - 5)]) for n in LAYERS}
        for e in h["epoch"]
    }
    out = evaluate_run(RunData(h, arrays), ["channel_q90", "channel_std", "lifetime"])
    for name in ("channel_q90", "channel_std", "lifetime"):
        assert out[f"fire:{name}"] is not None, name
    empty = evaluate_run(RunData(h, {}), ["channel_q90"])
    assert empty["fire:channel_q90"] is None and math.isnan(empty["score:channel_q90"])


def test_unknown_indicator_names_the_choices() -> None:
    with pytest.raises(XaiSparsityError, match="ew_perplexity"):
        get_indicator("ew_perplexty")


def test_split_is_deterministic_stratified_and_halved() -> None:
    ids = [f"run{i}" for i in range(20)]
    labels = [i % 3 == 0 for i in range(20)]
    a = split_runs(ids, labels, seed=0)
    assert (a == split_runs(ids, labels, seed=0)).all()
    assert a.sum() == math.ceil(7 / 2) + math.ceil(13 / 2)
    lab = np.array(labels)
    assert a[lab].sum() == math.ceil(lab.sum() / 2)
    assert not (a == split_runs(ids, labels, seed=1)).all()
    with pytest.raises(XaiSparsityError):
        split_runs(["x", "x"], [True, False])


def test_roc_auc_and_confusion() -> None:
    assert roc_auc([1, 2, 3, 4], [False, False, True, True]) == 1.0
    assert roc_auc([4, 3, 2, 1], [False, False, True, True]) == 0.0
    assert roc_auc([1, 1], [False, True]) == 0.5
    assert math.isnan(roc_auc([1, 2], [True, True]))
    c = confusion([True, True, True, False], [True, True, False, False])
    assert (c.precision, c.recall, c.false_alarm_rate) == (2 / 3, 1.0, 0.5)


def _table(n: int = 16) -> pd.DataFrame:
    """Constructed summary: a fake indicator 'train_acc' with known firing per threshold.

    Positives (turned, t_L = 10) fire at 0.99 at epoch 7; at 1.0 only half of them fire (epoch 9).
    Negatives fire at 0.99 in one run of four (epoch 5) and never at 1.0. Lower thresholds fire
    everywhere.
    """
    rows = []
    for i in range(n):
        pos = i % 2 == 0
        row: dict[str, object] = {"run_id": f"r{i:02d}", "turned": pos, "t_L": 10 if pos else 25}
        for t in get_indicator("train_acc").grid:
            if t < 0.99:
                fire = 3
            elif t == 0.99:
                fire = 7 if pos else (5 if i % 8 == 1 else None)
            else:
                fire = 9 if pos and i % 4 == 0 else None
            row[fire_column("train_acc", t)] = fire
        row["fire:train_acc"] = row[fire_column("train_acc", 0.99)]
        row["score:train_acc"] = (
            1.0 if row[fire_column("train_acc", 1.0)] else 0.99 if row["fire:train_acc"] else 0.98
        )
        rows.append(row)
    return pd.DataFrame(rows)


def test_scoring_known_precision_recall_and_lead() -> None:
    table = _table()
    calib = split_runs(table["run_id"].tolist(), table["turned"].tolist())
    y_cal = table["turned"].to_numpy()[calib]
    # Youden J on the calibration half: at 0.99 recall 1 minus the false alarms there; the chosen
    # threshold must come from the calibration half only.
    t = choose_threshold(table[calib], "train_acc", y_cal)
    assert t in (0.99, 1.0)
    res = score_indicators(table, ["train_acc"]).iloc[0]
    assert res["threshold"] == t
    ev = table[~calib]
    col = fire_column("train_acc", t)
    fired = ev[col].notna().to_numpy()
    y = ev["turned"].to_numpy()
    assert res["tp"] == int((fired & y).sum()) and res["fp"] == int((fired & ~y).sum())
    assert res["precision"] == pytest.approx(res["tp"] / (res["tp"] + res["fp"]))
    assert res["recall"] == pytest.approx(res["tp"] / y.sum())
    expected_lead = 3.0 if t == 0.99 else 1.0
    assert res["lead_median"] == expected_lead and res["early_share"] == 1.0
    assert res["n_eval"] == 8 and res["base_rate"] == 0.5


def test_threshold_never_tuned_on_the_evaluation_half() -> None:
    """Changing only evaluation-half runs must not change the chosen threshold."""
    table = _table()
    calib = split_runs(table["run_id"].tolist(), table["turned"].tolist())
    before = score_indicators(table, ["train_acc"]).iloc[0]["threshold"]
    poisoned = table.copy()
    for t in get_indicator("train_acc").grid:
        poisoned.loc[~calib, fire_column("train_acc", t)] = None
    assert score_indicators(poisoned, ["train_acc"]).iloc[0]["threshold"] == before


def test_exact_precision_recall_on_a_hand_built_table() -> None:
    """Four runs per half, firing chosen so precision = 1/2 and recall = 1/2 on evaluation."""
    ids = [f"run{i}" for i in range(8)]
    labels = [True, True, True, True, False, False, False, False]
    calib = split_runs(ids, labels)
    grid = get_indicator("train_acc").grid
    rows = []
    ev_pos = [i for i in range(8) if labels[i] and not calib[i]]
    ev_neg = [i for i in range(8) if not labels[i] and not calib[i]]
    for i in range(8):
        if calib[i]:
            fire = 4 if labels[i] else None  # perfect on calibration at every threshold
        else:
            fire = 4 if i in (ev_pos[0], ev_neg[0]) else None
        row: dict[str, object] = {"run_id": ids[i], "turned": labels[i], "t_L": 6}
        row.update({fire_column("train_acc", t): fire for t in grid})
        row["fire:train_acc"] = fire
        row["score:train_acc"] = 1.0 if fire else 0.0
        rows.append(row)
    res = score_indicators(pd.DataFrame(rows), ["train_acc"]).iloc[0]
    assert res["threshold"] == max(grid)
    assert (res["precision"], res["recall"], res["false_alarm_rate"]) == (0.5, 0.5, 0.5)
    assert res["auc"] == 0.5 and res["lead_median"] == 2.0


def test_every_indicator_evaluates_on_a_plain_history() -> None:
    out = evaluate_run(history([RISE_AT_6, RISE_AT_6], train_sparsity=[FLAT, FLAT]))
    for name in INDICATORS:
        assert fire_column(name) in out and f"score:{name}" in out
