"""Case 5: LayerExplorer latency: how long a layer switch and an image change take.

The widget's callbacks are driven in-process through ``LayerExplorer.select`` (the same
``observe`` callbacks a click fires), each call timed from the value change until every
affected panel is re-rendered (PNG bytes ready). Model: the default CNN (random weights) on 16
normalised mnist5k digits (8 noise images with ``--quick``); attribution method: the widget's
default (saliency). Layer switches cycle through every selectable layer (the first round builds
each panel's layouts; the detail gives both medians); image changes visit every image twice
(the first visit computes that image's attribution and texts; the activations of every image
are cached during construction, as the correlation panel needs them all).
Goals: median layer switch <= 150 ms, median image change <= 100 ms.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h
import _models
import torch

CASE = "explorer"


def images(quick: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    if quick:
        return torch.randn(2, 1, 28, 28), None
    from xai_sparsity.training.data import load_data

    bundle = load_data("mnist5k", train_size=100, probe_size=16)
    xs, ys = zip(*(bundle.probe[i] for i in range(16)), strict=True)
    return torch.stack(xs), torch.as_tensor(ys)


def main(argv: list[str] | None = None) -> None:
    p = h.parser(__doc__ or "")
    args = p.parse_args(argv)
    h.setup(args.threads)
    os.environ.setdefault("MPLBACKEND", "Agg")
    try:
        import ipywidgets  # noqa: F401
    except ImportError as err:
        h.emit([h.skip(CASE, "layer switch", f"ipywidgets missing: {err}", "<= 150")])
        return
    from xai_sparsity.views.widgets import LayerExplorer

    torch.manual_seed(0)
    model = _models.default_cnn().eval()
    x, y = images(args.quick)
    t0 = time.perf_counter()
    ex = LayerExplorer(model, x, y, methods=("saliency",) if args.quick else None)
    build = time.perf_counter() - t0
    layers = list(ex.layers)[:3] if args.quick else list(ex.layers)
    rounds = 1 if args.quick else (args.rounds or 5)

    switch: list[float] = []
    first_round = 0  # switches of the first round (panel layouts are built on first use)
    for r in range(rounds):
        for k in range(len(layers)):
            target = layers[(layers.index(ex.state["layer"]) + 1 + k) % len(layers)]
            if target == ex.state["layer"]:
                continue
            t0 = time.perf_counter()
            ex.select(layer=target)
            switch.append(time.perf_counter() - t0)
            first_round += r == 0

    first: list[float] = []
    again: list[float] = []
    n = x.shape[0]
    for visit in range(2):
        for i in [*range(1, n), 0]:
            t0 = time.perf_counter()
            ex.select(image=i)
            (first if visit == 0 and i != 0 else again).append(time.perf_counter() - t0)
    change = first + again

    def ms(v: list[float]) -> list[float]:
        return [t * 1e3 for t in v]

    rows: list[Any] = [
        h.row(
            CASE,
            "layer switch (median)",
            ms(switch),
            unit="ms",
            goal="<= 150",
            detail=f"{len(switch)} switches over {len(layers)} layers; first round "
            f"{statistics.median(ms(switch[:first_round])):.0f} ms, later "
            f"{statistics.median(ms(switch[first_round:] or switch)):.0f} ms",
        ),
        h.row(
            CASE,
            "image change (median)",
            ms(change),
            unit="ms",
            goal="<= 100",
            detail=f"{len(change)} changes; first visit {statistics.median(ms(first)):.0f} ms, "
            f"cached {statistics.median(ms(again)):.0f} ms",
        ),
        h.row(CASE, "widget construction", build * 1e3, unit="ms", detail=f"{n} images"),
    ]
    h.emit(rows)


if __name__ == "__main__":
    main()
