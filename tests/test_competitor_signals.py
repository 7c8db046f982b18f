"""The trainer's validation split and its label-free competitor signals (issue 13)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from xai_sparsity import XaiSparsityError
from xai_sparsity.runs.rundir import RunDir
from xai_sparsity.training.trainer import TrainConfig, train

TINY = {
    "train_size": 40,
    "test_size": 40,
    "probe_size": 20,
    "widths": [4, 4],
    "hidden": 8,
    "batch_size": 16,
    "epochs": 3,
    "lr": 0.05,
    "array_every": 3,
    "spatial_images": 2,
}


def tiny(**changes: object) -> TrainConfig:
    return TrainConfig.from_dict({**TINY, **changes})


@pytest.fixture(scope="module")
def with_val(tmp_path_factory: pytest.TempPathFactory) -> RunDir:
    return train(tiny(val_size=30), tmp_path_factory.mktemp("val") / "run", progress=False)


@pytest.fixture(scope="module")
def without_val(tmp_path_factory: pytest.TempPathFactory) -> RunDir:
    return train(tiny(), tmp_path_factory.mktemp("noval") / "run", progress=False)


def test_val_columns_and_same_training(with_val: RunDir, without_val: RunDir) -> None:
    a, b = with_val.history(), without_val.history()
    assert "val_loss" in a.columns and "val_acc" in a.columns
    assert "val_loss" not in b.columns
    assert (a["val_loss"] > 0).all() and a["val_acc"].between(0, 1).all()
    # the validation split changes nothing else: same training images, same columns
    pd.testing.assert_frame_equal(a[list(b.columns)], b)
    assert [c for c in a.columns if not c.startswith("val_")] == list(b.columns)


def test_val_size_errors(tmp_path: Path) -> None:
    with pytest.raises(XaiSparsityError, match=r"val_size=-2"):
        tiny(val_size=-2)
    with pytest.raises(XaiSparsityError, match=r"val_size=4921 is more than the 4900 images"):
        train(tiny(val_size=4921), tmp_path / "run", progress=False)


def test_val_loss_is_the_loss_on_the_val_images(with_val: RunDir) -> None:
    import torch
    import torch.nn.functional as F

    from xai_sparsity.training.data import load_data
    from xai_sparsity.training.models import make_model

    cfg = tiny(val_size=30)
    data = load_data("mnist5k", train_size=40, test_size=40, probe_size=20, val_size=30)
    model = make_model(
        "cnn",
        num_classes=10,
        in_channels=1,
        image_size=(28, 28),
        widths=cfg.widths,
        hidden=cfg.hidden,
    )
    model.load_state_dict(with_val.load_checkpoint("last")["model"])
    x, y = data.val.tensors  # type: ignore[union-attr]
    with torch.no_grad():
        model.eval()
        loss = float(F.cross_entropy(model(x), y))
    assert np.isclose(with_val.history()["val_loss"].iloc[-1], loss, rtol=1e-5)


# ------------------------------------------------------------------------ competitor signals

SIGNAL_COLUMNS = ("confidence", "pred_entropy", "gsnr", "gsnr_median")


def test_signal_columns_present_and_in_range(without_val: RunDir) -> None:
    df = without_val.history()
    for col in SIGNAL_COLUMNS:
        assert col in df.columns, col
    layers = without_val.layers
    drift = df[[f"cka_drift:{layer}" for layer in layers]]
    assert drift.iloc[0].isna().all()  # no previous epoch
    assert drift.iloc[1:].notna().all().all()
    assert ((drift.iloc[1:] >= 0) & (drift.iloc[1:] <= 1)).all().all()
    assert df["confidence"].between(0.1, 1.0).all()  # 10 classes: max-softmax >= 1/10
    assert df["pred_entropy"].between(0.0, np.log(10) + 1e-9).all()
    assert (df["gsnr"] > 0).all() and (df["gsnr_median"] > 0).all()
    assert np.isfinite(df["gsnr"]).all()
    assert "ww_alpha" not in df.columns  # opt-in
    # every older column keeps its place: the new ones come after them
    new = [c for c in df.columns if c.startswith(("cka_drift:", *SIGNAL_COLUMNS))]
    assert list(df.columns[-len(new) :]) == new


def test_signals_read_no_test_labels(without_val: RunDir, tmp_path: Path) -> None:
    import torch
    from torch.utils.data import TensorDataset

    from xai_sparsity.training.data import load_data

    cfg = tiny()
    data = load_data("mnist5k", train_size=40, test_size=40, probe_size=20)
    x, y = data.test.tensors  # type: ignore[attr-defined]
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    data.test = TensorDataset(x, y[perm])
    px, py = data.probe.tensors  # type: ignore[attr-defined]
    data.probe = TensorDataset(px, (py + 1) % 10)  # probe labels are never read either
    other = train(cfg, tmp_path / "run", progress=False, data=data).history()
    ref = without_val.history()
    cols = [c for c in ref.columns if c.startswith(("cka_drift:", *SIGNAL_COLUMNS))]
    pd.testing.assert_frame_equal(other[cols], ref[cols])
    assert not np.allclose(other["test_loss"], ref["test_loss"])  # the labels did change


def test_probe_signals_are_cka_drift_of_the_pooled_maps() -> None:
    import torch
    from torch import nn

    from xai_sparsity.measuring.similarity import linear_cka
    from xai_sparsity.training.probe import ProbeSignals, probe_statistics

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 4))
    x = torch.randn(12, 1, 8, 8)
    signals = ProbeSignals()
    first, _ = probe_statistics(net, x, ["1"], signals=signals)
    assert np.isnan(first["cka_drift:1"])
    again, _ = probe_statistics(net, x, ["1"], signals=signals)
    assert again["cka_drift:1"] == pytest.approx(0.0, abs=1e-12)
    with torch.no_grad():
        before = torch.relu(net[0](x)).mean(dim=(2, 3))
        net[0].weight.mul_(-1.5)
        after = torch.relu(net[0](x)).mean(dim=(2, 3))
    moved, _ = probe_statistics(net, x, ["1"], signals=signals)
    expected = 1.0 - float(linear_cka(before, after))
    assert moved["cka_drift:1"] == pytest.approx(expected, abs=1e-6)
    with torch.no_grad():
        p = torch.softmax(net(x), dim=1)
    assert moved["confidence"] == pytest.approx(float(p.max(1).values.mean()), abs=1e-6)
    entropy = float(-(p * p.log()).sum(1).mean())
    assert moved["pred_entropy"] == pytest.approx(entropy, abs=1e-6)
    restored = ProbeSignals()
    restored.load_state_dict(signals.state_dict())
    assert restored.columns({"pooled": {"1": after}})["cka_drift:1"] == pytest.approx(0.0, abs=1e-9)


def test_gradient_noise_formula() -> None:
    import torch
    from torch import nn

    from xai_sparsity.training.trainer import GradientNoise

    class NoScaler:
        def is_enabled(self) -> bool:
            return False

    lin = nn.Linear(2, 1, bias=False)
    noise = GradientNoise(lin)
    for g in ([1.0, 2.0], [3.0, 2.0], [2.0, 2.0]):  # element 1: mean 2, var 1; element 2: var 0
        lin.weight.grad = torch.tensor([g])
        noise.update(NoScaler(), None)  # type: ignore[arg-type]
    out = noise.result()
    # signal (2^2 + 2^2) over noise (1 + 0); the median over the element with a variance: 4
    assert out["gsnr"] == pytest.approx(8.0) and out["gsnr_median"] == pytest.approx(4.0)


def test_gradient_noise_is_not_dominated_by_near_constant_elements() -> None:
    """Gradients that differ only in their last bits give the same gsnr to 1e-6."""
    import torch
    from torch import nn

    from xai_sparsity.training.trainer import GradientNoise

    class NoScaler:
        def is_enabled(self) -> bool:
            return False

    torch.manual_seed(0)
    steps = torch.randn(16, 1000)
    steps[:, :10] = 1.0 + 1e-7 * torch.randn(16, 10)  # near-constant elements
    results = []
    for bits in (0.0, 1.0):
        lin = nn.Linear(1000, 1, bias=False)
        noise = GradientNoise(lin)
        for g in steps:
            lin.weight.grad = (g * (1.0 + bits * 2e-7 * torch.randn(1000))).view(1, -1)
            noise.update(NoScaler(), None)  # type: ignore[arg-type]
        results.append(noise.result()["gsnr"])
    assert results[0] == pytest.approx(results[1], rel=1e-6)


def test_signals_setting_is_checked() -> None:
    with pytest.raises(XaiSparsityError, match=r"signals.*'ww_alfa'.*'ww_alpha'"):
        tiny(signals=["ww_alfa"])
    with pytest.raises(XaiSparsityError, match=r"ww_every=0"):
        tiny(ww_every=0)


def test_missing_weightwatcher_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "weightwatcher", None)
    with pytest.raises(XaiSparsityError, match=r"xai-sparsity\[study\]"):
        train(tiny(signals=["ww_alpha"]), tmp_path / "run", progress=False)


def test_ww_alpha_every_k_epochs_changes_no_other_column(
    without_val: RunDir, tmp_path: Path
) -> None:
    pytest.importorskip("weightwatcher")
    df = train(tiny(signals=["ww_alpha"], ww_every=2), tmp_path / "run", progress=False).history()
    ref = without_val.history()
    assert df["ww_alpha"].isna().tolist() == [True, False, False]  # epochs 2 and 3 (the last)
    assert df["ww_alpha"].iloc[1:].between(0.5, 50).all()
    pd.testing.assert_frame_equal(df[list(ref.columns)], ref)


def test_resume_with_val_and_all_signals_is_identical(tmp_path: Path) -> None:
    pytest.importorskip("weightwatcher")

    class Killed(Exception):
        pass

    def kill_after_2(row: dict) -> None:  # type: ignore[type-arg]
        if row["epoch"] == 2:
            raise Killed

    cfg = tiny(val_size=30, signals=["ww_alpha"], dropout=0.3, epochs=4)
    reference = train(cfg, tmp_path / "ref", progress=False).history()
    with pytest.raises(Killed):
        train(cfg, tmp_path / "run", progress=False, callbacks=[kill_after_2])
    resumed = train(cfg, tmp_path / "run", progress=False).history()
    pd.testing.assert_frame_equal(resumed, reference)
    assert resumed["cka_drift:features.relu1"].iloc[1:].notna().all()


def test_run_written_before_the_new_settings_still_resumes(tmp_path: Path) -> None:
    import json

    out = tmp_path / "run"
    first = train(tiny(epochs=1), out, progress=False)
    config = json.loads((out / "config.json").read_text())
    for key in ("val_size", "signals", "ww_every"):
        config.pop(key)
    (out / "config.json").write_text(json.dumps(config))
    again = train(tiny(epochs=1), out, progress=False)  # no "other settings" error
    pd.testing.assert_frame_equal(again.history(), first.history())
