"""Forward hooks on a model's layers: discovery (``list_layers``), the one hook engine
(``capture``, keep or reduce mode) and dataset sweeps built on it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from xai_sparsity.base.lazy import lazy_exports

_EXPORTS = {
    "capture": "hooks",
    "Capture": "hooks",
    "list_layers": "hooks",
    "resolve_layers": "hooks",
    "LayerInfo": "hooks",
    "LayerTable": "hooks",
    "layer_kind": "hooks",
    "sweep": "sweeps",
    "SweepResult": "sweeps",
    "RunningStats": "sweeps",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from xai_sparsity.capturing.hooks import (
        Capture,
        LayerInfo,
        LayerTable,
        capture,
        layer_kind,
        list_layers,
        resolve_layers,
    )
    from xai_sparsity.capturing.sweeps import (
        RunningStats,
        SweepResult,
        sweep,
    )
