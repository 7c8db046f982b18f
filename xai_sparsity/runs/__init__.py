"""Run directories (the on-disk format every other layer reads and writes) and their analysis:
the test-loss turn, sustained sparsity rises and the early-warning rule.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from xai_sparsity.base.lazy import lazy_exports

_EXPORTS = {
    "RunDir": "rundir",
    "load_history": "rundir",
    "analyze": "analysis",
    "Analysis": "analysis",
    "EarlyWarning": "analysis",
    "RiseDetector": "analysis",
    "overfitting_onset": "analysis",
    "sustained_rise_onset": "analysis",
    "DEFAULT_RULE": "analysis",
    "label_run": "analysis",
    "gated_rise_epoch": "analysis",
    "gated_rise_score": "analysis",
    "levelled_off_epoch": "analysis",
    "LevelOffGate": "analysis",
    "replay_warning": "analysis",
    "RULES": "analysis",
    "analysis_lines": "analysis",
    "RunLabel": "analysis",
    "LABEL_SETTINGS": "analysis",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from xai_sparsity.runs.analysis import (
        DEFAULT_RULE,
        LABEL_SETTINGS,
        RULES,
        Analysis,
        EarlyWarning,
        LevelOffGate,
        RiseDetector,
        RunLabel,
        analysis_lines,
        analyze,
        gated_rise_epoch,
        gated_rise_score,
        label_run,
        levelled_off_epoch,
        overfitting_onset,
        replay_warning,
        sustained_rise_onset,
    )
    from xai_sparsity.runs.rundir import (
        RunDir,
        load_history,
    )
