"""The reproducible study of the papers' claims: a grid of settings x seeds, run in parallel,
summarised in one CSV, scored and reported (docs/science.md).

A study config is a TOML file::

    [study]
    name = "claims"
    seeds = [0, 1, 2]

    [defaults]                       # TrainConfig fields shared by every run
    epochs = 20
    widths = [8, 8, 16, 16]

    [[groups]]                       # a small grid; the study is a list of these
    name = "fashion"
    role = "detection"               # free tag used by the report ("detection", "penalty", ...)
    set = { data = "fashion_mnist" } # fixed settings of the group
    [groups.grid]                    # cartesian product; a value may be a table of settings
    train_size = [500, 1000]
    optimizer = [{ optimizer = "adam", lr = 0.001 }, { optimizer = "sgd", lr = 0.01 }]
    [groups.arms]                    # named arms: settings on top of the cell's
    baseline = {}
    dropout = { dropout = 0.5 }
    "penalty-auto@0.3" = { penalty_lambda = 0.3, penalty_layers = "auto" }

Every (group, grid cell, arm, seed) is one run. The run id is deterministic: the group, arm and
grid values in words plus a hash of the full settings, so the same config always maps to the same
run directories, and two groups that ask for identical settings share one run. An arm with
``penalty_layers = "auto"`` depends on the run with the same settings and no penalty (added when
the config lacks it) and is trained after it, penalising the layers whose sparsity rose before
that baseline's test-loss minimum (the deepest conv activation when none did; see
:func:`xai_sparsity.training.trainer.run_experiment`).

:func:`run_study` trains the runs in worker processes (``forkserver``/``spawn``; one torch thread
each) or in this process (``workers=1``, e.g. on a GPU), skips complete runs (``summary.json``),
resumes interrupted ones from their checkpoints, and rewrites ``summary.csv`` atomically after
every run: one row per run with the settings, ``setting`` (a hash of the settings without the
seed), seed and :func:`summarize_run`'s results (label, ``t_L``, accuracies, the validation
protocol, correlations, every indicator's firing epochs and score).

:func:`report` turns a summary CSV into the tables, figures and verdicts of docs/science.md
(:mod:`xai_sparsity.study.verdicts`); :func:`check_report` (``study-report --check``) says
whether the doc is what the summary generates.

>>> spec = {"study": {"name": "s", "seeds": [0, 1]}, "defaults": {"epochs": 2},
...         "groups": [{"name": "g", "grid": {"train_size": [50, 100]},
...                     "arms": {"baseline": {}, "dropout": {"dropout": 0.5}}}]}
>>> study = expand_study(spec)
>>> len(study.runs), study.runs[0].run_id[:25]
(8, 'g-baseline-train_size=50-')
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import sys
import time
import traceback
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from xai_sparsity.base.errors import XaiSparsityError
from xai_sparsity.base.files import atomic_open, atomic_write_text
from xai_sparsity.runs.rundir import RunDir
from xai_sparsity.study.tables import fmt, frame_table
from xai_sparsity.study.verdicts import NOT_MEASURED

SUMMARY_NAME = "summary.csv"
"""File name of the study summary inside the study folder."""

_PENALTY_KEYS = ("penalty_lambda", "penalty_layers")
_ROW_SETTING_PREFIX = ""
RUN_FIGURES = ("example_overfit.png", "example_control.png", "regularisers.png")
"""Figures drawn from run directories (kept and linked when the runs are not at hand)."""
_GENERATED_BEGIN = "<!-- BEGIN GENERATED: xai-sparsity study-report -->"
_GENERATED_END = "<!-- END GENERATED -->"


# ---------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class StudyRun:
    """One run of a study: its id, where it comes from, and its TrainConfig settings."""

    run_id: str
    groups: tuple[str, ...]
    roles: tuple[str, ...]
    arm: str
    seed: int
    cell: str
    settings: Mapping[str, Any]
    depends_on: str | None = None

    def config(self) -> Any:
        """The :class:`xai_sparsity.training.trainer.TrainConfig` of this run (``auto`` not resolved)."""
        from xai_sparsity.training.trainer import TrainConfig

        return TrainConfig.from_dict({**self.settings, "seed": self.seed, "arm": self.arm})


@dataclass
class Study:
    """An expanded study: its name, the runs in order, and the setting keys the config names."""

    name: str
    runs: list[StudyRun]
    setting_keys: list[str] = field(default_factory=list)
    spec: Mapping[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.runs)

    def by_id(self) -> dict[str, StudyRun]:
        return {r.run_id: r for r in self.runs}

    def table(self) -> pd.DataFrame:
        """One row per run: id, groups, arm, seed and the named settings."""
        return pd.DataFrame([_base_row(r, self.setting_keys) for r in self.runs])


def _hash(obj: Any, n: int = 8) -> str:
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def _word(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return "x".join(_word(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value).replace("/", "_").replace(" ", "_")


def _axis_values(key: str, values: Any) -> list[tuple[str, dict[str, Any]]]:
    if not isinstance(values, list) or not values:
        raise XaiSparsityError(f"grid axis {key!r} must be a non-empty list; got {values!r}")
    out = []
    for v in values:
        if isinstance(v, dict):
            label = _word(v.get(key, "-".join(_word(x) for x in v.values())))
            out.append((label, dict(v)))
        else:
            out.append((_word(v), {key: v}))
    return out


def _check_settings(where: str, settings: Mapping[str, Any]) -> None:
    from xai_sparsity.training.trainer import TrainConfig

    valid = {f for f in TrainConfig.__dataclass_fields__}
    bad = sorted(set(settings) - valid)
    if bad:
        from xai_sparsity.base.errors import closest

        hints = {b: closest(b, valid, 2) for b in bad}
        raise XaiSparsityError(f"{where}: unknown setting(s) {bad} (closest: {hints})")
    if "seed" in settings:
        raise XaiSparsityError(f"{where}: 'seed' is set by [study] seeds, not in a setting")


def expand_study(spec: Mapping[str, Any]) -> Study:
    """Expand a parsed study config (see the module docstring) into its runs, in order."""
    head = dict(spec.get("study", {}))
    name = str(head.get("name", "study"))
    seeds = head.get("seeds", [0, 1, 2])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise XaiSparsityError(f"[study] seeds={seeds!r} must be a non-empty list of ints")
    defaults = dict(spec.get("defaults", {}))
    _check_settings("[defaults]", defaults)
    groups = spec.get("groups")
    if not isinstance(groups, list) or not groups:
        raise XaiSparsityError("a study needs at least one [[groups]] table")
    arm_keys = {k for g in groups for a in dict(g.get("arms", {})).values() for k in dict(a)}
    arm_keys |= {"arm", *(_PENALTY_KEYS)}
    setting_keys: list[str] = list(defaults)
    by_hash: dict[str, StudyRun] = {}
    order: list[str] = []
    for gi, group in enumerate(groups):
        gname = str(group.get("name", f"group{gi}"))
        role = str(group.get("role", "detection"))
        fixed = dict(group.get("set", {}))
        _check_settings(f"group {gname!r} set", fixed)
        grid = dict(group.get("grid", {}))
        arms = dict(group.get("arms", {"baseline": {}}))
        axes = [_axis_values(k, v) for k, v in grid.items()]
        group_seeds = group.get("seeds", seeds)
        for combo in itertools.product(*axes) if axes else [()]:
            cell_settings: dict[str, Any] = {**defaults, **fixed}
            for _, values in combo:
                cell_settings.update(values)
            slug = "_".join(f"{k}={label}" for k, (label, _) in zip(grid, combo, strict=True))
            for arm, arm_settings in arms.items():
                arm_settings = dict(arm_settings)
                settings = {**cell_settings, **arm_settings}
                _check_settings(f"group {gname!r} arm {arm!r}", settings)
                for k in settings:
                    if k not in setting_keys:
                        setting_keys.append(k)
                cell = _hash({k: v for k, v in settings.items() if k not in arm_keys})
                for seed in group_seeds:
                    h = _hash({"settings": settings, "seed": seed})
                    if h in by_hash:
                        old = by_hash[h]
                        by_hash[h] = StudyRun(
                            old.run_id,
                            (*old.groups, gname) if gname not in old.groups else old.groups,
                            (*old.roles, role) if role not in old.roles else old.roles,
                            old.arm,
                            old.seed,
                            old.cell,
                            old.settings,
                        )
                        continue
                    parts = [gname, _word(arm)] + ([slug] if slug else []) + [f"s{seed}", h[:6]]
                    run_id = "-".join(parts)
                    by_hash[h] = StudyRun(
                        run_id, (gname,), (role,), str(arm), int(seed), cell, settings
                    )
                    order.append(h)
    runs = [by_hash[h] for h in order]
    runs = _add_auto_baselines(runs)
    ids = [r.run_id for r in runs]
    if len(set(ids)) != len(ids):  # pragma: no cover - the hash makes ids unique
        raise XaiSparsityError("two runs of the study got the same id")
    return Study(name=name, runs=runs, setting_keys=setting_keys, spec=dict(spec))


def _baseline_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in settings.items() if not k.startswith("penalty_")}
    return out


def _add_auto_baselines(runs: list[StudyRun]) -> list[StudyRun]:
    """Point every ``penalty_layers="auto"`` run at its no-penalty twin (added if missing)."""
    index = {(_hash(_baseline_settings(r.settings)), r.seed): r for r in runs if not _penalised(r)}
    out: list[StudyRun] = []
    added: dict[str, StudyRun] = {}
    for r in runs:
        if _penalised(r) and r.settings.get("penalty_layers") == "auto":
            base_settings = _baseline_settings(r.settings)
            key = (_hash(base_settings), r.seed)
            base = index.get(key)
            if base is None:
                h = _hash({"settings": base_settings, "seed": r.seed})
                base = StudyRun(
                    f"{r.groups[0]}-auto_baseline-s{r.seed}-{h[:6]}",
                    r.groups,
                    r.roles,
                    "baseline",
                    r.seed,
                    r.cell,
                    base_settings,
                )
                index[key] = base
                added[base.run_id] = base
                out.append(base)
            r = StudyRun(
                r.run_id, r.groups, r.roles, r.arm, r.seed, r.cell, r.settings, base.run_id
            )
        out.append(r)
    return out


def _penalised(r: StudyRun) -> bool:
    return float(r.settings.get("penalty_lambda", 0.0) or 0.0) > 0


def load_study(path: str | os.PathLike[str]) -> Study:
    """Read and expand a study config (TOML)."""
    import tomllib

    p = Path(path)
    if not p.exists():
        raise XaiSparsityError(f"study config {str(p)!r} does not exist")
    try:
        spec = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise XaiSparsityError(f"study config {str(p)!r} is not valid TOML: {err}") from None
    return expand_study(spec)


# ---------------------------------------------------------------------------------- rows
def _scalar(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return "-".join(str(x) for x in v)
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True)
    return v


def _base_row(r: StudyRun, setting_keys: Sequence[str]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "run_id": r.run_id,
        "groups": ";".join(r.groups),
        "roles": ";".join(r.roles),
        "arm": r.arm,
        "seed": r.seed,
        "cell": r.cell,
        "setting": _hash(dict(r.settings)),
    }
    for k in setting_keys:
        if k in ("arm", "seed"):
            continue
        row[k] = _scalar(r.settings.get(k, _default(k)))
    return row


def _default(key: str) -> Any:
    from xai_sparsity.training.trainer import TrainConfig

    return getattr(TrainConfig(), key, None)


def summarize_run(run: RunDir | str | os.PathLike[str]) -> dict[str, Any]:
    """The study's per-run results of a finished run directory (no settings columns).

    Keys: ``status``, ``epochs``, the label of :func:`xai_sparsity.runs.analysis.label_run`
    (``label``, ``t_L``, ``rise``, ``converged``, ``still_learning``, ``label_reason``) and
    ``turned`` (the label is "overfits"), ``best_test_acc``, ``best_test_acc_epoch``,
    ``final_test_acc``, ``min_test_loss``, ``final_test_loss``, ``final_train_acc``,
    ``final_sparsity_deepest``, the validation protocol (``min_val_loss``, ``val_best_epoch``,
    ``val_test_acc``: test accuracy at the validation-loss minimum; NaN without ``val_loss``),
    mean filter correlation over the feature layers over positions and over images, at t_L and
    at the end (``corr_tL``, ``final_correlation``, ``corr_images_tL``,
    ``final_correlation_images``), ``penalty_layers_used``, ``seconds``, and the indicator
    columns of :func:`xai_sparsity.study.indicators.evaluate_run`.
    """
    from xai_sparsity.runs.analysis import label_run
    from xai_sparsity.study.indicators import RunData, evaluate_run

    r = run if isinstance(run, RunDir) else RunDir(run)
    df = r.history()
    if df.empty:
        raise XaiSparsityError(f"run {r.name!r} has no history")
    lab = label_run(df)
    data = RunData.from_run(r)
    deepest = data.watched[-1] if data.watched else None
    acc = df["test_acc"].to_numpy(dtype=float)
    row: dict[str, Any] = {
        "status": "complete" if r.is_complete else "incomplete",
        "epochs": int(df["epoch"].max()),
        "label": lab.label,
        "t_L": lab.t_L,
        "turned": lab.label == "overfits",
        "rise": round(float(lab.rise), 6),
        "converged": bool(lab.converged),
        "still_learning": bool(lab.still_learning),
        "label_reason": lab.reason,
        "best_test_acc": float(np.nanmax(acc)),
        "best_test_acc_epoch": int(df["epoch"].iloc[int(np.nanargmax(acc))]),
        "final_test_acc": float(acc[-1]),
        "min_test_loss": float(df["test_loss"].min()),
        "final_test_loss": float(df["test_loss"].iloc[-1]),
        "final_train_acc": float(df["train_acc"].iloc[-1]),
        "final_sparsity_deepest": (
            float(df[f"sparsity:{deepest}"].iloc[-1]) if deepest is not None else math.nan
        ),
        **_validation_columns(df),
        **_correlation_columns(df, data.watched, lab.t_L),
        "penalty_layers_used": ";".join(r.summary.get("penalty_layers", []) or []),
        "seconds": r.summary.get("seconds_training"),
    }
    row.update(evaluate_run(data))
    return row


def _validation_columns(history: pd.DataFrame) -> dict[str, Any]:
    """The validation protocol of one run: its validation-loss minimum, that epoch, and the test
    accuracy there (NaN without a ``val_loss`` column)."""
    if "val_loss" not in history.columns:
        return {"min_val_loss": math.nan, "val_best_epoch": math.nan, "val_test_acc": math.nan}
    val = pd.to_numeric(history["val_loss"], errors="coerce").to_numpy(dtype=float)
    if not np.isfinite(val).any():
        return {"min_val_loss": math.nan, "val_best_epoch": math.nan, "val_test_acc": math.nan}
    i = int(np.nanargmin(val))
    return {
        "min_val_loss": float(val[i]),
        "val_best_epoch": int(history["epoch"].iloc[i]),
        "val_test_acc": float(history["test_acc"].iloc[i]),
    }


def _correlation_columns(
    history: pd.DataFrame, layers: Sequence[str], t_L: int | None
) -> dict[str, float]:
    """Mean filter correlation over ``layers`` (over positions: ``correlation:<layer>``; over
    images: ``correlation_images:<layer>``) at ``t_L`` and at the last epoch (NaN if absent)."""
    at_tL = list(history.index[history["epoch"] == t_L]) if t_L is not None else []
    out: dict[str, float] = {}
    for prefix, name in (("correlation", ""), ("correlation_images", "_images")):
        cols = [f"{prefix}:{n}" for n in layers if f"{prefix}:{n}" in history.columns]
        values = history[cols].apply(pd.to_numeric, errors="coerce") if cols else None
        end = values.iloc[-1] if values is not None else pd.Series(dtype=float)
        mid = values.loc[at_tL[0]] if values is not None and len(at_tL) else pd.Series(dtype=float)
        out[f"corr{name}_tL"] = float(mid.mean()) if mid.notna().any() else math.nan
        out[f"final_correlation{name}"] = float(end.mean()) if end.notna().any() else math.nan
    return out


def _row_for(r: StudyRun, out: Path, setting_keys: Sequence[str]) -> dict[str, Any]:
    row = _base_row(r, setting_keys)
    row.update(summarize_run(out / r.run_id))
    return row


def write_summary(rows: Iterable[Mapping[str, Any]], path: str | os.PathLike[str]) -> pd.DataFrame:
    """Write the summary table atomically (CSV) and return it."""
    df = pd.DataFrame(list(rows))
    atomic_write_text(path, df.to_csv(index=False, float_format="%.10g"))
    return df


def read_summary(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a summary CSV written by :func:`run_study` (``turned`` as bool)."""
    p = Path(path)
    if p.is_dir():
        p = p / SUMMARY_NAME
    if not p.exists():
        raise XaiSparsityError(f"no study summary at {str(p)!r}")
    try:
        df = pd.read_csv(p)
    except pd.errors.EmptyDataError:
        return pd.DataFrame(columns=["run_id", "status"])
    if "turned" in df.columns:
        df["turned"] = df["turned"].astype(str).str.lower().isin(["true", "1"])
    return df


# ---------------------------------------------------------------------------------- running
def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, threads))
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning)


def _train_one(
    run: StudyRun, out: str, device: str | None, baseline_dir: str | None
) -> dict[str, Any]:
    """Train (or resume) one run; return its result columns. Runs in a worker process."""
    from xai_sparsity.training.trainer import TrainConfig, resolve_auto_targets, train

    settings = {**run.settings, "seed": run.seed, "arm": run.arm}
    if device is not None:
        settings["device"] = device
    path = Path(out) / run.run_id
    lam = float(settings.get("penalty_lambda", 0.0) or 0.0)
    if lam > 0 and settings.get("penalty_layers") == "auto":
        if baseline_dir is None:
            raise XaiSparsityError(f"run {run.run_id!r} needs its baseline run for 'auto'")
        # Resolved exactly as run_experiment does (targets of the finished baseline, or the
        # deepest conv activation when none rose); lambda 0 keeps the unresolved config valid.
        unresolved = TrainConfig.from_dict({**settings, "penalty_lambda": 0.0})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = resolve_auto_targets(unresolved, RunDir(baseline_dir), path).replace(
                penalty_lambda=lam
            )
    else:
        cfg = TrainConfig.from_dict(settings)
    if os.environ.get("XAI_SPARSITY_STUDY_FAIL") == run.run_id:  # fault injection for tests
        raise RuntimeError(f"injected failure in {run.run_id}")
    train(cfg, path, progress=False)
    return summarize_run(path)


def default_workers(n_runs: int, device: str | None = None) -> int:
    """``min(cores, runs)`` on the CPU; 1 (this process) on a GPU."""
    if _uses_gpu(device):
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cores or 1, n_runs))


def _uses_gpu(device: str | None) -> bool:
    if device is not None:
        return device.startswith("cuda")
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover
        return False


def _select(study: Study, limit: int | None, only: Sequence[str] | None) -> list[StudyRun]:
    runs = study.runs
    if only:
        wanted = set(only)
        unknown = sorted(
            w for w in wanted if not any(w in g for r in runs for g in (r.run_id, *r.groups))
        )
        if unknown:
            raise XaiSparsityError(
                f"--only {unknown} matches no run id or group; groups: "
                f"{sorted({g for r in runs for g in r.groups})}"
            )
        runs = [r for r in runs if any(w in (r.run_id, *r.groups) for w in wanted)]
    if limit is not None:
        if limit < 1:
            raise XaiSparsityError(f"limit={limit!r} must be >= 1")
        runs = runs[:limit]
    by_id = study.by_id()
    chosen = {r.run_id for r in runs}
    for r in list(runs):
        if r.depends_on and r.depends_on not in chosen:
            chosen.add(r.depends_on)
    return [r for r in study.runs if r.run_id in chosen and r.run_id in by_id]


def run_study(
    study: Study | str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    workers: int | None = None,
    limit: int | None = None,
    only: Sequence[str] | None = None,
    device: str | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Run (or finish) a study and write ``out/summary.csv``.

    Args:
        study: a :class:`Study` or the path of a study config (TOML).
        out: the study folder: one run directory per run id, and ``summary.csv``.
        workers: worker processes (default :func:`default_workers`); 1 runs in this process.
        limit: run only the first ``limit`` runs (plus the baselines they need).
        only: run only runs whose id or group is listed.
        device: passed to every run (default: each run's own setting, "auto").
        progress: a tqdm bar over runs.

    Returns the summary (one row per selected run; failed runs have ``status="failed"`` and an
    ``error``). Raises :class:`XaiSparsityError` after writing the summary if a run failed.
    """
    if not isinstance(study, Study):
        study = load_study(study)
    base = Path(out)
    base.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        base / "study.json", json.dumps({"name": study.name, "spec": study.spec}, indent=1)
    )
    runs = _select(study, limit, only)
    ledger = _Ledger(runs, base, study.setting_keys)
    ledger.flush()
    pending = [r for r in runs if r.run_id not in ledger.done]
    n_workers = workers if workers is not None else default_workers(len(pending), device)
    if n_workers < 1:
        raise XaiSparsityError(f"workers={n_workers!r} must be >= 1")
    if progress:
        from tqdm.auto import tqdm

        ledger.bar = tqdm(total=len(runs), initial=len(ledger.done), desc=study.name, unit="run")
    try:
        if n_workers == 1:
            _run_serial(pending, ledger, device)
        else:
            _run_pool(pending, n_workers, ledger, device)
    finally:
        if ledger.bar is not None:
            ledger.bar.close()
    table = ledger.flush()
    if ledger.failed:
        first = next(iter(ledger.failed.values())).strip().splitlines()[-1]
        raise XaiSparsityError(
            f"{len(ledger.failed)} run(s) failed: {sorted(ledger.failed)[:5]}; first error: "
            f"{first}. The summary of the others is in {str(ledger.path)!r}; rerun to retry."
        )
    return table


def summarize_study(
    study: Study | str | os.PathLike[str],
    out: str | os.PathLike[str],
    path: str | os.PathLike[str] | None = None,
) -> pd.DataFrame:
    """Rebuild the summary of a study's complete runs from their run directories, with this
    version's columns (for a study that a long-running older process is still writing); trains
    nothing. Writes ``path`` (default ``out/summary.csv``) and returns the table."""
    if not isinstance(study, Study):
        study = load_study(study)
    base = Path(out)
    ledger = _Ledger(study.runs, base, study.setting_keys)  # reads every complete run's row
    rows = [ledger.rows[r.run_id] for r in study.runs if r.run_id in ledger.rows]
    return write_summary(rows, path if path is not None else base / SUMMARY_NAME)


class _Ledger:
    """The rows of a running study: which runs are done or failed. Every result is written to
    the summary at once, so an interrupted study resumes where it stopped."""

    def __init__(self, runs: list[StudyRun], base: Path, keys: Sequence[str]) -> None:
        self.runs, self.base, self.keys = runs, base, keys
        self.path = base / SUMMARY_NAME
        self.rows: dict[str, dict[str, Any]] = {}
        self.done = {r.run_id for r in runs if (base / r.run_id / "summary.json").exists()}
        for r in runs:
            if r.run_id in self.done:
                self.rows[r.run_id] = _row_for(r, base, keys)
        self.failed: dict[str, str] = {}
        self.bar: Any = None

    def flush(self) -> pd.DataFrame:
        """Write the summary of the runs recorded so far."""
        rows = [self.rows[r.run_id] for r in self.runs if r.run_id in self.rows]
        return write_summary(rows, self.path)

    def record(self, r: StudyRun, result: dict[str, Any] | None, error: str | None) -> None:
        """Record a finished run (its result, or the error it failed with)."""
        row = _base_row(r, self.keys)
        if error is None:
            assert result is not None
            self.done.add(r.run_id)
            row.update(result)
        else:
            row.update({"status": "failed", "error": error.strip().splitlines()[-1][:300]})
            self.failed[r.run_id] = error
        self.rows[r.run_id] = row
        self.flush()
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(r.run_id[:40], refresh=False)

    def ready(self, r: StudyRun) -> bool:
        return r.depends_on is None or r.depends_on in self.done

    def blocked(self, r: StudyRun) -> bool:
        return r.depends_on is not None and r.depends_on in self.failed

    def base_dir(self, r: StudyRun) -> str | None:
        """The run directory of the baseline ``r`` depends on, if any."""
        return str(self.base / r.depends_on) if r.depends_on else None


def _run_serial(pending: list[StudyRun], ledger: _Ledger, device: str | None) -> None:
    """Train the pending runs one after the other in this process."""
    queue = list(pending)
    while queue:
        nxt = next((q for q in queue if ledger.ready(q) or ledger.blocked(q)), None)
        if nxt is None:  # pragma: no cover - dependencies always come first
            raise XaiSparsityError("study runs wait on each other")
        r = nxt
        queue.remove(r)
        if ledger.blocked(r):
            ledger.record(r, None, f"its baseline {r.depends_on} failed")
            continue
        try:
            _worker_init(max(1, (os.cpu_count() or 1)) if _uses_gpu(device) else 0)
            result = _train_one(r, str(ledger.base), device, ledger.base_dir(r))
        except Exception:
            ledger.record(r, None, traceback.format_exc())
        else:
            ledger.record(r, result, None)


def _run_pool(pending: list[StudyRun], n_workers: int, ledger: _Ledger, device: str | None) -> None:
    """Train the pending runs in ``n_workers`` processes, each run once its baseline is done."""
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    queue = list(pending)
    with cf.ProcessPoolExecutor(
        max_workers=n_workers, mp_context=ctx, initializer=_worker_init, initargs=(1,)
    ) as pool:
        running: dict[cf.Future[dict[str, Any]], StudyRun] = {}
        try:
            while queue or running:
                for r in [q for q in queue if ledger.blocked(q)]:
                    queue.remove(r)
                    ledger.record(r, None, f"its baseline {r.depends_on} failed")
                for r in [q for q in queue if ledger.ready(q)]:
                    if len(running) >= n_workers:
                        break
                    queue.remove(r)
                    base_dir = ledger.base_dir(r)
                    fut = pool.submit(_train_one, r, str(ledger.base), device, base_dir)
                    running[fut] = r
                if not running:
                    if queue:  # pragma: no cover - dependencies always come first
                        raise XaiSparsityError("study runs wait on each other")
                    break
                finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for fut in finished:
                    r = running.pop(fut)
                    try:
                        result = fut.result()
                    except Exception as err:
                        ledger.record(r, None, "".join(traceback.format_exception(err)))
                    else:
                        ledger.record(r, result, None)
        except BaseException:
            for fut in running:
                fut.cancel()
            for proc in list(getattr(pool, "_processes", {}).values()):
                with contextlib.suppress(Exception):
                    proc.terminate()
            raise


# ---------------------------------------------------------------------------------- analysis
def penalty_table(summary: pd.DataFrame, role: str = "penalty") -> pd.DataFrame:
    """Best and final test accuracy per arm (mean, std, n) on the runs of groups with ``role``,
    the test accuracy at the validation-loss minimum (``val_acc_mean``, NaN without a validation
    split), the share of runs whose test loss turned, final sparsity and correlation."""
    df = _role(summary, role)
    if df.empty:
        return pd.DataFrame()
    for col in ("val_test_acc", "final_correlation_images"):
        if col not in df.columns:
            df[col] = math.nan
    g = df.groupby("arm", sort=False)
    out = pd.DataFrame(
        {
            "n": g.size(),
            "val_acc_mean": g["val_test_acc"].mean(),
            "val_acc_std": g["val_test_acc"].std(ddof=1),
            "best_acc_mean": g["best_test_acc"].mean(),
            "best_acc_std": g["best_test_acc"].std(ddof=1),
            "final_acc_mean": g["final_test_acc"].mean(),
            "final_acc_std": g["final_test_acc"].std(ddof=1),
            "turned_share": g["turned"].mean(),
            "final_sparsity_deepest": g["final_sparsity_deepest"].mean(),
            "final_correlation": g["final_correlation"].mean(),
            "final_correlation_images": g["final_correlation_images"].mean(),
        }
    ).reset_index()
    return out


def _role(summary: pd.DataFrame, role: str) -> pd.DataFrame:
    from xai_sparsity.study.claims import role_runs

    return role_runs(summary, role)


def paired_comparison(
    summary: pd.DataFrame,
    arms: Sequence[str] | None = None,
    against: Sequence[str] = ("baseline", "dropout", "batchnorm"),
    role: str = "penalty",
    metrics: Sequence[str] = ("best_test_acc", "final_test_acc"),
) -> pd.DataFrame:
    """Paired differences ``arm - comparator`` over runs with the same cell and seed.

    Returns one row per (arm, comparator, metric): ``n_pairs``, ``mean_diff``, ``std_diff``,
    ``wins`` (pairs where the arm is better), ``t_p`` (paired t-test) and ``sign_p`` (two-sided
    sign test, ties dropped).
    """
    from scipy import stats

    df = _role(summary, role)
    if df.empty:
        return pd.DataFrame()
    if arms is None:
        arms = [a for a in df["arm"].unique() if str(a).startswith("penalty")]
    rows = []
    for arm in arms:
        for comp in against:
            a = df[df["arm"] == arm].set_index(["cell", "seed"])
            b = df[df["arm"] == comp].set_index(["cell", "seed"])
            common = a.index.intersection(b.index)
            for metric in metrics:
                d = (a.loc[common, metric] - b.loc[common, metric]).to_numpy(dtype=float)
                n = len(d)
                nonzero = d[d != 0]
                t_p = (
                    float(stats.ttest_rel(a.loc[common, metric], b.loc[common, metric]).pvalue)
                    if n >= 2 and np.std(d) > 0
                    else math.nan
                )
                sign_p = (
                    float(stats.binomtest(int((nonzero > 0).sum()), len(nonzero), 0.5).pvalue)
                    if len(nonzero)
                    else math.nan
                )
                rows.append(
                    {
                        "arm": arm,
                        "against": comp,
                        "metric": metric,
                        "n_pairs": n,
                        "mean_diff": float(d.mean()) if n else math.nan,
                        "std_diff": float(d.std(ddof=1)) if n >= 2 else math.nan,
                        "wins": int((d > 0).sum()),
                        "t_p": t_p,
                        "sign_p": sign_p,
                    }
                )
    return pd.DataFrame(rows)


def lambda_curve(summary: pd.DataFrame, role: str = "penalty") -> pd.DataFrame:
    """Mean and std of best/final test accuracy per targeting (``auto``/``all``) and lambda; the
    baseline appears at lambda 0 in both."""
    df = _role(summary, role)
    if df.empty or "penalty_lambda" not in df.columns:
        return pd.DataFrame()
    lam = df["penalty_lambda"].fillna(0.0).astype(float)
    layers = df.get("penalty_layers", pd.Series([None] * len(df), index=df.index))
    target = np.where(layers.astype(str) == "auto", "auto", "all")
    base = df[(lam == 0) & (df["arm"] == "baseline")]
    parts = []
    for t in ("auto", "all"):
        sel = df[(lam > 0) & (target == t)]
        if sel.empty:
            continue
        both = pd.concat([base.assign(_lam=0.0), sel.assign(_lam=lam[sel.index])])
        g = both.groupby("_lam")
        parts.append(
            pd.DataFrame(
                {
                    "targeting": t,
                    "lambda": g.size().index,
                    "n": g.size().to_numpy(),
                    "best_acc_mean": g["best_test_acc"].mean().to_numpy(),
                    "best_acc_std": g["best_test_acc"].std(ddof=1).to_numpy(),
                    "final_acc_mean": g["final_test_acc"].mean().to_numpy(),
                    "final_acc_std": g["final_test_acc"].std(ddof=1).to_numpy(),
                    "turned_share": g["turned"].mean().to_numpy(),
                }
            )
        )
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def detection_runs(summary: pd.DataFrame) -> pd.DataFrame:
    """The complete runs scored as detectors: every run except penalised ones (a penalty changes
    the sparsity it is judged by)."""
    df = summary
    if "status" in df.columns:
        df = df[df["status"] == "complete"]
    if "penalty_lambda" in df.columns:
        df = df[df["penalty_lambda"].fillna(0.0).astype(float) == 0.0]
    return df.reset_index(drop=True)


# ---------------------------------------------------------------------------------- report
def overview_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Per group: runs, how many overfit, are clean or undetermined (see
    :func:`xai_sparsity.study.indicators.run_labels`), median t_L of the overfitting runs, mean
    best (over the epochs: test-set early stopping) and final test accuracy."""
    from xai_sparsity.study.indicators import run_labels

    rows = []
    df = summary[summary["status"] == "complete"] if "status" in summary.columns else summary
    labels = pd.Series(run_labels(df), index=df.index)
    group_lists = df["groups"].astype(str).str.split(";")
    for g in dict.fromkeys(g for gs in group_lists for g in gs):
        sel = df[group_lists.apply(lambda gs, g=g: g in gs)]
        lab = labels[sel.index]
        over = lab == "overfits"
        rows.append(
            {
                "group": g,
                "runs": len(sel),
                "overfits": int(over.sum()),
                "clean": int((lab == "clean").sum()),
                "undetermined": int((lab == "undetermined").sum()),
                "t_L median": float(sel.loc[over, "t_L"].median()) if over.any() else math.nan,
                "best acc": float(sel["best_test_acc"].mean()),
                "final acc": float(sel["final_test_acc"].mean()),
            }
        )
    return pd.DataFrame(rows)


def _save_png(fig: Any, folder: Path, name: str, dpi: int, made: dict[str, str]) -> None:
    """Write ``fig`` as ``folder/name`` (atomically), close it and note it in ``made``."""
    import matplotlib.pyplot as plt

    with atomic_open(folder / name) as fh:
        fig.savefig(fh, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    made[name] = name


def _figures(
    summary: pd.DataFrame,
    scores: pd.DataFrame,
    curve: pd.DataFrame,
    arms: pd.DataFrame,
    folder: Path,
) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg", force=False)

    folder.mkdir(parents=True, exist_ok=True)
    made: dict[str, str] = {}
    if not scores.empty:
        _save_png(_leads_figure(detection_runs(summary), scores), folder, "leads.png", 90, made)
        _save_png(_precision_recall_figure(scores), folder, "precision_recall.png", 90, made)
    if not curve.empty:
        _save_png(_lambda_figure(curve), folder, "lambda_curve.png", 90, made)
    if not arms.empty:
        _save_png(_arms_figure(arms), folder, "arms.png", 90, made)
    return made


def _leads_figure(det: pd.DataFrame, scores: pd.DataFrame) -> Any:
    """Box plots of each indicator's lead on the overfitting runs it fired on (thresholds by
    leave-one-setting-out)."""
    import matplotlib.pyplot as plt

    from xai_sparsity.study.indicators import cross_validated

    fig, ax = plt.subplots(figsize=(6.0, 0.6 + 0.28 * len(scores)))
    data = []
    for name in scores["indicator"]:
        cv = cross_validated(det, str(name))
        sel = cv[(cv["label"] == "overfits") & cv["fire"].notna()]
        data.append((sel["t_L"] - sel["fire"]).to_numpy(dtype=float))
    ax.boxplot(
        data, orientation="horizontal", tick_labels=list(scores["indicator"]), showfliers=True
    )
    ax.axvline(-1, color="k", lw=0.8, ls="--")
    ax.set_xlabel("lead = t_L − firing epoch (epochs; >= −1: a hit)")
    ax.set_title("Lead on the overfitting runs fired on (leave-one-setting-out)")
    return fig


def _precision_recall_figure(scores: pd.DataFrame) -> Any:
    """Each indicator's precision against its recall, with the base rate."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 3.6))
    for name, rec, prec in zip(
        scores["indicator"], scores["recall"], scores["precision"], strict=True
    ):
        ax.scatter(float(rec), float(prec), s=30)
        ax.annotate(
            str(name),
            (float(rec), float(prec)),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    first = scores.iloc[0]
    n = int(first["n_overfits"]) + int(first["n_clean"])
    base = int(first["n_overfits"]) / n if n else math.nan
    ax.axhline(base, color="k", lw=0.8, ls="--", label=f"base rate {base:.2f}")
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("recall (hits by t_L + 1)")
    ax.set_ylabel("precision")
    ax.legend(fontsize=7, loc="lower left")
    return fig


def _lambda_figure(curve: pd.DataFrame) -> Any:
    """Best and final test accuracy against the penalty's lambda, per targeting."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.0, 3.2))
    for t, sel in curve.groupby("targeting"):
        x = sel["lambda"].to_numpy(dtype=float)
        xs = np.where(x == 0, min(x[x > 0].min() / 3, 0.01) if (x > 0).any() else 0.01, x)
        ax.errorbar(
            xs,
            sel["best_acc_mean"],
            yerr=sel["best_acc_std"].fillna(0),
            marker="o",
            capsize=3,
            label=f"{t}: best",
        )
        ax.errorbar(
            xs,
            sel["final_acc_mean"],
            yerr=sel["final_acc_std"].fillna(0),
            marker="s",
            ls="--",
            capsize=3,
            label=f"{t}: final",
        )
    ax.set_xscale("log")
    ax.set_xlabel("lambda (leftmost point: baseline, lambda 0)")
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=7)
    return fig


def _arms_figure(arms: pd.DataFrame) -> Any:
    """Best and final test accuracy per arm (mean and std over seeds)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 3.2))
    x = np.arange(len(arms))
    ax.bar(
        x - 0.2,
        arms["best_acc_mean"],
        0.4,
        yerr=arms["best_acc_std"].fillna(0),
        label="best",
        capsize=2,
    )
    ax.bar(
        x + 0.2,
        arms["final_acc_mean"],
        0.4,
        yerr=arms["final_acc_std"].fillna(0),
        label="final",
        capsize=2,
    )
    ax.set_xticks(x, list(arms["arm"]), rotation=35, ha="right", fontsize=7)
    lo = float(np.nanmin(arms[["best_acc_mean", "final_acc_mean"]].to_numpy())) - 0.05
    ax.set_ylim(max(0.0, lo), 1.0)
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=7)
    return fig


def _run_figures(summary: pd.DataFrame, runs_dir: Path, folder: Path) -> dict[str, str]:
    """Figures 1 and 6 of the library (``xai_sparsity.views.figures``) for example runs of the study:
    one overfitting baseline, one negative control, and the regularisers of the penalty group."""
    import matplotlib

    matplotlib.use("Agg", force=False)

    from xai_sparsity.study.indicators import run_labels
    from xai_sparsity.views.figures import plot_loss_and_sparsity, plot_regulariser_comparison

    folder.mkdir(parents=True, exist_ok=True)
    made: dict[str, str] = {}
    df = detection_runs(summary)
    df = df[[(runs_dir / str(r) / "history.csv").exists() for r in df["run_id"]]]
    labels = run_labels(df) if len(df) else np.array([], dtype=str)

    examples = {
        "example_overfit.png": df[(labels == "overfits") & (df["arm"] == "baseline")],
        "example_control.png": df[(labels == "clean") & (df["arm"] != "baseline")],
    }
    for name, sel in examples.items():
        if len(sel):
            fig = plot_loss_and_sparsity(runs_dir / str(sel["run_id"].iloc[0]))
            _save_png(fig, folder, name, 70, made)
    pen = _role(summary, "penalty")
    if len(pen):
        seed = int(pen["seed"].min())
        first = pen[pen["seed"] == seed]
        from xai_sparsity.study.claims import arm_family

        families = ("baseline", "dropout", "batchnorm", "weight_decay")
        by_family = {arm_family(a): a for a in reversed(list(first["arm"]))}  # first arm wins
        wanted = [by_family[f] for f in families if f in by_family]
        wanted += [a for a in first["arm"] if str(a).startswith("penalty")][:2]
        runs = {
            str(a): runs_dir / str(first.loc[first["arm"] == a, "run_id"].iloc[0]) for a in wanted
        }
        runs = {a: p for a, p in runs.items() if (p / "history.csv").exists()}
        if len(runs) >= 2:
            from xai_sparsity.study.indicators import feature_layers

            first_run = RunDir(next(iter(runs.values())))
            deepest = feature_layers(first_run.history())[-1]
            fig = plot_regulariser_comparison(runs, layer=deepest)
            _save_png(fig, folder, "regularisers.png", 70, made)
    return made


def _total_minutes(df: pd.DataFrame) -> float:
    if "seconds" not in df.columns:
        return math.nan
    return float(pd.to_numeric(df["seconds"], errors="coerce").sum()) / 60


def build_report(
    summary: pd.DataFrame | str | os.PathLike[str],
    figures_dir: str | os.PathLike[str] | None = None,
    *,
    figure_prefix: str = "study/",
    seed: int = 0,
    runs_dir: str | os.PathLike[str] | None = None,
    kept_figures: str | os.PathLike[str] | None = None,
) -> str:
    """The generated markdown of the study (tables, figures, verdicts) from a summary CSV.

    ``runs_dir`` (the study folder with the run directories) adds figures 1 and 6 of
    :mod:`xai_sparsity.views.figures` for example runs; without it, those figures already in
    ``kept_figures`` (default ``figures_dir``) are linked as they are."""
    from xai_sparsity.study.indicators import score_indicators
    from xai_sparsity.study.verdicts import primary_tests

    df = summary if isinstance(summary, pd.DataFrame) else read_summary(summary)
    if "turned" in df.columns:
        df["turned"] = df["turned"].astype(str).str.lower().isin(["true", "1"])
    det = detection_runs(df)
    scored = len(det) and "t_L" in det.columns and any(c.startswith("fire:") for c in det.columns)
    scores = score_indicators(det, seed=seed) if scored else pd.DataFrame()
    arms = penalty_table(df)
    curve = lambda_curve(df)
    tests = primary_tests(df, scores)
    figs = _figures(df, scores, curve, arms, Path(figures_dir)) if figures_dir else {}
    if figures_dir and runs_dir is not None:
        figs.update(_run_figures(df, Path(runs_dir), Path(figures_dir)))
    elif kept_figures is not None or figures_dir is not None:
        folder = Path(kept_figures if kept_figures is not None else figures_dir)  # type: ignore[arg-type]
        figs.update({n: n for n in RUN_FIGURES if (folder / n).exists()})
    lines = [
        _GENERATED_BEGIN,
        "",
        *_report_intro(df, det, scores, tests, figs, figure_prefix),
        *_detector_section(scores, figs, figure_prefix),
        *_claim3_section(df),
        *_penalty_section(df, arms, curve, figs, figure_prefix),
        *_claim4_section(df, det),
        _GENERATED_END,
    ]
    return "\n".join(lines) + "\n"


def _label_counts(det: pd.DataFrame) -> str:
    """How the unpenalised runs were labelled, in words."""
    from xai_sparsity.study.indicators import run_labels

    labels = run_labels(det) if len(det) else np.array([], dtype=str)
    counts = {k: int((labels == k).sum()) for k in ("overfits", "clean", "undetermined")}
    text = (
        f"of the {len(det)} unpenalised runs, {counts['overfits']} overfit, {counts['clean']} "
        f"are clean negatives and {counts['undetermined']} are undetermined (excluded from "
        "scoring)"
    )
    if "label" not in det.columns:
        text += (
            "; this summary has no run labels (docs/definitions.md, 'Run labels'), so runs whose "
            "test loss turned count as overfitting and the others as undetermined: clean "
            f"negatives were {NOT_MEASURED}"
        )
    return text


def _report_intro(
    df: pd.DataFrame,
    det: pd.DataFrame,
    scores: pd.DataFrame,
    tests: pd.DataFrame,
    figs: Mapping[str, str],
    figure_prefix: str,
) -> list[str]:
    """The report's opening: run counts, the verdicts, the primary tests and the runs per group."""
    from xai_sparsity.study.verdicts import verdict_lines

    n_complete = int((df["status"] == "complete").sum()) if "status" in df.columns else len(df)
    examples = [
        f"![{n}]({figure_prefix}{n})"
        for n in ("example_overfit.png", "example_control.png")
        if n in figs
    ]
    return [
        f"Generated by `xai-sparsity study-report` from the summary CSV ({n_complete} complete "
        f"runs of {len(df)}; {_label_counts(det)}). Training time summed over the runs: "
        f"{fmt(_total_minutes(df), 0)} min.",
        "",
        "### Verdicts",
        "",
        *[f"- {v}" for v in verdict_lines(tests, scores)],
        "",
        "Primary tests, one per claim, Holm-corrected across the claims (`mde`: the smallest "
        "effect the design could detect with 80 % power, two-sided 5 %). A claim HELD when its "
        "Holm-adjusted p is under 0.05 with the claimed sign; claim 1 also needs a median lead "
        ">= 0 and an AUC interval above every null rule's AUC (fixed epoch, training-loss "
        "plateau, training accuracy). Claims 2 and 3 (and 4 without a validation split) are "
        "intersection-union tests: every comparison must hold, the weakest one is shown.",
        "",
        frame_table(tests, 4),
        "### Runs per group",
        "",
        frame_table(overview_table(df)),
        *(
            [
                "An overfitting run and a negative control (figure 1 of the library: losses, "
                "per-layer sparsity, t_L and each layer's rise onset t_s):",
                "",
                *examples,
                "",
            ]
            if examples
            else []
        ),
    ]


_SCORE_COLUMNS = (
    "indicator",
    "n_runs",
    "n_settings",
    "n_no_data",
    "threshold_median",
    "tp",
    "late",
    "fp",
    "tn",
    "precision",
    "recall",
    "false_alarm_rate",
    "auc",
    "spearman_fire_tL",
    "lead_median",
)


def _score_table(scores: pd.DataFrame) -> pd.DataFrame:
    """The detector table: counts and the four rates with their bootstrap intervals."""
    from xai_sparsity.study.verdicts import interval

    t = scores[list(_SCORE_COLUMNS)].copy()
    for key in ("precision", "recall", "false_alarm_rate", "auc"):
        t[key] = [
            f"{fmt(v)} {interval(lo, hi, 2)}"
            for v, lo, hi in zip(
                scores[key], scores[f"{key}_low"], scores[f"{key}_high"], strict=True
            )
        ]
    return t.rename(columns={"threshold_median": "threshold", "false_alarm_rate": "false alarms"})


def _detector_section(
    scores: pd.DataFrame, figs: Mapping[str, str], figure_prefix: str
) -> list[str]:
    """The indicators scored as detectors: the table and the lead figures."""
    lines = ["### Indicators as detectors (thresholds by leave-one-setting-out)", ""]
    if scores.empty:
        return [*lines, f"(no detection runs: {NOT_MEASURED})", ""]
    first = scores.iloc[0]
    lines += [
        f"{int(first['n_overfits'])} overfitting and {int(first['n_clean'])} clean runs in "
        f"{int(first['n_settings'])} settings; {int(first['n_excluded'])} undetermined runs "
        "excluded. For each setting the threshold maximising Youden's J on the other settings "
        "is applied to it (`threshold`: the median over settings). `tp`: overfitting runs "
        "fired by t_L + 1; `late`: fired after it (misses); `fp`: clean runs fired at all. "
        "Brackets: 95 % bootstrap intervals resampling settings. AUC ranks overfitting against "
        "clean runs by the threshold-free score. `spearman_fire_tL` and `lead_median` "
        "(t_L - firing epoch) over the overfitting runs fired on. `n_no_data`: runs without "
        "the indicator's data, not scored.",
        "",
        frame_table(_score_table(scores)),
    ]
    for name, title in (
        ("leads.png", "Lead distribution"),
        ("precision_recall.png", "Precision and recall"),
    ):
        if name in figs:
            lines += [f"![{title}]({figure_prefix}{name})", ""]
    return lines


def _claim3_section(df: pd.DataFrame) -> list[str]:
    """Claim 3 under the validation protocol (or why it was not measured)."""
    from xai_sparsity.study.claims import claim3_table

    lines = ["### Claim 3: validation-selected arms, test accuracy at the validation minimum", ""]
    table = claim3_table(df)
    if table.empty:
        return [
            *lines,
            f"No validation split: {NOT_MEASURED}. The tables below choose the epoch and "
            "lambda on the test set and are optimistic.",
            "",
        ]
    return [
        *lines,
        "Per seed each family is represented by its arm with the lowest minimum validation "
        "loss, stopped there; the number is the test accuracy at that epoch. Paired by seed: "
        "mean difference, t and bootstrap 95 % intervals, paired t-test p and the smallest "
        "detectable difference (`mde`).",
        "",
        frame_table(table, 4),
    ]


def _penalty_section(
    df: pd.DataFrame,
    arms: pd.DataFrame,
    curve: pd.DataFrame,
    figs: Mapping[str, str],
    figure_prefix: str,
) -> list[str]:
    """Accuracy and sparsity per arm, automatic targeting, claim 2 and the lambda curve."""
    from xai_sparsity.study.claims import arm_differences

    lines = ["### Test accuracy and sparsity per arm (penalty groups)", ""]
    lines += [
        "`best_acc`: best test accuracy over the epochs (early stopping on the test set, "
        "optimistic); `val_acc`: test accuracy at the validation-loss minimum.",
        "",
        frame_table(arms, 4) if not arms.empty else "(no penalty runs)\n",
    ]
    for name, title in (("arms.png", "Accuracy per arm"), ("regularisers.png", "Regularisers")):
        if name in figs:
            lines += [f"![{title}]({figure_prefix}{name})", ""]
    lines += _auto_targets_lines(df)
    diff = arm_differences(df, "final_sparsity_deepest")
    lines += [
        "Claim 2, final sparsity of the deepest conv activation, penalty arm minus baseline "
        "(paired by seed):",
        "",
        frame_table(diff, 4) if not diff.empty else f"({NOT_MEASURED})\n",
        "### The lambda curve",
        "",
        frame_table(curve, 4) if not curve.empty else "(no lambda sweep)\n",
    ]
    if "lambda_curve.png" in figs:
        lines += [f"![Lambda curve]({figure_prefix}lambda_curve.png)", ""]
    return lines


def _auto_targets_lines(df: pd.DataFrame) -> list[str]:
    if "penalty_layers_used" not in df.columns or "penalty_layers" not in df.columns:
        return []
    auto = df[(df["penalty_layers"].astype(str) == "auto") & (df["status"] == "complete")]
    if not len(auto):
        return []
    chosen = auto.groupby(["seed", "arm"])["penalty_layers_used"].first().reset_index()
    return [
        "Layers targeted automatically, per seed and arm: "
        + "; ".join(
            f"seed {r.seed} {r.arm}: {str(r.penalty_layers_used).replace(';', ', ')}"
            for r in chosen.itertuples()
        )
        + ".",
        "",
    ]


def _claim4_section(df: pd.DataFrame, det: pd.DataFrame) -> list[str]:
    """Claim 4: filter correlation over positions and over images, penalty vs baseline and
    overfitting vs clean runs."""
    from xai_sparsity.study.claims import arm_differences, claim4_overfit_vs_clean

    lines = ["### Claim 4: filter correlation over positions and over images", ""]
    for column, over in (
        ("final_correlation", "positions (grows with density: confounded with the penalty)"),
        ("final_correlation_images", "images (density-independent)"),
    ):
        diff = arm_differences(df, column)
        lines += [
            f"Final mean |r| over {over}, penalty arm minus baseline (paired by seed):",
            "",
            frame_table(diff, 4) if not diff.empty else f"({NOT_MEASURED})\n",
        ]
    groups = claim4_overfit_vs_clean(det)
    lines += [
        "Overfitting runs minus clean negatives (unpenalised runs; Welch p, 95 % interval by "
        "a bootstrap over settings, `mde` 2.8 bootstrap standard errors):",
        "",
        frame_table(groups, 4) if not groups.empty else f"({NOT_MEASURED})\n",
    ]
    return lines


def report(
    summary: str | os.PathLike[str],
    doc: str | os.PathLike[str] = "docs/science.md",
    figures_dir: str | os.PathLike[str] | None = "docs/study",
    *,
    figure_prefix: str = "study/",
    runs_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Write the generated part of ``doc`` (between the BEGIN/END GENERATED markers; appended if
    the markers are missing) and the figures into ``figures_dir``."""
    text = build_report(summary, figures_dir, figure_prefix=figure_prefix, runs_dir=runs_dir)
    path = Path(doc)
    old = path.read_text(encoding="utf-8") if path.exists() else "# The study of the claims\n\n"
    if _GENERATED_BEGIN in old and _GENERATED_END in old:
        head, _, rest = old.partition(_GENERATED_BEGIN)
        _, _, tail = rest.partition(_GENERATED_END)
        new = head + text.rstrip("\n") + tail
    else:
        new = old.rstrip("\n") + "\n\n" + text
    atomic_write_text(path, new)
    return path


def generated_section(text: str) -> str | None:
    """The generated part of a document (markers included), or None without markers."""
    if _GENERATED_BEGIN not in text or _GENERATED_END not in text:
        return None
    start = text.index(_GENERATED_BEGIN)
    return text[start : text.index(_GENERATED_END, start) + len(_GENERATED_END)]


def check_report(
    summary: str | os.PathLike[str],
    doc: str | os.PathLike[str] = "docs/science.md",
    figures_dir: str | os.PathLike[str] | None = "docs/study",
    *,
    figure_prefix: str = "study/",
    runs_dir: str | os.PathLike[str] | None = None,
) -> str:
    """The unified diff between the generated part of ``doc`` and what ``summary`` generates now
    ("" when they agree). Writes nothing: figures go to a temporary folder."""
    import difflib
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        text = build_report(
            summary,
            tmp,
            figure_prefix=figure_prefix,
            runs_dir=runs_dir,
            kept_figures=figures_dir,
        ).rstrip("\n")
    path = Path(doc)
    current = generated_section(path.read_text(encoding="utf-8")) if path.exists() else None
    if current == text:
        return ""
    diff = difflib.unified_diff(
        (current or "").splitlines(keepends=True),
        (text + "\n").splitlines(keepends=True),
        fromfile=f"{path} (committed)",
        tofile=f"{path} (generated from {summary})",
    )
    return "".join(diff) or f"{path} has no generated section\n"


# ---------------------------------------------------------------------------------- command line
def add_study_arguments(parser: Any) -> None:
    """Arguments of ``xai-sparsity study``."""
    parser.add_argument("config", help="study config (TOML), e.g. studies/claims.toml")
    parser.add_argument("--out", required=True, help="study folder (run directories + summary)")
    parser.add_argument("--workers", type=int, default=None, help="worker processes")
    parser.add_argument("--limit", type=int, default=None, help="run only the first K runs")
    parser.add_argument("--only", nargs="*", default=None, help="run ids or groups to run")
    parser.add_argument("--device", default=None, help="device for every run (cpu, cuda)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def study_command(args: Any) -> int:
    """``xai-sparsity study``: run a study (or list its runs with ``--dry-run``)."""
    study = load_study(args.config)
    if args.dry_run:
        table = study.table()
        print(table[["run_id", "groups", "arm", "seed"]].to_string(index=False))
        print(f"{len(table)} runs")
        return 0
    t0 = time.perf_counter()
    if getattr(args, "summary_only", False):
        df = summarize_study(study, args.out)
        print(f"{len(df)} complete runs summarised in {Path(args.out) / SUMMARY_NAME}")
        return 0
    df = run_study(
        study,
        args.out,
        workers=args.workers,
        limit=args.limit,
        only=args.only,
        device=args.device,
        progress=not (getattr(args, "no_progress", False) or getattr(args, "quiet", False)),
    )
    print(
        f"{len(df)} runs summarised in {Path(args.out) / SUMMARY_NAME} "
        f"({time.perf_counter() - t0:.0f} s)"
    )
    return 0


def add_report_arguments(parser: Any) -> None:
    """Arguments of ``xai-sparsity study-report``."""
    parser.add_argument("summary", help="summary CSV (or the study folder)")
    parser.add_argument("--doc", default="docs/science.md", help="markdown file to update")
    parser.add_argument("--figures", default="docs/study", help="folder for the figures")
    parser.add_argument("--figure-prefix", default="study/", help="figure path prefix in the doc")
    parser.add_argument(
        "--runs", default=None, help="study folder with the run directories (example figures)"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 with a diff when the doc differs from what SUMMARY generates",
    )


def report_command(args: Any) -> int:
    """``xai-sparsity study-report``: regenerate the study section of docs/science.md."""
    runs = getattr(args, "runs", None)
    if runs is None and Path(args.summary).is_dir():
        runs = args.summary
    elif runs is None and (Path(args.summary).parent / "study.json").exists():
        runs = str(Path(args.summary).parent)
    if getattr(args, "check", False):
        diff = check_report(
            args.summary,
            args.doc,
            args.figures,
            figure_prefix=getattr(args, "figure_prefix", "study/"),
            runs_dir=runs,
        )
        if diff:
            sys.stdout.write(diff)
            print(f"{args.doc} differs from what {args.summary} generates", file=sys.stderr)
            return 1
        print(f"{args.doc} is up to date with {args.summary}")
        return 0
    path = report(
        args.summary,
        args.doc,
        args.figures,
        figure_prefix=getattr(args, "figure_prefix", "study/"),
        runs_dir=runs,
    )
    print(f"wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m xai_sparsity.study.runner run CONFIG --out DIR`` / ``report SUMMARY``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m xai_sparsity.study.runner")
    sub = parser.add_subparsers(dest="command", required=True)
    add_study_arguments(sub.add_parser("run", help="run a study"))
    add_report_arguments(sub.add_parser("report", help="write the report"))
    args = parser.parse_args(argv)
    try:
        return study_command(args) if args.command == "run" else report_command(args)
    except XaiSparsityError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


__all__ = [
    "SUMMARY_NAME",
    "Study",
    "StudyRun",
    "build_report",
    "check_report",
    "default_workers",
    "expand_study",
    "generated_section",
    "lambda_curve",
    "load_study",
    "paired_comparison",
    "penalty_table",
    "read_summary",
    "report",
    "run_study",
    "summarize_run",
    "summarize_study",
    "write_summary",
]

if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
