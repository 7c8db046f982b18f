"""The sparsity penalty: its value, its gradient, one forward per step, targeting."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from xai_sparsity import XaiSparsityError
from xai_sparsity.measuring.measures import perplexity_sparsity
from xai_sparsity.runs.rundir import RunDir
from xai_sparsity.training.penalty import SparsityPenalty, auto_targets


@pytest.fixture
def net(small_cnn: Callable[..., nn.Sequential]) -> nn.Sequential:
    """Conv(1, 4), ReLU, Conv(4, 6), ReLU, Flatten, Linear for (B, 1, 8, 8) inputs."""
    return small_cnn(widths=(4, 6), image_size=8, norm_after=(), pool_after=())


def test_value_matches_definition(net: nn.Sequential) -> None:
    x = torch.randn(5, 1, 8, 8)
    pen = SparsityPenalty(["1", "3"], lam=0.7, weights={"3": 2.0})
    with pen.attach(net):
        net(x)
        value = pen.value()
    a1 = net[1](net[0](x))
    a3 = net[3](net[2](a1))
    expected = 0.7 * (perplexity_sparsity(a1).mean() + 2.0 * perplexity_sparsity(a3).mean())
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    assert set(pen.last_values) == {"1", "3"}


@pytest.mark.parametrize("scope", ["layer", "channel", "spatial"])
def test_scopes_and_variant(scope: str, net: nn.Sequential) -> None:
    x = torch.randn(4, 1, 8, 8)
    pen = SparsityPenalty("3", lam=1.0, scope=scope, variant="relative")
    with pen.attach(net):
        net(x)
        value = pen.value()
    a3 = net[:4](x)
    ref = perplexity_sparsity(a3, scope=scope, variant="relative").mean()
    assert value.item() == pytest.approx(ref.item(), rel=1e-5)


def test_gradient_makes_activations_denser(net: nn.Sequential) -> None:
    x = torch.randn(16, 1, 8, 8)
    pen = SparsityPenalty(nn.ReLU, lam=1.0)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    with torch.no_grad():
        before = perplexity_sparsity(net[:4](x)).mean().item()
    with pen.attach(net):
        for _ in range(30):
            net(x)
            loss = pen.value()
            opt.zero_grad()
            loss.backward()
            assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
            opt.step()
    with torch.no_grad():
        after = perplexity_sparsity(net[:4](x)).mean().item()
    assert after < before - 0.05


def test_one_forward_per_step_and_cleared(net: nn.Sequential) -> None:
    calls = []
    net.register_forward_pre_hook(lambda m, a: calls.append(1))
    pen = SparsityPenalty("1", lam=0.1)
    with pen.attach(net):
        for _ in range(3):
            out = net(torch.randn(2, 1, 8, 8))
            (out.sum() + pen.value()).backward()
        with pytest.raises(XaiSparsityError, match="no targeted layer ran"):
            pen.value()
    assert len(calls) == 3
    assert not net[1]._forward_hooks  # hooks removed


def test_bad_settings(net: nn.Sequential) -> None:
    with pytest.raises(XaiSparsityError, match="lam=-1"):
        SparsityPenalty("1", lam=-1)
    with pytest.raises(XaiSparsityError, match="scope='chanel'"):
        SparsityPenalty("1", lam=1, scope="chanel")
    pen = SparsityPenalty("1", lam=1)
    with pytest.raises(XaiSparsityError, match="inside attach"):
        pen.value()
    bad = SparsityPenalty("1", lam=1, weights={"9": 2.0})
    with bad.attach(net), pytest.raises(XaiSparsityError, match="not targeted"):
        net(torch.randn(2, 1, 8, 8))
        bad.value()
    with (
        pytest.raises(XaiSparsityError, match="matches no submodule"),
        SparsityPenalty("nope", lam=1).attach(net),
    ):
        pass


def _history(tmp_path, loss, rising: dict[str, list[float]]) -> RunDir:  # type: ignore[no-untyped-def]
    run = RunDir(tmp_path / "base", create=True)
    for i, value in enumerate(loss):
        row = {
            "epoch": i + 1,
            "train_loss": 0.1,
            "train_acc": 1.0,
            "test_loss": value,
            "test_acc": 0.9,
        }
        row.update({f"sparsity:{k}": v[i] for k, v in rising.items()})
        run.append_history(row)
    return run


def test_auto_targets(tmp_path) -> None:  # type: ignore[no-untyped-def]
    n = 30
    loss = [2.0 - 0.1 * t if t < 12 else 0.8 + 0.05 * (t - 12) for t in range(n)]
    early = [0.5] * 4 + [0.5 + 0.03 * t for t in range(n - 4)]
    flat = [0.6] * n
    late = [0.5] * 24 + [0.5 + 0.05 * t for t in range(n - 24)]
    run = _history(tmp_path, loss, {"conv1": early, "conv2": flat, "layer.relu#1": late})
    assert auto_targets(run) == ["conv1"]
    never = _history(tmp_path / "x", [1.0 - 0.01 * t for t in range(n)], {"conv1": early})
    with pytest.raises(XaiSparsityError, match="did not"):
        auto_targets(never)
    assert isinstance(run.history(), pd.DataFrame)


def _with_val_loss(run: RunDir, val_loss: list[float]) -> RunDir:
    history = run.history().assign(val_loss=val_loss)
    run.history_path.unlink()
    for row in history.to_dict("records"):
        run.append_history(row)
    return run


def test_auto_targets_read_the_validation_loss_and_choose_among_conv_maps(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """With a validation split the test loss is never read; only layers with maps qualify."""
    n = 30
    turns = [2.0 - 0.1 * t if t < 12 else 0.8 + 0.05 * (t - 12) for t in range(n)]
    falls = [2.0 - 0.05 * t for t in range(n)]  # never turns
    early = [0.5] * 4 + [0.5 + 0.03 * t for t in range(n - 4)]
    # the test loss never turned, the validation loss did: the targets come from the latter
    run = _with_val_loss(_history(tmp_path / "a", falls, {"conv1": early, "fc.relu": early}), turns)
    assert auto_targets(run) == ["conv1", "fc.relu"]  # no arrays kept: every measured layer
    run.save_arrays(1, {"spatial:conv1": np.zeros((1, 3, 3)), "layer:fc.relu": np.zeros(1)})
    assert auto_targets(run) == ["conv1"]  # the dense ReLU has no maps
    # the test loss turned, the validation loss did not: no targets from the test set
    flat = _with_val_loss(_history(tmp_path / "b", turns, {"conv1": early}), falls)
    with pytest.raises(XaiSparsityError, match="validation loss turned"):
        auto_targets(flat)
