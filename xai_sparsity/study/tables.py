"""Markdown tables and cell formatting for the study and demo reports.

>>> print(markdown_table(["arm", "acc"], [["baseline", "0.93"]]))
| arm | acc |
|---|---|
| baseline | 0.93 |
>>> print(frame_table(pd.DataFrame({"arm": ["penalty"], "acc": [0.9312], "turned": [True]})))
| arm | acc | turned |
|---|---|---|
| penalty | 0.931 | yes |
<BLANKLINE>
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["fmt", "frame_table", "markdown_table"]


def fmt(v: Any, digits: int = 3) -> str:
    """One table cell: "–" for None/NaN, yes/no for booleans, ints as is, floats to ``digits``."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.{digits}f}"
    return str(v)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table of already formatted cells."""
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def frame_table(df: pd.DataFrame, digits: int = 3) -> str:
    """A Markdown table of ``df``, cells through :func:`fmt`, ending in a newline."""
    if df.empty:
        return "(no rows)\n"
    cols = list(df.columns)
    rows = [[fmt(row[c], digits) for c in cols] for _, row in df.iterrows()]
    return markdown_table(cols, rows) + "\n"
