"""Case 6: wall time of the README's main job, ``xai-sparsity demo``, on this machine.

Runs the installed console script (``xai-sparsity demo --out TMP``; falls back to
``python -m xai_sparsity.cli``) in a fresh process into a temporary folder and reports its
wall time, with torch's default thread count. ``--quick`` skips it: the demo trains several models and takes minutes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h

CASE = "demo"


def command() -> list[str]:
    script = Path(sys.executable).parent / "xai-sparsity"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "xai_sparsity.cli"]


def main(argv: list[str] | None = None) -> None:
    p = h.parser(__doc__ or "")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds before giving up")
    args = p.parse_args(argv)
    name = "`xai-sparsity demo` wall time"
    if args.quick:
        h.emit([h.skip(CASE, name, "skipped with --quick (the demo trains for minutes)")])
        return
    out = Path(tempfile.mkdtemp(prefix="xai-demo-bench-"))
    # the demo runs as a user runs it: torch picks its own thread count
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = str(h.ROOT)
    try:
        t0 = time.perf_counter()
        proc = subprocess.run(
            [*command(), "demo", "--out", str(out / "demo")],
            capture_output=True,
            text=True,
            env=env,
            cwd=h.ROOT,
            timeout=args.timeout,
        )
        wall = time.perf_counter() - t0
    except subprocess.TimeoutExpired:
        h.emit([h.skip(CASE, name, f"did not finish within {args.timeout:.0f} s")])
        return
    finally:
        shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        h.emit([h.skip(CASE, name, f"demo failed (exit {proc.returncode}): {' | '.join(tail)}")])
        return
    h.emit(
        [h.row(CASE, name, wall, unit="s", detail=f"torch default threads, {os.cpu_count()} CPUs")]
    )


if __name__ == "__main__":
    main()
