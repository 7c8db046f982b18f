"""The command line: help, clear errors with exit status 2, train / analyze / compare / demo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xai_sparsity.cli import COMMANDS, main, parse_value

TINY = [
    "--set", "train_size=30", "--set", "test_size=30", "--set", "probe_size=10",
    "--set", "widths=4,4", "--set", "hidden=8", "--set", "batch_size=15", "--set", "epochs=2",
    "--set", "array_every=1", "--set", "spatial_images=2",
]  # fmt: skip


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("train", "compare", "analyze", "demo"):
        assert name in out and name in COMMANDS
    assert main(["demo", "--help"]) == 0
    assert "--quick" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "choose a command"),
        (["trian"], "invalid choice: 'trian'"),
        (["demo"], "the following arguments are required: --out"),
        (["demo", "--out", "x", "--seed", "one"], "invalid int value: 'one'"),
        (["train", "--out", "x", "--set", "epochs"], "must look like KEY=VALUE"),
        (["train", "--out", "x", "--set", "epoch=3"], "did you mean ['epochs'"),
        (["train", "--out", "x", "--set", "optimizer=sdg"], "optimizer='sdg' is not one of"),
        (["train", "--out", "x", "--config", "nope.toml"], "does not exist"),
        (["compare", "--out", "x", "--arms", "baseline,dropuot"], "'dropuot' is not one of"),
        (["analyze", "no/such/run"], "does not exist"),
        (["demo", "--out", "x", "--epochs", "0"], "--epochs 0 must be a positive integer"),
    ],
)
def test_bad_arguments_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_bad_config_file_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"epochs": 2, "widths": "wide"}))
    assert main(["train", "--out", str(tmp_path / "r"), "--config", str(cfg)]) == 2
    assert "widths='wide' must be a list of int" in capsys.readouterr().err


def test_parse_value() -> None:
    assert parse_value("3") == 3 and parse_value("1e-3") == 0.001
    assert parse_value("[1, 2]") == [1, 2] and parse_value("a,b") == ["a", "b"]
    assert parse_value("off") is False and parse_value("null") is None
    assert parse_value("features.relu4") == "features.relu4"


def test_train_then_analyze(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('data = "mnist5k"\nlr = 0.05\n')
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--config", str(cfg), *TINY, "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed
    assert "lead per layer" in printed or "did not turn, so there is no lead" in printed
    assert json.loads((out / "config.json").read_text())["lr"] == 0.05
    assert main(["analyze", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["t_s"]) == {"features.relu1", "features.relu2", "classifier.relu"}
    assert main(["analyze", str(out), "--layers", "features.relu2", "--rule", "patience=2"]) == 0
    assert "features.relu2" in capsys.readouterr().out
    assert main(["analyze", str(out), "--rule", "patiense=2"]) == 2
    assert "unknown analysis setting" in capsys.readouterr().err


def _run_dir(path: Path, test_loss: list[float]) -> Path:
    import numpy as np

    from xai_sparsity.runs import RunDir

    run = RunDir(path, create=True)
    n = len(test_loss)
    for e in range(1, n + 1):
        run.append_history(
            {
                "epoch": e,
                "train_loss": 0.02 + 2.0 * float(np.exp(-e / 3.0)),
                "train_acc": 0.9,
                "test_loss": test_loss[e - 1],
                "test_acc": 0.8,
                "sparsity:conv1": 0.6 + 0.01 * e,
                "sparsity:conv2": 0.6 + 0.01 * e,
            }
        )
    return path


def test_analyze_prints_no_lead_for_a_run_that_did_not_turn(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flat = _run_dir(tmp_path / "flat", [1.0 - 0.01 * e for e in range(30)])
    assert main(["analyze", str(flat)]) == 0
    text = capsys.readouterr().out
    assert "the test loss did not turn" in text and "no lead" in text
    assert "lead=" not in text and "lead -" not in text and "(lead " not in text
    assert "early warning (gated_rise): epoch" in text  # it fires (sparsity keeps rising) ...
    assert main(["analyze", str(flat), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["warning_lead"] is None and set(result["lead"].values()) == {None}
    turned = _run_dir(tmp_path / "turned", [1.0 + 0.01 * (e - 12) ** 2 for e in range(30)])
    assert main(["analyze", str(turned), "--rule", "rule=ema_rise"]) == 0
    text = capsys.readouterr().out
    assert "turned" in text and "lead=" in text and "early warning (ema_rise): epoch" in text


def test_summary_text_has_no_lead_for_a_run_that_did_not_turn() -> None:
    from xai_sparsity.cli import _analysis_text

    class Run:
        summary = {  # noqa: RUF012 - a stand-in for RunDir.summary
            "best_test_acc": 0.9,
            "final_test_acc": 0.9,
            "analysis": {"t_L": 30, "turned": False, "rise": 0.0, "lead": {"conv1": 20}},
        }

    text = _analysis_text(Run())
    assert "did not turn, so there is no lead" in text and "20" not in text


def test_demo_quick_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--quick", "--epochs", "2", "--quiet"]
    assert main([*argv, "--arms", "baseline,penalty"]) == 0
    report = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert report == out / "report.md" and report.exists()
    text = report.read_text()
    for needle in ("## Verdicts", "best test acc", "t_s / lead", "features.relu4 (conv)",
                   "figures/baseline_curves.png", "figures/penalty_heatmap.png",
                   "figures/comparison.png", "conv-layer sparsity at the last epoch"):  # fmt: skip
        assert needle in text, needle
    # two epochs: the baseline's test loss cannot turn, so no arm gets a lead
    assert "the test loss did not turn" in text and "(lead " not in text
    assert "| label |" in text or "label" in text.split("## Arms", 1)[1].splitlines()[4]
    for png in ("baseline_curves.png", "baseline_heatmap.png", "comparison.png"):
        assert (out / "figures" / png).stat().st_size > 1000
    assert (out / "runs" / "penalty" / "summary.json").exists()
