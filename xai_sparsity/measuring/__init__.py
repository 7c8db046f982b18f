"""Measures of activation sparsity and filter correlation: pure tensor functions (no hooks,
no models). ``measures`` is the plain, differentiable reference; ``engine`` computes the same
measures from one pass of sums for capture, sweeps and monitors; ``correlation`` the streaming
Pearson matrices.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from xai_sparsity.base.lazy import lazy_exports

_EXPORTS = {
    "perplexity_sparsity": "measures",
    "entropy_sparsity": "measures",
    "hoyer_sparsity": "measures",
    "zero_fraction": "measures",
    "lifetime_sparsity": "measures",
    "compute_measure": "measures",
    "MEASURES": "measures",
    "SCOPES": "measures",
    "VARIANTS": "measures",
    "TRANSFORMS": "measures",
    "set_kernel": "engine",
    "use_kernel": "engine",
    "unit_sums": "engine",
    "layer_stats": "engine",
    "measure": "engine",
    "filter_correlation": "correlation",
    "weight_similarity": "correlation",
    "CorrelationAccumulator": "correlation",
    "correlation_summary": "correlation",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from xai_sparsity.measuring.correlation import (
        CorrelationAccumulator,
        correlation_summary,
        filter_correlation,
        weight_similarity,
    )
    from xai_sparsity.measuring.engine import (
        layer_stats,
        measure,
        set_kernel,
        unit_sums,
        use_kernel,
    )
    from xai_sparsity.measuring.measures import (
        MEASURES,
        SCOPES,
        TRANSFORMS,
        VARIANTS,
        compute_measure,
        entropy_sparsity,
        hoyer_sparsity,
        lifetime_sparsity,
        perplexity_sparsity,
        zero_fraction,
    )
