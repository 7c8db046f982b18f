"""Keep a long study's finished runs in the repository, so that it can continue on another machine.

A study folder holds checkpoints and per-epoch arrays (megabytes per run); the repository keeps
only what the report and a resumed study need of each COMPLETE run: ``config.json``,
``history.csv``, ``summary.json`` and the last ``arrays/epoch_NNNN.npz`` (its spatial maps tell
which layers are conv activations, for automatic penalty targets). ``xai-sparsity study`` skips
a run whose ``summary.json`` exists, so a restored run is not trained again.

    .venv/bin/python scripts/study_archive.py save runs/claims_v2 docs/study/v2
    .venv/bin/xai-sparsity study studies/claims_v2.toml --out docs/study/v2 --summary-only
    .venv/bin/python scripts/study_archive.py restore docs/study/v2 runs/claims_v2

The archive is laid out as a study folder (one folder per run id and ``study.json``), so the
second line rebuilds its ``summary.csv`` with the current version and ``xai-sparsity
study-report docs/study/v2/summary.csv --runs docs/study/v2`` reads it. Files are written
atomically; ``restore`` never overwrites a run folder that already has a ``summary.json``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from xai_sparsity.base.files import atomic_write_bytes

KEEP = ("config.json", "history.csv", "summary.json")


def _copy(src: Path, dst: Path) -> None:
    atomic_write_bytes(dst, src.read_bytes())


def save(study: Path, archive: Path) -> int:
    """Copy the kept files of every complete run of ``study`` into ``archive``; returns the count."""
    count = 0
    for run in sorted(p for p in study.iterdir() if (p / "summary.json").exists()):
        target = archive / run.name
        if (target / "summary.json").exists() and (target / "summary.json").read_bytes() == (
            run / "summary.json"
        ).read_bytes():
            continue
        for name in KEEP:
            _copy(run / name, target / name)
        arrays = sorted((run / "arrays").glob("epoch_*.npz"))
        if arrays:
            _copy(arrays[-1], target / "arrays" / arrays[-1].name)
        count += 1
    if (study / "study.json").exists():
        _copy(study / "study.json", archive / "study.json")
    return count


def restore(archive: Path, study: Path) -> int:
    """Copy archived runs into ``study`` where they are not complete yet; returns the count."""
    count = 0
    for run in sorted(p for p in archive.iterdir() if (p / "summary.json").exists()):
        target = study / run.name
        if (target / "summary.json").exists():
            continue
        if target.exists():
            shutil.rmtree(target)  # an interrupted attempt: the archived complete run replaces it
        for src in sorted(run.rglob("*")):
            if src.is_file():
                _copy(src, target / src.relative_to(run))
        count += 1
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("save", "restore"))
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    args = parser.parse_args(argv)
    if not args.source.is_dir():
        print(f"{args.source} is not a folder", file=sys.stderr)
        return 2
    n = (
        save(args.source, args.target)
        if args.action == "save"
        else restore(args.source, args.target)
    )
    print(f"{args.action}: {n} run(s) from {args.source} to {args.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
