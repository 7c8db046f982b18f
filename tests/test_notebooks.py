"""Every notebook runs top to bottom with the fast parameters injected (papermill), in a
temporary folder, on the venv's own Python kernel."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from _notebook_utils import NOTEBOOK_NAMES, NOTEBOOKS, kernel_python_ok, parameterized

papermill = pytest.importorskip("papermill")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")


def test_every_notebook_is_committed_clean() -> None:
    expected = {"01_explore_layers", "02_overfitting_dynamics", "03_penalised_vs_baseline"}
    assert expected | {"04_paper_figures"} <= {Path(n).stem for n in NOTEBOOK_NAMES}
    for name in NOTEBOOK_NAMES:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(nb)
        assert nb.metadata["kernelspec"]["name"] == "python3"
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{name} has outputs"
        params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(params) == 1 and "FAST = False" in params[0].source, name


@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
def test_notebook_runs_in_the_fast_setting(name: str, tmp_path: Path) -> None:
    assert kernel_python_ok(), "the 'python3' kernelspec does not run this interpreter"
    source = parameterized(name, tmp_path / name)
    env_backup = os.environ.get("MPLBACKEND")
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    start = time.monotonic()
    try:
        papermill.execute_notebook(
            str(source),
            str(tmp_path / f"out_{name}"),
            kernel_name="python3",
            cwd=str(tmp_path),
            progress_bar=False,
            execution_timeout=600,
        )
    finally:
        if env_backup is None:
            os.environ.pop("MPLBACKEND", None)
        else:
            os.environ["MPLBACKEND"] = env_backup
    elapsed = time.monotonic() - start
    out = nbformat.read(tmp_path / f"out_{name}", as_version=4)
    errors = [
        o for c in out.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"
    ]
    assert not errors
    # the injected fast setting was used
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in out.cells)
    print(f"{name}: {elapsed:.1f} s")
