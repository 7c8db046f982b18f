"""Paper figures from run directories: one function per figure of the project (SCIENCE.md).

Every function returns a :class:`matplotlib.figure.Figure` built with the object API (no pyplot
state, nothing is shown) and attaches the data it plotted as ``fig.xai_data``: a
:class:`pandas.DataFrame` or a ``dict`` of numpy arrays. :func:`save_figure` writes the figure as
PDF, SVG and PNG together with that data (CSV or npz), each file atomically.

==  ==========================================  ==============================================
#   figure                                      function
==  ==========================================  ==============================================
1   losses + per-layer sparsity, t_L and t_s    :func:`plot_loss_and_sparsity`
2   layer x epoch sparsity heatmap              :func:`plot_sparsity_heatmap`
3   per-filter sparsity and its evolution       :func:`plot_channel_sparsity`
4   spatial sparsity maps beside attributions   :func:`plot_spatial_maps`, :func:`plot_run_spatial_maps`
5   filter correlation, baseline vs penalised   :func:`plot_correlation`, :func:`plot_correlation_over_epochs`
6   regulariser comparison                      :func:`plot_regulariser_comparison`
==  ==========================================  ==============================================

Runs are given as a path or a :class:`~xai_sparsity.runs.rundir.RunDir`; comparisons take a ``dict``
mapping an arm name to a run. Every function accepts ``fig=`` to draw into an existing figure
(cleared first), which lets widgets redraw without creating figures.

Style: :func:`paper_style` is a context manager with presets ``"single"`` (3.5 in column),
``"double"`` (7.1 in) and ``"notebook"``; the colour cycle is Okabe-Ito (colour-blind safe),
sequential maps use ``"viridis"`` and correlations the diverging ``"RdBu_r"`` on [-1, 1].

>>> import tempfile, xai_sparsity as xs
>>> from xai_sparsity.views.figures import plot_sparsity_heatmap, save_figure
>>> run = xs.RunDir(tempfile.mkdtemp(), create=True)
>>> for e in (1, 2, 3):
...     run.append_history({"epoch": e, "test_loss": 1.0 / e, "sparsity:relu1": 0.1 * e})
>>> fig = plot_sparsity_heatmap(run)
>>> fig.xai_data.shape
(1, 3)
>>> [p.suffix for p in save_figure(fig, f"{run.path}/heatmap", formats=("png",))]
['.png', '.csv']
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from xai_sparsity.base.errors import XaiSparsityError, check_choice, closest
from xai_sparsity.measuring.correlation import correlation_summary
from xai_sparsity.runs.rundir import RunDir, as_run
from xai_sparsity.views.plotting import (
    as_numpy,
    attach,
    figure_data,
    grey,
    new_figure,
    normalise_map,
    rc_width,
    to_display,
    upsample,
)

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from xai_sparsity.runs.analysis import Analysis

RunLike = RunDir | str | os.PathLike[str]

OKABE_ITO: tuple[str, ...] = (
    "#0072B2",  # blue
    "#D55E00",  # vermillion
    "#009E73",  # bluish green
    "#CC79A7",  # reddish purple
    "#E69F00",  # orange
    "#56B4E9",  # sky blue
    "#000000",  # black
    "#F0E442",  # yellow (last: weak on white)
)
"""The Okabe-Ito colour-blind-safe palette, ordered for contrast on white."""

SEQUENTIAL_CMAP = "viridis"
DIVERGING_CMAP = "RdBu_r"
ATTRIBUTION_CMAP = "inferno"

COLUMN_WIDTHS = {"single": 3.5, "double": 7.1, "notebook": 9.0}
"""Figure widths in inches: one journal column, two columns, and a notebook cell."""

DATA_FORMATS = ("csv", "npz")
FIGURE_FORMATS = ("pdf", "svg", "png", "jpg", "jpeg", "tif", "tiff", "eps", "ps")


# --------------------------------------------------------------------------- style
def paper_rc(preset: str = "single") -> dict[str, Any]:
    """The matplotlib rc settings of a style preset ("single", "double" or "notebook").

    >>> paper_rc("double")["figure.figsize"]
    (7.1, 2.6)
    """
    from cycler import cycler

    check_choice("preset", preset, tuple(COLUMN_WIDTHS))
    small = preset != "notebook"
    base = 8.0 if small else 11.0
    width = COLUMN_WIDTHS[preset]
    return {
        "figure.figsize": (width, round(width * (0.72 if preset == "single" else 0.366), 2)),
        "figure.dpi": 100,
        "savefig.dpi": 300 if small else 150,
        "savefig.bbox": "tight",
        "savefig.pad_inches": 0.02,
        "font.size": base,
        "axes.titlesize": base,
        "axes.labelsize": base,
        "legend.fontsize": base - 1,
        "xtick.labelsize": base - 1,
        "ytick.labelsize": base - 1,
        "lines.linewidth": 1.2 if small else 1.8,
        "lines.markersize": 3.5 if small else 5.0,
        "axes.linewidth": 0.6 if small else 0.8,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.prop_cycle": cycler(color=list(OKABE_ITO)),
        "image.cmap": SEQUENTIAL_CMAP,
        "legend.frameon": False,
        "pdf.fonttype": 42,  # embed TrueType: editable text in PDF
        "ps.fonttype": 42,
        "svg.fonttype": "none",  # text stays text in SVG
    }


def paper_style(preset: str = "single") -> contextlib.AbstractContextManager[Any]:
    """Context manager applying :func:`paper_rc` (figures created inside use the preset).

    >>> from xai_sparsity.views.figures import paper_style
    >>> with paper_style("double"):
    ...     pass
    """
    import matplotlib as mpl

    rc: Any = paper_rc(preset)
    return mpl.rc_context(rc)


def _colors(n: int) -> list[Any]:
    """n distinct colours: Okabe-Ito up to 7, else evenly spaced viridis (input -> output)."""
    if n <= 7:
        return list(OKABE_ITO[:n])
    import matplotlib as mpl

    cmap = mpl.colormaps[SEQUENTIAL_CMAP]
    return [cmap(v) for v in np.linspace(0.0, 0.9, n)]


# --------------------------------------------------------------------------- run helpers
def _run_name(run: RunDir) -> str:
    return run.name or str(run.path)


def _measures_in(df: pd.DataFrame) -> list[str]:
    return sorted({c.split(":", 1)[0] for c in df.columns if ":" in c})


def _measure_layers(df: pd.DataFrame, measure: str, run: RunDir) -> list[str]:
    """Layers having a ``<measure>:<layer>`` column, in column order (input -> output)."""
    prefix = f"{measure}:"
    layers = [c[len(prefix) :] for c in df.columns if c.startswith(prefix)]
    if not layers:
        raise XaiSparsityError(
            f"measure {measure!r} has no columns in the history of run {_run_name(run)!r}; "
            f"measures available: {_measures_in(df)}"
        )
    return layers


def _check_layers(layers: Sequence[str], valid: Sequence[str], what: str) -> list[str]:
    if isinstance(layers, str):
        layers = [layers]
    bad = [n for n in layers if n not in valid]
    if bad:
        hint = closest(bad[0], valid, n=3)
        raise XaiSparsityError(
            f"layer(s) {bad} not found in {what}; valid layers: {list(valid)}"
            + (f" (closest to {bad[0]!r}: {hint})" if hint else "")
        )
    return list(layers)


def _history(run: RunDir) -> pd.DataFrame:
    df = run.history()
    if df.empty:
        raise XaiSparsityError(f"run {_run_name(run)!r} has no history rows yet")
    return df


def _load_arrays(run: RunDir, epoch: int | None) -> tuple[int, dict[str, np.ndarray]]:
    epochs = run.array_epochs()
    if not epochs:
        raise XaiSparsityError(
            f"run {_run_name(run)!r} has no per-epoch arrays (arrays/epoch_NNNN.npz)"
        )
    chosen = epochs[-1] if epoch is None else int(epoch)
    if chosen not in epochs:
        raise XaiSparsityError(
            f"epoch {epoch!r} has no arrays in run {_run_name(run)!r}; epochs with arrays: {epochs}"
        )
    return chosen, run.load_arrays(chosen)


def _array(
    run: RunDir, arrays: Mapping[str, np.ndarray], kind: str, layer: str, epoch: int
) -> np.ndarray:
    key = f"{kind}:{layer}"
    if key not in arrays:
        have = [k.split(":", 1)[1] for k in arrays if k.startswith(f"{kind}:")]
        if not have:
            raise XaiSparsityError(
                f"the arrays of epoch {epoch} in run {_run_name(run)!r} have no {kind!r} entries; "
                f"keys: {sorted(arrays)}"
            )
        _check_layers(
            [layer], have, f"the {kind!r} arrays of epoch {epoch} of run {_run_name(run)!r}"
        )
    return np.asarray(arrays[key])


def _as_runs(runs: Mapping[str, RunLike] | RunLike) -> dict[str, RunDir]:
    if isinstance(runs, Mapping):
        if not runs:
            raise XaiSparsityError("runs is an empty mapping; give at least one arm")
        return {str(k): as_run(v) for k, v in runs.items()}
    run = as_run(runs)
    return {_run_name(run): run}


def _mark_epoch(ax: Axes, epoch: float, color: str, label: str | None, style: str = "--") -> None:
    ax.axvline(epoch, color=color, linestyle=style, linewidth=0.9, alpha=0.9, label=label)


# --------------------------------------------------------------------------- figure 1
def plot_loss_and_sparsity(
    run: RunLike,
    layers: Sequence[str] | None = None,
    *,
    measure: str = "sparsity",
    analysis: Analysis | None = None,
    accuracy: bool = False,
    fig: Figure | None = None,
) -> Figure:
    """Figure 1: train/test loss (top) and per-layer sparsity (bottom) over the same epochs.

    The epoch of the smoothed test-loss minimum ``t_L`` is a dashed black line on both panels
    (only when the test loss turned, ``analysis.turned``; otherwise the loss panel says so);
    each layer's sustained-rise onset ``t_s,l`` is a dotted line and a marker in the layer's colour.
    ``analysis`` defaults to ``xai_sparsity.runs.analysis.analyze(run, layers, measure=measure)``.

    Args:
        run: run directory (path or RunDir).
        layers: layers to draw (default: every layer with a ``<measure>:<layer>`` column).
        measure: history column prefix, e.g. "sparsity", "hoyer", "zero_fraction", "correlation".
        analysis: a precomputed :class:`~xai_sparsity.runs.analysis.Analysis`.
        accuracy: also draw train/test accuracy in a third panel.
        fig: draw into this figure (cleared) instead of a new one.

    Returns:
        The figure; ``fig.xai_data`` is a DataFrame with columns ``epoch``, ``train_loss``,
        ``test_loss`` (and accuracies) and ``<measure>:<layer>`` per layer; its ``attrs`` hold
        ``t_L``, ``turned`` and ``t_s`` (dict layer -> epoch or None).
    """
    r = as_run(run)
    df = _history(r)
    valid = _measure_layers(df, measure, r)
    chosen = valid if layers is None else _check_layers(layers, valid, f"run {_run_name(r)!r}")
    if analysis is None and "test_loss" in df.columns and df["test_loss"].notna().any():
        from xai_sparsity.runs.analysis import analyze

        analysis = analyze(r, chosen, measure=measure)
    loss_cols = [c for c in ("train_loss", "test_loss") if c in df.columns]
    acc_cols = [c for c in ("train_acc", "test_acc") if accuracy and c in df.columns]
    cols = ["epoch", *loss_cols, *acc_cols, *(f"{measure}:{n}" for n in chosen)]
    data = df[cols].copy()
    t_L = analysis.t_L if analysis is not None else None
    turned = bool(analysis.turned) if analysis is not None else False
    t_s = {n: analysis.t_s.get(n) for n in chosen} if analysis is not None else {}
    data.attrs = {"t_L": t_L, "turned": turned, "t_s": t_s, "measure": measure}

    n_panels = 3 if acc_cols else 2
    w = rc_width()
    fig = new_figure(fig, w, min(0.42 * w, 2.6) * n_panels + 0.35)
    axes = fig.subplots(n_panels, 1, sharex=True)
    ax_loss, ax_s = axes[0], axes[-1]
    _draw_loss_and_accuracy(axes, data, loss_cols, acc_cols)
    _draw_layer_curves(ax_s, data, chosen, measure, t_s)
    if t_L is not None and turned:
        _mark_turn(axes, t_L)
    elif analysis is not None:
        ax_loss.text(
            0.99,
            0.98,
            "the test loss did not turn: no lead",
            transform=ax_loss.transAxes,
            ha="right",
            va="top",
            fontsize="small",
        )
    ax_loss.legend(loc="best")
    ax_s.set_ylabel(measure.replace("_", " "))
    ax_s.set_xlabel("epoch")
    ax_s.legend(
        loc="best", ncol=2 if len(chosen) > 4 else 1, title="dotted: $t_s$" if t_s else None
    )
    return attach(fig, data)


def _draw_loss_and_accuracy(
    axes: Sequence[Axes], data: pd.DataFrame, loss_cols: list[str], acc_cols: list[str]
) -> None:
    """The loss curves in the first panel and, if asked, the accuracies in the second."""
    epochs = data["epoch"].to_numpy()
    styles = {"train_loss": ("#000000", "-"), "test_loss": ("#D55E00", "-")}
    for c in loss_cols:
        color, ls = styles[c]
        axes[0].plot(epochs, data[c], color=color, linestyle=ls, label=c.replace("_", " "))
    axes[0].set_ylabel("loss")
    if acc_cols:
        ax_acc = axes[1]
        for c, color in zip(acc_cols, ("#000000", "#D55E00"), strict=False):
            ax_acc.plot(epochs, data[c], color=color, label=c.replace("_", " "))
        ax_acc.set_ylabel("accuracy")
        ax_acc.legend(loc="best")


def _draw_layer_curves(
    ax: Axes, data: pd.DataFrame, layers: list[str], measure: str, t_s: Mapping[str, int | None]
) -> None:
    """One curve per layer, with its rise onset ``t_s`` as a dotted line and a marker."""
    epochs = data["epoch"].to_numpy()
    for name, color in zip(layers, _colors(len(layers)), strict=True):
        y = data[f"{measure}:{name}"].to_numpy(dtype=float)
        ax.plot(epochs, y, color=color, label=name)
        t = t_s.get(name)
        if t is not None:
            _mark_epoch(ax, t, color, None, style=":")
            hit = np.flatnonzero(epochs == t)
            if hit.size:
                ax.plot([t], [y[hit[0]]], marker="o", color=color, linestyle="none")


def _mark_turn(axes: Sequence[Axes], t_L: int) -> None:
    """``t_L`` as a dashed line on every panel, labelled on the first."""
    for ax in axes:
        _mark_epoch(ax, t_L, "#000000", None)
    axes[0].annotate(
        "$t_L$",
        (t_L, 1.0),
        xycoords=("data", "axes fraction"),
        ha="left",
        va="top",
        xytext=(2, 0),
        textcoords="offset points",
    )


# --------------------------------------------------------------------------- figure 2
def plot_sparsity_heatmap(
    run: RunLike,
    *,
    measure: str = "sparsity",
    layers: Sequence[str] | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    analysis: Analysis | None = None,
    fig: Figure | None = None,
) -> Figure:
    """Figure 2: layer x epoch heatmap of ``<measure>:<layer>``, rows from input (top) to output.

    Args:
        run: run directory (path or RunDir).
        measure: history column prefix ("sparsity", "hoyer", "zero_fraction", ...).
        layers: a subset of layers (default all, in history column order).
        vmin, vmax: colour range (default: the data's range).
        analysis: if given, ``t_L`` is drawn as a dashed white line.
        fig: draw into this figure (cleared) instead of a new one.

    Returns:
        The figure; ``fig.xai_data`` is a DataFrame (rows: layers, index name "layer"; columns:
        epochs) of the plotted values.
    """
    r = as_run(run)
    df = _history(r)
    valid = _measure_layers(df, measure, r)
    chosen = valid if layers is None else _check_layers(layers, valid, f"run {_run_name(r)!r}")
    epochs = df["epoch"].astype(int).to_numpy()
    values = np.stack([df[f"{measure}:{n}"].to_numpy(dtype=float) for n in chosen])
    data = pd.DataFrame(values, index=pd.Index(chosen, name="layer"), columns=list(epochs))

    w = rc_width()
    fig = new_figure(fig, w, max(1.4, 0.6 + 0.22 * len(chosen)))
    ax = fig.add_subplot()
    step = float(np.median(np.diff(epochs))) if len(epochs) > 1 else 1.0
    extent = (epochs[0] - step / 2, epochs[-1] + step / 2, len(chosen) - 0.5, -0.5)
    im = ax.imshow(
        values,
        aspect="auto",
        interpolation="nearest",
        cmap=SEQUENTIAL_CMAP,
        vmin=vmin,
        vmax=vmax,
        extent=extent,
    )
    ax.set_yticks(range(len(chosen)), chosen)
    ax.set_xlabel("epoch")
    ax.set_ylabel("layer (input → output)")
    if analysis is not None and analysis.t_L is not None:
        _mark_epoch(ax, analysis.t_L, "white", None)
    fig.colorbar(im, ax=ax, label=measure.replace("_", " "), shrink=0.9)
    return attach(fig, data)


# --------------------------------------------------------------------------- saving
def _atomic_write(path: Path, write: Any) -> None:
    """Call ``write(file_object)`` on a temp file in ``path``'s folder, fsync, then rename."""
    from xai_sparsity.base.files import atomic_open

    with atomic_open(path) as fh:
        write(fh)


def save_figure(
    fig: Figure,
    path_stem: str | os.PathLike[str],
    data: pd.DataFrame | Mapping[str, Any] | None = None,
    formats: Sequence[str] = ("pdf", "svg", "png"),
    *,
    dpi: float | None = None,
) -> list[Path]:
    """Save ``fig`` as each of ``formats`` plus the data behind it, every file atomically.

    Args:
        fig: the figure.
        path_stem: path without suffix; ``"out/fig1"`` writes ``out/fig1.pdf``, ``out/fig1.svg``...
        data: the data to write beside it (default: ``fig.xai_data`` attached by the figure
            functions). A DataFrame is written as ``<stem>.csv`` (with its index when it is named
            or not a plain range), a mapping of arrays as ``<stem>.npz``.
        formats: figure formats (matplotlib names); ``()`` writes only the data.
        dpi: resolution of raster formats (default: rcParams ``savefig.dpi``).

    Returns:
        The written paths: figures in ``formats`` order, then the data file (if any).
    """
    formats = tuple(f.lower().lstrip(".") for f in formats)
    for f in formats:
        check_choice("format", f, FIGURE_FORMATS)
    stem = Path(path_stem)
    if data is None:
        data = figure_data(fig)
    if data is not None and not isinstance(data, (pd.DataFrame, Mapping)):
        raise XaiSparsityError(
            f"data must be a pandas DataFrame or a mapping of arrays; got {type(data).__name__}"
        )
    written: list[Path] = []
    for f in formats:
        target = stem.with_name(f"{stem.name}.{f}")
        _atomic_write(target, lambda fh, f=f: fig.savefig(fh, format=f, dpi=dpi))
        written.append(target)
    if isinstance(data, pd.DataFrame):
        target = stem.with_name(f"{stem.name}.csv")
        keep_index = data.index.name is not None or not isinstance(data.index, pd.RangeIndex)
        text = data.to_csv(index=keep_index)
        _atomic_write(target, lambda fh: fh.write(text.encode("utf-8")))
        written.append(target)
    elif data is not None:
        import io

        arrays: dict[str, Any] = {str(k): np.asarray(v) for k, v in data.items()}
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        target = stem.with_name(f"{stem.name}.npz")
        _atomic_write(target, lambda fh: fh.write(buf.getvalue()))
        written.append(target)
    return written


# --------------------------------------------------------------------------- figure 3
def _load_key(run: RunDir, epoch: int, key: str) -> np.ndarray | None:
    """One array of one epoch's npz (read lazily: only that key), or None if absent."""
    with np.load(run.arrays_dir / f"epoch_{int(epoch):04d}.npz") as data:
        return np.asarray(data[key]) if key in data.files else None


def plot_channel_sparsity(
    run: RunLike,
    layer: str,
    *,
    epoch: int | None = None,
    fig: Figure | None = None,
) -> Figure:
    """Figure 3: per-filter sparsity of one layer at ``epoch`` (sorted bars, left) and its
    evolution over the epochs that have arrays (channels x epochs heatmap, right).

    Both panels order the channels by their sparsity at ``epoch`` (most sparse first), so a row
    of the heatmap continues a bar of the left panel.

    Args:
        run: run directory (path or RunDir) with ``channel:<layer>`` arrays.
        layer: the layer.
        epoch: an epoch with arrays (default: the last one).
        fig: draw into this figure (cleared).

    Returns:
        The figure; ``fig.xai_data`` is a dict with ``epochs`` (E,), ``channel_sparsity`` (E, C)
        in channel-index order, ``epoch`` (the selected epoch, 0-d) and ``order`` (C,), the
        channel indices sorted by sparsity at that epoch.
    """
    r = as_run(run)
    chosen, arrays = _load_arrays(r, epoch)
    current = _array(r, arrays, "channel", layer, chosen).astype(float).reshape(-1)
    epochs: list[int] = []
    rows: list[np.ndarray] = []
    for e in r.array_epochs():
        v = current if e == chosen else _load_key(r, e, f"channel:{layer}")
        if v is None:
            continue
        v = np.asarray(v, dtype=float).reshape(-1)
        if v.shape != current.shape:
            raise XaiSparsityError(
                f"channel:{layer} has {v.size} channels at epoch {e} but {current.size} at "
                f"epoch {chosen}; the run's layers changed between epochs"
            )
        epochs.append(e)
        rows.append(v)
    evolution = np.stack(rows)
    order = np.argsort(-current, kind="stable")
    data = {
        "epochs": np.asarray(epochs),
        "channel_sparsity": evolution,
        "epoch": np.asarray(chosen),
        "order": order,
    }

    w = rc_width()
    fig = new_figure(fig, w, max(1.8, w * 0.45))
    ax_bar, ax_map = fig.subplots(1, 2, width_ratios=(1, 1.4))
    c = current.size
    ax_bar.bar(np.arange(c), current[order], width=1.0, color=OKABE_ITO[0], linewidth=0)
    ax_bar.axhline(float(current.mean()), color="#000000", linestyle="--", linewidth=0.8)
    ax_bar.set_xlabel("channel (sorted)")
    ax_bar.set_ylabel("sparsity")
    ax_bar.set_title(f"{layer}, epoch {chosen}")
    ax_bar.set_xlim(-0.5, c - 0.5)
    ep = np.asarray(epochs, dtype=float)
    half = (np.median(np.diff(ep)) if ep.size > 1 else 1.0) / 2
    im = ax_map.imshow(
        evolution[:, order].T,
        aspect="auto",
        interpolation="nearest",
        cmap=SEQUENTIAL_CMAP,
        extent=(ep[0] - half, ep[-1] + half, c - 0.5, -0.5),
    )
    ax_map.axvline(chosen, color="white", linestyle=":", linewidth=0.9)
    ax_map.set_xlabel("epoch")
    ax_map.set_ylabel("channel (sorted)")
    fig.colorbar(im, ax=ax_map, label="sparsity", shrink=0.9)
    return attach(fig, data)


# --------------------------------------------------------------------------- figure 4
def plot_spatial_maps(
    images: Any,
    maps: Any,
    *,
    attributions: Any = None,
    feature_maps: Any = None,
    titles: Sequence[str] | None = None,
    column_titles: Mapping[str, str] | None = None,
    alpha: float = 0.55,
    sparsity_range: tuple[float, float] | None = (0.0, 1.0),
    fig: Figure | None = None,
) -> Figure:
    """Figure 4: spatial sparsity maps upsampled over the input images, beside attributions and
    feature maps. One row per image.

    Columns: the input; its spatial sparsity map (bilinearly upsampled to the image size, drawn
    over the grey input with ``viridis``, by default on the fixed range [0, 1]); each attribution (scaled to
    its own max, ``inferno``); the feature map (shown at its own resolution).

    Args:
        images: (K, C, H, W) or (K, H, W) images (tensor or array).
        maps: (K, h, w) spatial sparsity maps (``scope="spatial"``) of a layer.
        attributions: (K, H', W') maps, or a mapping method name -> (K, H', W') (see
            :func:`xai_sparsity.views.attributions.attribute`); upsampled to (H, W) if needed.
        feature_maps: (K, h, w), or (K, C, h, w) shown as the mean over channels.
        titles: per-image row labels (e.g. class names).
        column_titles: override column titles by key: "input", "sparsity", "features", or a
            method name.
        alpha: opacity of the overlays.
        sparsity_range: colour range of the sparsity maps (default the measure's [0, 1], the same
            for every image); None: the range of the given maps (more contrast).
        fig: draw into this figure (cleared).

    Returns:
        The figure; ``fig.xai_data`` is a dict of arrays: ``images``, ``spatial_sparsity``
        (K, h, w), ``spatial_sparsity_upsampled`` (K, H, W), ``attribution:<method>`` (K, H, W)
        and ``feature_maps`` (K, h, w) when given.
    """

    imgs, sp = _spatial_inputs(images, maps)
    k, size = imgs.shape[0], (int(imgs.shape[2]), int(imgs.shape[3]))
    up = upsample(sp, size)
    attrs = _spatial_attributions(attributions, k, size)
    feats = _spatial_features(feature_maps, k)
    if titles is not None and len(titles) != k:
        raise XaiSparsityError(f"got {len(titles)} titles for {k} images")
    heads = {"input": "input", "sparsity": "spatial sparsity", "features": "feature map"}
    heads |= {n: n.replace("_", " ") for n in attrs} | dict(column_titles or {})
    columns = ["input", "sparsity", *attrs, *(["features"] if feats is not None else [])]
    lo, hi = sparsity_range if sparsity_range is not None else (float(sp.min()), float(sp.max()))

    w = rc_width()
    cell = w / len(columns)
    fig = new_figure(fig, w, cell * k + 0.45)
    axes = np.asarray(fig.subplots(k, len(columns), squeeze=False))
    sparsity_image = None
    for i in range(k):
        cells = {"input": imgs[i], "sparsity": up[i]}
        cells.update({n: m[i] for n, m in attrs.items()})
        if feats is not None:
            cells["features"] = feats[i]
        for j, col in enumerate(columns):
            shown = _spatial_cell(axes[i, j], col, cells[col], imgs[i], (lo, hi), alpha)
            sparsity_image = shown if col == "sparsity" else sparsity_image
            if i == 0:
                axes[i, j].set_title(heads[col])
        if titles is not None:
            axes[i, 0].set_ylabel(str(titles[i]))
    if sparsity_image is not None:
        fig.colorbar(
            sparsity_image,
            ax=axes[:, 1].tolist(),
            location="bottom",
            shrink=0.9,
            label="sparsity",
            aspect=15,
        )
    data = {"images": imgs, "spatial_sparsity": sp, "spatial_sparsity_upsampled": up}
    data.update({f"attribution:{n}": a for n, a in attrs.items()})
    return attach(fig, data if feats is None else {**data, "feature_maps": feats})


def _spatial_cell(
    ax: Axes,
    column: str,
    values: np.ndarray,
    image: np.ndarray,
    sparsity_range: tuple[float, float],
    alpha: float,
) -> Any:
    """One cell of :func:`plot_spatial_maps`: the input, a map over the grey input, or a feature
    map; returns the artist of the map."""
    if column == "input":
        shown = to_display(image)
        artist = ax.imshow(shown, cmap="gray" if shown.ndim == 2 else None)
    elif column == "features":
        artist = ax.imshow(values, cmap="magma", interpolation="nearest")
    else:
        ax.imshow(grey(image), cmap="gray")
        if column == "sparsity":
            lo, hi = sparsity_range
            artist = ax.imshow(values, cmap=SEQUENTIAL_CMAP, vmin=lo, vmax=hi, alpha=alpha)
        else:
            heat = normalise_map(values)
            artist = ax.imshow(heat, cmap=ATTRIBUTION_CMAP, vmin=0, vmax=1, alpha=alpha)
    ax.set_xticks([])
    ax.set_yticks([])
    return artist


def _spatial_inputs(images: Any, maps: Any) -> tuple[np.ndarray, np.ndarray]:
    """(K, C, H, W) images and (K, h, w) maps of :func:`plot_spatial_maps`, checked."""
    imgs = as_numpy(images)
    if imgs.ndim == 3:
        imgs = imgs[:, None]
    if imgs.ndim != 4:
        raise XaiSparsityError(f"images must be (K, C, H, W) or (K, H, W); got shape {imgs.shape}")
    k = imgs.shape[0]
    sp = as_numpy(maps)
    if sp.ndim != 3 or sp.shape[0] != k:
        raise XaiSparsityError(f"maps must be (K, h, w) with K = {k} images; got shape {sp.shape}")
    return imgs, sp


def _spatial_attributions(
    attributions: Any, k: int, size: tuple[int, int]
) -> dict[str, np.ndarray]:
    """Method name -> (K, H, W) attribution maps upsampled to the image ``size`` (checked)."""
    attrs: dict[str, np.ndarray] = {}
    if attributions is None:
        return attrs
    given = attributions if isinstance(attributions, Mapping) else {"attribution": attributions}
    for name, a in given.items():
        arr = as_numpy(a)
        if arr.ndim != 3 or arr.shape[0] != k:
            raise XaiSparsityError(
                f"attributions {name!r} must be (K, H, W) with K = {k}; got shape {arr.shape}"
            )
        attrs[str(name)] = upsample(arr, size)
    return attrs


def _spatial_features(feature_maps: Any, k: int) -> np.ndarray | None:
    """(K, h, w) feature maps (the channel mean of (K, C, h, w) ones), checked; or None."""
    if feature_maps is None:
        return None
    feats = as_numpy(feature_maps)
    if feats.ndim == 4:
        feats = feats.mean(axis=1)
    if feats.ndim != 3 or feats.shape[0] != k:
        raise XaiSparsityError(
            f"feature_maps must be (K, h, w) or (K, C, h, w) with K = {k}; got {feats.shape}"
        )
    return feats


def plot_run_spatial_maps(
    run: RunLike,
    layer: str,
    epoch: int | None = None,
    *,
    max_images: int | None = 4,
    model: Any = None,
    method: str | Sequence[str] | None = "saliency",
    sparsity_range: tuple[float, float] | None = (0.0, 1.0),
    fig: Figure | None = None,
) -> Figure:
    """Figure 4 from a run directory: the ``spatial:<layer>`` maps of the fixed probe images
    (``probe.npz``) at ``epoch``.

    With a ``model`` (e.g. the run's best or last weights loaded by the caller) the figure adds
    its Captum attribution(s) ``method`` and the layer's feature map (channel mean, captured
    with :func:`xai_sparsity.capturing.hooks.capture`); the sparsity maps stay those of ``epoch``.

    Args:
        run: run directory with ``spatial:<layer>`` arrays and ``probe.npz``.
        layer: the layer.
        epoch: an epoch with arrays (default: the last one).
        max_images: at most this many probe images (None: all stored maps).
        model: optional model for attributions and feature maps.
        method: attribution method(s) of :func:`xai_sparsity.views.attributions.attribute`; None: none.
        sparsity_range: colour range of the maps, see :func:`plot_spatial_maps`.
        fig: draw into this figure (cleared).

    Returns:
        The figure of :func:`plot_spatial_maps` (same ``fig.xai_data``, plus ``labels``).
    """
    r = as_run(run)
    chosen, arrays = _load_arrays(r, epoch)
    maps = _array(r, arrays, "spatial", layer, chosen)
    probe = r.load_probe()
    images = np.asarray(probe["images"])
    k = (
        min(len(maps), len(images))
        if max_images is None
        else min(len(maps), len(images), max_images)
    )
    if k < 1:
        raise XaiSparsityError(f"run {_run_name(r)!r} has no probe images for spatial maps")
    images, maps = images[:k], maps[:k]
    labels = probe.get("labels")
    titles = [f"label {int(v)}" for v in labels[:k]] if labels is not None else None
    attributions, features = None, None
    if model is not None:
        attributions, features = _model_maps(model, images, layer, method)
    fig = plot_spatial_maps(
        images,
        maps,
        attributions=attributions,
        feature_maps=features,
        titles=titles,
        sparsity_range=sparsity_range,
        fig=fig,
    )
    fig.suptitle(f"{layer}, epoch {chosen}")
    data = figure_data(fig)
    if isinstance(data, dict) and labels is not None:
        data["labels"] = np.asarray(labels[:k])
    return fig


def _model_maps(
    model: Any, images: np.ndarray, layer: str, method: str | Sequence[str] | None
) -> tuple[dict[str, Any] | None, Any]:
    """The attribution maps (method -> (K, H, W); None for no method) of ``images`` and the
    (K, C, h, w) output of ``layer``, from ``model`` in eval mode."""
    import torch

    from xai_sparsity.base.modules import eval_mode
    from xai_sparsity.capturing.hooks import capture
    from xai_sparsity.views.attributions import attribute

    x = torch.as_tensor(images, dtype=torch.float32)
    methods = [method] if isinstance(method, str) else list(method or [])
    attributions = {m: attribute(model, x, method=m) for m in methods} or None
    param = next(iter(model.parameters()), None)
    with (
        eval_mode(model),
        torch.no_grad(),
        capture(model, [layer], mode="keep", clone=True) as cap,
    ):
        model(x.to(param.device) if param is not None else x)
    return attributions, cap.activations[layer]


# --------------------------------------------------------------------------- figure 5
def plot_correlation(
    runs: Mapping[str, RunLike] | RunLike,
    layer: str,
    *,
    epoch: int | None = None,
    fig: Figure | None = None,
) -> Figure:
    """Figure 5a: filter-correlation matrices of ``layer`` side by side, one per arm (e.g.
    baseline vs penalised), diverging ``RdBu_r`` on [-1, 1], mean |r| in each title.

    Args:
        runs: a run, or a mapping arm name -> run (drawn in mapping order).
        layer: the layer (needs ``correlation:<layer>`` arrays).
        epoch: an epoch with arrays in every run (default: each run's last one).
        fig: draw into this figure (cleared).

    Returns:
        The figure; ``fig.xai_data`` is a dict with ``correlation:<arm>`` (C, C) and
        ``epoch:<arm>`` (0-d) per arm.
    """
    arms = _as_runs(runs)
    mats: dict[str, tuple[int, np.ndarray]] = {}
    for arm, run_ in arms.items():
        chosen, arrays = _load_arrays(run_, epoch)
        mats[arm] = (chosen, _array(run_, arrays, "correlation", layer, chosen).astype(float))
    n = len(mats)
    w = rc_width()
    fig = new_figure(fig, w, w / n * 1.05 + 0.4)
    axes = np.atleast_1d(fig.subplots(1, n, squeeze=False)[0])
    im = None
    for ax, (arm, (chosen, mat)) in zip(axes, mats.items(), strict=True):
        im = ax.imshow(mat, cmap=DIVERGING_CMAP, vmin=-1.0, vmax=1.0, interpolation="nearest")
        ax.set_title(f"{arm} (epoch {chosen})\nmean |r| = {correlation_summary(mat):.2f}")
        ax.set_xlabel("channel")
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].set_ylabel(f"{layer}\nchannel")
    assert im is not None
    fig.colorbar(im, ax=axes.tolist(), label="Pearson r", shrink=0.8)
    data: dict[str, np.ndarray] = {}
    for arm, (chosen, mat) in mats.items():
        data[f"correlation:{arm}"] = mat
        data[f"epoch:{arm}"] = np.asarray(chosen)
    return attach(fig, data)


def _common_layers(
    arms: Mapping[str, RunDir], measure: str
) -> tuple[dict[str, pd.DataFrame], list[str]]:
    histories = {arm: _history(r) for arm, r in arms.items()}
    per_arm = {arm: _measure_layers(h, measure, arms[arm]) for arm, h in histories.items()}
    first = next(iter(per_arm.values()))
    common = [n for n in first if all(n in v for v in per_arm.values())]
    if not common:
        raise XaiSparsityError(f"the runs share no layer with a {measure!r} column: {per_arm}")
    return histories, common


def plot_correlation_over_epochs(
    runs: Mapping[str, RunLike] | RunLike,
    layers: Sequence[str] | None = None,
    *,
    fig: Figure | None = None,
) -> Figure:
    """Figure 5b: mean |r| of the filter correlation per layer over epochs (history columns
    ``correlation:<layer>``).

    One run (or a one-arm mapping): one panel, a line per layer. Several arms: one panel per
    layer, a line per arm.

    Returns:
        The figure; ``fig.xai_data`` is a long DataFrame with columns ``arm``, ``layer``,
        ``epoch``, ``mean_abs_r``.
    """
    arms = _as_runs(runs)
    histories, common = _common_layers(arms, "correlation")
    chosen = (
        common if layers is None else _check_layers(layers, common, "the runs' correlation columns")
    )
    frames = [
        pd.DataFrame(
            {
                "arm": arm,
                "layer": n,
                "epoch": h["epoch"].astype(int).to_numpy(),
                "mean_abs_r": h[f"correlation:{n}"].to_numpy(dtype=float),
            }
        )
        for arm, h in histories.items()
        for n in chosen
    ]
    data = pd.concat(frames, ignore_index=True)
    w = rc_width()
    if len(arms) == 1:
        fig = new_figure(fig, w, w * 0.55)
        ax = fig.add_subplot()
        for n, color in zip(chosen, _colors(len(chosen)), strict=True):
            sel = data[data["layer"] == n]
            ax.plot(sel["epoch"], sel["mean_abs_r"], color=color, label=n)
        ax.set_xlabel("epoch")
        ax.set_ylabel("mean |r|")
        ax.legend(loc="best", ncol=2 if len(chosen) > 4 else 1)
        return attach(fig, data)
    cols = min(3, len(chosen))
    rows_n = -(-len(chosen) // cols)
    fig = new_figure(fig, w, w / cols * 0.8 * rows_n + 0.3)
    axes = np.asarray(fig.subplots(rows_n, cols, squeeze=False, sharex=True, sharey=True))
    colors = dict(zip(arms, _colors(len(arms)), strict=True))
    for ax, n in zip(axes.flat, chosen, strict=False):
        for arm in arms:
            sel = data[(data["layer"] == n) & (data["arm"] == arm)]
            ax.plot(sel["epoch"], sel["mean_abs_r"], color=colors[arm], label=arm)
        ax.set_title(n)
    for ax in axes.flat[len(chosen) :]:
        ax.set_visible(False)
    for idx, ax in enumerate(axes.flat[: len(chosen)]):
        if idx + cols >= len(chosen):  # nothing drawn below this panel: label its x axis
            ax.xaxis.set_tick_params(labelbottom=True)
            ax.set_xlabel("epoch")
    for ax in axes[:, 0]:
        ax.set_ylabel("mean |r|")
    axes.flat[0].legend(loc="best")
    return attach(fig, data)


# --------------------------------------------------------------------------- figure 6
def plot_regulariser_comparison(
    runs: Mapping[str, RunLike],
    *,
    layer: str | None = None,
    measure: str = "sparsity",
    fig: Figure | None = None,
) -> Figure:
    """Figure 6: test loss, test accuracy and sparsity over epochs, one line per arm (e.g.
    "none", "dropout", "batch norm", "sparsity penalty"); a dot marks each arm's lowest test loss.

    Args:
        runs: mapping arm name -> run (drawn in mapping order, Okabe-Ito colours).
        layer: the layer whose ``<measure>`` is drawn; None: the deepest layer measured in every
            run (the last common ``<measure>:`` column); ``"mean"``: the mean over common layers.
        measure: history column prefix of the third panel.
        fig: draw into this figure (cleared).

    Returns:
        The figure; ``fig.xai_data`` is a long DataFrame with columns ``arm``, ``epoch``,
        ``test_loss``, ``test_acc`` and ``<measure>:<layer>`` (``<measure>:mean`` for "mean").
    """
    if not isinstance(runs, Mapping):
        raise XaiSparsityError("plot_regulariser_comparison needs a mapping arm name -> run")
    arms = _as_runs(runs)
    histories, common = _common_layers(arms, measure)
    if layer is None:
        layer = common[-1]
    elif layer != "mean":
        _check_layers([layer], [*common, "mean"], f"every run's {measure!r} columns")
    col = f"{measure}:{layer}"
    frames = []
    for arm, h in histories.items():
        for needed in ("test_loss", "test_acc"):
            if needed not in h.columns:
                raise XaiSparsityError(f"run {arm!r} has no {needed!r} column")
        values = h[[f"{measure}:{n}" for n in common]].mean(axis=1) if layer == "mean" else h[col]
        frames.append(
            pd.DataFrame(
                {
                    "arm": arm,
                    "epoch": h["epoch"].astype(int).to_numpy(),
                    "test_loss": h["test_loss"].to_numpy(dtype=float),
                    "test_acc": h["test_acc"].to_numpy(dtype=float),
                    col: values.to_numpy(dtype=float),
                }
            )
        )
    data = pd.concat(frames, ignore_index=True)

    w = rc_width()
    wide = w >= 5.0
    fig = new_figure(fig, w, w * 0.36 if wide else w * 1.35)
    axes = fig.subplots(1, 3, sharex=True) if wide else fig.subplots(3, 1, sharex=True)
    colors = dict(zip(arms, _colors(len(arms)), strict=True))
    panels = (
        ("test_loss", "test loss"),
        ("test_acc", "test accuracy"),
        (col, f"{measure.replace('_', ' ')} ({layer})"),
    )
    for ax, (key, label) in zip(axes, panels, strict=True):
        for arm in arms:
            sel = data[data["arm"] == arm]
            ax.plot(sel["epoch"], sel[key], color=colors[arm], label=arm)
            if key == "test_loss" and sel["test_loss"].notna().any():
                i = int(np.nanargmin(sel["test_loss"].to_numpy(dtype=float)))
                best = sel.iloc[i]
                ax.plot([best["epoch"]], [best["test_loss"]], "o", color=colors[arm])
        ax.set_ylabel(label)
    for ax in axes if wide else axes[-1:]:
        ax.set_xlabel("epoch")
    axes[0].legend(loc="best")
    return attach(fig, data)
