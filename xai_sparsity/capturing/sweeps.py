"""Dataset sweep: sparsity statistics of every selected layer over a whole data loader.

The sweep runs the model in eval mode under ``torch.no_grad`` with a reduce-mode
:func:`~xai_sparsity.capturing.hooks.capture` and streams everything into fixed-size accumulators, so its
memory does not grow with the number of images:

- per (measure, scope): count, sum, sum of squares, min, max and a 1,000-bin histogram on [0, 1]
  (mean, std and quantiles; the measures are bounded);
- per measure: the mean channel-scope value of each channel (C,) and the mean spatial map (H, W);
- per conv layer: a :class:`~xai_sparsity.measuring.correlation.CorrelationAccumulator` (filter
  correlation over positions);
- per unit: lifetime sparsity from S = sum_m a_m and T = sum_m a_m ln a_m over the samples
  (a = the unit's transformed activation, averaged over positions), H = ln S - T / S.

Speed: the four built-in measures come from one chunked pass per layer and transform through
reused buffers (no tensor-sized temporary): per sample and channel, and per sample and position,
the sums S = sum a', T = sum a' ln a' (one ``log`` per element; H = ln S - T / S), sum a'^2 (Hoyer)
and the zero counts, with a' = a scaled per sample; every scope of every measure follows from
them. A selected ``nn.ReLU`` whose input is the output just measured takes its sums from that
layer's pass (the log of |x| serves relu(x) too); the pairing is learnt once per model and checked
by tensor identity and version on every use. Filter correlation uses float32 per-sample Gram
matrices (float64 sums over samples; r to ~1e-6) for float32 models. Values agree with the measure
functions to ~1e-6 in float32 (float64 models: ~1e-12).

>>> import torch, torch.nn as nn
>>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
>>> data = [torch.randn(8, 3, 8, 8) for _ in range(3)]
>>> res = sweep(net, data, progress=False, device="cpu")
>>> res.n_samples, list(res.layers)
(24, ['0', '1'])
>>> res.layers["1"].channel_mean["perplexity"].shape
torch.Size([4])
"""

from __future__ import annotations

import math
import os
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from xai_sparsity.base.errors import XaiSparsityError, check_choice
from xai_sparsity.base.modules import eval_mode, resolve_device, unwrap
from xai_sparsity.capturing.hooks import SCOPES, LayerSpec, capture, scope_applies
from xai_sparsity.measuring.engine import LOG_FLOOR

if TYPE_CHECKING:
    import pandas as pd

    from xai_sparsity.measuring.correlation import CorrelationAccumulator

__all__ = ["LayerSweep", "RunningStats", "SweepResult", "sweep"]

ALL_MEASURES: tuple[str, ...] = ("perplexity", "zero_fraction", "hoyer", "entropy")
BINS = 1000
_INPUT_KEYS: tuple[str, ...] = ("image", "input", "images", "inputs", "x", "pixel_values")


_local = threading.local()


def _values_buffer(slot: int, numel: int, dtype: torch.dtype) -> Tensor:
    """A reused flat CPU buffer (per thread, slot and dtype) of ``numel`` elements."""
    bufs: dict[tuple[int, torch.dtype], Tensor] = _local.__dict__.setdefault("bufs", {})
    buf = bufs.get((slot, dtype))
    if buf is None or buf.numel() < numel or buf.is_inference() != _inference():
        buf = bufs[(slot, dtype)] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def _inference() -> bool:
    return torch.is_inference_mode_enabled()


class RunningStats:
    """Streaming count, mean, std, min, max and quantiles of values in [0, 1].

    Everything stays on the values' device until read, so updating never waits for the device.
    Non-finite values are counted in ``nonfinite`` and left out of the statistics. Quantiles come
    from a 1,000-bin histogram on [0, 1] (linear within a bin, clipped to [min, max]); values
    outside [0, 1] are clamped into the end bins.

    >>> rs = RunningStats()
    >>> rs.update(torch.tensor([0.1, 0.2, 0.3])); rs.update(torch.tensor([0.4]))
    >>> rs.n, round(rs.mean, 6), round(rs.quantile(0.5), 2)
    (4, 0.25, 0.2)
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        dev = torch.device(device) if device is not None else torch.device("cpu")
        f64 = torch.float64
        self._total = 0
        self._nonfinite = torch.zeros((), dtype=torch.int64, device=dev)
        self._sum = torch.zeros((), dtype=f64, device=dev)
        self._sumsq = torch.zeros((), dtype=f64, device=dev)
        self._min = torch.full((), math.inf, dtype=f64, device=dev)
        self._max = torch.full((), -math.inf, dtype=f64, device=dev)
        self._hist = torch.zeros(BINS, dtype=torch.int64, device=dev)

    def update(self, values: Tensor) -> None:
        """Add a tensor of values (any shape)."""
        raw = values.detach().reshape(-1)
        if raw.numel() == 0:
            return
        if raw.device.type == "cpu" and self._sum.device.type == "cpu" and self._update_cpu(raw):
            return
        v = raw.to(self._sum.device, torch.float64)
        finite = torch.isfinite(v)
        vz = torch.where(finite, v, torch.zeros_like(v))
        self._total += v.numel()
        self._nonfinite += (~finite).sum()
        self._sum += vz.sum()
        self._sumsq += (vz * vz).sum()
        self._min = torch.minimum(self._min, torch.where(finite, v, math.inf).min())
        self._max = torch.maximum(self._max, torch.where(finite, v, -math.inf).max())
        idx = (vz.clamp(0.0, 1.0) * BINS).long().clamp_(max=BINS - 1)
        self._hist.index_add_(0, idx, finite.long())

    def _update_cpu(self, raw: Tensor) -> bool:
        """All-finite values on the CPU (where reading a number is free): no masks, an int32
        histogram index and ``bincount``, through reused buffers (a fresh tensor-sized
        temporary costs its page faults). Returns False (nothing done) if a value is NaN/Inf."""
        n = raw.numel()
        v = _values_buffer(0, n, torch.float64)
        v.copy_(raw)
        total = v.sum()
        if not math.isfinite(float(total)):
            return False
        lo, hi = torch.aminmax(v)
        self._total += n
        self._sum += total
        self._sumsq += torch.dot(v, v)
        self._min = torch.minimum(self._min, lo)
        self._max = torch.maximum(self._max, hi)
        if not (float(lo) >= 0 and float(hi) <= 1):
            v.clamp_(0, 1)
        idx = _values_buffer(1, n, torch.int32)
        idx.copy_(v.mul_(BINS)).clamp_(max=BINS - 1)
        self._hist += torch.bincount(idx, minlength=BINS)
        return True

    def merge(self, other: RunningStats) -> RunningStats:
        """Add another accumulator's values into this one (in place); returns self."""
        dev = self._sum.device
        self._total += other._total
        self._nonfinite += other._nonfinite.to(dev)
        self._sum += other._sum.to(dev)
        self._sumsq += other._sumsq.to(dev)
        self._min = torch.minimum(self._min, other._min.to(dev))
        self._max = torch.maximum(self._max, other._max.to(dev))
        self._hist += other._hist.to(dev)
        return self

    @property
    def nonfinite(self) -> int:
        """Number of NaN/Inf values seen (left out of the statistics)."""
        return int(self._nonfinite)

    @property
    def n(self) -> int:
        """Number of finite values."""
        return self._total - self.nonfinite

    @property
    def mean(self) -> float:
        n = self.n
        return float(self._sum) / n if n else math.nan

    @property
    def std(self) -> float:
        """Sample standard deviation (n - 1 in the denominator; 0 for a single value)."""
        n = self.n
        if n == 0:
            return math.nan
        if n == 1:
            return 0.0
        mean = float(self._sum) / n
        var = (float(self._sumsq) - n * mean * mean) / (n - 1)
        return math.sqrt(max(var, 0.0))

    @property
    def min(self) -> float:
        return float(self._min) if self.n else math.nan

    @property
    def max(self) -> float:
        return float(self._max) if self.n else math.nan

    @property
    def histogram(self) -> Tensor:
        """(1000,) int64 counts of the bins [k/1000, (k+1)/1000)."""
        return self._hist.cpu()

    def quantile(self, q: float) -> float:
        """The q-quantile (0 <= q <= 1), accurate to the bin width 1e-3."""
        if not 0.0 <= q <= 1.0:
            raise XaiSparsityError(f"quantile q={q!r} must be in [0, 1]")
        n = self.n
        if n == 0:
            return math.nan
        hist = self._hist.cpu().to(torch.float64)
        cdf = torch.cumsum(hist, 0)
        target = q * n
        b = int(torch.searchsorted(cdf, torch.tensor([target], dtype=torch.float64))[0])
        b = min(b, BINS - 1)
        below = float(cdf[b - 1]) if b > 0 else 0.0
        inside = float(hist[b])
        frac = (target - below) / inside if inside > 0 else 0.0
        value = (b + min(max(frac, 0.0), 1.0)) / BINS
        return min(max(value, self.min), self.max)

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors that restore this accumulator with :meth:`load_state_dict`."""
        return {
            "total": torch.tensor(self._total),
            "nonfinite": self._nonfinite.cpu(),
            "sum": self._sum.cpu(),
            "sumsq": self._sumsq.cpu(),
            "min": self._min.cpu(),
            "max": self._max.cpu(),
            "hist": self._hist.cpu(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        dev = self._sum.device
        self._total = int(state["total"])
        self._nonfinite = torch.as_tensor(state["nonfinite"], dtype=torch.int64, device=dev)
        for key in ("sum", "sumsq", "min", "max"):
            setattr(self, f"_{key}", torch.as_tensor(state[key], dtype=torch.float64, device=dev))
        self._hist = torch.as_tensor(state["hist"], dtype=torch.int64, device=dev)

    def __repr__(self) -> str:
        return f"RunningStats(n={self.n}, mean={self.mean:.4g}, std={self.std:.4g})"


@dataclass
class LayerSweep:
    """What a sweep accumulated for one layer (one call of a reused module).

    Attributes:
        name: the layer name (``name#k`` for call k of a module called several times).
        shape: the per-sample output shape.
        stats: ``(measure, scope) -> RunningStats`` over all per-sample values.
        channel_mean: ``measure -> (C,)`` mean channel-scope value per channel.
        spatial_mean: ``measure -> (H, W)`` mean spatial-scope map.
        correlation: filter correlation over positions (conv-like outputs with C >= 2), or None.
        lifetime: (C,) lifetime sparsity per unit, or None (fewer than 2 samples).
        n_samples: the number of samples seen.
    """

    name: str
    shape: tuple[int, ...]
    stats: dict[tuple[str, str], RunningStats] = field(default_factory=dict)
    channel_mean: dict[str, Tensor] = field(default_factory=dict)
    spatial_mean: dict[str, Tensor] = field(default_factory=dict)
    correlation: CorrelationAccumulator | None = None
    lifetime: Tensor | None = None
    n_samples: int = 0


_CHUNK_ELEMENTS = 1 << 18
"""Elements per chunk of the fused statistics pass (per slot): the buffers stay in cache."""

_FUSED_OPTIONS: dict[str, frozenset[str]] = {
    "perplexity": frozenset({"variant", "transform"}),
    "entropy": frozenset({"transform"}),
    "hoyer": frozenset({"transform"}),
    "zero_fraction": frozenset({"tol"}),
}
"""Measures (and their options) the fused pass computes; any other goes through its function."""

_K = {torch.float32: 2.0**20, torch.float64: 1.0}
"""The scaled values are a' = K a / mean(a) per sample: ln a' stays small (entropy sums keep
their digits) and K lifts values far below the mean above float32's underflow for the squares;
(K a')^2 <= (K C P)^2 overflows only beyond 10^13 elements per sample."""


class _Need(NamedTuple):
    """What one transform of a layer's output must give: entropy sums (``log``), sums of squares
    (``sq``), zero counts (``zero``: |x| <= ``tol``), the per-position sums (``spatial``)."""

    log: bool = False
    sq: bool = False
    zero: bool = False
    tol: float = 0.0
    spatial: bool = False

    def merged(self, other: _Need) -> _Need:
        return _Need(
            self.log or other.log,
            self.sq or other.sq,
            self.zero or other.zero,
            other.tol if other.zero else self.tol,
            self.spatial or other.spatial,
        )

    def slots(self) -> dict[str, int]:
        names = ["s"] + ["t"] * self.log + ["q"] * self.sq + ["z"] * self.zero
        return {n: i for i, n in enumerate(names)}


class _Scratch:
    """Reused flat buffers per (name, dtype, device), shared by the layers of a sweep: with
    glibc's mmap threshold every fresh tensor-sized temporary would cost its page faults."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        key = (name, dtype, device)
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < numel or buf.is_inference() != _inference():
            buf = self._bufs[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]


class _Sums:
    """Sums of one transformed output a (B, C, P) per sample, stacked by slot.

    With a' = f_b a (``factor`` f_b = K / mean a, or 1 when nothing needs the scaling), slot
    ``"s"`` = sum a', ``"t"`` = sum a' ln a', ``"q"`` = sum a'^2, ``"z"`` = count of |x| <= tol;
    :meth:`c` gives them per channel (B, C) (summed over positions), :meth:`p` per position
    (B, P) (summed over channels). H = ln S - T / S and the Hoyer ratio S / sqrt(Q) do not
    depend on f_b; the raw channel sums are ``c("s") / factor``. The sums live in scratch
    buffers (``tag``) that the next pass with the same tag overwrites.
    """

    def __init__(
        self, need: _Need, tag: str, shape: tuple[int, int, int], like: Tensor, scratch: _Scratch
    ) -> None:
        b, c, p = shape
        dtype, dev = like.dtype, like.device
        self.need = need
        self.slot = need.slots()
        k = len(self.slot)
        self.cs = scratch.get(f"{tag}:c", b * k * c, dtype, dev).view(b, k, c)
        self.ps: Tensor | None = None
        if need.spatial:
            self.ps = scratch.get(f"{tag}:p", b * k * p, dtype, dev).view(b, k, p)
        self.factor = scratch.get(f"{tag}:f", b, dtype, dev)

    def c(self, name: str) -> Tensor:
        return self.cs[:, self.slot[name]]

    def p(self, name: str) -> Tensor:
        assert self.ps is not None
        return self.ps[:, self.slot[name]]


def _load(xc: Tensor, out: Tensor, transform: str) -> None:
    if xc.dtype == out.dtype:
        if transform == "abs":
            torch.abs(xc, out=out)
        else:
            torch.clamp_min(xc, 0, out=out)
    else:
        out.copy_(xc)
        out.abs_() if transform == "abs" else out.clamp_min_(0)


def _zeros(a: Tensor, tol: float, out: Tensor) -> None:
    """1 where a <= tol (a = |x| before scaling; NaN counts as non-zero, as in zero_fraction)."""
    if tol == 0:
        torch.eq(a, 0, out=out)
    else:
        torch.le(a, tol, out=out)


def _batch_sums(
    units: Tensor,
    plan: Mapping[str, _Need],
    scratch: _Scratch,
    relu: _Need | None = None,
) -> tuple[dict[str, _Sums], _Sums | None]:
    """:class:`_Sums` of every transform in ``plan`` from one chunked pass over ``units``.

    Per chunk of samples the transform is written into slot 0 of a reused (k, slots, C, P)
    buffer and scaled per sample in place; ``ln max(a', floor)`` goes to one more buffer (one log
    per element), a' ln a', a'^2 and the zero indicator to the other slots, and two stacked
    reductions (over positions, over channels) write every sum into the batch's sum buffers.
    Nothing tensor-sized is allocated.

    ``relu``: also the sums of relu(x), the output of a ReLU that follows this layer, reusing the
    log buffer of the ``"abs"`` transform (added to the plan if missing): ln relu(x)' =
    ln |x|' where relu(x) > 0, and the terms are 0 elsewhere.

    Args:
        units: (B, C, P) layer output.
        plan: ``transform -> _Need``.
        scratch: the reused buffers.
        relu: what the following ReLU needs, or None.

    Returns:
        ``transform -> _Sums`` and the ReLU's ``_Sums`` (or None).
    """
    dtype = torch.float64 if units.dtype == torch.float64 else torch.float32
    floor, big = LOG_FLOOR[dtype], _K[dtype]
    b, c, p = units.shape
    per = max(1, c * p)
    plan = dict(plan)
    if relu is not None:  # the ReLU's sums need the scale and (for entropy) the log of |x|
        plan["abs"] = plan.get("abs", _Need()).merged(_Need(log=relu.log, sq=True))
    k = max(1, min(b, _CHUNK_ELEMENTS // per))
    dev = units.device
    like = torch.empty(0, dtype=dtype, device=dev)
    out = {
        t: _Sums(need, f"sums{i}", (b, c, p), like, scratch)
        for i, (t, need) in enumerate(plan.items())
    }
    relu_sums = None if relu is None else _Sums(relu, "relu", (b, c, p), like, scratch)

    def views(n: int) -> tuple[dict[str, tuple[Tensor, ...]], Tensor, tuple[Tensor, ...]]:
        """The buffers of a chunk of n samples: per transform (stack, a, slots...), the log,
        the ReLU's (stack, relu(x), slots...); built once per batch and chunk size."""
        per_t = {}
        for t, res in out.items():
            w = scratch.get("work", len(res.slot) * n * per, dtype, dev).view(n, -1, c, p)
            per_t[t] = (w, *(w[:, i] for i in range(len(res.slot))))
        lg = scratch.get("log", n * per, dtype, dev).view(n, c, p)
        rv: tuple[Tensor, ...] = ()
        if relu_sums is not None:
            r = scratch.get("relu", len(relu_sums.slot) * n * per, dtype, dev).view(n, -1, c, p)
            rv = (r, *(r[:, i] for i in range(len(relu_sums.slot))))
        return per_t, lg, rv

    full = views(k)
    rest = views(b % k) if b % k else full
    splits = {
        t: (res.factor.split(k), res.cs.split(k), None if res.ps is None else res.ps.split(k))
        for t, res in out.items()
    }
    r_splits = None
    if relu_sums is not None:
        ps = None if relu_sums.ps is None else relu_sums.ps.split(k)
        r_splits = (relu_sums.cs.split(k), ps)
    for i, start in enumerate(range(0, b, k)):
        xc = units[start : start + k]
        n = xc.shape[0]
        per_t, lg, rv = full if n == k else rest
        for t, need in plan.items():
            res = out[t]
            w, a, *slots = per_t[t]
            factors, cs, ps = splits[t]
            factor = factors[i]
            _load(xc, a, t)
            if need.zero:
                _zeros(a, need.tol, slots[res.slot["z"] - 1])
            if need.log or need.sq:
                torch.div(big * per, a.sum(dim=(1, 2)), out=factor)  # K / mean
                factor.nan_to_num_(nan=1.0, posinf=1.0)  # all-zero or NaN map: 1
                factor.masked_fill_(factor == 0, 1.0)  # an Inf in the map: 1
                a.mul_(factor.view(n, 1, 1))
            else:
                factor.fill_(1.0)
            if need.log:
                torch.clamp_min(a, floor, out=lg)
                lg.log_()
                torch.mul(a, lg, out=slots[res.slot["t"] - 1])
            if need.sq:
                torch.mul(a, a, out=slots[res.slot["q"] - 1])
            torch.sum(w, dim=3, out=cs[i])
            if ps is not None:
                torch.sum(w, dim=2, out=ps[i])
            if t == "abs" and relu is not None and relu_sums is not None:
                assert r_splits is not None
                r, pos, *rslots = rv
                _load(xc, pos, "relu")
                if relu.zero:
                    _zeros(pos, relu.tol, rslots[relu_sums.slot["z"] - 1])
                pos.mul_(factor.view(n, 1, 1))
                if relu.log:
                    torch.mul(pos, lg, out=rslots[relu_sums.slot["t"] - 1])
                if relu.sq:
                    torch.mul(pos, pos, out=rslots[relu_sums.slot["q"] - 1])
                torch.sum(r, dim=3, out=r_splits[0][i])
                if r_splits[1] is not None:
                    torch.sum(r, dim=2, out=r_splits[1][i])
    if relu_sums is not None:
        relu_sums.factor.copy_(out["abs"].factor)
    return out, relu_sums


def _entropy_h(s: Tensor, t: Tensor, out: Tensor, tmp: Tensor) -> Tensor:
    """H = ln S - T / S into ``out``, >= 0; a dead group (S = 0, so T = 0) gets H = 0."""
    torch.clamp_min(s, torch.finfo(out.dtype).tiny, out=tmp)
    torch.div(t, tmp, out=out)
    return torch.sub(tmp.log_(), out, out=out).clamp_min_(0.0)


def _entropy_measure(h: Tensor, n: int, kind: str, out: Tensor) -> Tensor:
    """Perplexity (``kind`` a variant) or entropy sparsity of groups of N units from their
    entropy H, into ``out``; H = 0 (a dead group) gives 1 (1 - 1/N for "relative"), as in
    :mod:`xai_sparsity.measuring.measures`."""
    if kind == "entropy":
        return torch.mul(h, -1.0 / math.log(n), out=out).add_(1.0).clamp_(0.0, 1.0)
    torch.exp(h, out=out)  # PP
    if kind == "normalized":
        return out.sub_(n).div_(1.0 - n).clamp_(0.0, 1.0)
    return out.div_(-n).add_(1.0).clamp_(0.0, 1.0 - 1.0 / n)


def _hoyer_measure(s: Tensor, q: Tensor, n: int, out: Tensor, tmp: Tensor) -> Tensor:
    """Hoyer sparsity of groups of N values from S = sum a, Q = sum a^2 into ``out`` (1 if all
    zero: S = Q = 0 gives the ratio 0, clamped to 1)."""
    tiny = torch.finfo(out.dtype).tiny
    torch.clamp_min(q, tiny, out=tmp).sqrt_()
    torch.div(s, tmp, out=out)
    root_n = math.sqrt(n)
    return out.sub_(root_n).div_(1.0 - root_n).clamp_(0.0, 1.0)


class _LayerAccumulator:
    """Streams one layer's outputs into a :class:`LayerSweep` (device-side, no host syncs).

    The measures of :data:`_FUSED_OPTIONS` come from shared chunked passes over one transformed
    buffer per transform (:func:`_batch_sums`): one ``log`` per element serves perplexity and
    entropy at every scope, the same buffer gives the Hoyer sums, zero counts and the channel
    means that lifetime sparsity needs. Other measures go through their measure functions. A
    ReLU layer whose input is the previous layer's output can take its sums from that layer's
    pass (``shared``; see :func:`sweep`).
    """

    def __init__(
        self,
        name: str,
        out: Tensor,
        measures: Sequence[str],
        scopes: Sequence[str],
        options: Mapping[str, Mapping[str, Any]],
        correlation: bool,
        lifetime: bool,
        scratch: _Scratch | None = None,
    ) -> None:

        self.name = name
        self.shape = tuple(out.shape[1:])
        self.device = out.device
        self.dtype = out.dtype
        self.measures = tuple(measures)
        self.scopes = tuple(s for s in scopes if scope_applies(s, out))
        self.options = {m: {**dict(options.get(m, {})), "check_finite": False} for m in measures}
        self.stats = {(m, s): RunningStats(self.device) for m in self.measures for s in self.scopes}
        self.channel_sum: dict[str, Tensor] = {}
        self.spatial_sum: dict[str, Tensor] = {}
        self.n = 0
        self.corr: CorrelationAccumulator | None = None
        if correlation and out.dim() >= 3 and out.shape[1] >= 2:
            from xai_sparsity.measuring.correlation import CorrelationAccumulator

            precision = "double" if out.dtype == torch.float64 else "single"
            self.corr = CorrelationAccumulator(over="positions", precision=precision)
        perplexity = dict(options.get("perplexity", {}))
        self.life_variant = str(perplexity.get("variant", "normalized"))
        self.life_transform = str(perplexity.get("transform", "abs"))
        self.lifetime = lifetime
        self.life_s: Tensor | None = None
        self.life_t: Tensor | None = None
        self.scratch = scratch if scratch is not None else _Scratch()
        floating = out.is_floating_point()
        self.fused = tuple(
            m
            for m in self.measures
            if floating and m in _FUSED_OPTIONS and set(options.get(m, {})) <= _FUSED_OPTIONS[m]
        )
        self.plan = self._plan(out)

    def _transform(self, m: str) -> str:
        return "abs" if m == "zero_fraction" else str(self.options[m].get("transform", "abs"))

    def _plan(self, out: Tensor) -> dict[str, _Need]:
        """transform -> what the fused measures (and lifetime sparsity) need of it."""
        plan: dict[str, _Need] = {}
        spatial = "spatial" in self.scopes
        for m in self.fused:
            if m == "zero_fraction":
                tol = float(self.options[m].get("tol", 0.0))
                need = _Need(zero=True, tol=tol, spatial=spatial)
            elif m == "hoyer":
                need = _Need(sq=True, spatial=spatial)
            else:
                need = _Need(log=True, spatial=spatial)
            t = self._transform(m)
            plan[t] = plan.get(t, _Need()).merged(need)
        if self.lifetime and out.dim() >= 3 and self.life_transform not in plan:
            plan[self.life_transform] = _Need()
        return plan

    def relu_need(self) -> _Need | None:
        """Everything this layer needs, when it is a ReLU computed from its input's pass
        (relu(x) is its own |.| and relu), or None if it has nothing to share."""
        if not self.plan:
            return None
        need = _Need()
        for n in self.plan.values():
            need = need.merged(n)
        return need

    def update(
        self, out: Tensor, shared: _Sums | None = None, relu: _Need | None = None
    ) -> _Sums | None:
        """Add one batch output (B, ...). ``shared``: this layer's sums computed by the previous
        layer's pass; ``relu``: also compute (and return) the sums of a following ReLU."""
        from xai_sparsity.measuring.measures import compute_measure

        if tuple(out.shape[1:]) != self.shape:
            raise XaiSparsityError(
                f"layer {self.name!r} produced shape {tuple(out.shape[1:])} per sample after "
                f"{self.shape} in an earlier batch; a sweep needs inputs of one size (resize "
                f"them in the loader)"
            )
        out = out.detach()
        b = out.shape[0]
        self.n += b
        dtype = torch.float64 if out.dtype == torch.float64 else torch.float32
        dense = out.dim() == 2
        units = out.reshape(b, 1, -1) if dense else out.reshape(b, out.shape[1], -1)
        c, p = units.shape[1], units.shape[2]
        relu_sums = None
        if shared is not None:
            sums = {t: shared for t in self.plan}
        elif self.plan:
            sums, relu_sums = _batch_sums(units, self.plan, self.scratch, relu)
        else:
            sums = {}
        n_of = {"layer": c * p, "channel": p, "spatial": c}
        width = {"layer": 1, "channel": c, "spatial": p}
        entropies: dict[str, Tensor] = {}
        for m in self.measures:
            opts = self.options[m]
            res = sums.get(self._transform(m))
            for s in self.scopes:
                if m not in self.fused or res is None:
                    v = compute_measure(m, out, s, **opts)
                else:
                    numel = b * width[s]
                    v = self.scratch.get("values", numel, dtype, out.device).view(b, width[s])
                    tmp = self.scratch.get("tmp", numel, dtype, out.device).view(b, width[s])
                    get = res.p if s == "spatial" else res.c
                    names = {"zero_fraction": ("z",), "hoyer": ("s", "q")}.get(m, ("s", "t"))
                    if s == "layer":  # sums over the channels
                        parts = [get(nm).sum(1, keepdim=True) for nm in names]
                    else:
                        parts = [get(nm) for nm in names]
                    if m == "zero_fraction":
                        torch.div(parts[0], n_of[s], out=v)
                    elif m == "hoyer":
                        _hoyer_measure(parts[0], parts[1], n_of[s], v, tmp)
                    else:  # H once per transform and scope, for perplexity and entropy
                        key = f"h:{self._transform(m)}:{s}"
                        h = entropies.get(key)
                        if h is None:
                            h = self.scratch.get(key, numel, dtype, out.device).view(b, width[s])
                            h = entropies[key] = _entropy_h(parts[0], parts[1], h, tmp)
                        kind = str(opts.get("variant", "normalized"))
                        kind = "entropy" if m == "entropy" else kind
                        _entropy_measure(h, n_of[s], kind, v)
                    v = v.reshape(b) if s == "layer" else v
                    if s == "spatial":
                        v = v.view(b, *out.shape[2:])
                self.stats[(m, s)].update(v)
                if s in ("channel", "spatial"):
                    acc = v.sum(0).to(torch.float64)
                    total = self.channel_sum if s == "channel" else self.spatial_sum
                    total[m] = total[m] + acc if m in total else acc
        if self.corr is not None:
            self.corr.update(out)
        if self.lifetime:
            if dense:
                a = out.to(torch.float64)
                a = a.abs() if self.life_transform == "abs" else a.clamp_min(0)
            else:  # the channel means of the transformed output, from the sums
                res = sums[self.life_transform]
                a = res.c("s").to(torch.float64) / (res.factor.to(torch.float64).view(b, 1) * p)
            s_sum, t_sum = a.sum(0), torch.xlogy(a, a).sum(0)
            self.life_s = s_sum if self.life_s is None else self.life_s + s_sum
            self.life_t = t_sum if self.life_t is None else self.life_t + t_sum
        return relu_sums

    def finish(self, name: str) -> LayerSweep:
        lifetime = None
        if self.lifetime and self.life_s is not None and self.n >= 2:
            lifetime = _lifetime_from_sums(self.life_s, self.life_t, self.n, self.life_variant)
        for (m, s), rs in self.stats.items():
            if rs.nonfinite:
                warnings.warn(
                    f"layer {name!r}: {rs.nonfinite} {m}:{s} values were NaN/Inf (the layer's "
                    f"output holds NaN or Inf) and are left out of the statistics",
                    stacklevel=3,
                )
        return LayerSweep(
            name=name,
            shape=self.shape,
            stats=self.stats,
            channel_mean={m: (t / self.n).cpu() for m, t in self.channel_sum.items()},
            spatial_mean={m: (t / self.n).cpu() for m, t in self.spatial_sum.items()},
            correlation=self.corr,
            lifetime=lifetime,
            n_samples=self.n,
        )


def _lifetime_from_sums(s: Tensor, t: Tensor | None, m: int, variant: str) -> Tensor:
    """Lifetime sparsity per unit from S = sum a and T = sum a ln a over M samples: (C,)."""
    assert t is not None
    dead = s <= 0
    safe = torch.where(dead, torch.ones_like(s), s)
    h = torch.log(safe) - t / safe
    pp = torch.exp(h)
    if variant == "relative":  # a unit never active: PP = 1, as in the measure functions
        value = (1.0 - pp / m).clamp(0.0, 1.0 - 1.0 / m)
        return torch.where(dead, torch.full_like(value, 1.0 - 1.0 / m), value).cpu()
    value = ((m - pp) / (m - 1)).clamp(0.0, 1.0)
    return torch.where(dead, torch.ones_like(value), value).cpu()


@dataclass
class SweepResult:
    """The result of :func:`sweep`: one :class:`LayerSweep` per layer, in call order.

    >>> # res.summary() -> DataFrame(layer, measure, scope, mean, std, q05, q25, q50, q75, q95, n)
    """

    layers: dict[str, LayerSweep]
    measures: tuple[str, ...]
    scopes: tuple[str, ...]
    n_samples: int
    n_batches: int

    def summary(self) -> pd.DataFrame:
        """One row per (layer, measure, scope): mean, std, quantiles and the number of values."""
        import pandas as pd

        rows = []
        for name, ls in self.layers.items():
            for (m, s), rs in ls.stats.items():
                rows.append(
                    {
                        "layer": name,
                        "measure": m,
                        "scope": s,
                        "mean": rs.mean,
                        "std": rs.std,
                        **{f"q{round(q * 100):02d}": rs.quantile(q) for q in _QUANTILES},
                        "n": rs.n,
                    }
                )
        cols = ["layer", "measure", "scope", "mean", "std", "q05", "q25", "q50", "q75", "q95", "n"]
        return pd.DataFrame(rows, columns=cols)

    def correlation_summary(self) -> pd.DataFrame:
        """Per layer with a correlation: mean |r| over live off-diagonal pairs and dead channels."""
        import pandas as pd

        rows = [
            {
                "layer": name,
                "mean_abs_r": ls.correlation.mean_abs(),
                "dead": ls.correlation.num_dead,
                "channels": ls.shape[0],
            }
            for name, ls in self.layers.items()
            if ls.correlation is not None
        ]
        return pd.DataFrame(rows, columns=["layer", "mean_abs_r", "dead", "channels"])

    def to_dict(self) -> dict[str, np.ndarray]:
        """Flat arrays, keyed like the run-directory npz files.

        Keys: ``channel:<layer>`` / ``spatial:<layer>`` (perplexity, if measured),
        ``channel:<measure>:<layer>``, ``spatial:<measure>:<layer>``, ``correlation:<layer>``
        (C, C), ``dead:<layer>`` (C,) bool, ``lifetime:<layer>`` (C,), and per (measure, scope)
        ``moments:<measure>:<scope>:<layer>`` = [n, mean, std, min, max] and
        ``hist:<measure>:<scope>:<layer>`` (1000,).
        """
        out: dict[str, np.ndarray] = {}
        for name, ls in self.layers.items():
            for m, t in ls.channel_mean.items():
                out[f"channel:{m}:{name}"] = t.numpy()
                if m == "perplexity":
                    out[f"channel:{name}"] = t.numpy()
            for m, t in ls.spatial_mean.items():
                out[f"spatial:{m}:{name}"] = t.numpy()
                if m == "perplexity":
                    out[f"spatial:{name}"] = t.numpy()
            if ls.correlation is not None:
                out[f"correlation:{name}"] = ls.correlation.correlation().cpu().numpy()
                out[f"dead:{name}"] = ls.correlation.dead_mask.cpu().numpy()
            if ls.lifetime is not None:
                out[f"lifetime:{name}"] = ls.lifetime.numpy()
            for (m, s), rs in ls.stats.items():
                out[f"moments:{m}:{s}:{name}"] = np.array(
                    [rs.n, rs.mean, rs.std, rs.min, rs.max], dtype=np.float64
                )
                out[f"hist:{m}:{s}:{name}"] = rs.histogram.numpy()
        return out

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_dict` as an ``.npz`` file atomically (temp file, fsync, rename)."""
        from xai_sparsity.base.files import atomic_open

        with atomic_open(path) as f:
            np.savez(f, **self.to_dict())  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return (
            f"SweepResult({len(self.layers)} layers, {self.n_samples} samples in "
            f"{self.n_batches} batches, measures={self.measures}, scopes={self.scopes})"
        )


_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


_RELU_FEEDS: weakref.WeakKeyDictionary[nn.Module, dict[str, str]] = weakref.WeakKeyDictionary()
"""Per model: which selected ReLU consumes which measured layer's output, learnt by earlier
batches and sweeps (a hint only: every use is checked by tensor identity and version)."""


def _batch_input(batch: Any, index: int) -> Tensor:
    """The input tensor of one loader batch: a tensor, (inputs, labels, ...) or a dict."""
    x = batch
    if isinstance(batch, (tuple, list)) and batch:
        x = batch[0]
    elif isinstance(batch, Mapping):
        key = next((k for k in _INPUT_KEYS if k in batch), None)
        if key is None:
            raise XaiSparsityError(
                f"batch {index} is a dict with keys {list(batch)}; expected one of "
                f"{list(_INPUT_KEYS)} for the model input"
            )
        x = batch[key]
    if not isinstance(x, Tensor):
        raise XaiSparsityError(
            f"batch {index} gives a model input of type {type(x).__name__}; expected a Tensor, "
            f"an (inputs, labels) tuple/list or a dict with an 'image' or 'input' tensor"
        )
    if x.dim() == 0 or x.shape[0] == 0:
        raise XaiSparsityError(f"batch {index} has input shape {tuple(x.shape)}: no samples")
    return x


def sweep(
    model: nn.Module,
    loader: Iterable[Any],
    layers: LayerSpec = None,
    *,
    measures: Sequence[str] = ALL_MEASURES,
    scopes: Sequence[str] = SCOPES,
    correlation: bool = True,
    lifetime: bool = True,
    device: str | torch.device | None = None,
    progress: bool = True,
    max_batches: int | None = None,
    measure_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> SweepResult:
    """Stream sparsity statistics of the selected layers over a data loader.

    The model runs in eval mode under ``torch.no_grad``; each submodule's training flag is
    restored afterwards, and the model is moved back to its device if the sweep moved it.

    Args:
        model: the model (DataParallel/DDP wrappers are looked through).
        loader: an iterable of batches: tensors (B, ...), ``(inputs, labels, ...)`` tuples/lists,
            or dicts with an ``"image"`` or ``"input"`` tensor (e.g. a DataLoader). A single
            tensor is one batch. Floating inputs are cast to the model's parameter dtype.
        layers: what :func:`~xai_sparsity.capturing.hooks.resolve_layers` accepts (default: conv and
            activation layers).
        measures: names from ``xai_sparsity.measuring.measures.MEASURES``.
        scopes: ``"layer"``, ``"channel"``, ``"spatial"`` (a scope with fewer than 2 units for a
            layer, such as ``"channel"`` for a (B, F) output, is skipped for that layer).
        correlation: accumulate filter correlation for layers with (B, C >= 2, ...) outputs.
        lifetime: accumulate lifetime sparsity per unit (variant and transform taken from
            ``measure_options["perplexity"]``).
        device: where to run; ``None`` keeps a model that is on an accelerator where it is and
            otherwise picks cuda, then mps, then cpu.
        progress: show a tqdm progress bar.
        max_batches: stop after this many batches.
        measure_options: per measure keyword arguments, as for :func:`capture`.

    Returns:
        A :class:`SweepResult`; ``result.summary()`` is a DataFrame.
    """
    root = unwrap(model)
    if isinstance(measures, str):
        measures = (measures,)
    if isinstance(scopes, str):
        scopes = (scopes,)
    from xai_sparsity.measuring.measures import MEASURES

    measures = tuple(check_choice("measure", m, tuple(MEASURES)) for m in measures)
    scopes = tuple(check_choice("scope", s, SCOPES) for s in scopes)
    if not measures and not correlation and not lifetime:
        raise XaiSparsityError("nothing to sweep: measures=() with correlation and lifetime off")
    if measures and not scopes:
        raise XaiSparsityError("scopes=() : pass at least one of 'layer', 'channel', 'spatial'")
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise XaiSparsityError(f"max_batches={max_batches!r} must be a positive int or None")
    options = dict(measure_options or {})
    for m in options:
        if m not in measures and m != "perplexity":
            raise XaiSparsityError(
                f"measure_options has key {m!r}, which is not among measures={measures}"
            )
    from xai_sparsity.measuring.measures import compute_measure

    probe = torch.rand(1, 2, 2)  # bad option names or values fail here, before the sweep runs
    checked = set(measures) | ({"perplexity"} if lifetime else set())
    for m in checked:
        compute_measure(m, probe, "layer", **{**dict(options.get(m, {})), "check_finite": False})
    if isinstance(loader, Tensor):
        loader = [loader]
    elif isinstance(loader, (str, bytes)) or not isinstance(loader, Iterable):
        raise XaiSparsityError(
            f"loader must be an iterable of batches (e.g. a DataLoader or a list of tensors), "
            f"got {type(loader).__name__}"
        )
    elif isinstance(loader, torch.utils.data.Dataset) and not isinstance(
        loader, torch.utils.data.IterableDataset
    ):
        raise XaiSparsityError(
            f"loader is a {type(loader).__name__} (a Dataset of single samples); wrap it: "
            f"torch.utils.data.DataLoader(dataset, batch_size=64)"
        )

    params = list(root.parameters())
    home = params[0].device if params else torch.device("cpu")
    dtype = next((p.dtype for p in params if p.is_floating_point()), None)
    if device is None:
        target = home if home.type != "cpu" else resolve_device("auto")
    else:
        target = torch.device(device)

    total: int | None = None
    try:
        total = len(loader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)

    accs: dict[str, _LayerAccumulator] = {}
    seen_order: dict[str, None] = {}  # layers in the order of their first call
    scratch = _Scratch()
    # A selected nn.ReLU whose input is the output just measured (conv -> ReLU) takes its sums
    # from that layer's pass: relu(x) > 0 where x > 0, so the one log of |x| serves both. The
    # pairing is learnt in a first batch and checked on every use by tensor identity and version.
    relu_inputs: dict[str, tuple[weakref.ref[Tensor], int]] = {}
    feeds = _RELU_FEEDS.setdefault(root, {})  # layer -> the ReLU layer that consumes its output
    last: list[tuple[str, weakref.ref[Tensor], int]] = []
    pending: list[tuple[weakref.ref[Tensor], int, str, _Sums]] = []

    def relu_pre_hook(module_name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            # inference tensors keep no version counter: no sharing for them
            if args and isinstance(args[0], Tensor) and not args[0].is_inference():
                relu_inputs[module_name] = (weakref.ref(args[0]), args[0]._version)

        return hook

    def reduce(name: str, out: Tensor) -> None:
        shared = None
        seen = relu_inputs.pop(name.split("#")[0], None)
        if seen is not None:
            ref, version = seen
            inp = ref()
            if inp is not None and pending and pending[0][0]() is inp:
                if pending[0][1] == version and pending[0][2] == name:
                    shared = pending[0][3]
            elif (
                inp is not None
                and last
                and last[0][1]() is inp
                and last[0][2] == version
                and (inp.shape, inp.dtype) == (out.shape, out.dtype)
            ):
                feeds[last[0][0]] = name
        pending.clear()
        if name not in seen_order:
            seen_order[name] = None
        acc = accs.get(name)
        if acc is None or (acc.n == 0 and (acc.shape, acc.dtype) != (out.shape[1:], out.dtype)):
            acc = accs[name] = _LayerAccumulator(
                name, out, measures, scopes, options, correlation, lifetime, scratch
            )
        relu_need = None
        tracked = not out.is_inference()
        relu_name = feeds.get(name) if tracked else None
        if relu_name is not None and out.dim() >= 3 and out.is_floating_point():
            relu_acc = accs.get(relu_name)
            if relu_acc is None:  # a ReLU's output has its input's shape, dtype and device
                relu_acc = accs[relu_name] = _LayerAccumulator(
                    relu_name, out, measures, scopes, options, correlation, lifetime, scratch
                )
            relu_need = relu_acc.relu_need()
        relu_sums = acc.update(out, shared=shared, relu=relu_need)
        if relu_sums is not None:
            pending.append((weakref.ref(out), out._version, feeds[name], relu_sums))
        last[:] = [(name, weakref.ref(out), out._version)] if tracked else []

    from tqdm.auto import tqdm

    moved = target != home and bool(params)
    hooks: list[torch.utils.hooks.RemovableHandle] = []
    n_samples = 0
    n_batches = 0
    try:
        if moved:
            root.to(target)
        cap = capture(root, layers, mode="reduce", measures=(), reduce_fn=reduce)
        modules = dict(root.named_modules())
        hooks.extend(
            modules[n].register_forward_pre_hook(relu_pre_hook(n))
            for n in cap.layers
            if type(modules.get(n)) is nn.ReLU
        )
        with eval_mode(root), torch.no_grad(), cap:
            bar = tqdm(loader, total=total, desc="sweep", unit="batch", disable=not progress)
            try:
                for i, batch in enumerate(bar):
                    if max_batches is not None and i >= max_batches:
                        break
                    x = _batch_input(batch, i)
                    if dtype is not None and x.is_floating_point() and x.dtype != dtype:
                        x = x.to(dtype)
                    x = x.to(target, non_blocking=True)
                    model(x)
                    n_samples += x.shape[0]
                    n_batches += 1
            finally:
                bar.close()
            if n_batches == 0:
                raise XaiSparsityError("the loader yielded no batches: nothing to sweep")
    finally:
        for handle in hooks:
            handle.remove()
        if moved:
            root.to(home)

    result: dict[str, LayerSweep] = {}
    for name in seen_order:
        acc = accs[name]
        module = name.split("#")[0]
        final = f"{name}#0" if "#" not in name and module in cap.reused else name
        result[final] = acc.finish(final)
    return SweepResult(
        layers=result,
        measures=measures,
        scopes=scopes,
        n_samples=n_samples,
        n_batches=n_batches,
    )
