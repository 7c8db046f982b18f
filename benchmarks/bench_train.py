"""Case 2: a training step with the sparsity penalty on every conv layer vs a baseline step.

Both sides run the same step on the same batch: ``zero_grad``, forward, cross-entropy,
``backward``, SGD ``step``; the penalised side adds ``SparsityPenalty(nn.Conv2d, lam=0.3)``
(perplexity, layer scope, computed in the hooks of the same forward, on the autograd path).
Each side trains its own copy of the model (same initial weights). Goal: penalised / baseline
<= 1.25.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h
import _models
import torch
import torch.nn.functional as F
from torch import nn

CASE = "train_step"
GOAL = "<= 1.25"


def steps(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> tuple[dict[str, Callable[[], Any]], Any]:
    """The baseline and penalised step callables, and a closer for the penalty's hooks."""
    from xai_sparsity.training.penalty import SparsityPenalty

    base_model = model.train()
    pen_model = copy.deepcopy(model).train()
    base_opt = torch.optim.SGD(base_model.parameters(), lr=0.01, momentum=0.9)
    pen_opt = torch.optim.SGD(pen_model.parameters(), lr=0.01, momentum=0.9)
    penalty = SparsityPenalty(nn.Conv2d, lam=0.3)
    attached = penalty.attach(pen_model)
    attached.__enter__()

    def baseline() -> None:
        base_opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(base_model(x), y)
        loss.backward()
        base_opt.step()

    def penalised() -> None:
        pen_opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(pen_model(x), y) + penalty.value()
        loss.backward()
        pen_opt.step()

    def close() -> None:
        attached.__exit__(None, None, None)

    return {"baseline": baseline, "penalised": penalised}, (penalty, close)


def run_model(name: str, args: Any) -> list[h.Row]:
    model, x = _models.model_and_input(name, args.quick, args.device)
    y = torch.randint(0, 10, (x.shape[0],), device=x.device)
    label = f"{name} b{x.shape[0]} {x.shape[-1]}x{x.shape[-1]}"
    sides, (penalty, close) = steps(model, x, y)
    try:
        times = h.interleaved(
            sides,
            rounds=args.rounds or (2 if args.quick else 12),
            warmup=1 if args.quick else 3,
            cuda=args.device.startswith("cuda"),
        )
        n_layers = len(penalty.layers)
    finally:
        close()
    return [
        h.row(
            CASE,
            f"{label}: penalised step / baseline step",
            h.ratios(times, "penalised", "baseline"),
            goal=GOAL,
            detail=f"baseline {h.ms(times['baseline'])}, penalised {h.ms(times['penalised'])}, "
            f"{n_layers} conv layers",
        )
    ]


def main(argv: list[str] | None = None) -> None:
    p = h.parser(__doc__ or "")
    p.add_argument("--models", default="cnn,resnet18")
    args = p.parse_args(argv)
    h.setup(args.threads)
    for name in args.models.split(","):
        h.emit(run_model(name, args))


if __name__ == "__main__":
    main()
