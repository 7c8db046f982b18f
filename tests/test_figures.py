"""Figures from synthetic run directories: non-empty figures, the data behind them, errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from xai_sparsity import XaiSparsityError
from xai_sparsity.runs.rundir import RunDir

LAYERS = ["features.1", "features.3", "features.6", "classifier.1"]
CHANNELS = {"features.1": 4, "features.3": 6, "features.6": 8, "classifier.1": 5}
ARRAY_EPOCHS = (2, 4, 6, 8, 10)
N_EPOCHS = 10


def make_run(path: Path, *, overfit: bool = True, seed: int = 0, probe: int = 3) -> RunDir:
    """A synthetic run: the test loss falls then (if overfit) rises after epoch 5, while the
    deepest conv layer's sparsity rises from epoch 3; arrays every second epoch."""
    rng = np.random.default_rng(seed)
    run = RunDir(path, create=True)
    run.write_config({"model": "synthetic", "layers": LAYERS, "seed": seed})
    for e in range(1, N_EPOCHS + 1):
        test = 1.0 / e + (0.08 * max(0, e - 5) ** 1.5 if overfit else 0.0)
        row: dict[str, float] = {
            "epoch": e,
            "train_loss": 1.2 / e,
            "train_acc": 1.0 - 0.5 / e,
            "test_loss": test,
            "test_acc": 0.9 - 0.4 / e - 0.01 * max(0, e - 5),
        }
        for i, name in enumerate(LAYERS):
            rise = 0.05 * max(0, e - 3) if name == "features.6" else 0.0
            row[f"sparsity:{name}"] = 0.5 + 0.05 * i + rise + 0.002 * rng.standard_normal()
            row[f"sparsity_std:{name}"] = 0.05
            row[f"hoyer:{name}"] = 0.3 + 0.02 * i + rise
            row[f"correlation:{name}"] = 0.2 + 0.02 * e * (i + 1) / len(LAYERS)
            row[f"dead:{name}"] = 0
        run.append_history(row)
        if e in ARRAY_EPOCHS:
            arrays: dict[str, np.ndarray] = {}
            for name in LAYERS:
                c = CHANNELS[name]
                arrays[f"channel:{name}"] = rng.uniform(0.3, 0.9, size=c) + 0.01 * e
                arrays[f"layer:{name}"] = rng.uniform(0.4, 0.8, size=12)
                a = rng.standard_normal((c, c))
                r = np.corrcoef(a @ rng.standard_normal((c, 30)))
                arrays[f"correlation:{name}"] = r
                arrays[f"lifetime:{name}"] = rng.uniform(0.1, 0.9, size=c)
                if name != "classifier.1":
                    arrays[f"spatial:{name}"] = rng.uniform(0, 1, size=(probe, 4, 4))
            run.save_arrays(e, arrays)
    run.save_probe(rng.uniform(0, 1, size=(probe, 3, 16, 16)).astype(np.float32), np.arange(probe))
    return run


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> RunDir:
    return make_run(tmp_path_factory.mktemp("baseline"))


@pytest.fixture(scope="module")
def arms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, RunDir]:
    return {
        name: make_run(tmp_path_factory.mktemp(name), overfit=name == "none", seed=i)
        for i, name in enumerate(("none", "dropout", "batch norm", "sparsity penalty"))
    }


def _n_artists(fig) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    lines = sum(len(ax.get_lines()) for ax in fig.axes)
    images = sum(len(ax.get_images()) for ax in fig.axes)
    return lines, images


# --------------------------------------------------------------------------- figure 1 and 2
def test_loss_and_sparsity_marks_onsets(run: RunDir) -> None:
    from xai_sparsity.views.figures import plot_loss_and_sparsity

    fig = plot_loss_and_sparsity(run)
    lines, _ = _n_artists(fig)
    assert len(fig.axes) == 2
    assert lines >= 2 + len(LAYERS)
    data = fig.xai_data
    assert list(data.columns[:3]) == ["epoch", "train_loss", "test_loss"]
    assert [c.split(":", 1)[1] for c in data.columns[3:]] == LAYERS
    assert data.attrs["t_L"] == 5
    assert data.attrs["t_s"]["features.6"] is not None
    assert data.attrs["t_s"]["features.6"] <= data.attrs["t_L"]
    # t_L is drawn on both panels at x = 5
    for ax in fig.axes:
        assert any(list(line.get_xdata()) == [5, 5] for line in ax.get_lines())


def test_loss_and_sparsity_options(run: RunDir) -> None:
    from xai_sparsity.views.figures import plot_loss_and_sparsity

    fig = plot_loss_and_sparsity(run, ["features.6"], measure="hoyer", accuracy=True)
    assert len(fig.axes) == 3
    assert list(fig.xai_data.columns) == [
        "epoch",
        "train_loss",
        "test_loss",
        "train_acc",
        "test_acc",
        "hoyer:features.6",
    ]
    np.testing.assert_allclose(fig.xai_data["hoyer:features.6"], run.history()["hoyer:features.6"])
    # a run whose test loss never turns gets no t_L line, and says so
    calm = plot_loss_and_sparsity(arms_calm := make_run(run.path.parent / "calm", overfit=False))
    assert calm.xai_data.attrs["turned"] is False
    assert not any(len(ln.get_xdata()) == 2 for ln in calm.axes[0].get_lines())
    assert "the test loss did not turn: no lead" in " ".join(
        t.get_text() for t in calm.axes[0].texts
    )
    assert arms_calm.layers == LAYERS
    # redrawing into the same figure replaces its content
    again = plot_loss_and_sparsity(run, ["features.1"], fig=fig)
    assert again is fig and len(fig.axes) == 2


def test_sparsity_heatmap(run: RunDir) -> None:
    from xai_sparsity.views.figures import plot_sparsity_heatmap

    fig = plot_sparsity_heatmap(run)
    _, images = _n_artists(fig)
    assert images == 1
    data = fig.xai_data
    assert list(data.index) == LAYERS  # rows input -> output
    assert list(data.columns) == list(range(1, N_EPOCHS + 1))
    shown = fig.axes[0].get_images()[0].get_array()
    np.testing.assert_allclose(np.asarray(shown), data.to_numpy())
    hist = run.history()
    np.testing.assert_allclose(data.loc["features.3"].to_numpy(), hist["sparsity:features.3"])


def test_unknown_layer_and_measure(run: RunDir) -> None:
    from xai_sparsity.views.figures import plot_loss_and_sparsity, plot_sparsity_heatmap

    with pytest.raises(XaiSparsityError, match=r"features\.7.*features\.6"):
        plot_loss_and_sparsity(run, ["features.7"])
    with pytest.raises(XaiSparsityError, match=r"'sparsty'.*'hoyer'.*'sparsity'"):
        plot_sparsity_heatmap(run, measure="sparsty")


def test_empty_run_is_an_error(tmp_path: Path) -> None:
    from xai_sparsity.views.figures import plot_sparsity_heatmap

    run = RunDir(tmp_path / "empty", create=True)
    run.write_config({})
    with pytest.raises(XaiSparsityError, match="no history"):
        plot_sparsity_heatmap(run)


# --------------------------------------------------------------------------- saving
def test_save_figure_round_trips_dataframe(run: RunDir, tmp_path: Path) -> None:
    from xai_sparsity.views.figures import (
        plot_loss_and_sparsity,
        plot_sparsity_heatmap,
        save_figure,
    )

    fig = plot_loss_and_sparsity(run)
    paths = save_figure(fig, tmp_path / "fig1")
    assert [p.name for p in paths] == ["fig1.pdf", "fig1.svg", "fig1.png", "fig1.csv"]
    assert all(p.stat().st_size > 0 for p in paths)
    assert paths[0].read_bytes()[:4] == b"%PDF"
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    back = pd.read_csv(paths[-1])
    pd.testing.assert_frame_equal(back, fig.xai_data.reset_index(drop=True), check_dtype=False)

    heat = plot_sparsity_heatmap(run)
    (csv,) = save_figure(heat, tmp_path / "sub" / "fig2", formats=())
    back = pd.read_csv(csv, index_col="layer")
    np.testing.assert_allclose(back.to_numpy(), heat.xai_data.to_numpy())
    assert list(back.index) == LAYERS
    assert not list(tmp_path.glob("**/*.tmp"))


def test_save_figure_errors(run: RunDir, tmp_path: Path) -> None:
    from xai_sparsity.views.figures import plot_sparsity_heatmap, save_figure

    fig = plot_sparsity_heatmap(run)
    with pytest.raises(XaiSparsityError, match="'gif'"):
        save_figure(fig, tmp_path / "x", formats=("gif",))
    with pytest.raises(XaiSparsityError, match="data"):
        save_figure(fig, tmp_path / "x", data=[1, 2, 3])  # type: ignore[arg-type]


def test_paper_style_presets() -> None:
    import matplotlib as mpl

    from xai_sparsity.views.figures import OKABE_ITO, paper_rc, paper_style

    assert paper_rc("single")["figure.figsize"][0] == 3.5
    assert paper_rc("double")["figure.figsize"][0] == 7.1
    before = mpl.rcParams["font.size"]
    with paper_style("notebook"):
        assert mpl.rcParams["font.size"] == 11.0
        assert mpl.rcParams["axes.prop_cycle"].by_key()["color"][0] == OKABE_ITO[0]
    assert mpl.rcParams["font.size"] == before
    with pytest.raises(XaiSparsityError, match=r"'poster'.*'single'"):
        paper_rc("poster")


# --------------------------------------------------------------------------- figure 3
def test_channel_sparsity(run: RunDir) -> None:
    from xai_sparsity.views.figures import plot_channel_sparsity

    fig = plot_channel_sparsity(run, "features.3")
    assert len(fig.axes[0].patches) == CHANNELS["features.3"]
    assert len(fig.axes[1].get_images()) == 1
    data = fig.xai_data
    assert data["epochs"].tolist() == list(ARRAY_EPOCHS)
    assert data["channel_sparsity"].shape == (len(ARRAY_EPOCHS), CHANNELS["features.3"])
    assert int(data["epoch"]) == ARRAY_EPOCHS[-1]
    last = run.load_arrays(ARRAY_EPOCHS[-1])["channel:features.3"]
    np.testing.assert_allclose(data["channel_sparsity"][-1], last)
    heights = [p.get_height() for p in fig.axes[0].patches]
    np.testing.assert_allclose(heights, np.sort(last)[::-1])  # sorted bars
    at4 = plot_channel_sparsity(run, "features.3", epoch=4).xai_data
    assert int(at4["epoch"]) == 4
    np.testing.assert_allclose(at4["channel_sparsity"][1], run.load_arrays(4)["channel:features.3"])


def test_array_errors(run: RunDir) -> None:
    from xai_sparsity.views.figures import plot_channel_sparsity, plot_run_spatial_maps

    with pytest.raises(XaiSparsityError, match=r"epoch 5 .*\[2, 4, 6, 8, 10\]"):
        plot_channel_sparsity(run, "features.3", epoch=5)
    with pytest.raises(XaiSparsityError, match=r"'features\.9'.*'features\.1'"):
        plot_channel_sparsity(run, "features.9")
    with pytest.raises(XaiSparsityError, match=r"'classifier\.1'.*valid layers"):
        plot_run_spatial_maps(run, "classifier.1")


# --------------------------------------------------------------------------- figure 4
def test_spatial_maps_from_arrays() -> None:
    from xai_sparsity.views.figures import plot_spatial_maps

    rng = np.random.default_rng(0)
    images = torch.rand(2, 3, 16, 16)
    maps = rng.uniform(0, 1, size=(2, 4, 4))
    attrs = {"saliency": torch.rand(2, 16, 16), "gradcam": torch.rand(2, 8, 8)}
    fig = plot_spatial_maps(
        images, maps, attributions=attrs, feature_maps=torch.rand(2, 5, 4, 4), titles=["a", "b"]
    )
    assert sum(len(ax.get_images()) for ax in fig.axes) == 2 * (1 + 2 + 2 * 2 + 1)
    data = fig.xai_data
    up = data["spatial_sparsity_upsampled"]
    assert up.shape == (2, 16, 16) and data["attribution:gradcam"].shape == (2, 16, 16)
    # bilinear upsampling keeps the range and the mean of each map
    assert up.min() >= maps.min() - 1e-6 and up.max() <= maps.max() + 1e-6
    np.testing.assert_allclose(up.mean(axis=(1, 2)), maps.mean(axis=(1, 2)), atol=0.05)
    assert data["feature_maps"].shape == (2, 4, 4)
    only = plot_spatial_maps(images[:, :1], maps, sparsity_range=None)  # grey, no extras
    assert len([ax for ax in only.axes if ax.get_images()]) == 4
    clim = only.axes[1].get_images()[-1].get_clim()
    assert clim == pytest.approx((maps.min(), maps.max()))
    with pytest.raises(XaiSparsityError, match="K = 2"):
        plot_spatial_maps(images, maps[:1])


def test_run_spatial_maps(run: RunDir) -> None:
    from xai_sparsity.views.figures import plot_run_spatial_maps

    fig = plot_run_spatial_maps(run, "features.6", epoch=6, max_images=2)
    data = fig.xai_data
    np.testing.assert_allclose(
        data["spatial_sparsity"], run.load_arrays(6)["spatial:features.6"][:2]
    )
    np.testing.assert_allclose(data["images"], run.load_probe()["images"][:2])
    assert data["labels"].tolist() == [0, 1]


def test_run_spatial_maps_with_model(
    tmp_path: Path, small_cnn: Callable[..., torch.nn.Sequential]
) -> None:
    from xai_sparsity.views.figures import plot_run_spatial_maps

    # Conv(3, 4), ReLU, MaxPool, Flatten, Linear for (B, 3, 16, 16) images
    model = small_cnn(3, (4,), image_size=16, norm_after=()).train()
    run = RunDir(tmp_path / "m", create=True)
    run.append_history({"epoch": 1, "test_loss": 1.0, "sparsity:1": 0.5})
    run.save_arrays(1, {"spatial:1": np.random.default_rng(0).uniform(size=(2, 16, 16))})
    run.save_probe(np.random.default_rng(1).uniform(size=(2, 3, 16, 16)).astype(np.float32))
    fig = plot_run_spatial_maps(run, "1", model=model, method=("saliency", "gradcam"))
    data = fig.xai_data
    assert {"attribution:saliency", "attribution:gradcam", "feature_maps"} <= set(data)
    with torch.no_grad():
        model.eval()
        expected = model[:2](torch.as_tensor(data["images"])).mean(1).numpy()
    np.testing.assert_allclose(data["feature_maps"], expected, rtol=1e-5, atol=1e-6)
    model.train()
    assert model.training


# --------------------------------------------------------------------------- figure 5
def test_correlation_side_by_side(arms: dict[str, RunDir]) -> None:
    from xai_sparsity.views.figures import plot_correlation

    pair = {"baseline": arms["none"], "penalised": arms["sparsity penalty"]}
    fig = plot_correlation(pair, "features.6", epoch=8)
    images = [im for ax in fig.axes for im in ax.get_images()]
    assert len(images) == 2
    assert all(im.get_cmap().name == "RdBu_r" and im.get_clim() == (-1.0, 1.0) for im in images)
    data = fig.xai_data
    np.testing.assert_allclose(
        data["correlation:penalised"],
        arms["sparsity penalty"].load_arrays(8)["correlation:features.6"],
    )
    assert "mean |r|" in fig.axes[0].get_title()
    single = plot_correlation(arms["none"], "features.1")
    assert len([ax for ax in single.axes if ax.get_images()]) == 1


def test_mean_abs_r_of_figures_masks_dead_channels() -> None:
    """Figures and widgets title a matrix with the one mean |r| of the measuring layer."""
    from xai_sparsity.measuring import correlation_summary

    r = np.array([[1.0, -0.5, 0.0], [-0.5, 1.0, 0.0], [0.0, 0.0, 0.0]])  # channel 2 dead
    assert correlation_summary(r) == pytest.approx(0.5)
    assert correlation_summary(np.zeros((3, 3))) == 0.0


def test_correlation_over_epochs(run: RunDir, arms: dict[str, RunDir]) -> None:
    from xai_sparsity.views.figures import plot_correlation_over_epochs

    fig = plot_correlation_over_epochs(run)
    assert len(fig.axes[0].get_lines()) == len(LAYERS)
    data = fig.xai_data
    assert list(data.columns) == ["arm", "layer", "epoch", "mean_abs_r"]
    assert len(data) == len(LAYERS) * N_EPOCHS
    multi = plot_correlation_over_epochs(arms, ["features.1", "features.6"])
    visible = [ax for ax in multi.axes if ax.get_visible() and ax.get_lines()]
    assert len(visible) == 2 and all(len(ax.get_lines()) == len(arms) for ax in visible)
    sel = multi.xai_data.query("arm == 'dropout' and layer == 'features.6'")
    np.testing.assert_allclose(
        sel["mean_abs_r"], arms["dropout"].history()["correlation:features.6"]
    )


# --------------------------------------------------------------------------- figure 6
def test_regulariser_comparison(arms: dict[str, RunDir], tmp_path: Path) -> None:
    from xai_sparsity.views.figures import paper_style, plot_regulariser_comparison, save_figure

    with paper_style("double"):
        fig = plot_regulariser_comparison(arms)
    assert len(fig.axes) == 3
    for ax in fig.axes:
        assert len([ln for ln in ax.get_lines() if len(ln.get_xdata()) > 1]) == len(arms)
    data = fig.xai_data
    assert list(data.columns) == ["arm", "epoch", "test_loss", "test_acc", "sparsity:classifier.1"]
    assert list(data["arm"].unique()) == list(arms)
    mean = plot_regulariser_comparison(arms, layer="mean", measure="hoyer").xai_data
    h = arms["dropout"].history()
    np.testing.assert_allclose(
        mean[mean["arm"] == "dropout"]["hoyer:mean"], h[[f"hoyer:{n}" for n in LAYERS]].mean(axis=1)
    )
    paths = save_figure(fig, tmp_path / "fig6", formats=("svg",))
    back = pd.read_csv(paths[-1])
    pd.testing.assert_frame_equal(back, data, check_dtype=False)
    with pytest.raises(XaiSparsityError, match=r"'features\.5'.*valid layers"):
        plot_regulariser_comparison(arms, layer="features.5")


def test_save_figure_round_trips_npz(run: RunDir, tmp_path: Path) -> None:
    from xai_sparsity.views.figures import plot_channel_sparsity, save_figure

    fig = plot_channel_sparsity(run, "features.6")
    paths = save_figure(fig, tmp_path / "fig3", formats=("png",))
    assert [p.suffix for p in paths] == [".png", ".npz"]
    with np.load(paths[-1]) as back:
        assert set(back.files) == set(fig.xai_data)
        for key, value in fig.xai_data.items():
            np.testing.assert_array_equal(back[key], value)
