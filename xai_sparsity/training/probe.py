"""The probe pass: a run's per-layer history columns and arrays from one pass over a fixed probe.

The trainer (:func:`xai_sparsity.training.trainer.train`, through :func:`probe_statistics`) and
:class:`xai_sparsity.training.monitor.SparsityMonitor` both measure here, so ``xai-sparsity train``
and a user's loop compute every column by the same code. One forward per probe batch, in eval
mode and without autograd; inside the hooks each layer's output goes once through
:func:`xai_sparsity.measuring.engine.layer_stats` (every layer-scope measure, the channel-scope
perplexity and the per-unit sums of the lifetime sparsity) and, with ``correlation``, through a
:class:`~xai_sparsity.measuring.correlation.CorrelationAccumulator` (``precision="double"``: float64
products, as the trainer always had; the monitor's former float32 path was about 0.1 s faster per
500 probe images of the default CNN and differed by up to 3.5e-6 in mean |r| on tiny models).
Nothing but small per-sample and per-channel results is kept.

Columns per layer, in this order (``<prefix>:<layer>``): ``sparsity`` (mean layer-scope
perplexity sparsity), ``sparsity_std`` (population std), one column per further measure
(``zero_fraction``, ``hoyer``, ``entropy``), ``train_sparsity`` (the trainer's fixed training
inputs, when given), ``correlation`` (mean |r|) and ``dead`` (constant channels), ``lifetime``
(mean over units of the lifetime sparsity); after every layer's columns, with ``correlation``,
``correlation_images:<layer>``: the mean |r| of the channels' per-image means (over images, so it
does not grow with the density of the maps as the correlation over positions does). Arrays (npz keys): ``layer:``, ``channel:``,
``spatial:``, ``correlation:``, ``lifetime:``.

With ``ProbeSettings(signals=True)`` the same pass also keeps the model's outputs and, per layer,
the (P, C) matrix of each image's activation averaged over positions; :class:`ProbeSignals`
turns them into the label-free competitor columns ``confidence``, ``pred_entropy`` and
``cka_drift:<layer>`` (docs/definitions.md, "Competitor signals"). No label is read.

>>> import torch, torch.nn as nn
>>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
>>> result = probe_pass(net, torch.rand(8, 1, 8, 8), ["1"], ProbeSettings(), arrays=True)
>>> [k for k in result["scalars"]][:3], sorted(result["arrays"])[:2]
(['sparsity:1', 'sparsity_std:1', 'zero_fraction:1'], ['channel:1', 'correlation:1'])
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from xai_sparsity.base.modules import eval_no_grad

__all__ = [
    "COLUMN",
    "MEASURES",
    "SCOPES",
    "ProbeReducer",
    "ProbeSettings",
    "ProbeSignals",
    "order_layers",
    "prediction_signals",
    "probe_pass",
    "probe_statistics",
]

MEASURES: tuple[str, ...] = ("perplexity", "zero_fraction", "hoyer", "entropy")
"""Measures a probe pass can record; ``perplexity`` fills the ``sparsity:`` columns."""
SCOPES: tuple[str, ...] = ("layer", "channel", "spatial")
"""Scopes of the arrays: per-sample layer, per-channel and spatial sparsity."""
COLUMN: dict[str, str] = {
    "perplexity": "sparsity",
    "zero_fraction": "zero_fraction",
    "hoyer": "hoyer",
    "entropy": "entropy",
}
"""History-column prefix of each measure (the one name map of the trainer and the monitor)."""


@dataclass(frozen=True)
class ProbeSettings:
    """What a probe pass records.

    measures: among :data:`MEASURES`; scopes: the arrays to keep (:data:`SCOPES`); correlation:
    filter correlation and dead channels; lifetime: the lifetime sparsity; spatial_images: how
    many probe images get spatial maps; batch_size: probe images per forward; signals: keep the
    model outputs and the per-image channel means (see :class:`ProbeSignals`).
    """

    measures: tuple[str, ...] = MEASURES
    scopes: tuple[str, ...] = SCOPES
    correlation: bool = True
    lifetime: bool = True
    spatial_images: int = 8
    batch_size: int = 256
    signals: bool = False

    def replace(self, **changes: Any) -> ProbeSettings:
        return dataclasses.replace(self, **changes)


class _LayerSums:
    """Streaming results of one layer over a probe pass (on the layer's device)."""

    def __init__(self) -> None:
        self.count = 0  # samples seen
        self.perplexity: list[Tensor] = []  # (B,) layer-scope perplexity sparsity per batch
        self.sums: dict[str, Tensor] = {}  # other layer-scope measures: float64 sum over samples
        self.channel_sum: Tensor | None = None  # (C,) sum over samples of the channel sparsity
        self.spatial: list[Tensor] = []  # (b, H, W) maps of the first spatial_images samples
        self.unit_means: list[Tensor] = []  # (B, C) mean |a| per unit, for lifetime sparsity
        self.corr: Any = None  # CorrelationAccumulator over images and positions
        self.corr_images: Any = None  # CorrelationAccumulator over images (channel means)
        self.pooled: list[Tensor] = []  # (B, C) mean over positions per image (signals only)


class ProbeReducer:
    """The ``reduce_fn`` of a probe pass's :func:`~xai_sparsity.capturing.hooks.capture`: reduces
    each layer output to the sums of :class:`_LayerSums`; :meth:`result` turns them into columns.

    Set :attr:`offset` to the index of the batch's first probe image before each forward (the
    spatial maps are kept for images ``< spatial_images``).
    """

    def __init__(self, settings: ProbeSettings, *, arrays: bool) -> None:
        self.settings = settings
        self.arrays = arrays
        self.offset = 0
        self.layers: dict[str, _LayerSums] = {}

    def __call__(self, name: str, out: Tensor) -> None:
        if not isinstance(out, Tensor) or not out.is_floating_point() or out.dim() < 2:
            return
        if out[0].numel() < 2:  # a single unit per sample has no sparsity
            return
        from xai_sparsity.measuring.engine import layer_stats

        s = self.settings
        x = out.detach()
        acc = self.layers.get(name)
        if acc is None:
            acc = self.layers[name] = _LayerSums()
        acc.count += x.shape[0]
        stats = layer_stats(
            x,
            hoyer="hoyer" in s.measures,
            zeros="zero_fraction" in s.measures,
            channel=self.arrays and "channel" in s.scopes,
        )
        acc.perplexity.append(stats["perplexity"])
        for m in s.measures:
            if m != "perplexity":
                v = stats[m].sum(dtype=torch.float64)
                acc.sums[m] = acc.sums[m] + v if m in acc.sums else v
        if s.correlation:
            self._correlation(acc, x)
        if s.lifetime:
            positions = x[0, 0].numel() if x.dim() >= 3 else 1
            acc.unit_means.append(stats["unit_sum"] / positions)
        if self.arrays and x.dim() >= 3:
            self._maps(acc, x, stats)
        if s.signals:
            acc.pooled.append(x.flatten(2).mean(2).float() if x.dim() >= 3 else x.float())

    @staticmethod
    def _correlation(acc: _LayerSums, x: Tensor) -> None:
        if acc.corr is None:
            from xai_sparsity.measuring.correlation import CorrelationAccumulator

            acc.corr = CorrelationAccumulator(over="positions", precision="double")
            if x.dim() >= 3:
                # over images (each channel's mean per image): does not grow with map density
                acc.corr_images = CorrelationAccumulator(over="images", precision="double")
        acc.corr.update(x)
        if acc.corr_images is not None:
            acc.corr_images.update(x)

    def _maps(self, acc: _LayerSums, x: Tensor, stats: Mapping[str, Tensor]) -> None:
        """Channel and spatial arrays of one batch (x of rank >= 3)."""
        if "channel" in stats:
            ch = stats["channel"].sum(0)
            acc.channel_sum = ch if acc.channel_sum is None else acc.channel_sum + ch
        k = self.settings.spatial_images - self.offset
        if "spatial" in self.settings.scopes and k > 0 and x.shape[1] >= 2:
            from xai_sparsity.measuring.engine import measure

            acc.spatial.append(measure("perplexity", x[:k], "spatial", check_finite=False).float())

    def result(
        self, order: Sequence[str], *, train: Mapping[str, float] | None = None
    ) -> dict[str, Any]:
        """``{"scalars": {column: value}, "arrays": {key: array}, "per_sample": {layer: (P,)},
        "pooled": {layer: (P, C)}}`` (``pooled`` only with ``settings.signals``).

        Args:
            order: the per-call layer names in column order (see :func:`order_layers`); a name
                ``base#0`` takes the sums the hooks recorded under ``base``.
            train: ``{layer: mean}`` written as ``train_sparsity:<layer>`` after the measures.
        """
        scalars: dict[str, float] = {}
        arrays: dict[str, np.ndarray] = {}
        per_sample: dict[str, np.ndarray] = {}
        pooled: dict[str, Tensor] = {}
        for name in order:
            acc = self._sums_of(name)
            if acc is None or acc.count == 0:
                continue
            pp = torch.cat(acc.perplexity).cpu().double()
            if not bool(torch.isfinite(pp).all()):
                warnings.warn(
                    f"layer {name!r} produced NaN/Inf activations on the probe set", stacklevel=3
                )
            per_sample[name] = pp.float().numpy()
            lifetime = self._scalars(scalars, name, acc, pp, train)
            if self.arrays:
                arrays.update(self._arrays(name, acc, per_sample[name], lifetime))
            if acc.pooled:
                pooled[name] = torch.cat(acc.pooled)
        self._image_correlations(scalars, order)
        return {"scalars": scalars, "arrays": arrays, "per_sample": per_sample, "pooled": pooled}

    def _scalars(
        self,
        scalars: dict[str, float],
        name: str,
        acc: _LayerSums,
        pp: Tensor,
        train: Mapping[str, float] | None,
    ) -> Tensor | None:
        """Write one layer's columns into ``scalars``; returns its lifetime sparsity (or None)."""
        scalars[f"sparsity:{name}"] = float(pp.mean())
        scalars[f"sparsity_std:{name}"] = float(pp.std(unbiased=False))
        for m in self.settings.measures:
            if m != "perplexity":
                scalars[f"{COLUMN[m]}:{name}"] = float(acc.sums[m].item()) / acc.count
        if train is not None and name in train:
            scalars[f"train_sparsity:{name}"] = float(train[name])
        if acc.corr is not None:
            scalars[f"correlation:{name}"] = float(acc.corr.mean_abs())
            scalars[f"dead:{name}"] = int(acc.corr.num_dead)
        if not acc.unit_means or acc.count < 2:
            return None
        from xai_sparsity.measuring.measures import lifetime_sparsity

        lifetime = lifetime_sparsity(torch.cat(acc.unit_means), check_finite=False)
        scalars[f"lifetime:{name}"] = float(lifetime.double().mean())
        return lifetime

    def _sums_of(self, name: str) -> _LayerSums | None:
        """The sums recorded for a per-call name (``base#0`` reads what the hooks kept under
        ``base``)."""
        acc = self.layers.get(name)
        if acc is None and name.endswith("#0"):
            acc = self.layers.get(name[:-2])
        return acc

    def _image_correlations(self, scalars: dict[str, float], order: Sequence[str]) -> None:
        """``correlation_images:<layer>`` (mean |r| of the channels' per-image means), after
        every other column so that older history columns keep their places."""
        for name in order:
            acc = self._sums_of(name)
            if acc is not None and acc.corr_images is not None and acc.corr_images.n >= 2:
                scalars[f"correlation_images:{name}"] = float(acc.corr_images.mean_abs())

    def _arrays(
        self, name: str, acc: _LayerSums, per_sample: np.ndarray, lifetime: Tensor | None
    ) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        if "layer" in self.settings.scopes:
            out[f"layer:{name}"] = per_sample
        if acc.channel_sum is not None:
            out[f"channel:{name}"] = (acc.channel_sum / acc.count).float().cpu().numpy()
        if acc.spatial:
            out[f"spatial:{name}"] = torch.cat(acc.spatial).cpu().numpy()
        if acc.corr is not None:
            out[f"correlation:{name}"] = acc.corr.correlation().float().cpu().numpy()
        if lifetime is not None:
            out[f"lifetime:{name}"] = lifetime.float().cpu().numpy()
        return out


def order_layers(selected: Sequence[str], names: Collection[str], reused: set[str]) -> list[str]:
    """Per-call names in capture's convention (``name#0`` for a reused module's first call),
    ordered by the selected modules' registration order, then by call.

    >>> order_layers(["a", "b"], ["b", "a#1", "a"], {"a"})
    ['a#0', 'a#1', 'b']
    """
    index = {n: i for i, n in enumerate(selected)}
    out = []
    for n in names:
        base, _, k = n.partition("#")
        if not k and base in reused:
            n, k = f"{base}#0", "0"
        out.append((index.get(base, len(index)), int(k or 0), n))
    return [n for *_, n in sorted(out)]


def probe_pass(
    model: nn.Module,
    x: Tensor,
    selected: Sequence[str],
    settings: ProbeSettings,
    *,
    arrays: bool,
    forward: Callable[[Tensor], Any] | None = None,
    reused: Collection[str] = (),
    train: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """One pass of ``x`` through ``model`` (eval mode, no grad; flags restored) measuring the
    modules ``selected`` (names from :func:`~xai_sparsity.capturing.hooks.resolve_layers`).

    Args:
        x: (P, ...) probe inputs on the model's device, in batches of ``settings.batch_size``.
        arrays: also the npz arrays (channel, spatial, correlation, lifetime, per-sample).
        forward: calls the model on a batch (default ``model(batch)``).
        reused: modules known to run more than once per forward (besides those seen now).
        train: ``train_sparsity:`` values per layer, see :meth:`ProbeReducer.result`.

    Returns:
        ``{"scalars", "arrays", "per_sample", "pooled"}`` as :meth:`ProbeReducer.result`; with
        ``settings.signals`` also ``"logits"``: the (P, K) model outputs when the model returns
        one (P, K) tensor per batch (else absent).
    """
    from xai_sparsity.capturing.hooks import capture

    run = forward if forward is not None else model
    reducer = ProbeReducer(settings, arrays=arrays)
    outputs: list[Any] = []
    with (
        eval_no_grad(model),
        capture(model, list(selected), mode="reduce", measures=(), reduce_fn=reducer) as cap,
    ):
        for start in range(0, x.shape[0], settings.batch_size):
            reducer.offset = start
            out = run(x[start : start + settings.batch_size])
            if settings.signals:
                outputs.append(out)
        seen_reused = set(cap.reused) | set(reused)
    order = order_layers(selected, list(reducer.layers), seen_reused)
    result = reducer.result(order, train=train)
    if outputs and all(isinstance(o, Tensor) and o.dim() == 2 for o in outputs):
        result["logits"] = torch.cat([o.detach().float() for o in outputs])
    return result


def prediction_signals(logits: Tensor) -> dict[str, float]:
    """``confidence`` (mean max-softmax probability) and ``pred_entropy`` (mean entropy of the
    softmax, nats) of (P, K) logits; no labels.

    >>> prediction_signals(torch.zeros(3, 4))["pred_entropy"] == float(np.log(4))
    True
    """
    logp = torch.log_softmax(logits.double(), dim=1)
    p = logp.exp()
    return {
        "confidence": float(p.max(dim=1).values.mean()),
        "pred_entropy": float(-(p * logp).sum(dim=1).mean()),
    }


class ProbeSignals:
    """The label-free competitor columns of successive probe passes (``settings.signals``):
    ``confidence`` and ``pred_entropy`` from the pass's logits, and per layer ``cka_drift:<layer>``
    = 1 - linear CKA between this pass's and the previous pass's (P, C) channel means (NaN at the
    first pass). Keeps the previous matrices; :meth:`state_dict` / :meth:`load_state_dict` carry
    them through a checkpoint so that a resumed run continues exactly.
    """

    def __init__(self) -> None:
        self.previous: dict[str, Tensor] = {}

    def columns(self, result: Mapping[str, Any]) -> dict[str, float]:
        """The columns of one :func:`probe_pass` result; remembers its matrices for the next."""
        from xai_sparsity.measuring.similarity import linear_cka

        cols: dict[str, float] = {}
        if "logits" in result:
            cols.update(prediction_signals(result["logits"]))
        pooled: Mapping[str, Tensor] = result.get("pooled", {})
        for name, now in pooled.items():
            before = self.previous.get(name)
            drift = float("nan")
            if before is not None and before.shape == now.shape and now.shape[0] >= 2:
                drift = 1.0 - float(linear_cka(before.to(now.device), now))
            cols[f"cka_drift:{name}"] = drift
        self.previous = {k: v.detach().cpu().clone() for k, v in pooled.items()}
        return cols

    def state_dict(self) -> dict[str, Any]:
        return {"previous": dict(self.previous)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.previous = {k: v.clone() for k, v in state.get("previous", {}).items()}


def probe_statistics(
    model: nn.Module,
    probe_x: Tensor,
    layers: Any,
    *,
    train_probe_x: Tensor | None = None,
    arrays: bool = False,
    spatial_images: int = 8,
    correlation: bool = True,
    batch_size: int = 500,
    signals: ProbeSignals | None = None,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """The trainer's per-epoch probe: every measure of :data:`MEASURES` on ``layers`` (a spec for
    :func:`~xai_sparsity.capturing.hooks.resolve_layers`), by :func:`probe_pass`.

    Args:
        model: the model (not changed: train/eval flags are restored).
        probe_x: (P, C, H, W) probe inputs on the model's device.
        train_probe_x: fixed training inputs for the ``train_sparsity:`` columns (a second pass,
            perplexity only).
        arrays: also return the npz arrays (channel, layer, spatial, correlation, lifetime).
        spatial_images: K, the number of probe images whose spatial maps are kept.
        correlation: filter correlation (``correlation:`` and ``dead:`` columns).
        signals: also the competitor columns of :class:`ProbeSignals` (after the others; from
            the same forward); ``signals`` keeps this pass's matrices for the next call.

    Returns:
        ``(columns, arrays)``: history columns ``<prefix>:<layer>`` and npz arrays.
    """
    from xai_sparsity.capturing.hooks import resolve_layers

    selected = resolve_layers(model, layers)
    settings = ProbeSettings(
        correlation=correlation,
        spatial_images=spatial_images,
        batch_size=batch_size,
        signals=signals is not None,
    )
    train: dict[str, float] | None = None
    if train_probe_x is not None and len(train_probe_x):
        light = settings.replace(
            measures=("perplexity",), correlation=False, lifetime=False, signals=False
        )
        scalars = probe_pass(model, train_probe_x, selected, light, arrays=False)["scalars"]
        train = {k.split(":", 1)[1]: v for k, v in scalars.items() if k.startswith("sparsity:")}
    result = probe_pass(model, probe_x, selected, settings, arrays=arrays, train=train)
    columns = result["scalars"]
    if signals is not None:
        columns.update(signals.columns(result))
    return columns, result["arrays"]
