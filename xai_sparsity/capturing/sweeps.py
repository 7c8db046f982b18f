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

The sweep is :func:`~xai_sparsity.capturing.hooks.capture` in reduce mode plus these
accumulators (capture's ``stats_fn``): every measure comes from capture's one pass per layer of
the statistics engine (:mod:`xai_sparsity.measuring.engine`), a ReLU right after a measured layer
from that layer's pass, and the lifetime sums from the same pass's per-channel sums. Filter
correlation uses float32 per-sample Gram matrices (float64 sums over samples; r to ~1e-6) for
float32 models. Values agree with the measure functions to ~1e-6 in float32 (float64 models:
~1e-12).

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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from xai_sparsity.base.errors import XaiSparsityError, check_choice
from xai_sparsity.base.modules import eval_mode, resolve_device, unwrap
from xai_sparsity.capturing.hooks import SCOPES, Capture, LayerSpec, capture, scope_applies

if TYPE_CHECKING:
    import pandas as pd

    from xai_sparsity.measuring.correlation import CorrelationAccumulator
    from xai_sparsity.measuring.engine import Sums

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


class _Lifetime:
    """Lifetime sparsity per unit, streamed: S = sum_m a_m and T = sum_m a_m ln a_m over the
    samples in float64, a = the unit's transformed activation averaged over its positions (from
    the engine's per-channel sums; a dense (B, F) output directly)."""

    def __init__(self, variant: str, transform: str) -> None:
        self.variant, self.transform = variant, transform
        self.s: Tensor | None = None
        self.t: Tensor | None = None

    def update(self, out: Tensor, sums: Sums | None) -> None:
        from xai_sparsity.measuring.engine import Need, Request, batch_sums, entropy_sums

        if out.dim() == 2:
            a = out.to(torch.float64)
            a = a.abs() if self.transform == "abs" else a.clamp_min(0)
        else:
            part = None if sums is None else sums.parts.get(self.transform)
            if part is None or part.c("s").shape[1] != out.shape[1]:  # not in the capture's pass
                req = Request(**{self.transform: Need()}, channel=True)  # type: ignore[arg-type]
                part = batch_sums(out, req).part(self.transform)
            positions = math.prod(out.shape[2:])
            raw = part.c("s").to(torch.float64) * part.scale.to(torch.float64).view(-1, 1)
            a = raw / positions
        s, t = entropy_sums(a, 0)
        self.s = s if self.s is None else self.s + s
        self.t = t if self.t is None else self.t + t

    def value(self, m: int) -> Tensor | None:
        """(C,) float64 on the CPU, or None before 2 samples."""
        from xai_sparsity.measuring.engine import sparsity_from_sums

        if self.s is None or self.t is None or m < 2:
            return None
        return sparsity_from_sums(self.s, self.t, m, self.variant).cpu()


class _LayerAccumulator:
    """Streams one layer's reduce-mode values (and output) into a :class:`LayerSweep`
    (device-side, no host syncs): RunningStats per (measure, scope), channel and spatial sums,
    filter correlation, lifetime sums."""

    def __init__(
        self,
        name: str,
        out: Tensor,
        measures: Sequence[str],
        scopes: Sequence[str],
        correlation: bool,
        lifetime: _Lifetime | None,
    ) -> None:
        self.name = name
        self.shape = tuple(out.shape[1:])
        self.dtype = out.dtype
        self.scopes = tuple(s for s in scopes if scope_applies(s, out))
        self.stats = {(m, s): RunningStats(out.device) for m in measures for s in self.scopes}
        self.channel_sum: dict[str, Tensor] = {}
        self.spatial_sum: dict[str, Tensor] = {}
        self.n = 0
        self.corr: CorrelationAccumulator | None = None
        if correlation and out.dim() >= 3 and out.shape[1] >= 2:
            from xai_sparsity.measuring.correlation import CorrelationAccumulator

            precision = "double" if out.dtype == torch.float64 else "single"
            self.corr = CorrelationAccumulator(over="positions", precision=precision)
        self.lifetime = lifetime

    def update(self, out: Tensor, values: Mapping[str, Tensor], sums: Sums | None) -> None:
        """Add one batch: its output (B, ...), the capture's values and the engine's sums."""
        if tuple(out.shape[1:]) != self.shape:
            raise XaiSparsityError(
                f"layer {self.name!r} produced shape {tuple(out.shape[1:])} per sample after "
                f"{self.shape} in an earlier batch; a sweep needs inputs of one size (resize "
                f"them in the loader)"
            )
        out = out.detach()
        self.n += out.shape[0]
        for (m, s), rs in self.stats.items():
            v = values[f"{m}:{s}"]
            rs.update(v)
            if s != "layer":
                acc = v.sum(0).to(torch.float64)
                total = self.channel_sum if s == "channel" else self.spatial_sum
                total[m] = total[m] + acc if m in total else acc
        if self.corr is not None:
            self.corr.update(out)
        if self.lifetime is not None:
            self.lifetime.update(out, sums)

    def finish(self, name: str) -> LayerSweep:
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
            lifetime=None if self.lifetime is None else self.lifetime.value(self.n),
            n_samples=self.n,
        )


class _Streams:
    """The capture's ``stats_fn``: one :class:`_LayerAccumulator` per layer (call), in the order
    of the first calls."""

    def __init__(
        self,
        measures: tuple[str, ...],
        scopes: tuple[str, ...],
        options: Mapping[str, Mapping[str, Any]],
        correlation: bool,
        lifetime: bool,
    ) -> None:
        self.measures, self.scopes, self.correlation = measures, scopes, correlation
        perplexity = dict(options.get("perplexity", {}))
        self.life = (
            (str(perplexity.get("variant", "normalized")), str(perplexity.get("transform", "abs")))
            if lifetime
            else None
        )
        self.accs: dict[str, _LayerAccumulator] = {}  # in the order of the first calls

    def __call__(
        self, name: str, out: Tensor, values: dict[str, Tensor], sums: Sums | None
    ) -> None:
        acc = self.accs.get(name)
        if acc is None or (acc.n == 0 and (acc.shape, acc.dtype) != (out.shape[1:], out.dtype)):
            life = None if self.life is None else _Lifetime(*self.life)
            acc = self.accs[name] = _LayerAccumulator(
                name, out, self.measures, self.scopes, self.correlation, life
            )
        acc.update(out, values, sums)


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
    measures, scopes, options = _checked_options(measures, scopes, measure_options, lifetime)
    if not measures and not correlation and not lifetime:
        raise XaiSparsityError("nothing to sweep: measures=() with correlation and lifetime off")
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise XaiSparsityError(f"max_batches={max_batches!r} must be a positive int or None")
    batches = _checked_loader(loader)
    streams = _Streams(measures, scopes, options, correlation, lifetime)
    cap = capture(
        root,
        layers,
        mode="reduce",
        measures=measures,
        scopes=scopes,
        measure_options={m: o for m, o in options.items() if m in measures},
        check_finite=False,  # non-finite values are counted by RunningStats
        stats_fn=streams,
    )
    n_samples, n_batches = _run(model, root, cap, batches, device, progress, max_batches)
    result: dict[str, LayerSweep] = {}
    for name, acc in streams.accs.items():
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


def _checked_options(
    measures: Sequence[str],
    scopes: Sequence[str],
    measure_options: Mapping[str, Mapping[str, Any]] | None,
    lifetime: bool,
) -> tuple[tuple[str, ...], tuple[str, ...], dict[str, Mapping[str, Any]]]:
    """Measures, scopes and options validated up front (bad names or values fail before the
    sweep runs); ``measure_options["perplexity"]`` may be given for lifetime sparsity alone."""
    from xai_sparsity.measuring.measures import MEASURES, compute_measure

    if isinstance(measures, str):
        measures = (measures,)
    if isinstance(scopes, str):
        scopes = (scopes,)
    measures = tuple(check_choice("measure", m, tuple(MEASURES)) for m in measures)
    scopes = tuple(check_choice("scope", s, SCOPES) for s in scopes)
    if measures and not scopes:
        raise XaiSparsityError("scopes=() : pass at least one of 'layer', 'channel', 'spatial'")
    options = dict(measure_options or {})
    for m in options:
        if m not in measures and m != "perplexity":
            raise XaiSparsityError(
                f"measure_options has key {m!r}, which is not among measures={measures}"
            )
    probe = torch.rand(1, 2, 2)
    for m in set(measures) | ({"perplexity"} if lifetime else set()):
        compute_measure(m, probe, "layer", **{**dict(options.get(m, {})), "check_finite": False})
    return measures, scopes, options


def _checked_loader(loader: Iterable[Any]) -> Iterable[Any]:
    if isinstance(loader, Tensor):
        return [loader]
    if isinstance(loader, (str, bytes)) or not isinstance(loader, Iterable):
        raise XaiSparsityError(
            f"loader must be an iterable of batches (e.g. a DataLoader or a list of tensors), "
            f"got {type(loader).__name__}"
        )
    if isinstance(loader, torch.utils.data.Dataset) and not isinstance(
        loader, torch.utils.data.IterableDataset
    ):
        raise XaiSparsityError(
            f"loader is a {type(loader).__name__} (a Dataset of single samples); wrap it: "
            f"torch.utils.data.DataLoader(dataset, batch_size=64)"
        )
    return loader


def _run(
    model: nn.Module,
    root: nn.Module,
    cap: Capture,
    loader: Iterable[Any],
    device: str | torch.device | None,
    progress: bool,
    max_batches: int | None,
) -> tuple[int, int]:
    """Run the model over the loader inside the capture (eval mode, no_grad, on the target
    device; flags and device restored, also on error). Returns (samples, batches)."""
    from tqdm.auto import tqdm

    params = list(root.parameters())
    home = params[0].device if params else torch.device("cpu")
    dtype = next((p.dtype for p in params if p.is_floating_point()), None)
    target = torch.device(device) if device is not None else home
    if device is None and home.type == "cpu":
        target = resolve_device("auto")
    moved = target != home and bool(params)
    n_samples = n_batches = 0
    try:
        if moved:
            root.to(target)
        with eval_mode(root), torch.no_grad(), cap:
            bar = tqdm(
                loader,
                total=_length(loader, max_batches),
                desc="sweep",
                unit="batch",
                disable=not progress,
            )
            try:
                for i, batch in enumerate(bar):
                    if max_batches is not None and i >= max_batches:
                        break
                    x = _batch_input(batch, i)
                    if dtype is not None and x.is_floating_point() and x.dtype != dtype:
                        x = x.to(dtype)
                    model(x.to(target, non_blocking=True))
                    cap.clear()  # the values were streamed by the stats_fn
                    n_samples += x.shape[0]
                    n_batches += 1
            finally:
                bar.close()
            if n_batches == 0:
                raise XaiSparsityError("the loader yielded no batches: nothing to sweep")
    finally:
        if moved:
            root.to(home)
    return n_samples, n_batches


def _length(loader: Iterable[Any], max_batches: int | None) -> int | None:
    """The number of batches for the progress bar, if known."""
    try:
        total: int | None = len(loader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    return total
