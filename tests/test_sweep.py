"""Dataset sweep: streaming statistics equal one-batch computations; state; inputs; errors."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from xai_sparsity import XaiSparsityError
from xai_sparsity.capturing.hooks import capture
from xai_sparsity.capturing.sweeps import RunningStats, SweepResult, sweep
from xai_sparsity.measuring.correlation import filter_correlation
from xai_sparsity.measuring.measures import compute_measure, lifetime_sparsity


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
        nn.ReLU(),
    )


def data(n: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64), torch.arange(n) % 3


def test_streaming_equals_one_batch_and_manual() -> None:
    torch.manual_seed(0)
    model = cnn().double().eval()
    x, y = data(12)
    streamed = sweep(model, DataLoader(TensorDataset(x, y), batch_size=5), progress=False)
    single = sweep(model, [x], progress=False)
    assert streamed.n_samples == single.n_samples == 12
    assert streamed.n_batches == 3 and single.n_batches == 1
    assert list(streamed.layers) == ["0", "2", "4", "5", "8"]

    with torch.no_grad(), capture(model) as cap:
        model(x)
    for name, ls in streamed.layers.items():
        one = single.layers[name]
        act = cap.activations[name]
        for (m, s), rs in ls.stats.items():
            ref = one.stats[(m, s)]
            manual = compute_measure(m, act, s).double()
            assert rs.n == ref.n == manual.numel()
            assert math.isclose(rs.mean, ref.mean, rel_tol=0, abs_tol=1e-10)
            assert math.isclose(rs.mean, float(manual.mean()), abs_tol=1e-10)
            assert math.isclose(rs.std, float(manual.std()), abs_tol=1e-9)
            assert math.isclose(rs.min, float(manual.min()), abs_tol=1e-12)
            for q in (0.05, 0.5, 0.95):  # histogram quantiles: within a bin width
                lo = float(torch.quantile(manual, q, interpolation="lower"))
                hi = float(torch.quantile(manual, q, interpolation="higher"))
                assert lo - 1.01e-3 <= rs.quantile(q) <= hi + 1.01e-3
        for m, t in ls.channel_mean.items():
            assert torch.allclose(t, one.channel_mean[m], atol=1e-10)
            assert torch.allclose(t, compute_measure(m, act, "channel").mean(0), atol=1e-10)
        for m, t in ls.spatial_mean.items():
            assert torch.allclose(t, compute_measure(m, act, "spatial").mean(0), atol=1e-10)
        assert ls.lifetime is not None
        assert torch.allclose(ls.lifetime, lifetime_sparsity(act).double(), atol=1e-10)
        if act.dim() > 2:
            assert ls.correlation is not None
            r = ls.correlation.correlation()
            assert one.correlation is not None
            assert torch.allclose(r, one.correlation.correlation(), atol=1e-10)
            assert torch.allclose(r, filter_correlation(act), atol=1e-10)
        else:  # dense layers: layer scope only, no filter correlation
            assert ls.correlation is None
            assert {s for _, s in ls.stats} == {"layer"}


def test_summary_and_save(tmp_path: object) -> None:
    model = cnn().eval()
    x, y = data(8)
    res = sweep(
        model,
        DataLoader(TensorDataset(x.float(), y), batch_size=4),
        measures=("perplexity", "hoyer"),
        scopes=("layer", "channel"),
        progress=False,
    )
    df = res.summary()
    assert list(df.columns) == [
        "layer",
        "measure",
        "scope",
        "mean",
        "std",
        "q05",
        "q25",
        "q50",
        "q75",
        "q95",
        "n",
    ]
    # 4 conv-like layers x 2 measures x 2 scopes + the dense ReLU x 2 measures x 1 scope
    assert len(df) == 4 * 2 * 2 + 2
    assert df["layer"].iloc[0] == "0"
    assert df.loc[(df.layer == "2") & (df.scope == "channel"), "n"].tolist() == [8 * 6] * 2
    assert ((df.q05 <= df.q50) & (df.q50 <= df.q95)).all()
    assert df[["mean", "std", "q50"]].notna().all().all()
    cs = res.correlation_summary()
    assert list(cs.layer) == ["0", "2", "4", "5"]
    assert (cs.mean_abs_r >= 0).all() and (cs.mean_abs_r <= 1).all()
    import pathlib

    path = pathlib.Path(str(tmp_path)) / "sub" / "sweep.npz"
    res.save(path)
    with np.load(path) as z:
        keys = set(z.files)
        assert {"channel:2", "correlation:2", "lifetime:2", "hist:perplexity:layer:2"} <= keys
        assert z["correlation:2"].shape == (6, 6)
        assert z["hist:perplexity:layer:2"].sum() == 8
        np.testing.assert_allclose(
            z["channel:2"], res.layers["2"].channel_mean["perplexity"].numpy()
        )
    assert not [p for p in path.parent.iterdir() if p.name != "sweep.npz"]  # no temp files
    assert "SweepResult(5 layers, 8 samples in 2 batches" in repr(res)


def test_sweep_restores_flags_bn_stats_and_device() -> None:
    model = cnn()
    model.train()
    model[1].eval()
    model[4].eval()
    flags = {n: m.training for n, m in model.named_modules()}
    bn = model[1]
    assert isinstance(bn, nn.BatchNorm2d)
    assert bn.running_mean is not None and bn.running_var is not None
    assert bn.num_batches_tracked is not None
    before = [bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()]
    x, _ = data(6)
    model[1].train()
    flags["1"] = True
    sweep(model, [x.float()], progress=False, device="cpu")
    assert {n: m.training for n, m in model.named_modules()} == flags
    after = [bn.running_mean, bn.running_var, bn.num_batches_tracked]
    for a, b in zip(before, after, strict=True):
        assert torch.equal(a, b)
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    assert next(model.parameters()).device.type == "cpu"
    # also when the model raises mid-sweep
    with pytest.raises(RuntimeError):
        sweep(model, [x.float(), torch.randn(2, 5, 8, 8)], progress=False, device="cpu")
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_batch_forms_and_max_batches() -> None:
    model = cnn().eval()
    x, y = data(6)
    x = x.float()
    as_tensor = sweep(model, x, measures=("perplexity",), progress=False)
    as_tuples = sweep(
        model, [(x[:3], y[:3]), [x[3:], y[3:]]], measures=("perplexity",), progress=False
    )
    as_dicts = sweep(
        model,
        [{"image": x[:2], "label": y[:2]}, {"input": x[2:]}],
        measures=("perplexity",),
        progress=False,
    )
    m = [
        r.layers["5"].stats[("perplexity", "layer")].mean for r in (as_tensor, as_tuples, as_dicts)
    ]
    assert m[0] == pytest.approx(m[1], abs=1e-6) and m[0] == pytest.approx(m[2], abs=1e-6)
    # double inputs are cast to the model's float32 parameters
    assert sweep(model, [x.double()], measures=("hoyer",), progress=False).n_samples == 6

    def endless() -> Iterator[torch.Tensor]:
        while True:
            yield x[:2]

    res = sweep(model, endless(), max_batches=3, progress=False)
    assert res.n_batches == 3 and res.n_samples == 6


def test_resnet_reuse_names_and_progress() -> None:
    torch.manual_seed(0)
    r = torchvision.models.resnet18(weights=None)
    batches = [torch.randn(2, 3, 32, 32) for _ in range(2)]
    res = sweep(
        r,
        batches,
        ["layer1.0.conv?", "layer1.0.relu"],
        measures=("perplexity",),
        scopes=("layer",),
        progress=True,
    )
    assert list(res.layers) == [
        "layer1.0.conv1",
        "layer1.0.relu#0",
        "layer1.0.conv2",
        "layer1.0.relu#1",
    ]
    assert r.training and all(m.training for m in r.modules())  # still in train mode
    with torch.no_grad(), capture(r.eval(), "layer1.0.relu") as cap:
        r(torch.cat(batches))
    for k in ("layer1.0.relu#0", "layer1.0.relu#1"):
        expected = compute_measure("perplexity", cap.activations[k], "layer").mean()
        assert res.layers[k].stats[("perplexity", "layer")].mean == pytest.approx(
            float(expected), abs=1e-6
        )


def test_nonfinite_outputs_warn_and_are_excluded() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU())
    x = torch.ones(4, 1, 3, 3)
    x[0, 0, 0, 0] = float("nan")
    with pytest.warns(UserWarning, match="NaN/Inf"):
        res = sweep(model, [x], measures=("hoyer",), correlation=False, progress=False)
    rs = res.layers["1"].stats[("hoyer", "layer")]
    assert rs.n == 3 and rs.nonfinite == 1 and math.isfinite(rs.mean)


def test_bad_inputs() -> None:
    model = cnn()
    x, _ = data(4)
    with pytest.raises(XaiSparsityError, match="no batches"):
        sweep(model, [], progress=False)
    with pytest.raises(XaiSparsityError, match=r"measure='perplexty'"):
        sweep(model, [x], measures=("perplexty",), progress=False)
    with pytest.raises(XaiSparsityError, match=r"scope='pixel'"):
        sweep(model, [x], scopes=("pixel",), progress=False)
    with pytest.raises(XaiSparsityError, match="iterable of batches"):
        sweep(model, 42, progress=False)  # type: ignore[arg-type]
    with pytest.raises(XaiSparsityError, match="DataLoader"):
        sweep(model, TensorDataset(x), progress=False)  # type: ignore[arg-type]
    with pytest.raises(XaiSparsityError, match=r"batch 0 .* str"):
        sweep(model, ["cat.png"], progress=False)
    with pytest.raises(XaiSparsityError, match=r"keys \['label'\]"):
        sweep(model, [{"label": 1}], progress=False)
    with pytest.raises(XaiSparsityError, match="max_batches"):
        sweep(model, [x], max_batches=0, progress=False)
    with pytest.raises(XaiSparsityError, match="matches no submodule"):
        sweep(model, [x], layers="features.*", progress=False)
    with pytest.raises(XaiSparsityError, match="not among"):
        sweep(model, [x], measures=("hoyer",), measure_options={"entropy": {}}, progress=False)
    with pytest.raises(XaiSparsityError, match=r"transform='square'"):
        sweep(model, [x], measure_options={"hoyer": {"transform": "square"}}, progress=False)
    with pytest.raises(XaiSparsityError, match=r"variant='x'"):  # used by lifetime sparsity
        sweep(model, [x], measures=("hoyer",), measure_options={"perplexity": {"variant": "x"}})
    with pytest.raises(XaiSparsityError, match="tol=-1"):
        sweep(model, [x], measure_options={"zero_fraction": {"tol": -1}}, progress=False)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    st.lists(
        st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=20), min_size=1, max_size=5
    )
)
def test_running_stats_merge_and_quantiles(chunks: list[list[float]]) -> None:
    whole = RunningStats()
    parts = [RunningStats() for _ in chunks]
    for p, c in zip(parts, chunks, strict=True):
        whole.update(torch.tensor(c, dtype=torch.float64))
        p.update(torch.tensor(c, dtype=torch.float64))
    merged = parts[0]
    for p in parts[1:]:
        merged.merge(p)
    values = np.concatenate([np.array(c) for c in chunks])
    for rs in (whole, merged):
        assert rs.n == len(values)
        assert rs.mean == pytest.approx(values.mean(), abs=1e-12)
        assert rs.std == pytest.approx(values.std(ddof=1) if len(values) > 1 else 0.0, abs=1e-7)
        for q in (0.05, 0.5, 0.95):
            ours = rs.quantile(q)
            # the true q-quantile lies between neighbouring order statistics; allow a bin width
            lo, hi = np.quantile(values, q, method="lower"), np.quantile(values, q, method="higher")
            assert lo - 1e-3 - 1e-12 <= ours <= hi + 1e-3 + 1e-12
    state = whole.state_dict()
    clone = RunningStats()
    clone.load_state_dict(state)
    assert clone.n == whole.n and clone.mean == whole.mean
    assert torch.equal(clone.histogram, whole.histogram)
    with pytest.raises(XaiSparsityError):
        whole.quantile(1.5)


def test_sweep_result_type() -> None:
    res = sweep(cnn(), [data(3)[0]], measures=("zero_fraction",), lifetime=False, progress=False)
    assert isinstance(res, SweepResult)
    assert res.layers["2"].lifetime is None
    assert res.layers["2"].stats[("zero_fraction", "layer")].n == 3


def _relu_net(inplace: bool) -> nn.Sequential:
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(inplace=inplace),
        nn.Conv2d(6, 5, 3, padding=1),
        nn.ReLU(inplace=inplace),
        nn.Flatten(),
        nn.Linear(5 * 8 * 8, 7),
        nn.ReLU(),
    )
    conv = net[2]
    assert isinstance(conv, nn.Conv2d) and conv.bias is not None
    with torch.no_grad():  # a dead channel: all zero after the ReLU
        conv.weight[1].zero_()
        conv.bias[1] = -1.0
    return net.eval()


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("magnitude", [1.0, 1e6])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {
            "perplexity": {"variant": "relative", "transform": "relu"},
            "entropy": {"transform": "relu"},
            "hoyer": {"transform": "relu"},
            "zero_fraction": {"tol": 0.05},
        },
    ],
)
def test_float32_fused_statistics_match_the_measure_functions(
    inplace: bool, magnitude: float, options: dict[str, dict[str, Any]]
) -> None:
    """The shared-pass float32 statistics (conv -> ReLU sums shared, several batches) agree with
    the measure functions on the captured outputs to 1e-5, every measure and scope."""
    net = _relu_net(inplace)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, 3, 8, 8, generator=g) * magnitude
    x[2] = 0.0  # an all-zero input: bias-only maps
    first = sweep(net, [x[:4], x[4:7], x[7:]], progress=False, measure_options=options)
    # a second sweep shares the ReLU sums from its first batch on (the pairing is remembered)
    res = sweep(net, [x[:4], x[4:7], x[7:]], progress=False, measure_options=options)
    for name, ls in res.layers.items():
        for key, rs in ls.stats.items():
            assert math.isclose(rs.mean, first.layers[name].stats[key].mean, abs_tol=1e-6)
    ref_net = _relu_net(False)  # the same weights, outputs kept apart
    with torch.no_grad(), capture(ref_net) as cap:
        ref_net(x)
    assert list(res.layers) == ["0", "1", "2", "3", "6"]
    for name, ls in res.layers.items():
        act = cap.activations[name]
        for (m, s), rs in ls.stats.items():
            manual = compute_measure(m, act, s, **options.get(m, {})).double()
            assert rs.n == manual.numel()
            assert math.isclose(rs.mean, float(manual.mean()), abs_tol=1e-5), (name, m, s)
            assert math.isclose(rs.min, float(manual.min()), abs_tol=1e-5), (name, m, s)
            assert math.isclose(rs.max, float(manual.max()), abs_tol=1e-5), (name, m, s)
            assert math.isclose(rs.std, float(manual.std()), abs_tol=1e-5), (name, m, s)
        for m, t in ls.channel_mean.items():
            ref = compute_measure(m, act, "channel", **options.get(m, {})).double().mean(0)
            assert torch.allclose(t, ref, atol=1e-5), (name, m)
        for m, t in ls.spatial_mean.items():
            ref = compute_measure(m, act, "spatial", **options.get(m, {})).double().mean(0)
            assert torch.allclose(t, ref, atol=1e-5), (name, m)
        assert ls.lifetime is not None
        life = lifetime_sparsity(act, **options.get("perplexity", {})).double()
        assert torch.allclose(ls.lifetime, life, atol=1e-5), name
        if ls.correlation is not None:
            r = ls.correlation.correlation()
            assert torch.allclose(r, filter_correlation(act.double()), atol=1e-5), name


def test_inference_mode_and_bfloat16() -> None:
    """Under torch.inference_mode (tensors without version counters: no ReLU sharing) and then
    outside it (the reused buffers are replaced), and for a bfloat16 model (float32 work)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    batches = [torch.randn(5, 3, 8, 8) for _ in range(3)]
    with torch.inference_mode():
        inside = sweep(net, batches, progress=False)
    outside = sweep(net, batches, progress=False)
    for key, rs in outside.layers["1"].stats.items():
        assert math.isclose(rs.mean, inside.layers["1"].stats[key].mean, abs_tol=1e-6), key
    half = net.to(torch.bfloat16)
    res = sweep(half, [b.bfloat16() for b in batches], progress=False)
    with torch.no_grad():
        act = half(torch.cat(batches).bfloat16())
    for (m, s), rs in res.layers["1"].stats.items():
        assert math.isclose(rs.mean, float(compute_measure(m, act, s).mean()), abs_tol=1e-5)


def test_nonfinite_units_match_the_measure_functions() -> None:
    """An Inf or NaN makes its own units non-finite (left out, warned) and leaves the other units
    of the sample as the measure functions give them; an all-zero sample is dead (1)."""
    net = nn.Sequential(nn.LeakyReLU(0.5))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 4, 5, 5, generator=g)
    x[0, 1, 2, 2] = float("inf")
    x[1, 2, 0, 0] = float("nan")
    x[2] = 0.0
    with pytest.warns(UserWarning, match="NaN/Inf"):
        res = sweep(net, [x], correlation=False, lifetime=False, progress=False)
    act = net(x)
    for (m, s), rs in res.layers["0"].stats.items():
        ref = compute_measure(m, act, s, check_finite=False).double().flatten()
        finite = ref[torch.isfinite(ref)]
        assert rs.n == finite.numel() and rs.nonfinite == ref.numel() - finite.numel(), (m, s)
        assert math.isclose(rs.mean, float(finite.mean()), abs_tol=1e-6), (m, s)
        assert math.isclose(rs.max, float(finite.max()), abs_tol=1e-6), (m, s)
