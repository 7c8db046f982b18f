"""Case 3: the dataset sweep: memory that does not grow with the data, and its throughput.

- Peak RSS: ``xai_sparsity.capturing.sweeps`` with its default settings (four measures x three scopes,
  filter correlation, lifetime sparsity on every conv/activation layer of the default CNN) over
  1,000 and over 10,000 images, each in its own fresh process; the images are the embedded
  mnist5k digits, repeated (synthetic noise with ``--quick``), streamed in batches of 250.
  Goal: peak RSS(10,000) / peak RSS(1,000) <= 1.10. The growth above the RSS just before the
  sweep is reported too.
- Throughput: the sweep (defaults; a lean one: perplexity, layer scope, nothing else; and the
  defaults without filter correlation, a detail row) vs a plain eval loop (``model(x)`` under ``no_grad``) over the same 1,000 images, interleaved.
  Goal: images/s of the sweep / images/s of the plain loop >= 0.8.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h
import _models
import torch

CASE = "sweep"
BATCH = 250


class RepeatedImages:
    """``n`` images in batches of ``batch``, cycling through a fixed pool (constant memory)."""

    def __init__(self, pool: torch.Tensor, n: int, batch: int = BATCH) -> None:
        self.pool, self.n, self.batch = pool, n, batch

    def __len__(self) -> int:
        return -(-self.n // self.batch)

    def __iter__(self) -> Iterator[torch.Tensor]:
        k = self.pool.shape[0]
        for start in range(0, self.n, self.batch):
            idx = torch.arange(start, min(start + self.batch, self.n)) % k
            yield self.pool[idx]


def image_pool(quick: bool) -> torch.Tensor:
    """(K, 1, 28, 28) normalised digits (mnist5k), or noise with ``quick``."""
    if quick:
        return torch.randn(40, 1, 28, 28)
    from xai_sparsity.training.data import load_data

    bundle = load_data("mnist5k", train_size=1000, probe_size=100)
    return torch.stack([bundle.train[i][0] for i in range(len(bundle.train))])


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def rss_child(n: int, quick: bool) -> None:
    """In a fresh process: one sweep over ``n`` images; print peak and pre-sweep RSS (KiB)."""
    from xai_sparsity.capturing.sweeps import sweep

    model = _models.default_cnn().eval()
    loader = RepeatedImages(image_pool(quick), n, 20 if quick else BATCH)
    before = _rss_kib()
    result = sweep(model, loader, progress=False, device="cpu")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"n": result.n_samples, "peak_kib": peak, "before_kib": before}))


def measure_rss(n: int, args: Any) -> dict[str, int]:
    cmd = [sys.executable, __file__, "--rss-child", str(n), "--threads", str(args.threads)]
    if args.quick:
        cmd.append("--quick")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ.copy())
    return json.loads(out.stdout.strip().splitlines()[-1])


def throughput(args: Any) -> list[h.Row]:
    from xai_sparsity.capturing.sweeps import sweep

    model = _models.default_cnn().eval()
    n = 40 if args.quick else 1000
    loader = RepeatedImages(image_pool(args.quick), n, 20 if args.quick else BATCH)

    def plain() -> None:
        with torch.no_grad():
            for x in loader:
                model(x)

    def full() -> None:
        sweep(model, loader, progress=False, device="cpu")

    def lean() -> None:
        sweep(
            model,
            loader,
            measures=("perplexity",),
            scopes=("layer",),
            correlation=False,
            lifetime=False,
            progress=False,
            device="cpu",
        )

    def no_corr() -> None:
        sweep(model, loader, correlation=False, progress=False, device="cpu")

    times = h.interleaved(
        {"plain": plain, "sweep": full, "lean": lean, "no_corr": no_corr},
        rounds=args.rounds or (2 if args.quick else 5),
        warmup=1,
    )
    return [
        h.row(
            CASE,
            f"cnn {n} images: sweep throughput / plain eval loop",
            h.ratios(times, "plain", "sweep"),
            goal=">= 0.80",
            detail=f"plain {n / h.summary(times['plain'])[0]:.0f} img/s, sweep "
            f"{n / h.summary(times['sweep'])[0]:.0f} img/s (4 measures x 3 scopes, "
            f"correlation, lifetime)",
        ),
        h.row(
            CASE,
            f"cnn {n} images: lean sweep throughput / plain eval loop",
            h.ratios(times, "plain", "lean"),
            detail=f"lean {n / h.summary(times['lean'])[0]:.0f} img/s (perplexity, layer scope)",
        ),
        h.row(
            CASE,
            f"cnn {n} images: sweep without correlation / plain eval loop",
            h.ratios(times, "plain", "no_corr"),
            detail=f"{n / h.summary(times['no_corr'])[0]:.0f} img/s (4 measures x 3 scopes, "
            f"lifetime; what the filter correlation costs is the difference to the full sweep)",
        ),
    ]


def main(argv: list[str] | None = None) -> None:
    p = h.parser(__doc__ or "")
    p.add_argument("--rss-child", type=int, default=None, help=argparse_help())
    args = p.parse_args(argv)
    h.setup(args.threads)
    if args.rss_child is not None:
        rss_child(args.rss_child, args.quick)
        return
    small, large = (40, 400) if args.quick else (1000, 10000)
    a, b = measure_rss(small, args), measure_rss(large, args)
    grow_a = (a["peak_kib"] - a["before_kib"]) / 1024
    grow_b = (b["peak_kib"] - b["before_kib"]) / 1024
    rows = [
        h.row(
            CASE,
            f"cnn sweep peak RSS: {large:,} / {small:,} images",
            b["peak_kib"] / a["peak_kib"],
            goal="<= 1.10",
            detail=f"{a['peak_kib'] / 1024:.0f} MiB vs {b['peak_kib'] / 1024:.0f} MiB; growth "
            f"during the sweep {grow_a:.1f} vs {grow_b:.1f} MiB",
        )
    ]
    h.emit(rows)
    h.emit(throughput(args))


def argparse_help() -> str:
    return "internal: run one sweep over this many images and print its peak RSS"


if __name__ == "__main__":
    main()
