"""t_L, t_s, the lead and the early-warning rule on constructed histories."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from xai_sparsity import XaiSparsityError
from xai_sparsity.runs.analysis import (
    DEFAULT_RULE,
    EarlyWarning,
    analyze,
    ema,
    gated_rise_epoch,
    gated_rise_score,
    levelled_off_epoch,
    overfitting_onset,
    smooth,
    sustained_rise_onset,
)


def _history(epochs: int = 40, turn: int = 20, rise_at: int = 15) -> pd.DataFrame:
    e = np.arange(1, epochs + 1)
    test_loss = 1.0 + 0.002 * (e - turn) ** 2
    deep = np.where(e < rise_at, 0.6, 0.6 + 0.02 * (e - rise_at)).clip(max=0.8)
    flat = np.full(epochs, 0.4)
    return pd.DataFrame(
        {
            "epoch": e,
            "train_loss": 1 / e,
            "train_acc": np.minimum(1, e / 10),
            "test_loss": test_loss,
            "test_acc": 0.9,
            "sparsity:conv1": flat,
            "sparsity:conv4": deep,
        }
    )


def test_ema_and_zero_phase_smoothing() -> None:
    np.testing.assert_allclose(ema([1, np.nan, 3], alpha=0.5), [1, 1, 2])
    x = np.r_[np.zeros(10), np.ones(10)]
    s = smooth(x, 0.3)
    assert abs(np.argmax(np.diff(s)) - 9) <= 1  # the step is not shifted later, unlike a causal EMA
    with pytest.raises(XaiSparsityError, match="alpha=0"):
        ema([1.0], alpha=0)


def test_onset_and_lead_on_a_constructed_run() -> None:
    df = _history()
    a = analyze(df)
    assert a.turned and a.t_L == 20
    assert a.t_s["conv1"] is None and a.lead["conv1"] is None
    assert a.t_s["conv4"] is not None and abs(a.t_s["conv4"] - 15) <= 1
    assert a.lead["conv4"] == a.t_L - a.t_s["conv4"] > 0
    # the default rule needs half the layers (1 of 2): it fires after the rise began, before t_L
    assert a.warning_epoch is not None and 15 < a.warning_epoch < 20
    assert a.warning_lead == 20 - a.warning_epoch
    assert analyze(df, min_layers=2).warning_epoch is None  # only 1 of 2 layers rises
    assert set(a.table()["layer"]) == {"conv1", "conv4"}
    assert "minimum at epoch 20" in str(a)


def test_no_turn_no_onset() -> None:
    loss = np.linspace(2, 1, 30)
    onset = overfitting_onset(loss)
    assert not onset.turned and onset.t_L == 30
    assert sustained_rise_onset(np.linspace(0.8, 0.5, 30)) is None


def test_early_warning_is_causal_and_fires_once() -> None:
    fired: list[int] = []
    w = EarlyWarning(
        ["a"],
        rule="ema_rise",
        alpha=1.0,
        patience=2,
        min_rise=0.05,
        warmup=0,
        callback=lambda epoch, info: fired.append(epoch),
    )
    series = [0.5, 0.5, 0.52, 0.56, 0.6, 0.7]
    results = [w.update(i + 1, {"a": v}) for i, v in enumerate(series)]
    assert results == [False, False, False, True, False, False]
    assert fired == [4] and w.fired_epoch == 4
    gated = EarlyWarning(
        ["a"], rule="ema_rise", alpha=1.0, patience=2, min_rise=0.05, warmup=0, min_train_acc=0.99
    )
    assert not any(gated.update(i + 1, {"a": v}, train_acc=0.5) for i, v in enumerate(series))


def test_bad_analysis_input() -> None:
    df = _history()
    with pytest.raises(XaiSparsityError, match=r"unknown analysis setting\(s\) \['alfa'\]"):
        analyze(df, alfa=0.3)
    with pytest.raises(XaiSparsityError, match=r"layer\(s\) \['conv9'\].*conv1"):
        analyze(df, ["conv9"])
    with pytest.raises(XaiSparsityError, match="measure 'hoyer' has no columns"):
        analyze(df, measure="hoyer")
    with pytest.raises(XaiSparsityError, match="no history rows"):
        analyze(df.iloc[:0])
    with pytest.raises(XaiSparsityError, match="watches layers"):
        EarlyWarning(["x"]).update(1, {"y": 0.1})
    with pytest.raises(XaiSparsityError, match="rule='gated' is not one of 'gated_rise'"):
        EarlyWarning(rule="gated")


def _curves(test_loss: np.ndarray, train_loss: np.ndarray | None = None) -> pd.DataFrame:
    n = len(test_loss)
    e = np.arange(1, n + 1)
    train = 0.05 + 2.0 * np.exp(-e / 4.0) if train_loss is None else train_loss
    return pd.DataFrame({"epoch": e, "train_loss": train, "test_loss": test_loss})


def test_label_run_overfits_clean_and_undetermined() -> None:
    from xai_sparsity.runs import LABEL_SETTINGS, RunLabel, label_run

    e = np.arange(1, 41)
    turned = label_run(_curves(1.0 + 0.002 * (e - 15) ** 2))
    assert isinstance(turned, RunLabel) and turned.label == "overfits" and turned.t_L == 15
    assert turned.rise > 0.05 and "turned" in turned.reason
    # converged, test loss levelled off: a clean negative
    plateau = label_run(_curves(0.4 + 1.5 * np.exp(-e / 4.0)))
    assert plateau.label == "clean" and plateau.converged and not plateau.still_learning
    assert plateau.peak_rise < LABEL_SETTINGS["flat_tol"]
    # still falling at the end (the v1 "negatives" with the minimum at the last epoch)
    falling = label_run(_curves(np.linspace(2.0, 1.0, 40)))
    assert falling.label == "undetermined" and falling.still_learning
    assert "still learning" in falling.reason and falling.t_L == 40
    # a borderline rise (3 %): neither overfits nor clean
    border = 0.4 + 1.5 * np.exp(-e / 4.0) + 0.03 * np.clip(e - 20, 0, None) / 20
    b = label_run(_curves(border))
    assert b.label == "undetermined" and 0.02 <= b.peak_rise < 0.05 and "borderline" in b.reason
    # test loss flat but the training loss still falling fast: not trained to convergence
    slow = label_run(_curves(0.4 + 1.5 * np.exp(-e / 4.0), train_loss=np.linspace(2, 0.2, 40)))
    assert slow.label == "undetermined" and not slow.converged and "convergence" in slow.reason
    # a rise that came back down is not clean: it turned once
    bump = 0.4 + 1.5 * np.exp(-e / 4.0) + 0.1 * np.exp(-(((e - 22) / 4.0) ** 2))
    bumped = label_run(_curves(bump))
    assert bumped.label == "undetermined" and bumped.peak_rise > 0.02 and bumped.rise == 0.0
    # a turn too close to the end is not yet "overfits"
    late = label_run(_curves(1.0 + 0.01 * np.clip(e - 38, 0, None) ** 2 + 0.01 * (40 - e) / 40))
    assert late.label != "overfits"


def test_label_run_needs_columns_and_epochs() -> None:
    from xai_sparsity.runs import label_run

    with pytest.raises(XaiSparsityError, match="test_loss"):
        label_run(pd.DataFrame({"epoch": [1, 2]}))
    short = label_run(_curves(np.array([1.0, 0.9, 0.8])))
    assert short.label == "undetermined" and "too few" in short.reason
    no_train = label_run(_curves(np.full(20, 0.5)).drop(columns="train_loss"))
    assert no_train.label == "undetermined" and not no_train.converged


def _learning_then(after: np.ndarray | None = None, epochs: int = 40) -> pd.DataFrame:
    """A run whose sparsity jumps by 0.1 during the learning phase (epochs 2-5, while the training
    loss falls steeply) and is flat afterwards, unless ``after`` (added from epoch 21) says so."""
    e = np.arange(1, epochs + 1)
    sparsity = 0.6 + 0.1 * np.clip((e - 1) / 4, 0, 1)
    if after is not None:
        sparsity = sparsity + after
    return pd.DataFrame(
        {
            "epoch": e,
            "train_loss": 0.02 + 2.0 * np.exp(-e / 3.0),
            "train_acc": 0.9,
            "test_loss": np.linspace(1.0, 0.5, epochs),  # never turns
            "sparsity:conv1": sparsity,
            "sparsity:conv2": sparsity,
        }
    )


def test_gated_rule_ignores_the_learning_phase() -> None:
    df = _learning_then()
    gate = levelled_off_epoch(df["train_loss"])
    assert gate is not None and 8 <= gate <= 16
    assert analyze(df, rule="ema_rise").warning_epoch == 4  # v1: fires in the learning phase
    assert gated_rise_epoch(df) is None and analyze(df).warning_epoch is None
    assert analyze(df).gate_epoch == gate
    # a rise after the training loss levelled off fires the repaired rule, on the raw values
    e = np.arange(1, 41)
    late = _learning_then(after=0.01 * np.clip(e - 20, 0, None))
    fired = gated_rise_epoch(late)
    assert fired == 24  # raw >= baseline + 0.02 from epoch 22 on, for patience = 3 epochs
    assert analyze(late).warning_epoch == 24
    # the score is the largest min_rise at which it still fires, exactly
    score = gated_rise_score(late)
    assert score == pytest.approx(0.18)
    assert gated_rise_epoch(late, min_rise=score) == 40
    assert gated_rise_epoch(late, min_rise=score + 1e-9) is None
    assert gated_rise_score(df) == pytest.approx(0.0)  # flat after the gate
    with pytest.raises(XaiSparsityError, match="min_rise"):
        gated_rise_score(late, min_rise=0.1)


def test_gated_rule_checks_patience_on_raw_values_and_never_reads_the_test_loss() -> None:
    e = np.arange(1, 41)
    spike = _learning_then(after=np.where((e >= 25) & (e <= 26), 0.1, 0.0))  # 2 epochs only
    assert gated_rise_epoch(spike) is None
    assert analyze(spike, rule="ema_rise", warmup=10).warning_epoch is not None  # the EMA kept it
    late = _learning_then(after=0.01 * np.clip(e - 20, 0, None))
    shuffled = late.assign(test_loss=np.random.default_rng(0).permutation(late["test_loss"]))
    assert gated_rise_epoch(shuffled) == gated_rise_epoch(late.drop(columns="test_loss")) == 24
    # min_layers: 2 of 2 layers needed, only one rises
    one = late.assign(**{"sparsity:conv2": _learning_then()["sparsity:conv2"]})
    assert gated_rise_epoch(one, min_layers=2) is None and gated_rise_epoch(one) == 24
    # the training loss never levels off: never fires, score -inf
    falling = late.assign(train_loss=np.linspace(3.0, 0.1, 40))
    assert gated_rise_epoch(falling) is None and gated_rise_score(falling) == -np.inf


def test_gated_rule_without_training_loss_warns_and_stays_silent() -> None:
    w = EarlyWarning(["a"])
    with pytest.warns(UserWarning, match="needs the training loss"):
        assert not any(w.update(i, {"a": 0.1 * i}) for i in range(1, 10))
    assert DEFAULT_RULE["rule"] == "gated_rise"


def test_a_run_that_did_not_turn_has_no_lead() -> None:
    e = np.arange(1, 41)
    late = _learning_then(after=0.01 * np.clip(e - 20, 0, None))
    a = analyze(late)
    assert not a.turned and a.warning_epoch == 24 and a.warning_lead is None
    assert all(v is None for v in a.lead.values()) and a.t_s["conv1"] is not None
    text = str(a)
    assert "the test loss did not turn" in text and "lead -" not in text and "lead 1" not in text
    assert "no lead" in text and "levelled off at epoch" in text
    assert a.to_dict()["warning_lead"] is None


def test_fixed_baseline_detector_and_gate_settings() -> None:
    from xai_sparsity.runs import LevelOffGate, RiseDetector

    det = RiseDetector(1.0, patience=2, min_rise=0.05, warmup=3, baseline="fixed")
    values = [0.9, 0.1, 0.5, 0.56, 0.5, 0.56, 0.57]  # epochs 1-2 before the gate are ignored
    assert [det.update(e, v) for e, v in enumerate(values, start=1)] == [False] * 6 + [True]
    assert det.baseline_value == 0.5 and det.onset_epoch == 6 and det.confirmed_epoch == 7
    assert not RiseDetector(1.0, 2, 0.05, 0, baseline="fixed").update(1, float("nan"))
    with pytest.raises(XaiSparsityError, match="baseline='min'"):
        RiseDetector(1.0, 2, 0.05, 0, baseline="min")
    with pytest.raises(XaiSparsityError, match="gate_window=0"):
        LevelOffGate(0.3, 0, 0.05)
    with pytest.raises(XaiSparsityError, match="gate_tol=-1"):
        LevelOffGate(0.3, 3, -1)
    flat = LevelOffGate(1.0, 2, 0.05)
    assert not any(flat.update(e, 1.0) for e in range(1, 10))  # never fell: never opens
