"""The study runner: expansion, parallel workers, resume after a kill or a failure, the summary
table and the report (on studies/smoke.toml: 4 tiny runs of 2 epochs)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from xai_sparsity import XaiSparsityError
from xai_sparsity.study.indicators import INDICATORS, fire_column
from xai_sparsity.study.runner import (
    SUMMARY_NAME,
    build_report,
    expand_study,
    lambda_curve,
    load_study,
    paired_comparison,
    penalty_table,
    read_summary,
    report,
    run_study,
    summarize_run,
    summarize_study,
)

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "studies" / "smoke.toml"
CLAIMS = ROOT / "studies" / "claims.toml"


def spec(**groups: dict[str, object]) -> dict[str, object]:
    return {
        "study": {"name": "t", "seeds": [0, 1]},
        "defaults": {"epochs": 2},
        "groups": [{"name": k, **v} for k, v in groups.items()],
    }


def test_expansion_grid_arms_seeds_and_deterministic_ids() -> None:
    s = spec(
        g={
            "grid": {
                "train_size": [50, 100],
                "optimizer": [{"optimizer": "adam", "lr": 0.001}, {"optimizer": "sgd"}],
            },
            "arms": {"baseline": {}, "dropout": {"dropout": 0.5}},
        }
    )
    a, b = expand_study(s), expand_study(s)
    assert len(a) == 2 * 2 * 2 * 2
    assert [r.run_id for r in a.runs] == [r.run_id for r in b.runs]
    assert len({r.run_id for r in a.runs}) == len(a)
    first = a.runs[0]
    assert first.run_id.startswith("g-baseline-train_size=50_optimizer=adam-s0-")
    assert first.settings["lr"] == 0.001 and first.config().optimizer == "adam"
    # the same cell and seed share a cell key across arms
    cells = {(r.cell, r.seed) for r in a.runs if r.arm == "dropout"}
    assert cells == {(r.cell, r.seed) for r in a.runs if r.arm == "baseline"}


def test_identical_settings_in_two_groups_share_one_run_and_auto_gets_a_baseline() -> None:
    s = spec(
        a={"set": {"train_size": 50}, "arms": {"baseline": {}}, "role": "detection"},
        b={
            "set": {"train_size": 50},
            "role": "penalty",
            "arms": {"baseline": {}, "p": {"penalty_lambda": 0.3, "penalty_layers": "auto"}},
        },
        c={
            "set": {"train_size": 70},
            "arms": {"p": {"penalty_lambda": 0.3, "penalty_layers": "auto"}},
        },
    )
    study = expand_study(s)
    shared = [r for r in study.runs if r.groups == ("a", "b")]
    assert len(shared) == 2 and all(r.roles == ("detection", "penalty") for r in shared)
    auto = [r for r in study.runs if r.arm == "p"]
    ids = study.by_id()
    for r in auto:
        base = ids[r.depends_on]  # type: ignore[index]
        assert base.arm == "baseline" and base.seed == r.seed
        assert base.settings["train_size"] == r.settings["train_size"]
    # group c had no baseline: one was added per seed, before its penalty run
    added = [r for r in study.runs if "auto_baseline" in r.run_id]
    assert len(added) == 2
    order = [r.run_id for r in study.runs]
    for r in auto:
        assert order.index(r.depends_on) < order.index(r.run_id)  # type: ignore[arg-type]


def test_bad_configs_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(XaiSparsityError, match="learning_rate"):
        expand_study(spec(g={"set": {"learning_rate": 0.1}}))
    with pytest.raises(XaiSparsityError, match="seed"):
        expand_study(spec(g={"set": {"seed": 3}}))
    with pytest.raises(XaiSparsityError, match="non-empty list"):
        expand_study(spec(g={"grid": {"train_size": 50}}))
    with pytest.raises(XaiSparsityError, match="does not exist"):
        load_study(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[study\n")
    with pytest.raises(XaiSparsityError, match="TOML"):
        load_study(bad)


def test_the_claims_study_has_enough_runs_seeds_and_controls() -> None:
    study = load_study(CLAIMS)
    table = study.table()
    assert len(study) >= 50
    per_setting = table.groupby(["cell", "arm"])["seed"].nunique()
    assert per_setting.min() >= 3
    arms = set(table["arm"])
    assert {"baseline", "dropout", "batchnorm", "augment", "weight_decay"} <= arms
    assert any(a.startswith("penalty-auto") for a in arms)
    assert any(a.startswith("penalty-all") for a in arms)
    assert {"mnist5k", "fashion_mnist"} <= set(table["data"])
    assert {500, 1000, 2500} <= set(table["train_size"])
    assert {"adam", "sgd"} <= set(table["optimizer"])


def test_the_v2_study_design() -> None:
    """Long horizons, negative controls, and claim 3 with a validation split and >= 10 seeds."""
    table = load_study(ROOT / "studies" / "claims_v2.toml").table()
    detection = table[table["groups"].astype(str).str.contains("overfit|controls")]
    assert (detection["epochs"] >= 100).all()
    assert (
        detection.groupby("setting" if "setting" in table else "cell")["seed"].nunique().min() >= 4
    )
    controls = table[table["groups"].astype(str).str.contains("controls")]
    assert len(set(controls["arm"])) >= 3
    penalty = table[table["groups"].astype(str).str.contains("penalty")]
    assert penalty.groupby("arm")["seed"].nunique().min() >= 10
    assert (penalty["val_size"] > 0).all()
    arms = set(penalty["arm"])
    for family in ("penalty-deepest", "penalty-auto", "penalty-all", "dropout", "weight_decay"):
        assert sum(a.startswith(family) for a in arms) >= 2, family


def _summary_files(out: Path) -> dict[str, float]:
    return {p.parent.name: p.stat().st_mtime for p in out.glob("*/summary.json")}


def test_parallel_run_killed_then_resumed(tmp_path: Path) -> None:
    """Two worker processes; the study process group is killed after the first run completes;
    the rerun skips the complete runs, resumes the rest and ends with every run complete."""
    out = tmp_path / "study"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "xai_sparsity.study.runner", "run", str(SMOKE), "--out", str(out),
           "--workers", "2", "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, cwd=ROOT)
    try:
        deadline = time.monotonic() + 100
        while not _summary_files(out) and time.monotonic() < deadline:
            assert proc.poll() is None or _summary_files(out), "the study ended without a run"
            time.sleep(0.1)
        assert _summary_files(out), "no run completed in time"
    finally:
        with pytest.raises(ProcessLookupError) if proc.poll() is not None else _null():
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    before = _summary_files(out)
    rows_before = {run_id: summarize_run(out / run_id) for run_id in before}
    assert len(before) < 4, "every run finished before the kill; the test proves nothing"
    table = run_study(SMOKE, out, workers=1, progress=False)
    after = _summary_files(out)
    assert len(table) == 4 and (table["status"] == "complete").all()
    assert set(after) == {r.run_id for r in load_study(SMOKE).runs}
    for run_id, mtime in before.items():  # complete runs were skipped, not retrained
        assert after[run_id] == mtime
    # rows of the runs complete before the kill are unchanged
    again = read_summary(out).set_index("run_id")
    for run_id, row in rows_before.items():
        for col in ("t_L", "turned", "best_test_acc", "final_test_acc", "epochs"):
            assert again.loc[run_id, col] == pytest.approx(row[col]), (run_id, col)
    # the summary table: one row per run, settings, results and every indicator's firing epoch
    for col in ("run_id", "arm", "seed", "setting", "train_size", "t_L", "turned", "label",
                "rise", "converged", "still_learning", "best_test_acc", "final_test_acc",
                "penalty_lambda", "min_val_loss", "val_best_epoch", "val_test_acc", "corr_tL",
                "final_correlation", "corr_images_tL", "final_correlation_images"):  # fmt: skip
        assert col in table.columns
    assert set(table["label"]) <= {"overfits", "clean", "undetermined"}
    for name in INDICATORS:
        assert fire_column(name) in table.columns and f"score:{name}" in table.columns
    assert (table.loc[table["arm"] != "baseline", "penalty_layers_used"].astype(str) != "").all()
    # a third call changes nothing
    third = run_study(SMOKE, out, workers=1, progress=False)
    pd.testing.assert_frame_equal(third, table)
    # the summary rebuilt from the run directories alone (study --summary-only) is the same
    rebuilt = summarize_study(SMOKE, out, tmp_path / "rebuilt.csv")
    pd.testing.assert_frame_equal(read_summary(tmp_path / "rebuilt.csv"), read_summary(out))
    assert len(rebuilt) == 4


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_failure_is_recorded_then_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "study"
    study = load_study(SMOKE)
    first = run_study(study, out, workers=1, limit=1, progress=False)
    assert list(first["run_id"]) == [study.runs[0].run_id]
    victim = study.runs[1].run_id
    monkeypatch.setenv("XAI_SPARSITY_STUDY_FAIL", victim)
    with pytest.raises(XaiSparsityError, match="1 run"):
        run_study(study, out, workers=1, limit=2, progress=False)
    failed = read_summary(out / SUMMARY_NAME).set_index("run_id")
    assert failed.loc[victim, "status"] == "failed" and "injected" in failed.loc[victim, "error"]
    monkeypatch.delenv("XAI_SPARSITY_STUDY_FAIL")
    done = run_study(study, out, workers=1, limit=2, progress=False)
    assert (done["status"] == "complete").all() and len(done) == 2
    with pytest.raises(XaiSparsityError, match="limit"):
        run_study(study, out, workers=1, limit=0, progress=False)


def _synthetic_summary() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    arms = {"baseline": 0.80, "dropout": 0.82, "batchnorm": 0.83, "penalty-auto@0.3": 0.81,
            "penalty-all@0.3": 0.78}  # fmt: skip
    for seed in range(3):
        for arm, acc in arms.items():
            lam = float(arm.split("@")[1]) if "@" in arm else 0.0
            turned = arm == "baseline" or (arm == "penalty-all@0.3" and seed == 0)
            row = {
                "run_id": f"{arm}-s{seed}",
                "groups": "penalty",
                "roles": "penalty",
                "arm": arm,
                "seed": seed,
                "cell": "c1",
                "status": "complete",
                "penalty_lambda": lam,
                "penalty_layers": "auto" if "auto" in arm else None,
                "t_L": 8 if turned else 20,
                "turned": turned,
                "best_test_acc": acc + 0.01 * seed + rng.normal(0, 0.002),
                "final_test_acc": acc - 0.03 + 0.01 * seed,
                "final_sparsity_deepest": 0.7 - lam,
                "final_correlation": 0.3,
            }
            for name, ind in INDICATORS.items():
                fire = 6 if turned else (None if seed else 12)
                for t in ind.grid:
                    row[fire_column(name, t)] = fire
                row[fire_column(name)] = fire
                row[f"score:{name}"] = 1.0 if turned else 0.5
            rows.append(row)
    return pd.DataFrame(rows)


def test_penalty_tables_and_paired_comparison() -> None:
    df = _synthetic_summary()
    arms = penalty_table(df).set_index("arm")
    assert arms.loc["baseline", "n"] == 3
    assert arms.loc["dropout", "final_acc_mean"] == pytest.approx(0.80)
    pairs = paired_comparison(df).set_index(["arm", "against", "metric"])
    p = pairs.loc[("penalty-auto@0.3", "dropout", "final_test_acc")]
    assert p["n_pairs"] == 3 and p["mean_diff"] == pytest.approx(-0.01)
    assert p["wins"] == 0 and p["sign_p"] == pytest.approx(0.25)
    curve = lambda_curve(df)
    assert set(curve["targeting"]) == {"auto", "all"}
    assert (curve["lambda"] == 0).sum() == 2


def test_report_writes_tables_figures_and_keeps_the_prose(tmp_path: Path) -> None:
    df = _synthetic_summary()
    csv = tmp_path / "summary.csv"
    df.to_csv(csv, index=False)
    doc = tmp_path / "science.md"
    doc.write_text("# Intro prose\n\n<!-- BEGIN GENERATED: xai-sparsity study-report -->\nold\n"
                   "<!-- END GENERATED -->\n\n## Limits prose\n")  # fmt: skip
    report(csv, doc, tmp_path / "figs")
    text = doc.read_text()
    assert text.startswith("# Intro prose") and text.rstrip().endswith("## Limits prose")
    assert "old\n" not in text and "Claim 1" in text and "Claim 3" in text
    assert "| ew_perplexity |" in text
    for name in ("leads.png", "precision_recall.png", "arms.png", "lambda_curve.png"):
        assert (tmp_path / "figs" / name).stat().st_size > 1000
    assert build_report(df) == build_report(df)  # deterministic


def test_dry_run_lists_the_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from xai_sparsity.study.runner import main

    assert main(["run", str(CLAIMS), "--out", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"{len(load_study(CLAIMS))} runs" in out and "penalty-auto@0.3" in out
    assert main(["run", str(tmp_path / "nope.toml"), "--out", str(tmp_path)]) == 2


def test_auto_targeting_trains_after_its_baseline(tmp_path: Path) -> None:
    tiny = load_study(SMOKE).spec
    s = {
        "study": {"name": "auto", "seeds": [0]},
        "defaults": dict(tiny["defaults"]),
        "groups": [
            {
                "name": "g",
                "role": "penalty",
                "arms": {"penalty-auto@0.3": {"penalty_lambda": 0.3, "penalty_layers": "auto"}},
            }
        ],
    }
    table = run_study(expand_study(s), tmp_path, workers=1, progress=False).set_index("arm")
    assert list(table.index) == ["baseline", "penalty-auto@0.3"]
    assert (table["status"] == "complete").all()
    used = str(table.loc["penalty-auto@0.3", "penalty_layers_used"])
    assert used.startswith("features.relu")  # the baseline's rising layers or the deepest one
