"""Write the notebooks in notebooks/ (clean: no outputs, no execution counts).

The committed ``.ipynb`` files are what users open; this script keeps their cells in one
reviewable place. Run ``python scripts/make_notebooks.py`` after editing a cell here.

Each notebook has one cell tagged ``parameters`` (papermill): ``FAST = False`` is the full setting
for users; the test suite injects ``FAST = True`` for a tiny setting that runs on a CPU in well
under two minutes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "notebooks"


def md(text: str) -> nbformat.NotebookNode:
    return new_markdown_cell(text.strip("\n"))


def code(text: str, *tags: str) -> nbformat.NotebookNode:
    cell = new_code_cell(text.strip("\n"))
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def params(text: str) -> nbformat.NotebookNode:
    return code(text, "parameters")


# ----------------------------------------------------------------------------- 01
NB01 = [
    md("""
# 01 · Explore the layers of a trained CNN

What does each layer of a CNN compute, and how *sparse* is it? This notebook trains a small
VGG-style CNN on the MNIST digits that ship with the package (no download), then opens the
**LayerExplorer**: pick a layer, an image and a channel and see, side by side,

* the input and a grid of the layer's feature maps (the chosen channel is framed),
* the per-channel **perplexity sparsity** (0: all positions equally active, 1: one position),
* the **spatial sparsity map** (at each position, how few channels are active) over the input,
* the layer's **filter correlation** matrix (redundant filters show as strong off-diagonal colour),
* a **Captum attribution** of the predicted or true class (choose the method).
"""),
    params("""
FAST = False  # True: a tiny setting that runs in seconds on a CPU (the tests use it)
EPOCHS = 20
TRAIN_SIZE = 1000
N_IMAGES = 12
OUT = "runs/01_explore_layers"
"""),
    code("""
if FAST:
    EPOCHS, TRAIN_SIZE, N_IMAGES = 2, 200, 4
"""),
    code("""
%matplotlib inline
import torch

import xai_sparsity as xs
from xai_sparsity.training.data import load_data
from xai_sparsity.training.models import make_model
from xai_sparsity.training.trainer import TrainConfig, train
"""),
    md("""
## Train (or load) a small model

`train` writes a run directory; running the cell again loads the finished run instead of training
again (delete the folder `OUT` to start over).
"""),
    code("""
config = TrainConfig(
    epochs=EPOCHS, train_size=TRAIN_SIZE, test_size=1000 if not FAST else 300,
    probe_size=200 if not FAST else 100, array_every=EPOCHS, device="auto",
)
data = load_data(config.data, train_size=config.train_size, test_size=config.test_size,
                 probe_size=config.probe_size, seed=config.seed)
run = train(config, OUT, data=data)
run.history()[["epoch", "train_loss", "test_loss", "test_acc"]].tail(3)
"""),
    code("""
model = make_model(config.model, num_classes=data.num_classes, in_channels=data.in_channels,
                   image_size=data.image_size, widths=config.widths, hidden=config.hidden)
model.load_state_dict(run.load_checkpoint("last")["model"])
xs.list_layers(model, data.probe[0][0][None])
"""),
    md("""
## The explorer

Images are fixed held-out *probe* images. Activations of every layer are computed once per image
and cached, so clicking through layers and channels is quick.
"""),
    code("""
images = torch.stack([data.probe[i][0] for i in range(N_IMAGES)])
labels = torch.tensor([int(data.probe[i][1]) for i in range(N_IMAGES)])
explorer = xs.LayerExplorer(model, images, labels, class_names=data.class_names)
explorer
"""),
    md("""
Things to try:

* Go from `features.relu1` to `features.relu4`: the deeper layers are sparser (fewer positions
  and fewer channels carry the activation), and the spatial map concentrates on the digit.
* Compare `features.conv*` (before the ReLU, measured on |a|) with the `features.relu*` after it.
* Channels with sparsity 1.0 are *dead* for this image (all zero).
* Switch the attribution method: Grad-CAM follows the chosen layer, the pixel methods do not.
"""),
]

# ----------------------------------------------------------------------------- 02
NB02 = [
    md("""
# 02 · Overfitting dynamics: does sparsity rise before the test loss turns?

A teaching notebook. A plain CNN is trained **without regularisation on a small subset** of MNIST
digits, so that it overfits: after a while the **test loss turns** and rises, while the training
loss keeps falling. At every epoch the trainer measures the **perplexity sparsity** of each layer
on a fixed set of held-out *probe* images.

The papers behind this package (Huesmann et al., 2020 and 2021) report that activation sparsity in
the convolutional layers rises shortly *before* the test loss turns, so sparsity could warn of
overfitting **without test labels**. Watch the curves live below: the **early-warning** banner
appears when enough layers show a sustained sparsity rise (it never looks at the test loss).
"""),
    params("""
FAST = False  # True: a tiny setting that runs in seconds on a CPU (the tests use it)
EPOCHS = 60
TRAIN_SIZE = 500
OUT = "runs/02_baseline"
"""),
    code("""
if FAST:
    EPOCHS, TRAIN_SIZE = 3, 200
"""),
    code("""
%matplotlib inline
import xai_sparsity as xs
from xai_sparsity.views.figures import plot_loss_and_sparsity, plot_sparsity_heatmap
from xai_sparsity.training.trainer import TrainConfig, train
"""),
    md("""
## Train with a live monitor

The monitor is a trainer callback: it receives each epoch's history row (the same row that goes
into `history.csv`) and redraws in place.
"""),
    code("""
config = TrainConfig(
    epochs=EPOCHS, train_size=TRAIN_SIZE, test_size=2000 if not FAST else 300,
    probe_size=500 if not FAST else 100, array_every=5 if not FAST else 2,
    optimizer="sgd", lr=0.01, momentum=0.9, device="auto",
)
monitor = xs.TrainingMonitor(title=f"baseline CNN, {TRAIN_SIZE} training images")
monitor
"""),
    code("""
run = train(config, OUT, callbacks=[monitor], progress=False)
if not monitor.rows:  # the run was already complete: show what it recorded
    monitor.replay(run)
"""),
    md("""
## When did the test loss turn, and when did each layer's sparsity start rising?

`analyze` smooths the curves and finds `t_L` (the epoch of the smoothed test-loss minimum) and,
per layer, `t_s` (the start of a sustained sparsity rise). `lead = t_L - t_s` is positive when
sparsity warned early.
"""),
    code("""
analysis = xs.analyze(run)
print(analysis)
analysis.table()
"""),
    code("""
plot_loss_and_sparsity(run, analysis=analysis, accuracy=True)
"""),
    code("""
plot_sparsity_heatmap(run, analysis=analysis)
"""),
    md("""
## Scrub through the epochs

Per-channel sparsity, the spatial sparsity maps of the probe images and the filter correlation at
each epoch that saved arrays.
"""),
    code("""
xs.EpochScrubber(run)
"""),
    md("""
## Questions for students

1. At which epoch does the test loss reach its minimum? What happens to the training loss and to
   the gap between training and test accuracy afterwards?
2. Which layers' sparsity rises before `t_L`, which after, and which not at all? Is the effect the
   same in the first and in the deepest convolutional layer?
3. Sparsity also rises while a network *learns* (deep features become class-selective). How could
   you tell "learning" from "overfitting" without looking at the test loss? Look at
   `train_sparsity:<layer>` in `run.history()` (the same measure on training images).
4. Re-run with `TRAIN_SIZE = 5000` or with `TrainConfig(dropout=0.5)`. Does the test loss still
   turn? Does the early warning still fire? A warning that fires in every run tells nothing.
5. In the scrubber, do the spatial sparsity maps concentrate on the digit or on the background as
   training goes on? What does a dead channel (sparsity 1.0 everywhere) mean?
"""),
]

# ----------------------------------------------------------------------------- 03
NB03 = [
    md("""
# 03 · Penalising sparsity vs. the baseline and classical regularisers

The perplexity sparsity is differentiable, so it can be a **training penalty** that pushes the
targeted layers' activations to be *denser*:

`loss = cross-entropy + lambda * sum over targeted layers of (mean sparsity of the batch)`

This notebook trains the arms of an experiment with the same seed, data order and schedule
(`run_experiment`) and compares them: the baseline, the sparsity penalty, dropout and batch
normalisation. Training runs on a GPU when one is available (`device="auto"`); the `FAST` setting
is a quick CPU run.

No value of `lambda` is known from the papers: try a sweep, e.g. `ARMS = ["baseline",
"penalty@0.1", "penalty@0.3", "penalty@1"]`.
"""),
    params("""
FAST = False  # True: a tiny setting that runs in seconds on a CPU (the tests use it)
EPOCHS = 100
TRAIN_SIZE = 1000
ARMS = ["baseline", "penalty@0.3", "dropout", "batchnorm"]
PENALTY_LAYERS = None  # None: every activation after a conv; or names/patterns; or "auto"
DEVICE = "auto"        # "auto" picks CUDA or MPS when available, else the CPU
OUT = "runs/03_experiment"
"""),
    code("""
if FAST:
    EPOCHS, TRAIN_SIZE, ARMS, DEVICE = 3, 200, ["baseline", "penalty@0.3"], "cpu"
"""),
    code("""
%matplotlib inline
import torch

import xai_sparsity as xs
from xai_sparsity.training.trainer import TrainConfig, resolve_device, run_experiment

device = resolve_device(DEVICE)
print("training on", device, "|", torch.cuda.get_device_name(device) if device.type == "cuda" else "")
"""),
    code("""
config = TrainConfig(
    epochs=EPOCHS, train_size=TRAIN_SIZE, test_size=2000 if not FAST else 300,
    probe_size=500 if not FAST else 100, array_every=10 if not FAST else EPOCHS,
    penalty_layers=PENALTY_LAYERS, device=DEVICE, amp=device.type == "cuda",
)
runs = run_experiment(config, ARMS, OUT, progress=True)
{arm: str(run.path) for arm, run in runs.items()}
"""),
    md("""
## The arms side by side

Test loss, test accuracy and the chosen layer's sparsity per arm, and every layer's sparsity at
the last epoch. The table gives the best test accuracy, the test-loss minimum and whether the
test loss turned (overfitting).
"""),
    code("""
comparison = xs.RunComparison(runs)
comparison
"""),
    code("""
comparison.summary()
"""),
    md("""
## What to look for

* Does the penalty keep the targeted layers denser (lower sparsity) than the baseline?
* Does the test loss of the penalised arm still turn, later, or not at all?
* Does an *unpenalised* layer become sparser in compensation?
* Is the best test accuracy better than the baseline's? Than dropout's and batch norm's?
  (In our small first probe it was not for all-layer penalties; the layer choice matters.)
"""),
]

# ----------------------------------------------------------------------------- 04
NB04 = [
    md("""
# 04 · Every figure from run directories, exported for a paper

Each figure of the project is one function of `xai_sparsity.views.figures` that reads run directories
and returns a matplotlib figure with the data it plotted attached. `save_figure` writes it as
vector files (PDF, SVG) and PNG together with that data (CSV or npz), so every number in a figure
can be checked.

By default the notebook uses the experiment of notebook 03 (`runs/03_experiment`); if that does
not exist it trains a small one first.
"""),
    params("""
FAST = False  # True: a tiny setting that runs in seconds on a CPU (the tests use it)
EXPERIMENT = "runs/03_experiment"
FIGURES = "figures"
FORMATS = ("pdf", "svg", "png")
STYLE = "double"  # "single" (3.5 in column), "double" (7.1 in) or "notebook"
"""),
    code("""
if FAST:
    EXPERIMENT, FIGURES = "runs/04_fast_experiment", "figures_fast"
"""),
    code("""
%matplotlib inline
from pathlib import Path

import xai_sparsity as xs
from xai_sparsity.views import figures as F
from xai_sparsity.training.data import load_data
from xai_sparsity.training.models import make_model
from xai_sparsity.training.trainer import TrainConfig, run_experiment
"""),
    code("""
arms = ["baseline", "penalty@0.3", "dropout", "batchnorm"]
if not all((Path(EXPERIMENT) / a / "summary.json").exists() for a in ("baseline",)):
    small = TrainConfig(epochs=30 if not FAST else 2, train_size=500 if not FAST else 200,
                        test_size=1000 if not FAST else 300, probe_size=200 if not FAST else 100,
                        array_every=5 if not FAST else 1, device="auto")
    run_experiment(small, arms if not FAST else ["baseline", "penalty@0.3"], EXPERIMENT)
runs = {p.name: xs.RunDir(p) for p in sorted(Path(EXPERIMENT).iterdir()) if (p / "history.csv").exists()}
baseline = runs["baseline"]
out = Path(FIGURES)
out.mkdir(exist_ok=True)
list(runs)
"""),
    md("## Figure 1: losses and per-layer sparsity, with t_L and each t_s marked"),
    code("""
with F.paper_style(STYLE):
    fig1 = F.plot_loss_and_sparsity(baseline, accuracy=True)
    F.save_figure(fig1, out / "fig1_loss_and_sparsity", formats=FORMATS)
fig1
"""),
    md("## Figure 2: layer x epoch sparsity heatmap"),
    code("""
with F.paper_style(STYLE):
    fig2 = F.plot_sparsity_heatmap(baseline, analysis=xs.analyze(baseline))
    F.save_figure(fig2, out / "fig2_sparsity_heatmap", formats=FORMATS)
fig2
"""),
    md("## Figure 3: per-filter sparsity of one layer and its evolution"),
    code("""
layer = baseline.layers[-2] if len(baseline.layers) > 1 else baseline.layers[0]
with F.paper_style(STYLE):
    fig3 = F.plot_channel_sparsity(baseline, layer)
    F.save_figure(fig3, out / "fig3_channel_sparsity", formats=FORMATS)
fig3
"""),
    md("""
## Figure 4: spatial sparsity maps next to Captum attributions

With the trained model (rebuilt from the run's settings and its last checkpoint) the figure adds
attributions and the layer's feature maps beside the sparsity maps of the probe images.
"""),
    code("""
settings = {k: v for k, v in baseline.config.items() if k in TrainConfig.__dataclass_fields__}
cfg = TrainConfig.from_dict(settings)
data = load_data(cfg.data, train_size=cfg.train_size, test_size=cfg.test_size,
                 probe_size=cfg.probe_size, seed=cfg.seed)
model = make_model(cfg.model, num_classes=data.num_classes, in_channels=data.in_channels,
                   image_size=data.image_size, widths=cfg.widths, hidden=cfg.hidden,
                   dropout=cfg.dropout, batch_norm=cfg.batch_norm)
model.load_state_dict(baseline.load_checkpoint("last")["model"])
with F.paper_style(STYLE):
    fig4 = F.plot_run_spatial_maps(baseline, layer, model=model, method=("saliency", "gradcam"))
    F.save_figure(fig4, out / "fig4_spatial_maps", formats=FORMATS)
fig4
"""),
    md("## Figure 5: filter correlation, baseline vs penalised, and mean |r| over epochs"),
    code("""
penalised = next(name for name in runs if name.startswith("penalty"))
with F.paper_style(STYLE):
    fig5 = F.plot_correlation({"baseline": baseline, penalised: runs[penalised]}, layer)
    F.save_figure(fig5, out / "fig5_correlation", formats=FORMATS)
    fig5b = F.plot_correlation_over_epochs(runs)
    F.save_figure(fig5b, out / "fig5b_correlation_over_epochs", formats=FORMATS)
fig5
"""),
    code("""
fig5b
"""),
    md("## Figure 6: regulariser comparison over long training"),
    code("""
with F.paper_style(STYLE):
    fig6 = F.plot_regulariser_comparison(runs)
    F.save_figure(fig6, out / "fig6_regulariser_comparison", formats=FORMATS)
fig6
"""),
    code("""
sorted(p.name for p in out.iterdir())
"""),
]


NOTEBOOKS = {
    "01_explore_layers.ipynb": NB01,
    "02_overfitting_dynamics.ipynb": NB02,
    "03_penalised_vs_baseline.ipynb": NB03,
    "04_paper_figures.ipynb": NB04,
}


def build(cells: list[nbformat.NotebookNode]) -> nbformat.NotebookNode:
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
        "name": "python3",
    }
    nb.metadata["language_info"] = {"name": "python"}
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:02d}"
        cell.metadata.setdefault("tags", [])
    nbformat.validate(nb)
    return nb


def main(argv: list[str]) -> int:
    OUT.mkdir(exist_ok=True)
    names = argv or list(NOTEBOOKS)
    for name in names:
        nbformat.write(build(NOTEBOOKS[name]), OUT / name)
        print("wrote", OUT / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
