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
    assert list(a.columns[: len(b.columns)]) == list(b.columns)


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
