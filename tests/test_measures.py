"""Analytic, gradient, robustness and property tests of xai_sparsity.measuring.measures."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from xai_sparsity import XaiSparsityError
from xai_sparsity.measuring.measures import (
    MEASURES,
    SCOPES,
    compute_measure,
    entropy_sparsity,
    hoyer_sparsity,
    lifetime_sparsity,
    perplexity_sparsity,
    zero_fraction,
)

# a, PP, s = (N-PP)/(N-1), 1 - PP/N, zero fraction, Hoyer   (SCIENCE.md worked values)
WORKED = [
    ([1, 1, 1, 1], 4.00000, 0.00000, 0.00000, 0.00, 0.00000),
    ([1, 1, 0, 0], 2.00000, 0.66667, 0.50000, 0.50, 0.58579),
    ([1, 0, 0, 0], 1.00000, 1.00000, 0.75000, 0.75, 1.00000),
    ([3, 1, 0, 0], 1.75477, 0.74841, 0.56131, 0.50, 0.73509),
    ([4, 3, 2, 1], 3.59612, 0.13463, 0.10097, 0.00, 0.17426),
]
TOL = 1e-5  # the table has 5 decimals: compare to half a unit in the last place plus rounding
TABLE_TOL = 0.5e-5 + 1e-6

# differentiable measures: name -> function(x, scope)
DIFF: dict[str, Callable[[torch.Tensor, str], torch.Tensor]] = {
    "perplexity": lambda x, sc: perplexity_sparsity(x, sc),
    "perplexity_relative": lambda x, sc: perplexity_sparsity(x, sc, variant="relative"),
    "perplexity_relu": lambda x, sc: perplexity_sparsity(x, sc, transform="relu"),
    "entropy": lambda x, sc: entropy_sparsity(x, sc),
    "hoyer": lambda x, sc: hoyer_sparsity(x, sc),
}


def _both_paths(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
    """Results without autograd and with it (one guarded form: the same values)."""
    with torch.no_grad():
        fast = fn(x)
    xg = x.detach().clone().requires_grad_(True)
    guarded = fn(xg)
    assert guarded.requires_grad
    assert not fast.requires_grad
    return [fast, guarded.detach()]


# --------------------------------------------------------------------------------------------
# worked values


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("a", "pp", "s", "rel", "zf", "hoyer"), WORKED)
def test_worked_values(
    a: list[float], pp: float, s: float, rel: float, zf: float, hoyer: float, dtype: torch.dtype
) -> None:
    x = torch.tensor([a], dtype=dtype)
    n = len(a)
    for got in _both_paths(perplexity_sparsity, x):
        assert got.dtype == dtype
        assert got.shape == (1,)
        assert got.item() == pytest.approx(s, abs=TABLE_TOL)
        assert (n - got.item() * (n - 1)) == pytest.approx(pp, abs=TABLE_TOL * n)
    for got in _both_paths(lambda t: perplexity_sparsity(t, variant="relative"), x):
        assert got.item() == pytest.approx(rel, abs=TABLE_TOL)
        assert n * (1 - got.item()) == pytest.approx(pp, abs=TABLE_TOL * n)
    for got in _both_paths(hoyer_sparsity, x):
        assert got.item() == pytest.approx(hoyer, abs=TABLE_TOL)
    for got in _both_paths(entropy_sparsity, x):
        assert got.item() == pytest.approx(1 - math.log(pp) / math.log(n), abs=TABLE_TOL)
    assert zero_fraction(x).item() == pytest.approx(zf, abs=1e-12)
    # the same through the registry, and with the signs flipped (transform "abs")
    assert compute_measure("perplexity", -x).item() == pytest.approx(s, abs=TABLE_TOL)
    assert compute_measure("hoyer", -x, "layer").item() == pytest.approx(hoyer, abs=TABLE_TOL)


def test_worked_values_in_every_scope() -> None:
    """[3, 1, 0, 0] placed along the units of each scope gives the table's value everywhere."""
    v = torch.tensor([3.0, 1.0, 0.0, 0.0])
    spatial = v.view(1, 4, 1, 1).expand(2, 4, 3, 5).contiguous()  # units along C
    channel = v.view(1, 1, 2, 2).expand(2, 3, 2, 2).contiguous()  # units along H*W
    assert torch.allclose(perplexity_sparsity(spatial, "spatial"), torch.tensor(0.74841), atol=TOL)
    assert perplexity_sparsity(spatial, "spatial").shape == (2, 3, 5)
    assert torch.allclose(perplexity_sparsity(channel, "channel"), torch.tensor(0.74841), atol=TOL)
    assert perplexity_sparsity(channel, "channel").shape == (2, 3)
    assert zero_fraction(channel, "channel").shape == (2, 3)
    assert torch.allclose(hoyer_sparsity(spatial, "spatial"), torch.tensor(0.73509), atol=TOL)
    # a layer of the same map: N = 4 * 15 with 30 copies of (3, 1) and 30 zeros
    flat = torch.cat([v.repeat(15)]).view(1, 60)
    assert torch.allclose(perplexity_sparsity(spatial[:1], "layer"), perplexity_sparsity(flat))


def test_ranks_and_shapes() -> None:
    assert perplexity_sparsity(torch.rand(2, 5)).shape == (2,)
    assert perplexity_sparsity(torch.rand(2, 3, 7), "channel").shape == (2, 3)
    assert perplexity_sparsity(torch.rand(2, 3, 7), "spatial").shape == (2, 7)
    assert perplexity_sparsity(torch.rand(2, 3, 2, 4, 5), "spatial").shape == (2, 2, 4, 5)
    assert perplexity_sparsity(torch.rand(2, 3, 2, 4, 5), "channel").shape == (2, 3)


def test_channels_last_equals_contiguous() -> None:
    x = torch.rand(3, 8, 5, 6)
    cl = x.to(memory_format=torch.channels_last)
    for name in MEASURES:
        for scope in SCOPES:
            assert torch.allclose(
                compute_measure(name, x, scope), compute_measure(name, cl, scope), atol=1e-6
            )


# --------------------------------------------------------------------------------------------
# gradients


def test_gradient_matches_formula() -> None:
    """ds/da_j = -PP/(N-1) * dH/da_j with dH/da_j = -(ln p_j + H) / S, for positive inputs."""
    a = torch.rand(4, 9, dtype=torch.float64) + 0.05
    x = a.clone().requires_grad_(True)
    perplexity_sparsity(x).sum().backward()
    n = a.shape[1]
    total = a.sum(1, keepdim=True)
    p = a / total
    h = -(p * p.log()).sum(1, keepdim=True)
    dh = -(p.log() + h) / total
    expected = -torch.exp(h) / (n - 1) * dh
    assert x.grad is not None
    assert torch.allclose(x.grad, expected, atol=1e-12, rtol=1e-9)
    # relative variant: ds/da = -PP/N * dH/da; entropy: ds/da = -dH/da / ln N
    x.grad = None
    perplexity_sparsity(x, variant="relative").sum().backward()
    assert torch.allclose(x.grad, -torch.exp(h) / n * dh, atol=1e-12, rtol=1e-9)
    x.grad = None
    entropy_sparsity(x).sum().backward()
    assert torch.allclose(x.grad, -dh / math.log(n), atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("name", list(DIFF))
def test_gradcheck(name: str, scope: str) -> None:
    x = (torch.rand(2, 3, 2, 3, dtype=torch.float64) + 0.1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: DIFF[name](t, scope), (x,), eps=1e-6, atol=1e-5)


def test_gradcheck_dense_and_signed() -> None:
    x = (torch.rand(3, 6, dtype=torch.float64) + 0.1) * torch.tensor([1.0, -1.0] * 3)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: perplexity_sparsity(t), (x,), eps=1e-6, atol=1e-5)
    assert torch.autograd.gradcheck(lambda t: hoyer_sparsity(t), (x,), eps=1e-6, atol=1e-5)


def _hard_cases() -> dict[str, torch.Tensor]:
    rand = torch.rand(2, 4, 3, 3)
    with_zeros = torch.relu(torch.randn(2, 4, 3, 3))
    with_zeros[0, 0] = 0.0  # one dead channel
    one_hot = torch.zeros(2, 4, 3, 3)
    one_hot[:, 1, 2, 0] = 5.0
    return {
        "all_zero": torch.zeros(2, 4, 3, 3),
        "exact_zeros": with_zeros,
        "one_hot": one_hot,
        "constant": torch.full((2, 4, 3, 3), 0.7),
        "huge": rand * 1e30,
        "tiny": rand * 1e-30,
        "fp16": (rand * 6e4).half(),
        "fp16_zeros": with_zeros.half(),
        "bf16": (rand * 1e30).bfloat16(),
        "bf16_zeros": with_zeros.bfloat16(),
    }


@pytest.mark.parametrize("case", list(_hard_cases()))
@pytest.mark.parametrize("name", list(DIFF))
def test_finite_values_and_gradients(case: str, name: str) -> None:
    base = _hard_cases()[case]
    for scope in SCOPES:
        with torch.no_grad():
            fast = DIFF[name](base, scope)
        x = base.clone().requires_grad_(True)
        s = DIFF[name](x, scope)
        assert s.dtype == torch.float32
        assert torch.isfinite(s).all() and torch.isfinite(fast).all()
        assert ((s >= 0) & (s <= 1)).all()
        assert torch.allclose(s.detach(), fast, atol=2e-5), (case, scope)
        (s * torch.linspace(0.5, 1.5, s.numel()).view_as(s)).sum().backward()
        assert x.grad is not None
        assert torch.isfinite(x.grad).all(), (case, scope)


@pytest.mark.parametrize("name", list(DIFF))
def test_dead_map_is_one_with_exactly_zero_gradient(name: str) -> None:
    x = torch.rand(3, 4, 2, 2)
    x[1] = 0.0  # a dead sample (layer scope)
    x[2, 3] = 0.0  # a dead channel (channel scope)
    for scope, dead_index in (("layer", (1,)), ("channel", (2, 3))):
        xg = x.clone().requires_grad_(True)
        s = DIFF[name](xg, scope)
        n = 16 if scope == "layer" else 4
        expected = 1.0 - 1.0 / n if name == "perplexity_relative" else 1.0  # PP = 1
        assert s[dead_index].item() == pytest.approx(expected, abs=1e-7)
        s[dead_index].backward()
        assert xg.grad is not None
        assert torch.count_nonzero(xg.grad) == 0
        assert torch.isfinite(xg.grad).all()


def test_exact_zeros_receive_zero_gradient() -> None:
    x = torch.tensor([[3.0, 1.0, 0.0, 0.0]], requires_grad=True)
    perplexity_sparsity(x).sum().backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    assert x.grad[0, 2:].eq(0).all()
    assert x.grad[0, 0] > 0 > x.grad[0, 1]  # sparser when the big unit grows


def test_overflow_of_float32_sums_is_avoided() -> None:
    """sum_i a_i ln a_i over 6e6 values of 1e30 exceeds float32's range (~4.1e38 > 3.4e38)."""
    base = torch.rand(1, 6_000_000) * 0.5 + 0.5
    reference = perplexity_sparsity(base)
    for scale in (1e30, 1e-30):
        got = perplexity_sparsity(base * scale)
        assert torch.isfinite(got).all()
        assert torch.allclose(got, reference, atol=1e-5)
    assert torch.allclose(hoyer_sparsity(base * 1e30), hoyer_sparsity(base), atol=1e-5)
    assert torch.allclose(entropy_sparsity(base * 1e30), entropy_sparsity(base), atol=1e-5)


def test_reduced_precision_matches_float32() -> None:
    x = torch.rand(2, 8, 4, 4) + 0.01
    for dtype in (torch.float16, torch.bfloat16):
        lowp = x.to(dtype)
        for name in MEASURES:
            got = compute_measure(name, lowp, "channel")
            assert got.dtype == torch.float32
            assert torch.allclose(got, compute_measure(name, lowp.float(), "channel"), atol=1e-6)


def test_reduced_precision_gradients_match_float32() -> None:
    x = torch.randn(2, 3, 4, 4)
    for name in DIFF:
        for dtype in (torch.float16, torch.bfloat16):
            low = x.to(dtype).requires_grad_(True)
            ref = x.to(dtype).float().requires_grad_(True)
            DIFF[name](low, "channel").sum().backward()
            DIFF[name](ref, "channel").sum().backward()
            assert low.grad is not None and ref.grad is not None
            assert low.grad.dtype == dtype
            tol = 2e-3 if dtype == torch.float16 else 2e-2
            assert torch.allclose(low.grad.float(), ref.grad, atol=tol * ref.grad.abs().max())


def test_integer_and_bool_input_are_converted() -> None:
    x = torch.tensor([[3, 1, 0, 0]])
    assert perplexity_sparsity(x).dtype == torch.float32
    assert perplexity_sparsity(x).item() == pytest.approx(0.74841, abs=TABLE_TOL)
    assert zero_fraction(x.bool()).item() == 0.5


# --------------------------------------------------------------------------------------------
# zero fraction, lifetime, registry


def test_zero_fraction_tolerance_and_grad_free() -> None:
    x = torch.tensor([[0.0, 1e-4, -1e-4, 2.0]], requires_grad=True)
    assert zero_fraction(x).item() == 0.25
    assert zero_fraction(x, tol=1e-3).item() == 0.75
    assert not zero_fraction(x).requires_grad


def test_lifetime_sparsity() -> None:
    x = torch.zeros(4, 3, 2, 2)
    x[0, 0] = 1.0  # channel 0 answers to sample 0 only -> s = 1
    x[:, 1] = 2.0  # channel 1 answers to every sample equally -> s = 0
    # channel 2 is never active -> s = 1 (dead)
    s = lifetime_sparsity(x)
    assert s.shape == (3,)
    assert s.tolist() == pytest.approx([1.0, 0.0, 1.0], abs=1e-6)
    dense = torch.tensor([[4.0, 1.0], [3.0, 0.0], [2.0, 0.0], [1.0, 0.0]])
    assert lifetime_sparsity(dense).tolist() == pytest.approx([0.13463, 1.0], abs=TABLE_TOL)
    # equals the layer-scope perplexity of the spatially averaged units, transposed
    y = torch.rand(6, 5, 3, 3)
    assert torch.allclose(lifetime_sparsity(y), perplexity_sparsity(y.mean((2, 3)).T))
    yg = y.clone().requires_grad_(True)
    lifetime_sparsity(yg).sum().backward()
    assert yg.grad is not None and torch.isfinite(yg.grad).all()


def test_registry() -> None:
    assert set(MEASURES) == {"perplexity", "zero_fraction", "hoyer", "entropy"}
    x = torch.rand(2, 3, 4, 4)
    for name, fn in MEASURES.items():
        for scope in SCOPES:
            assert torch.equal(compute_measure(name, x, scope), fn(x, scope))
    assert torch.equal(
        compute_measure("perplexity", x, "channel", variant="relative", check_finite=False),
        perplexity_sparsity(x, "channel", variant="relative"),
    )


# --------------------------------------------------------------------------------------------
# no-grad == autograd, properties (the engine against this reference: tests/test_engine.py)

positive_maps = arrays(
    np.float64,
    st.tuples(st.integers(1, 3), st.integers(2, 12)),
    elements=st.floats(1e-3, 1e3, allow_nan=False, allow_infinity=False),
)
maps_with_zeros = arrays(
    np.float32,
    st.tuples(st.integers(1, 3), st.integers(2, 12)),
    elements=st.one_of(st.just(0.0), st.floats(0.0, 6e4, width=32)),
)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(positive_maps)
def test_fast_and_guarded_paths_agree(a: np.ndarray) -> None:
    x32 = torch.from_numpy(a).float()
    for name in ("perplexity", "entropy", "hoyer"):
        fast, guarded = _both_paths(lambda t, name=name: compute_measure(name, t), x32)
        assert torch.allclose(fast, guarded, atol=1e-5)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    positive_maps,
    st.floats(1e-20, 1e20),
    st.randoms(use_true_random=False),
)
def test_scale_and_permutation_invariance(a: np.ndarray, scale: float, rnd: object) -> None:
    x = torch.from_numpy(a)
    perm = torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(rnd.randint(0, 999)))  # type: ignore[attr-defined]
    for name in ("perplexity", "entropy", "hoyer", "zero_fraction"):
        ref = compute_measure(name, x)
        assert torch.allclose(compute_measure(name, x * scale), ref, atol=1e-9)
        assert torch.allclose(compute_measure(name, x[:, perm]), ref, atol=1e-12)
        assert torch.allclose(compute_measure(name, x.float() * scale), ref.float(), atol=1e-5)


@settings(max_examples=80, deadline=None, derandomize=True)
@given(maps_with_zeros, st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_range_and_finiteness(a: np.ndarray, dtype: torch.dtype) -> None:
    x = torch.from_numpy(a).to(dtype)
    n = x.shape[1]
    for path_result in _both_paths(perplexity_sparsity, x):
        assert torch.isfinite(path_result).all()
        assert ((path_result >= 0) & (path_result <= 1)).all()
    for rel in _both_paths(lambda t: perplexity_sparsity(t, variant="relative"), x):
        assert ((rel >= 0) & (rel <= 1 - 1 / n + 1e-7)).all()
    for name in ("entropy", "hoyer", "zero_fraction"):
        s = compute_measure(name, x)
        assert torch.isfinite(s).all() and ((s >= 0) & (s <= 1)).all()
    xg = x.float().requires_grad_(True)
    (perplexity_sparsity(xg) + entropy_sparsity(xg) + hoyer_sparsity(xg)).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


# --------------------------------------------------------------------------------------------
# bad input

BAD: list[tuple[Callable[[], object], str]] = [
    (lambda: perplexity_sparsity(torch.rand(5)), r"rank >= 2.*\(5\)"),
    (lambda: perplexity_sparsity(torch.rand(0, 3, 4, 4)), r"empty batch.*\(0, 3, 4, 4\)"),
    (lambda: perplexity_sparsity(torch.rand(2, 3), "channel"), r"scope='channel'.*\(2, 3\)"),
    (lambda: hoyer_sparsity(torch.rand(2, 3), "spatial"), r"scope='spatial'.*rank >= 3"),
    (lambda: perplexity_sparsity(torch.rand(2, 3), "chanel"), r"scope='chanel'.*'channel'"),
    (lambda: perplexity_sparsity(torch.rand(2, 3), variant="norm"), r"variant='norm'.*'relative'"),
    (lambda: entropy_sparsity(torch.rand(2, 3), transform="square"), r"transform='square'.*'abs'"),
    (lambda: perplexity_sparsity(torch.rand(2, 1)), r"scope='layer'.*\(2, 1\).*N = 1"),
    (lambda: perplexity_sparsity(torch.rand(2, 8, 1, 1), "channel"), r"\(2, 8, 1, 1\).*N = 1"),
    (lambda: perplexity_sparsity(torch.rand(2, 1, 4, 4), "spatial"), r"scope='spatial'.*N = 1"),
    (
        lambda: perplexity_sparsity(torch.tensor([[1.0, float("nan")]])),
        r"shape \(1, 2\) contains NaN or Inf",
    ),
    (lambda: hoyer_sparsity(torch.tensor([[1.0, float("inf")]])), r"NaN or Inf"),
    (lambda: zero_fraction(torch.tensor([[0.0, float("nan")]])), r"NaN or Inf"),
    (lambda: zero_fraction(torch.rand(2, 3), tol=-1.0), r"tol=-1.0"),
    (lambda: perplexity_sparsity([[1.0, 2.0]]), r"torch.Tensor.*list"),
    (lambda: perplexity_sparsity(torch.ones(2, 3, dtype=torch.complex64)), r"complex"),
    (lambda: compute_measure("perplexty", torch.rand(2, 3)), r"measure='perplexty'.*'perplexity'"),
    (lambda: compute_measure("hoyer", torch.rand(2, 3), tol=0.1), r"no option 'tol'.*'transform'"),
    (lambda: lifetime_sparsity(torch.rand(1, 3, 2, 2)), r"M >= 2.*M = 1"),
]


@pytest.mark.parametrize(("call", "pattern"), BAD)
def test_bad_input_gives_clear_error(call: Callable[[], object], pattern: str) -> None:
    with pytest.raises(XaiSparsityError, match=pattern):
        call()


def test_nan_in_guarded_path_is_reported_or_returned() -> None:
    x = torch.tensor([[1.0, float("nan"), 2.0]], requires_grad=True)
    with pytest.raises(XaiSparsityError, match="NaN or Inf"):
        perplexity_sparsity(x)
    assert torch.isnan(perplexity_sparsity(x, check_finite=False)).all()
