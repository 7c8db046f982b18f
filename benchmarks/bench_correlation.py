"""Case 4: streaming filter correlation of a 512-channel layer vs the forward producing it.

Two settings, each timed as ``forward`` vs ``forward + CorrelationAccumulator.update`` of the
512-channel output (float64 sums n, S_c, S_cd over positions), interleaved:

- ``resnet18 layer4``: torchvision ResNet-18 at batch 16, 224x224 (layer4: 512 x 7 x 7 maps,
  784 positions per batch);
- ``conv 512``: one ``Conv2d(512, 512, 3, padding=1)`` + ReLU on a (32, 512, 8, 8) input (2,048
  positions per batch; the worst case: the forward is only that layer).

Goal: (forward + update) / forward <= 1.30.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h
import _models
import torch
from torch import nn

CASE = "correlation"
GOAL = "<= 1.30"


def compare(
    label: str, model: nn.Module, x: torch.Tensor, layer: nn.Module, args: Any
) -> list[h.Row]:
    from xai_sparsity.measuring.correlation import CorrelationAccumulator

    model.eval()
    acc = CorrelationAccumulator(over="positions")
    single = CorrelationAccumulator(over="positions", precision="single")
    out: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda m, i, o: out.append(o))

    def forward() -> None:
        with torch.no_grad():
            model(x)
        out.clear()

    def with_update() -> None:
        with torch.no_grad():
            model(x)
        acc.update(out.pop())

    def with_single() -> None:
        with torch.no_grad():
            model(x)
        single.update(out.pop())

    try:
        times = h.interleaved(
            {"forward": forward, "update": with_update, "single": with_single},
            rounds=args.rounds or (2 if args.quick else 12),
            warmup=1 if args.quick else 3,
            cuda=args.device.startswith("cuda"),
        )
    finally:
        handle.remove()
    return [
        h.row(
            CASE,
            f"{label}: forward + correlation update / forward",
            h.ratios(times, "update", "forward"),
            goal=GOAL,
            detail=f"forward {h.ms(times['forward'])}, with update {h.ms(times['update'])}, "
            f"r computed for {acc.num_channels} channels, n = {acc.n:,}",
        ),
        h.row(
            CASE,
            f"{label}: forward + update, precision='single' / forward",
            h.ratios(times, "single", "forward"),
            detail=f"with update {h.ms(times['single'])} (float32 products, float64 sums)",
        ),
    ]


def rows(args: Any) -> list[h.Row]:
    """Both settings on ``args.device``."""
    torch.manual_seed(0)
    batch, side = (1, 64) if args.quick else (16, 224)
    dev = torch.device(args.device)
    resnet = _models.resnet18().to(dev)
    result = compare(
        f"resnet18 b{batch} {side}x{side} layer4 (512 ch)",
        resnet,
        torch.randn(batch, 3, side, side, device=dev),
        resnet.get_submodule("layer4"),
        args,
    )
    conv = nn.Sequential(nn.Conv2d(512, 512, 3, padding=1), nn.ReLU()).to(dev)
    b2 = 4 if args.quick else 32
    result += compare(
        f"conv 512->512 3x3 b{b2} 8x8", conv, torch.randn(b2, 512, 8, 8, device=dev), conv, args
    )
    return result


def main(argv: list[str] | None = None) -> None:
    p = h.parser(__doc__ or "")
    args = p.parse_args(argv)
    h.setup(args.threads)
    h.emit(rows(args))


if __name__ == "__main__":
    main()
