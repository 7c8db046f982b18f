"""Lazy re-exports for package ``__init__`` modules: a name is imported on first use.

``import xai_sparsity`` (and each sub-package) therefore costs only what it names, not torch,
matplotlib or Captum, until a function is actually used.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str,
    exports: Mapping[str, str],
    namespace: dict[str, Any],
    moved: Mapping[str, str] | None = None,
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``.

    ``exports`` maps a public name to the module (relative to ``package``) that defines it.
    ``moved`` maps former public names to their new ``module:name`` home; using one still works
    but warns (``DeprecationWarning``) and names the new import.
    """
    moved = moved or {}

    def getattr_(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
            namespace[name] = value
            return value
        if name in moved:
            module, _, attr = moved[name].partition(":")
            warnings.warn(
                f"{package}.{name} moved: use `from {module} import {attr or name}`",
                DeprecationWarning,
                stacklevel=2,
            )
            return getattr(importlib.import_module(module), attr or name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def dir_() -> list[str]:
        return sorted(namespace.get("__all__", exports))

    return getattr_, dir_
