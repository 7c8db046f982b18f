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
    PLATEAU_ALPHA,
    PLATEAU_WINDOW,
    RunData,
    choose_threshold,
    confusion,
    cross_validated,
    evaluate_run,
    feature_layers,
    fire_column,
    get_indicator,
    max_qualifying_rise,
    run_labels,
    run_settings,
    score_indicators,
)
from xai_sparsity.study.stats import bootstrap_by_group

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
    w = EarlyWarning(LAYERS, rule="ema_rise", min_rise=0.02)
    fired = [w(row) for row in h[["epoch", *[f"sparsity:{n}" for n in LAYERS]]].to_dict("records")]
    expected = int(h["epoch"][int(np.argmax(fired))])
    assert get_indicator("ew_perplexity").firing_epoch(RunData(h)) == expected


def test_gated_indicator_is_the_repaired_rule_of_the_harness() -> None:
    from xai_sparsity.runs.analysis import gated_rise_epoch, gated_rise_score

    loss = [2.0, 1.0, 0.5, 0.3, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2]
    h = history([RISE_AT_6, RISE_AT_6]).assign(train_loss=loss)
    ind = get_indicator("gated_perplexity")
    for t in (0.02, 0.1, 0.3):
        assert ind.firing_epoch(RunData(h), t) == gated_rise_epoch(h, LAYERS, min_rise=t)
    assert ind.score(RunData(h)) == gated_rise_score(h, LAYERS)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0.0, 1.0), min_size=4, max_size=25),
    st.sampled_from([0.001, 0.005, 0.01, 0.02, 0.05, 0.1]),
)
def test_score_is_the_largest_threshold_that_fires(values: list[float], theta: float) -> None:
    epochs = np.arange(1, len(values) + 1)
    score = max_qualifying_rise(values, epochs)
    w = EarlyWarning(["a"], rule="ema_rise", min_rise=theta, min_layers=1)
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


def test_confusion_counts_timely_hits_late_firings_and_false_alarms() -> None:
    c = confusion(
        [6, 7, 3, None, 2, None, 5],
        ["overfits", "overfits", "overfits", "overfits", "clean", "clean", "undetermined"],
        [5, 5, 5, 5, 20, 20, 3],
    )
    # epoch 6 = t_L + 1 is a hit, epoch 7 is late (a miss), never firing is a miss.
    assert (c.tp, c.late, c.fn, c.fp, c.tn) == (2, 1, 2, 1, 1)
    assert (c.precision, c.recall, c.false_alarm_rate) == (2 / 3, 0.5, 0.5)


def _summary(fires: dict[str, dict[float, float | None]], **extra: list[object]) -> pd.DataFrame:
    """Summary rows for 'train_acc' from ``{run_id: {threshold: firing epoch}}``; the other
    thresholds of the grid never fire. Extra columns: ``label``, ``t_L``, ``setting`` lists."""
    grid = get_indicator("train_acc").grid
    rows = []
    for k, (run_id, by_t) in enumerate(fires.items()):
        row: dict[str, object] = {"run_id": run_id}
        row.update({key: values[k] for key, values in extra.items()})
        row.update({fire_column("train_acc", t): by_t.get(t) for t in grid})
        row["fire:train_acc"] = by_t.get(0.99)
        fired = [t for t in grid if by_t.get(t) is not None]
        row["score:train_acc"] = max(fired) if fired else 0.5
        rows.append(row)
    return pd.DataFrame(rows)


def test_hits_count_only_by_t_L_plus_one_and_false_alarms_any_time() -> None:
    table = _summary(
        {"a": {0.99: 6}, "b": {0.99: 7}, "c": {0.99: 40}, "d": {}},
        label=["overfits", "overfits", "clean", "clean"],
        t_L=[5, 5, 30, 30],
        setting=["s1", "s1", "s2", "s2"],
    )
    cv = cross_validated(table, "train_acc")
    assert cv["hit"].tolist() == [True, False, False, False]
    assert cv["false_alarm"].tolist() == [False, False, True, False]


def test_thresholds_come_from_the_other_settings_only() -> None:
    """Leave one setting out: changing one setting's runs never changes its own threshold."""
    grid = get_indicator("train_acc").grid
    fires = {}
    labels, settings_, t_L = [], [], []
    for s in range(4):
        for seed in range(2):
            pos = seed == 0
            # overfitting runs fire at 0.99 by t_L; clean runs fire at 0.98 and below only.
            fires[f"s{s}-{seed}"] = {t: 5 for t in grid if t <= (0.99 if pos else 0.98)}
            labels.append("overfits" if pos else "clean")
            settings_.append(f"s{s}")
            t_L.append(6)
    table = _summary(fires, label=labels, t_L=t_L, setting=settings_)
    cv = cross_validated(table, "train_acc")
    assert set(cv["threshold"]) == {0.99}
    assert cv["hit"].sum() == 4 and cv["false_alarm"].sum() == 0
    poisoned = table.copy()
    held = poisoned["setting"] == "s0"
    for t in grid:  # setting s0 now fires everywhere at every threshold
        poisoned.loc[held, fire_column("train_acc", t)] = 1
    cv2 = cross_validated(poisoned, "train_acc")
    assert cv2.loc[cv2["setting"] == "s0", "threshold"].tolist() == [0.99, 0.99]
    assert cv2.loc[cv2["setting"] == "s0", "false_alarm"].tolist() == [False, True]
    # the other settings now see s0's false alarm at every threshold, not only at 0.99
    assert choose_threshold(poisoned[~held], "train_acc") == 0.99


def test_scores_exclude_undetermined_and_runs_without_data() -> None:
    table = _summary(
        {"a": {0.99: 3}, "b": {}, "c": {0.99: 3}, "d": {}, "e": {0.99: 3}},
        label=["overfits", "clean", "overfits", "clean", "undetermined"],
        t_L=[5, 30, 5, 30, 5],
        setting=["x", "x", "y", "y", "z"],
    )
    table.loc[2, "score:train_acc"] = math.nan  # run c has no data for this indicator
    res = score_indicators(table, ["train_acc"], rounds=200).iloc[0]
    assert (res["n_runs"], res["n_excluded"], res["n_no_data"]) == (3, 1, 1)
    assert (res["n_overfits"], res["n_clean"], res["n_settings"]) == (1, 2, 2)


def test_precision_recall_auc_spearman_and_lead_on_a_hand_built_table() -> None:
    # 3 settings x 2 seeds; every threshold fires the same way, so LOSO keeps the default.
    grid = get_indicator("train_acc").grid
    fire_at = [4, 6, 8, None, 2, None]
    labels = ["overfits", "overfits", "overfits", "overfits", "clean", "clean"]
    t_L = [5, 6, 8, 9, 40, 40]
    fires = {f"r{i}": {t: f for t in grid} if f else {} for i, f in enumerate(fire_at)}
    table = _summary(fires, label=labels, t_L=t_L, setting=["a", "a", "b", "b", "c", "c"])
    table["score:train_acc"] = [0.9, 0.8, 0.7, 0.2, 0.6, 0.1]
    res = score_indicators(table, ["train_acc"], rounds=300).iloc[0]
    assert (res["tp"], res["late"], res["fp"], res["tn"]) == (3, 0, 1, 1)
    assert res["precision"] == 0.75 and res["recall"] == 0.75 and res["false_alarm_rate"] == 0.5
    from sklearn.metrics import roc_auc_score

    y = [lab == "overfits" for lab in labels]
    assert res["auc"] == pytest.approx(roc_auc_score(y, table["score:train_acc"]))
    assert res["spearman_fire_tL"] == pytest.approx(1.0)
    assert res["lead_median"] == 0.0  # leads 1, 0, 0
    for key in ("precision", "recall", "false_alarm_rate", "auc"):
        assert res[f"{key}_low"] <= res[key] <= res[f"{key}_high"]


def test_bootstrap_resamples_whole_settings() -> None:
    # two settings: one with two runs, one with one; a resample holds 2, 3 or 4 rows, never 1.
    reps = bootstrap_by_group(["a", "a", "b"], lambda rows: float(len(rows)), rounds=500)
    assert set(reps.tolist()) <= {2.0, 3.0, 4.0}
    # identical outcomes in every setting: the interval collapses onto the point estimate
    grid = get_indicator("train_acc").grid
    fires = {f"r{i}": ({t: 3 for t in grid} if i % 2 == 0 else {}) for i in range(8)}
    table = _summary(
        fires,
        label=["overfits", "clean"] * 4,
        t_L=[5, 30] * 4,
        setting=[f"s{i // 2}" for i in range(8)],
    )
    res = score_indicators(table, ["train_acc"], rounds=200).iloc[0]
    assert res["recall_low"] == res["recall_high"] == 1.0
    assert res["false_alarm_rate_low"] == res["false_alarm_rate_high"] == 0.0


def test_settings_from_run_ids_and_v1_labels() -> None:
    table = pd.DataFrame(
        {"run_id": ["g-base-lr=0.1-s0-abcdef", "g-base-lr=0.1-s1-123456"], "turned": [True, False]}
    )
    assert run_settings(table).tolist() == ["g-base-lr=0.1", "g-base-lr=0.1"]
    assert run_labels(table).tolist() == ["overfits", "undetermined"]


def _signals(n: int = 30) -> pd.DataFrame:
    e = np.arange(1, n + 1)
    return pd.DataFrame(
        {
            "epoch": e,
            "train_loss": 2.0 * np.exp(-e / 3.0) + 0.1,
            "train_acc": np.minimum(1.0, 0.5 + e / 20),
            "confidence": np.minimum(0.999, 0.5 + e / 40),
            "pred_entropy": 2.0 * np.exp(-e / 5.0),
            "cka_drift:features.relu1": np.r_[np.nan, 0.5 * np.exp(-e[1:] / 3.0)],
            "gsnr": np.r_[1.0, 2.0, 4.0, 4.0 / np.arange(1, n - 2)],
            "ww_alpha": np.where(e % 5 == 0, 6.0 - e / 6, np.nan),
            "sparsity:features.relu1": np.full(n, 0.5),
        }
    )


def test_competitor_signals_fire_in_their_a_priori_direction() -> None:
    h = _signals()
    out = evaluate_run(h, [n for n in INDICATORS if n not in ("channel_q90", "channel_std")])
    assert out[fire_column("confidence", 0.9)] == 16  # 0.5 + 16/40 = 0.9
    entropy = 2.0 * np.exp(-np.arange(1, 31) / 5.0)
    assert out[fire_column("pred_entropy", 0.1)] == int(np.argmax(entropy <= 0.1)) + 1
    assert out[fire_column("gsnr", 0.5)] == 4 + 1  # 4 / 2 = half of the running maximum 4
    assert out[fire_column("ww_alpha", 3.0)] == 20  # alpha 6 - 20/6 = 2.67 at epoch 20
    assert out[fire_column("fixed_epoch", 10)] == 10 and out[fire_column("fixed_epoch", 40)] is None
    assert out["fire:cka_drift"] is not None and out["fire:train_loss_plateau"] is not None
    # scores: higher fires more readily, so falling signals are scored by minus their minimum
    assert out["score:pred_entropy"] == pytest.approx(-entropy.min())
    missing = evaluate_run(h.drop(columns=["ww_alpha", "gsnr"]), ["ww_alpha", "gsnr"])
    assert missing["fire:ww_alpha"] is None and math.isnan(missing["score:ww_alpha"])
    assert math.isnan(missing["score:gsnr"])


def test_plateau_rule_reads_the_smoothed_training_loss_fall() -> None:
    from xai_sparsity.runs.analysis import ema

    h = _signals()
    s = ema(h["train_loss"].to_numpy(), PLATEAU_ALPHA)
    fall = (s[:-PLATEAU_WINDOW] - s[PLATEAU_WINDOW:]) / s[:-PLATEAU_WINDOW]
    assert (fall <= 0.05).any()
    first = int(np.argmax(fall <= 0.05)) + PLATEAU_WINDOW + 1
    assert evaluate_run(h, ["train_loss_plateau"])["fire:train_loss_plateau"] == first


def test_every_indicator_evaluates_on_a_plain_history() -> None:
    out = evaluate_run(history([RISE_AT_6, RISE_AT_6], train_sparsity=[FLAT, FLAT]))
    for name in INDICATORS:
        assert fire_column(name) in out and f"score:{name}" in out


def _run_history(overfits: bool, cross: int, n: int = 40) -> pd.DataFrame:
    """A converged run: its test loss turns at epoch 20 (``overfits``) or stays flat, and its
    probe confidence reaches 0.95 at epoch ``cross`` (never when ``cross`` is 0)."""
    e = np.arange(1, n + 1)
    train_loss = 2.0 * np.exp(-e / 3.0) + 0.05
    test_loss = 1.0 + 2.0 * np.exp(-e / 3.0)
    if overfits:
        test_loss = test_loss + 0.04 * np.maximum(0, e - 20)
    confidence = np.where(e >= cross, 0.97, 0.6) if cross else np.full(n, 0.6)
    return pd.DataFrame(
        {
            "epoch": e,
            "train_loss": train_loss,
            "train_acc": 1 - train_loss / 3,
            "test_loss": test_loss,
            "test_acc": np.full(n, 0.8),
            "confidence": confidence,
            "sparsity:features.relu1": np.full(n, 0.5),
        }
    )


def test_scoring_end_to_end_from_histories_with_known_labels() -> None:
    """Histories -> label_run -> evaluate_run -> score: a timely firing counts, a late one and a
    firing in a clean run do not; thresholds and intervals come by setting."""
    from xai_sparsity.runs.analysis import label_run

    runs = [  # (setting, overfits, confidence crossing epoch)
        ("a", True, 15), ("a", True, 18), ("b", True, 12), ("b", True, 30),
        ("c", False, 0), ("c", False, 0), ("d", False, 0), ("d", False, 35),
    ]  # fmt: skip
    rows = []
    for i, (setting, overfits, cross) in enumerate(runs):
        h = _run_history(overfits, cross)
        lab = label_run(h)
        assert lab.label == ("overfits" if overfits else "clean"), lab.reason
        row = {"run_id": f"r{i}", "setting": setting, "label": lab.label, "t_L": lab.t_L}
        rows.append({**row, **evaluate_run(h, ["confidence"])})
    table = pd.DataFrame(rows)
    res = score_indicators(table, ["confidence"], rounds=300).iloc[0]
    t_L = table["t_L"].to_numpy()
    assert (t_L[:4] == 17).all()  # the smoothed test loss's minimum, before the rise at 20
    # hits: crossing at 12, 15 and 18 (<= t_L + 1); 30 is late; one clean run fires at 35
    assert (res["tp"], res["late"], res["fn"], res["fp"], res["tn"]) == (3, 1, 1, 1, 3)
    assert (res["n_runs"], res["n_settings"], res["n_excluded"]) == (8, 4, 0)
    assert res["recall"] == 0.75 and res["false_alarm_rate"] == 0.25
    assert res["recall_low"] <= 0.75 <= res["recall_high"]


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.sampled_from([-np.inf, 0.0, 0.1, 0.5, 0.5, 1.0, np.inf]), min_size=2, max_size=30),
    st.integers(0, 2**31),
)
def test_bootstrap_auc_equals_scikit_learns(scores: list[float], seed: int) -> None:
    from sklearn.metrics import roc_auc_score

    from xai_sparsity.study.indicators import rank_auc

    s = np.array(scores)
    y = np.random.default_rng(seed).random(len(s)) < 0.5
    if y.all() or not y.any():
        assert math.isnan(rank_auc(s, y))
        return
    finite = np.where(s == -np.inf, -9.0, np.where(s == np.inf, 9.0, s))
    assert rank_auc(s, y) == pytest.approx(roc_auc_score(y, finite))
