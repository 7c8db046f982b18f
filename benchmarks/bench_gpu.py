"""Case 7: the GPU section; runs only where ``torch.cuda.is_available()``.

On a CUDA device it repeats the forward (cases 1), training-step (2) and correlation (4)
comparisons with the model and data on the GPU, each side timed with CUDA events between
``torch.cuda.synchronize()`` calls (the ratios are of device time including the host work that
queues it), and, when CIFAR-10 is present on disk, times the full CIFAR-10 four-arm experiment
(baseline, penalty, dropout, batch norm; ResNet-18, settings from ``studies/cifar10.toml`` if
present, else :func:`cifar10_config`). Without CUDA it prints one SKIP row saying why.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h
import torch

CASE = "gpu"
ARMS = ("baseline", "penalty", "dropout", "batchnorm")


def cifar10_root() -> Path | None:
    """The folder holding ``cifar-10-batches-py`` (env XAI_SPARSITY_DATA or the default cache)."""
    candidates = [os.environ.get("XAI_SPARSITY_DATA"), Path.home() / ".cache/xai_sparsity/data"]
    for c in candidates:
        if c and (Path(c) / "cifar-10-batches-py").is_dir():
            return Path(c)
    return None


def cifar10_config(root: Path) -> Any:
    """The four-arm CIFAR-10 settings: ``studies/cifar10.toml`` if present, else defaults."""
    from xai_sparsity.training.trainer import TrainConfig

    study = h.ROOT / "studies" / "cifar10.toml"
    if study.exists():
        cfg = TrainConfig.load(study)
        return cfg.replace(data="cifar10", data_root=str(root), device="cuda")
    return TrainConfig(
        data="cifar10",
        data_root=str(root),
        model="resnet18",
        train_size=None,
        augment=True,
        epochs=30,
        batch_size=128,
        lr=0.05,
        penalty_lambda=0.3,
        device="cuda",
    )


def gpu_rows(args: argparse.Namespace) -> list[h.Row]:
    import bench_correlation
    import bench_forward
    import bench_train

    sub = copy.copy(args)
    sub.device = "cuda"
    rows: list[h.Row] = []
    for name in ("cnn", "resnet18"):
        rows += bench_forward.run_model(name, sub)
        rows += bench_train.run_model(name, sub)
    rows += bench_correlation.rows(sub)
    for r in rows:
        r.case = f"gpu {r.case}"
    root = cifar10_root()
    label = "CIFAR-10 four-arm experiment wall time"
    if args.quick:
        rows.append(h.skip(CASE, label, "skipped with --quick"))
    elif root is None:
        rows.append(h.skip(CASE, label, "CIFAR-10 not found (set XAI_SPARSITY_DATA)"))
    else:
        from xai_sparsity.training.trainer import run_experiment

        out = Path(tempfile.mkdtemp(prefix="xai-cifar-bench-"))
        try:
            t0 = time.perf_counter()
            run_experiment(cifar10_config(root), list(ARMS), out, progress=False)
            wall = time.perf_counter() - t0
        finally:
            shutil.rmtree(out, ignore_errors=True)
        rows.append(h.row(CASE, label, wall, unit="s", detail=torch.cuda.get_device_name()))
    return rows


def main(argv: list[str] | None = None) -> None:
    p = h.parser(__doc__ or "")
    args = p.parse_args(argv)
    h.setup(args.threads)
    if not torch.cuda.is_available():
        reason = "skipped: torch.cuda.is_available() is False (no CUDA device on this machine)"
        h.emit([h.skip(CASE, "GPU ratios and CIFAR-10 experiment", reason)])
        return
    h.emit(gpu_rows(args))


if __name__ == "__main__":
    main()
