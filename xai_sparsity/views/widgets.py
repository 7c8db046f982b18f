"""Interactive views built from core ipywidgets and matplotlib only (no custom JavaScript).

Four widgets, each an object whose ``widget`` attribute is the ipywidgets container (the object
also displays itself when it is the last expression of a cell):

- :class:`LayerExplorer`: click through the layers of a model for a few images: the input, a
  grid of feature maps, per-channel sparsity, the spatial sparsity map over the input, the layer's
  filter-correlation matrix and a Captum attribution.
- :class:`TrainingMonitor`: a trainer callback that draws live loss, accuracy and per-layer
  sparsity curves and shows the early warning when it fires.
- :class:`EpochScrubber`: a slider over the epochs of a run directory.
- :class:`RunComparison`: the arms of an experiment side by side.

Every panel is a persistent matplotlib ``Figure`` (not pyplot, so nothing leaks into the notebook
and no figure is ever re-created) rendered to PNG bytes and shown in an ``ipywidgets.Image``; an
update replaces the bytes in place, so the page does not flicker. Callbacks read their state from
the widget's own controls, never from notebook variables. ``obj.rendered`` maps each panel name to
its current PNG bytes, and ``obj.controls`` maps each control name to its ipywidget.

>>> import torch, torch.nn as nn
>>> from xai_sparsity.views.widgets import LayerExplorer
>>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
>>> explorer = LayerExplorer(net, torch.rand(2, 1, 12, 12), methods=("saliency",))
>>> explorer.controls["layer"].options
('0', '1')
>>> explorer.controls["layer"].value = "1"   # drives the real callback
>>> sorted(explorer.rendered)[:3]
['attribution', 'channel_sparsity', 'correlation']
"""

from __future__ import annotations

import html
import io
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from xai_sparsity.base.errors import XaiSparsityError, check_choice
from xai_sparsity.measuring.correlation import correlation_summary
from xai_sparsity.views.plotting import to_display, upsample

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from matplotlib.artist import Artist
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.text import Text

    from xai_sparsity.runs.analysis import EarlyWarning

__all__ = ["EpochScrubber", "LayerExplorer", "RunComparison", "TrainingMonitor"]

_DPI = 72
_SEQ_CMAP = "magma"
_DIV_CMAP = "RdBu_r"
_ATTR_CMAP = "inferno"
_HIGHLIGHT = "#d55e00"  # Okabe-Ito vermillion
_NEUTRAL = "#7f7f7f"
_HEAT_ALPHA = 0.55  # opacity of heat maps over the grey input


# ----------------------------------------------------------------------------- shared helpers


def _ipywidgets() -> Any:
    try:
        import ipywidgets
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError(
            "xai_sparsity.views.widgets needs ipywidgets: pip install 'xai-sparsity[notebooks]'"
        ) from None
    return ipywidgets


class _Panel:
    """A persistent matplotlib Figure shown as PNG bytes in an ``ipywidgets.Image``."""

    def __init__(self, figsize: tuple[float, float], dpi: int = _DPI) -> None:
        from matplotlib.figure import Figure

        self.figure: Figure = Figure(figsize=figsize, dpi=dpi)
        self.image = _ipywidgets().Image(format="png")
        self.renders = 0  # how many times PNG bytes were produced

    def draw(self, paint: Callable[[Figure], None]) -> None:
        """Clear the figure, let ``paint`` draw into it, and swap the PNG bytes in place."""
        self.figure.clear()
        paint(self.figure)
        self.render()

    def render(self) -> None:
        """Render the figure as it is now and swap the PNG bytes in place."""
        buf = io.BytesIO()
        self.figure.savefig(buf, format="png", metadata={"Software": None})
        self.image.value = buf.getvalue()
        self.renders += 1


class _TextStamps:
    """Bitmaps of rendered texts, pasted at whole-pixel anchors instead of re-rendering them.

    Laying out and rasterising glyphs costs about 2 ms per text in matplotlib's Agg backend, the
    larger part of a blitted update; a panel's labels repeat (values with two decimals, titles of
    revisited images), so each distinct text is rasterised once into an RGBA stamp and later
    drawn with one ``draw_image``. The anchor is rounded to a whole pixel (a shift under half a
    pixel); multi-line texts and those with a bbox patch, path effects or TeX are drawn
    normally.
    """

    def __init__(self, limit: int = 1024) -> None:
        self.limit = limit
        self._stamps: dict[tuple[Any, ...], tuple[np.ndarray, int, int]] = {}
        self._scratch: Any = None  # RendererAgg the stamps are drawn on

    def draw(self, text: Text, renderer: Any) -> None:
        """Draw ``text`` on the Agg ``renderer`` (as ``text.draw(renderer)`` does)."""
        figure = text.get_figure(root=True)
        if (
            figure is None
            or not text.get_visible()
            or not text.get_text()
            or "\n" in text.get_text()
            or text.get_bbox_patch() is not None
            or text.get_path_effects()
            or text.get_usetex()
        ):
            text.draw(renderer)
            return
        from matplotlib.colors import to_rgba

        x, y = text.get_transform().transform(text.get_unitless_position())
        if not (np.isfinite(x) and np.isfinite(y)):
            return
        key = (
            text.get_text(),
            text.get_fontproperties(),
            to_rgba(text.get_color(), text.get_alpha()),
            text.get_horizontalalignment(),
            text.get_verticalalignment(),
            text.get_rotation(),
            text.get_rotation_mode(),
            renderer.dpi,
        )
        stamp = self._stamps.get(key)
        if stamp is None:
            if len(self._stamps) >= self.limit:
                self._stamps.clear()
            stamp = self._stamps[key] = self._render(text, figure, renderer.dpi)
        rgba, px, py = stamp
        gc = renderer.new_gc()
        renderer.draw_image(gc, round(x) - px, round(y) - py, rgba)
        gc.restore()

    def _render(self, text: Text, figure: Any, dpi: float) -> tuple[np.ndarray, int, int]:
        """(H, W, 4) RGBA stamp of ``text`` and its anchor (pixels from left, from bottom)."""
        from matplotlib.backends.backend_agg import RendererAgg
        from matplotlib.text import Text
        from matplotlib.transforms import IdentityTransform

        scratch = Text()
        scratch.update_from(text)
        scratch.set_clip_on(False)  # clip boxes are in the panel's pixels, not the scratch's
        scratch.set_text(text.get_text())
        scratch.set_transform(IdentityTransform())
        scratch.set_figure(figure)
        scratch.set_position((0.0, 0.0))
        # one reused scratch renderer: matplotlib caches text metrics per renderer
        canvas = self._scratch
        if canvas is None or canvas.dpi != dpi:
            canvas = self._scratch = RendererAgg(640, 96, dpi)
        box = scratch.get_window_extent(canvas, dpi=dpi)
        px, py = math.ceil(-box.x0) + 2, math.ceil(-box.y0) + 2
        width, height = math.ceil(box.x1) + px + 2, math.ceil(box.y1) + py + 2
        if width > canvas.width or height > canvas.height:
            canvas = RendererAgg(max(width, 640), max(height, 96), dpi)
        canvas.clear()
        scratch.set_position((float(px), float(py)))
        scratch.draw(canvas)
        rows = np.asarray(canvas.buffer_rgba())[int(canvas.height) - height :, :width]
        return np.ascontiguousarray(rows[::-1]), px, py  # draw_image takes rows bottom-up


_STAMPS = _TextStamps()


@dataclass
class _Scene:
    """One layout of a :class:`_BlitPanel`: axes and artists built once, updated in place.

    ``parts`` names the artists an update sets; ``dynamic`` lists, in drawing order, the artists
    drawn over ``background`` (the figure rendered without them, with the canvas width, height
    and dpi it was rendered at) on every update.
    """

    axes: list[Axes]
    dynamic: list[Artist]
    parts: dict[str, Any] = field(default_factory=dict)
    background: Any = None


class _BlitPanel(_Panel):
    """A panel whose axes, ticks, labels and colorbars are drawn once per layout.

    Each layout (a ``key``, e.g. the channel count) is a :class:`_Scene` built the first time it
    is shown; the figure is rendered once without the scene's dynamic artists and that bitmap is
    kept. An update sets the artists' data in place (``set_data``, ``set_height``,
    ``set_text``), restores the bitmap, draws only the dynamic artists over it and encodes the
    canvas as PNG (fast zlib level). The figure always holds the current state, so ``savefig``
    on it still draws the full panel.
    """

    def __init__(self, figsize: tuple[float, float], margins: Mapping[str, float]) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        super().__init__(figsize)
        self._canvas = FigureCanvasAgg(self.figure)
        self.figure.subplots_adjust(**margins)
        self._scenes: dict[Any, _Scene] = {}
        self._shown: _Scene | None = None

    max_scenes = 16  # layouts kept per panel (least recently shown ones are dropped)

    def show(
        self,
        key: Any,
        build: Callable[[Figure], _Scene],
        update: Callable[[_Scene], None],
    ) -> None:
        """Show layout ``key`` (``build`` makes it on first use) after ``update`` set its data."""
        from matplotlib.text import Text

        scene = self._scenes.pop(key, None)
        if scene is None:
            for old in self._scenes.values():
                for ax in old.axes:
                    ax.set_visible(False)
            scene = build(self.figure)
        elif scene is not self._shown:
            for other in self._scenes.values():
                for ax in other.axes:
                    ax.set_visible(False)
            for ax in scene.axes:
                ax.set_visible(True)
        self._scenes[key] = scene  # most recently shown last
        self._shown = scene
        while len(self._scenes) > self.max_scenes:
            for ax in self._scenes.pop(next(iter(self._scenes))).axes:
                ax.remove()
        update(scene)
        canvas = self._canvas
        size = (*canvas.get_width_height(physical=True), self.figure.dpi)
        if scene.background is None or scene.background[0] != size:
            # animated artists are left out of a screen draw (not of savefig); hiding them
            # instead would misplace axes titles, which are positioned from their extents
            for artist in scene.dynamic:
                artist.set_animated(True)
            canvas.draw()
            scene.background = (size, canvas.copy_from_bbox(self.figure.bbox))
            for artist in scene.dynamic:
                artist.set_animated(False)
        else:
            canvas.restore_region(scene.background[1])
        renderer = canvas.get_renderer()
        for artist in scene.dynamic:
            if type(artist) is Text:
                _STAMPS.draw(artist, renderer)
            else:
                artist.draw(renderer)
        self._encode()

    def _encode(self) -> None:
        from PIL import Image

        rgba = np.asarray(self._canvas.buffer_rgba())
        buf = io.BytesIO()
        Image.fromarray(rgba, mode="RGBA").save(buf, format="png", compress_level=1)
        self.image.value = buf.getvalue()
        self.renders += 1


def _display_image(image: Tensor | np.ndarray) -> tuple[np.ndarray, str | None]:
    """(C, H, W) or (H, W) image -> an array imshow can show (min-max scaled) and its cmap."""
    a = to_display(image)
    return a, (None if a.ndim == 3 else "gray")


def _overlay(
    ax: Axes,
    image: Tensor | np.ndarray,
    heat: np.ndarray,
    *,
    cmap: str,
    vmin: float,
    vmax: float,
    title: str,
) -> Any:
    """The image in grey with ``heat`` (upsampled to its size) on top; returns the heat artist."""
    base, _ = _display_image(image)
    if base.ndim == 3:
        base = base.mean(axis=-1)
    ax.imshow(base, cmap="gray")
    artist = ax.imshow(
        upsample(heat, (base.shape[0], base.shape[1])), cmap=cmap, vmin=vmin, vmax=vmax, alpha=0.55
    )
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()
    return artist


def _bars(
    ax: Axes, values: np.ndarray, selected: int | None, *, title: str, ylabel: str = "sparsity"
) -> None:
    colors = [_NEUTRAL] * len(values)
    if selected is not None and 0 <= selected < len(values):
        colors[selected] = _HIGHLIGHT
    ax.bar(np.arange(len(values)), values, color=colors, width=0.85)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlim(-0.6, len(values) - 0.4)
    ax.set_xlabel("channel", fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=7)


def _correlation_image(fig: Figure, ax: Axes, r: np.ndarray, title: str) -> None:
    im = ax.imshow(r, cmap=_DIV_CMAP, vmin=-1.0, vmax=1.0, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("channel", fontsize=8)
    ax.set_ylabel("channel", fontsize=8)
    ax.tick_params(labelsize=7)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=7)


class _Widget:
    """Common surface: ``widget``, ``controls``, ``rendered`` and notebook display."""

    widget: Any
    controls: dict[str, Any]
    _panels: dict[str, _Panel]

    @property
    def rendered(self) -> dict[str, bytes]:
        """Panel name -> the PNG bytes currently shown."""
        return {name: bytes(p.image.value) for name, p in self._panels.items()}

    @property
    def figures(self) -> dict[str, Figure]:
        """Panel name -> its persistent matplotlib Figure (e.g. to ``savefig`` it)."""
        return {name: p.figure for name, p in self._panels.items()}

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    def _status(self, html: str) -> None:
        status = self.controls.get("status")
        if status is not None:
            status.value = html


# ----------------------------------------------------------------------------- LayerExplorer


def _checked_images(
    images: Tensor, labels: Tensor | Sequence[int] | None
) -> tuple[Tensor, Tensor | None]:
    """A (K, C, H, W) batch and its (K,) long labels (or None), checked."""
    images = torch.as_tensor(images)
    if images.dim() != 4 or images.shape[0] < 1:
        raise XaiSparsityError(
            f"images must be a (K, C, H, W) batch with K >= 1, got shape {tuple(images.shape)}"
        )
    if labels is None:
        return images, None
    labels = torch.as_tensor(labels).long().reshape(-1)
    if labels.shape[0] != images.shape[0]:
        raise XaiSparsityError(f"got {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels


def _checked_methods(methods: Sequence[str] | None) -> list[str]:
    """The attribution methods to offer (default: all), checked."""
    from xai_sparsity.views.attributions import METHODS

    all_methods = list(METHODS)
    chosen = list(methods) if methods is not None else all_methods
    for m in chosen:
        check_choice("method", m, all_methods)
    if not chosen:
        raise XaiSparsityError(f"methods=[] selects nothing; choose from {all_methods}")
    return chosen


class LayerExplorer(_Widget):
    """Explore what each layer of a model computes for a few images.

    Controls: ``controls["layer"]`` (Dropdown of the layers with (C, H, W) outputs, from
    :func:`~xai_sparsity.capturing.hooks.list_layers`), ``controls["image"]`` (IntSlider over the images),
    ``controls["channel"]`` (IntSlider over the layer's channels) and ``controls["method"]``
    (Dropdown of attribution methods). Panels (``rendered`` keys): ``input``, ``feature_maps`` (a
    page of up to ``max_maps`` channels holding the chosen one, which is framed),
    ``channel_sparsity`` (per-channel perplexity sparsity of the image), ``spatial`` (the spatial
    sparsity map, N = C, upsampled over the input), ``correlation`` (the layer's C x C filter
    correlation over all images and positions) and ``attribution`` (Captum, for the label or, if
    none, the predicted class).

    Activations of every selectable layer are computed once per image, in one forward with
    :func:`~xai_sparsity.capturing.hooks.capture` in keep mode, and cached (``cache_info()``); the model
    runs in eval mode under ``no_grad`` and its train/eval flags are restored. Correlations,
    sparsities and attributions are cached too. A change re-renders only the panels that depend
    on it (an image change leaves the correlation alone, a layer switch the input); each panel's
    axes, ticks and colorbar are drawn once per layout and an update redraws only its data
    artists over that bitmap.

    Args:
        model: a CNN.
        images: (K, C, H, W) inputs as the model expects them (normalised).
        labels: (K,) class indices (attribution targets); ``None`` uses the predicted class.
        layers: a layer selection for :func:`~xai_sparsity.capturing.hooks.resolve_layers` (default:
            convolution and activation modules); layers whose output is not (B, C, H, W) with
            C >= 2 and H * W >= 2 are left out.
        methods: attribution method names (default: every one in ``attributions.METHODS``).
        class_names: names shown for label and prediction indices.
        max_maps: feature maps per page.
        device: where the model runs (default: the device of its parameters).

    >>> import torch, torch.nn as nn
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    >>> ex = LayerExplorer(net, torch.rand(3, 1, 10, 10), methods=("saliency",))
    >>> ex.select(image=2, channel=3)
    >>> ex.state["image"], ex.state["channel"]
    (2, 3)
    """

    def __init__(
        self,
        model: nn.Module,
        images: Tensor,
        labels: Tensor | Sequence[int] | None = None,
        layers: Any = None,
        *,
        methods: Sequence[str] | None = None,
        class_names: Sequence[str] | None = None,
        max_maps: int = 16,
        device: torch.device | str | None = None,
    ) -> None:
        _ipywidgets()
        from xai_sparsity.capturing.hooks import list_layers, resolve_layers

        images, labels = _checked_images(images, labels)
        if max_maps < 1:
            raise XaiSparsityError(f"max_maps={max_maps!r} must be at least 1")
        self.model = model
        if device is None:
            param = next(iter(model.parameters()), None)
            device = param.device if param is not None else torch.device("cpu")
        self.device = torch.device(device)
        self.inputs = images.detach().float().cpu()
        self.labels: Tensor | None = labels
        self.class_names = list(class_names) if class_names is not None else None
        self.max_maps = int(max_maps)

        self.layer_table = list_layers(model, self.inputs[:1].to(self.device))
        self._capture_spec = resolve_layers(model, layers)
        self._cache: dict[int, dict[str, Tensor]] = {}
        self._logits: dict[int, Tensor] = {}
        self._correlation: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._attr_cache: dict[tuple[int, str, str], np.ndarray] = {}
        self._sparsity_cache: dict[tuple[int, str], tuple[float, np.ndarray, np.ndarray]] = {}
        first = self._activations(0)
        self.layers = self._map_layers(first)
        self.methods = _checked_methods(methods)
        self.controls = self._make_controls(int(first[self.layers[0]].shape[1]))
        self._views = self._make_panels()
        self._panels = dict(self._views)
        self.widget = self._layout()
        self._suspended = False
        c = self.controls
        c["layer"].observe(self._on_layer, names="value")
        c["image"].observe(self._on_image, names="value")
        c["channel"].observe(self._on_channel, names="value")
        c["method"].observe(self._on_method, names="value")
        self._redraw(set(self._panels))

    def _map_layers(self, first: Mapping[str, Tensor]) -> list[str]:
        """The captured layers with (C, H, W) outputs (C >= 2, H * W >= 2), in call order."""
        call_order = {info.name: i for i, info in enumerate(self.layer_table)}
        layers = sorted(
            (
                n
                for n, a in first.items()
                if a.dim() == 4 and a.shape[1] >= 2 and a[0, 0].numel() >= 2
            ),
            key=lambda n: (call_order.get(n.split("#", 1)[0], len(call_order)), n),
        )
        if not layers:
            shapes = {n: tuple(a.shape[1:]) for n, a in first.items()}
            raise XaiSparsityError(
                f"none of the selected layers has a (C, H, W) output with C >= 2 and H*W >= 2: "
                f"{shapes}; pass layers= with convolutional layers (see list_layers)"
            )
        return layers

    def _make_controls(self, channels: int) -> dict[str, Any]:
        """The layer, image, channel and method controls and the status line."""
        w = _ipywidgets()
        n_images = self.inputs.shape[0]
        return {
            "layer": w.Dropdown(options=self.layers, value=self.layers[0], description="layer"),
            "image": w.IntSlider(
                value=0,
                min=0,
                max=n_images - 1,
                description="image",
                continuous_update=False,
                disabled=n_images == 1,
            ),
            "channel": w.IntSlider(
                value=0,
                min=0,
                max=channels - 1,
                description="channel",
                continuous_update=False,
            ),
            "method": w.Dropdown(
                options=self.methods,
                value=self.methods[0],
                description="attribution",
                style={"description_width": "initial"},
            ),
            "status": w.HTML(value=""),
        }

    @staticmethod
    def _make_panels() -> dict[str, _BlitPanel]:
        size = (3.3, 3.0)
        image_margins = {"left": 0.02, "right": 0.98, "bottom": 0.02, "top": 0.9}
        overlay_margins = {"left": 0.02, "right": 0.9, "bottom": 0.02, "top": 0.9}
        return {
            "input": _BlitPanel(size, image_margins),
            "feature_maps": _BlitPanel(size, image_margins),
            "channel_sparsity": _BlitPanel(
                size, {"left": 0.17, "right": 0.97, "bottom": 0.15, "top": 0.9}
            ),
            "spatial": _BlitPanel(size, overlay_margins),
            "correlation": _BlitPanel(
                size, {"left": 0.15, "right": 0.86, "bottom": 0.14, "top": 0.9}
            ),
            "attribution": _BlitPanel(size, overlay_margins),
        }

    def _layout(self) -> Any:
        w = _ipywidgets()
        c = self.controls
        p = {k: v.image for k, v in self._panels.items()}
        return w.VBox(
            [
                w.HBox([c["layer"], c["image"], c["channel"], c["method"]]),
                c["status"],
                w.HBox([p["input"], p["feature_maps"], p["channel_sparsity"]]),
                w.HBox([p["spatial"], p["correlation"], p["attribution"]]),
            ]
        )

    # -- state -------------------------------------------------------------------------------

    @property
    def state(self) -> dict[str, Any]:
        """The current choices, read from the controls."""
        c = self.controls
        return {
            "layer": c["layer"].value,
            "image": int(c["image"].value),
            "channel": int(c["channel"].value),
            "method": c["method"].value,
        }

    def select(
        self,
        layer: str | None = None,
        image: int | None = None,
        channel: int | None = None,
        method: str | None = None,
    ) -> None:
        """Set controls programmatically (this fires the same callbacks as a click)."""
        c = self.controls
        if layer is not None:
            check_choice("layer", layer, self.layers)
        if image is not None:
            check_choice("image", int(image), range(self.inputs.shape[0]))
        if method is not None:
            check_choice("method", method, self.methods)
        panels: set[str] = set()
        self._suspended = True  # one redraw for all changes
        try:
            if layer is not None and layer != c["layer"].value:
                c["layer"].value = layer
                panels |= self._layer_changed(layer)
            if image is not None and int(image) != c["image"].value:
                c["image"].value = int(image)
                panels |= self._IMAGE_PANELS
            if channel is not None and int(channel) != c["channel"].value:
                c["channel"].value = check_choice(
                    "channel", int(channel), range(c["channel"].max + 1)
                )
                panels |= self._CHANNEL_PANELS
            if method is not None and method != c["method"].value:
                c["method"].value = method
                panels |= {"attribution"}
        finally:
            self._suspended = False
        if panels:
            self._redraw(panels)

    def cache_info(self) -> dict[str, int]:
        """How many images have cached activations, and their total bytes."""
        nbytes = sum(
            t.numel() * t.element_size() for acts in self._cache.values() for t in acts.values()
        )
        return {"images": len(self._cache), "bytes": int(nbytes)}

    # -- computation -------------------------------------------------------------------------

    def _activations(self, index: int) -> dict[str, Tensor]:
        """All selected layers' (1, C, H, W) activations of image ``index`` (cached)."""
        cached = self._cache.get(index)
        if cached is not None:
            return cached
        from xai_sparsity.base.modules import eval_mode
        from xai_sparsity.capturing.hooks import capture

        x = self.inputs[index : index + 1].to(self.device)
        with (
            eval_mode(self.model),
            torch.no_grad(),
            capture(self.model, self._capture_spec, mode="keep", offload=True, clone=True) as cap,
        ):
            logits = self.model(x)
        acts = {name: cap.activations[name].float().cpu() for name in cap.activations}
        if isinstance(logits, Tensor):
            self._logits[index] = logits.detach().float().cpu().reshape(-1)
        self._cache[index] = acts
        return acts

    def _target(self, index: int) -> int:
        if self.labels is not None:
            return int(self.labels[index])
        self._activations(index)
        logits = self._logits.get(index)
        if logits is None:
            raise XaiSparsityError(
                "the model's output is not a tensor of class scores; pass labels="
            )
        return int(logits.argmax())

    def _class_name(self, k: int) -> str:
        if self.class_names is not None and 0 <= k < len(self.class_names):
            return str(self.class_names[k])
        return str(k)

    def _layer_correlation(self, layer: str) -> tuple[np.ndarray, np.ndarray]:
        """(C, C) correlation over all images and positions, and the dead-channel mask."""
        hit = self._correlation.get(layer)
        if hit is not None:
            return hit
        from xai_sparsity.measuring.correlation import CorrelationAccumulator

        acc = CorrelationAccumulator(over="positions")
        for i in range(self.inputs.shape[0]):
            acc.update(self._activations(i)[layer])
        result = (acc.correlation().numpy(), acc.dead_mask.numpy())
        self._correlation[layer] = result
        return result

    def _attribution(self, index: int, method: str, layer: str) -> np.ndarray:
        """(H, W) attribution map of image ``index`` for its target (cached)."""
        from xai_sparsity.views.attributions import PIXEL_METHODS, attribute

        layer_method = method not in PIXEL_METHODS
        key = (index, method, layer if layer_method else "")
        hit = self._attr_cache.get(key)
        if hit is not None:
            return hit
        x = self.inputs[index : index + 1].to(self.device)
        maps = attribute(
            self.model,
            x,
            [self._target(index)],
            method=method,
            layer=layer.split("#", 1)[0] if layer_method else None,
            progress=False,
        )
        result = maps[0].detach().float().cpu().numpy()
        if result.ndim == 3:
            result = np.abs(result).sum(axis=0)
        self._attr_cache[key] = result
        return result

    # -- callbacks ---------------------------------------------------------------------------

    _IMAGE_PANELS = frozenset(
        {"input", "feature_maps", "channel_sparsity", "spatial", "attribution"}
    )
    _CHANNEL_PANELS = frozenset({"feature_maps", "channel_sparsity"})

    def _layer_changed(self, layer: str) -> set[str]:
        """Fit the channel slider to ``layer``; the panels that depend on the layer."""
        from xai_sparsity.views.attributions import PIXEL_METHODS

        channels = int(self._activations(self.state["image"])[layer].shape[1])
        slider = self.controls["channel"]
        suspended, self._suspended = self._suspended, True
        try:
            if slider.value > channels - 1:
                slider.value = channels - 1
            slider.max = channels - 1
        finally:
            self._suspended = suspended
        panels = {"feature_maps", "channel_sparsity", "spatial", "correlation"}
        if self.state["method"] not in PIXEL_METHODS:  # Grad-CAM follows the layer
            panels.add("attribution")
        return panels

    def _on_layer(self, change: Mapping[str, Any]) -> None:
        if not self._suspended:
            self._redraw(self._layer_changed(change["new"]))

    def _on_image(self, change: Mapping[str, Any]) -> None:
        if not self._suspended:
            self._redraw(set(self._IMAGE_PANELS))

    def _on_channel(self, change: Mapping[str, Any]) -> None:
        if not self._suspended:
            self._redraw(set(self._CHANNEL_PANELS))

    def _on_method(self, change: Mapping[str, Any]) -> None:
        if not self._suspended:
            self._redraw({"attribution"})

    # -- drawing -----------------------------------------------------------------------------

    def _sparsity(self, index: int, layer: str) -> tuple[float, np.ndarray, np.ndarray]:
        """Layer, (C,) channel and (H, W) spatial perplexity sparsity of one image (cached)."""
        key = (index, layer)
        hit = self._sparsity_cache.get(key)
        if hit is not None:
            return hit
        from xai_sparsity.measuring.measures import perplexity_sparsity

        act = self._activations(index)[layer]
        result = (
            float(perplexity_sparsity(act, scope="layer")[0]),
            perplexity_sparsity(act, scope="channel")[0].numpy(),
            perplexity_sparsity(act, scope="spatial")[0].numpy(),
        )
        self._sparsity_cache[key] = result
        return result

    def _redraw(self, panels: set[str]) -> None:
        s = self.state
        act = self._activations(s["image"])[s["layer"]]
        layer_s, channel_s, spatial_s = self._sparsity(s["image"], s["layer"])
        shown = _Selection(
            s["layer"], s["image"], s["channel"], s["method"], act, layer_s, channel_s, spatial_s
        )
        try:
            self._draw(panels, shown)
        except Exception as exc:
            self._status(f"<span style='color:{_HIGHLIGHT}'>error: {exc}</span>")
            raise
        self._status(
            f"layer <b>{s['layer']}</b> output {tuple(act.shape[1:])}, image {s['image']}: "
            f"layer sparsity {layer_s:.3f}, channel {s['channel']} sparsity "
            f"{channel_s[s['channel']]:.3f}"
        )

    def _base(self, index: int) -> np.ndarray:
        """(H, W) grey version of image ``index`` in [0, 1] (under the overlays)."""
        base, _ = _display_image(self.inputs[index])
        return base.mean(axis=-1) if base.ndim == 3 else base

    def _draw(self, panels: set[str], sel: _Selection) -> None:
        """Update the artists of ``panels`` in place and re-encode only those panels."""
        height, width = int(self.inputs.shape[2]), int(self.inputs.shape[3])
        mosaic = _Mosaic.page(sel.act.shape[1:], sel.channel, self.max_maps)
        channels = mosaic.channels
        views: dict[str, tuple[Any, Callable[[Figure], _Scene], Callable[[_Scene], None]]] = {
            "input": (
                None,
                lambda fig: _build_input(fig, self.inputs[0]),
                lambda scene: self._update_input(scene, sel.image),
            ),
            "feature_maps": (
                mosaic.key,
                lambda fig: _build_maps(fig, mosaic),
                lambda scene: self._update_maps(scene, sel, mosaic),
            ),
            "channel_sparsity": (
                channels,
                lambda fig: _build_channels(fig, channels),
                lambda scene: self._update_channels(scene, sel),
            ),
            "spatial": (
                None,
                lambda fig: _build_overlay(fig, _SEQ_CMAP, height, width),
                lambda scene: self._update_spatial(scene, sel),
            ),
            "correlation": (
                channels,
                lambda fig: _build_correlation(fig, channels),
                lambda scene: self._update_correlation(scene, sel.layer),
            ),
            "attribution": (
                None,
                lambda fig: _build_overlay(fig, _ATTR_CMAP, height, width),
                lambda scene: self._update_attribution(scene, sel),
            ),
        }
        for name, panel in self._views.items():
            if name in panels:
                key, build, update = views[name]
                panel.show(key, build, update)

    def _blend(self, scene: _Scene, heat: np.ndarray, index: int) -> None:
        """Blend ``heat`` (upsampled, in the scene's colour map) over the grey image ``index``."""
        from matplotlib import colormaps

        height, width = int(self.inputs.shape[2]), int(self.inputs.shape[3])
        up = np.clip(upsample(heat, (height, width)), 0.0, 1.0)
        colors = colormaps[scene.parts["cmap"]](up)[..., :3]
        grey = self._base(index)[..., None]
        scene.parts["image"].set_data(_HEAT_ALPHA * colors + (1.0 - _HEAT_ALPHA) * grey)

    def _update_input(self, scene: _Scene, index: int) -> None:
        arr, _ = _display_image(self.inputs[index])
        scene.parts["image"].set_data(arr)
        parts = [f"image {index}"]
        if self.labels is not None:
            parts.append(f"label {self._class_name(int(self.labels[index]))}")
        logits = self._logits.get(index)
        if logits is not None and logits.numel() > 1:
            parts.append(f"pred {self._class_name(int(logits.argmax()))}")
        _set_title(scene, ", ".join(parts))

    def _update_maps(self, scene: _Scene, sel: _Selection, mosaic: _Mosaic) -> None:
        maps = sel.act[0, mosaic.idx].numpy().astype(np.float64)
        image = mosaic.blank()
        h, w = mosaic.h, mosaic.w
        for k, c in enumerate(mosaic.idx):
            r0, c0 = mosaic.corner(k)
            image[r0 : r0 + h, c0 : c0 + w] = maps[k]
            scene.parts["labels"][k].set_text(f" {sel.channel_s[c]:.2f}")
            if c == sel.channel:
                scene.parts["frame"].set_xy((c0 - 0.5, r0 - 0.5))
        lo, hi = float(np.nanmin(image)), float(np.nanmax(image))
        scene.parts["image"].set_data(image)
        scene.parts["image"].set_clim(lo, hi if hi > lo else lo + 1)
        first, last = mosaic.idx[0], mosaic.idx[-1]
        _set_title(scene, f"{sel.layer}: channels {first}-{last} of {mosaic.channels}")

    def _update_channels(self, scene: _Scene, sel: _Selection) -> None:
        ch, channel_s, layer_s = sel.channel, sel.channel_s, sel.layer_s
        for c, bar in enumerate(scene.parts["bars"]):
            bar.set_height(float(channel_s[c]))
            bar.set_facecolor(_HIGHLIGHT if c == ch else _NEUTRAL)
        scene.parts["line"].set_ydata([layer_s, layer_s])
        for text in scene.parts["legend"]:
            text.set_text(f"layer {layer_s:.2f}")
        _set_title(scene, f"per-channel sparsity (channel {ch}: {channel_s[ch]:.2f})")

    def _update_spatial(self, scene: _Scene, sel: _Selection) -> None:
        spatial_s = sel.spatial_s
        self._blend(scene, spatial_s, sel.image)
        _set_title(scene, f"spatial sparsity {tuple(spatial_s.shape)}, mean {spatial_s.mean():.2f}")

    def _update_correlation(self, scene: _Scene, layer: str) -> None:
        r, dead = self._layer_correlation(layer)
        scene.parts["image"].set_data(r)
        _set_title(
            scene, f"{layer}: mean |r| {correlation_summary(r, dead):.2f}, dead {int(dead.sum())}"
        )

    def _update_attribution(self, scene: _Scene, sel: _Selection) -> None:
        amap = self._attribution(sel.image, sel.method, sel.layer)
        scale = float(np.abs(amap).max())
        heat = np.abs(amap) / scale if scale > 0 else np.zeros_like(amap)
        self._blend(scene, heat, sel.image)
        target = self._class_name(self._target(sel.image))
        _set_title(scene, f"{sel.method} for class {target}")


# -- what a LayerExplorer shows, and the layouts of its panels


@dataclass(frozen=True)
class _Selection:
    """What one redraw of a :class:`LayerExplorer` shows: the choices and the image's numbers
    in the chosen layer (activation (1, C, h, w), layer, (C,) channel and (h, w) spatial
    sparsity)."""

    layer: str
    image: int
    channel: int
    method: str
    act: Tensor
    layer_s: float
    channel_s: np.ndarray
    spatial_s: np.ndarray


@dataclass(frozen=True)
class _Mosaic:
    """One page of feature maps laid out in one mosaic image (far cheaper than a grid of
    subplots): ``idx`` are the page's channels, each map (h, w) with a label row above it."""

    channels: int
    h: int
    w: int
    start: int
    idx: list[int]
    cols: int
    rows: int
    pad_h: int
    pad_w: int

    @classmethod
    def page(cls, shape: Sequence[int], channel: int, max_maps: int) -> _Mosaic:
        """The page of a (C, h, w) activation that holds ``channel``."""
        channels, h, w = (int(n) for n in shape)
        start = (channel // max_maps) * max_maps
        idx = list(range(start, min(start + max_maps, channels)))
        cols = math.ceil(math.sqrt(len(idx)))
        rows = math.ceil(len(idx) / cols)
        pad_h, pad_w = max(1, round(h * 0.35)), max(1, round(w * 0.1))
        return cls(channels, h, w, start, idx, cols, rows, pad_h, pad_w)

    @property
    def key(self) -> tuple[int, int, int, int]:
        """The layout: channel count, map size and first channel of the page."""
        return (self.channels, self.h, self.w, self.start)

    def corner(self, k: int) -> tuple[int, int]:
        """(row, column) of the top-left pixel of the page's ``k``-th map."""
        return (k // self.cols) * (self.h + self.pad_h) + self.pad_h, (k % self.cols) * (
            self.w + self.pad_w
        )

    def blank(self) -> np.ndarray:
        """The mosaic image with no maps in it (NaN: drawn transparent)."""
        return np.full(
            (self.rows * (self.h + self.pad_h), self.cols * (self.w + self.pad_w)), np.nan
        )


def _set_title(scene: _Scene, text: str) -> None:
    scene.parts["title"].set_text(text)


def _build_overlay(fig: Figure, cmap: str, height: int, width: int) -> _Scene:
    """A heat map over the grey input. Both are blended into one RGB image by
    ``LayerExplorer._blend`` (one image to resample per update instead of two)."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    ax = fig.add_subplot()
    im = ax.imshow(np.zeros((height, width, 3)))
    ax.set_axis_off()
    head = ax.set_title(" ", fontsize=9)
    scale = ScalarMappable(Normalize(0.0, 1.0), cmap=cmap)
    bar = fig.colorbar(scale, ax=ax, fraction=0.046, pad=0.04, alpha=_HEAT_ALPHA)
    bar.ax.tick_params(labelsize=7)
    return _Scene([ax, bar.ax], [im, head], {"image": im, "cmap": cmap, "title": head})


def _build_input(fig: Figure, image: Tensor) -> _Scene:
    ax = fig.add_subplot()
    arr, cmap = _display_image(image)
    im = ax.imshow(arr, cmap=cmap, vmin=0.0, vmax=1.0)
    ax.set_axis_off()
    head = ax.set_title(" ", fontsize=9)
    return _Scene([ax], [im, head], {"image": im, "title": head})


def _build_maps(fig: Figure, mosaic: _Mosaic) -> _Scene:
    from matplotlib.patches import Rectangle
    from matplotlib.transforms import offset_copy

    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    ax = fig.add_subplot()
    im = ax.imshow(mosaic.blank(), cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    frame = ax.add_patch(
        Rectangle((-0.5, -0.5), mosaic.w, mosaic.h, fill=False, ec=_HIGHLIGHT, lw=2.5)
    )
    # "c:" is part of the layout; the value after it is one of few texts (two decimals)
    labels = []
    for k, c in enumerate(mosaic.idx):
        r0, c0 = mosaic.corner(k)
        prefix = ax.text(c0, r0 - 0.5, f"{c}:", fontsize=7, va="bottom")
        shift = prefix.get_window_extent(renderer).width * 72.0 / fig.dpi
        after = offset_copy(ax.transData, fig=fig, x=shift, units="points")
        labels.append(ax.text(c0, r0 - 0.5, " ", fontsize=7, va="bottom", transform=after))
    ax.set_axis_off()
    head = ax.set_title(" ", fontsize=9)
    parts = {"image": im, "frame": frame, "labels": labels, "title": head}
    return _Scene([ax], [im, frame, *labels, head], parts)


def _build_channels(fig: Figure, channels: int) -> _Scene:
    from matplotlib.text import Text

    ax = fig.add_subplot()
    bars = ax.bar(np.arange(channels), np.zeros(channels), color=_NEUTRAL, width=0.85)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlim(-0.6, channels - 0.4)
    ax.set_xlabel("channel", fontsize=8)
    ax.set_ylabel("sparsity", fontsize=8)
    ax.tick_params(labelsize=7)
    line = ax.axhline(0.0, color="black", lw=1, ls="--", label="layer 0.00")
    legend = ax.legend(fontsize=7, loc="lower right")
    # the legend's own text sizes its frame but is hidden; a plain Text on the same
    # transform (placed when the legend is drawn) shows it, so it can be stamped
    sized = legend.get_texts()[0]
    shown = Text()
    shown.update_from(sized)
    shown.set_transform(sized.get_transform())
    shown.set_zorder(legend.get_zorder() + 1)
    ax.add_artist(shown)
    sized.set_visible(False)
    head = ax.set_title(" ", fontsize=9)
    spines = list(ax.spines.values())
    parts = {"bars": list(bars.patches), "line": line, "legend": [sized, shown], "title": head}
    return _Scene([ax], [*bars.patches, line, *spines, legend, shown, head], parts)


def _build_correlation(fig: Figure, channels: int) -> _Scene:
    ax = fig.add_subplot()
    im = ax.imshow(
        np.zeros((channels, channels)),
        cmap=_DIV_CMAP,
        vmin=-1.0,
        vmax=1.0,
        interpolation="nearest",
    )
    ax.set_xlabel("channel", fontsize=8)
    ax.set_ylabel("channel", fontsize=8)
    ax.tick_params(labelsize=7)
    head = ax.set_title(" ", fontsize=9)
    bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    bar.ax.tick_params(labelsize=7)
    spines = list(ax.spines.values())
    return _Scene([ax, bar.ax], [im, *spines, head], {"image": im, "title": head})


# ----------------------------------------------------------------------------- TrainingMonitor


def _number(value: Any) -> Any:
    if isinstance(value, Tensor) and value.numel() == 1:
        return float(value.item())
    if isinstance(value, np.generic):
        return value.item()
    return value


def _finite(value: Any) -> float | None:
    """``float(value)``, or None for None, NaN and non-numbers."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    return float(value) if math.isfinite(float(value)) else None


class TrainingMonitor(_Widget):
    """Live training curves for a notebook: pass it as a trainer callback.

    Each call receives one history row (a dict with ``epoch``, ``train_loss``, ``test_loss``,
    ``train_acc``, ``test_acc`` and ``sparsity:<layer>`` columns, as in ``history.csv``) and
    redraws, in place, the losses, the accuracies and the per-layer sparsity. An
    :class:`~xai_sparsity.runs.analysis.EarlyWarning` (label-free: it never reads the test loss) watches
    the sparsity columns (by default only after the training loss has levelled off); when it
    fires, a banner says what was measured and every panel marks the epoch.

    Args:
        layers: layers to draw and watch (default: every ``sparsity:<layer>`` column seen).
        early_warning: ``True`` builds an ``EarlyWarning(layers, **rule)``; pass your own
            instance, or ``False``/``None`` for none.
        rule: settings of the default early warning (see ``analysis.DEFAULT_RULE``).
        redraw_every: redraw every n-th row (the last row is always drawn by ``redraw()``).

    >>> monitor = TrainingMonitor(rule={"rule": "ema_rise", "alpha": 1.0, "patience": 2, "warmup": 0})
    >>> for e, s in enumerate([0.5, 0.5, 0.55, 0.6, 0.65], start=1):
    ...     monitor({"epoch": e, "train_loss": 1 / e, "test_loss": 1.0, "sparsity:relu": s})
    >>> monitor.warning_epoch
    4
    """

    def __init__(
        self,
        layers: Sequence[str] | None = None,
        *,
        early_warning: bool | EarlyWarning | None = True,
        rule: Mapping[str, Any] | None = None,
        redraw_every: int = 1,
        title: str | None = None,
    ) -> None:
        w = _ipywidgets()
        from xai_sparsity.runs.analysis import EarlyWarning

        if redraw_every < 1:
            raise XaiSparsityError(f"redraw_every={redraw_every!r} must be at least 1")
        self.layers = list(layers) if layers is not None else None
        self.redraw_every = int(redraw_every)
        self.title = title
        self.rows: list[dict[str, Any]] = []
        if early_warning is True:
            self.early_warning: EarlyWarning | None = EarlyWarning(self.layers, **dict(rule or {}))
        elif early_warning in (False, None):
            self.early_warning = None
        elif isinstance(early_warning, EarlyWarning):
            self.early_warning = early_warning
        else:
            raise XaiSparsityError(
                f"early_warning={early_warning!r} must be True, False, None or an EarlyWarning"
            )
        self.controls = {"status": w.HTML(value="waiting for the first epoch ...")}
        self._panels = {"curves": _Panel((11.0, 3.2))}
        self.widget = w.VBox([self.controls["status"], self._panels["curves"].image])
        self._redraw()

    # the trainer calls the object with each history row
    def __call__(self, row: Mapping[str, Any]) -> None:
        self.update(row)

    def on_epoch_end(self, row: Mapping[str, Any]) -> None:
        """Alias of :meth:`update` for trainers that call ``on_epoch_end(row)``."""
        self.update(row)

    def update(self, row: Mapping[str, Any]) -> None:
        """Add one epoch's history row and redraw."""
        if "epoch" not in row:
            raise XaiSparsityError(f"a history row needs an 'epoch'; got keys {sorted(row)}")
        clean = {str(k): _number(v) for k, v in row.items()}
        self.rows.append(clean)
        if self.early_warning is not None and not self.early_warning.fired:
            values = {
                n: float(clean[f"sparsity:{n}"]) for n in self._layers() if f"sparsity:{n}" in clean
            }
            if values:
                acc, loss = clean.get("train_acc"), clean.get("train_loss")
                self.early_warning.update(
                    int(clean["epoch"]),
                    values,
                    _finite(acc),
                    train_loss=_finite(loss),
                )
        if len(self.rows) % self.redraw_every == 0:
            self._redraw()

    def replay(self, run: Any) -> TrainingMonitor:
        """Feed every row of a finished run (a run directory or a history DataFrame)."""
        import pandas as pd

        from xai_sparsity.runs.rundir import as_run

        df = run if isinstance(run, pd.DataFrame) else as_run(run).history()
        every, self.redraw_every = self.redraw_every, 10**9  # draw once, at the end
        try:
            for record in df.to_dict(orient="records"):
                self.update({str(k): v for k, v in record.items()})
        finally:
            self.redraw_every = every
        self._redraw()
        return self

    def redraw(self) -> None:
        """Draw the current state now."""
        self._redraw()

    @property
    def warning_epoch(self) -> int | None:
        """The epoch at which the early warning fired (None if it has not)."""
        return None if self.early_warning is None else self.early_warning.fired_epoch

    def history(self) -> pd.DataFrame:
        """The rows received so far as a DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.rows)

    def _layers(self) -> list[str]:
        if self.layers is not None:
            return self.layers
        seen: dict[str, None] = {}
        for row in self.rows:
            for k in row:
                if k.startswith("sparsity:"):
                    seen.setdefault(k.split(":", 1)[1])
        return list(seen)

    def _banner(self) -> str:
        if not self.rows:
            return "waiting for the first epoch ..."
        last = self.rows[-1]
        parts = [f"epoch {int(last['epoch'])}"]
        for key in ("train_loss", "test_loss", "train_acc", "test_acc"):
            v = last.get(key)
            if isinstance(v, (int, float)) and math.isfinite(v):
                parts.append(f"{key.replace('_', ' ')} {v:.4g}")
        text = ", ".join(parts)
        ew = self.early_warning
        if ew is not None and ew.fired:
            what = html.escape(ew.describe())
            return (
                f"<div style='background:{_HIGHLIGHT};color:white;padding:6px 10px;"
                f"border-radius:4px'><b>Early warning at epoch {ew.fired_epoch}</b>: "
                f"{what} (measured without the test loss; whether the test loss turns is not "
                f"known yet).</div><div>{text}</div>"
            )
        watching = ""
        if ew is not None:
            waiting = ew.rule == "gated_rise" and ew.gate_epoch is None
            gate = (
                "; waiting for the training loss to level off"
                if waiting
                else (f" since epoch {ew.gate_epoch}" if ew.gate_epoch is not None else "")
            )
            watching = f"; early warning watching {len(self._layers())} layers{gate}"
        return f"<div>{text}{watching}</div>"

    def _redraw(self) -> None:
        """Update the persistent axes: line data, limits, legend and the warning marker."""
        import matplotlib as mpl

        fig = self._panels["curves"].figure
        if not fig.axes:  # built once; later updates only change artists
            axes = fig.subplots(1, 3)
            for ax, label in zip(axes, ("loss", "accuracy", "sparsity"), strict=True):
                ax.set_xlabel("epoch", fontsize=9)
                ax.set_ylabel(label, fontsize=9)
                ax.tick_params(labelsize=8)
            if self.title:
                fig.suptitle(self.title, fontsize=10)
            fig.subplots_adjust(
                left=0.06, right=0.99, bottom=0.16, top=0.86 if self.title else 0.95, wspace=0.3
            )
            self._lines: dict[str, Any] = {}
            self._marks: list[Any] = []
        axes = fig.axes
        layers = self._layers()
        cmap = mpl.colormaps["viridis"]
        wanted = [
            ("train_loss", axes[0], "black"),
            ("test_loss", axes[0], _HIGHLIGHT),
            ("train_acc", axes[1], "black"),
            ("test_acc", axes[1], _HIGHLIGHT),
        ] + [
            (f"sparsity:{n}", axes[2], cmap(i / max(1, len(layers) - 1)))
            for i, n in enumerate(layers)
        ]
        legend_changed = False
        for key, ax, color in wanted:
            xs, ys = [], []
            for r in self.rows:
                v = r.get(key)
                if isinstance(v, (int, float)) and math.isfinite(float(v)):
                    xs.append(float(r["epoch"]))
                    ys.append(float(v))
            if not xs:
                continue
            line = self._lines.get(key)
            if line is None:
                label = key.split(":", 1)[1] if ":" in key else key.replace("_", " ")
                (line,) = ax.plot(xs, ys, color=color, marker=".", label=label)
                self._lines[key] = line
                legend_changed = True
            else:
                line.set_data(xs, ys)
                line.set_color(color)
        for ax in axes:
            ax.relim()
            ax.autoscale_view()
            if legend_changed and ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="best")
        warn = self.warning_epoch
        if warn is not None and not self._marks:
            self._marks = [ax.axvline(warn, color=_HIGHLIGHT, ls="--", lw=1) for ax in axes]
        self._panels["curves"].render()
        self._status(self._banner())


# ----------------------------------------------------------------------------- EpochScrubber


class EpochScrubber(_Widget):
    """A slider over the epochs of a run directory that have arrays (``arrays/epoch_*.npz``).

    Panels (``rendered`` keys): ``heatmap`` (layer x epoch sparsity from ``history.csv``, the
    current epoch and the chosen layer marked), ``channel_sparsity`` (per-channel sparsity of the
    layer at that epoch; black ticks: the first epoch with arrays), ``spatial`` (spatial sparsity
    maps over the probe images) and ``correlation`` (the C x C filter correlation). Controls:
    ``controls["epoch"]`` (SelectionSlider) and ``controls["layer"]`` (Dropdown).

    Args:
        run: a run directory (path or RunDir).
        layer: the layer shown first (default: the first layer that has arrays).
        probes: how many probe images to show.

    >>> scrub = EpochScrubber("runs/baseline")   # doctest: +SKIP
    >>> scrub.controls["epoch"].value = scrub.epochs[-1]   # doctest: +SKIP
    """

    def __init__(self, run: Any, layer: str | None = None, *, probes: int = 4) -> None:
        w = _ipywidgets()
        from xai_sparsity.runs.rundir import as_run

        self.run = as_run(run)
        self.epochs = self.run.array_epochs()
        if not self.epochs:
            raise XaiSparsityError(
                f"run {self.run.name!r} has no per-epoch arrays (arrays/epoch_*.npz); train with "
                f"array_every > 0 to write them"
            )
        if probes < 1:
            raise XaiSparsityError(f"probes={probes!r} must be at least 1")
        self._arrays: dict[int, dict[str, np.ndarray]] = {}
        self.layers = self._array_layers()
        if layer is not None:
            check_choice("layer", layer, self.layers)
        try:
            probe = self.run.load_probe()
        except XaiSparsityError:
            probe = {}
        images = probe.get("images")
        self.probe_images = None if images is None else np.asarray(images)[:probes]
        self.probes = int(probes)
        self._history = self.run.history()
        self._heat: Any = None

        self.controls = {
            "epoch": w.SelectionSlider(
                options=self.epochs,
                value=self.epochs[-1],
                description="epoch",
                continuous_update=False,
            ),
            "layer": w.Dropdown(
                options=self.layers, value=layer or self.layers[0], description="layer"
            ),
            "status": w.HTML(value=""),
        }
        self._panels = {
            "heatmap": _Panel((6.4, 3.0)),
            "channel_sparsity": _Panel((4.4, 3.0)),
            "spatial": _Panel((6.4, 2.4)),
            "correlation": _Panel((4.4, 3.4)),
        }
        c = self.controls
        p = {k: v.image for k, v in self._panels.items()}
        self.widget = w.VBox(
            [
                w.HBox([c["epoch"], c["layer"]]),
                c["status"],
                w.HBox([p["heatmap"], p["channel_sparsity"]]),
                w.HBox([p["spatial"], p["correlation"]]),
            ]
        )
        c["epoch"].observe(lambda _: self._redraw(set(self._panels)), names="value")
        c["layer"].observe(lambda _: self._redraw(set(self._panels)), names="value")
        self._redraw(set(self._panels))

    def _array_layers(self) -> list[str]:
        """The layers with channel:, spatial: or correlation: arrays (first and last epoch), in
        the run's layer order."""
        keys: set[str] = set()
        for e in (self.epochs[0], self.epochs[-1]):
            keys.update(self._load(e))
        in_arrays = {
            k.split(":", 1)[1]
            for k in keys
            if k.split(":", 1)[0] in ("channel", "spatial", "correlation")
        }
        ordered = [n for n in self.run.layers if n in in_arrays]
        ordered += sorted(in_arrays - set(ordered))
        if not ordered:
            raise XaiSparsityError(
                f"the arrays of run {self.run.name!r} hold no channel:/spatial:/correlation: "
                f"entries (keys: {sorted(keys)})"
            )
        return ordered

    @property
    def state(self) -> dict[str, Any]:
        """The current choices, read from the controls."""
        return {"epoch": int(self.controls["epoch"].value), "layer": self.controls["layer"].value}

    def _update_heatmap(self, epoch: int, layer: str) -> None:
        """Draw the layer x epoch heatmap once; later only move the marker and the highlight."""
        panel = self._panels["heatmap"]
        fig = panel.figure
        if self._heat is None:
            if not any(c.startswith("sparsity:") for c in self._history.columns):
                self._heat = False
            else:
                from xai_sparsity.views.figures import plot_sparsity_heatmap

                plot_sparsity_heatmap(self.run, fig=fig)
                fig.set_size_inches(6.4, 3.0)
                ax = fig.axes[0]
                self._heat = (ax, ax.axvline(epoch, color=_HIGHLIGHT, lw=2))
        if self._heat is False:
            if not fig.axes:
                ax = fig.add_subplot()
                ax.text(0.5, 0.5, "no sparsity history", ha="center", va="center")
                ax.set_axis_off()
                panel.render()
            return
        ax, line = self._heat
        line.set_xdata([epoch, epoch])
        ax.set_title(f"sparsity per layer; epoch {epoch} marked", fontsize=9)
        for label in ax.get_yticklabels():
            mine = label.get_text() == layer
            label.set_color(_HIGHLIGHT if mine else "black")
            label.set_fontweight("bold" if mine else "normal")
        panel.render()
        fig.set_layout_engine("none")  # keep the computed positions; later renders are cheaper

    def _load(self, epoch: int) -> dict[str, np.ndarray]:
        hit = self._arrays.get(epoch)
        if hit is None:
            hit = self.run.load_arrays(epoch)
            self._arrays[epoch] = hit
        return hit

    def _redraw(self, panels: set[str]) -> None:
        epoch, layer = self.state["epoch"], self.state["layer"]
        arrays = self._load(epoch)
        painters: dict[str, Callable[[int, str, Mapping[str, np.ndarray], Figure], None]] = {
            "channel_sparsity": self._paint_channels,
            "spatial": self._paint_spatial,
            "correlation": self._paint_correlation,
        }
        if "heatmap" in panels:
            self._update_heatmap(epoch, layer)
        for name, paint in painters.items():
            if name in panels:
                self._panels[name].draw(partial(paint, epoch, layer, arrays))
        self._status(self._status_line(epoch, layer))

    def _status_line(self, epoch: int, layer: str) -> str:
        """The epoch, the layer and that epoch's test loss, accuracy and layer sparsity."""
        df = self._history
        row = df[df["epoch"] == epoch] if "epoch" in df.columns else df.iloc[:0]
        info = [f"epoch <b>{epoch}</b>", f"layer <b>{layer}</b>"]
        if len(row):
            for key in ("test_loss", "test_acc", f"sparsity:{layer}"):
                if key in row.columns and np.isfinite(float(row[key].iloc[0])):
                    info.append(f"{key} {float(row[key].iloc[0]):.4g}")
        return ", ".join(info)

    @staticmethod
    def _missing(fig: Figure, what: str, epoch: int, layer: str) -> None:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, f"no {what} for {layer}\nat epoch {epoch}", ha="center", va="center")
        ax.set_axis_off()

    def _paint_channels(
        self, epoch: int, layer: str, arrays: Mapping[str, np.ndarray], fig: Figure
    ) -> None:
        """Per-channel sparsity at ``epoch``; black ticks: the first epoch with arrays."""
        key = f"channel:{layer}"
        if key not in arrays:
            self._missing(fig, "per-channel sparsity", epoch, layer)
            return
        first = self._load(self.epochs[0])
        ax = fig.add_subplot()
        values = np.asarray(arrays[key], dtype=float)
        _bars(ax, values, None, title=f"{layer}: per-channel sparsity, epoch {epoch}")
        if key in first and self.epochs[0] != epoch:
            base = np.asarray(first[key], dtype=float)
            ax.scatter(
                np.arange(len(base)),
                base,
                marker="_",
                color="black",
                s=60,
                label=f"epoch {self.epochs[0]}",
            )
            ax.legend(fontsize=7, loc="lower right")
        fig.subplots_adjust(left=0.13, right=0.97, bottom=0.15, top=0.9)

    def _paint_spatial(
        self, epoch: int, layer: str, arrays: Mapping[str, np.ndarray], fig: Figure
    ) -> None:
        """The spatial sparsity maps over the probe images (or alone, without them)."""
        key = f"spatial:{layer}"
        if key not in arrays:
            self._missing(fig, "spatial maps", epoch, layer)
            return
        maps = np.asarray(arrays[key], dtype=float)[: self.probes]
        axes = fig.subplots(1, len(maps), squeeze=False)[0]
        art = None
        for k, (ax, m) in enumerate(zip(axes, maps, strict=True)):
            title = f"probe {k}: {m.mean():.2f}"
            if self.probe_images is not None and k < len(self.probe_images):
                art = _overlay(
                    ax, self.probe_images[k], m, cmap=_SEQ_CMAP, vmin=0, vmax=1, title=title
                )
            else:
                art = ax.imshow(m, cmap=_SEQ_CMAP, vmin=0, vmax=1)
                ax.set_title(title, fontsize=9)
                ax.set_axis_off()
        if art is not None:
            fig.colorbar(art, ax=list(axes), fraction=0.03, pad=0.02)
        fig.suptitle(f"{layer}: spatial sparsity maps, epoch {epoch}", fontsize=9)

    def _paint_correlation(
        self, epoch: int, layer: str, arrays: Mapping[str, np.ndarray], fig: Figure
    ) -> None:
        """The layer's C x C filter correlation at ``epoch``."""
        key = f"correlation:{layer}"
        if key not in arrays:
            self._missing(fig, "correlation matrix", epoch, layer)
            return
        r = np.asarray(arrays[key], dtype=float)
        ax = fig.add_subplot()
        dead = ~np.any(r != 0, axis=1)
        _correlation_image(
            fig, ax, r, f"{layer}, epoch {epoch}: mean |r| {correlation_summary(r, dead):.2f}"
        )
        fig.subplots_adjust(left=0.12, right=0.86, bottom=0.13, top=0.9)


# ----------------------------------------------------------------------------- RunComparison


def _find_runs(folder: Path) -> dict[str, Path]:
    """Run directories (folders with a history.csv) below ``folder``, named by relative path."""
    found = sorted(p.parent for p in folder.rglob("history.csv"))
    return {str(p.relative_to(folder)).replace(os.sep, "/") or p.name: p for p in found}


class RunComparison(_Widget):
    """The arms of an experiment side by side: test loss, test accuracy and sparsity per layer.

    Panels (``rendered`` keys): ``curves`` (test loss, test accuracy and the chosen layer's
    sparsity over epochs, one colour per arm) and ``layers`` (every layer's sparsity at the last
    epoch, grouped by arm, the chosen layer marked). ``controls["layer"]`` chooses the layer;
    ``controls["status"]`` holds a summary table (best test accuracy, minimum test loss, ``t_L``).

    Args:
        runs: ``{arm name: run directory}`` or a folder holding run directories (every folder
            below it with a ``history.csv``; the arm name is its relative path).
        layer: the layer shown first.
        measure: the history column prefix drawn ("sparsity", "hoyer", "zero_fraction", ...).

    >>> RunComparison({"baseline": "runs/base", "penalised": "runs/pen"})   # doctest: +SKIP
    """

    def __init__(
        self,
        runs: Mapping[str, Any] | str | os.PathLike[str],
        layer: str | None = None,
        *,
        measure: str = "sparsity",
    ) -> None:
        w = _ipywidgets()
        from xai_sparsity.runs.rundir import as_run

        if isinstance(runs, Mapping):
            paths = dict(runs)
        else:
            folder = Path(runs)
            if not folder.is_dir():
                raise XaiSparsityError(f"experiment folder {str(folder)!r} does not exist")
            paths = dict(_find_runs(folder))
        if not paths:
            raise XaiSparsityError(f"no run directories (folders with history.csv) in {runs!r}")
        self.runs = {str(name): as_run(p) for name, p in paths.items()}
        self.measure = measure
        self.histories = {name: r.history() for name, r in self.runs.items()}
        prefix = f"{measure}:"
        layers: dict[str, None] = {}
        for df in self.histories.values():
            for col in df.columns:
                if col.startswith(prefix):
                    layers.setdefault(col[len(prefix) :])
        self.layers = list(layers)
        if not self.layers:
            raise XaiSparsityError(
                f"none of the runs {list(self.runs)} has {measure!r} columns in its history"
            )
        if layer is not None:
            check_choice("layer", layer, self.layers)
        self.controls = {
            "layer": w.Dropdown(
                options=self.layers, value=layer or self.layers[-1], description="layer"
            ),
            "status": w.HTML(value=self._table()),
        }
        self._panels = {"curves": _Panel((11.0, 3.2)), "layers": _Panel((11.0, 2.8))}
        self.widget = w.VBox(
            [
                self.controls["layer"],
                self._panels["curves"].image,
                self._panels["layers"].image,
                self.controls["status"],
            ]
        )
        self.controls["layer"].observe(lambda _: self._redraw(), names="value")
        self._redraw()

    @property
    def state(self) -> dict[str, Any]:
        """The current choices, read from the controls."""
        return {"layer": self.controls["layer"].value}

    def _colors(self) -> list[Any]:
        import matplotlib as mpl

        cycle = mpl.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
        okabe = ["#000000", "#E69F00", "#56B4E9", "#009E73", "#D55E00", "#0072B2", "#CC79A7"]
        palette = okabe if len(self.runs) <= len(okabe) else cycle
        return [palette[i % len(palette)] for i in range(len(self.runs))]

    def summary(self) -> pd.DataFrame:
        """One row per arm: epochs, best test accuracy, minimum test loss, last test loss, t_L."""
        import pandas as pd

        from xai_sparsity.runs.analysis import overfitting_onset

        rows = []
        for name, df in self.histories.items():
            row: dict[str, Any] = {"arm": name, "epochs": len(df)}
            if "test_acc" in df.columns and df["test_acc"].notna().any():
                i = int(np.nanargmax(df["test_acc"].to_numpy(dtype=float)))
                row["best_test_acc"] = float(df["test_acc"].iloc[i])
                row["best_acc_epoch"] = int(df["epoch"].iloc[i])
            if "test_loss" in df.columns and df["test_loss"].notna().any():
                i = int(np.nanargmin(df["test_loss"].to_numpy(dtype=float)))
                row["min_test_loss"] = float(df["test_loss"].iloc[i])
                row["min_loss_epoch"] = int(df["epoch"].iloc[i])
                row["last_test_loss"] = float(df["test_loss"].iloc[-1])
                onset = overfitting_onset(
                    df["test_loss"].tolist(), df["epoch"].astype(int).tolist()
                )
                row["t_L"] = onset.t_L
                row["turned"] = onset.turned
            rows.append(row)
        return pd.DataFrame(rows)

    def _table(self) -> str:
        return str(self.summary().to_html(index=False, float_format=lambda v: f"{v:.4g}"))

    def _redraw(self) -> None:
        layer = self.state["layer"]
        col = f"{self.measure}:{layer}"
        colors = self._colors()

        def paint_curves(fig: Figure) -> None:
            if all(col in df.columns for df in self.histories.values()):
                from xai_sparsity.views.figures import plot_regulariser_comparison

                plot_regulariser_comparison(self.runs, layer=layer, measure=self.measure, fig=fig)
                return
            axes = fig.subplots(1, 3)  # a layer some arms did not measure
            for (name, df), color in zip(self.histories.items(), colors, strict=True):
                ep = df["epoch"].to_numpy()
                for ax, key in zip(axes, ("test_loss", "test_acc", col), strict=True):
                    if key in df.columns:
                        ax.plot(ep, df[key].to_numpy(dtype=float), color=color, label=name)
            for ax, label in zip(
                axes, ("test loss", "test accuracy", f"{self.measure}: {layer}"), strict=True
            ):
                ax.set_xlabel("epoch", fontsize=9)
                ax.set_ylabel(label, fontsize=9)
                ax.tick_params(labelsize=8)
            axes[0].legend(fontsize=7, loc="best")
            fig.subplots_adjust(left=0.06, right=0.99, bottom=0.16, top=0.95, wspace=0.3)

        def paint_layers(fig: Figure) -> None:
            ax = fig.add_subplot()
            n = len(self.runs)
            width = 0.8 / n
            x = np.arange(len(self.layers))
            for k, ((name, df), color) in enumerate(
                zip(self.histories.items(), colors, strict=True)
            ):
                last = df.iloc[-1] if len(df) else None
                values = [
                    float(last[f"{self.measure}:{n_}"])
                    if last is not None and f"{self.measure}:{n_}" in df.columns
                    else np.nan
                    for n_ in self.layers
                ]
                ax.bar(x + (k - (n - 1) / 2) * width, values, width, color=color, label=name)
            i = self.layers.index(layer)
            ax.axvspan(i - 0.45, i + 0.45, color=_HIGHLIGHT, alpha=0.15, lw=0)
            ax.set_xticks(x, self.layers, fontsize=8, rotation=30, ha="right")
            ax.set_ylabel(f"{self.measure} (last epoch)", fontsize=9)
            ax.legend(fontsize=7, loc="best", ncol=min(n, 4))
            fig.subplots_adjust(left=0.07, right=0.99, bottom=0.3, top=0.95)

        self._panels["curves"].draw(paint_curves)
        self._panels["layers"].draw(paint_layers)
