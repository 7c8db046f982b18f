"""Captum attributions as (B, H, W) maps at the input size, to show beside spatial sparsity maps.

:func:`attribute` runs one of Captum's methods (``Saliency``, ``IntegratedGradients``,
``GuidedBackprop``, ``Occlusion``, ``LayerGradCam``) in batches and returns one non-negative
map per image:

* pixel methods (saliency, integrated gradients, guided backprop, occlusion): the magnitude
  ``|attribution|`` summed over the input channels, shape (B, H, W);
* ``"gradcam"``: ``LayerGradCam`` of a conv layer (default: the model's last ``nn.Conv2d``) with
  ``relu_attributions=True``, upsampled bilinearly to (H, W) with Captum's
  ``LayerAttribution.interpolate``.

The model runs in eval mode during attribution and every module's train/eval flag is restored
afterwards; parameters' ``requires_grad`` and ``.grad`` are left untouched. In-place activations
(``nn.ReLU(inplace=True)`` in torchvision models) break Captum's backward hooks, so modules with an
``inplace`` flag are switched to out-of-place for the call and restored.

>>> import torch
>>> from torch import nn
>>> from xai_sparsity.views.attributions import attribute
>>> model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
>>> attribute(model, torch.rand(2, 1, 4, 4), method="gradcam").shape
torch.Size([2, 4, 4])
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from xai_sparsity.base.errors import XaiSparsityError, check_choice, closest

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

METHODS: tuple[str, ...] = (
    "saliency",
    "integrated_gradients",
    "guided_backprop",
    "occlusion",
    "gradcam",
)
"""The attribution methods of :func:`attribute`."""

PIXEL_METHODS = ("saliency", "integrated_gradients", "guided_backprop", "occlusion")

TargetsLike = int | Sequence[int] | Tensor | np.ndarray | None


# --------------------------------------------------------------------------- model state
@contextlib.contextmanager
def _attribution_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and out-of-place activations for the block; both restored afterwards."""
    from xai_sparsity.base.modules import eval_mode

    inplace = [m for m in model.modules() if getattr(m, "inplace", None) is True]
    with eval_mode(model):
        try:
            for m in inplace:
                m.inplace = False  # type: ignore[assignment]
            yield
        finally:
            for m in inplace:
                m.inplace = True  # type: ignore[assignment]


def _resolve_layer(model: nn.Module, layer: str | nn.Module | None) -> tuple[str, nn.Module]:
    modules = dict(model.named_modules())
    if layer is None:
        convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
        if not convs:
            raise XaiSparsityError(
                "method 'gradcam' needs a conv layer and the model has no nn.Conv2d; pass layer=NAME"
            )
        return convs[-1], modules[convs[-1]]
    if isinstance(layer, nn.Module):
        for name, m in modules.items():
            if m is layer:
                return name, m
        raise XaiSparsityError(f"layer {type(layer).__name__} is not a submodule of the model")
    if layer not in modules or layer == "":
        names = [n for n in modules if n]
        raise XaiSparsityError(
            f"layer {layer!r} is not a module of the model; closest names: "
            f"{closest(str(layer), names)} (all names: model.named_modules())"
        )
    return layer, modules[layer]


def _targets(model: nn.Module, images: Tensor, targets: TargetsLike, batch_size: int) -> Tensor:
    n = images.shape[0]
    if targets is None:
        preds = []
        with torch.no_grad():
            for start in range(0, n, batch_size):
                out = model(images[start : start + batch_size])
                if out.ndim != 2:
                    raise XaiSparsityError(
                        f"the model output has shape {tuple(out.shape)}; attribution needs "
                        "class scores (B, num_classes)"
                    )
                preds.append(out.argmax(dim=1))
        return torch.cat(preds)
    if isinstance(targets, int):
        return torch.full((n,), int(targets), dtype=torch.long, device=images.device)
    t = torch.as_tensor(np.asarray(targets) if not isinstance(targets, Tensor) else targets)
    t = t.reshape(-1).to(device=images.device, dtype=torch.long)
    if t.numel() != n:
        raise XaiSparsityError(f"got {t.numel()} targets for {n} images; give one per image")
    return t


def _baseline_chunk(baselines: Any, start: int, stop: int, like: Tensor) -> Any:
    if baselines is None or isinstance(baselines, (int, float)):
        return baselines
    b = torch.as_tensor(baselines, dtype=like.dtype, device=like.device)
    if b.ndim == like.ndim - 1:
        return b.unsqueeze(0).expand_as(like)
    if b.ndim == like.ndim and b.shape[0] == 1:
        return b.expand_as(like)
    if b.ndim == like.ndim:
        return b[start:stop]
    raise XaiSparsityError(
        f"baselines of shape {tuple(b.shape)} do not fit images of shape (B, {', '.join(map(str, like.shape[1:]))})"
    )


# --------------------------------------------------------------------------- attribute
def attribute(
    model: nn.Module,
    images: Tensor,
    targets: TargetsLike = None,
    *,
    method: str = "saliency",
    layer: str | nn.Module | None = None,
    batch_size: int = 32,
    baselines: Tensor | float | None = None,
    progress: bool | None = None,
    **kwargs: Any,
) -> Tensor:
    """Attribution maps of ``images`` (B, C, H, W) for ``targets`` -> Tensor (B, H, W).

    Args:
        model: a classifier returning (B, num_classes) scores.
        images: (B, C, H, W) input batch (moved to the model's device).
        targets: class per image (int, sequence or (B,) tensor); None: the predicted class.
        method: one of :data:`METHODS`.
        layer: the layer of ``"gradcam"`` (name or module; default the last ``nn.Conv2d``);
            ignored by the pixel methods. For a module called several times per forward
            (torchvision ResNet's ``relu`` in each block) Captum uses its last call.
        batch_size: images per Captum call; the result does not depend on it.
        baselines: reference input of integrated gradients and occlusion (default zeros): a
            number, (C, H, W) or (B, C, H, W).
        progress: show a tqdm bar over batches (None: only when there is more than one batch).
        **kwargs: passed to Captum's ``attribute`` (e.g. ``n_steps`` for integrated gradients,
            ``sliding_window_shapes``/``strides`` for occlusion, ``relu_attributions`` for gradcam).
            Occlusion defaults to a window of about 1/8 of the image side and half-window strides.

    Returns:
        Detached float tensor (B, H, W) on the device of ``images``: non-negative magnitudes
        summed over input channels for pixel methods; the upsampled Grad-CAM map for "gradcam".

    >>> import torch
    >>> from torch import nn
    >>> m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    >>> attribute(m, torch.rand(5, 3, 8, 8), method="integrated_gradients", n_steps=8).shape
    torch.Size([5, 8, 8])
    """
    from tqdm.auto import tqdm

    check_choice("method", method, METHODS)
    _check_images(images, batch_size)
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else images.device
    out_device = images.device
    x_all = images.detach().to(device=device, dtype=param.dtype if param is not None else None)
    n = x_all.shape[0]
    layer_name, layer_module = _resolve_layer(model, layer) if method == "gradcam" else ("", None)

    maps: list[Tensor] = []
    with _attribution_mode(model):
        tgt = _targets(model, x_all, targets, batch_size)
        explainer = _explainer(model, method, layer_module, tuple(x_all.shape), batch_size, kwargs)
        starts = range(0, n, batch_size)
        show = progress if progress is not None else len(starts) > 1
        for start in tqdm(starts, desc=f"{method}", disable=not show, leave=False):
            stop = min(start + batch_size, n)
            x = x_all[start:stop].clone()
            if method in ("saliency", "integrated_gradients", "guided_backprop"):
                x.requires_grad_(True)
            extra: dict[str, Any] = dict(kwargs)
            if method in ("integrated_gradients", "occlusion") and baselines is not None:
                extra["baselines"] = _baseline_chunk(baselines, start, stop, x)
            with warnings.catch_warnings():
                # Captum announces the temporary ReLU hooks of guided backprop on every call
                warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")
                attr = explainer.attribute(x, target=tgt[start:stop], **extra)
            maps.append(_to_map(attr, method, layer_name, x_all.shape[2:]))
    return torch.cat(maps).float().to(out_device)


def _check_images(images: Any, batch_size: int) -> None:
    """Raise unless ``images`` is a non-empty (B, C, H, W) tensor and ``batch_size`` >= 1."""
    if not isinstance(images, Tensor):
        raise XaiSparsityError(
            f"images must be a torch.Tensor (B, C, H, W); got {type(images).__name__}"
        )
    if images.ndim != 4:
        raise XaiSparsityError(
            f"images must have shape (B, C, H, W); got shape {tuple(images.shape)} "
            f"(rank {images.ndim}){' - add a batch dim with images[None]' if images.ndim == 3 else ''}"
        )
    if images.shape[0] == 0:
        raise XaiSparsityError("images is an empty batch")
    if int(batch_size) < 1:
        raise XaiSparsityError(f"batch_size={batch_size!r} must be at least 1")


def _explainer(
    model: nn.Module,
    method: str,
    layer: nn.Module | None,
    shape: tuple[int, ...],
    batch_size: int,
    kwargs: dict[str, Any],
) -> Any:
    """The Captum explainer of ``method``; sets its defaults in ``kwargs`` (images ``shape``)."""
    from captum.attr import GuidedBackprop, IntegratedGradients, LayerGradCam, Occlusion, Saliency

    n, c, h, w = shape
    if method == "saliency":
        return Saliency(model)
    if method == "integrated_gradients":
        kwargs.setdefault("internal_batch_size", batch_size)
        return IntegratedGradients(model)
    if method == "guided_backprop":
        return GuidedBackprop(model)
    if method == "occlusion":
        win = max(1, round(min(h, w) / 8))
        kwargs.setdefault("sliding_window_shapes", (c, win, win))
        kwargs.setdefault("strides", (c, max(1, win // 2), max(1, win // 2)))
        # about 128 perturbed images per forward pass, whatever the batch size
        kwargs.setdefault("perturbations_per_eval", max(1, 128 // min(batch_size, n)))
        return Occlusion(model)
    kwargs.setdefault("relu_attributions", True)
    return LayerGradCam(model, layer)


def _to_map(attr: Tensor, method: str, layer_name: str, size: Sequence[int]) -> Tensor:
    """Captum's attributions of one batch -> (b, H, W) maps: |attr| summed over the input
    channels, or Grad-CAM upsampled to the image ``size``."""
    if method != "gradcam":
        return attr.detach().abs().sum(dim=1)
    from captum.attr import LayerAttribution

    if attr.ndim != 4:
        raise XaiSparsityError(
            f"gradcam needs a layer with a spatial output (B, C, H, W); layer "
            f"{layer_name!r} gives attributions of shape {tuple(attr.shape)}"
        )
    h, w = (int(v) for v in size)
    attr = LayerAttribution.interpolate(attr, (h, w), interpolate_mode="bilinear")
    return attr.sum(dim=1).detach()


# --------------------------------------------------------------------------- plotting
def plot_attributions(
    images: Tensor | np.ndarray,
    attributions: Tensor | np.ndarray | Mapping[str, Tensor | np.ndarray],
    *,
    titles: Sequence[str] | None = None,
    overlay: bool = True,
    alpha: float = 0.6,
    cmap: str = "inferno",
    fig: Figure | None = None,
) -> Figure:
    """Grid of input images (rows) and their attribution maps (one column per method).

    Args:
        images: (B, C, H, W) or (B, H, W) inputs.
        attributions: (B, H, W) maps, or a mapping method name -> (B, H, W).
        titles: per-image row labels (e.g. class names).
        overlay: draw each map semi-transparently over the grey input; otherwise alone.
        alpha: opacity of the overlay.
        cmap: colour map of the attributions (each map scaled to its own max).
        fig: draw into this figure (cleared).

    Returns:
        The figure; ``fig.xai_data`` is a dict of arrays ``{"images": ..., <method>: (B, H, W)}``.
    """
    from xai_sparsity.views.plotting import (
        attach,
        grey,
        new_figure,
        normalise_map,
        rc_width,
        to_display,
    )

    imgs = _to_numpy(images)
    if imgs.ndim == 3:
        imgs = imgs[:, None]
    if imgs.ndim != 4:
        raise XaiSparsityError(f"images must be (B, C, H, W) or (B, H, W); got {imgs.shape}")
    maps = (
        {str(k): _to_numpy(v) for k, v in attributions.items()}
        if isinstance(attributions, Mapping)
        else {"attribution": _to_numpy(attributions)}
    )
    for name, m in maps.items():
        if m.shape != (imgs.shape[0], *imgs.shape[2:]):
            raise XaiSparsityError(
                f"attributions {name!r} have shape {m.shape}; expected (B, H, W) = "
                f"{(imgs.shape[0], *imgs.shape[2:])}"
            )
    b = imgs.shape[0]
    if titles is not None and len(titles) != b:
        raise XaiSparsityError(f"got {len(titles)} titles for {b} images")
    cols = 1 + len(maps)
    w = rc_width()
    cell = w / cols
    fig = new_figure(fig, w, cell * b + 0.3)
    axes = np.asarray(fig.subplots(b, cols, squeeze=False))
    for i in range(b):
        shown = to_display(imgs[i])
        axes[i, 0].imshow(shown, cmap="gray" if shown.ndim == 2 else None)
        if titles is not None:
            axes[i, 0].set_ylabel(str(titles[i]))
        for j, (name, m) in enumerate(maps.items(), start=1):
            ax = axes[i, j]
            norm = normalise_map(m[i])
            if overlay:
                ax.imshow(grey(imgs[i]), cmap="gray")
                ax.imshow(norm, cmap=cmap, alpha=alpha, vmin=0, vmax=1)
            else:
                ax.imshow(norm, cmap=cmap, vmin=0, vmax=1)
            if i == 0:
                ax.set_title(name.replace("_", " "))
        if i == 0:
            axes[0, 0].set_title("input")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return attach(fig, {"images": imgs, **maps})


def _to_numpy(x: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)
