"""The models and inputs the benchmark cases share."""

from __future__ import annotations

import re

import torch
from torch import nn

DEFAULT_CNN_BATCH = 256
RESNET_BATCH = 64


def default_cnn() -> nn.Module:
    """The project's default CNN for 28x28 grey images (10 classes)."""
    from xai_sparsity.training.models import make_model

    return make_model("cnn", num_classes=10, in_channels=1, image_size=28)


def resnet18() -> nn.Module:
    """torchvision's ResNet-18 (random weights, 10 classes), as users would take it."""
    from torchvision.models import resnet18 as tv_resnet18

    return tv_resnet18(weights=None, num_classes=10)


def model_and_input(name: str, quick: bool, device: str = "cpu") -> tuple[nn.Module, torch.Tensor]:
    """``("cnn" | "resnet18")`` -> model and a random input batch (smaller with ``quick``)."""
    if name == "cnn":
        model = default_cnn()
        batch = 8 if quick else DEFAULT_CNN_BATCH
        x = torch.randn(batch, 1, 28, 28)
    elif name == "resnet18":
        model = resnet18()
        batch = 2 if quick else RESNET_BATCH
        x = torch.randn(batch, 3, 32, 32)
    else:
        raise ValueError(f"unknown benchmark model {name!r}; choose 'cnn' or 'resnet18'")
    return model.to(device), x.to(device)


def fx_nodes(model: nn.Module, layers: list[str]) -> list[str]:
    """torchvision FX node names of every call of the given modules (``relu``, ``relu_1``, ...)."""
    from torchvision.models.feature_extraction import get_graph_node_names

    _, eval_nodes = get_graph_node_names(model)
    wanted = set(layers)
    return [n for n in eval_nodes if n in wanted or re.sub(r"_\d+$", "", n) in wanted]
