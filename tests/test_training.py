"""The trainer: configs, run directories, resume after a kill, probe statistics, arms."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from xai_sparsity import XaiSparsityError
from xai_sparsity.measuring.measures import compute_measure, lifetime_sparsity
from xai_sparsity.runs.rundir import RunDir
from xai_sparsity.training.data import load_data
from xai_sparsity.training.models import make_model
from xai_sparsity.training.probe import ProbeReducer, ProbeSettings
from xai_sparsity.training.trainer import (
    StopTraining,
    TrainConfig,
    arm_config,
    probe_statistics,
    run_experiment,
    train,
)

TINY = {
    "train_size": 40,
    "test_size": 40,
    "probe_size": 20,
    "widths": [4, 4],
    "hidden": 8,
    "batch_size": 16,
    "epochs": 4,
    "lr": 0.05,
    "array_every": 2,
    "spatial_images": 3,
}


def tiny(**changes: object) -> TrainConfig:
    return TrainConfig.from_dict({**TINY, **changes})


def _history(run: RunDir) -> pd.DataFrame:
    return run.history()


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> RunDir:
    """An uninterrupted run with dropout (so the RNG state matters on resume)."""
    return train(tiny(dropout=0.3), tmp_path_factory.mktemp("ref") / "run", progress=False)


# --------------------------------------------------------------------------------- config


def test_config_round_trip_json_and_toml(tmp_path: Path) -> None:
    cfg = tiny(penalty_weights={"features.relu2": 2.0}, penalty_layers=["features.relu*"])
    again = TrainConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg
    path = tmp_path / "c.toml"
    cfg.to_toml(path)
    assert TrainConfig.load(path) == cfg
    cfg.to_json(tmp_path / "c.json")
    assert TrainConfig.load(tmp_path / "c.json") == cfg


def test_config_errors_name_field_value_and_choices() -> None:
    with pytest.raises(XaiSparsityError, match=r"unknown config key.*'epoch'.*'epochs'"):
        TrainConfig.from_dict({"epoch": 3})
    with pytest.raises(XaiSparsityError, match=r"optimizer='sdg' is not one of.*'sgd'"):
        TrainConfig(optimizer="sdg")
    with pytest.raises(XaiSparsityError, match=r"epochs='ten' must be an integer"):
        TrainConfig.from_dict({"epochs": "ten"})
    with pytest.raises(XaiSparsityError, match=r"epochs=0 must be a positive integer"):
        TrainConfig(epochs=0)
    with pytest.raises(XaiSparsityError, match=r"augment='yes' must be true or false"):
        TrainConfig.from_dict({"augment": "yes"})
    with pytest.raises(XaiSparsityError, match=r"dropout=1.2"):
        TrainConfig(dropout=1.2)
    with pytest.raises(XaiSparsityError, match=r"data='mnist6k'.*'mnist5k'"):
        TrainConfig(data="mnist6k")
    assert TrainConfig.from_dict({"lr": 1, "widths": (8, 8)}).lr == 1.0


def test_auto_needs_a_baseline(tmp_path: Path) -> None:
    with pytest.raises(XaiSparsityError, match="penalty_baseline"):
        train(tiny(penalty_lambda=0.3, penalty_layers="auto"), tmp_path / "r", progress=False)


def test_config_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("epochs = = 3\n")
    with pytest.raises(XaiSparsityError, match="not valid TOML"):
        TrainConfig.load(bad)
    with pytest.raises(XaiSparsityError, match="does not exist"):
        TrainConfig.load(tmp_path / "missing.json")
    yaml = tmp_path / "c.yaml"
    yaml.write_text("epochs: 3\n")
    with pytest.raises(XaiSparsityError, match=r"\.json or \.toml"):
        TrainConfig.load(yaml)


def test_arm_config() -> None:
    base = TrainConfig(dropout=0.2, batch_norm=True, penalty_lambda=0.5)
    b = arm_config(base, "baseline")
    assert (b.dropout, b.batch_norm, b.penalty_lambda, b.arm) == (0.0, False, 0.0, "baseline")
    assert arm_config(base, "penalty").penalty_lambda == 0.5
    assert arm_config(TrainConfig(), "penalty").penalty_lambda == 0.3
    both = arm_config(base, "penalty@0.1+batchnorm+dropout@0.4")
    assert (both.penalty_lambda, both.batch_norm, both.dropout) == (0.1, True, 0.4)
    with pytest.raises(XaiSparsityError, match=r"'dropuot' is not one of"):
        arm_config(base, "dropuot")
    with pytest.raises(XaiSparsityError, match="must be a number"):
        arm_config(base, "penalty@x")


# --------------------------------------------------------------------------------- runs


def test_run_directory_contents(reference: RunDir) -> None:
    run = reference
    assert run.is_complete
    df = run.history()
    assert list(df.columns[:5]) == ["epoch", "train_loss", "train_acc", "test_loss", "test_acc"]
    assert df["epoch"].tolist() == [1, 2, 3, 4]
    layers = run.layers
    assert layers == ["features.relu1", "features.relu2", "classifier.relu"]
    for prefix in (
        "sparsity",
        "sparsity_std",
        "zero_fraction",
        "hoyer",
        "entropy",
        "correlation",
        "dead",
        "train_sparsity",
        "lifetime",
    ):
        for layer in layers:
            assert f"{prefix}:{layer}" in df.columns, (prefix, layer)
    assert df.filter(like="sparsity:").notna().all().all()
    assert run.array_epochs() == [2, 4]
    arrays = run.load_arrays(4)
    assert arrays["channel:features.relu2"].shape == (4,)
    assert arrays["layer:features.relu2"].shape == (20,)
    assert arrays["spatial:features.relu1"].shape == (3, 28, 28)
    assert arrays["spatial:features.relu2"].shape == (3, 28, 28)
    assert arrays["correlation:features.relu1"].shape == (4, 4)
    assert arrays["lifetime:classifier.relu"].shape == (8,)
    assert "spatial:classifier.relu" not in arrays
    probe = run.load_probe()
    assert probe["images"].shape == (3, 1, 28, 28) and probe["labels"].shape == (3,)
    state = run.load_checkpoint("last")
    assert state["epoch"] == 4
    best = run.load_checkpoint("best")
    assert "features.conv1.weight" in best
    summary = run.summary
    assert summary["epochs"] == 4 and "analysis" in summary
    cfg = run.config
    assert cfg["source"] == "trainer" and cfg["dropout"] == 0.3


def test_resume_after_callback_kill_is_identical(reference: RunDir, tmp_path: Path) -> None:
    class Killed(Exception):
        pass

    def kill_after_2(row: dict) -> None:  # type: ignore[type-arg]
        if row["epoch"] == 2:
            raise Killed

    out = tmp_path / "run"
    with pytest.raises(Killed):
        train(tiny(dropout=0.3), out, progress=False, callbacks=[kill_after_2])
    assert RunDir(out).history()["epoch"].tolist() == [1, 2]
    assert not RunDir(out).is_complete
    resumed = train(tiny(dropout=0.3), out, progress=False)
    pd.testing.assert_frame_equal(resumed.history(), reference.history())


def test_resume_after_sigkill_is_identical(reference: RunDir, tmp_path: Path) -> None:
    """A real process killed with SIGKILL after epoch 2 was recorded, then resumed."""
    out = tmp_path / "run"
    code = (
        "import sys, time, torch\n"
        "from xai_sparsity.training.trainer import TrainConfig, train\n"
        f"cfg = TrainConfig.from_dict({json.dumps({**TINY, 'dropout': 0.3})})\n"
        "def slow(row):\n"
        "    if row['epoch'] >= 2:\n"
        "        print('EPOCH', row['epoch'], flush=True); time.sleep(600)\n"
        f"train(cfg, {str(out)!r}, progress=False, callbacks=[slow])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, env=env, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("EPOCH 2"), line
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert RunDir(out).history()["epoch"].tolist() == [1, 2]
    resumed = train(tiny(dropout=0.3), out, progress=False)
    pd.testing.assert_frame_equal(resumed.history(), reference.history())


def test_half_written_files_are_never_read(
    reference: RunDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash in the middle of writing epoch 3's resume state leaves epoch 2's intact."""
    import xai_sparsity.base.files as files

    out = tmp_path / "run"
    real = files.atomic_write_bytes
    count = {"last": 0}

    def crash_mid_write(path: object, data: bytes) -> None:
        if str(path).endswith("last.pt"):
            count["last"] += 1
            if count["last"] == 3:
                with files.atomic_open(Path(str(path))) as fh:
                    fh.write(data[: len(data) // 2])  # half of the file is on disk...
                    raise OSError("disk full")  # ...when the process fails
        real(path, data)  # type: ignore[arg-type]

    monkeypatch.setattr(files, "atomic_write_bytes", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        train(tiny(dropout=0.3), out, progress=False)
    monkeypatch.setattr(files, "atomic_write_bytes", real)
    run = RunDir(out)
    assert run.load_checkpoint("last")["epoch"] == 2
    assert [p.name for p in run.checkpoints_dir.iterdir() if p.name.startswith(".")] == []
    # a stray half-written temp file of another writer is ignored as well
    (run.path / ".history.csv.x1.tmp").write_text("epoch,train_loss\n1,0.")
    resumed = train(tiny(dropout=0.3), out, progress=False)
    pd.testing.assert_frame_equal(resumed.history(), reference.history())


def test_other_settings_in_folder_are_refused(reference: RunDir, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(tiny(epochs=1), out, progress=False)
    with pytest.raises(XaiSparsityError, match=r"other settings \(differing: \['lr'\]\)"):
        train(tiny(epochs=1, lr=0.1), out, progress=False)
    again = train(tiny(epochs=1, lr=0.1), out, progress=False, overwrite=True)
    assert again.config["lr"] == 0.1 and len(again.history()) == 1


def test_stop_training_and_early_warning_callback(tmp_path: Path) -> None:
    from xai_sparsity.runs.analysis import EarlyWarning

    rows = []
    warning = EarlyWarning(alpha=1.0, patience=1, min_rise=0.0, warmup=0, min_layers=1)

    def stop(row: dict) -> None:  # type: ignore[type-arg]
        rows.append(row)
        if row["epoch"] == 2:
            raise StopTraining

    run = train(tiny(), tmp_path / "run", progress=False, callbacks=[warning, stop])
    assert run.is_complete and run.summary["stopped_early"]
    assert [r["epoch"] for r in rows] == [1, 2] and len(run.history()) == 2
    assert warning.fired_epoch in (None, 2)  # fed live with each row's sparsity columns


def test_experiment_arms_share_seed_and_order(tmp_path: Path) -> None:
    runs = run_experiment(
        tiny(epochs=2), ["baseline", "penalty@0", "penalty@2"], tmp_path, progress=False
    )
    base, zero, pen = (runs[a].history() for a in ("baseline", "penalty@0", "penalty@2"))
    pd.testing.assert_frame_equal(base, zero)  # lambda 0: identical init, order and schedule
    assert "penalty" in pen.columns and "train_batch_sparsity:features.relu2" in pen.columns
    assert runs["penalty@2"].config["penalty_layers_resolved"] == [
        "features.relu1",
        "features.relu2",
    ]
    assert (pen["sparsity:features.relu2"] < base["sparsity:features.relu2"]).all()
    assert json.loads((tmp_path / "experiment.json").read_text())["arms"] == [
        "baseline",
        "penalty@0",
        "penalty@2",
    ]
    with pytest.raises(XaiSparsityError, match="listed twice"):
        run_experiment(tiny(), ["baseline", "baseline"], tmp_path)


def test_custom_model_and_auto_targets_in_experiment(tmp_path: Path) -> None:
    data = load_data("mnist5k", train_size=40, test_size=40, probe_size=20)
    model = make_model("cnn", num_classes=10, in_channels=1, image_size=28, widths=[4, 4])
    run = train(tiny(epochs=1), tmp_path / "m", progress=False, model=model, data=data)
    assert run.is_complete
    with pytest.warns(UserWarning, match="automatic targeting"):
        runs = run_experiment(
            tiny(epochs=2, penalty_layers="auto"),
            ["baseline", "penalty"],
            tmp_path / "e",
            progress=False,
        )
    assert runs["penalty"].config["penalty_layers"] == ["features.relu2"]


# --------------------------------------------------------------------------------- probe


def test_probe_reducer_matches_measures() -> None:
    torch.manual_seed(1)
    x = torch.relu(torch.randn(12, 5, 6, 7))
    x[0] = 0
    x[1, :2] = 0
    red = ProbeReducer(ProbeSettings(spatial_images=4), arrays=True)
    red("a", x[:7])
    red.offset = 7
    red("a", x[7:])
    res = red.result(["a"])
    for measure, column in (
        ("perplexity", "sparsity"),
        ("zero_fraction", "zero_fraction"),
        ("hoyer", "hoyer"),
        ("entropy", "entropy"),
    ):
        ref = float(compute_measure(measure, x, "layer").double().mean())
        assert res["scalars"][f"{column}:a"] == pytest.approx(ref, abs=1e-6)
    ref_l = compute_measure("perplexity", x, "layer").double().numpy()
    np.testing.assert_allclose(res["arrays"]["layer:a"], ref_l, atol=1e-5)
    ref_c = compute_measure("perplexity", x, "channel").double().mean(0).numpy()
    np.testing.assert_allclose(res["arrays"]["channel:a"], ref_c, atol=1e-5)
    ref_s = compute_measure("perplexity", x[:4], "spatial").numpy()
    np.testing.assert_allclose(res["arrays"]["spatial:a"], ref_s, atol=1e-5)
    life = lifetime_sparsity(x).numpy()
    np.testing.assert_allclose(res["arrays"]["lifetime:a"], life, atol=1e-6)
    assert res["scalars"]["lifetime:a"] == pytest.approx(float(life.mean()), abs=1e-6)


def test_probe_statistics_restore_mode_and_names_reused_modules() -> None:
    model = make_model("resnet18", num_classes=3, in_channels=1, image_size=8)
    model.train()
    x = torch.randn(6, 1, 8, 8)
    cols, arrays = probe_statistics(
        model, x, ["relu", "layer1.0.relu"], arrays=True, spatial_images=2, correlation=False
    )
    assert model.training and all(m.training for m in model.modules())
    assert "sparsity:relu" in cols
    assert "sparsity:layer1.0.relu#0" in cols and "sparsity:layer1.0.relu#1" in cols
    assert arrays["spatial:layer1.0.relu#1"].shape == (2, 8, 8)
    assert np.isfinite(list(cols.values())).all()


def test_probe_gap_recorded(tmp_path: Path) -> None:
    """train_sparsity (training inputs) and sparsity (held-out) are both recorded."""
    run = train(tiny(epochs=1), tmp_path / "r", progress=False)
    df = run.history()
    gap = (df["train_sparsity:features.relu2"] - df["sparsity:features.relu2"]).abs()
    assert float(gap.iloc[0]) < 0.2
