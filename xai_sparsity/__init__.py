"""xai_sparsity: perplexity-based activation sparsity, sparsity maps and filter correlation for CNNs.

The package is layered; each folder imports only from the folders below it::

    cli                      the ``xai-sparsity`` command
    study                    the study of the papers' claims, the demo report
    views | integrations     figures, attributions, widgets | Lightning, TensorBoard
    training                 data, models, penalty, trainer, SparsityMonitor
    capturing | runs         hooks and sweeps | run directories and their analysis
    measuring                the measures, the statistics engine, filter correlation
    base                     the exception, atomic files, torch helpers

The most used names are here; everything else lives in its sub-package (``xai_sparsity.views``
for the paper figures, for example). Names are imported lazily, so ``import xai_sparsity`` stays
cheap: torch, matplotlib and Captum load when a function needs them.

>>> import torch, xai_sparsity as xs
>>> xs.perplexity_sparsity(torch.tensor([[1.0, 1.0, 0.0, 0.0]])).tolist()  # doctest: +ELLIPSIS
[0.666...]
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from xai_sparsity.base import __version__
from xai_sparsity.base.errors import XaiSparsityError
from xai_sparsity.base.lazy import lazy_exports

# public name -> sub-package module that defines it
_EXPORTS: dict[str, str] = {
    # measuring
    "perplexity_sparsity": "measuring.measures",
    "entropy_sparsity": "measuring.measures",
    "hoyer_sparsity": "measuring.measures",
    "zero_fraction": "measuring.measures",
    "lifetime_sparsity": "measuring.measures",
    "filter_correlation": "measuring.correlation",
    "CorrelationAccumulator": "measuring.correlation",
    # capturing
    "list_layers": "capturing.hooks",
    "capture": "capturing.hooks",
    "sweep": "capturing.sweeps",
    # runs
    "RunDir": "runs.rundir",
    "analyze": "runs.analysis",
    # training
    "load_data": "training.data",
    "make_model": "training.models",
    "SparsityPenalty": "training.penalty",
    "TrainConfig": "training.trainer",
    "train": "training.trainer",
    "run_experiment": "training.trainer",
    "SparsityMonitor": "training.monitor",
    # views
    "attribute": "views.attributions",
    "LayerExplorer": "views.widgets",
    "TrainingMonitor": "views.widgets",
    "EpochScrubber": "views.widgets",
    "RunComparison": "views.widgets",
    # study
    "run_study": "study.runner",
}

# names that were top-level before the sub-packages: still resolved, with a DeprecationWarning
_MOVED: dict[str, str] = {
    **{
        n: "xai_sparsity.measuring"
        for n in ("compute_measure", "MEASURES", "set_kernel", "use_kernel")
    },
    **{n: "xai_sparsity.measuring" for n in ("weight_similarity", "correlation_summary")},
    **{
        n: "xai_sparsity.capturing"
        for n in ("resolve_layers", "LayerInfo", "LayerTable", "Capture", "SweepResult")
    },
    **{n: "xai_sparsity.runs" for n in ("load_history", "EarlyWarning", "Analysis")},
    **{n: "xai_sparsity.training" for n in ("DataBundle", "auto_targets")},
    **{
        n: "xai_sparsity.views"
        for n in (
            "plot_loss_and_sparsity",
            "plot_sparsity_heatmap",
            "plot_channel_sparsity",
            "plot_spatial_maps",
            "plot_run_spatial_maps",
            "plot_correlation",
            "plot_correlation_over_epochs",
            "plot_regulariser_comparison",
            "paper_style",
            "save_figure",
            "plot_attributions",
        )
    },
    **{n: "xai_sparsity.study" for n in ("load_study", "score_indicators", "write_report")},
}

__all__ = ["XaiSparsityError", "__version__", *_EXPORTS]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals(), _MOVED)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from xai_sparsity.capturing.hooks import capture, list_layers
    from xai_sparsity.capturing.sweeps import sweep
    from xai_sparsity.measuring.correlation import CorrelationAccumulator, filter_correlation
    from xai_sparsity.measuring.measures import (
        entropy_sparsity,
        hoyer_sparsity,
        lifetime_sparsity,
        perplexity_sparsity,
        zero_fraction,
    )
    from xai_sparsity.runs.analysis import analyze
    from xai_sparsity.runs.rundir import RunDir
    from xai_sparsity.study.runner import run_study
    from xai_sparsity.training.data import load_data
    from xai_sparsity.training.models import make_model
    from xai_sparsity.training.monitor import SparsityMonitor
    from xai_sparsity.training.penalty import SparsityPenalty
    from xai_sparsity.training.trainer import TrainConfig, run_experiment, train
    from xai_sparsity.views.attributions import attribute
    from xai_sparsity.views.widgets import (
        EpochScrubber,
        LayerExplorer,
        RunComparison,
        TrainingMonitor,
    )
