"""Data, models, the sparsity penalty, the trainer and the monitor for a user's own loop."""

from __future__ import annotations

from typing import TYPE_CHECKING

from xai_sparsity.base.lazy import lazy_exports

_EXPORTS = {
    "load_data": "data",
    "DataBundle": "data",
    "DATASETS": "data",
    "make_model": "models",
    "MODELS": "models",
    "SparsityPenalty": "penalty",
    "auto_targets": "penalty",
    "TrainConfig": "trainer",
    "train": "trainer",
    "run_experiment": "trainer",
    "arm_config": "trainer",
    "SparsityMonitor": "monitor",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from xai_sparsity.training.data import (
        DATASETS,
        DataBundle,
        load_data,
    )
    from xai_sparsity.training.models import (
        MODELS,
        make_model,
    )
    from xai_sparsity.training.monitor import (
        SparsityMonitor,
    )
    from xai_sparsity.training.penalty import (
        SparsityPenalty,
        auto_targets,
    )
    from xai_sparsity.training.trainer import (
        TrainConfig,
        arm_config,
        run_experiment,
        train,
    )
