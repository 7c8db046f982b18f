"""scripts/study_archive.py: a study's complete runs kept in the repository and restored."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from xai_sparsity.runs.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]


def _archive_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(
        "study_archive", ROOT / "scripts/study_archive.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(path: Path, complete: bool) -> RunDir:
    run = RunDir(path, create=True)
    run.write_config({"epochs": 2})
    for epoch in (1, 2):
        run.append_history({"epoch": epoch, "train_loss": 1.0 / epoch, "test_loss": 1.0})
        run.save_arrays(epoch, {"spatial:conv1": np.full((1, 2, 2), epoch, dtype=np.float32)})
    (run.checkpoints_dir).mkdir(parents=True, exist_ok=True)
    (run.checkpoints_dir / "last.pt").write_bytes(b"x" * 1000)
    if complete:
        run.mark_complete({"t_L": 2})
    return run


def test_save_keeps_complete_runs_only_and_restore_makes_them_complete(tmp_path: Path) -> None:
    archive = _archive_module()
    study = tmp_path / "study"
    _run(study / "a", complete=True)
    _run(study / "b", complete=False)
    (study / "study.json").write_text("{}")
    kept = tmp_path / "kept"
    assert archive.main(["save", str(study), str(kept)]) == 0
    files = sorted(str(p.relative_to(kept)) for p in kept.rglob("*") if p.is_file())
    assert files == [
        "a/arrays/epoch_0002.npz",
        "a/config.json",
        "a/history.csv",
        "a/summary.json",
        "study.json",
    ]
    assert archive.save(study, kept) == 0  # unchanged runs are not copied again
    fresh = tmp_path / "fresh"
    (fresh / "a").mkdir(parents=True)  # an interrupted attempt of the same run
    assert archive.restore(kept, fresh) == 1
    restored = RunDir(fresh / "a")
    assert restored.is_complete and restored.history()["epoch"].tolist() == [1, 2]
    assert restored.load_arrays(2)["spatial:conv1"].shape == (1, 2, 2)
    assert archive.restore(kept, fresh) == 0  # a complete run is never overwritten
