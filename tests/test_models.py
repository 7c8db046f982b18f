"""Models: readable names, small-image adaptations, no in-place activations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xai_sparsity import XaiSparsityError
from xai_sparsity.training.models import make_model


def test_cnn_names_and_shapes() -> None:
    model = make_model("cnn", num_classes=10, in_channels=1, image_size=28, dropout=0.5)
    names = [n for n, _ in model.named_modules() if n]
    for expected in (
        "features.conv1",
        "features.relu1",
        "features.pool1",
        "features.conv4",
        "features.relu4",
        "features.pool2",
        "classifier.flatten",
        "classifier.fc1",
        "classifier.relu",
        "classifier.dropout",
        "classifier.fc2",
    ):
        assert expected in names
    assert "features.bn1" not in names
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    bn = make_model(
        "cnn", num_classes=5, in_channels=3, image_size=(32, 30), batch_norm=True, widths=(8, 8, 8)
    )
    assert isinstance(dict(bn.named_modules())["features.bn3"], nn.BatchNorm2d)
    assert bn(torch.randn(2, 3, 32, 30)).shape == (2, 5)


@pytest.mark.parametrize("name", ["resnet18", "vgg11"])
def test_torchvision_models_small_images(name: str) -> None:
    model = make_model(name, num_classes=7, in_channels=1, image_size=28)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 7)
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    if name == "resnet18":
        conv1 = dict(model.named_modules())["conv1"]
        assert isinstance(conv1, nn.Conv2d) and conv1.stride == (1, 1)


def test_bad_model_arguments() -> None:
    with pytest.raises(XaiSparsityError, match="'cnn', 'resnet18', 'vgg11'"):
        make_model("resnet", num_classes=10, in_channels=1, image_size=28)
    with pytest.raises(XaiSparsityError, match="too small"):
        make_model("cnn", num_classes=10, in_channels=1, image_size=2, widths=(4, 4, 4, 4))
    with pytest.raises(XaiSparsityError, match="dropout"):
        make_model("cnn", num_classes=10, in_channels=1, image_size=28, dropout=1.5)
