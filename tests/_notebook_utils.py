"""Helpers shared by the notebook and browser tests: the notebooks and their fast parameters."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
ARTIFACTS = ROOT / "test-artifacts"

NOTEBOOK_NAMES = tuple(sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
"""Every notebook in notebooks/ (each is executed by tests/test_notebooks.py)."""

FAST: dict[str, Any] = {"FAST": True}
"""The parameters injected by the tests: every notebook derives its small sizes from FAST."""


def parameterized(name: str, dest: Path, parameters: dict[str, Any] | None = None) -> Path:
    """Write notebook ``name`` to ``dest`` with ``parameters`` (default: :data:`FAST`) injected
    after its "parameters" cell, without executing it (papermill ``prepare_only``)."""
    import nbformat
    import papermill

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{name} needs exactly one cell tagged 'parameters'"
    papermill.execute_notebook(
        str(NOTEBOOKS / name),
        str(dest),
        parameters=dict(FAST if parameters is None else parameters),
        prepare_only=True,
        kernel_name="python3",
        progress_bar=False,
    )
    return dest


def kernel_python_ok() -> bool:
    """The 'python3' kernelspec runs this interpreter (jupyter_client maps 'python' to it)."""
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec("python3")
    return spec.argv[0] in ("python", "python3", sys.executable)
