"""The unit-sums kernel and capture's one-pass path (conv -> ReLU sharing).

The engine's values against the reference measures, for every measure and input: the property
tests in tests/test_engine.py."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
from torch import nn

from xai_sparsity import XaiSparsityError
from xai_sparsity.capturing.hooks import capture
from xai_sparsity.measuring import engine as K
from xai_sparsity.measuring.measures import entropy_sparsity, perplexity_sparsity


def _batch(seed: int = 0, shape: tuple[int, ...] = (11, 6, 5, 7)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.rand(shape[0], 1, 1, 1, generator=g) * 3
    x[2] = 0  # a dead sample
    x[4, 1] = 0  # a dead channel
    x[5] = x[5].clamp_min(0)  # half zeros
    return x


@pytest.mark.parametrize("magnitude", [1e-30, 1e-6, 1.0, 1e6, 1e30])
def test_sums_keep_precision_at_any_magnitude(magnitude: float) -> None:
    x = _batch(5).double() * magnitude
    u = K.unit_sums(x.float(), split=True)
    got = K.layer_and_channel(u, 35, "normalized")
    want = perplexity_sparsity(x)  # float64 reference
    assert torch.isfinite(got["layer"]).all()
    torch.testing.assert_close(got["layer"].double(), want, rtol=0, atol=2e-6)
    torch.testing.assert_close(
        got["channel"].double(), perplexity_sparsity(x, "channel"), rtol=0, atol=2e-6
    )


def test_chunks_and_per_unit_agree() -> None:
    x = _batch(1, (300, 4, 9, 9))  # several chunks
    u = K.unit_sums(x)
    whole = K.unit_sums(x, per_unit=False)
    assert u.s.shape == (300, 4) and whole.s.shape == (300, 1)
    torch.testing.assert_close(whole.s[:, 0], u.s.sum(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(whole.t[:, 0], u.t.sum(1), rtol=1e-5, atol=1e-4)
    dense = K.unit_sums(torch.randn(3, 10))
    assert dense.s.shape == (3, 1)


def test_kernel_choice_is_validated() -> None:
    with pytest.raises(XaiSparsityError, match=r"'fast'.*eager.*compiled"):
        K.set_kernel("fast")
    with pytest.raises(XaiSparsityError, match="kernel"):
        K.unit_sums(torch.ones(2, 3), kernel="gpu")
    with pytest.raises(XaiSparsityError, match="kernel"):
        capture(nn.Sequential(nn.ReLU()), mode="reduce", kernel="nope")
    with pytest.raises(XaiSparsityError, match="rank >= 2"):
        K.unit_sums(torch.ones(3))
    with pytest.raises(XaiSparsityError, match="split=True"):
        K.layer_and_channel(K.unit_sums(torch.ones(2, 3)), 3, "normalized", positive=True)
    before = K.get_kernel()
    with K.use_kernel("compiled"):
        assert K.get_kernel() == "compiled"
    assert K.get_kernel() == before


def test_non_finite_input_is_flagged() -> None:
    x = _batch(6)
    assert K.sums_finite(K.unit_sums(x))
    x[1, 0, 0, 0] = float("nan")
    assert not K.sums_finite(K.unit_sums(x))
    x[1, 0, 0, 0] = float("inf")
    assert not K.sums_finite(K.unit_sums(x, split=True))


@pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("clang++") is None,
    reason="torch.compile on CPU needs a C++ compiler (apt-get install g++)",
)
def test_compiled_kernel_matches_eager() -> None:
    x = _batch(3, (9, 5, 4, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback to eager allowed here
        c = K.unit_sums(x, split=True, kernel="compiled")
    e = K.unit_sums(x, split=True, kernel="eager")
    for got, want in zip(c, e, strict=True):
        assert got is not None and want is not None
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert K.compiled_available()


def test_compile_failure_falls_back_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(split: bool, units: torch.Tensor):  # type: ignore[no-untyped-def]
        def fn(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            raise RuntimeError("no compiler here")

        return fn

    monkeypatch.setattr(K, "_compiled", broken)
    monkeypatch.setattr(K, "_COMPILE_BROKEN", [])
    x = _batch(4)
    with pytest.warns(RuntimeWarning, match="no compiler here.*eager"):
        u = K.unit_sums(x, kernel="compiled")
    torch.testing.assert_close(u.s, K.unit_sums(x, kernel="eager").s)
    assert not K.compiled_available()


# --------------------------------------------------------------------------------------------
# capture: one pass per layer, the ReLU measured from its input's pass


def _cnn(inplace: bool) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1),
        nn.ReLU(inplace=inplace),
        nn.Conv2d(6, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=inplace),
        nn.Flatten(),
        nn.Linear(4 * 36, 8),
        nn.ReLU(inplace=inplace),
    ).eval()


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("kernel", ["eager", "compiled"])
def test_capture_one_pass_matches_measure_functions(inplace: bool, kernel: str) -> None:
    if kernel == "compiled" and shutil.which("g++") is None and shutil.which("clang++") is None:
        pytest.skip("torch.compile on CPU needs a C++ compiler")
    net = _cnn(inplace)
    x = torch.randn(7, 2, 6, 6)
    opts = {"perplexity": {"variant": "relative"}, "entropy": {"transform": "relu"}}
    with (
        torch.no_grad(),
        capture(
            net,
            None,
            mode="reduce",
            measures=("perplexity", "entropy", "hoyer"),
            scopes=("layer", "channel", "spatial"),
            measure_options=opts,
            kernel=kernel,
        ) as cap,
    ):
        for _ in range(3):  # the first forward learns which layer feeds a ReLU
            net(x)
        feeds = set(cap._feeds_relu)
    # conv -> ReLU pairs are shared; BatchNorm -> ReLU is not measured, so that ReLU is measured
    # on its own; the Linear is not a default layer
    assert feeds == {"0"}
    with torch.no_grad(), capture(net, None, mode="keep", clone=True) as ref:
        net(x)
    assert set(cap.stats) == set(ref.activations) == {"0", "1", "2", "4", "7"}
    for name, stats in cap.stats.items():
        a = ref.activations[name]
        for key, value in stats.items():
            measure, scope = key.split(":")
            if measure == "perplexity":
                want = perplexity_sparsity(a, scope, variant="relative")
            elif measure == "entropy":
                want = entropy_sparsity(a, scope, transform="relu")
            else:
                from xai_sparsity.measuring.measures import hoyer_sparsity

                want = hoyer_sparsity(a, scope)
            torch.testing.assert_close(value, torch.cat([want] * 3), rtol=0, atol=3e-6)


def test_capture_keeps_precision_for_huge_values_and_reports_nan() -> None:
    net = nn.Sequential(nn.Conv2d(1, 3, 1, bias=False), nn.ReLU()).eval()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([1e28, -2e28, 3e27]).view(3, 1, 1, 1))
    x = torch.rand(4, 1, 5, 5) + 0.5
    with torch.no_grad(), capture(net, None, mode="reduce") as cap:
        net(x)
        net(x)
    for name, t in (("0", net[0](x)), ("1", net(x))):
        want = perplexity_sparsity(t.detach().double())
        got = cap.stats[name]["perplexity:layer"]
        torch.testing.assert_close(got.double(), torch.cat([want, want]), rtol=0, atol=2e-6)
    x[0, 0, 0, 0] = float("nan")
    with torch.no_grad(), capture(net, None, mode="reduce") as cap:
        net(x)
    with pytest.raises(XaiSparsityError, match="not finite"):
        cap.stats["0"]


def test_a_relu_after_an_in_place_change_is_measured_itself() -> None:
    class Shifted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 3, 3)
            self.relu = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.conv(x)
            h.add_(0.5)  # the ReLU sees a changed tensor: no sharing may happen
            return self.relu(h)

    net = Shifted().eval()
    x = torch.randn(3, 1, 6, 6)
    with torch.no_grad(), capture(net, None, mode="reduce") as cap:
        net(x)
        net(x)
    with torch.no_grad():
        want = perplexity_sparsity(torch.relu(net.conv(x) + 0.5))
    torch.testing.assert_close(cap.stats["relu"]["perplexity:layer"], torch.cat([want, want]))


@pytest.mark.parametrize("mode", ["keep", "reduce"])
def test_capture_under_inference_mode(mode: str) -> None:
    net = _cnn(inplace=False)
    x = torch.randn(5, 2, 6, 6)
    with torch.inference_mode(), capture(net, None, mode=mode) as cap:
        net(x)
        net(x)
    with torch.no_grad():
        want = perplexity_sparsity(torch.relu(net[0](x)))
    if mode == "reduce":
        got = cap.stats["1"]["perplexity:layer"]
        torch.testing.assert_close(got, torch.cat([want, want]), rtol=0, atol=2e-6)
    else:
        assert cap.activations["1"].shape == (10, 6, 6, 6)
    table_net = _cnn(inplace=True)
    with torch.inference_mode():
        from xai_sparsity.capturing.hooks import list_layers

        assert len(list_layers(table_net, x)) == 8
