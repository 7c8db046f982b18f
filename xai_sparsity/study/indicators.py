"""Label-free overfitting indicators and their scoring as detectors (claim 1, SCIENCE.md).

An *indicator* turns a run's per-epoch statistics into one or more series (one per watched layer)
and *fires* at an epoch, or never. Every indicator is causal: at epoch ``t`` it reads epochs
``<= t`` only, and none reads the test loss or test labels.

Two firing rules:

* ``"rise"``: the harness's early-warning rule (:class:`xai_sparsity.runs.analysis.EarlyWarning`): the
  indicator fires when at least ``min_layers`` of its series show a sustained rise of at least the
  threshold ``min_rise`` above their running minimum. Its run-level *score* is the largest
  threshold at which it still fires (the ``k``-th largest per-series maximum qualifying rise), so
  ``fires at threshold t  <=>  score >= t`` exactly, and ROC AUC uses that score.
* ``"level"``: fires at the first epoch where the series reaches the threshold (the trivial
  baselines, e.g. training accuracy >= 99 %). Score: the series' maximum.

Indicators (:data:`INDICATORS`):

=========================  ==========================================================  =========
name                       series (per feature layer unless noted)                     rule
=========================  ==========================================================  =========
``ew_perplexity``          perplexity sparsity on held-out probe images                rise
``ew_perplexity_deepest``  the same, deepest feature layer only                        rise
``ew_zero_fraction``       zero fraction on held-out probe images                      rise
``ew_hoyer``               Hoyer sparsity on held-out probe images                     rise
``channel_q90``            90th percentile over channels of per-channel sparsity       rise
``channel_std``            spread (std) over channels of per-channel sparsity          rise
``lifetime``               mean lifetime (selectivity) sparsity over channels          rise
``correlation``            mean absolute filter correlation                            rise
``train_gap``              sparsity on training inputs minus on held-out inputs        rise
``train_acc``              training accuracy (baseline; uses training labels only)     level
=========================  ==========================================================  =========

Scoring (:func:`score_indicators`): each run is a positive when its test loss turned
(``analysis.overfitting_onset``). The runs are split once, by a seeded hash of the run id and
stratified by the label, into a calibration half and an evaluation half. Each indicator's
threshold is chosen on the calibration half (maximum Youden J = recall - false-alarm rate, ties to
the larger threshold) and precision, recall, false alarms, AUC and the lead ``t_L - firing
epoch`` are reported on the evaluation half only.

>>> import pandas as pd
>>> h = pd.DataFrame({"epoch": [1, 2, 3, 4, 5, 6], "train_acc": [.5, .8, .9, .99, 1, 1],
...                   "sparsity:relu1": [.5, .5, .5, .55, .6, .65]})
>>> evaluate_run(h, ["train_acc"])["fire:train_acc"]
4
"""

from __future__ import annotations

import hashlib
import math
import os
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
        series: ``RunData -> {series name: values per history epoch}``.
        rule: ``"rise"`` (EarlyWarning with ``min_rise`` = threshold) or ``"level"``.
        default: the a-priori threshold (reported in the summary's ``fire:<name>`` column).
        grid: thresholds tried when calibrating.
        min_layers: for ``"rise"``: how many series must rise (count, or fraction <= 1).
    """

    name: str
    description: str
    series: Callable[[RunData], dict[str, np.ndarray]]
    rule: str = "rise"
    default: float = 0.02
    grid: tuple[float, ...] = RISE_GRID
    min_layers: float = DEFAULT_RULE["min_layers"]

    def firing_epoch(self, data: RunData, threshold: float | None = None) -> int | None:
        """The epoch the indicator fires at ``threshold`` (default: ``self.default``), or None."""
        theta = self.default if threshold is None else float(threshold)
        series = self.series(data)
        epochs = data.epochs
        if self.rule == "level":
            (values,) = series.values()
            hit = np.flatnonzero(np.nan_to_num(values, nan=-np.inf) >= theta)
            return int(epochs[hit[0]]) if len(hit) else None
        if not series:
            return None
        warning = EarlyWarning(
            list(series),
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
        """Run-level score: fires at threshold ``t`` exactly when ``score >= t`` (NaN: no data)."""
        series = self.series(data)
        if self.rule == "level":
            (values,) = series.values()
            return float(np.nanmax(values)) if np.isfinite(values).any() else math.nan
        if not series:
            return math.nan
        epochs = data.epochs
        per = sorted((max_qualifying_rise(v, epochs) for v in series.values()), reverse=True)
        need = _need(self.min_layers, len(per))
        return float(per[need - 1]) if need <= len(per) else 0.0


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


def _train_acc(data: RunData) -> dict[str, np.ndarray]:
    if "train_acc" not in data.history.columns:
        return {"train_acc": np.full(len(data.history), np.nan)}
    return {"train_acc": data.history["train_acc"].to_numpy(dtype=float)}


INDICATORS: dict[str, Indicator] = {
    ind.name: ind
    for ind in (
        Indicator("ew_perplexity", "early warning, perplexity sparsity", _columns("sparsity")),
        Indicator(
            "ew_perplexity_deepest",
            "early warning, perplexity sparsity, deepest feature layer",
            _columns("sparsity", deepest=True),
        ),
        Indicator("ew_zero_fraction", "early warning, zero fraction", _columns("zero_fraction")),
        Indicator("ew_hoyer", "early warning, Hoyer sparsity", _columns("hoyer")),
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
        Indicator(
            "train_gap",
            "sparsity on training minus held-out inputs",
            _train_gap,
            default=0.01,
        ),
        Indicator(
            "train_acc",
            "baseline: training accuracy reached the threshold",
            _train_acc,
            rule="level",
            default=0.99,
            grid=LEVEL_GRID,
        ),
    )
}
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
def split_runs(
    run_ids: Sequence[str], labels: Sequence[bool] | np.ndarray, seed: int = 0
) -> np.ndarray:
    """Calibration mask: True for the half of the runs thresholds are chosen on.

    Deterministic: within each label, runs are ordered by ``sha256(f"{seed}:{run_id}")`` and
    assigned alternately to calibration and evaluation (so both halves hold both labels).

    >>> int(split_runs(["a", "b", "c", "d"], [True, True, False, False]).sum())
    2
    """
    ids = [str(r) for r in run_ids]
    if len(set(ids)) != len(ids):
        raise XaiSparsityError("run ids must be unique to split the runs")
    lab = np.asarray(labels, dtype=bool)
    mask = np.zeros(len(ids), dtype=bool)
    for value in (True, False):
        idx = [i for i in range(len(ids)) if lab[i] == value]
        idx.sort(key=lambda i: hashlib.sha256(f"{seed}:{ids[i]}".encode()).hexdigest())
        for k, i in enumerate(idx):
            mask[i] = k % 2 == 0
    return mask


def roc_auc(scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray) -> float:
    """Area under the ROC curve (ties count one half); NaN if a class is missing.

    >>> roc_auc([0.1, 0.4, 0.35, 0.8], [False, False, True, True])
    0.75
    """
    s = np.asarray(scores, dtype=float)
    y = np.asarray(labels, dtype=bool)
    keep = ~np.isnan(s)
    s, y = s[keep], y[keep]
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


@dataclass(frozen=True)
class Confusion:
    """Detector outcome counts on a set of runs (positive: the test loss turned)."""

    tp: int
    fp: int
    fn: int
    tn: int

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


def confusion(fired: Sequence[bool] | np.ndarray, labels: Sequence[bool] | np.ndarray) -> Confusion:
    """Counts of fired/not fired against turned/not turned.

    >>> confusion([True, True, False, False], [True, False, True, False])
    Confusion(tp=1, fp=1, fn=1, tn=1)
    """
    f = np.asarray(fired, dtype=bool)
    y = np.asarray(labels, dtype=bool)
    return Confusion(
        int((f & y).sum()), int((f & ~y).sum()), int((~f & y).sum()), int((~f & ~y).sum())
    )


def _fired(table: pd.DataFrame, column: str) -> np.ndarray:
    if column not in table.columns:
        raise XaiSparsityError(
            f"the summary has no column {column!r}; indicator columns: "
            f"{[c for c in table.columns if c.startswith('fire:')][:12]}"
        )
    return table[column].notna().to_numpy()


def choose_threshold(table: pd.DataFrame, name: str, labels: np.ndarray) -> float:
    """The grid threshold with the largest Youden J on ``table`` (ties: the larger threshold);
    the indicator's default if ``table`` lacks a positive or a negative run."""
    ind = get_indicator(name)
    if labels.all() or not labels.any():
        return ind.default
    best, best_j = ind.default, -math.inf
    for t in sorted(ind.grid):
        j = confusion(_fired(table, fire_column(name, t)), labels).youden
        if j >= best_j:
            best, best_j = t, j
    return best


def score_indicators(
    table: pd.DataFrame,
    indicators: Sequence[str] | None = None,
    *,
    label: str = "turned",
    seed: int = 0,
) -> pd.DataFrame:
    """Score each indicator as a detector of overfitting, held out from its calibration.

    Args:
        table: the study summary (one row per run): ``run_id``, ``label`` (bool), ``t_L`` and the
            indicator columns written by :func:`evaluate_run`.
        indicators: names to score (default: every indicator with columns in ``table``).
        seed: the split seed.

    Returns one row per indicator: ``threshold`` (chosen on the calibration half), counts ``tp, fp,
    fn, tn``, ``precision``, ``recall``, ``false_alarm_rate``, ``auc`` and the lead
    ``t_L - firing epoch`` on the evaluation half's true positives (``lead_median``, ``lead_q25``,
    ``lead_q75``, ``lead_min``, ``lead_max``, ``early_share``: share of them fired at or before
    ``t_L``), plus ``n_eval``, ``n_pos_eval`` and ``base_rate`` (what an always-firing detector's
    precision would be).
    """
    for col in ("run_id", label, "t_L"):
        if col not in table.columns:
            raise XaiSparsityError(
                f"the summary needs a {col!r} column; it has {list(table.columns)}"
            )
    if indicators is None:
        indicators = [n for n in INDICATORS if fire_column(n) in table.columns]
    labels = table[label].astype(bool).to_numpy()
    calib = split_runs(table["run_id"].tolist(), labels, seed)
    cal, ev = table[calib], table[~calib]
    y_cal, y_ev = labels[calib], labels[~calib]
    rows = []
    for name in indicators:
        t = choose_threshold(cal, name, y_cal)
        col = fire_column(name, t)
        fired = _fired(ev, col)
        c = confusion(fired, y_ev)
        tp = fired & y_ev
        lead = (ev["t_L"].to_numpy(dtype=float) - ev[col].to_numpy(dtype=float))[tp]
        score_col = f"score:{name}"
        auc = (
            roc_auc(ev[score_col].to_numpy(dtype=float), y_ev)
            if score_col in ev.columns
            else math.nan
        )
        rows.append(
            {
                "indicator": name,
                "description": get_indicator(name).description,
                "threshold": t,
                "n_eval": len(ev),
                "n_pos_eval": int(y_ev.sum()),
                "tp": c.tp,
                "fp": c.fp,
                "fn": c.fn,
                "tn": c.tn,
                "precision": c.precision,
                "recall": c.recall,
                "false_alarm_rate": c.false_alarm_rate,
                "base_rate": float(y_ev.mean()) if len(y_ev) else math.nan,
                "auc": auc,
                "lead_median": float(np.median(lead)) if len(lead) else math.nan,
                "lead_q25": float(np.quantile(lead, 0.25)) if len(lead) else math.nan,
                "lead_q75": float(np.quantile(lead, 0.75)) if len(lead) else math.nan,
                "lead_min": float(lead.min()) if len(lead) else math.nan,
                "lead_max": float(lead.max()) if len(lead) else math.nan,
                "early_share": float((lead >= 0).mean()) if len(lead) else math.nan,
            }
        )
    return pd.DataFrame(rows)


def leads(table: pd.DataFrame, name: str, threshold: float, label: str = "turned") -> np.ndarray:
    """``t_L - firing epoch`` of ``name`` at ``threshold`` on the runs with ``label`` that fired."""
    col = fire_column(name, threshold)
    y = table[label].astype(bool).to_numpy()
    fired = _fired(table, col) & y
    return (table["t_L"].to_numpy(dtype=float) - table[col].to_numpy(dtype=float))[fired]


__all__ = [
    "INDICATORS",
    "LEVEL_GRID",
    "RISE_GRID",
    "Confusion",
    "Indicator",
    "RunData",
    "choose_threshold",
    "confusion",
    "evaluate_run",
    "feature_layers",
    "fire_column",
    "get_indicator",
    "leads",
    "max_qualifying_rise",
    "roc_auc",
    "score_indicators",
    "split_runs",
]
