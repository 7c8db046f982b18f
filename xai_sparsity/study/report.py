"""A Markdown report comparing the arms of an experiment: tables, figures and plain verdicts.

:func:`write_report` writes ``report.md`` and its figures (``figures/*.png``) for a set of run
directories (e.g. the result of :func:`xai_sparsity.training.trainer.run_experiment`):

- a table per arm: best and final test accuracy, lowest and final test loss, t_L (epoch of the
  smoothed test-loss minimum), whether the test loss turned and by how much, the epoch the
  label-free early warning fired;
- the sparsity lead per layer and arm (t_s and lead = t_L - t_s);
- probe-set sparsity per layer and arm at the last epoch, and the verdicts the project checks
  (did the baseline overfit; is the penalised arm's conv-layer sparsity below the baseline's;
  which arm reached the best test accuracy);
- figures from :mod:`xai_sparsity.views.figures`: loss curves with per-layer sparsity (figure 1) and
  the layer x epoch heatmap (figure 2) per arm, and the regulariser comparison (figure 6).

The tables are GitHub-flavoured Markdown from :mod:`xai_sparsity.study.tables` (``markdown_table``
is also importable from here).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from xai_sparsity.base.errors import XaiSparsityError
from xai_sparsity.base.files import atomic_write_text
from xai_sparsity.runs.analysis import DEFAULT_RULE
from xai_sparsity.runs.rundir import RunDir, as_run
from xai_sparsity.study.tables import fmt, markdown_table

if TYPE_CHECKING:
    from xai_sparsity.training.trainer import TrainConfig

__all__ = [
    "DEMO_ARMS",
    "arm_table",
    "demo_config",
    "lead_table",
    "markdown_table",
    "run_demo",
    "sparsity_table",
    "write_report",
]

DEMO_ARMS = ("baseline", "penalty", "dropout", "batchnorm")
"""The arms of the demo: no regulariser, the sparsity penalty, dropout, batch norm."""

RunLike = RunDir | str | os.PathLike[str]


def _runs(runs: Mapping[str, RunLike]) -> dict[str, RunDir]:
    if not runs:
        raise XaiSparsityError("a report needs at least one run")
    return {name: as_run(r) for name, r in runs.items()}


def _analysis(run: RunDir) -> dict[str, Any]:
    from xai_sparsity.runs.analysis import analyze

    try:
        return analyze(run).to_dict()
    except XaiSparsityError as err:
        return {"error": str(err)}


def _label(history: pd.DataFrame) -> str:
    from xai_sparsity.runs.analysis import label_run

    try:
        return label_run(history).label
    except XaiSparsityError:
        return "undetermined"


def arm_table(runs: Mapping[str, RunLike]) -> pd.DataFrame:
    """One row per arm: accuracies, losses, t_L, turned, rise, the run label, the warning epoch
    and its lead (None where the test loss did not turn), settings."""
    rows = []
    for name, run in _runs(runs).items():
        df = run.history()
        if df.empty:
            raise XaiSparsityError(f"run {name!r} ({run.path}) has no history")
        a = _analysis(run)
        i_acc = int(df["test_acc"].to_numpy().argmax())
        i_loss = int(df["test_loss"].to_numpy().argmin())
        cfg = run.config
        rows.append(
            {
                "arm": name,
                "best_test_acc": float(df["test_acc"].iloc[i_acc]),
                "best_acc_epoch": int(df["epoch"].iloc[i_acc]),
                "final_test_acc": float(df["test_acc"].iloc[-1]),
                "min_test_loss": float(df["test_loss"].iloc[i_loss]),
                "min_loss_epoch": int(df["epoch"].iloc[i_loss]),
                "final_test_loss": float(df["test_loss"].iloc[-1]),
                "final_train_loss": float(df["train_loss"].iloc[-1]),
                "t_L": a.get("t_L"),
                "turned": a.get("turned"),
                "rise": a.get("rise"),
                "warning_epoch": a.get("warning_epoch"),
                "warning_lead": a.get("warning_lead") if a.get("turned") else None,
                "warning_text": a.get("warning_text") or "",
                "label": _label(df),
                "epochs": int(df["epoch"].iloc[-1]),
                "penalty_lambda": cfg.get("penalty_lambda", 0.0),
                "penalty_layers": ", ".join(cfg.get("penalty_layers_resolved", []) or []),
                "dropout": cfg.get("dropout"),
                "batch_norm": cfg.get("batch_norm"),
                "seconds": run.summary.get("seconds_training"),
            }
        )
    return pd.DataFrame(rows)


def lead_table(runs: Mapping[str, RunLike]) -> pd.DataFrame:
    """One row per (arm, layer): t_L, turned, t_s and lead = t_L - t_s (None where undefined,
    and for every layer of an arm whose test loss did not turn)."""
    rows = []
    for name, run in _runs(runs).items():
        a = _analysis(run)
        for layer in run.layers:
            rows.append(
                {
                    "arm": name,
                    "layer": layer,
                    "t_L": a.get("t_L"),
                    "turned": bool(a.get("turned")),
                    "t_s": (a.get("t_s") or {}).get(layer),
                    "lead": (a.get("lead") or {}).get(layer) if a.get("turned") else None,
                }
            )
    return pd.DataFrame(rows)


def conv_layers(run: RunLike) -> list[str]:
    """Measured layers with spatial maps (the activations after convolutions)."""
    run = as_run(run)
    epochs = run.array_epochs()
    if not epochs:
        return []
    arrays = run.load_arrays(epochs[-1])
    return [n for n in run.layers if f"spatial:{n}" in arrays or f"channel:{n}" in arrays]


def sparsity_table(runs: Mapping[str, RunLike], *, epoch: int | None = None) -> pd.DataFrame:
    """Probe-set sparsity (``sparsity:<layer>``), rows = layers, columns = arms.

    ``epoch``: the epoch to read (default: each run's last epoch).
    """
    data: dict[str, dict[str, float]] = {}
    order: list[str] = []
    for name, run in _runs(runs).items():
        df = run.history()
        row = df.iloc[-1] if epoch is None else df[df["epoch"] == epoch].iloc[0]
        data[name] = {}
        for layer in run.layers:
            data[name][layer] = float(row[f"sparsity:{layer}"])
            if layer not in order:
                order.append(layer)
    return pd.DataFrame(data, index=pd.Index(order, name="layer"))


def _figures(runs: dict[str, RunDir], folder: Path) -> dict[str, list[tuple[str, str]]]:
    """Draw the figures; returns arm -> [(caption, relative path)] ("" key: comparison)."""
    try:
        from xai_sparsity.views import figures as figures
    except ImportError as err:  # pragma: no cover - matplotlib is a dependency
        raise XaiSparsityError(f"the report's figures need matplotlib: {err}") from err
    needed = ("plot_loss_and_sparsity", "plot_sparsity_heatmap", "save_figure")
    missing = [n for n in needed if not hasattr(figures, n)]
    if missing:
        raise XaiSparsityError(
            f"xai_sparsity.views.figures lacks {missing}; cannot draw the report"
        )
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, list[tuple[str, str]]] = {}

    def save(fig: Any, stem: str) -> str:
        paths = figures.save_figure(fig, folder / stem, formats=("png",))
        plt.close(fig)
        return f"{folder.name}/{paths[0].name}"

    for name, run in runs.items():
        safe = name.replace("@", "_").replace("+", "_")
        items = []
        fig = figures.plot_loss_and_sparsity(run, accuracy=True)
        items.append(("Loss, accuracy and per-layer sparsity", save(fig, f"{safe}_curves")))
        fig = figures.plot_sparsity_heatmap(run)
        items.append(("Layer x epoch sparsity", save(fig, f"{safe}_heatmap")))
        out[name] = items
    if len(runs) > 1 and hasattr(figures, "plot_regulariser_comparison"):
        fig = figures.plot_regulariser_comparison(runs)
        out[""] = [("Regulariser comparison", save(fig, "comparison"))]
    return out


def _verdicts(arms: pd.DataFrame, sparsity: pd.DataFrame, convs: list[str]) -> list[str]:
    lines = []
    by = arms.set_index("arm")
    if "baseline" in by.index:
        b = by.loc["baseline"]
        if b["turned"]:
            lines.append(
                f"- The baseline overfits: its smoothed test loss reached its minimum at epoch "
                f"{b['t_L']} and then rose by {b['rise']:.1%} (raw test loss "
                f"{b['min_test_loss']:.3f} at epoch {b['min_loss_epoch']} -> "
                f"{b['final_test_loss']:.3f} at epoch {b['epochs']})."
            )
        else:
            lines.append(
                f"- The baseline's test loss did NOT turn within {b['epochs']} epochs (rise "
                f"{fmt(b['rise'])}); train longer to see overfitting."
            )
    lines += [_warning_verdict(arm, by.loc[arm]) for arm in by.index]
    penalised = [a for a in by.index if a != "baseline" and by.loc[a, "penalty_lambda"]]
    if "baseline" in sparsity.columns and penalised and convs:
        for arm in penalised:
            lower = [c for c in convs if sparsity.loc[c, arm] < sparsity.loc[c, "baseline"]]
            mean_b = float(sparsity.loc[convs, "baseline"].mean())
            mean_p = float(sparsity.loc[convs, arm].mean())
            lines.append(
                f"- Arm `{arm}`: conv-layer sparsity at the last epoch is lower than the "
                f"baseline's in {len(lower)} of {len(convs)} conv layers (mean {mean_p:.3f} vs "
                f"{mean_b:.3f})."
            )
    best = by["best_test_acc"].idxmax()
    ranking = ", ".join(
        f"{a} {by.loc[a, 'best_test_acc']:.4f}"
        for a in by.sort_values("best_test_acc", ascending=False).index
    )
    lines.append(f"- Best test accuracy (one seed): `{best}`. Ranking: {ranking}.")
    final = ", ".join(
        f"{a} {by.loc[a, 'final_test_acc']:.4f}"
        for a in by.sort_values("final_test_acc", ascending=False).index
    )
    lines.append(f"- Final test accuracy: {final}.")
    return lines


def _warning_verdict(arm: str, r: pd.Series) -> str:
    """One verdict line on the early warning of an arm: what it measured, and its lead only
    where the test loss turned."""
    fired = r["warning_epoch"] is not None and not pd.isna(r["warning_epoch"])
    what = f": {r['warning_text']}" if fired and r["warning_text"] else ""
    if not r["turned"]:
        if fired:
            return (
                f"- Arm `{arm}`: the early warning fired at epoch {int(r['warning_epoch'])}{what}; "
                f"the test loss did not turn, so there is no lead (a false alarm here)."
            )
        return f"- Arm `{arm}`: the early warning stayed silent; the test loss did not turn."
    if fired:
        lead = int(r["warning_lead"])
        when = f"{lead} epochs before" if lead > 0 else f"{-lead} epochs after"
        if lead == 0:
            when = "at"
        return (
            f"- Arm `{arm}`: the early warning fired at epoch {int(r['warning_epoch'])}{what}; "
            f"that is {when} the test-loss minimum (t_L = {r['t_L']}, lead {lead})."
        )
    return (
        f"- Arm `{arm}`: the test loss turned (t_L = {r['t_L']}) but the early warning stayed "
        f"silent (a miss)."
    )


def write_report(
    runs: Mapping[str, RunLike],
    out: str | os.PathLike[str],
    *,
    title: str = "xai_sparsity: sparsity and overfitting",
    intro: str = "",
    figures: bool = True,
) -> Path:
    """Write ``out/report.md`` (and ``out/figures/*.png``) comparing ``runs``; return its path.

    Args:
        runs: arm name -> run directory (e.g. from ``run_experiment``).
        out: the folder of the report.
        title: the report's heading.
        intro: Markdown placed under the heading (settings, how it was made).
        figures: draw the figures (needs :mod:`xai_sparsity.views.figures` and matplotlib).
    """
    rs = _runs(runs)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    arms = arm_table(rs)
    leads = lead_table(rs)
    sparsity = sparsity_table(rs)
    first = next(iter(rs.values()))
    convs = conv_layers(rs.get("baseline", first))
    arm_names = list(rs)
    parts = [f"# {title}", ""]
    if intro:
        parts += [intro.strip(), ""]
    parts += ["## Verdicts", "", *_verdicts(arms, sparsity, convs), ""]
    parts += _arms_section(arms)
    parts += _leads_section(leads, arm_names)
    parts += _sparsity_section(sparsity, arm_names, convs)
    if figures:
        parts += _figures_section(_figures(rs, folder / "figures"), arm_names)
    parts += [
        "## Run directories",
        "",
        *[f"- `{a}`: `{r.path}`" for a, r in rs.items()],
        "",
    ]
    report_path = folder / "report.md"
    atomic_write_text(report_path, "\n".join(parts))
    return report_path


def _arms_section(arms: pd.DataFrame) -> list[str]:
    """The "Arms" section: one table row per arm (see :func:`arm_table`)."""
    header = [
        "arm",
        "best test acc (epoch)",
        "final test acc",
        "min test loss (epoch)",
        "final test loss",
        "t_L",
        "turned (rise)",
        "label",
        "warning (lead)",
        "penalty",
        "seconds",
    ]
    rows = [
        [
            r.arm,
            f"{r.best_test_acc:.4f} ({r.best_acc_epoch})",
            f"{r.final_test_acc:.4f}",
            f"{r.min_test_loss:.3f} ({r.min_loss_epoch})",
            f"{r.final_test_loss:.3f}",
            fmt(r.t_L),
            f"{'yes' if r.turned else 'no'} ({fmt(r.rise)})",
            r.label,
            _warning_cell(r.warning_epoch, r.warning_lead, bool(r.turned)),
            (
                "λ=" + format(r.penalty_lambda, "g") + " on " + str(r.penalty_layers)
                if r.penalty_lambda
                else "–"
            ),
            fmt(r.seconds, 0),
        ]
        for r in arms.itertuples()
    ]
    return [
        "## Arms",
        "",
        "t_L: epoch of the smoothed test-loss minimum; turned: the smoothed test loss rose at "
        "least 5% above it by the end; label: overfits / clean / undetermined "
        "(docs/definitions.md, run labels); warning: the epoch the label-free early warning "
        "fired (default rule: the raw sparsity of half the layers stayed "
        f"{DEFAULT_RULE['min_rise']:g} above its value at the epoch the training loss levelled "
        f"off, for {DEFAULT_RULE['patience']} epochs; it never reads the test loss), and its "
        "lead t_L - warning (none where the test loss did not turn).",
        "",
        markdown_table(header, rows),
        "",
    ]


def _warning_cell(epoch: Any, lead: Any, turned: bool) -> str:
    if epoch is None or pd.isna(epoch):
        return "–"
    if not turned:
        return f"{int(epoch)} (no lead: the test loss did not turn)"
    return f"{int(epoch)} (lead {int(lead)})"


def _leads_section(leads: pd.DataFrame, arm_names: list[str]) -> list[str]:
    """The "Sparsity lead per layer" section: t_s / lead per layer and arm."""
    layers = list(dict.fromkeys(leads["layer"])) if len(leads) else []
    rows = [[layer, *[_lead_cell(leads, a, layer) for a in arm_names]] for layer in layers]
    return [
        "## Sparsity lead per layer",
        "",
        "t_s: epoch where the layer's smoothed probe sparsity starts a sustained rise; lead = "
        "t_L - t_s (positive: sparsity rose before the test loss turned; no lead where the "
        "test loss did not turn). Definitions: docs/definitions.md (onset and lead) and "
        "docs/science.md (the study of the claims).",
        "",
        markdown_table(["layer", *[f"{a}: t_s / lead" for a in arm_names]], rows),
    ]


def _sparsity_section(sparsity: pd.DataFrame, arm_names: list[str], convs: list[str]) -> list[str]:
    """The "Probe sparsity at the last epoch" section: per layer and arm."""
    rows = [
        [
            layer + (" (conv)" if layer in convs else ""),
            *[
                fmt(sparsity.loc[layer, a]) if layer in sparsity.index and a in sparsity else "–"
                for a in arm_names
            ],
        ]
        for layer in sparsity.index
    ]
    return [
        "",
        "## Probe sparsity at the last epoch",
        "",
        "Perplexity sparsity (normalized, layer scope), mean over the fixed held-out probe set.",
        "",
        markdown_table(["layer", *arm_names], rows),
        "",
    ]


def _figures_section(figs: Mapping[str, list[tuple[str, str]]], arm_names: list[str]) -> list[str]:
    """The "Figures" section: the comparison figures, then each arm's."""
    parts = ["## Figures", ""]
    for caption, path in figs.get("", []):
        parts += [f"### {caption}", "", f"![{caption}]({path})", ""]
    for name in arm_names:
        parts += [f"### {name}", ""]
        for caption, path in figs.get(name, []):
            parts += [f"![{name}: {caption}]({path})", ""]
    return parts


def _lead_cell(leads: pd.DataFrame, arm: str, layer: str) -> str:
    sel = leads[(leads["arm"] == arm) & (leads["layer"] == layer)]
    if sel.empty:
        return "–"
    t_s, lead = sel["t_s"].iloc[0], sel["lead"].iloc[0]
    if not bool(sel["turned"].iloc[0]):
        return f"{fmt(_int_or_none(t_s))} / no lead (did not turn)"
    return f"{fmt(_int_or_none(t_s))} / {fmt(_int_or_none(lead))}"


def _int_or_none(v: Any) -> int | None:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return int(v)


# ----------------------------------------------------------------------------------------------
# The demo


def demo_config(seed: int = 0, *, quick: bool = False) -> TrainConfig:
    """The demo's settings: the plain CNN (16-16-32-32) on 500 embedded MNIST digits.

    Adam (lr 1e-3, batch 32) without augmentation for 50 epochs: the network memorises the 500
    training images within about 20 epochs, after which the test loss rises steadily, so the
    baseline's test loss turns clearly past the 5 % cut (measured for seeds 0, 1, 2: smoothed
    rise 19.5 %, 20.6 %, 29.9 %; t_L 23, 14, 12). With the former setting (SGD lr 0.02, momentum
    0.9, 30 epochs) the baseline's test loss rose by only 4.5-8.6 % (issue 13; the README).
    1,000 held-out test images, 300 fixed probe images. The penalty arm penalises the deepest conv
    activation (``features.relu4``) with lambda = 0.3. The four arms took 227 s of CPU time with
    one thread at 40 epochs (about 285 s at 50).
    ``quick=True``: a tiny model and data for tests (seconds, no overfitting expected).
    """
    from xai_sparsity.training.trainer import TrainConfig

    if quick:
        return TrainConfig(
            data="mnist5k",
            train_size=60,
            test_size=60,
            probe_size=30,
            widths=[4, 4, 8, 8],
            hidden=16,
            epochs=3,
            batch_size=20,
            lr=0.02,
            array_every=1,
            spatial_images=2,
            seed=seed,
        )
    return TrainConfig(
        data="mnist5k",
        train_size=500,
        test_size=1000,
        probe_size=300,
        widths=[16, 16, 32, 32],
        hidden=128,
        epochs=50,
        batch_size=32,
        optimizer="adam",
        lr=1e-3,
        penalty_lambda=0.3,
        penalty_layers="deepest",
        dropout=0.5,
        array_every=5,
        seed=seed,
    )


def settings_intro(cfg: TrainConfig, arms: Sequence[str], wall: float | None = None) -> str:
    """A Markdown paragraph describing an experiment's shared settings."""
    size = f"{cfg.train_size} training images" if cfg.train_size else "the full training split"
    lines = [
        f"Data `{cfg.data}` ({size}, {cfg.test_size or 'all remaining'} test images, "
        f"{cfg.probe_size} fixed probe images, augmentation {'on' if cfg.augment else 'off'}); "
        f"model `{cfg.model}` (widths {cfg.widths}, hidden {cfg.hidden}); {cfg.epochs} epochs of "
        f"{cfg.optimizer} (lr {cfg.lr:g}"
        + (f", momentum {cfg.momentum:g}" if cfg.optimizer == "sgd" else "")
        + f", batch {cfg.batch_size}, schedule {cfg.schedule}); seed {cfg.seed}, the same data "
        "order and initialisation for every arm.",
        "",
        f"Arms: {', '.join(f'`{a}`' for a in arms)}. Strengths not given in an arm's name: "
        f"penalty lambda {cfg.penalty_lambda or 0.3:g} on "
        f"{_penalty_text(cfg.penalty_layers)}, dropout "
        f"{cfg.dropout or 0.5:g} before the last layer.",
    ]
    if wall is not None:
        lines += ["", f"Wall time of the whole experiment: {wall:.0f} s."]
    lines += [
        "",
        "One seed is an anecdote: run `xai-sparsity demo --seed S` for other seeds (or the "
        "study) before drawing conclusions about accuracy differences between arms.",
    ]
    return "\n".join(lines)


def _penalty_text(layers: Any) -> str:
    if layers in (None, "deepest"):
        return "the deepest conv activation"
    if layers == "all":
        return "every conv activation"
    if layers == "auto":
        return "the layers whose sparsity rose before the baseline's t_L"
    return str(layers)


def run_demo(
    out: str | os.PathLike[str],
    *,
    config: TrainConfig | None = None,
    arms: Sequence[str] = DEMO_ARMS,
    seed: int = 0,
    quick: bool = False,
    progress: bool = True,
) -> Path:
    """Train the demo arms into ``out/runs`` and write ``out/report.md``; return its path.

    Finished arms are reused and interrupted ones resume, so re-running continues the work.
    """
    from xai_sparsity.training.trainer import run_experiment

    cfg = config if config is not None else demo_config(seed, quick=quick)
    t0 = time.perf_counter()
    runs = run_experiment(cfg, list(arms), Path(out) / "runs", progress=progress)
    wall = time.perf_counter() - t0
    return write_report(
        runs,
        out,
        title="xai_sparsity demo: does activation sparsity warn of overfitting?",
        intro=settings_intro(cfg, arms, wall),
    )
