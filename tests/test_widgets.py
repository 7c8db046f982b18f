"""Widget callbacks driven in the kernel over their value ranges.

Every change of a control must change what is rendered (the PNG bytes of the panels it affects);
callbacks must read their state from the widget, not from notebook variables.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("ipywidgets")
pytest.importorskip("captum")

from xai_sparsity import XaiSparsityError
from xai_sparsity.runs.rundir import RunDir
from xai_sparsity.views.attributions import METHODS, attribute
from xai_sparsity.views.widgets import (
    EpochScrubber,
    LayerExplorer,
    RunComparison,
    TrainingMonitor,
)


@pytest.fixture(scope="module")
def model(small_cnn: Callable[..., nn.Sequential]) -> nn.Module:
    # Conv(1, 6), BN, ReLU, MaxPool, Conv(6, 8), ReLU, Flatten, Linear for (B, 1, 12, 12) images
    return small_cnn()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(4, 1, 12, 12, generator=g)


@pytest.fixture(scope="module")
def explorer(model: nn.Module, images: torch.Tensor) -> LayerExplorer:
    return LayerExplorer(model, images, labels=torch.tensor([0, 1, 2, 0]), class_names="abc")


def _changed(before: dict[str, bytes], after: dict[str, bytes], panels: list[str]) -> None:
    for p in panels:
        assert after[p] != before[p], f"panel {p!r} did not change"


def _walk(node: Any) -> list[Any]:
    """Every widget in the tree below ``node`` (``node`` first)."""
    kids = getattr(node, "children", ())
    return [node, *(x for k in kids for x in _walk(k))]


def _images(obj: Any) -> dict[str, Any]:
    """Panel name -> the ``ipywidgets.Image`` of the widget tree that shows it (matched by bytes)."""
    import ipywidgets as w

    shown = [n for n in _walk(obj.widget) if isinstance(n, w.Image)]
    found = {
        name: [i for i in shown if bytes(i.value) == png] for name, png in obj.rendered.items()
    }
    assert all(len(v) == 1 for v in found.values()), "panels must show distinct images"
    return {name: v[0] for name, v in found.items()}


def _pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=float)


# ----------------------------------------------------------------------------- LayerExplorer


def test_explorer_layers_are_the_conv_like_layers(explorer: LayerExplorer) -> None:
    # default selection: conv and activation modules (not BatchNorm, pooling or linear layers)
    assert explorer.layers == ["0", "2", "4", "5"]
    assert set(explorer.rendered) == {
        "input",
        "feature_maps",
        "channel_sparsity",
        "spatial",
        "correlation",
        "attribution",
    }
    assert all(png.startswith(b"\x89PNG") for png in explorer.rendered.values())


def test_explorer_every_layer_changes_output(explorer: LayerExplorer) -> None:
    explorer.select(layer=explorer.layers[0], image=0, channel=0)
    for layer in explorer.layers[1:]:
        before = explorer.rendered
        explorer.controls["layer"].value = layer
        _changed(
            before,
            explorer.rendered,
            ["feature_maps", "channel_sparsity", "spatial", "correlation"],
        )
        channels = {i.name: i.output_shape[0] for i in explorer.layer_table}[layer]
        assert explorer.controls["channel"].max == channels - 1
        assert explorer.state["layer"] == layer


def test_explorer_several_images_change_output(explorer: LayerExplorer) -> None:
    explorer.select(layer="2", image=0)
    for image in range(1, explorer.inputs.shape[0]):
        before = explorer.rendered
        explorer.controls["image"].value = image
        _changed(
            before, explorer.rendered, ["input", "feature_maps", "channel_sparsity", "spatial"]
        )
        assert explorer.rendered["correlation"] == before["correlation"]  # a layer statistic


def test_explorer_every_attribution_method(explorer: LayerExplorer) -> None:
    explorer.select(layer="4", image=1)
    maps, shown = {}, {}
    for method in [m for m in METHODS if m != explorer.state["method"]] + [explorer.methods[0]]:
        before = explorer.rendered
        explorer.controls["method"].value = method
        _changed(before, explorer.rendered, ["attribution"])
        shown[method] = _pixels(explorer.rendered["attribution"])
        maps[method] = attribute(
            explorer.model, explorer.inputs[1:2], [1], method=method, layer="4"
        )[0].numpy()
        assert maps[method].shape == (12, 12)
        assert np.isfinite(maps[method]).all()
    assert set(maps) == set(METHODS)
    # the methods compute different maps (not only different titles): the panel below its
    # title row differs between methods, and so do the maps themselves
    body = {m: px[px.shape[0] // 8 :] for m, px in shown.items()}
    first = body[METHODS[0]]
    assert any(not np.array_equal(first, b) for b in list(body.values())[1:])
    flat = [np.abs(m).ravel() / max(np.abs(m).max(), 1e-12) for m in maps.values()]
    assert any(not np.allclose(flat[0], f) for f in flat[1:])


def test_explorer_every_channel_of_one_layer(explorer: LayerExplorer) -> None:
    explorer.select(layer="4", image=2, channel=0)
    for channel in range(1, explorer.controls["channel"].max + 1):
        before = explorer.rendered
        explorer.controls["channel"].value = channel
        _changed(before, explorer.rendered, ["feature_maps", "channel_sparsity"])
        assert explorer.rendered["attribution"] == before["attribution"]


def test_explorer_redraws_only_the_panels_a_change_affects(
    model: nn.Module, images: torch.Tensor
) -> None:
    ex = LayerExplorer(model, images, labels=[0, 1, 2, 0], methods=("saliency", "gradcam"))
    shown = _images(ex)
    swaps = dict.fromkeys(shown, 0)
    for name, image in shown.items():
        image.observe(lambda _, n=name: swaps.__setitem__(n, swaps[n] + 1), names="value")

    def step(panels: set[str], **change: Any) -> None:
        seen = dict(swaps)
        ex.select(**change)
        for name in shown:
            expected = seen[name] + (name in panels)  # one new image per affected panel
            assert swaps[name] == expected, f"{change}: panel {name!r} swapped {swaps[name]}"
            assert bytes(shown[name].value) == ex.rendered[name]

    per_image = {"input", "feature_maps", "channel_sparsity", "spatial", "attribution"}
    per_layer = {"feature_maps", "channel_sparsity", "spatial", "correlation"}
    step(per_image, image=1)  # the correlation depends on the layer only
    step(per_image, image=2)
    step(per_layer, layer=ex.layers[1])  # saliency does not depend on the layer
    step(per_layer, layer=ex.layers[3])  # a new channel count: a new layout
    step(per_layer, layer=ex.layers[0])  # back to a layout built before
    step({"feature_maps", "channel_sparsity"}, channel=2)
    step({"attribution"}, method="gradcam")
    step(per_layer | {"attribution"}, layer=ex.layers[2])  # Grad-CAM follows the layer
    step(per_image, image=0)


def test_explorer_blitted_panels_match_a_full_redraw() -> None:
    from PIL import Image

    # 17 conv layers of 17 channel counts: more layouts than a panel keeps, so layouts are
    # dropped and built again while the layers are visited
    widths = list(range(2, 19))
    torch.manual_seed(0)
    convs = [nn.Conv2d(a, b, 3, padding=1) for a, b in zip([1, *widths[:-1]], widths, strict=True)]
    net = nn.Sequential(*convs, nn.Flatten(), nn.Linear(widths[-1] * 8 * 8, 3))
    images = torch.rand(2, 1, 8, 8)
    ex = LayerExplorer(net, images, methods=("saliency",))
    assert len(ex.layers) == len(widths)
    for layer in [*ex.layers, ex.layers[0], ex.layers[-1]]:
        ex.select(layer=layer, image=(ex.state["image"] + 1) % images.shape[0], channel=1)
    correlation = ex.figures["correlation"]
    visible = [ax for ax in correlation.axes if ax.get_visible()]
    assert len(visible) == 2  # the matrix and its colorbar
    assert len(correlation.axes) < 2 * len(widths)  # older layouts were dropped
    ex.figures["spatial"].set_size_inches(4.0, 3.0)  # a resized figure: its bitmaps are stale
    ex.select(image=(ex.state["image"] + 1) % images.shape[0])
    assert Image.open(io.BytesIO(ex.rendered["spatial"])).size == (288, 216)
    for name, png in ex.rendered.items():
        buf = io.BytesIO()
        ex.figures[name].savefig(buf, format="png")
        shown = _pixels(png)
        full = _pixels(buf.getvalue())
        assert shown.shape == full.shape
        # texts are pasted at whole pixels: compare each pixel with its best match within one
        # pixel, so that only missing or misplaced content (not a sub-pixel shift) counts
        h, w = full.shape
        pad = np.pad(shown, 1, mode="edge")
        best = np.min(
            [
                np.abs(pad[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] - full)
                for dy in (-1, 0, 1)
                for dx in (-1, 0, 1)
            ],
            axis=0,
        )
        assert (best > 96).sum() <= 30, f"{name}: {(best > 96).sum()} pixels differ"


def test_explorer_caches_one_forward_per_image(model: nn.Module, images: torch.Tensor) -> None:
    no_grad_forwards = []
    handle = model.register_forward_hook(
        lambda *_: no_grad_forwards.append(1) if not torch.is_grad_enabled() else None
    )
    try:
        ex = LayerExplorer(model, images, methods=("saliency",))
        for rounds in range(2):  # visit every image twice, with a different layer each time
            for image in range(images.shape[0]):
                ex.select(layer=ex.layers[(image + rounds) % len(ex.layers)], image=image)
    finally:
        handle.remove()
    # one probe forward (list_layers), then one capture forward per image, never again
    assert len(no_grad_forwards) == 1 + images.shape[0]
    assert ex.cache_info()["images"] == images.shape[0]
    assert ex.cache_info()["bytes"] > 0


def test_explorer_restores_train_mode_and_batchnorm(
    images: torch.Tensor, small_cnn: Callable[..., nn.Sequential]
) -> None:
    net = small_cnn().train()
    bn = net[1]
    assert isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None
    mean = bn.running_mean.clone()
    ex = LayerExplorer(net, images, methods=("saliency", "gradcam"))
    ex.select(layer=ex.layers[-1], method="gradcam")
    ex.select(image=1)
    assert net.training and all(m.training for m in net.modules())
    assert bn.running_mean is not None and torch.equal(bn.running_mean, mean)


def test_callbacks_read_state_from_the_widget_only(
    images: torch.Tensor, small_cnn: Callable[..., nn.Sequential]
) -> None:
    import ipywidgets as w

    def build() -> Any:
        return LayerExplorer(small_cnn(), images, methods=("saliency",)).widget

    widget = build()  # nothing but the widget tree is kept
    nodes = _walk(widget)
    dropdown = next(n for n in nodes if isinstance(n, w.Dropdown) and n.description == "layer")
    pngs = [n for n in nodes if isinstance(n, w.Image)]
    before = [bytes(p.value) for p in pngs]
    dropdown.value = dropdown.options[-1]
    after = [bytes(p.value) for p in pngs]
    assert sum(a != b for a, b in zip(before, after, strict=True)) >= 4

    # two explorers do not share state
    other = LayerExplorer(small_cnn(), images, methods=("saliency",))
    kept = other.rendered
    dropdown.value = dropdown.options[1]
    assert other.rendered == kept


def test_explorer_errors_name_the_bad_value(model: nn.Module, images: torch.Tensor) -> None:
    with pytest.raises(XaiSparsityError, match=r"\(K, C, H, W\)"):
        LayerExplorer(model, images[0])
    with pytest.raises(XaiSparsityError, match="salency"):
        LayerExplorer(model, images, methods=("salency",))
    with pytest.raises(XaiSparsityError, match="labels"):
        LayerExplorer(model, images, labels=[0, 1])
    ex = LayerExplorer(model, images, methods=("saliency",))
    with pytest.raises(XaiSparsityError, match="'nope'"):
        ex.select(layer="nope")


def test_explorer_without_labels_uses_prediction(model: nn.Module, images: torch.Tensor) -> None:
    with torch.no_grad():
        pred = model.eval()(images).argmax(1)
    other = (pred + 1) % 3
    unlabelled = LayerExplorer(model, images, methods=("saliency",))
    predicted = LayerExplorer(model, images, labels=pred, methods=("saliency",))
    wrong = LayerExplorer(model, images, labels=other, methods=("saliency",))
    for i in range(images.shape[0]):
        for ex in (unlabelled, predicted, wrong):
            ex.select(image=i)
        # the same map and title ("saliency for class k") as with the predicted labels
        assert unlabelled.rendered["attribution"] == predicted.rendered["attribution"]
        assert unlabelled.rendered["attribution"] != wrong.rendered["attribution"]


# ----------------------------------------------------------------------------- TrainingMonitor


def _rows(n: int = 12) -> list[dict[str, float]]:
    rows = []
    for e in range(1, n + 1):
        rows.append(
            {
                "epoch": e,
                "train_loss": 2.0 / e,
                "test_loss": 1.0 + 0.02 * (e - 6) ** 2,
                "train_acc": min(1.0, 0.5 + 0.05 * e),
                "test_acc": 0.7,
                "sparsity:conv1": 0.5,
                "sparsity:conv2": 0.5 + (0.04 * (e - 3) if e > 3 else 0.0),
            }
        )
    return rows


def test_monitor_updates_in_place_and_shows_the_warning() -> None:
    monitor = TrainingMonitor(rule={"min_layers": 1})
    image = _images(monitor)["curves"]
    seen = [monitor.rendered["curves"]]
    for row in _rows(20):
        monitor(row)
        assert image in _walk(monitor.widget)  # same widget, new bytes
        assert bytes(image.value) == monitor.rendered["curves"]
        assert monitor.rendered["curves"] != seen[-1]
        seen.append(monitor.rendered["curves"])
        fired = monitor.warning_epoch is not None
        status = monitor.controls["status"].value
        assert ("Early warning" in status) == fired
        if row["epoch"] == 5:  # the training loss 2/e is still falling: the rule waits
            assert "waiting for the training loss to level off" in status
    # the training loss levels off at epoch 15 (gate); conv2 stays 0.02 above its value there for
    # 3 epochs at 18; the v1 rule fired at epoch 6, while the network was still learning
    assert monitor.warning_epoch == 18 and monitor.early_warning is not None
    assert monitor.early_warning.gate_epoch == 15
    status = monitor.controls["status"].value
    assert "Early warning at epoch 18" in status and "levelled off at epoch 15" in status
    assert "1 of 2 watched layers (conv2)" in status and "likely" not in status
    assert len(monitor.history()) == 20
    old = TrainingMonitor(rule={"rule": "ema_rise", "min_layers": 1})
    for row in _rows(20):
        old(row)
    assert old.warning_epoch == 6 and "rose for 3 epochs" in old.controls["status"].value


def test_monitor_stays_silent_on_flat_sparsity_and_replays_runs(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "flat", create=True)
    for row in _rows(10):
        row["sparsity:conv2"] = 0.5
        run.append_history(row)
    monitor = TrainingMonitor().replay(run.path)
    assert monitor.warning_epoch is None
    assert "Early warning" not in monitor.controls["status"].value
    assert "epoch 10" in monitor.controls["status"].value
    with pytest.raises(XaiSparsityError, match="epoch"):
        monitor({"train_loss": 1.0})


# ----------------------------------------------------------------------------- run directories


def make_run(
    path: Path, *, epochs: int = 6, every: int = 2, seed: int = 0, penalty: float = 0.0
) -> RunDir:
    """A synthetic run directory in the project's format (history, arrays, probe)."""
    rng = np.random.default_rng(seed)
    run = RunDir(path, create=True)
    run.write_config({"epochs": epochs, "seed": seed, "penalty": penalty})
    layers = {"conv1": 4, "conv2": 6}
    run.save_probe(rng.random((3, 1, 12, 12)).astype(np.float32), np.array([0, 1, 2]))
    for e in range(1, epochs + 1):
        row: dict[str, float] = {
            "epoch": e,
            "train_loss": 2.0 / e,
            "train_acc": 0.5 + 0.05 * e,
            "test_loss": 1.0 + 0.03 * (e - 3) ** 2 - penalty * e * 0.01,
            "test_acc": 0.6 + 0.01 * e + penalty * 0.05,
        }
        for i, name in enumerate(layers):
            row[f"sparsity:{name}"] = 0.4 + 0.05 * e * (i + 1) - penalty * 0.1
        run.append_history(row)
        if e % every == 0 or e == epochs:
            arrays = {}
            for name, c in layers.items():
                r = rng.uniform(-1, 1, (c, c))
                r = (r + r.T) / 2
                np.fill_diagonal(r, 1.0)
                arrays[f"channel:{name}"] = rng.random(c)
                arrays[f"spatial:{name}"] = rng.random((3, 6, 6))
                arrays[f"correlation:{name}"] = r
                arrays[f"layer:{name}"] = rng.random(10)
            run.save_arrays(e, arrays)
    run.mark_complete({"epochs": epochs})
    return run


def test_scrubber_every_epoch_and_layer(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", epochs=7, every=2)
    scrub = EpochScrubber(run.path)
    assert scrub.epochs == [2, 4, 6, 7]
    assert scrub.layers == ["conv1", "conv2"]
    assert scrub.state["epoch"] == 7
    for epoch in [2, 4, 6, 7]:
        if epoch == scrub.state["epoch"]:
            continue
        before = scrub.rendered
        scrub.controls["epoch"].value = epoch
        _changed(before, scrub.rendered, ["heatmap", "channel_sparsity", "spatial", "correlation"])
        assert f"epoch <b>{epoch}</b>" in scrub.controls["status"].value
    for layer in ["conv2", "conv1"]:
        before = scrub.rendered
        scrub.controls["layer"].value = layer
        _changed(before, scrub.rendered, ["heatmap", "channel_sparsity", "spatial", "correlation"])


def test_scrubber_errors(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "noarrays", create=True)
    run.append_history({"epoch": 1, "test_loss": 1.0, "sparsity:conv1": 0.5})
    with pytest.raises(XaiSparsityError, match="no per-epoch arrays"):
        EpochScrubber(run.path)
    made = make_run(tmp_path / "ok")
    with pytest.raises(XaiSparsityError, match="'conv9'"):
        EpochScrubber(made, layer="conv9")


def test_comparison_of_arms(tmp_path: Path) -> None:
    exp = tmp_path / "experiment"
    for k, (arm, pen) in enumerate({"baseline": 0.0, "dropout": 0.5, "sparsity": 1.0}.items()):
        make_run(exp / arm, seed=k, penalty=pen)
    comp = RunComparison(exp)
    assert list(comp.runs) == ["baseline", "dropout", "sparsity"]
    assert comp.layers == ["conv1", "conv2"]
    table = comp.summary()
    assert list(table["arm"]) == ["baseline", "dropout", "sparsity"]
    assert table["best_test_acc"].is_monotonic_increasing
    for layer in ["conv1", "conv2"]:
        if layer == comp.state["layer"]:
            continue
        before = comp.rendered
        comp.controls["layer"].value = layer
        _changed(before, comp.rendered, ["curves", "layers"])
    same = RunComparison({"a": exp / "baseline", "b": exp / "sparsity"}, layer="conv1")
    assert same.state["layer"] == "conv1"
    with pytest.raises(XaiSparsityError, match="no run directories"):
        RunComparison(tmp_path / "experiment" / "baseline" / "arrays")


def test_widgets_on_a_trained_run(tmp_path: Path) -> None:
    """The trainer's callback, run directory and model work with every widget."""
    from xai_sparsity.training.data import load_data
    from xai_sparsity.training.models import make_model
    from xai_sparsity.training.trainer import TrainConfig, train

    cfg = TrainConfig(
        epochs=3,
        train_size=60,
        test_size=60,
        probe_size=30,
        widths=[4, 4],
        hidden=8,
        array_every=1,
        spatial_images=2,
        device="cpu",
    )
    monitor = TrainingMonitor()
    run = train(cfg, tmp_path / "run", progress=False, callbacks=[monitor])
    assert [int(r["epoch"]) for r in monitor.rows] == [1, 2, 3]
    assert set(run.layers) <= {k.split(":", 1)[1] for k in monitor.rows[-1] if ":" in k}

    scrub = EpochScrubber(run)
    assert scrub.epochs == [1, 2, 3]
    for epoch in (1, 2):
        before = scrub.rendered
        scrub.controls["epoch"].value = epoch
        _changed(before, scrub.rendered, ["heatmap", "channel_sparsity", "spatial"])

    data = load_data("mnist5k", train_size=60, test_size=60, probe_size=30)
    model = make_model("cnn", num_classes=10, in_channels=1, image_size=28, widths=[4, 4], hidden=8)
    model.load_state_dict(run.load_checkpoint("last")["model"])
    images = torch.stack([data.probe[i][0] for i in range(2)])
    ex = LayerExplorer(model, images, methods=("gradcam",))
    assert ex.layers == [n for n in ex.layer_table.names if n in ex.layers]
    assert ex.state["layer"] == ex.layers[0] and len(ex.layers) >= 2
    before = ex.rendered
    ex.select(layer=ex.layers[-1])  # Grad-CAM follows the layer
    _changed(before, ex.rendered, ["feature_maps", "correlation", "attribution"])
