"""The public surface: exports, the README example, one exception type."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import xai_sparsity as xs

ROOT = Path(__file__).resolve().parents[1]


def test_every_export_resolves_and_functions_win_over_submodules() -> None:
    import xai_sparsity.capture
    import xai_sparsity.sweep  # noqa: F401

    for name in xs.__all__:
        assert getattr(xs, name) is not None, name
    assert callable(xs.capture) and xs.capture.__module__ == "xai_sparsity.capture"
    assert callable(xs.sweep) and xs.sweep.__module__ == "xai_sparsity.sweep"
    assert issubclass(xs.XaiSparsityError, ValueError)


def test_readme_ten_line_example_runs(tmp_path: Path) -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    example = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    assert len([ln for ln in example.splitlines() if ln.strip()]) <= 14
    script = tmp_path / "example.py"
    script.write_text(example + "\nassert s.shape == (8, 8, 8), s.shape\n", encoding="utf-8")
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert "layer1.0.relu#0" in out.stdout or "layer1.0.relu" in out.stdout
    assert "torch.Size([16, 16])" in out.stdout
