"""Case 1: a forward with the perplexity sparsity of every conv/activation layer vs a plain one.

Sides, all in eval mode under ``torch.no_grad`` on the same input batch:

- ``plain``: ``model(x)``;
- ``hooks``: our capture in reduce mode with no measure (the cost of the hooks alone);
- ``ours``: ``capture(model, mode="reduce")`` (perplexity, layer scope, computed inside the
  hooks), opened once and read + cleared after every forward, as in a training loop;
- ``ours_compiled``: the same with ``kernel="compiled"`` (one fused loop per layer through
  ``torch.compile``; compiled during the warm-up calls);
- ``ours_block``: the same with a new ``with capture(...)`` block per forward;
- ``captum``: ``captum.attr.LayerActivation`` on the same modules, measures computed afterwards;
- ``fx``: torchvision ``create_feature_extractor`` on every call of those modules (reused modules
  give several nodes), measures computed afterwards;
- ``torchlens``: ``torchlens.record`` saving every conv2d/relu call, measures afterwards, timed
  with ``--torchlens`` in a process of its own (TorchLens keeps torch's functions wrapped after
  its first call, which would slow every later measurement in the process; in that process
  ``plain`` and ``ours`` run through its wrappers too, so TorchLens / ours is conservative) and
  with fewer rounds (one call costs seconds).

Ratios: ours / plain (goal <= 1.10) and peer / ours (goal > 1: we are faster than each).
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
from torch import nn

CASE = "forward"
GOAL = "<= 1.10"
FASTER = "> 1.00"


def _measure_all(tensors: Any) -> list[torch.Tensor]:
    """The measure a user applies to the tensors a peer tool captured: the toolkit's fastest
    public no-grad function (one engine pass per tensor), so that the peers' ratios compare
    capture mechanisms, not measure implementations."""
    from xai_sparsity.measuring.engine import measure

    return [measure("perplexity", t, "layer") for t in tensors]


def sides_for(model: nn.Module, x: torch.Tensor) -> tuple[dict[str, Callable[[], Any]], Any]:
    """The timed callables of one model, and (layers, FX node count, close)."""
    from captum.attr import LayerActivation
    from torchvision.models.feature_extraction import create_feature_extractor

    from xai_sparsity.capturing.hooks import capture, resolve_layers

    model.eval()
    layers = resolve_layers(model, None)
    modules = dict(model.named_modules())
    # the sides with lasting hooks get their own copy of the model (same weights), so that
    # each side pays only for its own hooks
    ours_model, hooks_model = copy.deepcopy(model), copy.deepcopy(model)
    compiled_model = copy.deepcopy(model)
    open_cap = capture(ours_model, None, mode="reduce").__enter__()
    compiled_cap = capture(compiled_model, None, mode="reduce", kernel="compiled").__enter__()
    hooks_cap = capture(
        hooks_model, None, mode="reduce", measures=(), reduce_fn=lambda name, out: None
    ).__enter__()
    captum = LayerActivation(model, [modules[n] for n in layers])
    extractor = create_feature_extractor(model, return_nodes=_models.fx_nodes(model, layers))

    def plain() -> None:
        with torch.no_grad():
            model(x)

    def hooks() -> None:
        with torch.no_grad():
            hooks_model(x)
        hooks_cap.clear()

    def ours() -> None:
        with torch.no_grad():
            ours_model(x)
        _ = {n: s["perplexity:layer"] for n, s in open_cap.stats.items()}
        open_cap.clear()

    def ours_compiled() -> None:
        with torch.no_grad():
            compiled_model(x)
        _ = {n: s["perplexity:layer"] for n, s in compiled_cap.stats.items()}
        compiled_cap.clear()

    def ours_block() -> None:
        with torch.no_grad(), capture(model, None, mode="reduce") as cap:
            model(x)
        _ = {n: s["perplexity:layer"] for n, s in cap.stats.items()}

    def captum_side() -> None:
        with torch.no_grad():
            acts = captum.attribute(x)
            _measure_all(acts)

    def fx() -> None:
        with torch.no_grad():
            _measure_all(extractor(x).values())

    sides: dict[str, Callable[[], Any]] = {
        "plain": plain,
        "hooks": hooks,
        "ours": ours,
        "ours_compiled": ours_compiled,
        "ours_block": ours_block,
        "captum": captum_side,
        "fx": fx,
    }

    def close() -> None:
        open_cap.__exit__(None, None, None)
        compiled_cap.__exit__(None, None, None)
        hooks_cap.__exit__(None, None, None)

    return sides, (layers, len(_models.fx_nodes(model, layers)), close)


def torchlens_side(model: nn.Module, x: torch.Tensor) -> Callable[[], None] | str:
    """The TorchLens side, or the reason it cannot run."""
    try:
        import torchlens as tl
    except ImportError as err:
        return f"torchlens is not installed ({err}); pip install torchlens"

    predicate = tl.func("conv2d") | tl.func("relu")

    def run() -> None:
        with torch.no_grad():
            rec = tl.record(model, x, save=predicate)
            _measure_all(r.ram_payload for r in rec.records if r.ram_payload is not None)

    return run


def run_model(name: str, args: Any) -> list[h.Row]:
    model, x = _models.model_and_input(name, args.quick, args.device)
    label = f"{name} b{x.shape[0]} {x.shape[-1]}x{x.shape[-1]}"
    rounds = args.rounds or (2 if args.quick else 20)
    sides, (layers, nodes, close) = sides_for(model, x)
    cuda = args.device.startswith("cuda")
    times = h.interleaved(sides, rounds=rounds, warmup=1 if args.quick else 3, cuda=cuda)
    ours = times["ours"]
    rows = [
        h.row(
            CASE,
            f"{label}: ours / plain",
            h.ratios(times, "ours", "plain"),
            goal=GOAL,
            detail=f"plain {h.ms(times['plain'])}, ours {h.ms(ours)}, {len(layers)} layers",
        ),
        h.row(
            CASE,
            f"{label}: ours, compiled kernel / plain",
            h.ratios(times, "ours_compiled", "plain"),
            goal=GOAL,
            detail=f"{h.ms(times['ours_compiled'])} (capture(..., kernel='compiled'))",
        ),
        h.row(
            CASE,
            f"{label}: hooks only / plain",
            h.ratios(times, "hooks", "plain"),
            detail=f"hooks {h.ms(times['hooks'])} (no measure)",
        ),
        h.row(
            CASE,
            f"{label}: ours, capture per batch / plain",
            h.ratios(times, "ours_block", "plain"),
            detail=f"{h.ms(times['ours_block'])} (new capture block each forward)",
        ),
        h.row(
            CASE,
            f"{label}: Captum LayerActivation / ours",
            h.ratios(times, "captum", "ours"),
            goal=FASTER,
            detail=f"captum {h.ms(times['captum'])} = "
            f"{h.summary(h.ratios(times, 'captum', 'plain'))[0]:.2f}x plain",
        ),
        h.row(
            CASE,
            f"{label}: torchvision feature extractor / ours",
            h.ratios(times, "fx", "ours"),
            goal=FASTER,
            detail=f"fx {h.ms(times['fx'])} = "
            f"{h.summary(h.ratios(times, 'fx', 'plain'))[0]:.2f}x plain, {nodes} nodes",
        ),
    ]
    close()
    return rows


def torchlens_rows(name: str, args: Any) -> list[h.Row]:
    """TorchLens vs ours, interleaved with plain; run in its own process (see the module doc)."""
    model, x = _models.model_and_input(name, args.quick, args.device)
    label = f"{name} b{x.shape[0]} {x.shape[-1]}x{x.shape[-1]}"
    tl_run = torchlens_side(model, x)
    if isinstance(tl_run, str):
        return [h.skip(CASE, f"{label}: TorchLens / ours", tl_run, FASTER)]
    sides, (_, _, close) = sides_for(model, x)
    rounds = args.rounds or (2 if args.quick else 5)
    try:
        times = h.interleaved(
            {"plain": sides["plain"], "ours": sides["ours"], "torchlens": tl_run},
            rounds=rounds,
            warmup=1,
            cuda=args.device.startswith("cuda"),
        )
    finally:
        close()
    return [
        h.row(
            CASE,
            f"{label}: TorchLens record / ours",
            h.ratios(times, "torchlens", "ours"),
            goal=FASTER,
            detail=f"torchlens {h.ms(times['torchlens'])} = "
            f"{h.summary(h.ratios(times, 'torchlens', 'plain'))[0]:.1f}x plain, "
            f"{rounds} rounds",
        )
    ]


def main(argv: list[str] | None = None) -> None:
    p = h.parser(__doc__ or "")
    p.add_argument("--models", default="cnn,resnet18")
    p.add_argument(
        "--torchlens",
        action="store_true",
        help="only the TorchLens comparison (it wraps torch functions for the whole process)",
    )
    args = p.parse_args(argv)
    h.setup(args.threads)
    models = args.models.split(",")
    if args.torchlens and args.quick:
        models = models[:1]  # TorchLens' first call wraps all of torch: seconds
    for name in models:
        h.emit(torchlens_rows(name, args) if args.torchlens else run_model(name, args))


if __name__ == "__main__":
    main()
