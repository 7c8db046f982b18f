"""Tests of xai_sparsity.measuring.correlation: batch, streaming, merging, masking and errors."""

from __future__ import annotations

import pickle
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from xai_sparsity import XaiSparsityError
from xai_sparsity.measuring.correlation import (
    CorrelationAccumulator,
    correlation_summary,
    filter_correlation,
    weight_similarity,
)


def _numpy_pearson(x: torch.Tensor, over: str = "positions") -> np.ndarray:
    """Reference: numpy's corrcoef of the (C, n) channel samples."""
    if x.ndim == 2:
        samples = x.T
    elif over == "images":
        samples = x.flatten(2).double().mean(2).T
    else:
        samples = x.transpose(0, 1).reshape(x.shape[1], -1)
    return np.corrcoef(samples.double().numpy())


def _batches(
    seed: int, count: int, shape: tuple[int, ...], mean: float = 0.0
) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(shape[1], shape[1], generator=g, dtype=torch.float64)
    out = []
    for _ in range(count):
        z = torch.randn(*shape, generator=g, dtype=torch.float64)
        # correlated channels: mix along the channel dim
        z = torch.einsum("cd,bd...->bc...", mix, z)
        out.append(z + mean)
    return out


# --------------------------------------------------------------------------------------------
# worked examples


def test_perfect_anti_and_uncorrelated() -> None:
    base = torch.tensor([1.0, 2.0, 4.0, 8.0, 3.0, -1.0])
    other = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    other = other - other.mean()
    base_c = base - base.mean()
    orthogonal = other - (other @ base_c) / (base_c @ base_c) * base_c  # exactly uncorrelated
    x = torch.stack([base, 3 * base + 7, -0.5 * base, orthogonal], dim=1)  # (6, 4)
    r = filter_correlation(x)
    assert r.dtype == torch.float64
    expected = torch.tensor(
        [
            [1.0, 1.0, -1.0, 0.0],
            [1.0, 1.0, -1.0, 0.0],
            [-1.0, -1.0, 1.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ],
        dtype=torch.float64,
    )
    assert torch.allclose(r, expected, atol=1e-6)
    # 6 off-diagonal pairs: |r| = 1, 1, 1 and three zeros -> mean 0.5
    assert correlation_summary(r) == pytest.approx(0.5, abs=1e-6)


def test_positions_versus_images() -> None:
    x = torch.randn(5, 3, 4, 4)
    for over in ("positions", "images"):
        r = filter_correlation(x, over=over)
        assert r.shape == (3, 3)
        np.testing.assert_allclose(r.numpy(), _numpy_pearson(x, over), atol=1e-12)
    # pooled values anti-correlated, positions not: channel 1 = -mean(channel 0) per image
    y = torch.randn(6, 2, 3, 3)
    y[:, 1] = -y[:, 0].mean((1, 2), keepdim=True) + 0.01 * torch.randn(6, 3, 3)
    assert filter_correlation(y, "images")[0, 1] < -0.99
    assert abs(filter_correlation(y, "positions")[0, 1]) < 0.99


def test_matches_numpy_for_ranks() -> None:
    for shape in ((7, 4), (3, 4, 9), (2, 4, 3, 3), (2, 4, 2, 2, 3)):
        x = torch.randn(*shape)
        np.testing.assert_allclose(filter_correlation(x).numpy(), _numpy_pearson(x), atol=1e-12)


# --------------------------------------------------------------------------------------------
# streaming


@pytest.mark.parametrize("over", ["positions", "images"])
@pytest.mark.parametrize("mean", [0.0, 1e3, -5e4])
def test_streaming_equals_batch(over: str, mean: float) -> None:
    batches = _batches(1, 12, (4, 6, 5, 5), mean=mean)
    batches += [b.float() for b in _batches(2, 5, (3, 6, 5, 5), mean=mean)]
    acc = CorrelationAccumulator(over)
    for b in batches:
        acc.update(b)
    everything = torch.cat([b.double() for b in batches])
    expected = filter_correlation(everything, over)
    assert acc.n == (everything.shape[0] * (25 if over == "positions" else 1))
    assert torch.allclose(acc.correlation(), expected, atol=1e-10, rtol=0)
    np.testing.assert_allclose(expected.numpy(), _numpy_pearson(everything, over), atol=1e-10)
    assert acc.mean_abs() == pytest.approx(correlation_summary(expected), abs=1e-10)


def test_large_mean_stays_accurate() -> None:
    """Mean 1e3, std 1: naive raw sums would lose ~6 digits; the shifted sums do not."""
    batches = _batches(3, 20, (8, 5), mean=1e3)
    acc = CorrelationAccumulator()
    for b in batches:
        acc.update(b)
    expected = torch.from_numpy(np.corrcoef(torch.cat(batches).T.numpy()))
    assert torch.allclose(acc.correlation(), expected, atol=1e-12, rtol=0)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.integers(1, 6), min_size=1, max_size=6),
    st.sampled_from([0.0, 10.0, 1e3]),
    st.integers(0, 2**16),
)
def test_streaming_property(sizes: list[int], mean: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randn(b, 3, 2, 2, generator=g, dtype=torch.float64) * 2 + mean for b in sizes]
    parts[0][:, 2] = 0.5  # a channel that may stay constant
    acc = CorrelationAccumulator()
    for p in parts:
        acc.update(p)
    expected = filter_correlation(torch.cat(parts))
    assert torch.allclose(acc.correlation(), expected, atol=1e-10, rtol=0)
    assert torch.isfinite(acc.correlation()).all()
    assert 0.0 <= acc.mean_abs() <= 1.0


@pytest.mark.parametrize("over", ["positions", "images"])
def test_large_batches_are_sliced_without_changing_results(
    over: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import xai_sparsity.measuring.correlation as corr

    x = torch.cat(_batches(7, 2, (5, 4, 3, 3), mean=50.0))  # 10 images
    whole = CorrelationAccumulator(over)
    whole.update(x)
    monkeypatch.setattr(corr, "_SLICE_VALUES", 3 * 4 * 9)  # 3 images per slice: 4 slices
    sliced = CorrelationAccumulator(over)
    sliced.update(x)
    assert sliced.n == whole.n
    assert torch.allclose(sliced.correlation(), whole.correlation(), atol=1e-12, rtol=0)
    bad = x.clone()
    bad[-1, 0, 0, 0] = float("nan")  # in the last slice: nothing may be kept
    with pytest.raises(XaiSparsityError, match="NaN or Inf"):
        sliced.update(bad)
    assert sliced.n == whole.n


def test_merge_equals_single_accumulator() -> None:
    batches = _batches(4, 10, (3, 5, 4, 4), mean=200.0)
    whole, left, right = (CorrelationAccumulator() for _ in range(3))
    for i, b in enumerate(batches):
        whole.update(b)
        (left if i < 4 else right).update(b)
    merged = left + right
    assert merged.n == whole.n and left.n + right.n == whole.n
    assert torch.allclose(merged.correlation(), whole.correlation(), atol=1e-10, rtol=0)
    empty = CorrelationAccumulator()
    empty += left
    empty.merge(CorrelationAccumulator())
    assert torch.allclose(empty.correlation(), left.correlation(), atol=0)
    left += right
    assert torch.allclose(left.correlation(), whole.correlation(), atol=1e-10, rtol=0)


def test_inference_mode_then_normal_mode() -> None:
    batches = _batches(8, 4, (2, 3, 2, 2))
    acc, ref = CorrelationAccumulator(), CorrelationAccumulator()
    with torch.inference_mode():
        acc.update(batches[0])
    for b in batches[1:]:
        acc.update(b)
    other = CorrelationAccumulator()
    with torch.inference_mode():
        other.update(batches[1])
    acc.merge(other)
    for b in [*batches, batches[1]]:
        ref.update(b)
    assert torch.allclose(acc.correlation(), ref.correlation(), atol=1e-12, rtol=0)


def test_state_dict_round_trip_and_pickle() -> None:
    acc = CorrelationAccumulator("images")
    for b in _batches(5, 3, (4, 3, 2, 2)):
        acc.update(b)
    restored = CorrelationAccumulator()
    restored.load_state_dict(pickle.loads(pickle.dumps(acc.state_dict())))
    assert restored.over == "images" and restored.n == acc.n
    assert torch.equal(restored.correlation(), acc.correlation())
    clone = pickle.loads(pickle.dumps(acc))
    assert torch.equal(clone.correlation(), acc.correlation())


def test_all_reduce_single_process(tmp_path: object) -> None:
    import torch.distributed as dist

    acc = CorrelationAccumulator()
    with pytest.raises(XaiSparsityError, match="init_process_group"):
        acc.all_reduce()
    batches = _batches(6, 3, (2, 4, 3, 3), mean=10.0)
    for b in batches:
        acc.update(b)
    before = acc.correlation()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        acc.all_reduce()
        empty = CorrelationAccumulator()
        empty.all_reduce()  # no data anywhere: stays empty
        assert empty.n == 0
    finally:
        dist.destroy_process_group()
    assert acc.n == 2 * 3 * 9
    assert torch.allclose(acc.correlation(), before, atol=1e-12, rtol=0)


# --------------------------------------------------------------------------------------------
# dead channels


def test_dead_channels_masked_and_counted() -> None:
    x = torch.relu(torch.randn(6, 5, 4, 4))
    x[:, 1] = 0.0  # dead ReLU channel
    x[:, 3] = 2.5  # constant channel
    r = filter_correlation(x)
    assert torch.isfinite(r).all()
    assert r[1].abs().sum() == 0 and r[:, 3].abs().sum() == 0
    assert r.diagonal().tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]
    acc = CorrelationAccumulator()
    acc.update(x[:3])
    acc.update(x[3:])
    assert acc.dead_mask.tolist() == [False, True, False, True, False]
    assert acc.num_dead == 2
    r = acc.correlation()
    assert r.diagonal().tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert torch.allclose(r, filter_correlation(x), atol=1e-10)
    live = [0, 2, 4]
    expected = filter_correlation(x[:, live])
    mean_live = expected[~torch.eye(3, dtype=torch.bool)].abs().mean().item()
    assert acc.mean_abs() == pytest.approx(mean_live, abs=1e-10)
    assert correlation_summary(r) == pytest.approx(mean_live, abs=1e-10)
    assert correlation_summary(r, acc.dead_mask) == pytest.approx(mean_live, abs=1e-10)


def test_channel_alive_in_later_batch_is_live() -> None:
    acc = CorrelationAccumulator()
    first = torch.randn(3, 2, 2, 2)
    first[:, 1] = 0.0
    acc.update(first)
    assert acc.num_dead == 1
    acc.update(torch.randn(3, 2, 2, 2))
    assert acc.num_dead == 0


def test_summary_never_nan() -> None:
    assert correlation_summary(torch.zeros(4, 4)) == 0.0  # all dead
    one_live = torch.zeros(3, 3)
    one_live[0, 0] = 1.0
    assert correlation_summary(one_live) == 0.0
    acc = CorrelationAccumulator()
    acc.update(torch.zeros(4, 3, 2, 2))
    assert acc.num_dead == 3 and acc.mean_abs() == 0.0
    assert torch.equal(acc.correlation(), torch.zeros(3, 3, dtype=torch.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        nan_diag = torch.tensor(np.corrcoef(np.array([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]])))
    assert correlation_summary(nan_diag) == 0.0  # numpy's NaN row of a constant channel


# --------------------------------------------------------------------------------------------
# weights


def test_weight_similarity_of_a_real_conv() -> None:
    conv = torch.nn.Conv2d(3, 6, 3)
    with torch.no_grad():
        conv.weight[1] = 2.0 * conv.weight[0]  # same direction
        conv.weight[2] = -conv.weight[0]  # opposite
        conv.weight[5] = 0.0  # zero filter
    sim = weight_similarity(conv)
    assert sim.shape == (6, 6) and sim.dtype == torch.float64
    assert sim[0, 1].item() == pytest.approx(1.0, abs=1e-12)
    assert sim[0, 2].item() == pytest.approx(-1.0, abs=1e-12)
    assert sim.diagonal().tolist() == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    assert torch.equal(sim, sim.T)
    flat = conv.weight.detach().double().flatten(1)
    cos = torch.nn.functional.cosine_similarity(flat[3], flat[4], dim=0)
    assert sim[3, 4].item() == pytest.approx(cos.item(), abs=1e-12)
    assert torch.equal(weight_similarity(conv.weight), sim)
    assert weight_similarity(torch.nn.Linear(4, 3)).shape == (3, 3)
    assert weight_similarity(torch.nn.ConvTranspose2d(2, 5, 3)).shape == (5, 5)


# --------------------------------------------------------------------------------------------
# bad input


def _mismatch() -> None:
    acc = CorrelationAccumulator()
    acc.update(torch.randn(2, 4, 3, 3))
    acc.update(torch.randn(2, 5, 3, 3))


BAD: list[tuple[Callable[[], object], str]] = [
    (lambda: filter_correlation(torch.randn(5)), r"rank >= 2.*\(5\)"),
    (lambda: filter_correlation(torch.randn(0, 3, 2, 2)), r"no samples.*B = 0"),
    (lambda: filter_correlation(torch.randn(2, 3), over="pixels"), r"over='pixels'.*'positions'"),
    (lambda: CorrelationAccumulator(over="image"), r"over='image'.*'images'"),
    (lambda: filter_correlation(torch.tensor([[1.0, float("nan")]])), r"NaN or Inf"),
    (lambda: CorrelationAccumulator().update(torch.full((2, 2), float("inf"))), r"NaN or Inf"),
    (_mismatch, r"5 channels.*holds 4 channels"),
    (lambda: CorrelationAccumulator().correlation(), r"no data yet"),
    (lambda: CorrelationAccumulator().merge("x"), r"CorrelationAccumulator; got str"),  # type: ignore[arg-type]
    (
        lambda: CorrelationAccumulator("images").merge(_filled()),
        r"over='images' and over='positions'",
    ),
    (lambda: _filled().merge(_filled(5)), r"3 and 5 channels"),
    (lambda: weight_similarity(torch.nn.ReLU()), r"ReLU has no weight"),
    (lambda: weight_similarity(torch.randn(4)), r"rank >= 2"),
    (lambda: correlation_summary(torch.randn(3, 4)), r"square.*\(3, 4\)"),
    (lambda: CorrelationAccumulator().load_state_dict({"n": 1}), r"keys"),
    (lambda: filter_correlation([[1.0, 2.0]]), r"torch.Tensor.*list"),  # type: ignore[arg-type]
]


def _filled(c: int = 3) -> CorrelationAccumulator:
    acc = CorrelationAccumulator()
    acc.update(torch.randn(2, c, 2, 2))
    return acc


@pytest.mark.parametrize(("call", "pattern"), BAD)
def test_bad_input_gives_clear_error(call: Callable[[], object], pattern: str) -> None:
    with pytest.raises(XaiSparsityError, match=pattern):
        call()


def test_failed_update_leaves_state_untouched() -> None:
    acc = _filled()
    before = acc.correlation()
    bad = torch.randn(2, 3, 2, 2)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(XaiSparsityError):
        acc.update(bad)
    assert acc.n == 8 and torch.equal(acc.correlation(), before)


@pytest.mark.parametrize("mean", [0.0, 1e3])
def test_single_precision_is_close_and_double_is_exact(
    mean: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """float32 maps: precision="single" (float32 per-sample Gram, float64 sums over samples)
    agrees with the float64 batch result to 1e-5 also with a large mean; "double" to 1e-10; both
    over several chunks of samples."""
    import xai_sparsity.measuring.correlation as corr

    monkeypatch.setattr(corr, "_CHUNK_VALUES", 3 * 6 * 25)  # 3 maps per chunk
    batches = [b.float() for b in _batches(4, 3, (7, 6, 5, 5), mean=mean)]
    batches[1][:, 2] = 0.0  # channel 2 dead in one batch only: alive overall
    expected = filter_correlation(torch.cat(batches).double())
    for precision, tol in (("single", 1e-5), ("double", 1e-10)):
        acc = CorrelationAccumulator(precision=precision)
        for b in batches:
            acc.update(b)
        assert acc.n == 21 * 25 and acc.num_dead == 0
        assert torch.allclose(acc.correlation(), expected, atol=tol, rtol=0), precision
    dead = torch.randn(4, 3, 5, 5)
    dead[:, 1] = 2.5  # a constant channel
    acc = CorrelationAccumulator(precision="single")
    for _ in range(3):
        acc.update(dead)
    assert acc.dead_mask.tolist() == [False, True, False]
    later = dead.clone()
    later[0, 1, 0, 0] = 3.0  # it varies in a later batch: live
    acc.update(later)
    assert acc.dead_mask.tolist() == [False, False, False]
    with pytest.raises(XaiSparsityError, match="precision='half'"):
        CorrelationAccumulator(precision="half")
