"""TensorBoard: write a run directory's per-layer curves and per-epoch histograms as events.

The live path is ``SparsityMonitor(..., log_to_tensorboard=writer_or_folder)``. This module
exports a finished (or running) run directory, from the trainer or the monitor, after the fact::

    from xai_sparsity.integrations.tensorboard import export_run
    export_run("runs/baseline", "tb/baseline")      # then: tensorboard --logdir tb

Needs ``torch.utils.tensorboard`` and the ``tensorboard`` package
(``pip install xai-sparsity[tensorboard]``).
"""

from __future__ import annotations

from typing import Any

from xai_sparsity.training.tensorboard_writer import TensorBoardWriter, summary_writer

__all__ = ["export_run", "summary_writer"]

_HISTOGRAMS = {"layer": "per_sample_sparsity", "channel": "channel_sparsity"}


def export_run(run: Any, target: Any) -> int:
    """Write every history column ``<prefix>:<layer>`` as the scalar ``<prefix>/<layer>``, the
    losses as ``loss/train``, ``loss/test`` (accuracies likewise), and for each epoch with arrays
    a histogram ``per_sample_sparsity/<layer>`` (``layer:`` arrays) and
    ``channel_sparsity/<layer>`` (``channel:`` arrays). The step is the epoch. The writing is
    :class:`xai_sparsity.training.tensorboard_writer.TensorBoardWriter`, the monitor's live one.

    Args:
        run: a run directory (path or RunDir).
        target: a SummaryWriter or a log folder.

    Returns:
        the number of scalar values written.
    """
    from xai_sparsity.runs.rundir import as_run

    r = as_run(run)
    df = r.history()
    writer = TensorBoardWriter(target)
    count = 0
    try:
        for _, row in df.iterrows():
            count += writer.row(int(row["epoch"]), {str(k): v for k, v in row.items()})
        for epoch in r.array_epochs():
            histograms = {}
            for key, values in r.load_arrays(epoch).items():
                prefix, _, layer = key.partition(":")
                if prefix in _HISTOGRAMS:
                    histograms[f"{_HISTOGRAMS[prefix]}/{layer}"] = values
            writer.histograms(epoch, histograms)
    finally:
        writer.close()
    return count
