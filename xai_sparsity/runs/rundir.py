"""The run directory: the user-facing on-disk format shared by the trainer, the monitor, the
analysis, the figures and the widgets.

Layout (see docs/architecture.md)::

    RUN_DIR/config.json             settings
    RUN_DIR/history.csv             one row per completed epoch (1-based)
    RUN_DIR/arrays/epoch_0005.npz   richer per-epoch arrays
    RUN_DIR/probe.npz               the fixed probe images shown in spatial maps
    RUN_DIR/checkpoints/last.pt     resume state; best.pt: best model state dict
    RUN_DIR/summary.json            written when the run is complete

Every file is written atomically: a temporary file in the same folder is written, flushed,
fsync'ed and renamed over the target, so a reader never sees a half-written file.

>>> import tempfile
>>> run = RunDir(tempfile.mkdtemp(), create=True)
>>> run.append_history({"epoch": 1, "train_loss": 0.5, "sparsity:relu1": 0.6})
>>> run.layers
['relu1']
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from xai_sparsity.base.errors import XaiSparsityError
from xai_sparsity.base.files import (
    atomic_save_npz,
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    read_json,
)

BASE_COLUMNS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc")
"""The first columns of every history.csv."""

LAYER_COLUMN_PREFIXES = (
    "sparsity",
    "sparsity_std",
    "zero_fraction",
    "hoyer",
    "entropy",
    "correlation",
    "dead",
    "train_sparsity",
    "train_batch_sparsity",
    "lifetime",
)
"""Per-layer history columns are named ``<prefix>:<layer>``."""

_EPOCH_FILE = re.compile(r"^epoch_(\d+)\.npz$")


# --------------------------------------------------------------------------- the run directory
class RunDir:
    """A run directory on disk (see the module docstring for the layout).

    Args:
        path: the folder.
        create: create it if missing; otherwise a missing folder or one without ``history.csv``
            and ``config.json`` is an error.
    """

    def __init__(self, path: str | os.PathLike[str], *, create: bool = False) -> None:
        self.path = Path(path)
        if create:
            self.path.mkdir(parents=True, exist_ok=True)
        elif not self.path.is_dir():
            raise XaiSparsityError(f"run directory {str(self.path)!r} does not exist")
        elif not (self.history_path.exists() or self.config_path.exists()):
            raise XaiSparsityError(
                f"{str(self.path)!r} is not a run directory: it has neither history.csv nor "
                "config.json (write one with xai_sparsity.train, SparsityMonitor or RunDir(create=True))"
            )

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    # paths ------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def history_path(self) -> Path:
        return self.path / "history.csv"

    @property
    def arrays_dir(self) -> Path:
        return self.path / "arrays"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    @property
    def name(self) -> str:
        return self.path.name

    # config -----------------------------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        """The run's settings (empty dict if none were written)."""
        if not self.config_path.exists():
            return {}
        data = read_json(self.config_path)
        return dict(data) if isinstance(data, dict) else {"config": data}

    def write_config(self, config: Mapping[str, Any]) -> None:
        atomic_write_json(self.config_path, dict(config))

    # history ----------------------------------------------------------------------------
    def history(self) -> pd.DataFrame:
        """The history as a DataFrame, one row per epoch, sorted by epoch."""
        if not self.history_path.exists():
            return pd.DataFrame(columns=list(BASE_COLUMNS))
        df = pd.read_csv(self.history_path)
        if "epoch" not in df.columns:
            raise XaiSparsityError(f"{str(self.history_path)!r} has no 'epoch' column")
        return df.sort_values("epoch").reset_index(drop=True)

    def _write_history(self, df: pd.DataFrame) -> None:
        base = [c for c in BASE_COLUMNS if c in df.columns]
        rest = [c for c in df.columns if c not in BASE_COLUMNS]
        df = df[base + rest]
        atomic_write_text(self.history_path, df.to_csv(index=False, float_format="%.10g"))

    def append_history(self, row: Mapping[str, Any]) -> None:
        """Append one epoch's row; a row for an epoch already present replaces it."""
        if "epoch" not in row:
            raise XaiSparsityError(f"a history row needs an 'epoch'; got keys {sorted(row)}")
        clean = {k: _scalar(v) for k, v in row.items()}
        df = self.history()
        df = df[df["epoch"] != clean["epoch"]] if len(df) else df
        new = pd.DataFrame([clean])
        df = new if df.empty else pd.concat([df, new], ignore_index=True)
        for col in BASE_COLUMNS:
            if col not in df.columns:
                df[col] = np.nan
        self._write_history(df.sort_values("epoch").reset_index(drop=True))

    def truncate_history(self, last_epoch: int) -> None:
        """Drop every row after ``last_epoch`` (used when resuming)."""
        df = self.history()
        if len(df):
            self._write_history(df[df["epoch"] <= last_epoch])
        for epoch in self.array_epochs():
            if epoch > last_epoch:
                (self.arrays_dir / f"epoch_{epoch:04d}.npz").unlink(missing_ok=True)

    @property
    def epochs(self) -> list[int]:
        df = self.history()
        return [int(e) for e in df["epoch"]] if len(df) else []

    @property
    def layers(self) -> list[str]:
        """Measured layers, in column order, from the ``sparsity:<layer>`` columns."""
        if not self.history_path.exists():
            return []
        with self.history_path.open(encoding="utf-8") as fh:
            header = fh.readline().strip().split(",")
        return [c.split(":", 1)[1] for c in header if c.startswith("sparsity:")]

    def column(self, prefix: str, layer: str) -> str:
        """The history column for ``prefix`` and ``layer``, validated against this run."""
        layers = self.layers
        if layer not in layers:
            from xai_sparsity.base.errors import closest

            raise XaiSparsityError(
                f"layer {layer!r} is not measured in run {self.name!r}; measured layers: "
                f"{layers} (closest: {closest(layer, layers)})"
            )
        return f"{prefix}:{layer}"

    # arrays -----------------------------------------------------------------------------
    def save_arrays(self, epoch: int, arrays: Mapping[str, Any]) -> Path:
        path = self.arrays_dir / f"epoch_{int(epoch):04d}.npz"
        atomic_save_npz(path, arrays)
        return path

    def array_epochs(self) -> list[int]:
        """Epochs that have an ``arrays/epoch_NNNN.npz`` file, ascending."""
        if not self.arrays_dir.is_dir():
            return []
        found = (_EPOCH_FILE.match(p.name) for p in self.arrays_dir.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def load_arrays(self, epoch: int | None = None) -> dict[str, np.ndarray]:
        """The arrays of ``epoch`` (default: the last epoch that has arrays)."""
        epochs = self.array_epochs()
        if not epochs:
            raise XaiSparsityError(f"run {self.name!r} has no per-epoch arrays (arrays/*.npz)")
        if epoch is None:
            epoch = epochs[-1]
        if epoch not in epochs:
            raise XaiSparsityError(
                f"epoch {epoch!r} has no arrays in run {self.name!r}; epochs with arrays: {epochs}"
            )
        with np.load(self.arrays_dir / f"epoch_{int(epoch):04d}.npz") as data:
            return {k: data[k] for k in data.files}

    def save_probe(self, images: Any, labels: Any = None) -> None:
        arrays = {"images": np.asarray(images)}
        if labels is not None:
            arrays["labels"] = np.asarray(labels)
        atomic_save_npz(self.path / "probe.npz", arrays)

    def load_probe(self) -> dict[str, np.ndarray]:
        path = self.path / "probe.npz"
        if not path.exists():
            raise XaiSparsityError(f"run {self.name!r} has no probe.npz")
        with np.load(path) as data:
            return {k: data[k] for k in data.files}

    # checkpoints ------------------------------------------------------------------------
    def checkpoint_path(self, name: str = "last") -> Path:
        return self.checkpoints_dir / f"{name}.pt"

    def save_checkpoint(self, state: Any, name: str = "last") -> Path:
        path = self.checkpoint_path(name)
        atomic_torch_save(state, path)
        return path

    def load_checkpoint(self, name: str = "last", map_location: Any = "cpu") -> Any:
        """Load a checkpoint with ``weights_only=True`` (tensors, numbers, strings, containers)."""
        import torch

        path = self.checkpoint_path(name)
        if not path.exists():
            have = sorted(p.stem for p in self.checkpoints_dir.glob("*.pt"))
            raise XaiSparsityError(
                f"checkpoint {name!r} does not exist in run {self.name!r}; available: {have}"
            )
        return torch.load(path, map_location=map_location, weights_only=True)

    # completion -------------------------------------------------------------------------
    def mark_complete(self, summary: Mapping[str, Any] | None = None) -> None:
        atomic_write_json(self.summary_path, dict(summary or {}))

    @property
    def is_complete(self) -> bool:
        return self.summary_path.exists()

    @property
    def summary(self) -> dict[str, Any]:
        return dict(read_json(self.summary_path)) if self.is_complete else {}


def _scalar(value: Any) -> Any:
    """Turn 0-d tensors / numpy scalars into Python numbers for the CSV."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return value.item()
    return value


def as_run(run: RunDir | str | os.PathLike[str]) -> RunDir:
    """Accept a RunDir or a path."""
    return run if isinstance(run, RunDir) else RunDir(run)


def load_history(run: RunDir | str | os.PathLike[str]) -> pd.DataFrame:
    """The history of a run directory as a pandas DataFrame."""
    return as_run(run).history()
