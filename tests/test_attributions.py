"""Captum attributions: shapes, finiteness, batching invariance, model state, torchvision models."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from xai_sparsity import XaiSparsityError
from xai_sparsity.views.attributions import METHODS, attribute, plot_attributions

FAST = {
    "integrated_gradients": {"n_steps": 8},
    "occlusion": {"sliding_window_shapes": (3, 4, 4), "strides": (3, 2, 2)},
}


# Conv(3, 8), ReLU, Conv(8, 8), BN, ReLU, MaxPool, Conv(8, 16), ReLU, Flatten, Dropout, Linear(1024, 5)
# with in-place ReLUs, for (B, 3, 16, 16) images
CNN = {
    "in_channels": 3,
    "widths": (8, 8, 16),
    "image_size": 16,
    "num_classes": 5,
    "norm_after": (1,),
    "pool_after": (1,),
    "inplace": True,
    "dropout": 0.5,
}


@pytest.fixture(scope="module")
def model(small_cnn: Callable[..., nn.Sequential]) -> nn.Sequential:
    return small_cnn(**CNN)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(6, 3, 16, 16, generator=g)


@pytest.fixture(scope="module")
def maps(model: nn.Sequential, images: torch.Tensor) -> dict[str, torch.Tensor]:
    return {m: attribute(model, images, method=m, **FAST.get(m, {})) for m in METHODS}


@pytest.mark.parametrize("method", METHODS)
def test_maps_are_finite_nonnegative_and_input_sized(
    maps: dict[str, torch.Tensor], images: torch.Tensor, method: str
) -> None:
    a = maps[method]
    assert a.shape == (6, 16, 16)
    assert a.dtype == torch.float32
    assert torch.isfinite(a).all()
    assert (a >= 0).all()
    assert (a.flatten(1).amax(1) > 0).all(), "an image got an all-zero map"


def test_methods_differ(maps: dict[str, torch.Tensor]) -> None:
    flat = {m: (a / a.flatten(1).amax(1)[:, None, None]).flatten() for m, a in maps.items()}
    for i, m1 in enumerate(METHODS):
        for m2 in METHODS[i + 1 :]:
            assert not torch.allclose(flat[m1], flat[m2], atol=1e-3), (m1, m2)


def test_saliency_is_the_input_gradient(model: nn.Sequential, images: torch.Tensor) -> None:
    """Cross-check Captum's saliency against autograd on the predicted class."""
    targets = torch.tensor([0, 1, 2, 3, 4, 0])
    got = attribute(model, images, targets, method="saliency")
    model.eval()
    x = images.clone().requires_grad_(True)
    model(x).gather(1, targets[:, None]).sum().backward()
    expected = x.grad.abs().sum(1)  # type: ignore[union-attr]
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("method", METHODS)
def test_batching_does_not_change_maps(
    model: nn.Sequential, images: torch.Tensor, maps: dict[str, torch.Tensor], method: str
) -> None:
    batched = attribute(model, images, method=method, batch_size=4, **FAST.get(method, {}))
    torch.testing.assert_close(batched, maps[method], rtol=1e-4, atol=1e-5)


def test_targets_and_baselines(model: nn.Sequential, images: torch.Tensor) -> None:
    a0 = attribute(model, images, 0, method="integrated_gradients", n_steps=8)
    a1 = attribute(model, images, [1] * 6, method="integrated_gradients", n_steps=8)
    assert not torch.allclose(a0, a1)
    mean = images.mean(0)
    ab = attribute(model, images, 0, method="integrated_gradients", n_steps=8, baselines=mean)
    assert not torch.allclose(a0, ab)
    occ = attribute(model, images[:2], 0, method="occlusion")  # default window: 2, stride 1
    assert occ.shape == (2, 16, 16) and torch.isfinite(occ).all()
    occ_b = attribute(model, images[:2], 0, method="occlusion", baselines=0.5, **FAST["occlusion"])
    assert not torch.allclose(
        occ_b, attribute(model, images[:2], 0, method="occlusion", **FAST["occlusion"])
    )


def test_model_state_is_restored(
    images: torch.Tensor, small_cnn: Callable[..., nn.Sequential]
) -> None:
    net = small_cnn(**CNN).train()
    net[9].eval()  # a mixed state must come back exactly
    before = [m.training for m in net.modules()]
    net[3].weight.requires_grad_(False)
    grads = [p.requires_grad for p in net.parameters()]
    running = net[3].running_mean.clone()
    for method in METHODS:
        attribute(net, images[:2], method=method, **FAST.get(method, {}))
    assert [m.training for m in net.modules()] == before
    assert [p.requires_grad for p in net.parameters()] == grads
    assert all(p.grad is None for p in net.parameters())
    assert all(m.inplace for m in net.modules() if isinstance(m, nn.ReLU))
    torch.testing.assert_close(net[3].running_mean, running)  # eval: BN statistics untouched


def test_gradcam_layer_choice(model: nn.Sequential, images: torch.Tensor) -> None:
    default = attribute(model, images, method="gradcam")
    last = attribute(model, images, method="gradcam", layer="6")
    torch.testing.assert_close(default, last)
    by_module = attribute(model, images, method="gradcam", layer=model[2])
    assert not torch.allclose(by_module, default)


def test_errors(model: nn.Sequential, images: torch.Tensor) -> None:
    with pytest.raises(XaiSparsityError, match=r"'salincy'.*'saliency'"):
        attribute(model, images, method="salincy")
    with pytest.raises(XaiSparsityError, match=r"'conv9'.*closest"):
        attribute(model, images, method="gradcam", layer="conv9")
    with pytest.raises(XaiSparsityError, match=r"\(B, C, H, W\).*\(3, 16, 16\)"):
        attribute(model, images[0])
    with pytest.raises(XaiSparsityError, match="targets"):
        attribute(model, images, [0, 1])
    with pytest.raises(XaiSparsityError, match="spatial"):
        attribute(model, images, method="gradcam", layer="10")
    with pytest.raises(XaiSparsityError, match=r"nn\.Conv2d"):
        attribute(nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 2)), images, method="gradcam")


@pytest.mark.parametrize("arch", ["resnet18", "vgg11"])
def test_torchvision_models(arch: str) -> None:
    """In-place ReLUs (and resnet's reused ReLU) must not break Captum's hooks."""
    import torchvision

    net = getattr(torchvision.models, arch)(weights=None, num_classes=4)
    x = torch.rand(2, 3, 32, 32)
    # Grad-CAM of an untrained resnet's last conv (before its BN and residual, 1x1 at 32 px) is
    # legitimately all zero after the ReLU; the block output is the usual choice
    layer = "layer4" if arch == "resnet18" else None
    for method in ("guided_backprop", "gradcam", "saliency"):
        a = attribute(net, x, method=method, layer=layer)
        assert a.shape == (2, 32, 32)
        assert torch.isfinite(a).all() and (a.flatten(1).amax(1) > 0).all(), method
    assert all(m.inplace for m in net.modules() if isinstance(m, nn.ReLU))
    assert net.training


def test_plot_attributions(maps: dict[str, torch.Tensor], images: torch.Tensor) -> None:
    fig = plot_attributions(images[:3], {m: a[:3] for m, a in maps.items()}, titles="abc")
    assert len(fig.axes) == 3 * (1 + len(METHODS))
    assert sum(len(ax.get_images()) for ax in fig.axes) == 3 * (1 + 2 * len(METHODS))
    data = fig.xai_data
    assert set(data) == {"images", *METHODS}
    torch.testing.assert_close(torch.as_tensor(data["saliency"]), maps["saliency"][:3])
    single = plot_attributions(images[:2], maps["gradcam"][:2], overlay=False)
    assert len(single.axes) == 4
    with pytest.raises(XaiSparsityError, match="shape"):
        plot_attributions(images[:2], maps["gradcam"][:3])
    # an all-zero map is drawn as zeros, never NaN
    zero = plot_attributions(images[:1], torch.zeros(1, 16, 16), overlay=False)
    assert torch.isfinite(torch.as_tensor(zero.axes[1].get_images()[0].get_array())).all()


def test_gradcam_matches_its_definition(model: nn.Sequential, images: torch.Tensor) -> None:
    """relu(sum_c mean_hw(dy/dA_c) A_c), bilinearly upsampled, on the last conv's output."""
    import torch.nn.functional as F

    targets = torch.tensor([4, 3, 2, 1, 0, 4])
    got = attribute(model, images, targets, method="gradcam")
    model.eval()
    model[7].inplace = False  # else the next ReLU overwrites the captured conv output
    acts: list[torch.Tensor] = []
    handle = model[6].register_forward_hook(lambda m, i, o: acts.append(o))
    try:
        y = model(images).gather(1, targets[:, None]).sum()
    finally:
        handle.remove()
        model[7].inplace = True
    (grad,) = torch.autograd.grad(y, acts[0])
    cam = F.relu((grad.mean((2, 3), keepdim=True) * acts[0]).sum(1, keepdim=True))
    expected = F.interpolate(cam, size=(16, 16), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(got, expected.detach())


def test_no_hooks_left_behind(
    images: torch.Tensor, small_cnn: Callable[..., nn.Sequential]
) -> None:
    net = small_cnn(**CNN)
    for method in METHODS:
        attribute(net, images[:2], method=method, **FAST.get(method, {}))
    with pytest.raises(XaiSparsityError):
        attribute(net, images[:2], method="gradcam", layer="10")  # fails after Captum ran
    for m in net.modules():
        assert not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks), m
        assert not getattr(m, "_backward_pre_hooks", None), m


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model_cpu_images(
    images: torch.Tensor, small_cnn: Callable[..., nn.Sequential]
) -> None:
    net = small_cnn(**CNN).cuda()
    for method in METHODS:
        a = attribute(net, images, method=method, **FAST.get(method, {}))
        assert a.device == images.device and a.shape == (6, 16, 16)
        assert torch.isfinite(a).all()
