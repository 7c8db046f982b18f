"""PyTorch Lightning: ``SparsityCallback``, the :class:`~xai_sparsity.training.monitor.SparsityMonitor` as
a callback.

::

    from xai_sparsity.integrations.lightning import SparsityCallback

    trainer = L.Trainer(callbacks=[SparsityCallback(probe_images, out="runs/lit")])
    trainer.fit(module, train_loader, val_loader)

At the end of each validation epoch the callback measures the probe set (rank 0 only, eval mode
and no_grad for that pass, the module's flags restored); at the end of the training epoch it takes
the losses from ``trainer.callback_metrics`` (keys configurable), appends the row to the run
directory and logs ``sparsity/<layer>`` through ``pl_module.log`` to every logger of the trainer
(TensorBoard, CSV, ...). Without a validation loop it measures at the end of the training epoch.

Needs ``pip install xai-sparsity[lightning]``; ``import xai_sparsity`` never imports Lightning.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from xai_sparsity.base.errors import XaiSparsityError

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
except ImportError as exc:  # pragma: no cover - exercised only without lightning installed
    raise ImportError(
        "xai_sparsity.integrations.lightning needs PyTorch Lightning: "
        "pip install xai-sparsity[lightning]  (or: pip install lightning)"
    ) from exc

from xai_sparsity.training.monitor import SparsityMonitor, as_float

__all__ = ["SparsityCallback"]

LOGGABLE = ("sparsity", "sparsity_std", "zero_fraction", "hoyer", "entropy", "correlation", "dead")


class SparsityCallback(Callback):
    """Measure activation sparsity on a fixed probe set during ``Trainer.fit``.

    Args:
        probe: fixed held-out inputs (tensor, ``(x, y)`` pair, Dataset or DataLoader), fed to
            ``pl_module(x)``.
        layers: layer selection as for :func:`xai_sparsity.capturing.hooks`, with names relative to the
            LightningModule (e.g. ``"model.features.*"``); default: conv + activation modules.
        out: the run directory (default: ``<trainer.log_dir>/sparsity``, else
            ``runs/lightning``).
        train_loss_key, test_loss_key, train_acc_key, test_acc_key: keys of
            ``trainer.callback_metrics`` to copy into the history (a missing key is left empty;
            ``<key>_epoch`` is tried too).
        log: which per-layer columns to send to the loggers, as ``"<column>/<layer>"``
            (default ``("sparsity",)``; ``()`` logs nothing).
        stop_on_warning: stop training when the early warning fires.
        **monitor_kwargs: any other :class:`SparsityMonitor` argument (``measures``,
            ``correlation``, ``array_every``, ``on_warning``, ``warning``, ...).

    Attributes:
        monitor: the :class:`SparsityMonitor` (created at ``on_fit_start``).
    """

    def __init__(
        self,
        probe: Any,
        layers: Any = None,
        out: str | os.PathLike[str] | None = None,
        *,
        train_loss_key: str = "train_loss",
        test_loss_key: str = "val_loss",
        train_acc_key: str = "train_acc",
        test_acc_key: str = "val_acc",
        log: Sequence[str] = ("sparsity",),
        stop_on_warning: bool = False,
        **monitor_kwargs: Any,
    ) -> None:
        super().__init__()
        log = (log,) if isinstance(log, str) else tuple(log)
        for col in log:
            if col not in LOGGABLE:
                raise XaiSparsityError(
                    f"log={col!r} is not one of {', '.join(map(repr, LOGGABLE))}"
                )
        self.probe = probe
        self.layers = layers
        self.out = out
        self.keys = {
            "train_loss": train_loss_key,
            "test_loss": test_loss_key,
            "train_acc": train_acc_key,
            "test_acc": test_acc_key,
        }
        self.log_columns = log
        self.stop_on_warning = bool(stop_on_warning)
        self.monitor_kwargs = dict(monitor_kwargs)
        self.monitor: SparsityMonitor | None = None
        self._pending: tuple[int, dict[str, Any]] | None = None

    # ------------------------------------------------------------------------- lifecycle

    def _out_dir(self, trainer: pl.Trainer) -> Path:
        if self.out is not None:
            return Path(self.out)
        log_dir = trainer.log_dir
        return Path(log_dir) / "sparsity" if log_dir else Path("runs/lightning")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is None:
            self.monitor = SparsityMonitor(
                pl_module,
                self.probe,
                self.layers,
                out=self._out_dir(trainer),
                **self.monitor_kwargs,
            )
        self._pending = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is not None:
            self.monitor.close()

    # ------------------------------------------------------------------------- measuring

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor is None or not trainer.is_global_zero:
            return
        if getattr(trainer, "state", None) is not None and trainer.state.fn != "fit":
            return  # trainer.validate(): nothing to append to a training history
        epoch = trainer.current_epoch + 1
        if epoch % self.monitor.every != 0:
            return
        self._pending = (epoch, self.monitor.measure(arrays=self.monitor.wants_arrays(epoch)))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        monitor = self.monitor
        if monitor is None:
            return
        epoch = trainer.current_epoch + 1
        train_stats = monitor.take_train_stats()
        row: dict[str, Any] = {}
        if trainer.is_global_zero and epoch % monitor.every == 0:
            if self._pending is not None and self._pending[0] == epoch:
                result = self._pending[1]
            else:  # no validation ran this epoch
                result = monitor.measure(arrays=monitor.wants_arrays(epoch))
            self._pending = None
            metrics = self._metrics(trainer.callback_metrics)
            extra = {f"train_batch_sparsity:{n}": v for n, v in train_stats.items()}
            row = monitor.record(epoch, result, extra=extra, **metrics)
            self._log(trainer, pl_module, row)
        stop = monitor.should_stop or (self.stop_on_warning and monitor.warning_epoch == epoch)
        if trainer.world_size > 1:  # every rank calls this: the decision is shared, no deadlock
            stop = bool(trainer.strategy.reduce_boolean_decision(stop, all=False))
        if stop:
            trainer.should_stop = True

    def _metrics(self, callback_metrics: Mapping[str, Any]) -> dict[str, float]:
        out: dict[str, float] = {}
        for column, key in self.keys.items():
            for k in (key, f"{key}_epoch"):
                if k in callback_metrics:
                    out[column] = as_float(callback_metrics[k])
                    break
        return out

    def _log(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, row: Mapping[str, Any]
    ) -> None:
        if not self.log_columns:
            return
        values = {
            f"{k.split(':', 1)[0]}/{k.split(':', 1)[1]}": float(v)
            for k, v in row.items()
            if ":" in k and k.split(":", 1)[0] in self.log_columns
        }
        if self.monitor is not None and self.monitor.warning_enabled:
            values["sparsity_warning"] = float(self.monitor.warning_epoch is not None)
        if values:
            pl_module.log_dict(
                values,
                on_step=False,
                on_epoch=True,
                rank_zero_only=trainer.world_size > 1,
                sync_dist=False,
            )
