"""Layer discovery, layer selection and hook-based capture (keep and reduce modes)."""

from __future__ import annotations

import gc
import os
import warnings
import weakref
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from xai_sparsity import XaiSparsityError
from xai_sparsity.capturing.hooks import (
    Capture,
    LayerTable,
    capture,
    layer_kind,
    list_layers,
    resolve_layers,
)
from xai_sparsity.measuring.measures import compute_measure, perplexity_sparsity

# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # small tensors: one thread is faster than two on a shared machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    )


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


@pytest.fixture(scope="module")
def vgg() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.vgg11(weights=None).eval()


def x32(b: int = 2) -> torch.Tensor:
    return torch.randn(b, 3, 32, 32)


def all_hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


def mixed_flags(model: nn.Module) -> dict[str, bool]:
    """Put the model in train mode with every other submodule in eval mode; return the flags."""
    model.train()
    for i, m in enumerate(model.modules()):
        if i % 2:
            m.eval()
    return {n: m.training for n, m in model.named_modules()}


def bn_state(model: nn.Module) -> list[torch.Tensor]:
    return [
        t.clone()
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for t in (m.running_mean, m.running_var, m.num_batches_tracked)
        if t is not None
    ]


# ----------------------------------------------------------------------------- list_layers


def test_list_layers_sequential() -> None:
    net = small_cnn()
    table = list_layers(net, torch.randn(4, 3, 8, 8))
    assert isinstance(table, LayerTable)
    assert table.names == [str(i) for i in range(9)]
    assert table[0].output_shape == (8, 8, 8)
    assert table[0].bytes_per_sample == 8 * 8 * 8 * 4
    assert table["4"].kind == "conv"
    assert [r.kind for r in table] == [
        "conv",
        "norm",
        "activation",
        "pool",
        "conv",
        "activation",
        "pool",
        "other",
        "linear",
    ]
    assert table[-1].output_shape == (5,)
    assert all(r.calls == 1 and not r.inplace_after for r in table)
    text = str(table)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["name", "type", "output_shape"]
    assert "8x8x8" in text and "BatchNorm2d" in text
    assert lines[1].startswith("----")
    assert "<table>" in table._repr_html_()
    df = table.to_dataframe()
    assert list(df.columns) == [
        "name",
        "type",
        "output_shape",
        "bytes_per_sample",
        "calls",
        "inplace_after",
        "kind",
    ]
    assert len(df) == 9
    assert isinstance(table[1:3], LayerTable) and len(table[1:3]) == 2
    with pytest.raises(XaiSparsityError, match="closest"):
        table["40"]


def test_list_layers_resnet_reuse_and_inplace(resnet: nn.Module) -> None:
    table = list_layers(resnet, x32())
    assert table["layer1.0.relu"].calls == 2
    assert table["relu"].calls == 1
    # bn1 is overwritten by the in-place ReLU, bn2 by `out += identity`
    assert table["layer1.0.bn1"].inplace_after
    assert table["layer1.0.bn2"].inplace_after
    assert not table["layer1.0.conv1"].inplace_after
    # call order: a container starts before its children
    names = table.names
    assert names.index("layer1") < names.index("layer1.0") < names.index("layer1.0.conv1")
    assert names.index("avgpool") < names.index("fc")
    assert table["fc"].output_shape == (1000,)


def test_list_layers_vgg_inplace(vgg: nn.Module) -> None:
    table = list_layers(vgg, x32())
    assert table["features.0"].inplace_after  # overwritten by ReLU(inplace=True)
    assert not table["features.1"].inplace_after
    assert table["features.0"].kind == "conv"
    assert table["avgpool"].output_shape == (512, 7, 7)


def test_list_layers_restores_state_also_on_error() -> None:
    net = small_cnn()
    flags = mixed_flags(net)
    before = bn_state(net)
    list_layers(net, torch.randn(4, 3, 8, 8))
    assert {n: m.training for n, m in net.named_modules()} == flags
    for a, b in zip(before, bn_state(net), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError):
        list_layers(net, torch.randn(4, 5, 8, 8))  # wrong channel count
    assert {n: m.training for n, m in net.named_modules()} == flags
    assert all_hooks(net) == 0
    with pytest.raises(XaiSparsityError, match="example_input"):
        list_layers(net, "an image")


def test_list_layers_tuple_and_dict_inputs() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 3)
            self.b = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.a(x) + self.b(y)

    net = Two()
    x = torch.randn(2, 4)
    assert list_layers(net, (x, x)).names == ["a", "b"]
    assert list_layers(net, {"x": x, "y": x}).names == ["a", "b"]


def test_layer_kind() -> None:
    assert layer_kind(nn.Conv1d(1, 1, 1)) == "conv"
    assert layer_kind(nn.ConvTranspose2d(1, 1, 1)) == "conv"
    assert layer_kind(nn.GELU()) == "activation"
    assert layer_kind(nn.GroupNorm(1, 2)) == "norm"
    assert layer_kind(nn.AdaptiveMaxPool2d(1)) == "pool"
    assert layer_kind(nn.Dropout()) == "other"


# ----------------------------------------------------------------------------- resolve_layers


def test_resolve_layers_specs(resnet: nn.Module) -> None:
    default = resolve_layers(resnet)
    assert "conv1" in default and "layer1.0.relu" in default and "fc" not in default
    assert "layer1.0.bn1" not in default
    assert resolve_layers(resnet, "layer1.0.conv1") == ["layer1.0.conv1"]
    assert resolve_layers(resnet, "layer1.*.relu") == ["layer1.0.relu", "layer1.1.relu"]
    assert resolve_layers(resnet, nn.Linear) == ["fc"]
    assert resolve_layers(resnet, resnet.layer4[1].conv2) == ["layer4.1.conv2"]
    assert resolve_layers(resnet, lambda n, m: n.endswith("downsample.0")) == [
        "layer2.0.downsample.0",
        "layer3.0.downsample.0",
        "layer4.0.downsample.0",
    ]
    # a list: union, in registration order, without duplicates
    assert resolve_layers(resnet, ["fc", "conv1", nn.Linear]) == ["conv1", "fc"]
    assert resolve_layers(resnet, ("layer1.0.conv?",)) == ["layer1.0.conv1", "layer1.0.conv2"]


def test_resolve_layers_errors(resnet: nn.Module) -> None:
    with pytest.raises(XaiSparsityError, match=r"'layer1\.0\.reul'.*'layer1\.0\.relu'"):
        resolve_layers(resnet, "layer1.0.reul")
    with pytest.raises(XaiSparsityError, match="features"):
        resolve_layers(resnet, "features.*")
    with pytest.raises(XaiSparsityError, match=r"LSTM.*Conv2d"):
        resolve_layers(resnet, nn.LSTM)
    with pytest.raises(XaiSparsityError, match="predicate"):
        resolve_layers(resnet, lambda n, m: False)
    with pytest.raises(XaiSparsityError, match="cannot select layers with 3"):
        resolve_layers(resnet, 3)  # type: ignore[arg-type]
    with pytest.raises(XaiSparsityError, match="selects nothing"):
        resolve_layers(resnet, [])
    # one bad item in a list is named
    with pytest.raises(XaiSparsityError, match="'fcc'"):
        resolve_layers(resnet, ["fc", "fcc"])
    with pytest.raises(XaiSparsityError, match="no convolution or activation"):
        resolve_layers(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(XaiSparsityError, match=r"nn\.Module"):
        resolve_layers("resnet", None)  # type: ignore[arg-type]


def test_resolve_layers_data_parallel() -> None:
    net = small_cnn().eval()
    wrapped = nn.DataParallel(net)
    assert resolve_layers(wrapped, nn.Conv2d) == ["0", "4"]
    x = torch.randn(2, 3, 8, 8)
    with capture(wrapped, "2") as cap:
        wrapped(x)
    assert list(cap.activations) == ["2"]
    assert torch.allclose(cap.activations["2"], net[:3](x), atol=1e-6)
    assert all_hooks(net) == 0


# ----------------------------------------------------------------------------- keep mode


def test_keep_sequential_values_and_concat() -> None:
    net = small_cnn().eval()
    x1, x2 = torch.randn(3, 3, 8, 8), torch.randn(2, 3, 8, 8)
    with capture(net, ["0", "5", "8"]) as cap:
        net(x1)
        net(x2)
    acts = cap.activations
    assert list(acts) == ["0", "5", "8"]
    x = torch.cat([x1, x2])
    assert torch.allclose(acts["0"], net[0](x), atol=1e-6)
    assert torch.allclose(acts["5"], net[:6](x), atol=1e-6)
    assert torch.allclose(acts["8"], net(x), atol=1e-6)
    assert not acts["8"].requires_grad
    assert all_hooks(net) == 0
    cap.clear()
    assert len(cap.activations) == 0
    with pytest.raises(XaiSparsityError, match="stats"):
        cap.stats["0"]


def test_keep_resnet_equals_feature_extractor(resnet: nn.Module) -> None:
    x = x32()
    nodes = {
        "layer1.0.conv1": "layer1.0.conv1",
        "layer1.0.relu#0": "layer1.0.relu",
        "layer1.0.relu#1": "layer1.0.relu_1",
        "layer3.1.conv2": "layer3.1.conv2",
        "layer4.0.downsample.0": "layer4.0.downsample.0",
        "fc": "fc",
    }
    ref = create_feature_extractor(resnet, list(nodes.values()))(x)
    with capture(
        resnet, ["layer1.0.conv1", "layer1.0.relu", "layer3.1.conv2", "layer4.*.0", "fc"]
    ) as cap:
        resnet(x)
    assert set(nodes) <= set(cap.activations)
    for ours, theirs in nodes.items():
        assert torch.equal(cap.activations[ours], ref[theirs]), ours


def test_keep_vgg_equals_feature_extractor_and_inplace(vgg: nn.Module) -> None:
    x = x32()
    relus = ["features.1", "features.9", "features.19", "classifier.1"]
    ref = create_feature_extractor(vgg, relus)(x)
    with capture(vgg, ["features.0", *relus]) as cap:
        vgg(x)
    for name in relus:
        assert torch.equal(cap.activations[name], ref[name]), name
    # features.0 (a conv) was overwritten by ReLU(inplace=True): reading it must fail loudly
    with pytest.raises(XaiSparsityError, match=r"'features\.0'.*in place.*clone=True"):
        cap.activations["features.0"]
    with capture(vgg, "features.0", clone=True) as cap2:
        vgg(x)
    conv = vgg.features[0]
    assert torch.allclose(cap2.activations["features.0"], conv(x), atol=1e-5)
    assert (cap2.activations["features.0"] < 0).any()  # the pre-ReLU values survived
    # reduce mode sees the conv output before the in-place ReLU
    with capture(vgg, "features.0", mode="reduce", scopes=("layer", "channel")) as cap3:
        vgg(x)
    expected = perplexity_sparsity(conv(x), "channel")
    assert torch.allclose(cap3.stats["features.0"]["perplexity:channel"], expected, atol=1e-6)


def test_resnet_relu_reuse_per_call_values(resnet: nn.Module) -> None:
    x = x32()
    with capture(
        resnet, ["maxpool", "layer1.0.bn1", "layer1.0.bn2", "layer1.0.relu"], clone=True
    ) as cap:
        resnet(x)
    acts = cap.activations
    assert "layer1.0.relu" not in acts
    assert cap.reused == {"layer1.0.relu"}
    assert torch.equal(acts["layer1.0.relu#0"], torch.relu(acts["layer1.0.bn1"]))
    manual = torch.relu(acts["layer1.0.bn2"] + acts["maxpool"])
    assert torch.allclose(acts["layer1.0.relu#1"], manual, atol=1e-6)
    # single-call modules keep their plain name
    assert "maxpool" in acts and "maxpool#0" not in acts

    with capture(resnet, "layer1.0.relu", mode="reduce") as cap2:
        resnet(x)
        resnet(x)
    s = cap2.stats
    assert list(s) == ["layer1.0.relu#0", "layer1.0.relu#1"]
    assert s["layer1.0.relu#1"]["perplexity:layer"].shape == (4,)
    assert torch.allclose(
        s["layer1.0.relu#1"]["perplexity:layer"][:2], perplexity_sparsity(manual), atol=1e-6
    )


def test_on_reuse_warn_and_error(resnet: nn.Module) -> None:
    x = x32()
    with (
        pytest.warns(UserWarning, match=r"layer1\.0\.relu.*on_reuse='per_call'"),
        capture(
            resnet, ["layer1.0.relu", "layer1.0.bn2", "maxpool"], on_reuse="warn", clone=True
        ) as cap,
    ):
        resnet(x)
        resnet(x)
    acts = cap.activations
    assert "layer1.0.relu" in acts and "layer1.0.relu#1" not in acts
    manual = torch.relu(acts["layer1.0.bn2"] + acts["maxpool"])
    assert acts["layer1.0.relu"].shape[0] == 4
    assert torch.allclose(acts["layer1.0.relu"], manual, atol=1e-6)

    with (
        pytest.raises(XaiSparsityError, match=r"layer1\.0\.relu.*2 times"),
        capture(resnet, "layer1.0.relu", on_reuse="error"),
    ):
        resnet(x)
    assert all_hooks(resnet) == 0


# ----------------------------------------------------------------------------- reduce mode


@pytest.mark.parametrize("arch", ["sequential", "resnet", "vgg"])
def test_reduce_equals_measures_on_kept_tensors(
    arch: str, resnet: nn.Module, vgg: nn.Module
) -> None:
    if arch == "sequential":
        model: nn.Module = small_cnn().eval()
        x = torch.randn(3, 3, 8, 8)
    else:
        model = resnet if arch == "resnet" else vgg
        x = x32()
    measures = ("perplexity", "zero_fraction", "hoyer", "entropy")
    scopes = ("layer", "channel", "spatial")
    opts = {"perplexity": {"variant": "relative"}}
    with capture(model, clone=True) as keep:
        model(x)
    with capture(
        model, mode="reduce", measures=measures, scopes=scopes, measure_options=opts
    ) as red:
        model(x)
    assert list(red.stats) == list(keep.activations)
    for name, act in keep.activations.items():
        stats = red.stats[name]
        for m in measures:
            for s in scopes:
                key = f"{m}:{s}"
                n_units = (
                    act[0].numel()
                    if s == "layer"
                    else (
                        act[0, 0].numel()
                        if act.dim() > 2 and s == "channel"
                        else (act.shape[1] if act.dim() > 2 else 1)
                    )
                )
                if (act.dim() < 3 and s != "layer") or n_units < 2:
                    assert key not in stats, (name, key)
                    continue
                expected = compute_measure(m, act, s, **opts.get(m, {}))
                assert torch.allclose(stats[key], expected, atol=1e-5), (name, key)
                assert not stats[key].requires_grad


def test_reduce_differentiable_gives_gradients() -> None:
    torch.manual_seed(1)
    net = small_cnn()
    x = torch.randn(4, 3, 8, 8)
    with capture(net, ["2", "5"], mode="reduce", differentiable=True) as cap:
        out = net(x)
    penalty = sum(v["perplexity:layer"].mean() for v in cap.stats.values())
    assert isinstance(penalty, torch.Tensor) and penalty.requires_grad
    (out.sum() * 0 + penalty).backward()
    ours = net[0].weight.grad.clone()
    assert torch.isfinite(ours).all() and ours.abs().sum() > 0
    # the same penalty computed by hand from a second forward gives the same gradient
    net.zero_grad()
    h2 = net[:3](x)
    h5 = net[3:6](h2)
    manual = perplexity_sparsity(h2).mean() + perplexity_sparsity(h5).mean()
    manual.backward()
    assert torch.allclose(ours, net[0].weight.grad, atol=1e-6)
    # without differentiable=True nothing keeps the graph
    with capture(net, ["2"], mode="reduce") as cap2:
        net(x)
    assert not cap2.stats["2"]["perplexity:layer"].requires_grad


def test_reduce_check_finite() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU())
    x = torch.ones(2, 1, 4, 4)
    x[0, 0, 0, 0] = float("nan")
    with capture(net, "1", mode="reduce") as cap:
        net(x)  # no error in the hook: checked on access
    with pytest.raises(XaiSparsityError, match=r"'1'.*not finite"):
        cap.stats["1"]
    with capture(net, "1", mode="reduce", check_finite=False) as cap2:
        net(x)
    v = cap2.stats["1"]["perplexity:layer"]
    assert torch.isnan(v[0]) and torch.isfinite(v[1])


# ----------------------------------------------------------------------------- lifecycle


def test_hook_hygiene_1000_cycles_and_rss() -> None:
    psutil = pytest.importorskip("psutil")
    net = small_cnn().eval()
    x = torch.randn(2, 3, 8, 8)
    proc = psutil.Process(os.getpid())

    def cycle(i: int) -> None:
        mode = "keep" if i % 2 else "reduce"
        try:
            with capture(net, mode=mode) as cap:
                net(x)
                if i % 3 == 0:
                    raise KeyError("inside the block")
            if mode == "keep":
                assert cap.activations["5"].shape == (2, 16, 4, 4)
        except KeyError:
            pass

    for i in range(100):  # warm up allocator and caches
        cycle(i)
    gc.collect()
    rss0 = proc.memory_info().rss
    for i in range(1000):
        cycle(i)
    gc.collect()
    rss1 = proc.memory_info().rss
    assert all(len(m._forward_hooks) == 0 and len(m._forward_pre_hooks) == 0 for m in net.modules())
    assert rss1 < rss0 * 1.05, (rss0, rss1)


def test_no_reference_keeps_tensors_alive() -> None:
    net = small_cnn().eval()
    with capture(net, "5") as cap:
        net(torch.randn(2, 3, 8, 8))
    ref = weakref.ref(cap.activations["5"])
    cap_ref = weakref.ref(cap)
    del cap
    gc.collect()
    assert ref() is None and cap_ref() is None
    # a Capture abandoned while active: its hooks hold it only weakly
    c = Capture(net, "5")
    c.__enter__()
    net(torch.randn(2, 3, 8, 8))
    t_ref = weakref.ref(c.activations["5"])
    handles = list(c._handles)
    del c
    gc.collect()
    assert t_ref() is None
    net(torch.randn(2, 3, 8, 8))  # dangling hooks are harmless no-ops
    for h in handles:
        h.remove()
    assert all_hooks(net) == 0


def test_hooks_removed_on_exception_and_idempotent() -> None:
    net = small_cnn()
    cap = capture(net)
    with pytest.raises(ZeroDivisionError), cap:
        net(torch.randn(2, 3, 8, 8))
        1 / 0  # noqa: B018
    assert all_hooks(net) == 0 and not cap.active
    cap.remove_hooks()
    cap.remove_hooks()
    assert all_hooks(net) == 0
    # an error raised inside a hook (bad forward) also leaves no hooks
    with pytest.raises(RuntimeError), capture(net):
        net(torch.randn(2, 4, 8, 8))
    assert all_hooks(net) == 0


def test_nested_captures() -> None:
    net = small_cnn().eval()
    x = torch.randn(2, 3, 8, 8)
    with capture(net, ["0", "2"]) as outer:
        net(x)
        with capture(net, "2", mode="reduce") as inner:
            net(x)
        assert all_hooks(net) == len(outer._handles)
        net(x)
        with pytest.raises(XaiSparsityError, match="already active"):
            outer.__enter__()
    assert all_hooks(net) == 0
    assert outer.activations["2"].shape[0] == 6
    assert inner.stats["2"]["perplexity:layer"].shape == (2,)
    assert torch.allclose(
        inner.stats["2"]["perplexity:layer"], perplexity_sparsity(outer.activations["2"][2:4])
    )


def test_capture_keeps_flags_and_bn_stats() -> None:
    net = small_cnn()
    flags = mixed_flags(net)
    net[1].train()  # BatchNorm in train mode updates its statistics in every forward
    flags["1"] = True
    x = torch.randn(4, 3, 8, 8)
    twin = small_cnn()
    twin.load_state_dict(net.state_dict())
    for (_, a), (_, b) in zip(twin.named_modules(), net.named_modules(), strict=True):
        a.training = b.training
    with capture(net, mode="reduce", differentiable=True):
        net(x)
    twin(x)
    assert {n: m.training for n, m in net.named_modules()} == flags
    for a, b in zip(bn_state(twin), bn_state(net), strict=True):
        assert torch.equal(a, b)
    net.eval()
    before = bn_state(net)
    with capture(net):
        net(x)
    for a, b in zip(before, bn_state(net), strict=True):
        assert torch.equal(a, b)


def test_missing_layers_reported() -> None:
    class Skips(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.unused = nn.ReLU()
            self.act = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(self.conv(x))

    net = Skips()
    with pytest.warns(UserWarning, match=r"never ran.*'unused'"), capture(net) as cap:
        net(torch.randn(1, 1, 5, 5))
    assert cap.missing == ["unused"]
    with pytest.warns(UserWarning, match="no forward pass"), capture(net) as cap2:
        pass
    assert cap2.missing == ["conv", "unused", "act"]
    with pytest.raises(XaiSparsityError, match="no activations yet"):
        cap2.activations["conv"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with capture(net, ["conv", "act"]) as cap3:
            net(torch.randn(1, 1, 5, 5))
    assert cap3.missing == []


def test_bad_arguments() -> None:
    net = small_cnn()
    with pytest.raises(XaiSparsityError, match=r"mode='kep'.*'keep'"):
        capture(net, mode="kep")
    with pytest.raises(XaiSparsityError, match=r"measure='perplexty'.*'perplexity'"):
        capture(net, mode="reduce", measures=("perplexty",))
    with pytest.raises(XaiSparsityError, match=r"scope='chanel'"):
        capture(net, mode="reduce", scopes=("chanel",))
    with pytest.raises(XaiSparsityError, match="on_reuse"):
        capture(net, on_reuse="ignore")
    with pytest.raises(XaiSparsityError, match=r"'hoyer'.*not among"):
        capture(net, mode="reduce", measure_options={"hoyer": {}})
    with pytest.raises(XaiSparsityError, match=r"'varaint'.*variant"):
        capture(net, mode="reduce", measure_options={"perplexity": {"varaint": "relative"}})
    with pytest.raises(XaiSparsityError, match="reduce_fn"):
        capture(net, reduce_fn=3)  # type: ignore[arg-type]
    with capture(net, "0") as cap:
        net(torch.randn(1, 3, 8, 8))
    with pytest.raises(XaiSparsityError, match="not a captured layer"):
        cap.activations["7"]
    with pytest.raises(XaiSparsityError, match="reduce"):
        _ = cap.stats["0"]


def test_non_tensor_output_is_a_clear_error() -> None:
    class Pair(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x, x

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pair = Pair()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.pair(x)[0]

    net = Net()
    assert list_layers(net, torch.randn(1, 2)).names == []
    with pytest.raises(XaiSparsityError, match=r"'pair' returned tuple"), capture(net, "pair"):
        net(torch.randn(1, 2))
    assert all_hooks(net) == 0


def test_reduce_fn_and_offload() -> None:
    net = small_cnn().eval()
    seen: list[tuple[str, tuple[int, ...]]] = []
    with capture(
        net, ["2", "5"], offload=True, reduce_fn=lambda n, t: seen.append((n, tuple(t.shape)))
    ) as cap:
        net(torch.randn(2, 3, 8, 8))
    assert seen == [("2", (2, 8, 8, 8)), ("5", (2, 16, 4, 4))]
    assert cap.activations["5"].device.type == "cpu"
    assert "Capture(mode='keep', 2 layers" in repr(cap)


def test_functional_conv_values_match_manual() -> None:
    conv = nn.Conv2d(3, 4, 3)
    net = nn.Sequential(conv, nn.ReLU())
    x = torch.randn(2, 3, 6, 6)
    with capture(net, nn.Conv2d, mode="reduce", scopes=("spatial",)) as cap:
        net(x)
    expected = perplexity_sparsity(F.conv2d(x, conv.weight, conv.bias), "spatial")
    assert torch.allclose(cap.stats["0"]["perplexity:spatial"], expected, atol=1e-6)


def test_stats_fn_gets_the_values_and_the_engine_sums() -> None:
    """stats_fn(name, output, values, sums) per call: the values stored in cap.stats, and the
    engine's per-channel sums of the output (raw S = S * scale), also for a ReLU measured from
    the pass of its input (its sums are those of relu(input))."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten()).eval()
    x = torch.randn(4, 2, 6, 6)
    seen: dict[str, list[tuple[torch.Tensor, dict[str, torch.Tensor], object]]] = {}

    def stats_fn(
        name: str, out: torch.Tensor, values: dict[str, torch.Tensor], sums: object
    ) -> None:
        seen.setdefault(name, []).append((out.detach().clone(), dict(values), sums))

    with (
        torch.no_grad(),
        capture(net, ["0", "1"], mode="reduce", measures=("hoyer",), stats_fn=stats_fn) as cap,
    ):
        net(x)
        net(x)  # the second forward measures the ReLU from the conv's pass
    assert set(seen) == {"0", "1"} and all(len(v) == 2 for v in seen.values())
    for name, calls in seen.items():
        for k, (out, values, sums) in enumerate(calls):
            stored = cap.stats[name]["hoyer:layer"][4 * k : 4 * k + 4]
            torch.testing.assert_close(values["hoyer:layer"], stored)
            part = sums.part("abs")  # type: ignore[attr-defined]
            raw = part.c("s") * part.scale.view(-1, 1)
            torch.testing.assert_close(raw, out.abs().flatten(2).sum(2), rtol=1e-5, atol=1e-5)
    with pytest.raises(XaiSparsityError, match="stats_fn"):
        capture(net, mode="keep", stats_fn=stats_fn)
    only = capture(net, mode="reduce", measures=(), stats_fn=stats_fn)  # no measures: allowed
    assert only.layers == ["0", "1"]
