"""SparsityMonitor: a user's own loop writes the run-directory format, resumes, leaves the model
untouched, warns live, tracks training batches, logs to TensorBoard and fails clearly."""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from xai_sparsity import XaiSparsityError
from xai_sparsity.capturing.hooks import capture
from xai_sparsity.measuring.correlation import CorrelationAccumulator
from xai_sparsity.measuring.measures import compute_measure, lifetime_sparsity, perplexity_sparsity
from xai_sparsity.runs.analysis import analyze
from xai_sparsity.runs.rundir import RunDir
from xai_sparsity.training.monitor import SparsityMonitor, fused_layer_stats

ROOT = Path(__file__).resolve().parents[1]
LAYER_PREFIXES = ("sparsity", "sparsity_std", "zero_fraction", "hoyer", "entropy")


def small_cnn(batch_norm: bool = False, dropout: float = 0.0) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(1, 6, 3, padding=1)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(6))
    layers += [nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU()]
    layers += [nn.Flatten(), nn.Dropout(dropout), nn.Linear(8 * 6 * 6, 3)]
    return nn.Sequential(*layers)


def toy_data(n: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.rand(n, 1, 12, 12, generator=g) * 0.3
    for k in range(3):  # a class-dependent bright square: learnable in a few steps
        x[y == k, :, 2 + 3 * k : 5 + 3 * k, 2:8] += 1.0
    return x, y


def train_epoch(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> float:
    model.train()
    total = 0.0
    for i in range(0, len(x), 16):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[i : i + 16]), y[i : i + 16])
        loss.backward()
        opt.step()
        total += loss.item()
    return total / ((len(x) + 15) // 16)


def test_plain_loop_writes_a_run_that_analysis_and_figures_read(tmp_path: Path) -> None:
    x, y = toy_data()
    probe, probe_y = toy_data(20, seed=1)
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = tmp_path / "run"
    monitor = SparsityMonitor(model, (probe, probe_y), out=out, array_every=2, spatial_images=3)
    for epoch in range(1, 5):
        tl = train_epoch(model, opt, x, y)
        with torch.no_grad():
            vl = float(nn.functional.cross_entropy(model(probe), probe_y))
        row = monitor.epoch_end(epoch, train_loss=tl, test_loss=vl, lr=0.1)
    monitor.finish()

    run = RunDir(out)
    layers = ["1", "4"]  # the activation modules by default, as the trainer measures
    assert run.layers == layers == monitor.layers
    df = run.history()
    assert df["epoch"].tolist() == [1, 2, 3, 4]
    assert list(df.columns[:5]) == ["epoch", "train_loss", "train_acc", "test_loss", "test_acc"]
    for name in layers:
        for prefix in (*LAYER_PREFIXES, "correlation", "dead", "lifetime"):
            assert f"{prefix}:{name}" in df.columns
        assert df[f"sparsity:{name}"].between(0, 1).all()
    assert "lr" in df.columns and row["lr"] == 0.1
    assert run.config["source"] == "monitor" and run.config["layers"] == layers
    assert run.array_epochs() == [1, 2, 4]
    arrays = run.load_arrays(4)
    assert arrays["layer:1"].shape == (20,)
    assert arrays["channel:1"].shape == (6,)
    assert arrays["spatial:1"].shape == (3, 12, 12)
    assert arrays["correlation:4"].shape == (8, 8)
    assert arrays["lifetime:4"].shape == (8,)
    assert "spatial:1" in arrays and "channel:1" in arrays
    probe_npz = run.load_probe()
    assert probe_npz["images"].shape == (3, 1, 12, 12)
    assert probe_npz["labels"].tolist() == probe_y[:3].tolist()
    assert run.is_complete and run.summary["source"] == "monitor"

    result = analyze(out)
    assert set(result.t_s) == set(layers)
    from xai_sparsity.views import figures as figures

    fig = figures.plot_loss_and_sparsity(out)
    fig2 = figures.plot_sparsity_heatmap(out)
    import matplotlib.pyplot as plt

    plt.close(fig)
    plt.close(fig2)


def test_values_match_the_measures_module(tmp_path: Path) -> None:
    model = small_cnn().eval()
    probe, _ = toy_data(10)
    monitor = SparsityMonitor(model, probe, out=tmp_path, batch_size=4, spatial_images=2)
    row = monitor.epoch_end(1)
    with capture(model, None, mode="keep") as cap, torch.no_grad():
        model(probe)
    for name in monitor.layers:
        act = cap.activations[name]
        pp = perplexity_sparsity(act, "layer").double()
        assert row[f"sparsity:{name}"] == pytest.approx(float(pp.mean()), abs=1e-5)
        assert row[f"sparsity_std:{name}"] == pytest.approx(float(pp.std(unbiased=False)), abs=1e-5)
        for m in ("zero_fraction", "hoyer", "entropy"):
            ref = float(compute_measure(m, act, "layer").double().mean())
            assert row[f"{m}:{name}"] == pytest.approx(ref, abs=1e-5)
        arr = monitor.last_arrays
        ch = perplexity_sparsity(act, "channel").mean(0).numpy()
        np.testing.assert_allclose(arr[f"channel:{name}"], ch, atol=1e-5)
        sp = perplexity_sparsity(act[:2], "spatial").numpy()
        np.testing.assert_allclose(arr[f"spatial:{name}"], sp, atol=1e-5)
        ref_corr = CorrelationAccumulator(over="positions")
        ref_corr.update(act)
        np.testing.assert_allclose(arr[f"correlation:{name}"], ref_corr.correlation(), atol=1e-5)
        assert row[f"correlation:{name}"] == pytest.approx(ref_corr.mean_abs(), abs=1e-6)
        assert row[f"dead:{name}"] == ref_corr.num_dead
        life = lifetime_sparsity(act).numpy()
        np.testing.assert_allclose(arr[f"lifetime:{name}"], life, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 3),
    c=st.integers(1, 4),
    hw=st.integers(1, 4),
    zero_share=st.floats(0.0, 1.0),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 10_000),
)
def test_fused_stats_equal_the_reference_measures(
    b: int, c: int, hw: int, zero_share: float, scale: float, seed: int
) -> None:
    if c * hw * hw < 2:
        return
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, hw, hw, generator=g) * scale
    x[torch.rand(x.shape, generator=g) < zero_share] = 0.0
    got = fused_layer_stats(x)
    for m in ("perplexity", "entropy", "hoyer", "zero_fraction"):
        ref = compute_measure(m, x, "layer")
        torch.testing.assert_close(got[m], ref, atol=2e-5, rtol=0)
    if hw * hw >= 2:
        torch.testing.assert_close(
            got["channel"], perplexity_sparsity(x, "channel"), atol=2e-5, rtol=0
        )
    flat = x.reshape(b, -1)
    torch.testing.assert_close(fused_layer_stats(flat)["perplexity"], perplexity_sparsity(flat))


def test_restart_continues_the_same_history(tmp_path: Path) -> None:
    x, y = toy_data()
    probe, _ = toy_data(12, seed=1)
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    first = SparsityMonitor(model, probe, out=tmp_path, array_every=1, correlation=False)
    rows = {}
    for epoch in (1, 2, 3):
        rows[epoch] = first.epoch_end(
            epoch, train_loss=train_epoch(model, opt, x, y), test_loss=1.0
        )
    del (
        first
    )  # the process "dies" after epoch 3 was written; epoch 3 is re-run from the epoch-2 state
    second = SparsityMonitor(model, probe, out=tmp_path, array_every=1, correlation=False)
    second.epoch_end(3, train_loss=0.5, test_loss=0.9)
    second.epoch_end(4, train_loss=0.4, test_loss=0.95)
    df = RunDir(tmp_path).history()
    assert df["epoch"].tolist() == [1, 2, 3, 4]
    assert df.loc[df.epoch == 3, "train_loss"].item() == 0.5  # replaced, not duplicated
    assert df.loc[df.epoch == 1, "sparsity:1"].item() == pytest.approx(rows[1]["sparsity:1"])
    assert RunDir(tmp_path).array_epochs() == [1, 2, 3, 4]
    # re-logging an earlier epoch drops it and everything after it
    second.epoch_end(2, train_loss=0.3)
    assert RunDir(tmp_path).history()["epoch"].tolist() == [1, 2]
    assert RunDir(tmp_path).array_epochs() == [1, 2]


def _snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    return {
        "flags": [m.training for m in model.modules()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "opt": copy.deepcopy(opt.state_dict()),
        "rng": torch.get_rng_state(),
        "grad_enabled": torch.is_grad_enabled(),
    }


def _assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["flags"] == b["flags"]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k
    for ga, gb in zip(a["grads"], b["grads"], strict=True):
        assert (ga is None and gb is None) or torch.equal(ga, gb)
    assert str(a["opt"]) == str(b["opt"])
    assert torch.equal(a["rng"], b["rng"])
    assert a["grad_enabled"] == b["grad_enabled"]


@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
def test_measuring_leaves_model_optimizer_and_rng_untouched(tmp_path: Path, mode: str) -> None:
    model = small_cnn(batch_norm=True, dropout=0.5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = toy_data(16)
    train_epoch(model, opt, x, y)  # BN statistics and Adam moments are non-trivial now
    if mode == "eval":
        model.eval()
    elif mode == "mixed":
        model.train()
        model[1].eval()  # BatchNorm frozen by the user, the rest training
    else:
        model.train()
    probe, _ = toy_data(10, seed=2)
    loader = DataLoader(TensorDataset(probe), batch_size=4, shuffle=True)
    monitor = SparsityMonitor(model, loader, out=tmp_path, train_stats_every=1)
    before = _snapshot(model, opt)
    monitor.epoch_end(1, train_loss=1.0)
    monitor.epoch_end(2, train_loss=1.0)
    _assert_same(before, _snapshot(model, opt))
    monitor.close()
    for m in model.modules():  # no hooks left behind
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_probe_kinds_give_the_same_probe(tmp_path: Path) -> None:
    model = small_cnn().eval()
    probe, labels = toy_data(9)
    rng = torch.get_rng_state()
    loader = DataLoader(TensorDataset(probe, labels), batch_size=4, shuffle=False)
    a = SparsityMonitor(model, probe, out=tmp_path / "a", correlation=False)
    b = SparsityMonitor(model, TensorDataset(probe, labels), out=tmp_path / "b", correlation=False)
    c = SparsityMonitor(model, loader, out=tmp_path / "c", correlation=False)
    assert torch.equal(torch.get_rng_state(), rng)
    for m in (b, c):
        assert torch.equal(m.probe, a.probe)
        assert m.probe_labels is not None and torch.equal(m.probe_labels, labels)
    ra, rc = a.epoch_end(1), c.epoch_end(1)
    assert ra["sparsity:4"] == pytest.approx(rc["sparsity:4"])


def test_bad_arguments_give_clear_errors(tmp_path: Path) -> None:
    model = small_cnn()
    probe, _ = toy_data(4)
    with pytest.raises(XaiSparsityError, match="empty"):
        SparsityMonitor(model, torch.zeros(0, 1, 12, 12), out=tmp_path)
    with pytest.raises(XaiSparsityError, match="empty"):
        SparsityMonitor(model, TensorDataset(torch.zeros(0, 1, 12, 12)), out=tmp_path)
    with pytest.raises(XaiSparsityError, match="no batches"):
        SparsityMonitor(model, DataLoader(TensorDataset(torch.zeros(0, 1, 12, 12))), out=tmp_path)
    with pytest.raises(XaiSparsityError, match=r"\(4, 3, 12, 12\).*in_channels=1"):
        SparsityMonitor(model, torch.rand(4, 3, 12, 12), out=tmp_path)
    with pytest.raises(XaiSparsityError, match="matches no submodule"):
        SparsityMonitor(model, probe, layers="features.*", out=tmp_path)
    with pytest.raises(XaiSparsityError, match="'perplexity'"):
        SparsityMonitor(model, probe, out=tmp_path, measures=("hoyer",))
    with pytest.raises(XaiSparsityError, match="hoyr"):
        SparsityMonitor(model, probe, out=tmp_path, measures=("perplexity", "hoyr"))
    with pytest.raises(XaiSparsityError, match="scope='chanel'"):
        SparsityMonitor(model, probe, out=tmp_path, scopes=("chanel",))
    with pytest.raises(XaiSparsityError, match="every=0"):
        SparsityMonitor(model, probe, out=tmp_path, every=0)
    with pytest.raises(XaiSparsityError, match="probe must be"):
        SparsityMonitor(model, "images.npy", out=tmp_path)
    with pytest.raises(XaiSparsityError, match="labels"):
        SparsityMonitor(model, (probe, torch.zeros(3)), out=tmp_path)
    monitor = SparsityMonitor(model, probe, out=tmp_path / "ok", correlation=False)
    with pytest.raises(XaiSparsityError, match="1-based"):
        monitor.epoch_end(0)
    other = RunDir(tmp_path / "trainer_run", create=True)
    other.write_config({"source": "train"})
    with pytest.raises(XaiSparsityError, match="another out"):
        SparsityMonitor(model, probe, out=other.path)


def test_every_and_array_every(tmp_path: Path) -> None:
    model = small_cnn()
    probe, _ = toy_data(4)
    monitor = SparsityMonitor(model, probe, out=tmp_path, every=2, array_every=0, correlation=False)
    rows = [monitor.epoch_end(e, test_loss=1.0) for e in range(1, 5)]
    assert [bool(r) for r in rows] == [False, True, False, True]
    assert RunDir(tmp_path).history()["epoch"].tolist() == [2, 4]
    assert RunDir(tmp_path).array_epochs() == []
    assert "correlation:1" not in rows[1] and "dead:1" not in rows[1]


class _Sparsifier(nn.Module):
    """conv -> ReLU whose bias we push down epoch by epoch: sparsity rises for sure."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv(x))


def test_early_warning_calls_back_and_can_stop(tmp_path: Path) -> None:
    model = _Sparsifier()
    probe = torch.rand(16, 1, 8, 8)
    calls: list[tuple[int, dict[str, Any]]] = []

    def on_warning(monitor: SparsityMonitor, epoch: int, info: dict[str, Any]) -> bool:
        calls.append((epoch, info))
        return True

    monitor = SparsityMonitor(
        model,
        probe,
        layers="relu",
        out=tmp_path,
        correlation=False,
        on_warning=on_warning,
        warning={
            "rule": "ema_rise",
            "alpha": 1.0,
            "patience": 2,
            "min_rise": 0.02,
            "warmup": 0,
            "min_layers": 1,
        },
    )
    stopped_at = None
    with torch.no_grad():
        model.conv.weight.fill_(0.1)
        model.conv.bias.fill_(0.0)
    for epoch in range(1, 10):
        monitor.epoch_end(epoch, test_loss=1.0)
        if monitor.should_stop:
            stopped_at = epoch
            break
        with torch.no_grad():
            model.conv.bias -= 0.08
    assert stopped_at is not None and stopped_at == monitor.warning_epoch
    assert len(calls) == 1 and calls[0][0] == stopped_at
    assert "relu" in calls[0][1]["layers"]
    assert calls[0][1]["message"].startswith(f"Early warning at epoch {stopped_at}: the smoothed")
    assert "likely" not in calls[0][1]["message"]
    # a restarted monitor replays the history and does not fire again for the past
    again = SparsityMonitor(
        model,
        probe,
        layers="relu",
        out=tmp_path,
        correlation=False,
        warning={
            "rule": "ema_rise",
            "alpha": 1.0,
            "patience": 2,
            "min_rise": 0.02,
            "warmup": 0,
            "min_layers": 1,
        },
    )
    assert again.warning_epoch == stopped_at


def test_default_early_warning_waits_for_the_training_loss_to_level_off(tmp_path: Path) -> None:
    model = _Sparsifier()
    probe = torch.rand(16, 1, 8, 8)
    monitor = SparsityMonitor(
        model,
        probe,
        layers="relu",
        out=tmp_path,
        correlation=False,
        warning={"alpha": 1.0, "min_layers": 1},
    )
    with torch.no_grad():
        model.conv.weight.fill_(0.1)
        model.conv.bias.fill_(0.0)
    train_loss = [2.0, 1.0, 0.5, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3]
    for epoch, loss in enumerate(train_loss, start=1):
        monitor.epoch_end(epoch, train_loss=loss, test_loss=1.0)
        with torch.no_grad():
            model.conv.bias -= 0.08  # sparsity rises every epoch, also while learning
    info = monitor.warning_info
    assert monitor.warning_epoch is not None and info is not None
    gate = info["gate_epoch"]
    assert gate == 7 and monitor.warning_epoch == gate + 3  # 3 epochs above the gate value
    assert "after the training loss levelled off at epoch" in info["message"]


def test_training_batch_statistics(tmp_path: Path) -> None:
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    probe, _ = toy_data(4, seed=3)
    x, y = toy_data(16)
    monitor = SparsityMonitor(model, probe, out=tmp_path, correlation=False)
    expected: list[float] = []
    with monitor.track_training(every=2):
        for step in range(4):
            model.train()
            if step % 2 == 0:
                with capture(model, "1", mode="reduce") as cap, torch.no_grad():
                    model(x[step * 4 : step * 4 + 4])
                expected.append(float(cap.stats["1"]["perplexity:layer"].mean()))
            opt.zero_grad()
            nn.functional.cross_entropy(
                model(x[step * 4 : step * 4 + 4]), y[step * 4 : step * 4 + 4]
            ).backward()
            opt.step()
    row = monitor.epoch_end(1)
    assert row["train_batch_sparsity:1"] == pytest.approx(np.mean(expected), abs=1e-5)
    assert set(k.split(":")[1] for k in row if k.startswith("train_batch")) == set(monitor.layers)
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    # the next epoch starts from zero: no tracked steps -> no train_batch columns in the row
    assert not any(k.startswith("train_batch") for k in monitor.epoch_end(2))


@pytest.mark.parametrize("arch", ["resnet18", "vgg11"])
def test_torchvision_models(tmp_path: Path, arch: str) -> None:
    import torchvision

    if arch == "vgg11":  # built on the meta device: its 100M-weight classifier is replaced anyway
        with torch.device("meta"):
            model = torchvision.models.vgg11(num_classes=3)
        model.avgpool = nn.AdaptiveAvgPool2d(1)
        model.classifier = nn.Linear(512, 3, device="meta")
        model = model.to_empty(device="cpu")
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.reset_parameters()
    else:
        model = torchvision.models.resnet18(num_classes=3)
    layers = "layer1.*" if arch == "resnet18" else None  # VGG: its ReLUs (the default)
    monitor = SparsityMonitor(
        model, torch.rand(3, 3, 32, 32), layers=layers, out=tmp_path, spatial_images=2
    )
    row = monitor.epoch_end(1, test_loss=1.0)
    if arch == "resnet18":  # the block's ReLU runs twice per forward: one column per call
        assert "sparsity:layer1.0.relu#0" in row and "sparsity:layer1.0.relu#1" in row
    assert RunDir(tmp_path).layers == monitor.layers
    assert all(0 <= row[f"sparsity:{n}"] <= 1 for n in monitor.layers)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda(tmp_path: Path) -> None:
    model = small_cnn(batch_norm=True).cuda()
    probe, _ = toy_data(8)
    monitor = SparsityMonitor(model, probe, out=tmp_path)
    row = monitor.epoch_end(1)
    cpu = SparsityMonitor(model.cpu(), probe, out=tmp_path / "cpu").epoch_end(1)
    for k, v in cpu.items():
        assert row[k] == pytest.approx(v, abs=1e-4), k


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="needs tensorboard")
def test_tensorboard_scalars_and_histograms(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = small_cnn()
    probe, _ = toy_data(6)
    monitor = SparsityMonitor(
        model, probe, out=tmp_path / "run", correlation=False, log_to_tensorboard=tmp_path / "tb"
    )
    monitor.epoch_end(1)
    monitor.epoch_end(2)
    monitor.close()
    ea = EventAccumulator(str(tmp_path / "tb"))
    ea.Reload()
    assert "sparsity/1" in ea.Tags()["scalars"]
    assert [e.step for e in ea.Scalars("sparsity/1")] == [1, 2]
    assert "sparsity_per_sample/1" in ea.Tags()["histograms"]

    from xai_sparsity.integrations.tensorboard import export_run

    n = export_run(tmp_path / "run", tmp_path / "tb_export")
    assert n > 0
    ex = EventAccumulator(str(tmp_path / "tb_export"))
    ex.Reload()
    assert {"sparsity/1", "hoyer/4"} <= set(ex.Tags()["scalars"])
    assert "per_sample_sparsity/1" in ex.Tags()["histograms"]


def _ddp_worker(rank: int, world: int, out: str, port: int) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(small_cnn())
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        x, y = toy_data(16, seed=rank)
        probe, _ = toy_data(6, seed=9)
        monitor = SparsityMonitor(model, probe, out=out, correlation=False)
        for epoch in (1, 2):
            train_epoch(model, opt, x, y)  # DDP all-reduces gradients here
            row = monitor.epoch_end(epoch, train_loss=1.0)
            assert bool(row) == (rank == 0)
            dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes each import torch: ~10 s on an idle machine
def test_ddp_measures_on_rank_zero_without_deadlock(tmp_path: Path) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, str(tmp_path), port), nprocs=2, join=True)
    assert RunDir(tmp_path).history()["epoch"].tolist() == [1, 2]


def test_cli_analyze_reads_a_monitor_run(tmp_path: Path) -> None:
    if importlib.util.find_spec("xai_sparsity.cli") is None:
        pytest.skip("the command line is not part of this checkout")
    model = small_cnn()
    probe, _ = toy_data(6)
    monitor = SparsityMonitor(model, probe, out=tmp_path, correlation=False)
    for epoch, loss in enumerate([1.0, 0.8, 0.7, 0.75, 0.9], start=1):
        monitor.epoch_end(epoch, train_loss=loss, test_loss=loss)
    proc = subprocess.run(
        [sys.executable, "-m", "xai_sparsity.cli", "analyze", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "t_L" in proc.stdout or "test loss" in proc.stdout.lower()


def test_history_is_readable_by_pandas_with_expected_dtypes(tmp_path: Path) -> None:
    model = small_cnn()
    probe, _ = toy_data(4)
    SparsityMonitor(model, probe, out=tmp_path).epoch_end(1, test_loss=0.5)
    df = pd.read_csv(tmp_path / "history.csv")
    assert df["dead:1"].dtype.kind in "iu"
    assert df["sparsity:1"].dtype.kind == "f"


# notebooks/05_your_own_model.ipynb runs with its fast parameters in tests/test_notebooks.py.
