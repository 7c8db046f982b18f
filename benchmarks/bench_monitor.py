"""SparsityMonitor overhead: an epoch of a plain training loop with ``monitor.epoch_end`` vs without.

The loop is what a user writes: one epoch of SGD (batch 32, momentum 0.9) over the training
images, then the test loss over the held-out test images. The monitored side adds one line,
``monitor.epoch_end(epoch, train_loss=..., test_loss=...)``, with the default settings (perplexity,
zero fraction, Hoyer, entropy, filter correlation, the arrays every 5th epoch and at epoch 1) on a
probe set of 500 fixed held-out images, i.e. one extra forward pass over 500 images per epoch plus
the measures and the file writes.

Model: the default CNN (``models.make_model("cnn")``: widths 16-16-32-32, hidden 128); data: the
embedded ``mnist5k`` (28x28 digits). Each side trains its own copy of the model from the same
initial weights. The two sides run interleaved, one epoch each per round in rotating order, after
one warm-up epoch each; the ratio is the median of the per-round ratios with its IQR. Rounds that
write the npz arrays are also reported separately.

Run it as ``.venv/bin/python benchmarks/bench_monitor.py`` (with the malloc settings of the calling
environment) or through ``benchmarks/run_all.py --only monitor [--malloc pinned]``. Goal: <= 1.10x.
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h

CASE = "monitor"
GOAL = "<= 1.10"


def _stack(ds: Any) -> tuple[Any, Any]:
    import torch

    xs, ys = zip(*(ds[i] for i in range(len(ds))), strict=True)
    return torch.stack(list(xs)), torch.as_tensor(list(ys))


def run(train_size: int, args: Any) -> list[h.Row]:
    import torch
    import torch.nn.functional as F

    from xai_sparsity.training.data import load_data
    from xai_sparsity.training.models import make_model
    from xai_sparsity.training.monitor import SparsityMonitor

    probe_size = 100 if args.quick else args.probe_size
    data = load_data("mnist5k", train_size=train_size, probe_size=probe_size, seed=0)
    x_train, y_train = _stack(data.train)
    x_test, y_test = _stack(data.test)
    probe, probe_y = _stack(data.probe)
    device = torch.device(args.device)
    x_train, y_train, x_test, y_test = (t.to(device) for t in (x_train, y_train, x_test, y_test))
    torch.manual_seed(0)
    model = make_model(
        "cnn",
        num_classes=data.num_classes,
        in_channels=data.in_channels,
        image_size=data.image_size,
    ).to(device)
    models = {"plain": model, "monitored": copy.deepcopy(model)}
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in models.items()}
    out = Path(tempfile.mkdtemp(prefix="bench_monitor_"))
    monitor = SparsityMonitor(models["monitored"], (probe, probe_y), out=out)
    epochs = {"plain": 0, "monitored": 0}
    array_rounds: list[bool] = []
    g = torch.Generator(device="cpu").manual_seed(0)

    def epoch(side: str) -> None:
        m, opt = models[side], opts[side]
        m.train()
        order = torch.randperm(len(x_train), generator=g).to(device)
        total = 0.0
        for i in range(0, len(order), 32):
            idx = order[i : i + 32]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(m(x_train[idx]), y_train[idx])
            loss.backward()
            opt.step()
            total += loss.item()
        m.eval()
        with torch.no_grad():
            test = sum(
                F.cross_entropy(m(x_test[i : i + 500]), y_test[i : i + 500], reduction="sum").item()
                for i in range(0, len(x_test), 500)
            ) / len(x_test)
        epochs[side] += 1
        if side == "monitored":
            array_rounds.append(monitor.wants_arrays(epochs[side]))
            monitor.epoch_end(epochs[side], train_loss=total, test_loss=test)

    rounds = args.rounds or (3 if args.quick else 15)
    times = h.interleaved(
        {"plain": lambda: epoch("plain"), "monitored": lambda: epoch("monitored")},
        rounds=rounds,
        warmup=1,
        cuda=device.type == "cuda",
    )
    timed_arrays = array_rounds[1:]  # the warm-up epoch comes first
    r = h.ratios(times, "monitored", "plain")
    r_plain = [v for v, a in zip(r, timed_arrays, strict=True) if not a]
    r_arrays = [v for v, a in zip(r, timed_arrays, strict=True) if a]
    probe_pass = monitor.timings[1:]
    label = f"cnn mnist5k train {len(x_train)} test {len(x_test)} probe {len(probe)}"
    detail = (
        f"plain epoch {h.ms(times['plain'])}, monitored {h.ms(times['monitored'])}, "
        f"probe pass {h.ms(probe_pass)} ({len(monitor.layers)} layers)"
    )
    rows = [
        h.row(CASE, f"{label}: monitored / plain epoch", r, goal=GOAL, detail=detail),
        h.row(CASE, f"{label}: epochs without arrays", r_plain or None),
        h.row(CASE, f"{label}: epochs writing arrays", r_arrays or None),
        h.row(
            CASE,
            f"{label}: probe pass / plain epoch",
            [p / t for p, t in zip(probe_pass, times["plain"], strict=False)],
        ),
    ]
    monitor.close()
    return rows


def main() -> None:
    p = h.parser(__doc__.splitlines()[0])
    p.add_argument("--probe-size", type=int, default=500)
    p.add_argument(
        "--train-sizes",
        default="500,4000",
        help="training-set sizes (500: the trainer's default; 4000: most of mnist5k)",
    )
    args = p.parse_args()
    setup = h.setup(args.threads)
    print(
        f"# SparsityMonitor overhead; fresh process, malloc pinned "
        f"({' '.join(f'{k}={v}' for k, v in h.MALLOC_ENV.items())}): {setup['malloc_pinned']}; "
        f"torch threads {setup['threads']}; load avg {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    sizes = [100] if args.quick else [int(s) for s in args.train_sizes.split(",")]
    for size in sizes:
        rows = run(size, args)
        h.emit(rows)
        table(rows)


def table(rows: list[h.Row]) -> None:
    """Print rows as a readable table."""
    width = max(len(r.name) for r in rows)
    print(f"\n{'benchmark'.ljust(width)}  median   IQR              goal     status")
    for r in rows:
        if r.value is None:
            print(f"{r.name.ljust(width)}  -")
            continue
        iqr = f"[{r.q25:.3f}, {r.q75:.3f}]" if r.q25 is not None else ""
        print(f"{r.name.ljust(width)}  {r.value:.3f}x  {iqr:15}  {r.goal or '':8} {r.status}")
        if r.detail:
            print(f"{''.ljust(width)}  ({r.detail})")
    print(flush=True)


if __name__ == "__main__":
    main()
