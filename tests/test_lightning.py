"""SparsityCallback: a real Lightning Trainer.fit on the CPU writes the run and logs the scalars;
Lightning stays optional."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from xai_sparsity import XaiSparsityError
from xai_sparsity.runs.rundir import RunDir

pl = pytest.importorskip("lightning.pytorch")

from xai_sparsity.integrations.lightning import SparsityCallback  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class LitCNN(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 8 * 8, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        self.log("train_acc", (logits.argmax(1) == y).float().mean(), on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loaders() -> tuple[DataLoader, DataLoader, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(32, 1, 8, 8, generator=g)
    y = torch.randint(0, 3, (32,), generator=g)
    ds = TensorDataset(x, y)
    return DataLoader(ds, batch_size=8), DataLoader(ds, batch_size=16), x[:10]


def trainer(tmp_path: Path, callback: SparsityCallback, **kw: object) -> pl.Trainer:
    from lightning.pytorch.loggers import CSVLogger

    settings: dict[str, object] = {
        "max_epochs": 2,
        "accelerator": "cpu",
        "devices": 1,
        "limit_train_batches": 2,
        "limit_val_batches": 1,
        "logger": CSVLogger(tmp_path / "logs", name="lit"),
        "callbacks": [callback],
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 1,
        "log_every_n_steps": 1,
    }
    return pl.Trainer(**{**settings, **kw})


def test_fit_writes_the_run_and_logs_scalars(tmp_path: Path) -> None:
    train, val, probe = loaders()
    cb = SparsityCallback(
        probe, ["net.0", "net.2"], tmp_path / "run", log=("sparsity", "hoyer"), array_every=1
    )
    module = LitCNN()
    trainer(tmp_path, cb).fit(module, train, val)

    run = RunDir(tmp_path / "run")
    df = run.history()
    assert df["epoch"].tolist() == [1, 2]  # the sanity check wrote nothing
    assert run.layers == ["net.0", "net.2"]
    for col in ("train_loss", "test_loss", "train_acc", "sparsity:net.0", "correlation:net.2"):
        assert df[col].notna().all(), col
    assert run.array_epochs() == [1, 2]
    assert run.config["source"] == "monitor"
    assert module.training  # the trainer's state is intact after fit

    metrics_files = list((tmp_path / "logs").rglob("metrics.csv"))
    assert len(metrics_files) == 1
    logged = pd.read_csv(metrics_files[0])
    for name in ("sparsity/net.0", "sparsity/net.2", "hoyer/net.2", "sparsity_warning"):
        assert name in logged.columns, name
    values = logged["sparsity/net.0"].dropna().tolist()
    assert values == pytest.approx(df["sparsity:net.0"].tolist(), abs=1e-6)


def test_fit_without_validation_measures_at_train_epoch_end(tmp_path: Path) -> None:
    train, _, probe = loaders()
    cb = SparsityCallback(
        probe, layers="net.2", out=tmp_path / "run", correlation=False, train_stats_every=1
    )
    trainer(tmp_path, cb, limit_val_batches=0).fit(LitCNN(), train)
    df = RunDir(tmp_path / "run").history()
    assert df["epoch"].tolist() == [1, 2]
    assert df["test_loss"].isna().all()
    assert df["train_batch_sparsity:net.2"].between(0, 1).all()


def test_stop_on_warning_stops_the_trainer(tmp_path: Path) -> None:
    train, val, probe = loaders()
    fired: list[int] = []
    cb = SparsityCallback(
        probe,
        out=tmp_path / "run",
        correlation=False,
        on_warning=lambda monitor, epoch, info: fired.append(epoch),
        # the EMA rule with min_rise=-1 fires on any rise: this test is about stopping, not the rule
        warning={
            "rule": "ema_rise",
            "alpha": 1.0,
            "patience": 1,
            "min_rise": -1.0,
            "warmup": 0,
            "min_layers": 1,
        },
        stop_on_warning=True,
    )
    t = trainer(tmp_path, cb)
    t.fit_loop.max_epochs = 5
    t.fit(LitCNN(), train, val)
    # min_rise=-1 and patience=1: any rise between two epochs fires; the trainer stops right there
    assert fired and t.current_epoch == fired[0]
    assert RunDir(tmp_path / "run").history()["epoch"].max() == fired[0]


def test_bad_log_column() -> None:
    with pytest.raises(XaiSparsityError, match="sparsty"):
        SparsityCallback(torch.rand(2, 1, 8, 8), log=("sparsty",))


def test_package_works_without_lightning() -> None:
    code = (
        "import sys; sys.modules['lightning'] = None; sys.modules['lightning.pytorch'] = None\n"
        "import xai_sparsity, xai_sparsity.training.monitor\n"
        "from xai_sparsity import SparsityMonitor\n"
        "try:\n"
        "    import xai_sparsity.integrations.lightning\n"
        "except ImportError as e:\n"
        "    print('ERR', e)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "pip install xai-sparsity[lightning]" in proc.stdout
