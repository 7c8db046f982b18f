"""The public surface and the package's layout: exports, lazy import, layering, the README example."""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import xai_sparsity as xs

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = (
    "base",
    "measuring",
    "capturing",
    "runs",
    "training",
    "views",
    "integrations",
    "study",
)


def _metrics() -> object:
    spec = importlib.util.spec_from_file_location("code_metrics", ROOT / "scripts/code_metrics.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_export_resolves() -> None:
    for name in xs.__all__:
        assert getattr(xs, name) is not None, name
    assert callable(xs.capture) and xs.capture.__module__ == "xai_sparsity.capturing.hooks"
    assert callable(xs.sweep) and xs.sweep.__module__ == "xai_sparsity.capturing.sweeps"
    assert issubclass(xs.XaiSparsityError, ValueError)
    assert sorted(dir(xs)) == sorted(xs.__all__)


def test_public_surface_is_small() -> None:
    names = [n for n in xs.__all__ if n not in ("XaiSparsityError", "__version__")]
    assert len(names) <= 25, names


@pytest.mark.parametrize("package", SUBPACKAGES)
def test_subpackage_exports_resolve(package: str) -> None:
    module = importlib.import_module(f"xai_sparsity.{package}")
    for name in getattr(module, "__all__", ()):
        assert getattr(module, name) is not None, f"xai_sparsity.{package}.{name}"


def test_every_module_imports() -> None:
    for info in pkgutil.walk_packages(xs.__path__, prefix="xai_sparsity."):
        if info.name.startswith("xai_sparsity.integrations.") and not info.ispkg:
            continue  # optional dependencies (lightning, tensorboard): tested in their own files
        importlib.import_module(info.name)


def test_moved_names_still_resolve_with_a_warning_that_names_the_new_home() -> None:
    with pytest.warns(DeprecationWarning, match=r"from xai_sparsity\.views import plot_sparsity"):
        f = xs.plot_sparsity_heatmap
    from xai_sparsity.views import plot_sparsity_heatmap

    assert f is plot_sparsity_heatmap
    with pytest.raises(AttributeError, match="no_such_name"):
        xs.no_such_name  # noqa: B018


def test_import_is_lazy() -> None:
    code = (
        "import sys, xai_sparsity\n"
        "heavy = [m for m in ('torch', 'matplotlib', 'pandas', 'captum', 'ipywidgets') "
        "if m in sys.modules]\n"
        "mine = sorted(m for m in sys.modules if m.startswith('xai_sparsity'))\n"
        "print(heavy, mine)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    heavy, _, mine = out.stdout.partition("] ")
    assert heavy == "[", out.stdout
    assert "xai_sparsity.measuring" not in mine and "xai_sparsity.capturing" not in mine, mine


def test_no_private_cross_module_imports_and_no_cycles() -> None:
    result = _metrics().analyse(with_public_names=False)  # type: ignore[attr-defined]
    assert result["private_cross_module_imports"] == []
    assert result["import_cycles"] == []


def test_import_layers_hold() -> None:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("lint-imports not installed (pip install import-linter; make lint runs it)")
    out = subprocess.run([exe, "--no-cache"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:]


def test_readme_ten_line_example_runs(tmp_path: Path) -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    example = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    assert len([ln for ln in example.splitlines() if ln.strip()]) <= 14
    script = tmp_path / "example.py"
    script.write_text(example + "\nassert s.shape == (8, 8, 8), s.shape\n", encoding="utf-8")
    with warnings.catch_warnings():
        out = subprocess.run(
            [sys.executable, "-W", "error::DeprecationWarning:__main__", str(script)],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
        )
    assert out.returncode == 0, out.stderr
    assert "layer1.0.relu#0" in out.stdout or "layer1.0.relu" in out.stdout
    assert "torch.Size([16, 16])" in out.stdout
