"""Overfitting onset, the sparsity lead and the early-warning rule (SCIENCE.md, last section).

The project's operationalisation of the papers' claim 1:

* ``t_L``: the epoch of the minimum of the smoothed test loss. The run "turned" (overfits) when the
  smoothed test loss at the last epoch is at least ``min_rel_rise`` above that minimum and the
  minimum lies at least ``patience`` epochs before the end.
* ``t_s,l``: where layer ``l``'s first sustained sparsity rise (at or after ``warmup``) starts. A rise
  is confirmed at the first epoch where the causally EMA-smoothed sparsity has increased over the
  last ``patience`` epochs and lies at least ``min_rise`` above its running minimum since
  ``warmup``; ``t_s`` is the epoch of that running minimum. Only epochs up to the confirmation are
  read, so smoothing cannot fake a lead by borrowing from later epochs.
* ``lead_l = t_L - t_s,l`` (positive: sparsity rose before the test loss turned).
* The early warning (``EarlyWarning``) is causal and never reads the test loss: the warning fires at the first epoch where at least ``min_layers`` layers (a count, or a fraction of
  the watched layers) have a confirmed rise. Optionally it also requires the training accuracy to have
  reached ``min_train_acc`` (training labels only).

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

DEFAULT_RULE: dict[str, Any] = {
    "alpha": 0.3,
    "patience": 3,
    "min_rise": 0.02,
    "min_rel_rise": 0.05,
    "warmup": 2,
    "min_layers": 0.5,
    "min_train_acc": None,
}
"""Default settings of the onset, lead and early-warning definitions."""


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
    """Causal detector of a sustained rise in one series: the one rule behind ``t_s``, the live
    early warning and the study's ``max_qualifying_rise``.

    Values are smoothed by a causal EMA (NaN values are skipped). At an epoch ``>= warmup`` whose
    last ``patience`` smoothed steps all increased, the rise is the smoothed value minus its
    running minimum since ``warmup``; the rise is confirmed when it reaches ``min_rise``.

    >>> det = RiseDetector(alpha=1.0, patience=2, min_rise=0.05, warmup=0)
    >>> [det.update(e, v) for e, v in enumerate([0.5, 0.5, 0.53, 0.57], start=1)]
    [False, False, False, True]
    >>> det.confirmed_epoch, det.onset_epoch
    (4, 2)
    """

    def __init__(self, alpha: float, patience: int, min_rise: float, warmup: int) -> None:
        self.alpha = _check_alpha(alpha)
        self.patience, self.min_rise, self.warmup = patience, min_rise, warmup
        self.smoothed: list[float] = []
        self.low = math.inf
        self.low_epoch: int | None = None
        self.confirmed_epoch: int | None = None
        self.onset_epoch: int | None = None

    def rise(self, epoch: int, value: float) -> float | None:
        """Add one value; the qualifying rise at this epoch, or None where none qualifies (NaN
        value, before ``warmup``, not rising for ``patience`` steps, or already confirmed)."""
        if math.isnan(value):
            return None
        prev = self.smoothed[-1] if self.smoothed else math.nan
        s = value if math.isnan(prev) else self.alpha * value + (1 - self.alpha) * prev
        self.smoothed.append(s)
        if epoch < self.warmup or self.confirmed_epoch is not None:
            return None
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
            self.confirmed_epoch, self.onset_epoch = int(epoch), self.low_epoch
            return True
        return False


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
    """The live, label-free early-warning rule (see the module docstring).

    Feed it one epoch at a time; it never looks at the test loss.

    Args:
        layers: layers to watch; ``None`` watches every layer it is given.
        callback: called once, ``callback(epoch, info)``, when the warning fires.
        alpha, patience, min_rise, warmup, min_layers, min_train_acc: the rule's settings.

    >>> w = EarlyWarning(alpha=1.0, patience=2, min_rise=0.05, warmup=0, min_layers=1)
    >>> [w.update(e, {"relu": v}) for e, v in enumerate([0.5, 0.5, 0.53, 0.57], start=1)]
    [False, False, False, True]
    """

    def __init__(
        self,
        layers: Sequence[str] | None = None,
        *,
        alpha: float = DEFAULT_RULE["alpha"],
        patience: int = DEFAULT_RULE["patience"],
        min_rise: float = DEFAULT_RULE["min_rise"],
        warmup: int = DEFAULT_RULE["warmup"],
        min_layers: float = DEFAULT_RULE["min_layers"],
        min_train_acc: float | None = DEFAULT_RULE["min_train_acc"],
        callback: Callable[[int, dict[str, Any]], Any] | None = None,
    ) -> None:
        self.layers = list(layers) if layers is not None else None
        self.alpha = _check_alpha(alpha)
        if int(patience) < 1:
            raise XaiSparsityError(f"patience={patience!r} must be at least 1")
        self.patience = int(patience)
        self.min_rise = float(min_rise)
        self.warmup = int(warmup)
        self.min_layers = min_layers
        self.min_train_acc = min_train_acc
        self.callback = callback
        self.fired_epoch: int | None = None
        self._detectors: dict[str, RiseDetector] = {}

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

    def update(
        self, epoch: int, sparsity: Mapping[str, float], train_acc: float | None = None
    ) -> bool:
        """Add epoch ``epoch``'s per-layer sparsity; True on the epoch the warning fires."""
        watched = self.layers if self.layers is not None else list(sparsity)
        missing = [name for name in watched if name not in sparsity]
        if missing:
            raise XaiSparsityError(
                f"EarlyWarning watches layers {missing} but epoch {epoch} only has {sorted(sparsity)}"
            )
        for name in watched:
            det = self._detectors.get(name)
            if det is None:
                det = RiseDetector(self.alpha, self.patience, self.min_rise, self.warmup)
                self._detectors[name] = det
            det.update(int(epoch), float(sparsity[name]))
        if self.fired:
            return False
        need = _resolve_min_layers(self.min_layers, len(watched))
        acc_ok = self.min_train_acc is None or (
            train_acc is not None and train_acc >= self.min_train_acc
        )
        if len([n for n in watched if n in self.confirmed]) >= need and acc_ok:
            self.fired_epoch = int(epoch)
            if self.callback is not None:
                self.callback(int(epoch), {"layers": dict(self.confirmed), "needed": need})
            return True
        return False

    def __call__(self, row: Mapping[str, Any]) -> bool:
        """Trainer-callback form: take a history row dict (``sparsity:<layer>`` columns)."""
        values = {k.split(":", 1)[1]: v for k, v in row.items() if k.startswith("sparsity:")}
        acc = row.get("train_acc")
        return self.update(int(row["epoch"]), values, None if acc is None else float(acc))


@dataclass
class Analysis:
    """The overfitting analysis of one run."""

    t_L: int | None
    turned: bool
    rise: float
    t_s: dict[str, int | None]
    lead: dict[str, int | None]
    warning_epoch: int | None
    layers: list[str]
    measure: str = "sparsity"
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def warning_lead(self) -> int | None:
        """``t_L`` minus the epoch the early warning fired (None if either is missing)."""
        if self.t_L is None or self.warning_epoch is None:
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
            "measure": self.measure,
            "settings": self.settings,
        }

    def __str__(self) -> str:
        turned = "turned" if self.turned else "did not turn"
        lines = [
            f"test loss: minimum at epoch {self.t_L}, {turned} (rise {self.rise:+.1%})",
            f"early warning: epoch {self.warning_epoch} (lead {self.warning_lead})",
            "layer  t_s  lead:",
        ]
        lines += [f"  {n}: t_s={self.t_s[n]} lead={self.lead[n]}" for n in self.layers]
        return "\n".join(lines)


def analyze(
    run: RunDir | str | os.PathLike[str] | pd.DataFrame,
    layers: Sequence[str] | None = None,
    *,
    measure: str = "sparsity",
    **rule: Any,
) -> Analysis:
    """Analyse a run directory or a history DataFrame: t_L, t_s and lead per layer, and the epoch
    the early warning would have fired live.

    Args:
        run: a run directory (path or RunDir) or a history DataFrame.
        layers: layers to analyse (default: every ``<measure>:<layer>`` column).
        measure: the column prefix, e.g. "sparsity", "hoyer", "zero_fraction".
        **rule: overrides of ``DEFAULT_RULE``.
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
        lead[name] = None if (t is None or onset.t_L is None) else onset.t_L - t
    return Analysis(
        t_L=onset.t_L,
        turned=onset.turned,
        rise=onset.rise,
        t_s=t_s,
        lead=lead,
        warning_epoch=_warning_epoch(df, prefix, chosen, settings),
        layers=chosen,
        measure=measure,
        settings=settings,
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


def _warning_epoch(
    df: pd.DataFrame, prefix: str, layers: list[str], settings: Mapping[str, Any]
) -> int | None:
    """The epoch the early warning would have fired, replaying the history row by row."""
    warning = EarlyWarning(
        layers,
        alpha=settings["alpha"],
        patience=settings["patience"],
        min_rise=settings["min_rise"],
        warmup=settings["warmup"],
        min_layers=settings["min_layers"],
        min_train_acc=settings["min_train_acc"],
    )
    train_acc = df["train_acc"].tolist() if "train_acc" in df.columns else [None] * len(df)
    for i, epoch in enumerate(df["epoch"].astype(int).tolist()):
        acc = train_acc[i]
        acc = None if acc is None or (isinstance(acc, float) and math.isnan(acc)) else float(acc)
        warning.update(epoch, {n: float(df[prefix + n].iloc[i]) for n in layers}, acc)
    return warning.fired_epoch
