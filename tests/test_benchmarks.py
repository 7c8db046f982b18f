"""Smoke test of the benchmarks: every case runs (``run_all.py --quick``) and reports its ratio.

Timings are not asserted (they depend on the machine and its load), only that each benchmark
ran and printed a well-formed row; plus unit tests of the timing harness. The run of every case
starts about ten fresh processes that each import torch (minutes on two cores), so it is marked
slow; the default suite runs the runner on two cases.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import _harness as h  # noqa: E402
import run_all  # noqa: E402

STATUSES = {"PASS", "MISS", "info", "SKIP"}


def _run_quick(out: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    proc = subprocess.run(
        [sys.executable, str(BENCH / "run_all.py"), "--quick", "--json", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


@pytest.fixture(scope="module")
def quick_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    return _run_quick(tmp_path_factory.mktemp("bench") / "results.json")


def test_runner_on_two_cases(tmp_path: Path) -> None:
    proc, result = _run_quick(tmp_path / "r.json", "--only", "forward_cnn,gpu")
    rows = result["rows"]
    assert {r["case"] for r in rows} == {"forward", "gpu"}
    ours = next(r for r in rows if r["name"].endswith("ours / plain"))
    assert ours["status"] in ("PASS", "MISS") and ours["goal"] == "<= 1.10"
    assert f"{ours['value']:.2f}x" in proc.stdout
    assert "malloc: glibc defaults" in proc.stdout and "torch threads: 1" in proc.stdout
    assert "median" in proc.stdout and "IQR" in proc.stdout


@pytest.mark.slow
def test_every_case_runs_and_reports(quick_run: tuple[Any, dict[str, Any]]) -> None:
    proc, result = quick_run
    rows = result["rows"]
    cases = {r["case"] for r in rows}
    expected = {"forward", "train_step", "sweep", "correlation", "explorer", "demo", "gpu"}
    if (BENCH / "bench_monitor.py").exists():
        expected.add("monitor")
    assert expected <= cases, f"missing cases: {expected - cases}"
    for r in rows:
        assert r["status"] in STATUSES, r
        if r["status"] in ("PASS", "MISS"):
            assert isinstance(r["value"], float) and r["value"] > 0, r
            assert r["goal"], r
    # the table and the method are printed
    out = proc.stdout
    assert "malloc: glibc defaults" in out and "torch threads: 1" in out
    assert "median" in out and "IQR" in out


@pytest.mark.slow
def test_ratios_of_every_goal_are_printed(quick_run: tuple[Any, dict[str, Any]]) -> None:
    proc, result = quick_run
    by_name = {f"{r['case']}: {r['name']}": r for r in result["rows"]}
    must = [
        "ours / plain",
        "Captum LayerActivation / ours",
        "torchvision feature extractor / ours",
        "TorchLens record / ours",
        "penalised step / baseline step",
        "peak RSS",
        "sweep throughput / plain eval loop",
        "forward + correlation update / forward",
        "layer switch",
        "image change",
    ]
    for key in must:
        hits = [r for n, r in by_name.items() if key in n]
        assert hits, f"no row for {key!r}"
        assert any(r["value"] is not None for r in hits) or all(r["status"] == "SKIP" for r in hits)
        for r in hits:
            if r["value"] is not None and r["unit"] == "x":
                assert f"{r['value']:.2f}x" in proc.stdout
    gpu = [r for r in result["rows"] if r["case"] == "gpu"]
    if not result["machine"]["cuda"]:
        assert [r["status"] for r in gpu] == ["SKIP"] and "cuda" in gpu[0]["detail"]


def test_judge_and_summary() -> None:
    assert h.judge(1.05, "<= 1.10") == "PASS"
    assert h.judge(1.2, "<= 1.10") == "MISS"
    assert h.judge(1.2, "> 1.00") == "PASS"
    assert h.judge(0.7, ">= 0.80") == "MISS"
    assert h.judge(None, "<= 1") == "SKIP"
    assert h.judge(3.0, None) == "info"
    assert h.summary([1.0, 2.0, 3.0, 4.0, 5.0]) == (3.0, 2.0, 4.0)
    assert h.summary([2.0]) == (2.0, 2.0, 2.0)
    r = h.row("c", "n", [1.0, 1.2, 1.1], goal="<= 1.10")
    assert (r.value, r.status) == (1.1, "PASS")


def test_interleaved_rotates_and_counts() -> None:
    calls: list[str] = []
    sides = {k: (lambda k=k: calls.append(k)) for k in ("a", "b", "c")}
    times = h.interleaved(sides, rounds=3, warmup=1)
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert calls[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert len(h.ratios(times, "a", "b")) == 3


def test_only_selects_by_prefix() -> None:
    assert [c.name for c in run_all.select("forward")] == [
        "forward_cnn",
        "forward_resnet18",
        "forward_torchlens",
    ]
    with pytest.raises(SystemExit, match="matches no case"):
        run_all.select("nonsense")
