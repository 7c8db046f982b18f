"""Run every benchmark and print one table of ratios.

Usage (``make bench`` runs the first line)::

    .venv/bin/python benchmarks/run_all.py                 # the full run (tens of minutes)
    .venv/bin/python benchmarks/run_all.py --quick         # smoke test: tiny sizes, few rounds
    .venv/bin/python benchmarks/run_all.py --only forward  # one case (prefix match; comma list)
    .venv/bin/python benchmarks/run_all.py --json results.json --markdown table.md

Each case runs in a FRESH Python process with glibc's malloc as users run it (its defaults; the
main figures) or, with ``--malloc pinned``, with MALLOC_MMAP_THRESHOLD_=65536,
MALLOC_TRIM_THRESHOLD_=131072 and MALLOC_TOP_PAD_=0 (every large temporary a fresh mmap: peak RSS
measures what is alive, at the price of page faults users do not pay), and with torch's
threads pinned (``--threads``, default 1; OMP/MKL likewise), so no case inherits another's heap,
caches or wrapped functions. Inside a case the compared sides run interleaved (one call of each
per round, rotating order) after warm-ups; a ratio is the median of the per-round ratios, with
its inter-quartile range. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _harness as h  # noqa: E402


@dataclass(frozen=True)
class Case:
    """A benchmark case: a script and its arguments, run in a fresh process."""

    name: str
    script: str
    args: tuple[str, ...] = ()
    what: str = ""


CASES: tuple[Case, ...] = (
    Case("forward_cnn", "bench_forward.py", ("--models", "cnn"), "1. measured forward, CNN"),
    Case(
        "forward_resnet18",
        "bench_forward.py",
        ("--models", "resnet18"),
        "1. measured forward, ResNet-18",
    ),
    Case("forward_torchlens", "bench_forward.py", ("--torchlens",), "1. TorchLens comparison"),
    Case("train_step", "bench_train.py", (), "2. penalised training step"),
    Case("sweep", "bench_sweep.py", (), "3. dataset sweep memory and throughput"),
    Case("correlation", "bench_correlation.py", (), "4. streaming filter correlation"),
    Case("explorer", "bench_explorer.py", (), "5. LayerExplorer latency"),
    Case("demo", "bench_demo.py", (), "6. README main job"),
    Case("gpu", "bench_gpu.py", (), "7. GPU section"),
    Case("monitor", "bench_monitor.py", (), "SparsityMonitor overhead"),
)


def machine() -> dict[str, Any]:
    """CPU model, cores, torch version and load: where the numbers were taken."""
    import torch

    model = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_avg": [round(v, 2) for v in load],
    }


def case_env(threads: int, malloc: str = "default") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in h.MALLOC_ENV}
    if malloc == "pinned":
        env.update(h.MALLOC_ENV)
    env.update(
        {
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "MPLBACKEND": "Agg",
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(h.ROOT), os.environ.get("PYTHONPATH", "")) if p
            ),
            "TQDM_DISABLE": "1",
        }
    )
    return env


def run_case(case: Case, args: argparse.Namespace) -> tuple[list[dict[str, Any]], str]:
    """Run one case in a fresh process; its rows and a note (empty when all went well)."""
    script = HERE / case.script
    if not script.exists():
        return [], f"{case.script} not found"
    common = ["--threads", str(args.threads)]
    if args.quick:
        common.append("--quick")
    if args.rounds:
        common += ["--rounds", str(args.rounds)]
    env = case_env(args.threads, args.malloc)
    # a script with a command line of its own gets fewer of the common options
    variants = [common, ["--quick"] if args.quick else [], []]
    try:
        for extra in variants:
            cmd = [sys.executable, str(script), *case.args, *extra]
            proc = subprocess.run(
                cmd, capture_output=True, text=True, env=env, cwd=h.ROOT, timeout=args.timeout
            )
            if not (proc.returncode == 2 and "unrecognized arguments" in proc.stderr):
                break
    except subprocess.TimeoutExpired:
        return [], f"timed out after {args.timeout:.0f} s"
    rows = [
        json.loads(line[len(h.PREFIX) :])
        for line in proc.stdout.splitlines()
        if line.startswith(h.PREFIX)
    ]
    note = ""
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-4:])
        note = f"exit {proc.returncode}: {tail}"
    elif not rows:
        tail = " | ".join(proc.stdout.strip().splitlines()[-6:])
        note = f"printed no BENCH_JSON rows; its output ends: {tail}"
    return rows, note


def fmt_value(r: dict[str, Any]) -> str:
    v = r.get("value")
    if v is None:
        return "-"
    unit = r.get("unit") or ""
    if unit == "x":
        return f"{v:.2f}x"
    return f"{v:.0f} {unit}" if v >= 100 else f"{v:.2f} {unit}"


def fmt_iqr(r: dict[str, Any]) -> str:
    lo, hi = r.get("q25"), r.get("q75")
    if lo is None or hi is None or lo == hi:
        return ""
    return f"{lo:.2f}-{hi:.2f}"


COLUMNS = ("benchmark", "median", "IQR", "goal", "result", "detail")


def table_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    return [
        [
            f"{r['case']}: {r['name']}",
            fmt_value(r),
            fmt_iqr(r),
            r.get("goal") or "",
            r.get("status", ""),
            r.get("detail", ""),
        ]
        for r in rows
    ]


def text_table(rows: list[dict[str, Any]]) -> str:
    cells = table_rows(rows)
    widths = [max([len(c)] + [len(x[i]) for x in cells]) for i, c in enumerate(COLUMNS)]
    widths[-1] = min(widths[-1], 90)

    def line(xs: list[str] | tuple[str, ...]) -> str:
        return "  ".join(x.ljust(w) for x, w in zip(xs, widths, strict=True)).rstrip()

    return "\n".join([line(COLUMNS), line(["-" * w for w in widths]), *map(line, cells)])


def markdown_table(rows: list[dict[str, Any]]) -> str:
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for c in table_rows(rows):
        out.append("| " + " | ".join(x.replace("|", "/") for x in c) + " |")
    return "\n".join(out)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def select(only: str | None) -> list[Case]:
    if not only:
        return list(CASES)
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    chosen = [c for c in CASES if any(c.name == w or c.name.startswith(w) for w in wanted)]
    if not chosen:
        names = ", ".join(c.name for c in CASES)
        raise SystemExit(f"--only {only!r} matches no case; cases: {names}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke test: tiny sizes, few rounds")
    p.add_argument("--only", default=None, help="case name or prefix, comma separated")
    p.add_argument("--threads", type=int, default=1, help="torch threads per case (default 1)")
    p.add_argument("--rounds", type=int, default=None, help="override timed rounds per case")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per case")
    p.add_argument(
        "--malloc",
        choices=("default", "pinned"),
        default="default",
        help="glibc malloc as users run it (default) or pinned: "
        + " ".join(f"{k}={v}" for k, v in h.MALLOC_ENV.items()),
    )
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    p.add_argument("--markdown", type=Path, default=None, help="also write a Markdown table")
    args = p.parse_args(argv)
    cases = select(args.only)

    info = machine()
    settings = (
        "pinned: " + " ".join(f"{k}={v}" for k, v in h.MALLOC_ENV.items())
        if args.malloc == "pinned"
        else "glibc defaults (as users run it)"
    )
    print(
        f"xai_sparsity benchmarks{' (--quick: smoke sizes, the numbers mean little)' * args.quick}"
    )
    print(
        f"machine: {info['cpu']}, {info['cores']} CPUs, torch {info['torch']}, "
        f"python {info['python']}, CUDA: {info['cuda'] or 'none'}"
    )
    print(f"load average before: {' '.join(map(str, info['load_avg']))}")
    print(f"each case in a fresh process; malloc: {settings}; torch threads: {args.threads}")
    print("ratios: median of per-round ratios of interleaved sides (IQR = 25th-75th percentile)")
    print(flush=True)

    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    failed = 0
    t_all = time.perf_counter()
    for case in cases:
        t0 = time.perf_counter()
        print(f"[{case.name}] {case.what} ...", flush=True)
        got, note = run_case(case, args)
        for r in got:
            print(f"    {r['name']}: {fmt_value(r)} {r.get('status', '')}", flush=True)
        print(f"    ({time.perf_counter() - t0:.0f} s)", flush=True)
        rows += got
        if note:
            if case.name == "monitor" and note.endswith("not found"):
                rows.append(asdict(h.skip("monitor", "SparsityMonitor overhead", note)))
                continue
            failed += 1
            notes.append(f"{case.name}: {note}")
            rows.append(
                {
                    "case": case.name,
                    "name": "did not run",
                    "value": None,
                    "status": "FAIL",
                    "detail": note[:200],
                }
            )
    info["load_avg_after"] = [round(v, 2) for v in os.getloadavg()]
    print()
    print(text_table(rows))
    counts = {s: sum(r.get("status") == s for r in rows) for s in ("PASS", "MISS", "SKIP", "FAIL")}
    print()
    print(
        f"{counts['PASS']} PASS, {counts['MISS']} MISS, {counts['SKIP']} SKIP, {counts['FAIL']} "
        f"FAIL in {time.perf_counter() - t_all:.0f} s; load average after: "
        f"{' '.join(map(str, info['load_avg_after']))}"
    )
    for n in notes:
        print(f"note: {n}")
    if args.json:
        payload = {"machine": info, "threads": args.threads, "quick": args.quick, "rows": rows}
        write_atomic(args.json, json.dumps(payload, indent=1) + "\n")
    if args.markdown:
        write_atomic(args.markdown, markdown_table(rows) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
