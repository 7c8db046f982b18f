"""Figure and image helpers shared by the figures, the attribution plots and the widgets."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from matplotlib.figure import Figure

__all__ = [
    "as_numpy",
    "attach",
    "figure_data",
    "grey",
    "new_figure",
    "normalise_map",
    "rc_width",
    "to_display",
    "upsample",
]


def rc_width() -> float:
    """The current default figure width in inches (``figure.figsize`` of the rc settings)."""
    import matplotlib as mpl

    return float(mpl.rcParams["figure.figsize"][0])


def new_figure(fig: Figure | None, width: float, height: float) -> Figure:
    """A new constrained-layout figure, or ``fig`` cleared and resized."""
    from matplotlib.figure import Figure

    if fig is None:
        return Figure(figsize=(width, height), layout="constrained")
    fig.clear()
    fig.set_size_inches(width, height)
    with contextlib.suppress(Exception):
        fig.set_layout_engine("constrained")
    return fig


def attach(fig: Figure, data: pd.DataFrame | dict[str, np.ndarray]) -> Figure:
    """Attach the data a figure shows to it (read back by :func:`figure_data`)."""
    fig.xai_data = data  # type: ignore[attr-defined]
    return fig


def figure_data(fig: Figure) -> pd.DataFrame | dict[str, np.ndarray] | None:
    """The data a figure function attached to ``fig`` (``fig.xai_data``), or None."""
    return getattr(fig, "xai_data", None)


def as_numpy(x: Any) -> np.ndarray:
    """A tensor (detached, float, on the CPU) or array-like as a float32 numpy array."""
    if hasattr(x, "detach"):
        return np.asarray(x.detach().float().cpu().numpy())
    return np.asarray(x, dtype=np.float32)


def to_display(img: Any) -> np.ndarray:
    """(C, H, W) or (H, W) image -> (H, W) grey or (H, W, 3) RGB scaled to [0, 1] (min-max)."""
    a = as_numpy(img).astype(np.float32)
    if a.ndim == 3 and a.shape[0] in (1, 3):
        a = a[0] if a.shape[0] == 1 else np.moveaxis(a, 0, -1)
    elif a.ndim == 3:
        a = a.mean(axis=0)
    lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def grey(img: Any) -> np.ndarray:
    """(C, H, W) or (H, W) image -> (H, W) grey in [0, 1], the backdrop of overlays."""
    a = to_display(img)
    return a.mean(axis=-1) if a.ndim == 3 else a


def normalise_map(m: np.ndarray) -> np.ndarray:
    """Scale a map to [0, 1] by its max |value|; an all-zero map stays zero (never NaN)."""
    peak = float(np.nanmax(np.abs(m))) if m.size else 0.0
    return m / peak if peak > 0 else np.zeros_like(m)


def upsample(maps: Any, size: tuple[int, int]) -> np.ndarray:
    """(h, w) or (K, h, w) maps -> (H, W) or (K, H, W), bilinear (align_corners=False)."""
    import torch
    import torch.nn.functional as F

    a = as_numpy(maps)
    single = a.ndim == 2
    k = a[None] if single else a
    if k.shape[1:] == tuple(size):
        out = k.astype(np.float32)
    else:
        t = torch.as_tensor(k, dtype=torch.float32)[:, None]
        out = F.interpolate(t, size=size, mode="bilinear", align_corners=False)[:, 0].numpy()
    return out[0] if single else out
