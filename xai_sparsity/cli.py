"""The ``xai-sparsity`` command line: ``train``, ``compare``, ``analyze`` and ``demo``.

Every subcommand is one function registered with :func:`command`; a new one needs nothing else::

    @command("hello", "Say hello.", arg("--name", default="world"))
    def _hello(args: argparse.Namespace) -> int:
        print(f"hello {args.name}")
        return 0

Settings come from ``--config FILE`` (JSON or TOML, the fields of
:class:`xai_sparsity.training.trainer.TrainConfig`) and ``--set key=value`` overrides (values are read as
JSON when they parse, so ``--set epochs=40 --set widths=[8,8] --set augment=true``; a
comma-separated list also works for list settings). Bad arguments or settings exit with status 2
and a message naming the bad value and the valid choices.

>>> main(["analyze", "--help"]) == 0  # doctest: +ELLIPSIS
usage: xai-sparsity analyze ...
True
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xai_sparsity.base.errors import XaiSparsityError

__all__ = ["COMMANDS", "arg", "build_parser", "command", "main"]

PROG = "xai-sparsity"


@dataclass
class Command:
    """A registered subcommand: its name, help, arguments and the function that runs it."""

    name: str
    help: str
    run: Callable[[argparse.Namespace], int]
    arguments: list[tuple[tuple[str, ...], dict[str, Any]]] = field(default_factory=list)
    description: str = ""


COMMANDS: dict[str, Command] = {}


def arg(*flags: str, **kwargs: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    """An argument of a subcommand, as ``parser.add_argument(*flags, **kwargs)`` takes it."""
    return flags, kwargs


def command(
    name: str, help: str, *arguments: tuple[tuple[str, ...], dict[str, Any]]
) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """Register ``func(args) -> exit status`` as the subcommand ``name``."""

    def register(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        if name in COMMANDS:
            raise XaiSparsityError(f"subcommand {name!r} is registered twice")
        COMMANDS[name] = Command(name, help, func, list(arguments), (func.__doc__ or "").strip())
        return func

    return register


CONFIG_ARGS = (
    arg("--config", metavar="FILE", help="settings file (.json or .toml; TrainConfig fields)"),
    arg(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting (repeatable), e.g. --set epochs=40 --set lr=0.02",
    ),
)


# ----------------------------------------------------------------------------------------------
# Settings


def parse_value(text: str) -> Any:
    """A ``--set`` value: JSON when it parses (numbers, true/false, null, lists), else text.

    >>> parse_value("0.3"), parse_value("true"), parse_value("[8, 8]"), parse_value("sgd")
    (0.3, True, [8, 8], 'sgd')
    >>> parse_value("16,16,32"), parse_value("none")
    ([16, 16, 32], None)
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if "," in text:
        return [parse_value(p.strip()) for p in text.split(",") if p.strip()]
    return text


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["key=value", ...]`` -> dict, with a clear error for a malformed item."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise XaiSparsityError(
                f"--set {item!r} must look like KEY=VALUE (e.g. --set epochs=40)"
            )
        out[key.strip()] = parse_value(value)
    return out


def load_settings(args: argparse.Namespace, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Settings from ``base``, then ``--config FILE``, then ``--set`` overrides (in that order)."""
    from xai_sparsity.training.trainer import read_config_file

    settings: dict[str, Any] = dict(base or {})
    if getattr(args, "config", None):
        settings.update(read_config_file(args.config))
    settings.update(parse_overrides(getattr(args, "overrides", []) or []))
    return settings


def _split_arms(text: str | Sequence[str]) -> list[str]:
    if isinstance(text, str):
        return [a.strip() for a in text.split(",") if a.strip()]
    return [a.strip() for a in text]


# ----------------------------------------------------------------------------------------------
# Subcommands


@command(
    "train",
    "Train one run and write its run directory.",
    arg("--out", required=True, metavar="DIR", help="the run directory"),
    *CONFIG_ARGS,
    arg(
        "--arm", metavar="ARM", help="apply an arm: baseline, penalty@0.3, dropout, batchnorm, ..."
    ),
    arg("--overwrite", action="store_true", help="replace a different run already in DIR"),
    arg("--quiet", action="store_true", help="no progress bar"),
)
def _train(args: argparse.Namespace) -> int:
    """Train one model; a killed run resumes when the same command is run again."""
    from xai_sparsity.training.trainer import TrainConfig, arm_config, train

    cfg = TrainConfig.from_dict(load_settings(args))
    if args.arm:
        cfg = arm_config(cfg, args.arm)
    run = train(cfg, args.out, progress=not args.quiet, overwrite=args.overwrite)
    print(_analysis_text(run))
    print(run.path)
    return 0


@command(
    "compare",
    "Train several arms with the same seed, data order and schedule, and write a report.",
    arg("--out", required=True, metavar="DIR", help="experiment folder (one run dir per arm)"),
    arg(
        "--arms",
        default="baseline,penalty,dropout,batchnorm",
        help="comma-separated arms, e.g. baseline,penalty@0.1,penalty@1,dropout,batchnorm,"
        "penalty+batchnorm (default: %(default)s)",
    ),
    *CONFIG_ARGS,
    arg("--no-figures", action="store_true", help="write the report without figures"),
    arg("--quiet", action="store_true", help="no progress bars"),
)
def _compare(args: argparse.Namespace) -> int:
    """Run an experiment of arms and write report.md beside their run directories."""
    from xai_sparsity.study.report import write_report
    from xai_sparsity.training.trainer import TrainConfig, run_experiment

    settings = load_settings(args)
    arms = _split_arms(settings.pop("arms", args.arms))
    cfg = TrainConfig.from_dict(settings)
    t0 = time.perf_counter()
    runs = run_experiment(cfg, arms, Path(args.out) / "runs", progress=not args.quiet)
    wall = time.perf_counter() - t0
    path = write_report(
        runs,
        args.out,
        intro=_settings_intro(cfg, arms, wall),
        figures=not args.no_figures,
    )
    print(path)
    return 0


@command(
    "analyze",
    "Overfitting onset t_L, sparsity onsets t_s and the lead per layer of a run directory.",
    arg("run_dir", metavar="RUN_DIR", help="a run directory (with history.csv)"),
    arg("--layers", help="comma-separated layers (default: every measured layer)"),
    arg("--measure", default="sparsity", help="history column prefix (default: %(default)s)"),
    arg(
        "--rule",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting of the rule (rule=gated_rise|ema_rise, alpha, patience, "
        "min_rise, min_rel_rise, warmup, min_layers, min_train_acc, gate_window, gate_tol)",
    ),
    arg("--json", action="store_true", help="print JSON instead of text"),
)
def _analyze(args: argparse.Namespace) -> int:
    """Analyse any run directory (from the trainer, the monitor or your own history.csv)."""
    from xai_sparsity.runs.analysis import analyze
    from xai_sparsity.runs.rundir import RunDir

    run = RunDir(args.run_dir)
    layers = _split_arms(args.layers) if args.layers else None
    result = analyze(run, layers, measure=args.measure, **parse_overrides(args.rule))
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        print(result)
    return 0


@command(
    "demo",
    "The main job: train baseline, penalty, dropout and batch-norm arms on the embedded MNIST "
    "digits until the baseline overfits, and write a report.",
    arg("--out", required=True, metavar="DIR", help="output folder (report.md, figures, runs)"),
    arg("--seed", type=int, default=0, help="seed of data split, init and order (default: 0)"),
    arg("--quick", action="store_true", help="a tiny setting that runs in seconds (for tests)"),
    arg("--epochs", type=int, help="override the number of epochs"),
    arg("--arms", help="comma-separated arms (default: baseline,penalty,dropout,batchnorm)"),
    *CONFIG_ARGS,
    arg("--quiet", action="store_true", help="no progress bars"),
)
def _demo(args: argparse.Namespace) -> int:
    """Train the demo experiment and print the path of its report."""
    from xai_sparsity.study.report import DEMO_ARMS, demo_config, run_demo

    if args.epochs is not None and args.epochs < 1:
        raise XaiSparsityError(f"--epochs {args.epochs} must be a positive integer")
    cfg = demo_config(seed=args.seed, quick=args.quick)
    changes = load_settings(args)
    if args.epochs is not None:
        changes["epochs"] = args.epochs
    if changes:
        cfg = cfg.replace(**changes)
    arms = _split_arms(args.arms) if args.arms else list(DEMO_ARMS)
    path = run_demo(args.out, config=cfg, arms=arms, progress=not args.quiet)
    print(path)
    return 0


@command(
    "study",
    "Run a study of the papers' claims (a TOML grid of settings x seeds, e.g. "
    "studies/claims.toml) in parallel worker processes; finished runs are skipped, interrupted "
    "ones resume; writes DIR/summary.csv.",
    arg("config", metavar="CONFIG", help="study config (TOML)"),
    arg("--out", required=True, metavar="DIR", help="study folder (run directories + summary)"),
    arg("--workers", type=int, help="worker processes (default: min(cores, runs); 1 on a GPU)"),
    arg("--limit", type=int, metavar="K", help="run only the first K runs"),
    arg("--only", nargs="*", metavar="ID", help="run only these run ids or groups"),
    arg("--device", help="device for every run (cpu, cuda)"),
    arg("--dry-run", action="store_true", help="list the runs and exit"),
    arg(
        "--summary-only",
        action="store_true",
        help="rebuild DIR/summary.csv from the complete runs with this version; train nothing",
    ),
    arg("--quiet", action="store_true", help="no progress bar"),
)
def _study(args: argparse.Namespace) -> int:
    """Run (or finish) a study and print where its summary is."""
    from xai_sparsity.study.runner import study_command

    return study_command(args)


@command(
    "study-report",
    "Regenerate the results section of docs/science.md (tables, figures, verdicts) from a study "
    "summary CSV.",
    arg("summary", metavar="SUMMARY", help="summary.csv (or the study folder)"),
    arg("--doc", default="docs/science.md", help="markdown file to update"),
    arg("--figures", default="docs/study", metavar="DIR", help="folder for the figures"),
    arg("--figure-prefix", default="study/", help="figure path prefix inside the doc"),
    arg("--runs", metavar="DIR", help="study folder with the run directories (example figures)"),
    arg(
        "--check",
        action="store_true",
        help="write nothing; exit 1 with a diff when the doc differs from what SUMMARY generates",
    ),
)
def _study_report(args: argparse.Namespace) -> int:
    """Write the generated part of the doc and its figures."""
    from xai_sparsity.study.runner import report_command

    return report_command(args)


def _analysis_text(run: Any) -> str:
    summary = run.summary
    a = summary.get("analysis", {})
    if "error" in a or not a:
        return f"analysis: {a.get('error', 'not available')}"
    accuracy = (
        f"best test acc {summary.get('best_test_acc', float('nan')):.4f}, final "
        f"{summary.get('final_test_acc', float('nan')):.4f}; test loss minimum at epoch "
        f"{a['t_L']}"
    )
    if not a["turned"]:  # no lead for a run that did not turn (also in older summaries)
        return (
            f"{accuracy} (rise {a['rise']:+.1%}): the test loss did not turn, so there is no lead"
        )
    leads = ", ".join(f"{k}: {v}" for k, v in (a.get("lead") or {}).items())
    return f"{accuracy} (turned, rise {a['rise']:+.1%}); lead per layer: {leads}"


def _settings_intro(cfg: Any, arms: Sequence[str], wall: float) -> str:
    from xai_sparsity.study.report import settings_intro

    return settings_intro(cfg, arms, wall)


# ----------------------------------------------------------------------------------------------
# Entry point


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Perplexity-based activation sparsity in CNNs: train, compare arms, analyse "
        "the overfitting lead, and run the demo.",
    )
    from xai_sparsity.base import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description or cmd.help)
        for flags, kwargs in cmd.arguments:
            p.add_argument(*flags, **kwargs)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 bad arguments or settings)."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:  # --help (0) and argparse errors (2)
        return int(exc.code) if isinstance(exc.code, int) else 2
    if getattr(args, "_run", None) is None:
        parser.print_help(sys.stderr)
        print(f"\n{PROG}: error: choose a command: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        return int(args._run(args))
    except XaiSparsityError as err:
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted (a run resumes when the command is repeated)", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
