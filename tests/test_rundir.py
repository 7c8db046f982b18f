"""The run-directory format: atomic writes, history append/replace/truncate, arrays, checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from xai_sparsity import XaiSparsityError
from xai_sparsity.base.files import atomic_open, atomic_write_json
from xai_sparsity.runs.rundir import RunDir, load_history


def test_history_append_replace_and_truncate(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "r", create=True)
    for epoch in (1, 2, 3):
        run.append_history(
            {
                "epoch": epoch,
                "train_loss": 1.0 / epoch,
                "test_loss": 0.5 + epoch,
                "sparsity:features.relu1": 0.1 * epoch,
                "correlation:features.relu1": 0.2,
            }
        )
    df = load_history(run.path)
    assert list(df.columns[:5]) == ["epoch", "train_loss", "train_acc", "test_loss", "test_acc"]
    assert df["epoch"].tolist() == [1, 2, 3]
    assert run.layers == ["features.relu1"]
    run.append_history({"epoch": 2, "train_loss": 9.0})  # re-logged epoch replaces the old row
    df = run.history()
    assert df["epoch"].tolist() == [1, 2, 3]
    assert df.loc[df["epoch"] == 2, "train_loss"].item() == 9.0
    run.save_arrays(3, {"channel:features.relu1": np.arange(4.0)})
    run.truncate_history(1)
    assert run.history()["epoch"].tolist() == [1]
    assert run.array_epochs() == []


def test_arrays_and_checkpoints_round_trip(tmp_path: Path) -> None:
    run = RunDir(tmp_path, create=True)
    run.save_arrays(5, {"correlation:c": np.eye(3)})
    run.save_arrays(10, {"correlation:c": 2 * np.eye(3)})
    assert run.array_epochs() == [5, 10]
    np.testing.assert_array_equal(run.load_arrays()["correlation:c"], 2 * np.eye(3))
    with pytest.raises(XaiSparsityError, match=r"epoch 7 has no arrays.*\[5, 10\]"):
        run.load_arrays(7)
    state = {"model": {"w": torch.ones(2)}, "epoch": 3}
    run.save_checkpoint(state)
    loaded = run.load_checkpoint()
    assert loaded["epoch"] == 3 and torch.equal(loaded["model"]["w"], torch.ones(2))
    with pytest.raises(XaiSparsityError, match=r"checkpoint 'best' does not exist.*\['last'\]"):
        run.load_checkpoint("best")
    assert not run.is_complete
    run.mark_complete({"best_acc": 0.9, "nan": float("nan")})
    assert run.is_complete and run.summary == {"best_acc": 0.9, "nan": None}


def test_half_written_file_is_never_read_back(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    atomic_write_json(path, {"lr": 0.1})
    with pytest.raises(RuntimeError), atomic_open(path) as fh:
        fh.write(b'{"lr": 0.')  # a crash in the middle of the write ...
        raise RuntimeError("killed")
    assert RunDir(tmp_path).config == {"lr": 0.1}  # ... leaves the previous complete file
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # and no temp file behind


def test_bad_run_directories(tmp_path: Path) -> None:
    with pytest.raises(XaiSparsityError, match="does not exist"):
        RunDir(tmp_path / "missing")
    with pytest.raises(XaiSparsityError, match="is not a run directory"):
        RunDir(tmp_path)
    run = RunDir(tmp_path, create=True)
    with pytest.raises(XaiSparsityError, match="needs an 'epoch'"):
        run.append_history({"train_loss": 1.0})
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(XaiSparsityError, match="not valid JSON"):
        _ = run.config
    assert os.listdir(tmp_path) == ["config.json"]
