"""xai_sparsity: perplexity-based activation sparsity, sparsity maps and filter correlation for CNNs.

Public names are imported lazily so that ``import xai_sparsity`` stays cheap; heavy optional
dependencies (captum, ipywidgets, matplotlib, lightning) are only imported by the functions that
need them.

>>> import torch, xai_sparsity as xs
>>> xs.perplexity_sparsity(torch.tensor([[1.0, 1.0, 0.0, 0.0]])).tolist()  # doctest: +ELLIPSIS
[0.666...]
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from xai_sparsity._errors import XaiSparsityError

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # measures
    "perplexity_sparsity": "measures",
    "zero_fraction": "measures",
    "hoyer_sparsity": "measures",
    "entropy_sparsity": "measures",
    "lifetime_sparsity": "measures",
    "compute_measure": "measures",
    "MEASURES": "measures",
    # the unit-sums kernel behind capture's reduce mode
    "set_kernel": "kernels",
    "use_kernel": "kernels",
    # correlation
    "filter_correlation": "correlation",
    "weight_similarity": "correlation",
    "CorrelationAccumulator": "correlation",
    "correlation_summary": "correlation",
    # capture
    "list_layers": "capture",
    "resolve_layers": "capture",
    "capture": "capture",
    "LayerInfo": "capture",
    "LayerTable": "capture",
    "Capture": "capture",
    # dataset sweep
    "sweep": "sweep",
    "SweepResult": "sweep",
    # run directories and analysis
    "RunDir": "rundir",
    "load_history": "rundir",
    "analyze": "analysis",
    "EarlyWarning": "analysis",
    "Analysis": "analysis",
    # the study of the claims
    "run_study": "study",
    "load_study": "study",
    "score_indicators": "indicators",
    "SparsityMonitor": "monitor",
    # figures and attributions
    "plot_loss_and_sparsity": "figures",
    "plot_sparsity_heatmap": "figures",
    "plot_channel_sparsity": "figures",
    "plot_spatial_maps": "figures",
    "plot_run_spatial_maps": "figures",
    "plot_correlation": "figures",
    "plot_correlation_over_epochs": "figures",
    "plot_regulariser_comparison": "figures",
    "paper_style": "figures",
    "save_figure": "figures",
    "attribute": "attributions",
    "plot_attributions": "attributions",
    # data, models, penalty, trainer, report
    "load_data": "data",
    "DataBundle": "data",
    "make_model": "models",
    "SparsityPenalty": "penalty",
    "auto_targets": "penalty",
    "TrainConfig": "training",
    "train": "training",
    "run_experiment": "training",
    "write_report": "report",
    # widgets
    "LayerExplorer": "widgets",
    "TrainingMonitor": "widgets",
    "EpochScrubber": "widgets",
    "RunComparison": "widgets",
}

__all__ = ["XaiSparsityError", "__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'xai_sparsity' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"xai_sparsity.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from xai_sparsity.analysis import Analysis, EarlyWarning, analyze
    from xai_sparsity.attributions import attribute, plot_attributions
    from xai_sparsity.capture import (
        Capture,
        LayerInfo,
        LayerTable,
        capture,
        list_layers,
        resolve_layers,
    )
    from xai_sparsity.correlation import (
        CorrelationAccumulator,
        correlation_summary,
        filter_correlation,
        weight_similarity,
    )
    from xai_sparsity.data import DataBundle, load_data
    from xai_sparsity.figures import (
        paper_style,
        plot_channel_sparsity,
        plot_correlation,
        plot_correlation_over_epochs,
        plot_loss_and_sparsity,
        plot_regulariser_comparison,
        plot_run_spatial_maps,
        plot_sparsity_heatmap,
        plot_spatial_maps,
        save_figure,
    )
    from xai_sparsity.indicators import score_indicators
    from xai_sparsity.kernels import set_kernel, use_kernel
    from xai_sparsity.measures import (
        MEASURES,
        compute_measure,
        entropy_sparsity,
        hoyer_sparsity,
        lifetime_sparsity,
        perplexity_sparsity,
        zero_fraction,
    )
    from xai_sparsity.models import make_model
    from xai_sparsity.monitor import SparsityMonitor
    from xai_sparsity.penalty import SparsityPenalty, auto_targets
    from xai_sparsity.report import write_report
    from xai_sparsity.rundir import RunDir, load_history
    from xai_sparsity.study import load_study, run_study
    from xai_sparsity.sweep import SweepResult, sweep
    from xai_sparsity.training import TrainConfig, run_experiment, train
    from xai_sparsity.widgets import EpochScrubber, LayerExplorer, RunComparison, TrainingMonitor

# ``capture`` and ``sweep`` name both a submodule and the function it defines. Importing the
# submodule binds the package attribute to the module, so the functions are bound eagerly here
# (after the submodule import) and ``xai_sparsity.capture(...)`` is always the function.
from xai_sparsity.capture import capture  # noqa: E402
from xai_sparsity.sweep import sweep  # noqa: E402
