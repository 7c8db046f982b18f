"""The one TensorBoard writer: history rows as scalars, per-layer arrays as histograms.

:class:`~xai_sparsity.training.monitor.SparsityMonitor` writes through it live
(``log_to_tensorboard=``); :func:`xai_sparsity.integrations.tensorboard.export_run` writes a
finished run directory through it. Tags: a column ``<prefix>:<layer>`` becomes
``<prefix>/<layer>``, the losses ``loss/train`` and ``loss/test``, the accuracies
``accuracy/train`` and ``accuracy/test``; other columns keep their name. The step is the epoch.

Needs ``torch.utils.tensorboard`` and the ``tensorboard`` package
(``pip install xai-sparsity[tensorboard]``), imported when a folder is given.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

from xai_sparsity.base.errors import XaiSparsityError

__all__ = ["TensorBoardWriter", "scalar_tag", "summary_writer"]

_RENAMES = {
    "train_loss": "loss/train",
    "test_loss": "loss/test",
    "train_acc": "accuracy/train",
    "test_acc": "accuracy/test",
}


def summary_writer(target: Any) -> tuple[Any, bool]:
    """``(writer, owned)`` from a SummaryWriter (not owned) or a log folder (a new writer)."""
    if hasattr(target, "add_scalar"):
        return target, False
    if isinstance(target, (str, os.PathLike)):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # pragma: no cover - tensorboard missing
            raise ImportError(
                "TensorBoard logging needs the tensorboard package: "
                "pip install xai-sparsity[tensorboard]"
            ) from exc
        return SummaryWriter(str(target)), True
    raise XaiSparsityError(
        f"expected a torch.utils.tensorboard.SummaryWriter or a log folder, got "
        f"{type(target).__name__}"
    )


def scalar_tag(column: str) -> str:
    """The TensorBoard tag of a history column.

    >>> scalar_tag("sparsity:features.relu1"), scalar_tag("test_loss"), scalar_tag("lr")
    ('sparsity/features.relu1', 'loss/test', 'lr')
    """
    return _RENAMES.get(column, column.replace(":", "/", 1))


class TensorBoardWriter:
    """Writes history rows and histograms to a SummaryWriter (or a new one for a log folder,
    closed by :meth:`close`)."""

    def __init__(self, target: Any) -> None:
        self.writer, self.owned = summary_writer(target)

    def row(self, epoch: int, row: Mapping[str, Any]) -> int:
        """Every numeric, finite column of ``row`` but ``epoch`` as a scalar at step ``epoch``;
        returns the number written."""
        count = 0
        for column, value in row.items():
            if column == "epoch" or value is None:
                continue
            try:
                v = float(value)
            except (TypeError, ValueError):
                continue
            if math.isnan(v):
                continue
            self.writer.add_scalar(scalar_tag(str(column)), v, epoch)
            count += 1
        return count

    def scalar(self, tag: str, value: float, epoch: int) -> None:
        self.writer.add_scalar(tag, value, epoch)

    def histograms(self, epoch: int, values: Mapping[str, Any]) -> None:
        """One histogram per ``{tag: values}`` entry with any values."""
        for tag, v in values.items():
            if len(v):
                self.writer.add_histogram(tag, v, epoch)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        """Flush; close the writer if this object opened it (idempotent)."""
        self.writer.flush()
        if self.owned:
            self.writer.close()
            self.owned = False
