"""Property tests: the statistics engine against the reference measures (measures.py).

One engine computes every measure of capture (reduce mode), sweep and layer_stats; these tests
hold it to the plain definitions for every measure, scope, variant and transform, float32,
float64 and bfloat16 input, dead samples, channels and positions, many chunks, magnitudes from
1e-30 to 1e30, NaN/Inf, and the gradients of the penalty's path. Derandomised: the examples are
the same on every run.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from xai_sparsity.measuring import engine as E
from xai_sparsity.measuring.measures import (
    MEASURES,
    SCOPES,
    compute_measure,
    lifetime_sparsity,
    perplexity_sparsity,
)

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
PROPERTY = settings(derandomize=True, deadline=None, max_examples=60)


@st.composite
def activations(draw: Any, rank: int | None = None) -> torch.Tensor:
    """(B, C, H, W), (B, C, L) or (B, F) activations: signed values with exact zeros, per-sample
    magnitudes from 1e-30 to 1e30, and dead samples, channels and positions."""
    rank = draw(st.sampled_from([2, 3, 4])) if rank is None else rank
    b = draw(st.integers(1, 6))
    dims = [draw(st.integers(1, 5)) for _ in range(rank - 1)]
    if rank == 2:
        dims[0] = max(dims[0], 2)
    values = draw(
        arrays(
            np.float64,
            (b, *dims),
            elements=st.one_of(st.just(0.0), st.floats(-1e3, 1e3).filter(lambda v: abs(v) > 1e-3)),
        )
    )
    x = torch.from_numpy(values)
    exponent = draw(st.lists(st.integers(-30, 30), min_size=b, max_size=b))
    x = x * torch.tensor([10.0**e for e in exponent], dtype=torch.float64).view(
        -1, *[1] * (rank - 1)
    )
    if draw(st.booleans()):
        x[draw(st.integers(0, b - 1))] = 0.0  # a dead sample
    if rank > 2 and draw(st.booleans()):
        x[:, draw(st.integers(0, dims[0] - 1))] = 0.0  # a dead channel
    if rank > 2 and draw(st.booleans()):
        x[..., draw(st.integers(0, dims[-1] - 1))] = 0.0  # dead positions
    return x


OPTIONS = st.fixed_dictionaries(
    {
        "perplexity": st.fixed_dictionaries(
            {
                "variant": st.sampled_from(["normalized", "relative"]),
                "transform": st.sampled_from(["abs", "relu"]),
            }
        ),
        "entropy": st.fixed_dictionaries({"transform": st.sampled_from(["abs", "relu"])}),
        "hoyer": st.fixed_dictionaries({"transform": st.sampled_from(["abs", "relu"])}),
        "zero_fraction": st.fixed_dictionaries({"tol": st.sampled_from([0.0, 0.5])}),
    }
)


def _tol(dtype: torch.dtype) -> float:
    return 1e-9 if dtype == torch.float64 else 3e-5


def _assert_matches(got: torch.Tensor, want: torch.Tensor, atol: float, what: object) -> None:
    assert got.shape == want.shape, what
    assert got.dtype == want.dtype, what
    torch.testing.assert_close(got, want, rtol=0, atol=atol, equal_nan=True, msg=str(what))


def _engine_values(
    x: torch.Tensor, options: dict[str, dict[str, Any]], *, relu: bool = False
) -> tuple[dict[str, torch.Tensor], E.Sums, E.Plan]:
    plan = E.Plan(tuple(MEASURES), SCOPES, options)
    sums = E.batch_sums(x, plan.request(x, relu=relu))
    return plan.values(sums, x), sums, plan


def _reference(x: torch.Tensor, options: dict[str, dict[str, Any]]) -> dict[str, torch.Tensor]:
    want = {}
    for m in MEASURES:
        for scope in SCOPES:
            if E.scope_size(scope, x.shape) >= 2:
                want[f"{m}:{scope}"] = compute_measure(
                    m, x, scope, check_finite=False, **options[m]
                )
    return want


@PROPERTY
@given(activations(), OPTIONS, st.sampled_from(list(DTYPES)), st.booleans())
def test_every_measure_scope_and_option_matches_the_reference(
    x64: torch.Tensor, options: dict[str, dict[str, Any]], dtype: str, relu: bool
) -> None:
    """All four measures at every scope that applies, from one pass, equal the measure
    functions; ``relu``: the pass also gives the sums of relu(x), whose values are those of a
    ReLU's output (both transforms)."""
    x = x64.to(DTYPES[dtype])
    got, sums, plan = _engine_values(x, options, relu=relu)
    want = _reference(x, options)
    assert set(got) == set(want)
    for key, value in want.items():
        _assert_matches(got[key], value, _tol(x.dtype), (key, dtype))
    if relu and x.dim() >= 3:
        pos = plan.values(sums.positive(), x)
        for key, value in _reference(torch.relu(x), options).items():
            _assert_matches(pos[key], value, _tol(x.dtype), ("relu", key, dtype))


@PROPERTY
@given(activations(), OPTIONS, st.sampled_from(list(DTYPES)))
def test_measure_is_compute_measure_without_autograd(
    x64: torch.Tensor, options: dict[str, dict[str, Any]], dtype: str
) -> None:
    """``engine.measure`` (one measure, one scope, one pass) equals ``compute_measure``."""
    x = x64.to(DTYPES[dtype])
    for m in MEASURES:
        for scope in SCOPES:
            if E.scope_size(scope, x.shape) >= 2:
                got = E.measure(m, x, scope, check_finite=False, **options[m])
                want = compute_measure(m, x, scope, check_finite=False, **options[m])
                _assert_matches(got, want, _tol(x.dtype), (m, scope, dtype))


def test_measure_reports_bad_input_as_the_measure_functions_do() -> None:
    from xai_sparsity import XaiSparsityError

    x = torch.rand(3, 4, 5, 5)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(XaiSparsityError, match="NaN or Inf"):
        E.measure("perplexity", x)
    assert torch.isnan(E.measure("perplexity", x, check_finite=False)[0])
    with pytest.raises(XaiSparsityError, match="variant='bogus'"):
        E.measure("perplexity", torch.rand(2, 5), variant="bogus")
    with pytest.raises(XaiSparsityError, match="hoyer_sparsity"):
        E.measure("hoyer", torch.rand(2, 1, 1, 1), "channel")  # N = 1 unit


@PROPERTY
@given(activations(rank=4), OPTIONS, st.integers(1, 40))
def test_chunks_do_not_change_the_values(
    x64: torch.Tensor, options: dict[str, dict[str, Any]], chunk: int
) -> None:
    """Any chunk size (one value per chunk, a partial last chunk, one chunk) gives the same."""
    x = x64.float()
    whole, _, _ = _engine_values(x, options, relu=True)
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(E, "CHUNK_ELEMENTS", chunk)
        chunked, _, _ = _engine_values(x, options, relu=True)
    finally:
        mp.undo()
    for key, value in whole.items():
        _assert_matches(chunked[key], value, 2e-6, key)


@PROPERTY
@given(activations(rank=4), st.data())
def test_nan_and_inf_stay_in_their_units(x64: torch.Tensor, data: Any) -> None:
    """A NaN or Inf makes the values of the groups that hold it non-finite (as the measure
    functions do) and leaves every other group as the measure functions give it."""
    x = x64.float()
    index = tuple(data.draw(st.integers(0, d - 1)) for d in x.shape)
    x[index] = data.draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
    options = {"perplexity": {}, "entropy": {}, "hoyer": {}, "zero_fraction": {}}
    got, sums, _ = _engine_values(x, options)
    assert not E.sums_finite(sums)
    for key, want in _reference(x, options).items():
        finite = torch.isfinite(want)
        assert torch.equal(torch.isfinite(got[key]), finite), key
        _assert_matches(got[key][finite], want[finite], 3e-5, key)


@PROPERTY
@given(activations(rank=4), st.sampled_from(SCOPES), st.sampled_from(["abs", "relu"]))
def test_gradients_match_the_reference(x64: torch.Tensor, scope: str, transform: str) -> None:
    """The penalty's path (values from one pass, chunked backward) has the values and the
    gradients of the guarded reference, 0 at exact zeros and for dead maps."""
    if E.scope_size(scope, x64.shape) < 2:
        return
    x = x64 / x64.abs().flatten(1).amax(1).clamp_min(1e-300).view(-1, 1, 1, 1)  # O(1) values
    options = {
        "perplexity": {"variant": "relative", "transform": transform},
        "entropy": {"transform": transform},
    }
    plan = E.Plan(("perplexity", "entropy"), (scope,), options)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    got = plan.grad_values(xa)
    weights = torch.linspace(0.5, 1.5, got[f"perplexity:{scope}"].numel(), dtype=x.dtype)
    total = sum((v * weights.view_as(v)).sum() for v in got.values())
    assert isinstance(total, torch.Tensor)
    total.backward()
    want = 0.0
    for m, opts in options.items():
        ref = compute_measure(m, xb, scope, **opts)
        _assert_matches(got[f"{m}:{scope}"].detach(), ref.detach(), 1e-10, m)
        want = want + (ref * weights.view_as(ref)).sum()
    assert isinstance(want, torch.Tensor)
    want.backward()
    assert xa.grad is not None and xb.grad is not None
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-7, atol=1e-9)


@PROPERTY
@given(activations(), st.sampled_from(list(DTYPES)), st.booleans(), st.booleans())
def test_layer_stats_match_the_reference(
    x64: torch.Tensor, dtype: str, hoyer: bool, zeros: bool
) -> None:
    x = x64.to(DTYPES[dtype])
    if x[0].numel() < 2:
        return
    got = E.layer_stats(x, hoyer=hoyer, zeros=zeros)
    tol = _tol(torch.float32)
    for m in ("perplexity", "entropy") + ("hoyer",) * hoyer + ("zero_fraction",) * zeros:
        _assert_matches(got[m], compute_measure(m, x, "layer").float(), tol, m)
    xf = x.float()
    if x.dim() >= 3:
        unit = xf.abs().flatten(2).sum(2)
        torch.testing.assert_close(got["unit_sum"], unit, rtol=1e-5, atol=1e-5 * unit.max())
        if E.scope_size("channel", x.shape) >= 2:
            _assert_matches(got["channel"], perplexity_sparsity(x, "channel").float(), tol, "ch")
    else:
        assert torch.equal(got["unit_sum"], xf.abs())


@PROPERTY
@given(activations(rank=4), st.sampled_from(list(DTYPES)))
def test_unit_sums_match_their_definition(x64: torch.Tensor, dtype: str) -> None:
    """S, T of |x| / m_b and of relu(x) / m_b per sample and channel, m_b = mean |x| (1 if 0)."""
    x = x64.to(DTYPES[dtype])
    u = E.unit_sums(x, split=True, kernel="eager")
    xd = x.double()
    mean = xd.abs().flatten(1).mean(1)
    scale = torch.where(mean > 0, mean, 1.0)
    a = xd.abs().flatten(2) / scale.view(-1, 1, 1)
    pos = xd.clamp_min(0).flatten(2) / scale.view(-1, 1, 1)
    assert u.s.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    assert u.s_pos is not None and u.t_pos is not None
    tol = 1e-12 if x.dtype == torch.float64 else 1e-5
    for got, want in (
        (u.scale.double() / scale, torch.ones_like(scale)),
        (u.s, a.sum(2)),
        (u.t, torch.xlogy(a, a).sum(2)),
        (u.s_pos, pos.sum(2)),
        (u.t_pos, torch.xlogy(pos, pos).sum(2)),
    ):
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * a.shape[2])


@PROPERTY
@given(
    activations(rank=4),
    st.sampled_from(["normalized", "relative"]),
    st.sampled_from(["abs", "relu"]),
)
def test_lifetime_from_streamed_sums_matches_the_reference(
    x64: torch.Tensor, variant: str, transform: str
) -> None:
    """S, T over the samples of the per-channel means (the sweep's lifetime) give
    lifetime_sparsity, also when the samples come in two parts."""
    if x64.shape[0] < 2:
        return
    need = E.Need()
    req = E.Request(need if transform == "abs" else None, need if transform == "relu" else None)
    s = t = None
    for part in (x64[:1], x64[1:]):
        sums = E.batch_sums(part, req).part(transform)
        means = sums.c("s") * sums.scale.view(-1, 1) / part[0, 0].numel()
        ds, dt = E.entropy_sums(means, 0)
        s, t = (ds, dt) if s is None or t is None else (s + ds, t + dt)
    assert s is not None and t is not None
    got = E.sparsity_from_sums(s, t, x64.shape[0], variant)
    want = lifetime_sparsity(x64, variant, transform)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)


@PROPERTY
@given(
    activations(rank=4),
    st.sampled_from(["normalized", "relative", "entropy"]),
    st.booleans(),
    st.booleans(),
)
def test_layer_and_channel_from_unit_sums_match_the_reference(
    x64: torch.Tensor, kind: str, positive: bool, per_unit: bool
) -> None:
    x = x64.float()
    u = E.unit_sums(x, split=True, per_unit=per_unit)
    positions = x[0].numel() // u.s.shape[1]
    scopes = ("layer", "channel") if per_unit else ("layer",)
    got = E.layer_and_channel(u, positions, kind, positive=positive, scopes=scopes)
    t = torch.relu(x) if positive else x
    for scope, value in got.items():
        if kind == "entropy":
            want = compute_measure("entropy", t, scope)
        else:
            want = perplexity_sparsity(t, scope, variant=kind)
        _assert_matches(value, want, 3e-5, (scope, kind))
    assert set(got) == {s for s in scopes if E.scope_size(s, x.shape) >= 2}


def test_layer_stats_keys_and_errors() -> None:
    dense = torch.randn(5, 9)
    d = E.layer_stats(dense, hoyer=False, zeros=False)
    assert set(d) == {"perplexity", "entropy", "unit_sum"}
    assert set(E.layer_stats(torch.rand(2, 3, 4, 4))) == {
        "perplexity",
        "entropy",
        "unit_sum",
        "channel",
        "hoyer",
        "zero_fraction",
    }
    with pytest.raises(E.XaiSparsityError, match="at least 2 units"):
        E.layer_stats(torch.ones(3, 1))


@PROPERTY
@given(activations(rank=4), OPTIONS, st.booleans())
def test_the_accelerator_path_gives_the_same_values(
    x64: torch.Tensor, options: dict[str, dict[str, Any]], relu: bool
) -> None:
    """The pass as it runs on accelerators (one chunk, no host sync: a NaN/Inf sample gets
    m_b = 1), here on the CPU: the same values for finite input."""
    x = x64.float()
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(E, "_chunked", lambda device: False)
        got, sums, plan = _engine_values(x, options, relu=relu)
        grads = E.Plan(("perplexity",), ("channel",), {}).grad_values(x.clone().requires_grad_())
    finally:
        mp.undo()
    for key, value in _reference(x, options).items():
        _assert_matches(got[key], value, 3e-5, key)
    if relu:
        for key, value in _reference(torch.relu(x), options).items():
            _assert_matches(plan.values(sums.positive(), x)[key], value, 3e-5, ("relu", key))
    if E.scope_size("channel", x.shape) >= 2:
        want = perplexity_sparsity(x, "channel")
        _assert_matches(grads["perplexity:channel"].detach(), want, 3e-5, "grad path")
