"""Label-free overfitting indicators and their scoring as detectors (claim 1, SCIENCE.md).

An *indicator* turns a run's per-epoch statistics into one or more series and *fires* at an
epoch, or never. Every indicator is causal (at epoch ``t`` it reads epochs ``<= t`` only) and
reads only the probe images' activations and predictions (never their labels), the model and the
training data: never the test loss, test labels or validation labels.

Firing rules (``Indicator.rule``):

* ``"rise"``: the harness's EMA early-warning rule
  (:class:`xai_sparsity.runs.analysis.EarlyWarning`), kept for comparison: fires when at least
  ``min_layers`` series show a sustained rise of at least the threshold above their running
  minimum. Score: the largest threshold at which it fires.
* ``"gated"``: the repaired sparsity rule, :func:`xai_sparsity.runs.analysis.gated_rise_epoch`,
  with its threshold setting ``Indicator.setting`` at the threshold.
* ``"level"``: fires at the first epoch where the series crosses the threshold in the
  indicator's fixed ``direction`` (``+1``: reaches it from below, ``-1``: falls to it). Score:
  the series' maximum (``+1``) or minus its minimum (``-1``), so a higher score fires earlier.
* ``"epoch"``: the null rule "fire at epoch k" (k is the threshold; never in a shorter run).

Directions are fixed a priori, from the literature, never from the study's runs:

==========================  ====================================================  ==========
name                        series                                                rule
==========================  ====================================================  ==========
``ew_perplexity``           perplexity sparsity, feature layers (v1 rule)         rise
``gated_perplexity``        the same, repaired rule (``gated_rise_epoch``)        gated
``ew_perplexity_deepest``   perplexity sparsity, deepest feature layer            rise
``ew_zero_fraction``        zero fraction                                         rise
``ew_hoyer``                Hoyer sparsity                                        rise
``channel_q90``             90th percentile of per-channel sparsity               rise
``channel_std``             spread (std) of per-channel sparsity                  rise
``lifetime``                mean lifetime (selectivity) sparsity                  rise
``correlation``             mean |r| filter correlation (over positions)          rise
``train_gap``               sparsity on training minus on probe images            rise
``fixed_epoch``             null: fires at epoch k                                epoch
``train_loss_plateau``      null: relative fall of the smoothed training loss     level, -1
                            over the last 5 epochs
``train_acc``               null: training accuracy                               level, +1
``confidence``              mean max-softmax on the probe images                  level, +1
``pred_entropy``            mean predictive entropy on the probe images (nats)    level, -1
``cka_drift``               1 - linear CKA between consecutive epochs, mean over  level, -1
                            the feature layers
``gsnr``                    gradient signal-to-noise ratio on training batches,   level, -1
                            relative to its running maximum
``ww_alpha``                WeightWatcher mean power-law alpha                    level, -1
==========================  ====================================================  ==========

Why these directions: a network that starts to fit its training set beyond what generalises
becomes over-confident (Guo et al. 2017, calibration degrades as the NLL overfits: confidence up,
entropy down); its representations settle (Kornblith et al. 2019, CKA between epochs: drift
down); its per-sample gradients stop agreeing (Liu et al. 2020, GSNR falls and the
generalisation gap grows with it); its layers' spectra get heavier tails (Martin & Mahoney
2021, alpha below about 2 is "over-trained": alpha down). The training-loss plateau and the
training accuracy are the obvious null rules (Prechelt 1998 style stopping criteria), the fixed
epoch the most trivial one. ``gsnr`` is divided by its running maximum so that its thresholds are
scale-free; the plateau's smoothing (EMA 0.3) and window (5 epochs) are fixed a priori.

A run where an indicator has no data (e.g. ``ww_alpha`` not recorded) gets a NaN score and is
reported as "no data" for that indicator, never as a miss.

Scoring (:func:`score_indicators`): see its docstring; runs are labelled by
:func:`xai_sparsity.runs.analysis.label_run`, thresholds come from leave-one-setting-out
cross-validation, intervals from a bootstrap over settings.

>>> import pandas as pd
>>> h = pd.DataFrame({"epoch": [1, 2, 3, 4, 5, 6], "train_acc": [.5, .8, .9, .99, 1, 1],
...                   "sparsity:relu1": [.5, .5, .5, .55, .6, .65]})
>>> evaluate_run(h, ["train_acc"])["fire:train_acc"]
4
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from xai_sparsity.base.errors import XaiSparsityError
from xai_sparsity.runs.analysis import DEFAULT_RULE, EarlyWarning, RiseDetector
from xai_sparsity.runs.rundir import RunDir, as_run

RISE_GRID: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.2)
"""Thresholds (``min_rise``) tried for the rise indicators."""

LEVEL_GRID: tuple[float, ...] = (0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 1.0)
"""Thresholds tried for the training-accuracy baseline."""

_CLASSIFIER_PREFIXES = ("classifier", "fc", "head")


@dataclass
class RunData:
    """What the indicators read from one run: the history and (lazily) the per-epoch arrays.

    Args:
        history: one row per epoch (``epoch``, ``train_acc``, ``<measure>:<layer>`` columns).
        arrays: ``{epoch: {"channel:<layer>": (C,), "lifetime:<layer>": (C,), ...}}``, or a
            callable returning it (loaded on first use).
        layers: the feature layers to watch (default: :func:`feature_layers` of the history).
    """

    history: pd.DataFrame
    arrays: Mapping[int, Mapping[str, np.ndarray]] | Callable[[], Mapping[int, Any]] = field(
        default_factory=dict
    )
    layers: list[str] | None = None

    def __post_init__(self) -> None:
        if "epoch" not in self.history.columns:
            raise XaiSparsityError("a run history needs an 'epoch' column")
        self.history = self.history.sort_values("epoch").reset_index(drop=True)
        if self.layers is None:
            self.layers = feature_layers(self.history)
        self._arrays: Mapping[int, Mapping[str, np.ndarray]] | None = (
            None if callable(self.arrays) else self.arrays
        )

    @property
    def epochs(self) -> np.ndarray:
        return self.history["epoch"].to_numpy(dtype=int)

    @property
    def watched(self) -> list[str]:
        assert self.layers is not None
        return self.layers

    def epoch_arrays(self) -> Mapping[int, Mapping[str, np.ndarray]]:
        if self._arrays is None:
            loader = self.arrays
            assert callable(loader)
            self._arrays = loader()
        return self._arrays

    def column(self, prefix: str, layer: str) -> np.ndarray:
        """The history column ``<prefix>:<layer>`` as floats (NaN where missing)."""
        name = f"{prefix}:{layer}"
        if name not in self.history.columns:
            return np.full(len(self.history), np.nan)
        return self.history[name].to_numpy(dtype=float)

    def array_series(
        self, key: str, layer: str, reduce: Callable[[np.ndarray], float]
    ) -> np.ndarray:
        """One value per history epoch from ``arrays[epoch][f"{key}:{layer}"]`` (NaN if absent)."""
        arrays = self.epoch_arrays()
        out = np.full(len(self.history), np.nan)
        for i, epoch in enumerate(self.epochs):
            a = arrays.get(int(epoch), {}).get(f"{key}:{layer}")
            if a is not None and np.size(a) > 0:
                out[i] = reduce(np.asarray(a, dtype=float))
        return out

    @classmethod
    def from_run(cls, run: RunDir | str | os.PathLike[str]) -> RunData:
        """Read a run directory (arrays are loaded when an indicator first needs them)."""
        r = as_run(run)

        def load() -> dict[int, dict[str, np.ndarray]]:
            return {e: r.load_arrays(e) for e in r.array_epochs()}

        return cls(r.history(), load)


def feature_layers(history: pd.DataFrame, measure: str = "sparsity") -> list[str]:
    """The measured feature-extraction layers: ``<measure>:<layer>`` columns whose layer is not in
    the classifier (names starting with ``classifier``, ``fc`` or ``head``), in column order.

    >>> feature_layers(pd.DataFrame(columns=["epoch", "sparsity:features.relu1",
    ...                                      "sparsity:classifier.relu"]))
    ['features.relu1']
    """
    prefix = f"{measure}:"
    layers = [c[len(prefix) :] for c in history.columns if c.startswith(prefix)]
    feats = [n for n in layers if not n.split(".")[0].startswith(_CLASSIFIER_PREFIXES)]
    return feats or layers


@dataclass(frozen=True)
class Indicator:
    """One candidate overfitting indicator.

    Attributes:
        name: short identifier (column names use it).
        description: one line for tables.
        series: ``RunData -> {series name: values per history epoch}`` (empty: no data).
        rule: ``"rise"``, ``"gated"``, ``"level"`` or ``"epoch"`` (see the module docstring).
        default: the a-priori threshold (reported in the summary's ``fire:<name>`` column).
        grid: thresholds tried by the cross-validation.
        min_layers: for ``"rise"``: how many series must rise (count, or fraction <= 1).
        direction: ``+1``: a larger threshold fires less often (``"rise"``, ``"epoch"``,
            ``"gated"``, rising ``"level"`` series); ``-1``: a smaller one does (falling series).
        setting: for ``"gated"``: the keyword of ``gated_rise_epoch`` the threshold sets.
    """

    name: str
    description: str
    series: Callable[[RunData], dict[str, np.ndarray]]
    rule: str = "rise"
    default: float = 0.02
    grid: tuple[float, ...] = RISE_GRID
    min_layers: float = DEFAULT_RULE["min_layers"]
    direction: int = 1
    setting: str = "min_rise"

    def firing_epoch(self, data: RunData, threshold: float | None = None) -> int | None:
        """The epoch the indicator fires at ``threshold`` (default: ``self.default``), or None."""
        theta = self.default if threshold is None else float(threshold)
        epochs = data.epochs
        if self.rule == "epoch":
            return int(theta) if len(epochs) and epochs.max() >= theta else None
        series = self.series(data)
        if not series:
            return None
        if self.rule == "level":
            return _level_epoch(next(iter(series.values())), epochs, theta, self.direction)
        if self.rule == "gated":
            return _gated_epoch(data, list(series), {self.setting: theta})
        warning = EarlyWarning(
            list(series),
            rule="ema_rise",
            alpha=DEFAULT_RULE["alpha"],
            patience=DEFAULT_RULE["patience"],
            min_rise=theta,
            warmup=DEFAULT_RULE["warmup"],
            min_layers=self.min_layers,
        )
        for i, epoch in enumerate(epochs):
            if warning.update(int(epoch), {k: float(v[i]) for k, v in series.items()}):
                return int(epoch)
        return None

    def score(self, data: RunData) -> float:
        """Run-level score, higher = fires more readily (NaN: no data). For ``"rise"`` and
        ``"level"`` it fires at threshold ``t`` exactly when ``score >= direction * t``."""
        if self.rule == "epoch":
            return 0.0 if len(data.epochs) else math.nan
        series = self.series(data)
        if not series:
            return math.nan
        if self.rule == "level":
            values = self.direction * next(iter(series.values()))
            return float(np.nanmax(values)) if np.isfinite(values).any() else math.nan
        if self.rule == "gated":
            return _gated_score(data, list(series))
        epochs = data.epochs
        per = sorted((max_qualifying_rise(v, epochs) for v in series.values()), reverse=True)
        need = _need(self.min_layers, len(per))
        return float(per[need - 1]) if need <= len(per) else 0.0


def _level_epoch(
    values: np.ndarray, epochs: np.ndarray, theta: float, direction: int
) -> int | None:
    """First epoch where ``direction * values >= direction * theta`` (NaN never crosses)."""
    x = np.nan_to_num(direction * np.asarray(values, dtype=float), nan=-np.inf)
    hit = np.flatnonzero(x >= direction * theta)
    return int(epochs[hit[0]]) if len(hit) else None


def _gated_epoch(data: RunData, layers: list[str], settings: dict[str, float]) -> int | None:
    """The repaired rule's firing epoch (``runs.analysis.gated_rise_epoch``); None if absent."""
    from xai_sparsity.runs import analysis

    rule = getattr(analysis, "gated_rise_epoch", None)
    if rule is None:
        return None
    epoch = rule(data.history, layers, **settings)
    return None if epoch is None else int(epoch)


def _gated_score(data: RunData, layers: list[str]) -> float:
    """The repaired rule's per-run score (``runs.analysis.gated_rise_score``: the largest
    ``min_rise`` at which it fires; ``-inf`` where it cannot fire at all); NaN if absent."""
    from xai_sparsity.runs import analysis

    score = getattr(analysis, "gated_rise_score", None)
    if score is None:
        return math.nan
    return float(score(data.history, layers))


def _need(min_layers: float, n: int) -> int:
    if isinstance(min_layers, float) and min_layers <= 1.0:
        return max(1, math.ceil(min_layers * n))
    return int(min_layers)


def max_qualifying_rise(
    values: Sequence[float] | np.ndarray,
    epochs: Sequence[int] | np.ndarray,
    *,
    alpha: float = DEFAULT_RULE["alpha"],
    patience: int = DEFAULT_RULE["patience"],
    warmup: int = DEFAULT_RULE["warmup"],
) -> float:
    """The largest ``min_rise`` at which the early-warning rise detector confirms a rise.

    The rise of :class:`~xai_sparsity.runs.analysis.RiseDetector` (causal EMA over the non-NaN
    values; at an epoch ``>= warmup`` whose last ``patience`` smoothed steps all increased, the
    smoothed value minus its running minimum since ``warmup``), maximised over the epochs.
    Returns 0.0 if no epoch qualifies.

    >>> rise = max_qualifying_rise([0.5, 0.5, 0.5, 0.55, 0.6, 0.65, 0.7], range(1, 8), alpha=1.0,
    ...                            warmup=0)
    >>> round(rise, 6)
    0.2
    """
    detector = RiseDetector(alpha, int(patience), math.inf, int(warmup))
    best = 0.0
    for e, v in zip(np.asarray(epochs), np.asarray(values, dtype=float), strict=True):
        rise = detector.rise(int(e), float(v))
        if rise is not None:
            best = max(best, float(rise))
    return best


# ---------------------------------------------------------------------------------- series
def _columns(prefix: str, deepest: bool = False) -> Callable[[RunData], dict[str, np.ndarray]]:
    def series(data: RunData) -> dict[str, np.ndarray]:
        layers = data.watched[-1:] if deepest else data.watched
        out = {n: data.column(prefix, n) for n in layers}
        return {n: v for n, v in out.items() if np.isfinite(v).any()}

    return series


def _arrays(
    key: str, reduce: Callable[[np.ndarray], float]
) -> Callable[[RunData], dict[str, np.ndarray]]:
    def series(data: RunData) -> dict[str, np.ndarray]:
        out = {n: data.array_series(key, n, reduce) for n in data.watched}
        return {n: v for n, v in out.items() if np.isfinite(v).any()}

    return series


def _lifetime(data: RunData) -> dict[str, np.ndarray]:
    out = {}
    for n in data.watched:
        v = data.column("lifetime", n)
        if not np.isfinite(v).any():
            v = data.array_series("lifetime", n, lambda a: float(np.nanmean(a)))
        if np.isfinite(v).any():
            out[n] = v
    return out


def _train_gap(data: RunData) -> dict[str, np.ndarray]:
    out = {n: data.column("train_sparsity", n) - data.column("sparsity", n) for n in data.watched}
    return {n: v for n, v in out.items() if np.isfinite(v).any()}


def _history(column: str) -> Callable[[RunData], dict[str, np.ndarray]]:
    """The history column ``column`` as the one series (none when absent or all NaN)."""

    def series(data: RunData) -> dict[str, np.ndarray]:
        if column not in data.history.columns:
            return {}
        v = pd.to_numeric(data.history[column], errors="coerce").to_numpy(dtype=float)
        return {column: v} if np.isfinite(v).any() else {}

    return series


def _cka_drift(data: RunData) -> dict[str, np.ndarray]:
    """Mean over the feature layers of ``cka_drift:<layer>`` (NaN where no layer has a value)."""
    cols = np.array([data.column("cka_drift", n) for n in data.watched])
    if not cols.size or not np.isfinite(cols).any():
        return {}
    ok = np.isfinite(cols).any(axis=0)
    mean = np.full(cols.shape[1], np.nan)
    mean[ok] = np.nanmean(cols[:, ok], axis=0)
    return {"cka_drift": mean}


def _gsnr_relative(data: RunData) -> dict[str, np.ndarray]:
    """``gsnr`` divided by its running maximum so far (causal, scale-free, in (0, 1])."""
    found = _history("gsnr")(data)
    if not found:
        return {}
    v = found["gsnr"]
    running = pd.Series(v).cummax().to_numpy(dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(running > 0, v / running, np.nan)
    return {"gsnr": rel} if np.isfinite(rel).any() else {}


PLATEAU_ALPHA = 0.3
"""EMA factor of the training-loss plateau rule (a priori, as the early warning's)."""

PLATEAU_WINDOW = 5
"""Window (epochs) of the training-loss plateau rule's relative fall (a priori)."""


def _train_loss_fall(data: RunData) -> dict[str, np.ndarray]:
    """Relative fall of the EMA-smoothed training loss over the last ``PLATEAU_WINDOW`` epochs:
    ``(s[t - w] - s[t]) / s[t - w]`` (NaN for the first ``w`` epochs)."""
    from xai_sparsity.runs.analysis import ema

    found = _history("train_loss")(data)
    if not found or np.isnan(found["train_loss"]).any():
        return {}
    loss = found["train_loss"]
    s = ema(loss, PLATEAU_ALPHA)
    w = PLATEAU_WINDOW
    fall = np.full(len(s), np.nan)
    if len(s) > w:
        with np.errstate(divide="ignore", invalid="ignore"):
            fall[w:] = (s[:-w] - s[w:]) / s[:-w]
    return {"train_loss_fall": fall} if np.isfinite(fall).any() else {}


def _nothing(data: RunData) -> dict[str, np.ndarray]:
    return {}


_SPARSITY_INDICATORS = (
    Indicator("ew_perplexity", "EMA rise rule (v1), perplexity sparsity", _columns("sparsity")),
    Indicator(
        "gated_perplexity",
        "repaired rise rule (gated_rise_epoch), perplexity sparsity",
        _columns("sparsity"),
        rule="gated",
    ),
    Indicator(
        "ew_perplexity_deepest",
        "EMA rise rule, perplexity sparsity, deepest feature layer",
        _columns("sparsity", deepest=True),
    ),
    Indicator("ew_zero_fraction", "EMA rise rule, zero fraction", _columns("zero_fraction")),
    Indicator("ew_hoyer", "EMA rise rule, Hoyer sparsity", _columns("hoyer")),
    Indicator(
        "channel_q90",
        "90th percentile of per-channel sparsity",
        _arrays("channel", lambda a: float(np.nanquantile(a, 0.9))),
    ),
    Indicator(
        "channel_std",
        "spread (std) of per-channel sparsity",
        _arrays("channel", lambda a: float(np.nanstd(a))),
    ),
    Indicator("lifetime", "mean lifetime sparsity over channels", _lifetime),
    Indicator("correlation", "mean |r| filter correlation", _columns("correlation")),
    Indicator("train_gap", "sparsity on training minus held-out inputs", _train_gap, default=0.01),
)

_COMPETITORS = (
    Indicator(
        "fixed_epoch",
        "null: fires at epoch k",
        _nothing,
        rule="epoch",
        default=10,
        grid=(3, 5, 10, 15, 20, 30, 40, 60, 80, 100),
    ),
    Indicator(
        "train_loss_plateau",
        "null: smoothed training loss fell < tol over 5 epochs",
        _train_loss_fall,
        rule="level",
        direction=-1,
        default=0.05,
        grid=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3),
    ),
    Indicator(
        "train_acc",
        "null: training accuracy reached the threshold",
        _history("train_acc"),
        rule="level",
        default=0.99,
        grid=LEVEL_GRID,
    ),
    Indicator(
        "confidence",
        "mean max-softmax on the probe images reached the threshold",
        _history("confidence"),
        rule="level",
        default=0.95,
        grid=(0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995),
    ),
    Indicator(
        "pred_entropy",
        "mean predictive entropy on the probe images fell to the threshold",
        _history("pred_entropy"),
        rule="level",
        direction=-1,
        default=0.1,
        grid=(0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8),
    ),
    Indicator(
        "cka_drift",
        "representation drift (1 - CKA between epochs) fell to the threshold",
        _cka_drift,
        rule="level",
        direction=-1,
        default=0.01,
        grid=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1),
    ),
    Indicator(
        "gsnr",
        "gradient SNR fell to this share of its running maximum",
        _gsnr_relative,
        rule="level",
        direction=-1,
        default=0.3,
        grid=(0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9),
    ),
    Indicator(
        "ww_alpha",
        "WeightWatcher mean alpha fell to the threshold",
        _history("ww_alpha"),
        rule="level",
        direction=-1,
        default=2.0,
        grid=(1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0),
    ),
)

INDICATORS: dict[str, Indicator] = {ind.name: ind for ind in (*_SPARSITY_INDICATORS, *_COMPETITORS)}
"""The indicators scored by the study, by name."""


def _format_threshold(t: float) -> str:
    return f"{t:g}"


def fire_column(name: str, threshold: float | None = None) -> str:
    """Summary column of an indicator's firing epoch (at ``threshold``, or at its default)."""
    return f"fire:{name}" if threshold is None else f"fire:{name}@{_format_threshold(threshold)}"


def evaluate_run(
    run: RunData | RunDir | str | os.PathLike[str] | pd.DataFrame,
    indicators: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Every indicator's firing epoch (default threshold and each grid threshold) and score.

    Returns a flat dict: ``fire:<name>`` (int or None), ``fire:<name>@<t>``, ``score:<name>``.
    """
    if isinstance(run, pd.DataFrame):
        data = RunData(run)
    elif isinstance(run, RunData):
        data = run
    else:
        data = RunData.from_run(run)
    names = list(INDICATORS) if indicators is None else list(indicators)
    out: dict[str, Any] = {}
    for name in names:
        ind = get_indicator(name)
        out[fire_column(name)] = ind.firing_epoch(data)
        for t in ind.grid:
            out[fire_column(name, t)] = ind.firing_epoch(data, t)
        out[f"score:{name}"] = ind.score(data)
    return out


def get_indicator(name: str) -> Indicator:
    """The indicator called ``name`` (XaiSparsityError listing the valid names otherwise)."""
    from xai_sparsity.base.errors import check_choice

    check_choice("indicator", name, tuple(INDICATORS))
    return INDICATORS[name]


# ---------------------------------------------------------------------------------- scoring
SCORED_LABELS = ("overfits", "clean")
"""Run labels that are scored; ``"undetermined"`` runs are excluded (and counted)."""

_RUN_SUFFIX = re.compile(r"-s\d+-[0-9a-f]{6}$")


def run_labels(table: pd.DataFrame) -> np.ndarray:
    """Each run's label: the summary's ``label`` column; for a summary without one (study v1),
    ``"overfits"`` where ``turned`` and ``"undetermined"`` otherwise (v1 recorded no
    convergence, so no run of it is a known clean negative)."""
    if "label" in table.columns:
        return table["label"].fillna("undetermined").astype(str).to_numpy()
    if "turned" not in table.columns:
        raise XaiSparsityError(f"the summary needs a 'label' column; it has {list(table.columns)}")
    turned = table["turned"].astype(str).str.lower().isin(["true", "1"]).to_numpy()
    return np.where(turned, "overfits", "undetermined")


def run_settings(table: pd.DataFrame) -> np.ndarray:
    """Each run's setting (its settings without the seed): the ``setting`` column; else the
    values of the summary's TrainConfig columns (all but ``seed`` and ``arm``); else the run id
    without its ``-s<seed>-<hash>`` suffix.

    >>> run_settings(pd.DataFrame({"run_id": ["g-baseline-lr=0.1-s3-a1b2c3"]})).tolist()
    ['g-baseline-lr=0.1']
    """
    if "setting" in table.columns:
        return table["setting"].astype(str).to_numpy()
    from xai_sparsity.training.trainer import TrainConfig

    keys = [
        c
        for c in table.columns
        if c in TrainConfig.__dataclass_fields__ and c not in ("seed", "arm")
    ]
    if keys:
        values = table[keys].astype(str).to_numpy()
        return np.array(
            ["|".join(f"{k}={v}" for k, v in zip(keys, row, strict=True)) for row in values],
            dtype=object,
        )
    return np.array([_RUN_SUFFIX.sub("", str(r)) for r in table["run_id"]], dtype=object)


_Values = Sequence[Any] | np.ndarray | pd.Series


@dataclass(frozen=True)
class Confusion:
    """Detector outcome counts: ``tp`` overfitting runs fired by t_L + 1, ``fn`` the others
    (``late`` of them fired after t_L + 1), ``fp`` clean runs fired at all, ``tn`` the others."""

    tp: int
    fp: int
    fn: int
    tn: int
    late: int = 0

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else math.nan

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else math.nan

    @property
    def false_alarm_rate(self) -> float:
        return self.fp / (self.fp + self.tn) if self.fp + self.tn else math.nan

    @property
    def youden(self) -> float:
        r, f = self.recall, self.false_alarm_rate
        return (0.0 if math.isnan(r) else r) - (0.0 if math.isnan(f) else f)


def confusion(fire: _Values, labels: _Values, t_L: _Values) -> Confusion:
    """Counts of timely hits (fired by ``t_L + 1`` in an overfitting run) and false alarms
    (fired at all in a clean run); undetermined runs are ignored.

    >>> confusion([3, 9, None, 4, None], ["overfits", "overfits", "overfits", "clean", "clean"],
    ...           [5, 5, 5, None, None])
    Confusion(tp=1, fp=1, fn=2, tn=1, late=1)
    """
    f = pd.to_numeric(pd.Series(list(fire), dtype=object), errors="coerce").to_numpy(dtype=float)
    y = np.asarray(labels).astype(str)
    t = pd.to_numeric(pd.Series(list(t_L), dtype=object), errors="coerce").to_numpy(dtype=float)
    fired = np.isfinite(f)
    pos, neg = y == "overfits", y == "clean"
    with np.errstate(invalid="ignore"):
        timely = fired & (f <= t + 1)
    tp = int((pos & timely).sum())
    late = int((pos & fired & ~timely).sum())
    fp = int((neg & fired).sum())
    return Confusion(tp, fp, int(pos.sum()) - tp, int(neg.sum()) - fp, late)


def _fires(table: pd.DataFrame, column: str) -> np.ndarray:
    if column not in table.columns:
        raise XaiSparsityError(
            f"the summary has no column {column!r}; indicator columns: "
            f"{[c for c in table.columns if c.startswith('fire:')][:12]}"
        )
    return pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=float)


def choose_threshold(table: pd.DataFrame, name: str) -> float:
    """The grid threshold with the largest Youden J (timely recall - false-alarm rate) on
    ``table`` (ties: the one that fires least); the default if ``table`` lacks an overfitting
    or a clean run."""
    ind = get_indicator(name)
    labels = run_labels(table)
    if not (labels == "overfits").any() or not (labels == "clean").any():
        return float(ind.default)
    best, best_j = float(ind.default), -math.inf
    for t in sorted(ind.grid, key=lambda x: ind.direction * x):
        j = confusion(_fires(table, fire_column(name, t)), labels, table["t_L"]).youden
        if j >= best_j:
            best, best_j = float(t), j
    return best


def _has_data(table: pd.DataFrame, name: str) -> np.ndarray:
    col = f"score:{name}"
    if col not in table.columns:
        return np.zeros(len(table), dtype=bool)
    return ~np.isnan(pd.to_numeric(table[col], errors="coerce").to_numpy(dtype=float))


def cross_validated(table: pd.DataFrame, name: str) -> pd.DataFrame:
    """Leave-one-setting-out predictions of indicator ``name`` on the scored runs with data.

    For every setting, the threshold is chosen (:func:`choose_threshold`) on the runs of the
    other settings and applied to the runs of this one. Returns one row per run: ``run_id``,
    ``setting``, ``label``, ``t_L``, ``threshold``, ``fire`` (epoch or NaN), ``hit`` (overfits,
    fired by t_L + 1), ``false_alarm`` (clean, fired) and ``score``.
    """
    labels = run_labels(table)
    keep = np.isin(labels, SCORED_LABELS) & _has_data(table, name)
    df = table[keep].reset_index(drop=True)
    settings = run_settings(df)
    rows = []
    for s in dict.fromkeys(settings.tolist()):
        held = settings == s
        t = choose_threshold(df[~held], name)
        fire = _fires(df[held], fire_column(name, t))
        for i, f in zip(np.flatnonzero(held), fire, strict=True):
            rows.append({"i": i, "setting": s, "threshold": t, "fire": f})
    out = pd.DataFrame(rows, columns=["i", "setting", "threshold", "fire"]).set_index("i")
    out = out.sort_index()
    out.insert(0, "run_id", df["run_id"].to_numpy())
    out["label"] = run_labels(df)
    out["t_L"] = pd.to_numeric(df["t_L"], errors="coerce").to_numpy(dtype=float)
    fired = np.isfinite(out["fire"].to_numpy(dtype=float))
    with np.errstate(invalid="ignore"):
        timely = fired & (out["fire"].to_numpy(dtype=float) <= out["t_L"].to_numpy() + 1)
    out["hit"] = (out["label"] == "overfits").to_numpy() & timely
    out["false_alarm"] = (out["label"] == "clean").to_numpy() & fired
    out["score"] = pd.to_numeric(df[f"score:{name}"], errors="coerce").to_numpy(dtype=float)
    return out.reset_index(drop=True)


def _auc(score: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC (scikit-learn) of ``score`` for ``positive``; NaN without both classes."""
    from sklearn.metrics import roc_auc_score

    if positive.all() or not positive.any():
        return math.nan
    finite = score[np.isfinite(score)]
    low, high = (finite.min(), finite.max()) if len(finite) else (0.0, 0.0)
    # "never fires" (-inf) ranks below every finite score, +inf above: same AUC, finite input
    ranked = np.where(score == -np.inf, low - 1.0, np.where(score == np.inf, high + 1.0, score))
    return float(roc_auc_score(positive, ranked))


def rank_auc(score: np.ndarray, positive: np.ndarray) -> float:
    """The ROC AUC by the Mann-Whitney identity on scipy's average ranks (ties count one half):
    equal to scikit-learn's ``roc_auc_score`` (a test holds it there) at about 1/25 of its cost,
    for the thousands of bootstrap resamples; NaN without both classes.

    >>> rank_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([False, False, True, True]))
    0.75
    """
    from scipy.stats import rankdata

    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if not n_pos or not n_neg:
        return math.nan
    ranks = rankdata(np.nan_to_num(score, nan=-np.inf))
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


_METRICS = ("precision", "recall", "false_alarm_rate", "auc")


class _Outcomes:
    """The cross-validated outcomes as arrays, for fast bootstrap resamples."""

    def __init__(self, cv: pd.DataFrame) -> None:
        self.pos = (cv["label"] == "overfits").to_numpy()
        self.neg = (cv["label"] == "clean").to_numpy()
        self.hit = cv["hit"].to_numpy(dtype=bool)
        self.alarm = cv["false_alarm"].to_numpy(dtype=bool)
        self.score = cv["score"].to_numpy(dtype=float)

    def metrics(self, rows: np.ndarray) -> np.ndarray:
        """Precision, recall, false-alarm rate and AUC of ``rows`` (as in ``_METRICS``)."""
        pos, neg = self.pos[rows], self.neg[rows]
        tp, fp = int(self.hit[rows].sum()), int(self.alarm[rows].sum())
        n_pos, n_neg = int(pos.sum()), int(neg.sum())
        return np.array(
            [
                tp / (tp + fp) if tp + fp else math.nan,
                tp / n_pos if n_pos else math.nan,
                fp / n_neg if n_neg else math.nan,
                rank_auc(self.score[rows], pos),
            ]
        )


def _auc_test(reps: np.ndarray) -> dict[str, float]:
    """Bootstrap test of AUC = 0.5: two-sided p ``2 min(P*(AUC <= .5), P*(AUC >= .5))`` (with the
    +1 correction) and the smallest AUC difference from 0.5 the design detects (80 % power,
    two-sided 5 %: 2.8 bootstrap standard errors)."""
    r = reps[np.isfinite(reps)]
    if len(r) < 2:
        return {"auc_p": math.nan, "auc_mde": math.nan}
    below = (1 + int((r <= 0.5).sum())) / (1 + len(r))
    above = (1 + int((r >= 0.5).sum())) / (1 + len(r))
    return {"auc_p": min(1.0, 2 * min(below, above)), "auc_mde": 2.8 * float(np.std(r, ddof=1))}


def _timing(cv: pd.DataFrame) -> dict[str, float]:
    """Over the overfitting runs the indicator fired on: Spearman(firing epoch, t_L), the median
    lead ``t_L - firing epoch`` and the share fired by t_L + 1."""
    from xai_sparsity.study.stats import spearman

    sel = cv[(cv["label"] == "overfits") & np.isfinite(cv["fire"].to_numpy(dtype=float))]
    lead = (sel["t_L"] - sel["fire"]).to_numpy(dtype=float)
    return {
        "n_fired_overfits": len(sel),
        "spearman_fire_tL": spearman(sel["fire"], sel["t_L"]),
        "lead_median": float(np.median(lead)) if len(lead) else math.nan,
        "lead_q25": float(np.quantile(lead, 0.25)) if len(lead) else math.nan,
        "lead_q75": float(np.quantile(lead, 0.75)) if len(lead) else math.nan,
    }


def score_indicator(
    table: pd.DataFrame, name: str, *, rounds: int | None = None, seed: int = 0
) -> dict[str, Any]:
    """One indicator scored as a detector of overfitting (see :func:`score_indicators`)."""
    from xai_sparsity.study.stats import (
        BOOTSTRAP_ROUNDS,
        bootstrap_by_group,
        percentile_interval,
    )

    labels = run_labels(table)
    scored = np.isin(labels, SCORED_LABELS)
    cv = cross_validated(table, name)
    c = confusion(cv["fire"], cv["label"], cv["t_L"])
    outcomes = _Outcomes(cv)
    point = dict(zip(_METRICS, outcomes.metrics(np.arange(len(cv))).tolist(), strict=True))
    point["auc"] = _auc(outcomes.score, outcomes.pos)  # scikit-learn's, for the estimate
    row: dict[str, Any] = {
        "indicator": name,
        "description": get_indicator(name).description,
        "n_runs": len(cv),
        "n_settings": int(cv["setting"].nunique()),
        "n_overfits": int((cv["label"] == "overfits").sum()),
        "n_clean": int((cv["label"] == "clean").sum()),
        "n_excluded": int((~scored).sum()),
        "n_no_data": int((scored & ~_has_data(table, name)).sum()),
        "threshold_median": float(cv["threshold"].median()) if len(cv) else math.nan,
        "tp": c.tp,
        "fp": c.fp,
        "fn": c.fn,
        "tn": c.tn,
        "late": c.late,
        **point,
    }
    n_rounds = BOOTSTRAP_ROUNDS if rounds is None else rounds
    reps = (
        bootstrap_by_group(cv["setting"].to_numpy(), outcomes.metrics, rounds=n_rounds, seed=seed)
        if len(cv)
        else np.full((1, len(_METRICS)), np.nan)
    )
    for k, key in enumerate(_METRICS):
        row[f"{key}_low"], row[f"{key}_high"] = percentile_interval(reps[:, k])
    row.update(_auc_test(reps[:, _METRICS.index("auc")]))
    row.update(_timing(cv))
    return row


def score_indicators(
    table: pd.DataFrame,
    indicators: Sequence[str] | None = None,
    *,
    rounds: int | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Score each indicator as a detector of overfitting, with thresholds cross-validated.

    Args:
        table: the study summary (one row per run): ``run_id``, ``label`` (from
            :func:`xai_sparsity.runs.analysis.label_run`; see :func:`run_labels` for v1
            summaries), ``t_L``, optionally ``setting``, and the columns of :func:`evaluate_run`.
        indicators: names to score (default: every indicator with columns in ``table``).
        rounds: bootstrap resamples (default ``stats.BOOTSTRAP_ROUNDS``).
        seed: the bootstrap seed.

    Procedure: undetermined runs are excluded (``n_excluded``), and so are runs without data
    for the indicator (``n_no_data``). For each setting, the threshold maximising Youden's J on
    the other settings is applied to it (leave one setting out). A hit is an overfitting run
    fired by ``t_L + 1`` (a later firing is a miss, counted in ``late``); any firing in a clean run
    is a false alarm. ``precision = tp / (tp + fp)``, ``recall = tp / (tp + fn)``,
    ``false_alarm_rate = fp / (fp + tn)`` and the ROC AUC of the threshold-free ``score``
    (overfits vs clean, timing ignored) come with 95 % percentile intervals from a bootstrap that
    resamples settings (``*_low``, ``*_high``; the cross-validated predictions are kept fixed).
    On the overfitting runs it fired on: ``spearman_fire_tL``, ``lead_median`` (t_L - firing
    epoch) and its quartiles.
    """
    for col in ("run_id", "t_L"):
        if col not in table.columns:
            raise XaiSparsityError(
                f"the summary needs a {col!r} column; it has {list(table.columns)}"
            )
    if indicators is None:
        indicators = [n for n in INDICATORS if fire_column(n) in table.columns]
    rows = [score_indicator(table, n, rounds=rounds, seed=seed) for n in indicators]
    return pd.DataFrame(rows)


__all__ = [
    "INDICATORS",
    "LEVEL_GRID",
    "PLATEAU_ALPHA",
    "PLATEAU_WINDOW",
    "RISE_GRID",
    "SCORED_LABELS",
    "Confusion",
    "Indicator",
    "RunData",
    "choose_threshold",
    "confusion",
    "cross_validated",
    "evaluate_run",
    "feature_layers",
    "fire_column",
    "get_indicator",
    "max_qualifying_rise",
    "rank_auc",
    "run_labels",
    "run_settings",
    "score_indicator",
    "score_indicators",
]
