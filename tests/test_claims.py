"""Claims 2-4 and the honest statistics of the study report: the validation protocol of claim 3,
paired differences with their smallest detectable effect, Holm's correction, and
``study-report --check``."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from xai_sparsity.study.claims import (
    arm_family,
    claim3_table,
    claim4_overfit_vs_clean,
    val_selected,
)
from xai_sparsity.study.runner import check_report, main, report
from xai_sparsity.study.stats import detectable_effect, holm, paired_difference
from xai_sparsity.study.verdicts import primary_tests

ROOT = Path(__file__).resolve().parents[1]

# arm -> (min validation loss, test accuracy at that minimum, best test accuracy) per seed
ARMS = {
    "baseline": ([0.50, 0.50, 0.50, 0.50], [0.80, 0.81, 0.79, 0.80], [0.90] * 4),
    "penalty-deepest@0.3": ([0.45, 0.48, 0.49, 0.40], [0.82, 0.82, 0.80, 0.83], [0.70] * 4),
    "penalty-deepest@1": ([0.47, 0.44, 0.52, 0.60], [0.90, 0.84, 0.70, 0.70], [0.99] * 4),
    "penalty-all@1": ([0.46, 0.46, 0.46, 0.46], [0.81, 0.81, 0.81, 0.81], [0.95] * 4),
    "dropout@0.25": ([0.49, 0.49, 0.49, 0.49], [0.80, 0.80, 0.80, 0.80], [0.90] * 4),
    "dropout@0.5": ([0.48, 0.52, 0.48, 0.52], [0.81, 0.70, 0.81, 0.70], [0.90] * 4),
    "weight_decay@1e-4": ([0.50, 0.50, 0.50, 0.50], [0.79, 0.80, 0.78, 0.80], [0.90] * 4),
}


def penalty_summary() -> pd.DataFrame:
    rows = []
    for arm, (val, acc, best) in ARMS.items():
        for seed in range(4):
            rows.append(
                {
                    "run_id": f"penalty-{arm}-s{seed}",
                    "groups": "penalty",
                    "roles": "penalty",
                    "arm": arm,
                    "seed": seed,
                    "cell": "c1",
                    "status": "complete",
                    "min_val_loss": val[seed],
                    "val_best_epoch": 10 + seed,
                    "val_test_acc": acc[seed],
                    "best_test_acc": best[seed],
                    "final_test_acc": acc[seed] - 0.01,
                    "turned": False,
                    "t_L": 20,
                    "final_sparsity_deepest": 0.9 - (0.2 + 0.01 * seed) * (arm != "baseline"),
                    "final_correlation": 0.3,
                    "final_correlation_images": 0.4 - (0.05 + 0.01 * seed) * (arm != "baseline"),
                }
            )
    return pd.DataFrame(rows)


def test_arm_families() -> None:
    assert [arm_family(a) for a in ARMS] == [
        "baseline",
        "deepest",
        "deepest",
        "all",
        "dropout",
        "dropout",
        "weight_decay",
    ]


def test_validation_selects_lambda_targets_and_epoch_never_the_test_set() -> None:
    df = penalty_summary()
    chosen = val_selected(df).set_index(["family", "seed"])
    # the deepest family per seed: lambda with the lower validation minimum
    assert [chosen.loc[("deepest", s), "arm"] for s in range(4)] == [
        "penalty-deepest@0.3",
        "penalty-deepest@1",
        "penalty-deepest@0.3",
        "penalty-deepest@0.3",
    ]
    # the best penalty over every target set and lambda
    assert [chosen.loc[("penalty", s), "arm"] for s in range(4)] == [
        "penalty-deepest@0.3",
        "penalty-deepest@1",
        "penalty-all@1",
        "penalty-deepest@0.3",
    ]
    table = claim3_table(df).set_index(["family", "against"])
    pen = np.array([0.82, 0.84, 0.81, 0.83])
    base = np.array(ARMS["baseline"][1])
    row = table.loc[("penalty", "baseline")]
    assert row["n_pairs"] == 4 and row["mean_diff"] == pytest.approx(np.mean(pen - base))
    assert row["p"] == pytest.approx(stats.ttest_rel(pen, base).pvalue)
    drop = np.array([0.81, 0.80, 0.81, 0.80])  # dropout@0.5, @0.25, @0.5, @0.25 by validation
    assert table.loc[("penalty", "dropout"), "mean_diff"] == pytest.approx(np.mean(pen - drop))
    # the test set's best accuracy (test-set early stopping) plays no part
    poisoned = df.assign(best_test_acc=np.random.default_rng(0).random(len(df)))
    pd.testing.assert_frame_equal(claim3_table(poisoned), claim3_table(df))


def test_without_a_validation_split_claim_3_is_not_measured() -> None:
    df = penalty_summary().drop(columns=["min_val_loss", "val_best_epoch", "val_test_acc"])
    assert claim3_table(df).empty
    tests = primary_tests(df, pd.DataFrame()).set_index("claim")
    assert tests.loc[3, "verdict"] == "NOT TESTED" and tests.loc[1, "verdict"] == "NOT TESTED"
    # claim 4 falls back to every penalty arm over images; claim 2 tests every penalty arm
    assert tests.loc[2, "verdict"] == "HELD" and tests.loc[4, "verdict"] == "HELD"


def test_paired_difference_interval_p_and_detectable_effect() -> None:
    a, b = np.array([0.82, 0.84, 0.81, 0.83, 0.80]), np.array([0.80, 0.81, 0.80, 0.80, 0.81])
    d = paired_difference(a, b)
    diff = a - b
    sd = diff.std(ddof=1)
    half = stats.t.ppf(0.975, 4) * sd / math.sqrt(5)
    assert d["mean"] == pytest.approx(diff.mean())
    assert (d["t_low"], d["t_high"]) == pytest.approx((diff.mean() - half, diff.mean() + half))
    assert d["p"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert d["boot_low"] <= d["mean"] <= d["boot_high"]
    assert d["mde"] == pytest.approx((stats.t.ppf(0.975, 4) + stats.t.ppf(0.8, 4)) * sd / 5**0.5)
    # ten seeds see about 1.3 SD / sqrt(10)... the detectable effect shrinks with the seeds
    assert detectable_effect(0.01, 10) < detectable_effect(0.01, 3)
    assert math.isnan(detectable_effect(0.01, 1))


def test_holm_step_down() -> None:
    assert holm([0.01, 0.04, 0.03]) == [0.03, 0.06, 0.06]
    assert holm([0.5, math.nan, 0.01]) == [0.5, pytest.approx(math.nan, nan_ok=True), 0.02]
    assert holm([0.02, 0.02]) == [0.04, 0.04]


def test_primary_tests_are_holm_corrected_across_claims() -> None:
    tests = primary_tests(penalty_summary(), pd.DataFrame()).set_index("claim")
    finite = tests["p"].dropna()
    assert list(tests.loc[finite.index, "p_holm"]) == pytest.approx(holm(list(finite)))
    for claim in finite.index:
        assert (
            np.isfinite(tests.loc[claim, "mde"])
            and tests.loc[claim, "low"] <= tests.loc[claim, "high"]
        )


def test_overfitting_against_clean_runs_by_setting() -> None:
    rows = []
    for s in range(4):
        for seed in range(2):
            overfit = s < 2
            rows.append(
                {
                    "run_id": f"r{s}{seed}",
                    "setting": f"s{s}",
                    "label": "overfits" if overfit else "clean",
                    "t_L": 10,
                    "final_correlation": 0.3 + 0.1 * overfit + 0.01 * seed,
                    "corr_images_tL": 0.5,
                }
            )
    rows.append({**rows[0], "run_id": "u", "label": "undetermined", "final_correlation": 9.0})
    out = claim4_overfit_vs_clean(pd.DataFrame(rows)).set_index(["over", "at"])
    row = out.loc[("positions", "end")]
    assert (row["n_pos"], row["n_neg"]) == (4, 4) and row["diff"] == pytest.approx(0.1)
    assert row["low"] == pytest.approx(0.1) and row["high"] == pytest.approx(0.1)
    assert out.loc[("images", "t_L"), "diff"] == 0.0
    assert ("images", "end") not in out.index  # a column the summary lacks is not invented


def test_check_passes_on_the_written_doc_and_fails_with_a_diff(tmp_path: Path) -> None:
    csv = tmp_path / "summary.csv"
    penalty_summary().to_csv(csv, index=False)
    doc = tmp_path / "science.md"
    doc.write_text("# Prose\n\n<!-- BEGIN GENERATED: xai-sparsity study-report -->\n"
                   "<!-- END GENERATED -->\n\nmore prose\n")  # fmt: skip
    report(csv, doc, tmp_path / "figs")
    assert check_report(csv, doc, tmp_path / "figs") == ""
    args = [str(csv), "--doc", str(doc), "--figures", str(tmp_path / "figs"), "--check"]
    assert main(["report", *args]) == 0
    doc.write_text(doc.read_text().replace("Claim 3", "Claim three"))
    diff = check_report(csv, doc, tmp_path / "figs")
    assert diff.startswith("---") and "+- **Claim 3" in diff
    assert main(["report", *args]) == 1
    assert "Claim three" in doc.read_text()  # --check writes nothing


def test_committed_science_doc_matches_the_committed_summary() -> None:
    """`make check-science`: the v1 summary (no labels, no validation split) still renders, and
    docs/science.md is what it generates."""
    summary = ROOT / "docs" / "study" / "summary.csv"
    diff = check_report(summary, ROOT / "docs" / "science.md", ROOT / "docs" / "study")
    assert diff == "", diff[:3000]
    assert "not measured in this study" in (ROOT / "docs" / "science.md").read_text()


def test_a_v2_summary_renders_every_verdict_with_numbers() -> None:
    """Detection runs with labels and a penalty group with a validation split: every claim gets
    a test, an interval and a detectable effect; no 'not measured' for claims 1 and 3."""
    from xai_sparsity.study.indicators import INDICATORS, fire_column
    from xai_sparsity.study.runner import build_report

    rows = []
    for s in range(4):
        for seed in range(3):
            overfit = s < 2
            row: dict[str, object] = {
                "run_id": f"det-{s}-s{seed}",
                "groups": "overfit" if overfit else "controls",
                "roles": "detection",
                "arm": "baseline",
                "seed": seed,
                "cell": f"d{s}",
                "setting": f"d{s}",
                "status": "complete",
                "label": "overfits" if overfit else ("clean" if seed else "undetermined"),
                "turned": overfit,
                "t_L": 10 if overfit else 60,
                "best_test_acc": 0.8,
                "final_test_acc": 0.78,
                "final_correlation": 0.3 + 0.05 * overfit,
                "final_correlation_images": 0.5,
            }
            for name, ind in INDICATORS.items():
                fire = (8 + seed) if overfit else (None if seed else 30)
                row.update({fire_column(name, t): fire for t in ind.grid})
                row[fire_column(name)] = fire
                row[f"score:{name}"] = (1.0 + 0.1 * seed) if overfit else 0.1 * seed
            rows.append(row)
    df = pd.concat([pd.DataFrame(rows), penalty_summary()], ignore_index=True)
    text = build_report(df)
    tests = primary_tests(df, pd.DataFrame()).set_index("claim")
    assert tests.loc[3, "verdict"] != "NOT TESTED"
    assert "Claim 1 (" in text and "gated_perplexity" in text
    head = text.split("### Runs per group")[0]
    assert "NOT TESTED" not in head, head
    assert "| overfit | 6 | 6 | 0 | 0 |" in text
