"""Structural figures of the package, for the architecture notes and issue closing notes.

Prints: library lines, modules, public names at ``xai_sparsity.*``, the longest functions, imports
of another module's private names, import cycles between modules, and the cold import time of
``import xai_sparsity``.

    .venv/bin/python scripts/code_metrics.py            # human-readable
    .venv/bin/python scripts/code_metrics.py --json     # one JSON object

Reads the source with ``ast`` only (nothing is imported but for the import-time measurement, which
runs in fresh interpreters).
"""

from __future__ import annotations

import argparse
import ast
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "xai_sparsity"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve(current: str, is_package: bool, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    base = current.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join([*base, *([target] if target else [])])


def owner(module: str, modules: set[str]) -> str:
    """The longest known module that ``module`` is or lies in."""
    parts = module.split(".")
    while parts:
        name = ".".join(parts)
        if name in modules:
            return name
        parts.pop()
    return module


def analyse(with_public_names: bool = True) -> dict[str, object]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(f): f for f in files}
    names = set(modules)
    lines = 0
    functions: list[tuple[int, str]] = []
    private_imports: list[str] = []
    edges: dict[str, set[str]] = {m: set() for m in names}
    for name, path in modules.items():
        text = path.read_text()
        lines += len(text.splitlines())
        tree = ast.parse(text)
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                functions.append((length, f"{name}:{node.name}"))
            if isinstance(node, ast.ImportFrom):
                target = resolve(name, is_package, node.level, node.module)
                if not target.startswith("xai_sparsity"):
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    dest = owner(sub if sub in names else target, names)
                    if dest != name:
                        edges[name].add(dest)
                    if (
                        alias.name.startswith("_")
                        and not alias.name.startswith("__")
                        and dest != name
                    ):
                        private_imports.append(f"{name} <- {target}.{alias.name}")
                    elif any(p.startswith("_") for p in dest.split(".")[1:]) and not (
                        name.startswith(dest.rsplit(".", 1)[0] + ".")
                    ):
                        # a private module of another sub-package
                        private_imports.append(f"{name} <- {dest}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("xai_sparsity"):
                        dest = owner(alias.name, names)
                        if dest != name:
                            edges[name].add(dest)
    cycles = strongly_connected(edges)
    public = public_names() if with_public_names else []
    functions.sort(reverse=True)
    return {
        "library_lines": lines,
        "modules": len(modules),
        "public_names": len(public),
        "longest_functions": [f"{n} {where}" for n, where in functions[:8]],
        "functions_over_80_lines": sum(1 for n, _ in functions if n > 80),
        "private_cross_module_imports": sorted(set(private_imports)),
        "import_cycles": [sorted(c) for c in cycles],
    }


def strongly_connected(edges: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm; components of more than one module are import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    sys.setrecursionlimit(10_000)
    for v in edges:
        if v not in index:
            visit(v)
    return found


def public_names() -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", "import xai_sparsity as x; print('\\n'.join(x.__all__))"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return [n for n in out.stdout.split() if n not in ("__version__", "XaiSparsityError")]


def import_time(repeats: int = 5) -> float:
    """Median wall seconds of ``import xai_sparsity`` in a fresh interpreter (torch included)."""
    code = "import time; t=time.perf_counter(); import xai_sparsity; print(time.perf_counter()-t)"
    times = []
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
        )
        times.append(float(out.stdout))
    return statistics.median(times)


def imported_modules() -> list[str]:
    code = (
        "import sys; import xai_sparsity; "
        "print('\\n'.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch','matplotlib','pandas','captum','ipywidgets','xai_sparsity') and m.count('.')<1 "
        "or m.startswith('xai_sparsity'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    return out.stdout.split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--no-timing", action="store_true", help="skip the import-time runs")
    args = parser.parse_args()
    result = analyse()
    if not args.no_timing:
        result["import_seconds_median_of_5"] = round(import_time(), 3)
        result["modules_loaded_by_import"] = imported_modules()
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for key, value in result.items():
        if isinstance(value, list):
            print(f"{key}: {len(value)}")
            for item in value:
                print(f"    {item}")
        else:
            print(f"{key}: {value}")


if __name__ == "__main__":
    main()
