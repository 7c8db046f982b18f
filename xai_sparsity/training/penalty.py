"""The sparsity penalty: discourage sparse activations in targeted layers (SCIENCE.md).

    L = CE(y, f(x)) + lam * sum_{l in T} w_l * mean_batch s_l(x)

``s_l`` is the perplexity sparsity of layer ``l`` (scope, variant and transform are settings),
computed inside forward hooks on the SAME forward pass as the loss (no second forward), on the
autograd path (the guarded form whose value and gradient are finite at exact zeros). Minimising
``L`` pushes the targeted activations to be DENSER: the opposite sign of L1 activity regularisation.

Usage inside a training loop (one capture stays open for the whole epoch)::

    penalty = SparsityPenalty(["features.relu4"], lam=0.3)
    with penalty.attach(model):
        for x, y in loader:
            logits = model(x)
            loss = F.cross_entropy(logits, y) + penalty.value()   # also clears the stored stats
            loss.backward()

>>> import torch, torch.nn as nn
>>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
>>> penalty = SparsityPenalty("1", lam=0.5)
>>> with penalty.attach(net):
...     _ = net(torch.rand(3, 1, 8, 8))
...     p = penalty.value()
>>> bool(p.requires_grad), 0.0 <= p.item() <= 0.5
(True, True)
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from xai_sparsity.base.errors import XaiSparsityError, check_choice
from xai_sparsity.runs.rundir import RunDir, as_run

if TYPE_CHECKING:
    from xai_sparsity.capturing.hooks import Capture, LayerSpec

SCOPES = ("layer", "channel", "spatial")
VARIANTS = ("normalized", "relative")
TRANSFORMS = ("abs", "relu")


class SparsityPenalty:
    """``lam * sum_l w_l * mean_batch s_l`` over targeted layers, from the loss's own forward.

    Args:
        layers: targeted layers: what :func:`xai_sparsity.capturing.hooks.resolve_layers` accepts
            (names, glob patterns, module types, predicates, or a list of these).
        lam: the penalty strength lambda (>= 0).
        weights: per-layer weights ``w_l``: a mapping from a layer name or glob pattern to a
            weight (the first matching key wins; unmatched layers weigh 1), or a sequence in the
            order of the resolved layers. Default: 1 for every layer.
        scope: ``"layer"``, ``"channel"`` or ``"spatial"`` (the mean runs over the batch and the
            scope's units).
        variant: ``"normalized"`` ((N - PP) / (N - 1)) or ``"relative"`` (1 - PP / N).
        transform: ``"abs"`` or ``"relu"`` (identity after a ReLU).
    """

    def __init__(
        self,
        layers: LayerSpec,
        lam: float,
        weights: Mapping[str, float] | Sequence[float] | None = None,
        scope: str = "layer",
        variant: str = "normalized",
        transform: str = "abs",
    ) -> None:
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam):
            raise XaiSparsityError(f"lam={lam!r} must be a finite number >= 0")
        if lam < 0:
            raise XaiSparsityError(
                f"lam={lam!r} must be >= 0 (the penalty discourages sparsity; a negative lambda "
                "would reward it)"
            )
        self.layers_spec = layers
        self.lam = float(lam)
        self.weights = weights
        self.scope = check_choice("scope", scope, SCOPES)
        self.variant = check_choice("variant", variant, VARIANTS)
        self.transform = check_choice("transform", transform, TRANSFORMS)
        self._cap: Capture | None = None
        self._layer_weights: dict[str, float] = {}
        self.last_tensors: dict[str, Tensor] = {}

    def __repr__(self) -> str:
        return (
            f"SparsityPenalty(layers={self.layers_spec!r}, lam={self.lam}, scope={self.scope!r}, "
            f"variant={self.variant!r}, transform={self.transform!r})"
        )

    @property
    def last_values(self) -> dict[str, float]:
        """Per-layer mean sparsity of the last :meth:`value` call (floats)."""
        return {k: float(v) for k, v in self.last_tensors.items()}

    # -- weights ---------------------------------------------------------------------------

    def _resolve_weights(self, names: Sequence[str]) -> dict[str, float]:
        w = self.weights
        if w is None:
            return dict.fromkeys(names, 1.0)
        if isinstance(w, Mapping):
            out: dict[str, float] = {}
            for name in names:
                base = name.split("#", 1)[0]
                match = next(
                    (
                        float(v)
                        for k, v in w.items()
                        if k in (name, base) or fnmatch.fnmatchcase(base, k)
                    ),
                    1.0,
                )
                out[name] = match
            unused = [
                k
                for k in w
                if not any(
                    k in (n, n.split("#", 1)[0]) or fnmatch.fnmatchcase(n.split("#", 1)[0], k)
                    for n in names
                )
            ]
            if unused:
                raise XaiSparsityError(
                    f"penalty weights name layers {unused} that are not targeted; targeted: "
                    f"{list(names)}"
                )
            return out
        seq = [float(v) for v in w]
        if len(seq) != len(names):
            raise XaiSparsityError(
                f"penalty weights has {len(seq)} values but {len(names)} layers are targeted: "
                f"{list(names)}"
            )
        return dict(zip(names, seq, strict=True))

    # -- the capture -----------------------------------------------------------------------

    @contextlib.contextmanager
    def attach(self, model: nn.Module) -> Iterator[SparsityPenalty]:
        """Open the differentiable reduce-mode capture on ``model`` for the ``with`` block."""
        from xai_sparsity.capturing.hooks import capture

        cap = capture(
            model,
            self.layers_spec,
            mode="reduce",
            measures=("perplexity",),
            scopes=(self.scope,),
            measure_options={"perplexity": {"variant": self.variant, "transform": self.transform}},
            differentiable=True,
            check_finite=True,
        )
        self._cap = cap
        try:
            with warnings.catch_warnings():
                # eval forwards outside training steps may leave no stats; that is fine
                warnings.filterwarnings("ignore", message="no forward pass of the model ran")
                with cap:
                    yield self
        finally:
            self._cap = None

    @property
    def layers(self) -> list[str]:
        """The resolved module names (available while attached)."""
        if self._cap is None:
            raise XaiSparsityError("SparsityPenalty.layers is known only inside attach(model)")
        return list(self._cap.layers)

    def clear(self) -> None:
        """Drop the stats of the forwards seen so far (e.g. of an evaluation forward)."""
        if self._cap is not None:
            self._cap.clear()

    def value(self, *, clear: bool = True, batch_fraction: float = 1.0) -> Tensor:
        """The penalty ``lam * sum_l w_l * mean_batch s_l`` of the forwards since the last clear.

        Args:
            clear: drop the stored stats afterwards (call once per training step).
            batch_fraction: multiply the per-layer sample sums by ``1 / (global batch)``
                instead of taking the local mean: under DDP pass ``local_batch / global_batch
                * world_size`` so that the averaged gradient equals the single-process one.

        Returns a 0-d tensor on the model's device carrying the autograd graph; the per-layer
        means (without ``lam`` and weights) are kept as detached tensors in ``last_tensors``
        (no device synchronisation) and as floats in ``last_values``.
        """
        cap = self._cap
        if cap is None:
            raise XaiSparsityError("SparsityPenalty.value() must be called inside attach(model)")
        stats = cap.stats
        if len(stats) == 0:
            raise XaiSparsityError(
                "SparsityPenalty.value(): no targeted layer ran since the last clear; run the "
                f"model's forward first (targeted layers: {cap.layers})"
            )
        if not self._layer_weights or set(self._layer_weights) != set(stats):
            self._layer_weights = self._resolve_weights(list(stats))
        key = f"perplexity:{self.scope}"
        total: Tensor | None = None
        values: dict[str, Tensor] = {}
        for name in stats:
            per = stats[name]
            if key not in per:
                raise XaiSparsityError(
                    f"layer {name!r} has no {self.scope!r}-scope sparsity (its output has fewer "
                    f"than 2 units in that scope); choose scope='layer' or other layers"
                )
            s = per[key]
            m = s.mean() * batch_fraction
            values[name] = s.detach().mean()
            term = m * self._layer_weights[name]
            total = term if total is None else total + term
        assert total is not None
        self.last_tensors = values
        if clear:
            cap.clear()
        return total * self.lam


def feature_map_layers(run: RunDir | str | os.PathLike[str]) -> list[str]:
    """The measured layers of a run that have spatial maps (conv activations), in column order.

    Read from the run's last array file; falls back to every measured layer when the run kept no
    arrays. Names carry no ``#k`` call suffix.
    """
    r = as_run(run)
    layers = r.layers
    epochs = r.array_epochs()
    if epochs:
        arrays = r.load_arrays(epochs[-1])
        spatial = [n for n in layers if f"spatial:{n}" in arrays]
        if spatial:
            layers = spatial
    out: list[str] = []
    for name in layers:
        base = name.split("#", 1)[0]
        if base not in out:
            out.append(base)
    return out


def auto_targets(
    baseline_run: RunDir | str | os.PathLike[str],
    *,
    measure: str = "sparsity",
    **rule: Any,
) -> list[str]:
    """The conv activations whose sparsity rose at or before the held-out-loss minimum of a
    baseline run.

    The held-out loss is the baseline's validation loss (``val_loss``, a split carved from the
    training data) when it has one, else its test loss: a study that chooses its penalty on a
    validation split never reads the test set to choose the targets. Candidates are the layers
    with spatial maps (:func:`feature_map_layers`), so "auto" chooses among the same layers as
    ``penalty_layers="all"`` and ``"deepest"``. Uses :func:`xai_sparsity.runs.analysis.analyze`
    (``rule`` overrides its settings): layers with a sustained-rise onset ``t_s <= t_L``. Names
    carry no ``#k`` suffix (a penalty on a module covers all its calls).

    Raises :class:`XaiSparsityError` when the baseline's held-out loss never turned (no ``t_L``).
    Returns an empty list when no layer's sparsity rose before ``t_L``.
    """
    from xai_sparsity.runs.analysis import analyze

    run = as_run(baseline_run)
    history = run.history()
    which = "validation"
    if "val_loss" in history.columns and history["val_loss"].notna().any():
        history = history.assign(test_loss=history["val_loss"])
    else:
        which = "test"
    result = analyze(history, measure=measure, **rule)
    if not result.turned or result.t_L is None:
        raise XaiSparsityError(
            f"automatic targeting needs a baseline whose {which} loss turned; {baseline_run!s} "
            f"did not (minimum at epoch {result.t_L}, rise {result.rise:+.1%}). Train the "
            "baseline longer or name the layers to penalise."
        )
    candidates = set(feature_map_layers(run))
    chosen: list[str] = []
    for name in result.layers:
        t = result.t_s.get(name)
        base = name.split("#", 1)[0]
        if t is not None and t <= result.t_L and base in candidates and base not in chosen:
            chosen.append(base)
    return chosen
