"""One probe pipeline: ``xai-sparsity train`` and ``SparsityMonitor`` write the same columns.

Three runs of the command with 1, 2 and 3 epochs (same seed, so the first epochs of every run
are the same computation: the k-epoch run's ``checkpoints/last.pt`` holds the weights after epoch
k of the 3-epoch run) are replayed through a SparsityMonitor on the same probe images. Every
measured column of every epoch must come out identical.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from xai_sparsity.runs.rundir import RunDir
from xai_sparsity.training.data import load_data
from xai_sparsity.training.models import make_model
from xai_sparsity.training.monitor import SparsityMonitor
from xai_sparsity.training.trainer import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "train_size": 64,
    "test_size": 64,
    "probe_size": 48,
    "widths": [4, 6],
    "hidden": 8,
    "batch_size": 16,
    "lr": 0.05,
    "array_every": 2,
    "spatial_images": 3,
    "eval_batch_size": 20,  # several probe batches: the streaming sums are exercised
    "device": "cpu",
}
MEASURED = ("sparsity", "sparsity_std", "zero_fraction", "hoyer", "entropy")
MEASURED += ("correlation", "dead", "lifetime")
EPOCHS = (1, 2, 3)


def _train_with_the_command(tmp_path: Path) -> dict[int, Path]:
    """Run ``xai-sparsity train`` for 1, 2 and 3 epochs side by side; {epochs: run dir}."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    runs, procs = {}, []
    for epochs in EPOCHS:
        runs[epochs] = tmp_path / f"e{epochs}"
        sets = [f"{k}={v}" for k, v in {**SETTINGS, "epochs": epochs}.items()]
        argv = [sys.executable, "-m", "xai_sparsity.cli", "train", "--out", str(runs[epochs])]
        argv += [a for s in sets for a in ("--set", s.replace(" ", ""))] + ["--quiet"]
        procs.append(
            subprocess.Popen(
                argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
        )
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()
    return runs


def _replay(run: RunDir, probe: torch.Tensor, out: Path, cfg: TrainConfig) -> pd.Series:
    """The history row that a SparsityMonitor writes for the weights in ``last.pt``."""
    epoch = int(run.load_checkpoint("last")["epoch"])
    monitor = SparsityMonitor(
        _model_of(run, cfg),
        probe,
        out=out,
        spatial_images=cfg.spatial_images,
        batch_size=cfg.eval_batch_size,
        array_every=0,
        warning=False,
    )
    monitor.epoch_end(epoch)
    return RunDir(out).history().set_index("epoch").loc[epoch]


@pytest.mark.skipif(
    sys.platform == "win32", reason="the command runs in subprocesses; POSIX paths assumed"
)
def test_trainer_and_monitor_write_identical_rows(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    runs = _train_with_the_command(tmp_path)
    cfg = TrainConfig.from_dict({**SETTINGS, "epochs": max(EPOCHS)})
    data = load_data(
        cfg.data, train_size=cfg.train_size, test_size=cfg.test_size, probe_size=cfg.probe_size
    )
    probe = torch.stack([data.probe[i][0] for i in range(len(data.probe))])
    train_probe = torch.stack([data.train_probe[i][0] for i in range(len(data.train_probe))])
    full = RunDir(runs[max(EPOCHS)]).history().set_index("epoch")
    layers = RunDir(runs[max(EPOCHS)]).layers
    assert layers == ["features.relu1", "features.relu2", "classifier.relu"]
    worst = 0.0
    for epochs, path in runs.items():
        trainer_row = RunDir(path).history().set_index("epoch").loc[epochs]
        # the k-epoch run is the first k epochs of the longest one
        pd.testing.assert_series_equal(trainer_row, full.loc[epochs], check_names=False)
        replay = _replay(RunDir(path), probe, tmp_path / f"monitor{epochs}", cfg)
        columns = [f"{p}:{n}" for n in layers for p in MEASURED]
        assert set(columns) <= set(replay.index)
        got = replay[columns].to_numpy(dtype=float)
        want = trainer_row[columns].to_numpy(dtype=float)
        worst = max(worst, float(np.abs(got - want).max()))
        np.testing.assert_array_equal(got, want)
        # the trainer's train_sparsity is the same pass on the training inputs
        SparsityMonitor(
            _model_of(RunDir(path), cfg),
            train_probe,
            out=tmp_path / f"train{epochs}",
            measures=("perplexity",),
            correlation=False,
            batch_size=cfg.eval_batch_size,
            array_every=0,
            warning=False,
        ).epoch_end(epochs)
        light = RunDir(tmp_path / f"train{epochs}").history().set_index("epoch").loc[epochs]
        for n in layers:
            assert light[f"sparsity:{n}"] == trainer_row[f"train_sparsity:{n}"]
    assert worst == 0.0
    # the competitor signals: one monitor replays the three checkpoints in order
    model = _model_of(RunDir(runs[1]), cfg)
    monitor = SparsityMonitor(
        model,
        probe,
        out=tmp_path / "signals",
        batch_size=cfg.eval_batch_size,
        array_every=0,
        warning=False,
        signals=True,
    )
    for epochs, path in runs.items():
        model.load_state_dict(RunDir(path).load_checkpoint("last")["model"])
        monitor.epoch_end(epochs)
    replayed = RunDir(tmp_path / "signals").history().set_index("epoch")
    columns = ["confidence", "pred_entropy", *(f"cka_drift:{n}" for n in layers)]
    pd.testing.assert_frame_equal(replayed[columns], full[columns])


def _model_of(run: RunDir, cfg: TrainConfig) -> torch.nn.Module:
    model = make_model(
        cfg.model,
        num_classes=10,
        in_channels=1,
        image_size=28,
        widths=cfg.widths,
        hidden=cfg.hidden,
    )
    model.load_state_dict(run.load_checkpoint("last")["model"])
    return model


def test_probe_statistics_and_monitor_agree_to_the_last_bit(tmp_path: Path) -> None:
    """In memory (no CSV rounding): the trainer's probe and the monitor's pass give the same
    floats and the same arrays."""
    from xai_sparsity.training.probe import probe_statistics

    torch.manual_seed(0)
    model = make_model("cnn", num_classes=10, in_channels=1, image_size=28, widths=[4, 6], hidden=8)
    data = load_data("mnist5k", train_size=32, test_size=32, probe_size=30)
    probe = torch.stack([data.probe[i][0] for i in range(len(data.probe))])
    monitor = SparsityMonitor(
        model, probe, out=tmp_path, spatial_images=3, batch_size=8, array_every=1, warning=False
    )
    result = monitor.measure(arrays=True)
    cols, arrays = probe_statistics(
        model, probe, monitor.layers, arrays=True, spatial_images=3, batch_size=8
    )
    assert cols == result["scalars"]
    assert arrays.keys() == result["arrays"].keys()
    for key, value in arrays.items():
        np.testing.assert_array_equal(value, result["arrays"][key], err_msg=key)


def test_correlation_over_images_is_the_mean_abs_r_of_channel_means() -> None:
    """``correlation_images:`` is filter correlation over images (claim 4's density-free check)."""
    import torch
    from torch import nn

    from xai_sparsity.measuring.correlation import correlation_summary, filter_correlation
    from xai_sparsity.training.probe import ProbeSettings, probe_pass

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6 * 6, 2))
    x = torch.rand(40, 1, 8, 8)
    result = probe_pass(net, x, ["1"], ProbeSettings(), arrays=False)
    with torch.no_grad():
        maps = net[1](net[0](x))
    expected = correlation_summary(filter_correlation(maps, over="images"))
    got = result["scalars"]["correlation_images:1"]
    assert abs(got - expected) < 1e-5, (got, expected)
    names = list(result["scalars"])
    assert names.index("correlation_images:1") > names.index("lifetime:1")  # after older columns
