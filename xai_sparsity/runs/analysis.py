"""Overfitting onset, run labels, the sparsity lead and the early-warning rules
(docs/definitions.md; SCIENCE.md, "Overfitting onset and the sparsity lead").

The project's operationalisation of the papers' claim 1:

* ``t_L``: the epoch of the minimum of the smoothed test loss. The run "turned" (overfits) when the
  smoothed test loss at the last epoch is at least ``min_rel_rise`` above that minimum and the
  minimum lies at least ``patience`` epochs before the end.
* Run labels (:func:`label_run`): "overfits", "clean" (trained to convergence, the test loss never
  turned) or "undetermined" (excluded from scoring).
* ``t_s,l``: where layer ``l``'s first sustained sparsity rise (at or after ``warmup``) starts. A rise
  is confirmed at the first epoch where the causally EMA-smoothed sparsity has increased over the
  last ``patience`` epochs and lies at least ``min_rise`` above its running minimum since
  ``warmup``; ``t_s`` is the epoch of that running minimum. Only epochs up to the confirmation are
  read, so smoothing cannot fake a lead by borrowing from later epochs.
* ``lead_l = t_L - t_s,l`` (positive: sparsity rose before the test loss turned); only for a run
  whose test loss turned.
* The early warning (:class:`EarlyWarning`) is causal and never reads the test loss. Its default
  rule, ``"gated_rise"``, watches the layers only after the run's own training loss has levelled
  off and fires when the RAW sparsity of ``min_layers`` layers stayed ``min_rise`` above its value
  at that gate epoch for ``patience`` epochs (:func:`gated_rise_epoch`, :func:`gated_rise_score`).
  The v1 rule, ``"ema_rise"`` (the t_s rise in ``min_layers`` layers), stays available for
  comparison; it fires during the learning phase.

``t_L`` uses zero-phase smoothing (the EMA run forwards, then backwards), which does not shift the
minimum; the sparsity side is causal throughout.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from xai_sparsity.base.errors import XaiSparsityError
from xai_sparsity.runs.rundir import RunDir, as_run

RULES = ("gated_rise", "ema_rise")
"""The early-warning rules: the repaired default and the v1 rule (kept for comparison)."""

DEFAULT_RULE: dict[str, Any] = {
    "rule": "gated_rise",
    "alpha": 0.3,
    "patience": 3,
    "min_rise": 0.02,
    "min_rel_rise": 0.05,
    "warmup": 2,
    "min_layers": 0.5,
    "min_train_acc": None,
    "gate_window": 3,
    "gate_tol": 0.05,
}
"""Default settings of the onset, lead and early-warning definitions (chosen a priori, see
docs/definitions.md; ``warmup`` is read by the ``"ema_rise"`` rule and t_s only, ``gate_window``
and ``gate_tol`` by the ``"gated_rise"`` rule only)."""


def _check_alpha(alpha: float) -> float:
    if not (0.0 < float(alpha) <= 1.0):
        raise XaiSparsityError(f"alpha={alpha!r} must lie in (0, 1]")
    return float(alpha)


def ema(values: Iterable[float], alpha: float = 0.3) -> np.ndarray:
    """Causal exponential moving average; NaN entries carry the previous value.

    >>> ema([0.0, 1.0, 1.0], alpha=0.5).tolist()
    [0.0, 0.5, 0.75]
    """
    alpha = _check_alpha(alpha)
    x = np.asarray(list(values), dtype=float)
    out = np.empty_like(x)
    state = math.nan
    for i, v in enumerate(x):
        if math.isnan(state):
            state = v
        elif not math.isnan(v):
            state = alpha * v + (1.0 - alpha) * state
        out[i] = state
    return out


def smooth(values: Iterable[float], alpha: float = 0.3) -> np.ndarray:
    """Zero-phase smoothing: the EMA run forwards, then backwards (no epoch shift)."""
    forward = ema(values, alpha)
    return ema(forward[::-1], alpha)[::-1]


@dataclass(frozen=True)
class Onset:
    """Where the smoothed test loss has its minimum and whether it turned afterwards."""

    t_L: int | None
    turned: bool
    rise: float


def _epochs_of(values: Sized, epochs: Sequence[int] | None) -> np.ndarray:
    if epochs is None:
        return np.arange(1, len(values) + 1)
    e = np.asarray(list(epochs))
    if len(e) != len(values):
        raise XaiSparsityError(f"got {len(values)} values but {len(e)} epochs")
    return e


def overfitting_onset(
    test_loss: Sequence[float],
    epochs: Sequence[int] | None = None,
    *,
    alpha: float = DEFAULT_RULE["alpha"],
    min_rel_rise: float = DEFAULT_RULE["min_rel_rise"],
    patience: int = DEFAULT_RULE["patience"],
) -> Onset:
    """``t_L`` (epoch of the smoothed test-loss minimum), whether it turned, and the relative rise
    of the smoothed loss from that minimum to the last epoch.

    >>> overfitting_onset([3, 2, 1, 1.2, 1.5, 2, 2.5, 3], alpha=1.0)
    Onset(t_L=3, turned=True, rise=2.0)
    """
    loss = np.asarray(list(test_loss), dtype=float)
    ep = _epochs_of(loss, epochs)
    valid = ~np.isnan(loss)
    if not valid.any():
        return Onset(None, False, 0.0)
    s = smooth(loss[valid], alpha)
    ep = ep[valid]
    i = int(np.argmin(s))
    rise = float(s[-1] / s[i] - 1.0) if s[i] > 0 else float(s[-1] - s[i])
    turned = (len(s) - 1 - i) >= patience and rise >= min_rel_rise
    return Onset(int(ep[i]), bool(turned), rise)


LABEL_SETTINGS: dict[str, Any] = {
    "alpha": DEFAULT_RULE["alpha"],
    "patience": DEFAULT_RULE["patience"],
    "min_rel_rise": DEFAULT_RULE["min_rel_rise"],
    "flat_tol": 0.02,
    "train_tol": 0.05,
    "tail": 0.25,
}
"""Default settings of :func:`label_run` (chosen a priori, see docs/definitions.md "Run labels")."""

LABELS = ("overfits", "clean", "undetermined")


@dataclass(frozen=True)
class RunLabel:
    """The label of one run (see :func:`label_run`).

    ``label`` is one of ``LABELS``; ``t_L`` the epoch of the smoothed test-loss minimum; ``rise``
    the smoothed test loss at the last epoch relative to that minimum (``0.07`` = 7 % above);
    ``converged`` whether the smoothed training loss levelled off over the last quarter;
    ``still_learning`` whether the smoothed test loss still fell over the last quarter;
    ``peak_rise`` the largest rise of the smoothed test loss above its running minimum (any turn,
    also one that came back down); ``reason`` one sentence saying why.
    """

    label: str
    t_L: int | None
    rise: float
    converged: bool
    still_learning: bool
    reason: str
    peak_rise: float = 0.0


def _tail_start(n: int, tail: float) -> int:
    """Index of the first value of the last ``tail`` share of ``n`` values (at least 2 values)."""
    return max(0, n - max(2, math.ceil(tail * n)))


def _train_levelled(history: pd.DataFrame, alpha: float, tol: float, tail: float) -> bool:
    """Whether the smoothed training loss changed by at most ``tol`` times its whole fall over the
    run (first to lowest value) across the last ``tail`` of the epochs."""
    if "train_loss" not in history.columns:
        return False
    loss = history["train_loss"].to_numpy(dtype=float)
    loss = loss[~np.isnan(loss)]
    if len(loss) < 4:
        return False
    s = smooth(loss, alpha)
    start = _tail_start(len(s), tail)
    fall = s[0] - float(s.min())
    change = abs(s[start] - s[-1])
    return bool(change <= tol * fall) if fall > 0 else bool(change == 0.0)


def label_run(
    history: pd.DataFrame,
    *,
    alpha: float = LABEL_SETTINGS["alpha"],
    patience: int = LABEL_SETTINGS["patience"],
    min_rel_rise: float = LABEL_SETTINGS["min_rel_rise"],
    flat_tol: float = LABEL_SETTINGS["flat_tol"],
    train_tol: float = LABEL_SETTINGS["train_tol"],
    tail: float = LABEL_SETTINGS["tail"],
) -> RunLabel:
    """Label a run "overfits", "clean" or "undetermined" from its history (docs/definitions.md,
    "Run labels"); it reads ``epoch``, ``test_loss`` and ``train_loss``.

    * overfits: the smoothed test loss has its minimum at ``t_L`` at least ``patience`` epochs
      before the end and ends at least ``min_rel_rise`` above it (``overfitting_onset``'s "turned");
    * clean: trained to convergence (the smoothed training loss changed by at most ``train_tol`` of
      its whole fall over the last ``tail`` of the epochs) and the test loss never turned (it never rose
      more than ``flat_tol`` above its running minimum) nor still fell (it fell by at most
      ``flat_tol`` over the last ``tail`` of the epochs);
    * undetermined: everything else (still learning, a borderline rise); excluded from scoring.

    >>> import pandas as pd
    >>> h = pd.DataFrame({"epoch": range(1, 9), "train_loss": [2, 1, .5, .3, .2, .2, .2, .2],
    ...                   "test_loss": [3, 2, 1, 1.2, 1.5, 2, 2.5, 3]})
    >>> label_run(h, alpha=1.0).label
    'overfits'
    """
    if "test_loss" not in history.columns or "epoch" not in history.columns:
        raise XaiSparsityError(
            f"label_run needs 'epoch' and 'test_loss' columns; got {sorted(history.columns)}"
        )
    onset = overfitting_onset(
        history["test_loss"].tolist(),
        history["epoch"].astype(int).tolist(),
        alpha=alpha,
        min_rel_rise=min_rel_rise,
        patience=patience,
    )
    loss = history["test_loss"].to_numpy(dtype=float)
    s = smooth(loss[~np.isnan(loss)], alpha) if onset.t_L is not None else np.array([])
    converged = _train_levelled(history, alpha, train_tol, tail)
    if len(s) < 4:
        return RunLabel(
            "undetermined",
            onset.t_L,
            onset.rise,
            converged,
            False,
            f"only {len(s)} epochs with a test loss: too few to label",
            0.0,
        )
    running_low = np.minimum.accumulate(s)
    turns = np.where(
        running_low > 0, s / np.where(running_low > 0, running_low, 1.0) - 1.0, s - running_low
    )
    peak_rise = float(turns.max())
    start = _tail_start(len(s), tail)
    tail_fall = float(1.0 - s[-1] / s[start]) if s[start] > 0 else float(s[start] - s[-1])
    still_learning = tail_fall > flat_tol
    label, reason = _label_reason(
        onset, peak_rise, tail_fall, converged, min_rel_rise, flat_tol, patience
    )
    return RunLabel(label, onset.t_L, onset.rise, converged, still_learning, reason, peak_rise)


def _label_reason(
    onset: Onset,
    peak_rise: float,
    tail_fall: float,
    converged: bool,
    min_rel_rise: float,
    flat_tol: float,
    patience: int,
) -> tuple[str, str]:
    """The label and its one-sentence reason (see :func:`label_run`)."""
    if onset.turned:
        return "overfits", (
            f"the test loss turned: minimum at epoch {onset.t_L}, {onset.rise:+.1%} by the end"
        )
    if peak_rise >= flat_tol:
        return "undetermined", (
            f"borderline: the test loss rose up to {peak_rise:+.1%} above its running minimum "
            f"(ending {onset.rise:+.1%} above its minimum at epoch {onset.t_L}; overfits needs "
            f"{min_rel_rise:+.0%} at least {patience} epochs after the minimum, clean under "
            f"{flat_tol:+.0%})"
        )
    if tail_fall > flat_tol:
        return "undetermined", (
            f"still learning: the test loss fell {tail_fall:.1%} over the last quarter of the epochs"
        )
    if not converged:
        return "undetermined", (
            "not trained to convergence: the training loss had not levelled off over the last "
            "quarter of the epochs"
        )
    return "clean", (
        f"trained to convergence and the test loss never turned (at most {peak_rise:+.1%} above "
        f"its running minimum; minimum at epoch {onset.t_L})"
    )


class RiseDetector:
    """Causal detector of a sustained rise in one series: the one rise mechanism behind ``t_s``,
    both early-warning rules and the study's per-run scores.

    Values are smoothed by a causal EMA (``alpha``; 1.0 = raw values; NaN values are skipped).
    Two baselines:

    * ``"running_min"`` (t_s and the ``"ema_rise"`` rule): at an epoch ``>= warmup`` whose last
      ``patience`` smoothed steps all increased, the rise is the smoothed value minus its running
      minimum since ``warmup``;
    * ``"fixed"`` (the ``"gated_rise"`` rule): the first value at or after ``warmup`` is the
      baseline; at each later epoch the rise is the smallest excess over the baseline among the
      last ``patience`` values after it (the series stayed at least that far above the baseline
      for ``patience`` consecutive measured epochs).

    The rise is confirmed when it reaches ``min_rise``; ``onset_epoch`` is where it began (the
    running minimum's epoch, or the first epoch of the ``patience`` window).

    >>> det = RiseDetector(alpha=1.0, patience=2, min_rise=0.05, warmup=0)
    >>> [det.update(e, v) for e, v in enumerate([0.5, 0.5, 0.53, 0.57], start=1)]
    [False, False, False, True]
    >>> det.confirmed_epoch, det.onset_epoch
    (4, 2)
    >>> fixed = RiseDetector(1.0, patience=2, min_rise=0.05, warmup=3, baseline="fixed")
    >>> [fixed.update(e, v) for e, v in enumerate([0.2, 0.5, 0.5, 0.56, 0.55, 0.6], start=1)]
    [False, False, False, False, True, False]
    """

    def __init__(
        self,
        alpha: float,
        patience: int,
        min_rise: float,
        warmup: int,
        baseline: str = "running_min",
    ) -> None:
        if baseline not in ("running_min", "fixed"):
            raise XaiSparsityError(f"baseline={baseline!r} is not one of 'running_min', 'fixed'")
        self.alpha = _check_alpha(alpha)
        self.patience, self.min_rise, self.warmup = patience, min_rise, warmup
        self.baseline = baseline
        self.smoothed: list[float] = []
        self.low = math.inf
        self.low_epoch: int | None = None
        self.above: list[tuple[int, float]] = []
        self.confirmed_epoch: int | None = None
        self.onset_epoch: int | None = None

    @property
    def baseline_value(self) -> float | None:
        """The fixed baseline (``baseline="fixed"``, once set), else None."""
        return self.low if self.baseline == "fixed" and self.low_epoch is not None else None

    def rise(self, epoch: int, value: float) -> float | None:
        """Add one value; the qualifying rise at this epoch, or None where none qualifies (NaN
        value, before ``warmup``, not rising or not ``patience`` values after the baseline yet,
        or already confirmed)."""
        if math.isnan(value):
            return None
        prev = self.smoothed[-1] if self.smoothed else math.nan
        s = value if math.isnan(prev) else self.alpha * value + (1 - self.alpha) * prev
        self.smoothed.append(s)
        if epoch < self.warmup or self.confirmed_epoch is not None:
            return None
        if self.baseline == "fixed":
            if self.low_epoch is None:
                self.low, self.low_epoch = s, int(epoch)
                return None
            self.above.append((int(epoch), s - self.low))
            window = self.above[-self.patience :]
            return min(r for _, r in window) if len(window) == self.patience else None
        if s <= self.low:
            self.low, self.low_epoch = s, int(epoch)
        recent = self.smoothed[-(self.patience + 1) :]
        rising = len(recent) == self.patience + 1 and all(
            b > a for a, b in itertools.pairwise(recent)
        )
        return s - self.low if rising else None

    def update(self, epoch: int, value: float) -> bool:
        """Add one value; True on the epoch the rise is confirmed."""
        rise = self.rise(epoch, value)
        if rise is not None and rise >= self.min_rise:
            self.confirmed_epoch = int(epoch)
            if self.baseline == "fixed":
                self.onset_epoch = self.above[-self.patience][0]
            else:
                self.onset_epoch = self.low_epoch
            return True
        return False


class LevelOffGate:
    """Causal test of "the training loss has levelled off": the gate of the ``"gated_rise"`` rule.

    The training loss is smoothed by a causal EMA (``alpha``); the gate opens at the first epoch
    where the smoothed loss changed by at most ``tol`` times its fall so far (its first value
    minus its lowest value up to now) over the last ``window`` epochs, and stays open. It never
    opens while the loss has not fallen at all.

    >>> gate = LevelOffGate(alpha=1.0, window=2, tol=0.05)
    >>> [gate.update(e, v) for e, v in enumerate([2.0, 1.0, 0.5, 0.45, 0.44, 0.44], start=1)]
    [False, False, False, False, True, True]
    >>> gate.open_epoch  # |0.50 - 0.44| <= 0.05 * (2.0 - 0.44)
    5
    """

    def __init__(self, alpha: float, window: int, tol: float) -> None:
        if int(window) < 1:
            raise XaiSparsityError(f"gate_window={window!r} must be at least 1")
        if float(tol) < 0:
            raise XaiSparsityError(f"gate_tol={tol!r} must not be negative")
        self.alpha, self.window, self.tol = _check_alpha(alpha), int(window), float(tol)
        self.smoothed: list[float] = []
        self.open_epoch: int | None = None

    @property
    def is_open(self) -> bool:
        return self.open_epoch is not None

    def update(self, epoch: int, train_loss: float) -> bool:
        """Add one epoch's training loss (NaN is skipped); True while the gate is open."""
        if self.is_open:
            return True
        if math.isnan(train_loss):
            return False
        prev = self.smoothed[-1] if self.smoothed else math.nan
        s = train_loss if math.isnan(prev) else self.alpha * train_loss + (1 - self.alpha) * prev
        self.smoothed.append(s)
        if len(self.smoothed) <= self.window:
            return False
        fall = self.smoothed[0] - min(self.smoothed)
        change = abs(self.smoothed[-1 - self.window] - s)
        if fall > 0 and change <= self.tol * fall:
            self.open_epoch = int(epoch)
        return self.is_open


def levelled_off_epoch(
    train_loss: Sequence[float] | np.ndarray,
    epochs: Sequence[int] | None = None,
    *,
    alpha: float = DEFAULT_RULE["alpha"],
    gate_window: int = DEFAULT_RULE["gate_window"],
    gate_tol: float = DEFAULT_RULE["gate_tol"],
) -> int | None:
    """The first epoch at which the training loss has levelled off (:class:`LevelOffGate`), or
    None if it never does.

    >>> levelled_off_epoch([2.0, 1.0, 0.5, 0.45, 0.44, 0.44], alpha=1.0, gate_window=2)
    5
    """
    x = np.asarray(list(train_loss), dtype=float)
    gate = LevelOffGate(alpha, gate_window, gate_tol)
    for e, v in zip(_epochs_of(x, epochs), x, strict=True):
        if gate.update(int(e), float(v)):
            return gate.open_epoch
    return None


def sustained_rise_onset(
    series: Sequence[float],
    epochs: Sequence[int] | None = None,
    *,
    alpha: float = DEFAULT_RULE["alpha"],
    patience: int = DEFAULT_RULE["patience"],
    min_rise: float = DEFAULT_RULE["min_rise"],
    warmup: int = DEFAULT_RULE["warmup"],
) -> int | None:
    """``t_s``: where the first sustained rise (at or after ``warmup``) starts; ``None`` if never.

    The rise is confirmed causally (the EMA-smoothed series increased over the last ``patience``
    epochs and lies ``min_rise`` above its running minimum); ``t_s`` is the epoch of that running
    minimum, i.e. where the rise began. Only epochs up to the confirmation are used, so smoothing
    never moves ``t_s`` earlier than the data show.

    >>> sustained_rise_onset([0.5, 0.5, 0.5, 0.55, 0.6, 0.65, 0.7, 0.7], alpha=1.0, warmup=0)
    3
    """
    x = np.asarray(list(series), dtype=float)
    ep = _epochs_of(x, epochs)
    det = RiseDetector(alpha, int(patience), float(min_rise), int(warmup))
    for e, v in zip(ep, x, strict=True):
        if det.update(int(e), float(v)):
            return det.onset_epoch
    return None


def _resolve_min_layers(min_layers: float, n: int) -> int:
    if min_layers <= 0:
        raise XaiSparsityError(f"min_layers={min_layers!r} must be positive")
    if isinstance(min_layers, float) and min_layers <= 1.0:
        return max(1, math.ceil(min_layers * n))
    return int(min_layers)


class EarlyWarning:
    """The live, label-free early-warning rule. Feed it one epoch at a time; it never reads the
    test loss nor test labels.

    Rules (docs/definitions.md, "The early warning"):

    * ``"gated_rise"`` (default): wait until the run's own training loss has levelled off
      (:class:`LevelOffGate`: ``alpha``, ``gate_window``, ``gate_tol``); the raw sparsity of each
      watched layer at that gate epoch is its baseline; a layer is confirmed once its raw sparsity
      stayed at least ``min_rise`` above its baseline for ``patience`` consecutive epochs; the
      warning fires when ``min_layers`` layers are confirmed. Needs ``train_loss``.
    * ``"ema_rise"`` (the v1 rule, for comparison): a layer is confirmed once its EMA-smoothed
      (``alpha``) sparsity rose for ``patience`` epochs to at least ``min_rise`` above its running
      minimum since ``warmup``; it fires during the learning phase too.

    Both rules optionally also wait for the training accuracy to reach ``min_train_acc``.

    Args:
        layers: layers to watch; ``None`` watches every layer it is given.
        rule: ``"gated_rise"`` or ``"ema_rise"``.
        callback: called once, ``callback(epoch, info)``, when the warning fires.
        alpha, patience, min_rise, warmup, min_layers, min_train_acc, gate_window, gate_tol: the
            rule's settings (defaults: ``DEFAULT_RULE``).

    >>> w = EarlyWarning(alpha=1.0, patience=2, min_rise=0.05, min_layers=1, gate_window=1,
    ...                  gate_tol=0.1)
    >>> rows = [(1.0, 0.5), (0.2, 0.55), (0.19, 0.5), (0.19, 0.56), (0.19, 0.57)]
    >>> [w.update(e, {"relu": s}, train_loss=t) for e, (t, s) in enumerate(rows, start=1)]
    [False, False, False, False, True]
    >>> w.gate_epoch, w.describe()  # doctest: +NORMALIZE_WHITESPACE
    (3, 'the sparsity of 1 of 1 watched layers (relu) stayed at least 0.05 above its value at
    epoch 3 for 2 epochs after the training loss levelled off at epoch 3')
    """

    def __init__(
        self,
        layers: Sequence[str] | None = None,
        *,
        rule: str = DEFAULT_RULE["rule"],
        alpha: float = DEFAULT_RULE["alpha"],
        patience: int = DEFAULT_RULE["patience"],
        min_rise: float = DEFAULT_RULE["min_rise"],
        warmup: int = DEFAULT_RULE["warmup"],
        min_layers: float = DEFAULT_RULE["min_layers"],
        min_train_acc: float | None = DEFAULT_RULE["min_train_acc"],
        gate_window: int = DEFAULT_RULE["gate_window"],
        gate_tol: float = DEFAULT_RULE["gate_tol"],
        callback: Callable[[int, dict[str, Any]], Any] | None = None,
    ) -> None:
        if rule not in RULES:
            raise XaiSparsityError(f"rule={rule!r} is not one of {', '.join(map(repr, RULES))}")
        if int(patience) < 1:
            raise XaiSparsityError(f"patience={patience!r} must be at least 1")
        self.rule = rule
        self.layers = list(layers) if layers is not None else None
        self.alpha = _check_alpha(alpha)
        self.patience = int(patience)
        self.min_rise = float(min_rise)
        self.warmup = int(warmup)
        self.min_layers = min_layers
        self.min_train_acc = min_train_acc
        self.callback = callback
        self.gate = LevelOffGate(alpha, gate_window, gate_tol) if rule == "gated_rise" else None
        self.gate_epoch: int | None = None
        self.fired_epoch: int | None = None
        self.watched: list[str] = []
        self._detectors: dict[str, RiseDetector] = {}
        self._rows_without_loss = 0

    @property
    def confirmed(self) -> dict[str, int]:
        """Layers whose rise is confirmed, with the epoch of confirmation."""
        return {
            n: d.confirmed_epoch
            for n, d in self._detectors.items()
            if d.confirmed_epoch is not None
        }

    @property
    def fired(self) -> bool:
        return self.fired_epoch is not None

    def _detector(self, name: str, epoch: int) -> RiseDetector:
        det = self._detectors.get(name)
        if det is None:
            if self.rule == "gated_rise":  # raw values, baseline = the value at the gate
                det = RiseDetector(1.0, self.patience, self.min_rise, epoch, baseline="fixed")
            else:
                det = RiseDetector(self.alpha, self.patience, self.min_rise, self.warmup)
            self._detectors[name] = det
        return det

    def _gate_open(self, epoch: int, train_loss: float | None) -> bool:
        """Feed the gate (``"gated_rise"``); whether layers are watched from this epoch on."""
        if self.gate is None:
            return True
        if train_loss is None:
            self._rows_without_loss += 1
            if not self.gate.smoothed and self._rows_without_loss == 2:
                import warnings

                warnings.warn(
                    "EarlyWarning(rule='gated_rise') needs the training loss (update(..., "
                    "train_loss=...) or a 'train_loss' column); without it the warning cannot "
                    "fire. Pass it, or use rule='ema_rise'.",
                    stacklevel=3,
                )
            return self.gate_epoch is not None
        if self.gate.update(int(epoch), float(train_loss)) and self.gate_epoch is None:
            self.gate_epoch = int(epoch)
        return self.gate_epoch is not None

    def update(
        self,
        epoch: int,
        sparsity: Mapping[str, float],
        train_acc: float | None = None,
        *,
        train_loss: float | None = None,
    ) -> bool:
        """Add epoch ``epoch``'s per-layer sparsity (and, for ``"gated_rise"``, its training
        loss); True on the epoch the warning fires."""
        watched = self.layers if self.layers is not None else list(sparsity)
        missing = [name for name in watched if name not in sparsity]
        if missing:
            raise XaiSparsityError(
                f"EarlyWarning watches layers {missing} but epoch {epoch} only has {sorted(sparsity)}"
            )
        self.watched = list(watched)
        if not self._gate_open(epoch, train_loss):
            return False
        for name in watched:
            self._detector(name, int(epoch)).update(int(epoch), float(sparsity[name]))
        if self.fired:
            return False
        need = _resolve_min_layers(self.min_layers, len(watched))
        acc_ok = self.min_train_acc is None or (
            train_acc is not None and train_acc >= self.min_train_acc
        )
        if len([n for n in watched if n in self.confirmed]) >= need and acc_ok:
            self.fired_epoch = int(epoch)
            if self.callback is not None:
                info = {
                    "layers": dict(self.confirmed),
                    "needed": need,
                    "gate_epoch": self.gate_epoch,
                }
                self.callback(int(epoch), info)
            return True
        return False

    def describe(self) -> str:
        """What was measured when the warning fired, in one clause ("" before it fires)."""
        if not self.fired:
            return ""
        layers = [n for n in self.watched if n in self.confirmed]
        names = ", ".join(layers)
        of = f"{len(layers)} of {len(self.watched)} watched layers ({names})"
        if self.rule == "gated_rise":
            return (
                f"the sparsity of {of} stayed at least {self.min_rise:.3g} above its value at "
                f"epoch {self.gate_epoch} for {self.patience} epochs after the training loss "
                f"levelled off at epoch {self.gate_epoch}"
            )
        return (
            f"the smoothed sparsity of {of} rose for {self.patience} epochs to at least "
            f"{self.min_rise:.3g} above its running minimum"
        )

    def __call__(self, row: Mapping[str, Any]) -> bool:
        """Trainer-callback form: take a history row dict (``sparsity:<layer>`` columns,
        ``train_loss`` and ``train_acc`` when present)."""
        values = {k.split(":", 1)[1]: v for k, v in row.items() if k.startswith("sparsity:")}
        acc, loss = _finite_or_none(row.get("train_acc")), _finite_or_none(row.get("train_loss"))
        return self.update(int(row["epoch"]), values, acc, train_loss=loss)


def _finite_or_none(value: Any) -> float | None:
    """``float(value)``, or None for None and NaN."""
    if value is None:
        return None
    v = float(value)
    return None if math.isnan(v) else v


@dataclass
class Analysis:
    """The overfitting analysis of one run. A run whose test loss did not turn has no lead:
    ``lead`` is None for every layer and ``warning_lead`` is None."""

    t_L: int | None
    turned: bool
    rise: float
    t_s: dict[str, int | None]
    lead: dict[str, int | None]
    warning_epoch: int | None
    layers: list[str]
    measure: str = "sparsity"
    settings: dict[str, Any] = field(default_factory=dict)
    gate_epoch: int | None = None
    warning_text: str = ""

    @property
    def warning_lead(self) -> int | None:
        """``t_L`` minus the epoch the early warning fired (None if either is missing or the test
        loss did not turn)."""
        if not self.turned or self.t_L is None or self.warning_epoch is None:
            return None
        return self.t_L - self.warning_epoch

    def table(self) -> pd.DataFrame:
        """One row per layer: t_s and lead."""
        return pd.DataFrame(
            {
                "layer": self.layers,
                "t_s": [self.t_s[n] for n in self.layers],
                "lead": [self.lead[n] for n in self.layers],
            }
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "t_L": self.t_L,
            "turned": self.turned,
            "rise": self.rise,
            "t_s": self.t_s,
            "lead": self.lead,
            "warning_epoch": self.warning_epoch,
            "warning_lead": self.warning_lead,
            "gate_epoch": self.gate_epoch,
            "warning_text": self.warning_text,
            "measure": self.measure,
            "settings": self.settings,
        }

    def __str__(self) -> str:
        return "\n".join(analysis_lines(self.to_dict()))


def analysis_lines(a: Mapping[str, Any]) -> list[str]:
    """The printout of an analysis (``Analysis.to_dict()`` or the ``analysis.json`` written from
    it): no lead for a run whose test loss did not turn."""
    turned = bool(a.get("turned"))
    rise = a.get("rise")
    rise_text = f" (rise {rise:+.1%})" if isinstance(rise, (int, float)) else ""
    if turned:
        lines = [f"test loss: minimum at epoch {a.get('t_L')}, turned{rise_text}"]
    else:
        lines = [
            f"test loss: minimum at epoch {a.get('t_L')}{rise_text}; the test loss did not "
            "turn, so there is no lead"
        ]
    settings = a.get("settings") or {}
    rule = settings.get("rule", DEFAULT_RULE["rule"])
    warn = a.get("warning_epoch")
    if warn is None:
        lines.append(f"early warning ({rule}): did not fire")
    else:
        lead = f"lead {a.get('warning_lead')}" if turned else "no lead"
        text = a.get("warning_text") or ""
        lines.append(
            f"early warning ({rule}): epoch {warn} ({lead})" + (f": {text}" if text else "")
        )
    t_s, leads = a.get("t_s") or {}, a.get("lead") or {}
    if turned:
        lines.append("layer  t_s  lead:")
        lines += [f"  {n}: t_s={t_s[n]} lead={leads.get(n)}" for n in t_s]
    else:
        lines.append("layer  t_s (no lead: the test loss did not turn):")
        lines += [f"  {n}: t_s={t_s[n]}" for n in t_s]
    return lines


def analyze(
    run: RunDir | str | os.PathLike[str] | pd.DataFrame,
    layers: Sequence[str] | None = None,
    *,
    measure: str = "sparsity",
    **rule: Any,
) -> Analysis:
    """Analyse a run directory or a history DataFrame: t_L, t_s and lead per layer, and the epoch
    the early warning would have fired live. A run whose test loss did not turn has no lead.

    Args:
        run: a run directory (path or RunDir) or a history DataFrame.
        layers: layers to analyse (default: every ``<measure>:<layer>`` column).
        measure: the column prefix, e.g. "sparsity", "hoyer", "zero_fraction".
        **rule: overrides of ``DEFAULT_RULE`` (e.g. ``rule="ema_rise"`` for the v1 rule).
    """
    settings = _rule_settings(rule)
    df = run if isinstance(run, pd.DataFrame) else as_run(run).history()
    if df.empty:
        raise XaiSparsityError("the run has no history rows to analyse")
    chosen = _measure_layers(df, measure, layers)
    if "test_loss" not in df.columns:
        raise XaiSparsityError("the history has no 'test_loss' column")
    epochs = df["epoch"].astype(int).tolist()
    onset = overfitting_onset(
        df["test_loss"].tolist(),
        epochs,
        alpha=settings["alpha"],
        min_rel_rise=settings["min_rel_rise"],
        patience=settings["patience"],
    )
    prefix = f"{measure}:"
    t_s: dict[str, int | None] = {}
    lead: dict[str, int | None] = {}
    for name in chosen:
        t = sustained_rise_onset(
            df[prefix + name].tolist(),
            epochs,
            alpha=settings["alpha"],
            patience=settings["patience"],
            min_rise=settings["min_rise"],
            warmup=settings["warmup"],
        )
        t_s[name] = t
        has_lead = t is not None and onset.t_L is not None and onset.turned
        lead[name] = onset.t_L - t if has_lead and onset.t_L is not None and t is not None else None
    warning = replay_warning(df, chosen, measure=measure, **settings)
    return Analysis(
        t_L=onset.t_L,
        turned=onset.turned,
        rise=onset.rise,
        t_s=t_s,
        lead=lead,
        warning_epoch=warning.fired_epoch,
        layers=chosen,
        measure=measure,
        settings=settings,
        gate_epoch=warning.gate_epoch,
        warning_text=warning.describe(),
    )


def _rule_settings(rule: Mapping[str, Any]) -> dict[str, Any]:
    """``DEFAULT_RULE`` with the overrides in ``rule`` (unknown names are an error)."""
    unknown = sorted(set(rule) - set(DEFAULT_RULE))
    if unknown:
        raise XaiSparsityError(
            f"unknown analysis setting(s) {unknown}; valid settings: {sorted(DEFAULT_RULE)}"
        )
    return {**DEFAULT_RULE, **rule}


def _measure_layers(df: pd.DataFrame, measure: str, layers: Sequence[str] | None) -> list[str]:
    """The layers to analyse: ``layers`` (checked) or every ``<measure>:<layer>`` column."""
    prefix = f"{measure}:"
    available = [c[len(prefix) :] for c in df.columns if c.startswith(prefix)]
    if not available:
        prefixes = sorted({c.split(":", 1)[0] for c in df.columns if ":" in c})
        raise XaiSparsityError(
            f"measure {measure!r} has no columns in this history; measures: {prefixes}"
        )
    chosen = list(layers) if layers is not None else available
    bad = [n for n in chosen if n not in available]
    if bad:
        raise XaiSparsityError(f"layer(s) {bad} have no {measure!r} column; layers: {available}")
    return chosen


def replay_warning(
    history: pd.DataFrame,
    layers: Sequence[str] | None = None,
    *,
    measure: str = "sparsity",
    **rule: Any,
) -> EarlyWarning:
    """The early warning (``DEFAULT_RULE`` with the overrides in ``rule``) fed the history row by
    row, as it would have run live; it reads ``<measure>:<layer>``, ``train_loss`` and
    ``train_acc``, never the test loss. Read ``.fired_epoch``, ``.gate_epoch``, ``.describe()``."""
    settings = _rule_settings(rule)
    chosen = _measure_layers(history, measure, layers)
    kwargs = {k: v for k, v in settings.items() if k != "min_rel_rise"}
    warning = EarlyWarning(chosen, **kwargs)
    prefix = f"{measure}:"
    columns = {n: history[prefix + n].to_numpy(dtype=float) for n in chosen}
    n_rows = len(history)
    acc = history["train_acc"].tolist() if "train_acc" in history.columns else [None] * n_rows
    loss = history["train_loss"].tolist() if "train_loss" in history.columns else [None] * n_rows
    for i, epoch in enumerate(history["epoch"].astype(int).tolist()):
        values = {n: float(v[i]) for n, v in columns.items()}
        warning.update(epoch, values, _finite_or_none(acc[i]), train_loss=_finite_or_none(loss[i]))
    return warning


def gated_rise_epoch(
    history: pd.DataFrame,
    layers: Sequence[str] | None = None,
    *,
    measure: str = "sparsity",
    **settings: Any,
) -> int | None:
    """The epoch the repaired rule (``rule="gated_rise"``, see :class:`EarlyWarning`) fires on a
    history, or None. ``settings`` override ``DEFAULT_RULE`` (e.g. ``min_rise=0.05``).

    >>> h = pd.DataFrame({"epoch": [1, 2, 3, 4, 5], "train_loss": [1.0, 0.2, 0.19, 0.19, 0.19],
    ...                   "sparsity:relu": [0.5, 0.55, 0.5, 0.56, 0.57]})
    >>> gated_rise_epoch(h, alpha=1.0, patience=2, min_rise=0.05, gate_window=1, gate_tol=0.1)
    5
    """
    return replay_warning(
        history, layers, measure=measure, **settings, rule="gated_rise"
    ).fired_epoch


def gated_rise_score(
    history: pd.DataFrame,
    layers: Sequence[str] | None = None,
    *,
    measure: str = "sparsity",
    **settings: Any,
) -> float:
    """The per-run score of the repaired rule for ROC curves: the largest ``min_rise`` at which
    :func:`gated_rise_epoch` still fires (``-inf`` where it fires at no ``min_rise``: the training
    loss never levelled off, or too few epochs after it). ``settings`` as for
    :func:`gated_rise_epoch` (``min_rise`` is the one being varied, so it is not accepted).

    Exact: firing is monotone in ``min_rise`` and the score is one of the excesses of a layer's
    raw sparsity over its baseline, so a bisection over those candidates finds it.

    >>> h = pd.DataFrame({"epoch": [1, 2, 3, 4, 5], "train_loss": [1.0, 0.2, 0.19, 0.19, 0.19],
    ...                   "sparsity:relu": [0.5, 0.55, 0.5, 0.56, 0.57]})
    >>> round(gated_rise_score(h, alpha=1.0, patience=2, gate_window=1, gate_tol=0.1), 6)
    0.06
    """
    if "min_rise" in settings:
        raise XaiSparsityError("gated_rise_score varies min_rise itself; do not pass it")
    full = {**_rule_settings(settings), "rule": "gated_rise"}
    chosen = _measure_layers(history, measure, layers)
    loss = history["train_loss"] if "train_loss" in history.columns else pd.Series(dtype=float)
    gate = levelled_off_epoch(
        loss.to_numpy(dtype=float),
        history["epoch"].astype(int).tolist() if len(loss) else None,
        alpha=full["alpha"],
        gate_window=full["gate_window"],
        gate_tol=full["gate_tol"],
    )
    if gate is None:
        return -math.inf
    after = history["epoch"].astype(int).to_numpy() >= gate
    candidates: set[float] = set()
    for name in chosen:
        x = history[f"{measure}:{name}"].to_numpy(dtype=float)[after]
        x = x[~np.isnan(x)]
        candidates.update((x[1:] - x[0]).tolist() if len(x) > 1 else [])
    ordered = sorted(candidates)
    lo, hi = 0, len(ordered) - 1  # find the largest index whose candidate still fires
    best = -math.inf
    while lo <= hi:
        mid = (lo + hi) // 2
        if replay_warning(
            history, chosen, measure=measure, **{**full, "min_rise": ordered[mid]}
        ).fired:
            best, lo = ordered[mid], mid + 1
        else:
            hi = mid - 1
    return float(best)
