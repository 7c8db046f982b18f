"""Shared timing and reporting code for the benchmark cases.

Every case runs in a fresh process started by ``benchmarks/run_all.py`` with the malloc settings
and the torch thread count pinned (see :data:`MALLOC_ENV` and :func:`setup`). A case measures
its two (or more) sides INTERLEAVED: each round runs every side once, in a rotating order, after
warm-up calls of each side; ratios are taken per round (side / base of the same round) and
summarised by their median and inter-quartile range, so slow drifts of the machine's load cancel.

A case reports rows through :func:`emit`, one ``BENCH_JSON {...}`` line per row on stdout; the
runner collects those lines. Any script that prints such lines can join the table.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a fresh clone without installing the package
    sys.path.insert(0, str(ROOT))

MALLOC_ENV: dict[str, str] = {
    "MALLOC_MMAP_THRESHOLD_": "65536",
    "MALLOC_TRIM_THRESHOLD_": "131072",
    "MALLOC_TOP_PAD_": "0",
}
"""glibc malloc settings pinned in every case process: large buffers come from mmap and are
returned to the system at once, so timings and peak RSS do not depend on heap history."""

PREFIX = "BENCH_JSON "


@dataclass
class Row:
    """One line of the results table.

    ``value`` is a ratio (``unit="x"``) or an absolute number (``"ms"``, ``"s"``, ``"MiB"``);
    ``q25``/``q75`` its spread; ``goal`` e.g. ``"<= 1.10"`` (``None``: information only).
    ``status`` is ``PASS``/``MISS`` from the goal, ``info`` without one, ``SKIP`` if not run.
    """

    case: str
    name: str
    value: float | None
    unit: str = "x"
    q25: float | None = None
    q75: float | None = None
    goal: str | None = None
    status: str = "info"
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def judge(value: float | None, goal: str | None) -> str:
    """``PASS``/``MISS`` of ``value`` against a goal string ``"<= 1.10"`` / ``">= 0.8"``."""
    if goal is None:
        return "info"
    if value is None:
        return "SKIP"
    op, _, bound = goal.partition(" ")
    limit = float(bound)
    checks = {"<=": value <= limit, "<": value < limit, ">=": value >= limit, ">": value > limit}
    ok = checks[op]
    return "PASS" if ok else "MISS"


def row(
    case: str,
    name: str,
    values: Sequence[float] | float | None,
    *,
    unit: str = "x",
    goal: str | None = None,
    detail: str = "",
    **extra: Any,
) -> Row:
    """A :class:`Row` from repeated measurements (median and IQR) or from a single value."""
    if values is None:
        return Row(case, name, None, unit, goal=goal, status="SKIP", detail=detail, extra=extra)
    if isinstance(values, (int, float)):
        v = float(values)
        return Row(
            case, name, v, unit, goal=goal, status=judge(v, goal), detail=detail, extra=extra
        )
    med, q25, q75 = summary(values)
    return Row(case, name, med, unit, q25, q75, goal, judge(med, goal), detail, extra)


def skip(case: str, name: str, reason: str, goal: str | None = None) -> Row:
    """A row for a benchmark that could not run here, with the reason."""
    return Row(case, name, None, "", goal=goal, status="SKIP", detail=reason)


def summary(values: Sequence[float]) -> tuple[float, float, float]:
    """Median, 25th and 75th percentile (inclusive method; one value gives itself thrice)."""
    vals = sorted(float(v) for v in values)
    if len(vals) == 1:
        return vals[0], vals[0], vals[0]
    q = statistics.quantiles(vals, n=4, method="inclusive")
    return statistics.median(vals), q[0], q[2]


def emit(rows: Sequence[Row]) -> None:
    """Print rows as ``BENCH_JSON`` lines for the runner (and a readable line for humans)."""
    for r in rows:
        print(PREFIX + json.dumps(asdict(r)), flush=True)


# ----------------------------------------------------------------------------------- timing


def setup(threads: int) -> dict[str, Any]:
    """Pin torch's threads, check the malloc settings; returns a description of the setup."""
    import torch

    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # already set (possible once per process)
        torch.set_num_interop_threads(1)
    torch.manual_seed(0)
    pinned = all(os.environ.get(k) == v for k, v in MALLOC_ENV.items())
    return {"threads": torch.get_num_threads(), "malloc_pinned": pinned}


def cuda_sync(device: Any) -> Callable[[], None] | None:
    """A synchronise function for CUDA devices, ``None`` for the CPU."""
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return None


def interleaved(
    sides: Mapping[str, Callable[[], Any]],
    *,
    rounds: int,
    warmup: int = 2,
    cuda: bool = False,
) -> dict[str, list[float]]:
    """Time each side once per round, interleaved, after ``warmup`` calls of each side.

    The order of the sides rotates from round to round. The garbage collector runs between
    calls, never inside one. With ``cuda=True`` each call is timed with CUDA events after a
    ``torch.cuda.synchronize()`` on both ends (device time of everything the call queued).

    Returns seconds per side, one value per round.
    """
    import torch

    names = list(sides)
    for _ in range(warmup):
        for n in names:
            sides[n]()
    if cuda:
        torch.cuda.synchronize()
    times: dict[str, list[float]] = {n: [] for n in names}
    was_enabled = gc.isenabled()
    # objects alive now (modules, models, inputs) move to a permanent generation, so that the
    # collection between calls only walks what the calls themselves created
    gc.collect()
    gc.freeze()
    try:
        for r in range(rounds):
            k = r % len(names)
            for n in names[k:] + names[:k]:
                gc.collect()
                gc.disable()
                try:
                    if cuda:
                        torch.cuda.synchronize()
                        start = torch.cuda.Event(enable_timing=True)
                        end = torch.cuda.Event(enable_timing=True)
                        start.record()
                        sides[n]()
                        end.record()
                        torch.cuda.synchronize()
                        times[n].append(start.elapsed_time(end) / 1000.0)
                    else:
                        t0 = time.perf_counter()
                        sides[n]()
                        times[n].append(time.perf_counter() - t0)
                finally:
                    gc.enable()
    finally:
        gc.unfreeze()
        if not was_enabled:
            gc.disable()
    return times


def ratios(times: Mapping[str, Sequence[float]], num: str, den: str) -> list[float]:
    """Per-round ratios ``times[num][i] / times[den][i]``."""
    return [a / b for a, b in zip(times[num], times[den], strict=True)]


def ms(values: Sequence[float]) -> str:
    """Median of seconds, formatted in ms."""
    return f"{statistics.median(values) * 1e3:.1f} ms"


def parser(description: str) -> argparse.ArgumentParser:
    """The common command line of a case script."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes and few rounds (smoke test)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per comparison")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    return p
