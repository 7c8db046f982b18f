"""The one exception type of xai_sparsity and small helpers that build its messages."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any


class XaiSparsityError(ValueError):
    """Raised for every bad input xai_sparsity detects.

    Messages repeat the offending value and list the valid choices.
    """


def _fmt_choices(choices: Iterable[Any]) -> str:
    return ", ".join(repr(c) for c in choices)


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``choices``; otherwise raise a clear error.

    >>> check_choice("scope", "layer", ("layer", "channel"))
    'layer'
    """
    options = tuple(choices)
    if value not in options:
        hint = ""
        if isinstance(value, str):
            close = difflib.get_close_matches(value, [str(c) for c in options], n=3)
            if close:
                hint = f" Did you mean {_fmt_choices(close)}?"
        raise XaiSparsityError(f"{name}={value!r} is not one of {_fmt_choices(options)}.{hint}")
    return value


def closest(word: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """The candidates closest to ``word`` (difflib ratio), best first."""
    return difflib.get_close_matches(word, list(candidates), n=n, cutoff=0.3)
