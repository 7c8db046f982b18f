"""What a person looks at: paper figures, Captum attributions and the notebook widgets."""

from __future__ import annotations

from typing import TYPE_CHECKING

from xai_sparsity.base.lazy import lazy_exports

_EXPORTS = {
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
    "METHODS": "attributions",
    "LayerExplorer": "widgets",
    "TrainingMonitor": "widgets",
    "EpochScrubber": "widgets",
    "RunComparison": "widgets",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from xai_sparsity.views.attributions import (
        METHODS,
        attribute,
        plot_attributions,
    )
    from xai_sparsity.views.figures import (
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
    from xai_sparsity.views.widgets import (
        EpochScrubber,
        LayerExplorer,
        RunComparison,
        TrainingMonitor,
    )
