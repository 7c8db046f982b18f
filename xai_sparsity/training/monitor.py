"""SparsityMonitor: perplexity sparsity of a fixed probe set, logged from your own training loop.

Two lines added to a loop you already have write the same run directory as the project's trainer
(``config.json``, ``history.csv``, ``arrays/epoch_NNNN.npz``, ``probe.npz``; see
docs/architecture.md), so ``xai-sparsity analyze``, the early warning, the figures and the widgets
work on your run unchanged::

    monitor = SparsityMonitor(model, probe_images, out="runs/mine")       # line 1
    for epoch in range(1, epochs + 1):
        ...                                                              # your training
        monitor.epoch_end(epoch, train_loss=tl, test_loss=vl)            # line 2

Each ``epoch_end`` runs the probe set through the model once, in eval mode and under
``torch.no_grad`` for that pass only: every submodule's ``training`` flag is restored afterwards,
BatchNorm running statistics and the optimiser are never touched, and the measures are reduced
inside forward hooks on the model's device (no activation is kept).

>>> import tempfile, torch, torch.nn as nn
>>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
>>> mon = SparsityMonitor(net, torch.rand(16, 1, 8, 8), out=tempfile.mkdtemp(), correlation=False)
>>> row = mon.epoch_end(1, train_loss=0.7, test_loss=0.8)
>>> sorted(k for k in row if k.startswith("sparsity:"))  # the activation modules by default
['sparsity:1']
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from xai_sparsity.base import __version__
from xai_sparsity.base.errors import XaiSparsityError, check_choice
from xai_sparsity.base.modules import eval_no_grad, model_device_dtype, unwrap
from xai_sparsity.training.probe import (
    MEASURES,
    SCOPES,
    ProbeSettings,
    ProbeSignals,
    order_layers,
    probe_pass,
)

__all__ = ["SparsityMonitor"]

MONITOR_MEASURES: tuple[str, ...] = MEASURES
"""Measures the monitor can log; ``perplexity`` is always required (the ``sparsity:`` column)."""

MONITOR_SCOPES: tuple[str, ...] = SCOPES

ProbeLike = Any
"""A tensor (N, C, H, W), a ``(x, y)`` pair of tensors, a Dataset or a DataLoader."""

WarningCallback = Callable[["SparsityMonitor", int, dict[str, Any]], Any]


# ----------------------------------------------------------------------------- helpers


def _rank() -> int:
    """This process's rank under torch.distributed (0 when not distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(torch.distributed.get_rank())
    return 0


def _split_item(item: Any) -> tuple[Any, Any]:
    """(x, y) from one dataset item or loader batch: a tensor, or a sequence (x, y, ...)."""
    if isinstance(item, Tensor):
        return item, None
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], Tensor):
        return item[0], (item[1] if len(item) > 1 else None)
    if isinstance(item, Mapping):
        raise XaiSparsityError(
            "probe items are dicts; pass the input tensor (N, C, H, W) itself, or a dataset "
            "whose items are a tensor or an (x, y) pair"
        )
    raise XaiSparsityError(
        f"probe items must be a tensor or an (x, y) pair of tensors, got {type(item).__name__}"
    )


def _labels_tensor(ys: list[Any]) -> Tensor | None:
    if not ys or any(y is None for y in ys):
        return None
    try:
        return torch.cat([torch.as_tensor(y).reshape(-1) for y in ys]).long()
    except (TypeError, ValueError, RuntimeError):
        return None


def _materialize_probe(probe: ProbeLike) -> tuple[Tensor, Tensor | None]:
    """The probe as one CPU tensor (N, ...) and optional labels (N,).

    A DataLoader is iterated once, with the global RNG state saved and restored so that a
    shuffling loader neither changes the user's random stream nor the probe's meaning later (the
    probe is fixed from here on).
    """
    from torch.utils.data import DataLoader, Dataset

    x: Tensor
    y: Tensor | None = None
    if isinstance(probe, np.ndarray):
        probe = torch.from_numpy(probe)
    if isinstance(probe, (str, bytes, os.PathLike)):
        raise XaiSparsityError(
            f"probe must be a tensor (N, C, H, W), an (x, y) pair, a Dataset or a DataLoader; got "
            f"the {type(probe).__name__} {probe!r} (load the images first)"
        )
    if isinstance(probe, Tensor):
        x = probe
    elif isinstance(probe, (tuple, list)) and len(probe) == 2 and isinstance(probe[0], Tensor):
        x, y_raw = probe
        y = None if y_raw is None else torch.as_tensor(y_raw).reshape(-1).long()
    elif isinstance(probe, DataLoader):
        xs, ys = [], []
        with torch.random.fork_rng(devices=[]):
            for batch in probe:
                bx, by = _split_item(batch)
                xs.append(bx.detach().cpu())
                ys.append(by)
        if not xs:
            raise XaiSparsityError("the probe DataLoader yields no batches (empty probe)")
        x = torch.cat(xs)
        y = _labels_tensor(ys)
    elif isinstance(probe, Dataset) or (
        hasattr(probe, "__getitem__") and hasattr(probe, "__len__")
    ):
        n = len(probe)
        if n == 0:
            raise XaiSparsityError("the probe dataset is empty; pass at least one sample")
        xs, ys = [], []
        for i in range(n):
            ix, iy = _split_item(probe[i])
            xs.append(ix.detach().cpu())
            ys.append(None if iy is None else torch.as_tensor(iy).reshape(-1))
        try:
            x = torch.stack(xs)
        except RuntimeError as exc:
            raise XaiSparsityError(f"probe dataset items have different shapes: {exc}") from None
        y = _labels_tensor(ys)
    else:
        raise XaiSparsityError(
            f"probe must be a tensor (N, C, H, W), an (x, y) pair, a Dataset or a DataLoader; "
            f"got {type(probe).__name__}"
        )
    if x.dim() < 2:
        raise XaiSparsityError(
            f"probe has shape {tuple(x.shape)}; expected a batch (N, ...) such as (N, C, H, W)"
        )
    if x.shape[0] == 0:
        raise XaiSparsityError(
            f"the probe is empty (shape {tuple(x.shape)}); pass at least one sample"
        )
    if y is not None and y.numel() != x.shape[0]:
        raise XaiSparsityError(
            f"probe has {x.shape[0]} inputs but {y.numel()} labels; pass one label per input"
        )
    return x.detach().cpu(), (None if y is None else y.cpu())


def _expected_input(model: nn.Module) -> str:
    """A human description of the input the model's first conv/linear layer expects."""
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            spatial = ", ".join("HWD"[i] if i < 2 else f"D{i}" for i in range(len(m.kernel_size)))
            spatial = {1: "L", 2: "H, W", 3: "D, H, W"}.get(len(m.kernel_size), spatial)
            return f"(N, {m.in_channels}, {spatial}) (first layer {type(m).__name__}: in_channels={m.in_channels})"
        if isinstance(m, nn.Linear):
            return f"(N, {m.in_features}) (first layer Linear: in_features={m.in_features})"
    return "an input it accepts (no conv or linear layer found to tell)"


def as_float(v: Any) -> float:
    if isinstance(v, Tensor):
        return float(v.detach().float().mean().item()) if v.numel() != 1 else float(v.item())
    return float(v)


def _select_layers(model: nn.Module, spec: Any) -> list[str]:
    """``spec`` as :func:`xai_sparsity.capturing.hooks.resolve_layers`; ``None`` means the activation
    modules (as the trainer measures), or conv + activation modules if the model has none."""
    from xai_sparsity.capturing.hooks import layer_kind, resolve_layers

    if spec is None:
        names = [n for n, m in model.named_modules() if n and layer_kind(m) == "activation"]
        if names:
            return names
    return resolve_layers(model, spec)


def _checked_measures_and_scopes(
    measures: Sequence[str] | str, scopes: Sequence[str] | str
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    measures = (measures,) if isinstance(measures, str) else tuple(measures)
    scopes = (scopes,) if isinstance(scopes, str) else tuple(scopes)
    for m in measures:
        check_choice("measure", m, MONITOR_MEASURES)
    for s in scopes:
        check_choice("scope", s, MONITOR_SCOPES)
    if "perplexity" not in measures:
        raise XaiSparsityError(
            f"measures={measures!r} must include 'perplexity' (it fills the sparsity:<layer> "
            f"columns that the analysis reads)"
        )
    return measures, scopes


def _check_counts(**values: Any) -> None:
    """Integer settings: ``batch_size`` and ``every`` >= 1, the others >= 0."""
    for name, value in values.items():
        low = 1 if name in ("every", "batch_size") else 0
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise XaiSparsityError(f"{name}={value!r} must be an integer >= {low}")


def _check_callbacks(train_stats_every: Any, on_warning: Any) -> None:
    if train_stats_every is not None and (
        not isinstance(train_stats_every, int) or train_stats_every < 1
    ):
        raise XaiSparsityError(
            f"train_stats_every={train_stats_every!r} must be None or an integer >= 1"
        )
    if on_warning is not None and not callable(on_warning):
        raise XaiSparsityError(
            f"on_warning must be callable(monitor, epoch, info), got {on_warning!r}"
        )


def _warning_settings(warning: Any) -> dict[str, Any] | None:
    """EarlyWarning keyword arguments from ``warning=`` (None: switched off)."""
    if warning is False:
        return None
    if warning is None or warning is True:
        return {}
    if isinstance(warning, Mapping):
        return dict(warning)
    raise XaiSparsityError(
        f"warning must be a dict of EarlyWarning settings, True/None or False; got {warning!r}"
    )


def _tensorboard_writer(target: Any) -> Any:
    from xai_sparsity.training.tensorboard_writer import TensorBoardWriter

    if not (hasattr(target, "add_scalar") or isinstance(target, (str, os.PathLike))):
        raise XaiSparsityError(
            f"log_to_tensorboard must be a SummaryWriter or a folder, got {type(target).__name__}"
        )
    return TensorBoardWriter(target)


# ----------------------------------------------------------------------------- fused measures


def fused_layer_stats(
    x: Tensor, *, nonnegative: bool = False, hoyer: bool = True, zeros: bool = True
) -> dict[str, Tensor]:
    """All layer-scope measures of one batch, and the channel-scope perplexity, in one pass.

    :func:`xai_sparsity.measuring.engine.layer_stats` (one unit-sums pass of ``a = |x|``, an L2 norm and a
    zero count); ``nonnegative`` is accepted for compatibility (the pass takes ``|x|`` anyway).

    Returns:
        ``perplexity``, ``entropy`` (and ``hoyer``, ``zero_fraction``): (B,) float32;
        ``unit_sum``: (B, C) sums of |a| per channel (rank >= 3) or (B, F) for dense input;
        ``channel``: (B, C) channel-scope perplexity (rank >= 3 with >= 2 positions).

    >>> s = fused_layer_stats(torch.tensor([[3.0, 1.0, 0.0, 0.0]]))
    >>> round(s["perplexity"].item(), 5), s["zero_fraction"].item()
    (0.74841, 0.5)
    """
    from xai_sparsity.measuring.engine import layer_stats

    del nonnegative
    return layer_stats(x, hoyer=hoyer, zeros=zeros)


# ----------------------------------------------------------------------------- training batches


class _TrainAccumulator:
    """Mean layer-scope perplexity over tracked training steps, per layer."""

    def __init__(self) -> None:
        self.sum: dict[str, Tensor] = {}
        self.count: dict[str, int] = {}

    def add(self, name: str, value: Tensor) -> None:
        if name in self.sum:
            self.sum[name] = self.sum[name] + value
            self.count[name] += 1
        else:
            self.sum[name] = value
            self.count[name] = 1

    def means(self) -> dict[str, float]:
        return {n: float(s.item()) / self.count[n] for n, s in self.sum.items()}

    def clear(self) -> None:
        self.sum.clear()
        self.count.clear()


# ----------------------------------------------------------------------------- the monitor


class SparsityMonitor:
    """Measure activation sparsity on a fixed probe set from any PyTorch training loop.

    Args:
        model: the model being trained (DataParallel/DDP wrappers are looked through).
        probe: fixed held-out inputs, the same every epoch: a tensor (N, C, H, W), an ``(x, y)``
            pair, a Dataset (items a tensor or ``(x, y)``) or a DataLoader (read once, here).
            Labels are optional (they are stored in ``probe.npz`` for the figures).
        layers: which layers, as for :func:`xai_sparsity.capturing.hooks` (default: conv + activation).
        out: the run directory to write (created; an existing monitor run is continued).
        every: measure every ``every``-th epoch (``epoch % every == 0``); other epochs write
            nothing.
        measures: among "perplexity" (required: the ``sparsity:`` column), "zero_fraction",
            "hoyer", "entropy"; logged as layer-scope means over the probe set.
        scopes: arrays to write: "layer" (per-sample layer sparsity), "channel" (per-filter
            sparsity), "spatial" (maps of the first ``spatial_images`` probe images).
        correlation: filter correlation (mean |r| per layer every epoch, the C x C matrix in the
            arrays) and the dead-channel count.
        array_every: write ``arrays/epoch_NNNN.npz`` at epoch 1 and every ``array_every`` epochs
            (0: never; :meth:`finish` writes the last epoch's).
        spatial_images: how many probe images get spatial maps (and go to ``probe.npz``).
        batch_size: probe batch size.
        device: where the probe runs (default: the device of the model's parameters).
        on_warning: ``on_warning(monitor, epoch, info)`` called once when the early warning
            fires; return True (or set ``monitor.should_stop = True``) to ask the loop to stop.
        warning: keyword arguments of :class:`xai_sparsity.runs.EarlyWarning` (``layers``,
            ``rule``, ``patience``, ``min_rise``, ``min_layers``, ``gate_window``, ``gate_tol``,
            ...), or False to switch it off. The default rule waits for the training loss to level
            off, so pass ``train_loss`` to :meth:`epoch_end`. ``info["message"]`` says what was
            measured.
        train_stats_every: if set, track layer-scope perplexity on every k-th training batch
            (in the training forward's own hooks, no extra forward), logged as
            ``train_batch_sparsity:<layer>``; see :meth:`attach` and :meth:`track_training`.
        log_to_tensorboard: a ``torch.utils.tensorboard.SummaryWriter`` or a log folder: per-layer
            scalars and a histogram of per-sample sparsity each measured epoch.
        signals: also the label-free competitor columns of the trainer, from the same probe
            pass: ``confidence``, ``pred_entropy`` (the model's outputs, when it returns one
            (B, K) tensor) and ``cka_drift:<layer>`` (against the previous measured epoch; NaN at
            the first one, also after a restart, as the previous matrices live in memory only).

    Attributes:
        run: the :class:`xai_sparsity.RunDir` written.
        layers: the measured layer names (``name#k`` for the k-th call of a reused module).
        should_stop: True once ``on_warning`` asked to stop.
        warning_epoch: the epoch the early warning fired, or None.

    Under torch.distributed only rank 0 measures and writes; other ranks return ``{}`` at once
    (the probe pass runs on the unwrapped module, so it issues no collective and cannot deadlock).
    """

    def __init__(
        self,
        model: nn.Module,
        probe: ProbeLike,
        layers: Any = None,
        out: str | os.PathLike[str] = "runs/monitor",
        *,
        every: int = 1,
        measures: Sequence[str] = MONITOR_MEASURES,
        scopes: Sequence[str] = MONITOR_SCOPES,
        correlation: bool = True,
        array_every: int = 5,
        spatial_images: int = 8,
        batch_size: int = 256,
        device: str | torch.device | None = None,
        on_warning: WarningCallback | None = None,
        warning: Mapping[str, Any] | bool | None = None,
        train_stats_every: int | None = None,
        log_to_tensorboard: Any = None,
        signals: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise XaiSparsityError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self._root = unwrap(model)
        self.measures, self.scopes = _checked_measures_and_scopes(measures, scopes)
        _check_counts(every=every, array_every=array_every, spatial_images=spatial_images)
        _check_counts(batch_size=batch_size)
        _check_callbacks(train_stats_every, on_warning)
        self.correlation = bool(correlation)
        self.every = int(every)
        self.array_every = int(array_every)
        self.spatial_images = int(spatial_images)
        self.batch_size = int(batch_size)
        self.device = None if device is None else torch.device(device)
        self.on_warning = on_warning
        self.train_stats_every = train_stats_every
        self.should_stop = False
        self.warning_epoch: int | None = None
        self.warning_info: dict[str, Any] | None = None
        self.rank = _rank()
        self.last_arrays: dict[str, np.ndarray] = {}
        self.last_row: dict[str, Any] = {}
        self.timings: list[float] = []  # seconds per probe pass
        self._signals = ProbeSignals() if signals else None

        self.probe, self.probe_labels = _materialize_probe(probe)
        self._probe_cache: tuple[torch.device, torch.dtype | None, Tensor] | None = None
        self._selected = _select_layers(self._root, layers)
        # one forward on two probe samples: checks the probe's shape, finds per-call names
        self.layers: list[str] = self._discover()
        self._reused = {n.split("#", 1)[0] for n in self.layers if "#" in n}

        self._warning_kwargs = _warning_settings(warning)
        self._early: Any = None
        self.out = Path(out)
        self.run: Any = None  # a RunDir on rank 0
        self._last_epoch = 0
        self._tb: Any = None  # a TensorBoardWriter
        if self.rank == 0:
            self._open_run()
            if log_to_tensorboard is not None:
                self._tb = _tensorboard_writer(log_to_tensorboard)

        self._train_cap: Any = None  # training-batch statistics (attach / detach)
        self._train_hook: Any = None
        self._train_step = 0
        self._train_active = False
        self._train_acc = _TrainAccumulator()
        if train_stats_every is not None:
            self.attach()

    # ------------------------------------------------------------------------- set-up

    @property
    def _probe_settings(self) -> ProbeSettings:
        return ProbeSettings(
            measures=self.measures,
            scopes=self.scopes,
            correlation=self.correlation,
            spatial_images=self.spatial_images,
            batch_size=self.batch_size,
            signals=self._signals is not None,
        )

    def _open_run(self) -> None:
        """Create or continue the run directory: config, the early warning, ``probe.npz``."""
        from xai_sparsity.runs.rundir import RunDir

        self.run = RunDir(self.out, create=True)
        self._write_config()
        self._rebuild_warning()
        if not (self.out / "probe.npz").exists():
            k = min(max(self.spatial_images, 1), self.probe.shape[0])
            labels = (
                self.probe_labels[:k].numpy()
                if self.probe_labels is not None
                else np.full(k, -1, dtype=np.int64)
            )
            self.run.save_probe(self.probe[:k].float().numpy(), labels)

    @property
    def warning_enabled(self) -> bool:
        """Whether the live early warning is on (``warning`` not False; rank 0)."""
        return self._early is not None

    def __repr__(self) -> str:
        return (
            f"SparsityMonitor({type(self._root).__name__}, probe {tuple(self.probe.shape)}, "
            f"{len(self.layers)} layers, out={str(self.out)!r})"
        )

    def _probe_on(self, device: torch.device, dtype: torch.dtype | None) -> Tensor:
        cache = self._probe_cache
        if cache is not None and cache[0] == device and cache[1] == dtype:
            return cache[2]
        x = self.probe
        if dtype is not None and x.is_floating_point():
            x = x.to(dtype)
        x = x.to(device)
        self._probe_cache = (device, dtype, x)
        return x

    def _target(self) -> tuple[torch.device, torch.dtype | None]:
        device, dtype = model_device_dtype(self._root)
        device = device or torch.device("cpu")
        return (self.device or device), dtype

    def _forward(self, x: Tensor) -> Any:
        try:
            return self._root(x)
        except XaiSparsityError:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            raise XaiSparsityError(
                f"the model fails on the probe: probe shape {tuple(self.probe.shape)} "
                f"(dtype {self.probe.dtype}), but {type(self._root).__name__} expects "
                f"{_expected_input(self._root)}. The model said: {exc}"
            ) from exc

    def _discover(self) -> list[str]:
        from xai_sparsity.capturing.hooks import capture

        seen: list[str] = []

        def note(name: str, out: Tensor) -> None:
            if name not in seen:
                seen.append(name)

        device, dtype = self._target()
        x = self.probe[:2]
        if dtype is not None and x.is_floating_point():
            x = x.to(dtype)
        x = x.to(device)
        with (
            warnings.catch_warnings(),
            eval_no_grad(self._root),
            capture(self._root, self._selected, mode="reduce", measures=(), reduce_fn=note) as cap,
        ):
            warnings.simplefilter("ignore")
            self._forward(x)
        if not seen:
            raise XaiSparsityError(
                f"none of the selected layers {self._selected[:8]} ran in the model's forward "
                f"(they may be called as functions or skipped); choose others with layers="
            )
        return order_layers(self._selected, seen, set(cap.reused))

    def _settings(self) -> dict[str, Any]:
        return {
            "source": "monitor",
            "model": type(self._root).__name__,
            "layers": list(self.layers),
            "measures": list(self.measures),
            "scopes": list(self.scopes),
            "sparsity": {
                "measure": "perplexity",
                "variant": "normalized",
                "scope": "layer",
                "transform": "abs",
            },
            "correlation": self.correlation,
            "every": self.every,
            "array_every": self.array_every,
            "spatial_images": self.spatial_images,
            "batch_size": self.batch_size,
            "probe_size": int(self.probe.shape[0]),
            "probe_shape": list(self.probe.shape[1:]),
            "probe_labels": self.probe_labels is not None,
            "train_stats_every": self.train_stats_every,
            "warning": self._warning_kwargs if self._warning_kwargs is not None else False,
            "xai_sparsity_version": __version__,
        }

    def _write_config(self) -> None:
        old = self.run.config
        if old and old.get("source", "monitor") != "monitor":
            raise XaiSparsityError(
                f"{str(self.out)!r} holds a run written by {old.get('source')!r}, not by a "
                f"SparsityMonitor; choose another out= folder"
            )
        config = {**old, **self._settings()}
        config.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S"))
        self.run.write_config(config)

    def _rebuild_warning(self) -> None:
        """(Re)build the early warning and replay the history already on disk into it."""
        self._early = None
        self.warning_epoch = None
        self.warning_info = None
        df = self.run.history()
        self._last_epoch = int(df["epoch"].max()) if len(df) else 0
        if self._warning_kwargs is None:
            return
        from xai_sparsity.runs.analysis import EarlyWarning

        self._early = EarlyWarning(**self._warning_kwargs)
        for _, r in df.iterrows():
            values = {
                c.split(":", 1)[1]: float(r[c])
                for c in df.columns
                if c.startswith("sparsity:") and not (isinstance(r[c], float) and math.isnan(r[c]))
            }
            if not values:
                continue
            acc = r.get("train_acc")
            acc = (
                None if acc is None or (isinstance(acc, float) and math.isnan(acc)) else float(acc)
            )
            loss = r.get("train_loss")
            loss = None if loss is None or math.isnan(float(loss)) else float(loss)
            with contextlib.suppress(XaiSparsityError):
                if self._early.update(int(r["epoch"]), values, acc, train_loss=loss):
                    self.warning_epoch = int(r["epoch"])

    # ------------------------------------------------------------------------- measuring

    def measure(self, arrays: bool = True) -> dict[str, Any]:
        """One probe pass; returns ``{"scalars": {column: value}, "arrays": {key: array},
        "per_sample": {layer: (P,) array}}`` without writing anything.

        The pass is :func:`xai_sparsity.training.probe.probe_pass`, the trainer's probe.

        Args:
            arrays: also compute the npz arrays (channel, spatial, correlation, lifetime).
        """
        device, dtype = self._target()
        x_all = self._probe_on(device, dtype)
        t0 = time.perf_counter()
        result = probe_pass(
            self._root,
            x_all,
            self._selected,
            self._probe_settings,
            arrays=arrays,
            forward=self._forward,
            reused=self._reused,
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.timings.append(time.perf_counter() - t0)
        return result

    # ------------------------------------------------------------------------- logging

    def epoch_end(
        self,
        epoch: int,
        train_loss: float | Tensor | None = None,
        test_loss: float | Tensor | None = None,
        train_acc: float | Tensor | None = None,
        test_acc: float | Tensor | None = None,
        **metrics: Any,
    ) -> dict[str, Any]:
        """Measure the probe set and append epoch ``epoch``'s row (1-based) to history.csv.

        Losses and accuracies are optional (``test_loss`` is what the analysis compares with);
        extra keyword metrics become extra columns. Re-logging an epoch that is already in the
        history (after a restart) first drops that epoch and every later one.

        Returns:
            the row written (``{}`` on non-zero ranks and on epochs skipped by ``every``).
        """
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 1:
            raise XaiSparsityError(f"epoch={epoch!r} must be an integer >= 1 (epochs are 1-based)")
        epoch = int(epoch)
        train_means = self.take_train_stats()
        if self.rank != 0 or epoch % self.every != 0:
            return {}
        result = self.measure(arrays=self.wants_arrays(epoch))
        extra = {f"train_batch_sparsity:{name}": v for name, v in train_means.items()}
        return self.record(
            epoch,
            result,
            extra=extra,
            train_loss=train_loss,
            train_acc=train_acc,
            test_loss=test_loss,
            test_acc=test_acc,
            **metrics,
        )

    def wants_arrays(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` writes ``arrays/epoch_NNNN.npz`` (epoch 1 and every
        ``array_every``-th)."""
        return self.array_every > 0 and (epoch == 1 or epoch % self.array_every == 0)

    def take_train_stats(self) -> dict[str, float]:
        """The training-batch means tracked since the last call (and reset them)."""
        means = self._train_acc.means()
        self._train_acc.clear()
        return means

    def record(
        self,
        epoch: int,
        result: Mapping[str, Any],
        *,
        extra: Mapping[str, float] | None = None,
        **metrics: Any,
    ) -> dict[str, Any]:
        """Write a measurement from :meth:`measure` as epoch ``epoch``'s row (and its arrays,
        if it has them); ``metrics`` (losses, accuracies, extra metrics) go into the row before
        the sparsity columns, ``extra`` columns after them.
        Used by ``epoch_end`` and by framework integrations that measure and log at different
        hooks. Returns the row."""
        if self.rank != 0:
            return {}
        epoch = int(epoch)
        if epoch <= self._last_epoch:
            self.run.truncate_history(epoch - 1)
            self._rebuild_warning()
        row: dict[str, Any] = {"epoch": epoch}
        for key, value in metrics.items():
            if value is not None:
                row[key] = as_float(value)
        row.update(result["scalars"])
        if self._signals is not None:
            row.update(self._signals.columns(result))
        row.update(extra or {})
        self.run.append_history(row)
        self._last_epoch = epoch
        if result["arrays"]:
            self.run.save_arrays(epoch, result["arrays"])
        self.last_arrays = dict(result["arrays"])
        self.last_row = row
        self._warn(epoch, row)
        self._tensorboard(epoch, row, result["per_sample"])
        return row

    def _warn(self, epoch: int, row: Mapping[str, Any]) -> None:
        if self._early is None:
            return
        values = {k.split(":", 1)[1]: v for k, v in row.items() if k.startswith("sparsity:")}
        acc, loss = row.get("train_acc"), row.get("train_loss")
        if not self._early.update(
            epoch,
            values,
            None if acc is None else float(acc),
            train_loss=None if loss is None else float(loss),
        ):
            return
        self.warning_epoch = epoch
        info = {
            "epoch": epoch,
            "layers": dict(self._early.confirmed),
            "gate_epoch": self._early.gate_epoch,
            "message": f"Early warning at epoch {epoch}: {self._early.describe()}.",
            "sparsity": values,
            "row": dict(row),
        }
        self.warning_info = info
        if self._tb is not None:
            self._tb.scalar("sparsity_warning", 1.0, epoch)
        if self.on_warning is not None and self.on_warning(self, epoch, info):
            self.should_stop = True

    def _tensorboard(
        self, epoch: int, row: Mapping[str, Any], per_sample: Mapping[str, Any]
    ) -> None:
        if self._tb is None:
            return
        self._tb.row(epoch, row)
        self._tb.histograms(
            epoch, {f"sparsity_per_sample/{layer}": v for layer, v in per_sample.items()}
        )
        self._tb.flush()

    def finish(self, summary: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Close the run: write the last epoch's arrays (if it has none yet: call this right
        after the last ``epoch_end``, before the weights change), write ``summary.json``
        (the analysis, when the history has a test loss), detach hooks and close TensorBoard.

        Returns the summary written (``{}`` on non-zero ranks).
        """
        self.detach()
        result: dict[str, Any] = {}
        if self.rank == 0 and self._last_epoch > 0:
            epoch = self._last_epoch
            if self.array_every > 0 and epoch not in self.run.array_epochs():
                measured = self.measure(arrays=True)
                self.run.save_arrays(epoch, measured["arrays"])
            result = {"epochs": epoch, "source": "monitor", "warning_epoch": self.warning_epoch}
            hist = self.run.history()
            if "test_loss" in hist.columns and hist["test_loss"].notna().any():
                from xai_sparsity.runs.analysis import analyze

                try:
                    result["analysis"] = analyze(hist).to_dict()
                except XaiSparsityError as exc:
                    result["analysis_error"] = str(exc)
            result.update(summary or {})
            self.run.mark_complete(result)
        self.close()
        return result

    def close(self) -> None:
        """Detach training hooks and close an owned TensorBoard writer (idempotent)."""
        self.detach()
        if self._tb is not None and self._tb.owned:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> SparsityMonitor:
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.close()

    # ------------------------------------------------------------------------- training stats

    def attach(self, every: int | None = None) -> SparsityMonitor:
        """Track layer-scope perplexity on every ``every``-th training forward (default:
        ``train_stats_every`` or 10), computed in hooks of the training forward itself (no extra
        forward, no gradient); the means go into ``train_batch_sparsity:<layer>`` at the next
        ``epoch_end``. A forward counts as a training step when the model is in train mode and
        autograd is on. Undo with :meth:`detach`.
        """
        every = every if every is not None else (self.train_stats_every or 10)
        if not isinstance(every, int) or every < 1:
            raise XaiSparsityError(f"every={every!r} must be an integer >= 1")
        self.train_stats_every = every
        if self._train_cap is not None:
            return self
        from xai_sparsity.capturing.hooks import capture

        def pre_hook(module: nn.Module, args: Any) -> None:
            if module.training and torch.is_grad_enabled():
                self._train_active = self._train_step % self.train_stats_every == 0  # type: ignore[operator]
                self._train_step += 1
            else:
                self._train_active = False

        cap = capture(
            self._root, self._selected, mode="reduce", measures=(), reduce_fn=self._train_reduce
        )
        self._train_hook = self._root.register_forward_pre_hook(pre_hook)
        cap.__enter__()
        self._train_cap = cap
        return self

    def detach(self) -> None:
        """Remove the training-statistics hooks (idempotent)."""
        if self._train_cap is not None:
            self._train_cap.remove_hooks()
            self._train_cap = None
        if self._train_hook is not None:
            self._train_hook.remove()
            self._train_hook = None
        self._train_active = False

    @contextlib.contextmanager
    def track_training(self, every: int | None = None) -> Iterator[SparsityMonitor]:
        """``with monitor.track_training(every=k):`` attach the training statistics for the block."""
        was_attached = self._train_cap is not None
        self.attach(every)
        try:
            yield self
        finally:
            if not was_attached:
                self.detach()

    def _train_reduce(self, name: str, out: Tensor) -> None:
        if not self._train_active or not isinstance(out, Tensor) or not out.is_floating_point():
            return
        from xai_sparsity.measuring.engine import measure

        with torch.no_grad():
            v = measure("perplexity", out.detach(), "layer", check_finite=False).float().mean()
        if name in self._reused:
            name = f"{name}#0"
        self._train_acc.add(name, v)
