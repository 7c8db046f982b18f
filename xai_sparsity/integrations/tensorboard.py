"""TensorBoard: write a run directory's per-layer curves and per-epoch histograms as events.

The live path is ``SparsityMonitor(..., log_to_tensorboard=writer_or_folder)``. This module
exports a finished (or running) run directory, from the trainer or the monitor, after the fact::

    from xai_sparsity.integrations.tensorboard import export_run
    export_run("runs/baseline", "tb/baseline")      # then: tensorboard --logdir tb

Needs ``torch.utils.tensorboard`` and the ``tensorboard`` package
(``pip install xai-sparsity[tensorboard]``).
"""

from __future__ import annotations

import math
import os
from typing import Any

from xai_sparsity.base.errors import XaiSparsityError

__all__ = ["export_run", "summary_writer"]


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


def export_run(run: Any, target: Any) -> int:
    """Write every history column ``<prefix>:<layer>`` as the scalar ``<prefix>/<layer>``, the
    losses as ``loss/train``, ``loss/test`` (accuracies likewise), and for each epoch with arrays
    a histogram ``per_sample_sparsity/<layer>`` (``layer:`` arrays) and
    ``channel_sparsity/<layer>`` (``channel:`` arrays). The step is the epoch.

    Args:
        run: a run directory (path or RunDir).
        target: a SummaryWriter or a log folder.

    Returns:
        the number of scalar values written.
    """
    from xai_sparsity.runs.rundir import as_run

    r = as_run(run)
    df = r.history()
    writer, owned = summary_writer(target)
    renames = {
        "train_loss": "loss/train",
        "test_loss": "loss/test",
        "train_acc": "accuracy/train",
        "test_acc": "accuracy/test",
    }
    count = 0
    try:
        for _, row in df.iterrows():
            epoch = int(row["epoch"])
            for col, value in row.items():
                col = str(col)
                if col == "epoch" or value is None:
                    continue
                try:
                    v = float(value)
                except (TypeError, ValueError):
                    continue
                if math.isnan(v):
                    continue
                tag = renames.get(col, col.replace(":", "/", 1))
                writer.add_scalar(tag, v, epoch)
                count += 1
        for epoch in r.array_epochs():
            arrays = r.load_arrays(epoch)
            for key, values in arrays.items():
                prefix, _, layer = key.partition(":")
                if prefix == "layer":
                    writer.add_histogram(f"per_sample_sparsity/{layer}", values, epoch)
                elif prefix == "channel":
                    writer.add_histogram(f"channel_sparsity/{layer}", values, epoch)
        writer.flush()
    finally:
        if owned:
            writer.close()
    return count
