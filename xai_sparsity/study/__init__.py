"""The study of the papers' claims (many runs, indicators scored against the test-loss turn)
and the demo report.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from xai_sparsity.base.lazy import lazy_exports

_EXPORTS = {
    "run_study": "runner",
    "load_study": "runner",
    "score_indicators": "indicators",
    "INDICATORS": "indicators",
    "write_report": "report",
    "run_demo": "report",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from xai_sparsity.study.indicators import (
        INDICATORS,
        score_indicators,
    )
    from xai_sparsity.study.report import (
        run_demo,
        write_report,
    )
    from xai_sparsity.study.runner import (
        load_study,
        run_study,
    )
