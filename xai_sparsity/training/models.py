"""Models for the training harness: a plain VGG-style CNN and small-image ResNet-18 / VGG-11.

The plain CNN has readable layer names, so sparsity tables and figures say what they show::

    features.conv1, [features.bn1], features.relu1, features.conv2, ..., features.pool1
    (a 2x2 max-pool after every second conv), ..., classifier.flatten, classifier.fc1,
    classifier.relu, [classifier.dropout], classifier.fc2

torchvision's ResNet-18 and VGG-11 (random weights) are adapted to small images: ResNet-18 gets a
3x3 stride-1 stem and no max-pool; VGG-11 drops the max-pools that would shrink the map below
1x1, pools globally and gets a small classifier (``hidden`` units). Both take ``in_channels``
and ``num_classes``. Every ReLU is made non-inplace so that captured activations are exact.

The trainer accepts any ``nn.Module``; these are conveniences.

>>> import torch
>>> from xai_sparsity.training.models import make_model
>>> model = make_model("cnn", num_classes=10, in_channels=1, image_size=28)
>>> model(torch.zeros(2, 1, 28, 28)).shape
torch.Size([2, 10])
>>> [n for n, _ in model.named_modules() if n.endswith("relu1") or n == "classifier.relu"]
['features.relu1', 'classifier.relu']
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import nn

from xai_sparsity.base.errors import XaiSparsityError, check_choice

MODELS = ("cnn", "resnet18", "vgg11")


def _size(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = (int(v) for v in image_size)
    return h, w


def make_cnn(
    *,
    num_classes: int,
    in_channels: int,
    image_size: int | Sequence[int],
    widths: Sequence[int] = (16, 16, 32, 32),
    hidden: int = 128,
    dropout: float = 0.0,
    batch_norm: bool = False,
) -> nn.Sequential:
    """The plain VGG-style CNN: 3x3 convs (padding 1) + ReLU, a max-pool after every 2nd conv.

    Input (B, in_channels, H, W) -> logits (B, num_classes).
    """
    if not widths:
        raise XaiSparsityError("widths=() must list at least one conv width")
    h, w = _size(image_size)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    c_in = in_channels
    n_pool = 0
    for i, width in enumerate(widths, start=1):
        layers[f"conv{i}"] = nn.Conv2d(c_in, int(width), 3, padding=1, bias=not batch_norm)
        if batch_norm:
            layers[f"bn{i}"] = nn.BatchNorm2d(int(width))
        layers[f"relu{i}"] = nn.ReLU()
        c_in = int(width)
        if i % 2 == 0:
            if h < 2 or w < 2:
                raise XaiSparsityError(
                    f"image_size={image_size!r} is too small for {len(widths)} conv layers "
                    f"(a max-pool after every second conv halves it)"
                )
            n_pool += 1
            layers[f"pool{n_pool}"] = nn.MaxPool2d(2)
            h, w = h // 2, w // 2
    head: OrderedDict[str, nn.Module] = OrderedDict()
    head["flatten"] = nn.Flatten()
    head["fc1"] = nn.Linear(c_in * h * w, hidden)
    head["relu"] = nn.ReLU()
    if dropout > 0:
        head["dropout"] = nn.Dropout(dropout)
    head["fc2"] = nn.Linear(hidden, num_classes)
    return nn.Sequential(
        OrderedDict([("features", nn.Sequential(layers)), ("classifier", nn.Sequential(head))])
    )


def _no_inplace(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.Hardtanh)):
            module.inplace = False
    return model


def make_resnet18(*, num_classes: int, in_channels: int, dropout: float = 0.0) -> nn.Module:
    """torchvision ResNet-18 (random weights) with a 3x3 stride-1 stem and no max-pool."""
    from torchvision.models import resnet18

    model = resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    if dropout > 0:
        model.fc = nn.Sequential(OrderedDict([("dropout", nn.Dropout(dropout)), ("fc", model.fc)]))
    return _no_inplace(model)


def make_vgg11(
    *,
    num_classes: int,
    in_channels: int,
    image_size: int | Sequence[int],
    hidden: int = 128,
    dropout: float = 0.0,
    batch_norm: bool = False,
) -> nn.Module:
    """torchvision VGG-11 (random weights) for small images, with a small classifier."""
    from torchvision.models import vgg11, vgg11_bn

    model = (vgg11_bn if batch_norm else vgg11)(weights=None)
    first = model.features[0]
    assert isinstance(first, nn.Conv2d)
    model.features[0] = nn.Conv2d(in_channels, first.out_channels, 3, padding=1)
    h, w = _size(image_size)
    for i, module in enumerate(model.features):
        if isinstance(module, nn.MaxPool2d):
            if h // 2 >= 1 and w // 2 >= 1:
                h, w = h // 2, w // 2
            else:
                model.features[i] = nn.Identity()
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    head: OrderedDict[str, nn.Module] = OrderedDict()
    head["flatten"] = nn.Flatten()
    head["fc1"] = nn.Linear(512, hidden)
    head["relu"] = nn.ReLU()
    if dropout > 0:
        head["dropout"] = nn.Dropout(dropout)
    head["fc2"] = nn.Linear(hidden, num_classes)
    model.classifier = nn.Sequential(head)
    return _no_inplace(model)


def make_model(
    name: str = "cnn",
    *,
    num_classes: int,
    in_channels: int,
    image_size: int | Sequence[int],
    widths: Sequence[int] = (16, 16, 32, 32),
    hidden: int = 128,
    dropout: float = 0.0,
    batch_norm: bool = False,
) -> nn.Module:
    """Build a model by name: ``"cnn"`` (plain VGG-style), ``"resnet18"`` or ``"vgg11"``.

    ``widths`` only applies to ``"cnn"``; ``hidden`` to ``"cnn"`` and ``"vgg11"``; ResNet-18 always
    has batch norm (``batch_norm`` is ignored) and puts ``dropout`` before its last linear layer.
    Input (B, in_channels, H, W) -> logits (B, num_classes).
    """
    check_choice("model", name, MODELS)
    if num_classes < 2:
        raise XaiSparsityError(f"num_classes={num_classes!r} must be at least 2")
    if not 0.0 <= dropout < 1.0:
        raise XaiSparsityError(f"dropout={dropout!r} must be in [0, 1)")
    if name == "cnn":
        return make_cnn(
            num_classes=num_classes,
            in_channels=in_channels,
            image_size=image_size,
            widths=widths,
            hidden=hidden,
            dropout=dropout,
            batch_norm=batch_norm,
        )
    if name == "resnet18":
        return make_resnet18(num_classes=num_classes, in_channels=in_channels, dropout=dropout)
    return make_vgg11(
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        hidden=hidden,
        dropout=dropout,
        batch_norm=batch_norm,
    )


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["MODELS", "count_parameters", "make_cnn", "make_model", "make_resnet18", "make_vgg11"]
