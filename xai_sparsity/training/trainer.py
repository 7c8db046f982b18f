"""The trainer: one run ("arm") or an experiment of arms, every epoch recorded in a run directory.

:func:`train` trains one model and writes the run-directory format of docs/architecture.md
(``config.json``, ``history.csv``, ``arrays/epoch_NNNN.npz``, ``probe.npz``, checkpoints,
``summary.json``). Per epoch it records the training and test loss and accuracy, and on the
fixed held-out probe set, per measured layer: perplexity sparsity (mean and std), zero fraction,
Hoyer and entropy sparsity, filter correlation (mean |r|), dead channels, lifetime sparsity, and
the same perplexity sparsity on a fixed subset of training inputs (``train_sparsity``). Every
``array_every`` epochs and at the last epoch it saves per-channel and per-sample sparsity,
spatial sparsity maps of ``spatial_images`` fixed probe images, correlation matrices and
lifetime sparsity. After these columns come the label-free competitor signals of issue 13
(docs/definitions.md): ``confidence``, ``pred_entropy`` and ``cka_drift:<layer>`` from the same
probe pass, ``gsnr`` and ``gsnr_median`` from the epoch's gradients, ``ww_alpha`` when
``signals=["ww_alpha"]``; and with ``val_size > 0`` ``val_loss`` and ``val_acc`` on a validation
split carved from the training pool.

A killed run resumes from ``checkpoints/last.pt`` (model, optimiser, epoch, every RNG state and
the data-order generator) and, on the CPU, ends with the identical history.

:func:`run_experiment` trains several arms with the same seed, data order and schedule:
``"baseline"``, ``"penalty"`` (``"penalty@0.1"`` sets lambda), ``"dropout"`` (``"dropout@0.3"``),
``"batchnorm"``, and combinations such as ``"penalty+batchnorm"``.

Distributed: under ``torchrun --nproc_per_node=N`` the model is wrapped in
DistributedDataParallel (gloo on CPU, nccl on GPU). Each global batch of the single-process data
order is split between the ranks and the losses are scaled so that the averaged gradient equals
the single-process one; test evaluation is sharded and summed; probe statistics are computed on
rank 0, which alone writes files (the ranks meet at barriers). Batch-norm statistics and dropout
masks are per rank, so such runs match a single-process run only approximately.

>>> import tempfile
>>> cfg = TrainConfig(epochs=1, train_size=50, test_size=50, probe_size=20, widths=[4, 4],
...                   hidden=8, array_every=1)
>>> run = train(cfg, tempfile.mkdtemp(), progress=False)
>>> list(run.history().columns[:5])
['epoch', 'train_loss', 'train_acc', 'test_loss', 'test_acc']
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import random
import shutil
import time
import types
import typing
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xai_sparsity.base import __version__
from xai_sparsity.base.errors import XaiSparsityError, check_choice, closest
from xai_sparsity.base.modules import eval_no_grad, resolve_device
from xai_sparsity.runs.rundir import RunDir
from xai_sparsity.training.probe import ProbeSignals, probe_statistics

__all__ = [
    "ARM_COMPONENTS",
    "DEFAULT_LAMBDA",
    "StopTraining",
    "TrainConfig",
    "arm_config",
    "run_experiment",
    "train",
]

DEFAULT_LAMBDA = 0.3
"""Penalty strength of a ``"penalty"`` arm when neither the arm nor the config sets one."""
DEFAULT_DROPOUT = 0.5
"""Dropout rate of a ``"dropout"`` arm when neither the arm nor the config sets one."""
ARM_COMPONENTS = ("baseline", "penalty", "dropout", "batchnorm")
SIGNALS = ("confidence", "pred_entropy", "cka_drift", "gsnr", "ww_alpha")
"""Label-free competitor signals a run can record (``TrainConfig.signals``): ``confidence``,
``pred_entropy`` and ``cka_drift:<layer>`` come from the probe pass (one switch for the three),
``gsnr`` (and ``gsnr_median``) from the training gradients, ``ww_alpha`` from WeightWatcher."""
DEFAULT_SIGNALS = frozenset({"confidence", "pred_entropy", "cka_drift", "gsnr"})
"""Signals recorded whatever ``signals`` says (each costs well under 3 % of an epoch)."""


class StopTraining(Exception):
    """Raise from a callback to end a run cleanly after the current epoch."""


# ----------------------------------------------------------------------------------------------
# Configuration


@dataclass
class TrainConfig:
    """Every setting of a run. Round-trips through JSON (``to_dict`` / ``from_dict``) and TOML.

    Data: ``data`` (see :data:`xai_sparsity.training.data.DATASETS`), ``data_root``, ``train_size``,
    ``test_size``, ``probe_size``, ``augment``, ``download``, ``val_size`` (0: none; else that
    many validation images carved from the training pool, disjoint from the training, probe and
    test images, the training images unchanged; each epoch records ``val_loss`` and
    ``val_acc``).
    Model: ``model`` ("cnn", "resnet18", "vgg11"), ``widths``, ``hidden``, ``dropout``,
    ``batch_norm``.
    Optimisation: ``epochs``, ``batch_size``, ``optimizer`` ("sgd", "adam", "adamw"), ``lr``,
    ``momentum``, ``weight_decay``, ``schedule`` ("constant", "cosine", "step"), ``step_size``,
    ``gamma``.
    Penalty: ``penalty_lambda`` (0: none), ``penalty_layers`` (names or glob patterns; ``None``
    or ``"all"``: every activation after a convolution; ``"deepest"``: the activation after the
    last convolution; ``"auto"``: layers whose sparsity rose before t_L in
    ``penalty_baseline``, a baseline run directory), ``penalty_weights``, ``penalty_scope``,
    ``penalty_variant``, ``penalty_transform``. Penalising every conv activation with
    lambda 0.3 from the first epoch collapsed the demo's CNN (SGD, 500 digits) to constant, dense
    features that never learned; ``"deepest"`` did not.
    Measurement: ``measure_layers`` (``None``: every activation module, i.e. the activation after
    each conv and the hidden dense layer), ``array_every``, ``spatial_images``, ``correlation``,
    ``eval_batch_size``.
    Competitor signals (label-free, docs/definitions.md): ``signals`` lists the optional ones
    among :data:`SIGNALS` (those of :data:`DEFAULT_SIGNALS` are always recorded);
    ``"ww_alpha"`` (needs the ``study`` extra) is computed every ``ww_every`` epochs and at the
    last one (NaN in between).
    Runtime: ``seed``, ``device`` ("auto", "cpu", "cuda", "cuda:1", "mps"), ``amp`` (mixed
    precision on CUDA), ``deterministic``, ``num_workers``, ``arm`` (a label).
    """

    data: str = "mnist5k"
    data_root: str | None = None
    train_size: int | None = 500
    test_size: int | None = None
    probe_size: int = 500
    augment: bool = False
    download: bool = False
    val_size: int = 0

    model: str = "cnn"
    widths: list[int] = field(default_factory=lambda: [16, 16, 32, 32])
    hidden: int = 128
    dropout: float = 0.0
    batch_norm: bool = False

    epochs: int = 60
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "constant"
    step_size: int = 30
    gamma: float = 0.1

    penalty_lambda: float = 0.0
    penalty_layers: str | list[str] | None = None
    penalty_weights: dict[str, float] | None = None
    penalty_scope: str = "layer"
    penalty_variant: str = "normalized"
    penalty_transform: str = "abs"
    penalty_baseline: str | None = None

    measure_layers: str | list[str] | None = None
    array_every: int = 5
    spatial_images: int = 8
    correlation: bool = True
    eval_batch_size: int = 500
    signals: list[str] = field(default_factory=list)
    ww_every: int = 1

    seed: int = 0
    device: str = "auto"
    amp: bool = False
    deterministic: bool = True
    num_workers: int = 0
    arm: str = "run"

    def __post_init__(self) -> None:
        self.validate()

    # -- validation --------------------------------------------------------------------------

    def validate(self) -> TrainConfig:
        """Check every field; raise :class:`XaiSparsityError` naming the field and the value."""
        from xai_sparsity.training.data import DATASETS
        from xai_sparsity.training.models import MODELS

        hints = typing.get_type_hints(TrainConfig)
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name]))
        check_choice("data", self.data, DATASETS)
        check_choice("model", self.model, MODELS)
        check_choice("optimizer", self.optimizer, ("sgd", "adam", "adamw"))
        check_choice("schedule", self.schedule, ("constant", "cosine", "step"))
        check_choice("penalty_scope", self.penalty_scope, ("layer", "channel", "spatial"))
        check_choice("penalty_variant", self.penalty_variant, ("normalized", "relative"))
        check_choice("penalty_transform", self.penalty_transform, ("abs", "relu"))
        _positive("epochs", self.epochs)
        _positive("batch_size", self.batch_size)
        _positive("probe_size", self.probe_size)
        _positive("array_every", self.array_every)
        _positive("eval_batch_size", self.eval_batch_size)
        _positive("step_size", self.step_size)
        _positive("hidden", self.hidden)
        _positive("ww_every", self.ww_every)
        for signal in self.signals:
            check_choice("signals", signal, SIGNALS)
        for name in ("train_size", "test_size"):
            v = getattr(self, name)
            if v is not None:
                _positive(name, v)
        if self.val_size < 0:
            raise XaiSparsityError(f"val_size={self.val_size!r} must be >= 0 (0: no validation)")
        if self.spatial_images < 0:
            raise XaiSparsityError(f"spatial_images={self.spatial_images!r} must be >= 0")
        if self.num_workers < 0:
            raise XaiSparsityError(f"num_workers={self.num_workers!r} must be >= 0")
        if not self.widths or any(w < 1 for w in self.widths):
            raise XaiSparsityError(
                f"widths={self.widths!r} must be a non-empty list of positive ints"
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise XaiSparsityError(f"lr={self.lr!r} must be a positive number")
        if not 0.0 <= self.dropout < 1.0:
            raise XaiSparsityError(f"dropout={self.dropout!r} must be in [0, 1)")
        if not (self.penalty_lambda >= 0 and math.isfinite(self.penalty_lambda)):
            raise XaiSparsityError(
                f"penalty_lambda={self.penalty_lambda!r} must be a finite number >= 0"
            )
        for name in ("momentum", "weight_decay", "gamma"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise XaiSparsityError(f"{name}={v!r} must be a finite number >= 0")
        dev = self.device
        if not (dev in ("auto", "cpu", "cuda", "mps") or dev.startswith("cuda:")):
            raise XaiSparsityError(
                f"device={dev!r} is not one of 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'"
            )
        return self

    # -- serialisation -----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Build a config; unknown keys raise with the closest valid keys."""
        if not isinstance(values, Mapping):
            raise XaiSparsityError(f"a config must be a mapping of settings, got {values!r:.80}")
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in values if k not in valid]
        if unknown:
            hints = "; ".join(f"{k!r}: did you mean {closest(k, valid, n=3)}?" for k in unknown)
            raise XaiSparsityError(
                f"unknown config key(s) {unknown} ({hints}). Valid keys: {', '.join(valid)}"
            )
        return cls(**dict(values))

    def replace(self, **changes: Any) -> TrainConfig:
        """A validated copy with some fields changed."""
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            from xai_sparsity.base.files import atomic_write_text

            atomic_write_text(path, text + "\n")
        return text

    def to_toml(self, path: str | os.PathLike[str] | None = None) -> str:
        """TOML text of the settings (``None`` values are left out: TOML has no null)."""
        lines = []
        tables = []
        for k, v in self.to_dict().items():
            if v is None:
                continue
            if isinstance(v, dict):
                body = "\n".join(f"{json.dumps(kk)} = {_toml_value(vv)}" for kk, vv in v.items())
                tables.append(f"[{k}]\n{body}")
            else:
                lines.append(f"{k} = {_toml_value(v)}")
        text = "\n".join(lines + tables) + "\n"
        if path is not None:
            from xai_sparsity.base.files import atomic_write_text

            atomic_write_text(path, text)
        return text

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TrainConfig:
        """Read a ``.json`` or ``.toml`` config file."""
        return cls.from_dict(read_config_file(path))


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a JSON or TOML file into a dict, with clear errors."""
    p = Path(path)
    if not p.is_file():
        raise XaiSparsityError(f"config file {str(p)!r} does not exist")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # pragma: no cover - Python 3.10
            try:
                import tomli as tomllib  # type: ignore[no-redef]
            except ModuleNotFoundError as err:
                raise XaiSparsityError(
                    "reading TOML on Python 3.10 needs the tomli package (pip install tomli)"
                ) from err
        try:
            data: Any = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise XaiSparsityError(f"config file {str(p)!r} is not valid TOML: {err}") from None
    elif p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise XaiSparsityError(f"config file {str(p)!r} is not valid JSON: {err}") from None
    else:
        raise XaiSparsityError(
            f"config file {str(p)!r} must end in .json or .toml (got {p.suffix!r})"
        )
    if not isinstance(data, dict):
        raise XaiSparsityError(f"config file {str(p)!r} must hold a table/object of settings")
    return data


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise XaiSparsityError(f"cannot write {v!r} as TOML")


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise XaiSparsityError(f"{name}={value!r} must be a positive integer")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; accept ints for floats and tuples for lists."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _coerce(name, value, opt)
            except XaiSparsityError as err:
                errors.append(str(err))
        allowed = " or ".join(_type_name(o) for o in options)
        raise XaiSparsityError(f"{name}={value!r} must be {allowed}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise XaiSparsityError(f"{name}={value!r} must be a list of {_type_name(item)}")
        return [_coerce(name, v, item) for v in value]
    if origin is dict:
        k_tp, v_tp = typing.get_args(tp)
        if not isinstance(value, Mapping):
            raise XaiSparsityError(f"{name}={value!r} must be a mapping")
        return {_coerce(name, k, k_tp): _coerce(name, v, v_tp) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise XaiSparsityError(f"{name}={value!r} must be true or false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise XaiSparsityError(f"{name}={value!r} must be an integer")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
            raise XaiSparsityError(f"{name}={value!r} must be a number")
        return float(value)
    if tp is str:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if not isinstance(value, str):
            raise XaiSparsityError(f"{name}={value!r} must be a string")
        return value
    raise XaiSparsityError(f"{name}: unsupported setting type {tp!r}")  # pragma: no cover


# ----------------------------------------------------------------------------------------------
# Arms


def arm_config(config: TrainConfig, arm: str) -> TrainConfig:
    """The config of one arm: regularisers off, then the arm's components switched on.

    ``arm`` is ``"baseline"`` or components joined by ``"+"``: ``"penalty"`` / ``"penalty@LAM"``,
    ``"dropout"`` / ``"dropout@P"``, ``"batchnorm"``. Strengths not given in the arm come from
    ``config`` (when non-zero) or default to :data:`DEFAULT_LAMBDA` / :data:`DEFAULT_DROPOUT`.

    >>> arm_config(TrainConfig(), "penalty@0.1+batchnorm").penalty_lambda
    0.1
    """
    if not isinstance(arm, str) or not arm.strip():
        raise XaiSparsityError(f"arm={arm!r} must be a non-empty string")
    changes: dict[str, Any] = {"dropout": 0.0, "batch_norm": False, "penalty_lambda": 0.0}
    parts = [p.strip() for p in arm.split("+")]
    for part in parts:
        head, _, value = part.partition("@")
        check_choice("arm component", head, ARM_COMPONENTS)
        number: float | None = None
        if value:
            try:
                number = float(value)
            except ValueError:
                raise XaiSparsityError(
                    f"arm {arm!r}: {value!r} after '@' must be a number (e.g. 'penalty@0.3')"
                ) from None
        if head == "baseline":
            if len(parts) > 1 or value:
                raise XaiSparsityError(f"arm {arm!r}: 'baseline' cannot be combined")
        elif head == "penalty":
            lam = number if number is not None else (config.penalty_lambda or DEFAULT_LAMBDA)
            changes["penalty_lambda"] = lam
        elif head == "dropout":
            changes["dropout"] = (
                number if number is not None else (config.dropout or DEFAULT_DROPOUT)
            )
        else:
            if value:
                raise XaiSparsityError(f"arm {arm!r}: 'batchnorm' takes no value")
            changes["batch_norm"] = True
    changes["arm"] = arm
    return config.replace(**changes)


# ----------------------------------------------------------------------------------------------
# Runtime helpers


def _dist() -> tuple[int, int]:
    """(rank, world size); initialises torch.distributed when launched by torchrun."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _all_sum(values: list[float], world: int, device: torch.device) -> list[float]:
    if world <= 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return [float(v) for v in t.tolist()]


def _rng_state() -> dict[str, Any]:
    np_state: Any = np.random.get_state(legacy=True)  # noqa: NPY002 - users' global RNG
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": _py_state_to_list(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _py_state_to_list(state: tuple[Any, ...]) -> list[Any]:
    version, internal, gauss = state
    return [int(version), [int(v) for v in internal], gauss]


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (
            "MT19937",
            n["keys"].numpy().astype(np.uint32),
            int(n["pos"]),
            int(n["has_gauss"]),
            float(n["cached_gaussian"]),
        )
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):
            torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002
    torch.manual_seed(seed)


def _set_determinism(on: bool, device: torch.device) -> None:
    """Deterministic kernels on accelerators (CPU kernels used here are deterministic already;
    ``torch.use_deterministic_algorithms`` costs seconds of imports, so it is skipped on CPU)."""
    if on and device.type != "cpu":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def _stack(dataset: Any, limit: int | None = None) -> tuple[Tensor, Tensor]:
    """Materialise a (small) dataset as tensors (N, C, H, W) and (N,)."""
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None and len(tensors) >= 2:
        x, y = tensors[0], tensors[1]
        return (x[:limit], y[:limit]) if limit is not None else (x, y)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    xs, ys = [], []
    for i in range(n):
        x, y = dataset[i]
        xs.append(torch.as_tensor(x))
        ys.append(torch.as_tensor(y))
    return torch.stack(xs), torch.stack(ys).long()


def _lr_at(cfg: TrainConfig, epoch: int) -> float:
    """Learning rate of 1-based ``epoch``."""
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / cfg.epochs))
    if cfg.schedule == "step":
        return cfg.lr * cfg.gamma ** ((epoch - 1) // cfg.step_size)
    return cfg.lr


def _make_optimizer(cfg: TrainConfig, params: Any) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _measured_layer_spec(cfg: TrainConfig) -> Any:
    if cfg.measure_layers is not None:
        return cfg.measure_layers
    from xai_sparsity.capturing.hooks import layer_kind

    def is_activation(name: str, module: nn.Module) -> bool:
        return layer_kind(module) == "activation"

    is_activation.__name__ = "activation layers"
    return is_activation


def default_penalty_layers(model: nn.Module, example: Tensor, which: str = "deepest") -> list[str]:
    """Activation modules that follow a convolution (output with spatial dims), in call order.

    ``which="deepest"``: only the last of them; ``"all"``: every one.
    """
    from xai_sparsity.capturing.hooks import list_layers

    check_choice("penalty_layers", which, ("deepest", "all"))
    table = list_layers(model, example)
    names = [r.name for r in table if r.kind == "activation" and len(r.output_shape) >= 2]
    if not names:
        raise XaiSparsityError(
            "the model has no activation module with a spatial output to penalise by default; "
            "set penalty_layers to layer names"
        )
    return names if which == "all" else names[-1:]


# ----------------------------------------------------------------------------------------------
# Competitor signals computed by the trainer itself (the probe ones are in probe.py)

_PROBE_SIGNALS = frozenset({"confidence", "pred_entropy", "cka_drift"})


class GradientNoise:
    """Gradient signal-to-noise ratio of one epoch's minibatch gradients (Liu et al. 2020).

    After each backward, :meth:`update` adds every parameter element's gradient g and g^2 to
    float64 sums (unscaled first under AMP; a step whose gradients are not finite, which the
    scaler skips, is left out). :meth:`result` gives ``gsnr``, the signal-to-noise ratio of the
    whole gradient vector over the epoch's n steps, sum_j mean_j^2 / sum_j var_j (var with n - 1),
    and ``gsnr_median``, the median over the elements with var > 0 of r_j = mean_j^2 / var_j.
    *Choice*: the mean of r_j (Liu et al.'s average) is dominated by the few elements whose
    variance is tiny next to their rounding, so it changed by 4e-5 between two runs whose
    gradients differed only in the last bits (a resumed run and an uninterrupted one); the ratio
    of sums is not. Under DDP the gradients after backward are already the
    averages over the ranks (the global batch's gradient), read on rank 0.
    """

    def __init__(self, model: nn.Module) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        n = sum(p.numel() for p in self.params)
        device = self.params[0].device if self.params else torch.device("cpu")
        self.sum = torch.zeros(n, dtype=torch.float64, device=device)
        self.sum_sq = torch.zeros_like(self.sum)
        self.steps = torch.zeros((), dtype=torch.float64, device=device)

    def update(self, scaler: Any, optimizer: torch.optim.Optimizer) -> None:
        if not self.params:
            return
        if scaler.is_enabled():
            scaler.unscale_(optimizer)  # the step then uses these unscaled gradients
        g = torch.cat(
            [
                (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                for p in self.params
            ]
        ).double()
        if scaler.is_enabled():  # no synchronisation: a skipped step adds zeros
            ok = torch.isfinite(g).all()
            g = torch.where(ok, g, torch.zeros_like(g))
            self.steps += ok.double()
        else:
            self.steps += 1.0
        self.sum += g
        self.sum_sq.addcmul_(g, g)

    def result(self) -> dict[str, float]:
        n = float(self.steps)
        if n < 2:
            return {"gsnr": math.nan, "gsnr_median": math.nan}
        mean = self.sum / n
        var = (self.sum_sq - n * mean * mean) / (n - 1)
        live = var > 1e-12 * (self.sum_sq / n)
        if not bool(live.any()):
            return {"gsnr": math.nan, "gsnr_median": math.nan}
        noise = var.clamp(min=0.0).sum()
        r = mean[live].square() / var[live]
        return {
            "gsnr": float(mean.square().sum() / noise),
            "gsnr_median": float(r.median()),
        }


def _import_weightwatcher() -> Any:
    quiet = io.StringIO()  # it prints notes about its SVD backend on import
    try:
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            import weightwatcher
    except ImportError as err:
        raise XaiSparsityError(
            "signals=['ww_alpha'] needs the weightwatcher package: pip install "
            "'xai-sparsity[study]' (or pip install weightwatcher)"
        ) from err
    return weightwatcher


def ww_alpha(model: nn.Module) -> float:
    """WeightWatcher's mean power-law alpha over the model's layers (NaN if none fits).

    Reads only the weights (a CPU copy); every random state is restored afterwards, so
    recording it leaves the training unchanged.
    """
    import copy
    import logging

    ww = _import_weightwatcher()
    state = _rng_state()
    cpu = copy.deepcopy(model).cpu()
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    quiet = io.StringIO()  # weightwatcher and powerlaw print progress notes
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(quiet),
            contextlib.redirect_stderr(quiet),
        ):
            warnings.simplefilter("ignore")
            details = ww.WeightWatcher(model=cpu).analyze()
    finally:
        _set_rng_state(state)
    alpha = details["alpha"].to_numpy(dtype=float) if "alpha" in details else np.zeros(0)
    alpha = alpha[np.isfinite(alpha)]
    return float(alpha.mean()) if alpha.size else math.nan


# ----------------------------------------------------------------------------------------------
# The trainer


def _batches(x: Tensor, size: int) -> Iterator[Tensor]:
    for i in range(0, x.shape[0], size):
        yield x[i : i + size]


def _evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    batch_size: int,
    rank: int,
    world: int,
    device: torch.device,
    amp: Any,
) -> tuple[float, float]:
    """(mean loss, accuracy) on (x, y), sharded over ranks and summed."""
    loss_sum, correct = 0.0, 0.0
    xs, ys = x[rank::world], y[rank::world]
    with eval_no_grad(model):
        for xb, yb in zip(_batches(xs, batch_size), _batches(ys, batch_size), strict=True):
            with amp():
                logits = model(xb)
            loss_sum += float(F.cross_entropy(logits.float(), yb, reduction="sum"))
            correct += float((logits.argmax(dim=1) == yb).sum())
    loss_sum, correct = _all_sum([loss_sum, correct], world, device)
    n = int(x.shape[0])
    return loss_sum / n, correct / n


def _epoch_batches(
    n: int, batch_size: int, generator: torch.Generator, rank: int, world: int
) -> list[list[int]]:
    """This rank's share of each global batch of one epoch's shuffled order."""
    order = torch.randperm(n, generator=generator).tolist()
    batches = []
    for i in range(0, n, batch_size):
        batch = order[i : i + batch_size]
        batches.append(batch[rank::world])
    return batches


def _same_settings(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    skip = {"arm"}
    return {k: v for k, v in a.items() if k not in skip} == {
        k: v for k, v in b.items() if k not in skip
    }


@dataclass
class _Session:
    """Everything one run of :func:`train` works with, built by :func:`_set_up`."""

    cfg: TrainConfig
    run: RunDir
    rank: int
    world: int
    device: torch.device
    data: Any
    core: nn.Module  # the model
    ddp_model: nn.Module  # the model, wrapped in DistributedDataParallel when world > 1
    optimizer: torch.optim.Optimizer
    scaler: Any  # torch.amp.GradScaler
    amp: Callable[[], contextlib.AbstractContextManager[Any]]
    generator: torch.Generator  # the data order
    test_x: Tensor
    test_y: Tensor
    probe_x: Tensor
    probe_y: Tensor
    train_probe_x: Tensor
    val_x: Tensor | None  # the validation split (val_size > 0), else None
    val_y: Tensor | None
    layers_spec: Any
    penalty: Any  # SparsityPenalty or None
    penalty_layers: list[str]
    signals: frozenset[str] = frozenset()  # the competitor signals recorded (rank 0)
    probe_signals: ProbeSignals | None = None  # confidence, pred_entropy, cka_drift (rank 0)
    start_epoch: int = 1
    best_loss: float = math.inf
    best_epoch: int = 0
    epoch_times: list[float] = field(default_factory=list)


def _load_data(cfg: TrainConfig, rank: int, world: int) -> Any:
    """The run's DataBundle; rank 0 loads (and downloads, if asked) first."""
    from xai_sparsity.training.data import load_data

    if rank != 0:
        _barrier(world)
    data = load_data(
        cfg.data,
        root=cfg.data_root,
        train_size=cfg.train_size,
        test_size=cfg.test_size,
        probe_size=cfg.probe_size,
        seed=cfg.seed,
        augment=cfg.augment,
        download=cfg.download and rank == 0,
        val_size=cfg.val_size,
    )
    if rank == 0:
        _barrier(world)
    return data


def _make_penalty(cfg: TrainConfig, core: nn.Module, example: Tensor) -> tuple[Any, list[str]]:
    """(SparsityPenalty or None, the penalised layers) of ``cfg``."""
    from xai_sparsity.training.penalty import SparsityPenalty, auto_targets

    if cfg.penalty_lambda <= 0:
        return None, []
    if cfg.penalty_layers == "auto":
        assert cfg.penalty_baseline is not None
        layers = auto_targets(cfg.penalty_baseline)
        if not layers:
            raise XaiSparsityError(
                f"penalty_layers='auto': no layer's sparsity rose before the test-loss "
                f"minimum in {cfg.penalty_baseline!r}; name the layers to penalise"
            )
    elif cfg.penalty_layers is None or cfg.penalty_layers in ("deepest", "all"):
        which = "all" if cfg.penalty_layers is None else str(cfg.penalty_layers)
        layers = default_penalty_layers(core, example, which)
    else:
        from xai_sparsity.capturing.hooks import resolve_layers

        layers = resolve_layers(core, cfg.penalty_layers)
    penalty = SparsityPenalty(
        layers,
        cfg.penalty_lambda,
        weights=cfg.penalty_weights,
        scope=cfg.penalty_scope,
        variant=cfg.penalty_variant,
        transform=cfg.penalty_transform,
    )
    return penalty, layers


def _mixed_precision(
    cfg: TrainConfig, device: torch.device, rank: int
) -> tuple[Callable[[], contextlib.AbstractContextManager[Any]], Any]:
    """(autocast context factory, GradScaler): mixed precision only with ``amp`` on CUDA."""
    use_amp = bool(cfg.amp and device.type == "cuda")
    if cfg.amp and not use_amp and rank == 0:
        warnings.warn("amp=True is only used on CUDA; training in float32", stacklevel=4)
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    def amp() -> contextlib.AbstractContextManager[Any]:
        if use_amp:
            return torch.autocast(device_type="cuda", dtype=amp_dtype)
        return contextlib.nullcontext()

    return amp, scaler


def _set_up(
    cfg: TrainConfig,
    run: RunDir,
    rank: int,
    world: int,
    device: torch.device,
    model: nn.Module | None,
    data: Any,
) -> _Session:
    """Data, model, optimiser, penalty, mixed precision and the data order of one run."""
    from xai_sparsity.training.models import make_model

    if data is None:
        data = _load_data(cfg, rank, world)
    _seed_everything(cfg.seed)
    if model is None:
        model = make_model(
            cfg.model,
            num_classes=data.num_classes,
            in_channels=data.in_channels,
            image_size=data.image_size,
            widths=cfg.widths,
            hidden=cfg.hidden,
            dropout=cfg.dropout,
            batch_norm=cfg.batch_norm,
        )
    core = model.to(device)
    optimizer = _make_optimizer(cfg, core.parameters())
    test_x, test_y = (t.to(device) for t in _stack(data.test))
    probe_x, probe_y = (t.to(device) for t in _stack(data.probe))
    train_probe_x = _stack(data.train_probe)[0].to(device)
    val_x = val_y = None
    if cfg.val_size > 0:
        if getattr(data, "val", None) is None:
            raise XaiSparsityError(
                f"val_size={cfg.val_size} but the data bundle passed to train has no val split"
            )
        val_x, val_y = (t.to(device) for t in _stack(data.val))
    penalty, penalty_layers = _make_penalty(cfg, core, probe_x[:2])
    ddp_model: nn.Module = core
    if world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(
            core, device_ids=[device.index] if device.type == "cuda" else None
        )
    amp, scaler = _mixed_precision(cfg, device, rank)
    signals = DEFAULT_SIGNALS | frozenset(cfg.signals)
    if "ww_alpha" in signals:
        _import_weightwatcher()
    generator = torch.Generator()
    generator.manual_seed(cfg.seed)
    return _Session(
        cfg=cfg,
        run=run,
        rank=rank,
        world=world,
        device=device,
        data=data,
        core=core,
        ddp_model=ddp_model,
        optimizer=optimizer,
        scaler=scaler,
        amp=amp,
        generator=generator,
        test_x=test_x,
        test_y=test_y,
        probe_x=probe_x,
        probe_y=probe_y,
        train_probe_x=train_probe_x,
        val_x=val_x,
        val_y=val_y,
        layers_spec=_measured_layer_spec(cfg),
        penalty=penalty,
        penalty_layers=penalty_layers,
        signals=signals,
        probe_signals=ProbeSignals() if signals & _PROBE_SIGNALS else None,
    )


def _resume(s: _Session) -> None:
    """Continue from ``checkpoints/last.pt`` if there is one (model, optimiser, scaler, data
    order, RNG states, best epoch, timings); else write ``probe.npz``."""
    run = s.run
    if run.checkpoint_path("last").exists():
        state = run.load_checkpoint("last")
        s.core.load_state_dict(state["model"])
        s.optimizer.load_state_dict(state["optimizer"])
        if "scaler" in state and s.scaler.is_enabled():
            s.scaler.load_state_dict(state["scaler"])
        s.generator.set_state(state["data_generator"])
        rng = state["rng"]
        if isinstance(rng, list):
            rng = rng[s.rank] if len(rng) == s.world else rng[0]
        _set_rng_state(rng)
        s.start_epoch = int(state["epoch"]) + 1
        s.best_loss, s.best_epoch = float(state["best_test_loss"]), int(state["best_epoch"])
        s.epoch_times = [float(t) for t in state.get("epoch_times", [])]
        if s.probe_signals is not None and "signals" in state:
            s.probe_signals.load_state_dict(state["signals"])
        if s.rank == 0:
            run.truncate_history(int(state["epoch"]))
    elif s.rank == 0:
        k = min(s.cfg.spatial_images, int(s.probe_x.shape[0]))
        run.save_probe(s.probe_x[:k].cpu().numpy(), s.probe_y[:k].cpu().numpy())
    _barrier(s.world)


def _train_epoch(
    s: _Session, epoch: int
) -> tuple[dict[str, Any], dict[str, Any], dict[str, float]]:
    """One epoch of optimisation; returns the row's first columns (epoch, training loss and
    accuracy), the columns that follow the test ones (lr, penalty, training-batch sparsity) and
    the gradient signal-to-noise columns (``gsnr``, ``gsnr_median``; empty when off)."""
    from torch.utils.data import DataLoader

    cfg, device, world = s.cfg, s.device, s.world
    lr = _lr_at(cfg, epoch)
    for group in s.optimizer.param_groups:
        group["lr"] = lr
    n_train = len(s.data.train)
    batches = _epoch_batches(n_train, cfg.batch_size, s.generator, s.rank, world)
    global_sizes = [min(cfg.batch_size, n_train - i) for i in range(0, n_train, cfg.batch_size)]
    loader = DataLoader(
        s.data.train,
        batch_sampler=batches,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
    )
    s.ddp_model.train()
    # running sums on the device (no synchronisation per step): loss, correct, penalty
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    steps = 0
    batch_sparsity: dict[str, Tensor] = {}
    penalty = s.penalty
    gradients = GradientNoise(s.core) if "gsnr" in s.signals and s.rank == 0 else None
    with penalty.attach(s.core) if penalty is not None else contextlib.nullcontext():
        for step, (xb, yb) in enumerate(loader):
            xb = xb.to(device, non_blocking=True)
            yb = yb.to(device, non_blocking=True)
            frac = xb.shape[0] / global_sizes[step] * world
            with s.amp():
                logits = s.ddp_model(xb)
                ce = F.cross_entropy(logits.float(), yb, reduction="sum")
                loss = ce / global_sizes[step] * world
                if penalty is not None:
                    loss = loss + _penalty_step(penalty, frac, sums, batch_sparsity)
            s.optimizer.zero_grad(set_to_none=True)
            s.scaler.scale(loss).backward()
            if gradients is not None:
                gradients.update(s.scaler, s.optimizer)
            s.scaler.step(s.optimizer)
            s.scaler.update()
            sums[0] += ce.detach().double()
            sums[1] += (logits.detach().argmax(dim=1) == yb).sum().double()
            steps += 1
    sums_list = [float(v) for v in sums.tolist()]
    loss_sum, correct = _all_sum(sums_list[:2], world, device)
    row = {"epoch": epoch, "train_loss": loss_sum / n_train, "train_acc": correct / n_train}
    extra: dict[str, Any] = {"lr": lr}
    if penalty is not None:
        extra["penalty"] = sums_list[2] / max(steps, 1)
        for name, v in batch_sparsity.items():
            extra[f"train_batch_sparsity:{name}"] = float(v) / max(steps, 1)
    return row, extra, gradients.result() if gradients is not None else {}


def _penalty_step(
    penalty: Any, frac: float, sums: Tensor, batch_sparsity: dict[str, Tensor]
) -> Tensor:
    """The penalty of one step; adds it to ``sums[2]`` and its layers' sparsity to
    ``batch_sparsity``."""
    pen = penalty.value(batch_fraction=frac)
    if frac:
        sums[2] += pen.detach().double() / frac
    for name, v in penalty.last_tensors.items():
        prev = batch_sparsity.get(name)
        batch_sparsity[name] = v if prev is None else prev + v
    return pen


def _evaluate_epoch(s: _Session, split: str = "test") -> tuple[float, float]:
    """(loss, accuracy) of the model now on the ``"test"`` or ``"val"`` split, sharded over the
    ranks."""
    model = s.ddp_model if s.world == 1 else s.core
    x, y = (s.test_x, s.test_y) if split == "test" else (s.val_x, s.val_y)
    assert x is not None and y is not None
    return _evaluate(model, x, y, s.cfg.eval_batch_size, s.rank, s.world, s.device, s.amp)


def _record(s: _Session, epoch: int, row: dict[str, Any], late: Mapping[str, Any]) -> None:
    """Rank 0: the probe statistics into ``row``, then the ``late`` columns (validation and
    competitor signals, after every older column), the arrays, the history row and, on a new
    best test loss, ``checkpoints/best.pt``."""
    if s.rank != 0:
        return
    cfg = s.cfg
    want_arrays = epoch % cfg.array_every == 0 or epoch == cfg.epochs
    cols, arrays = probe_statistics(
        s.core,
        s.probe_x,
        s.layers_spec,
        train_probe_x=s.train_probe_x,
        arrays=want_arrays,
        spatial_images=min(cfg.spatial_images, int(s.probe_x.shape[0])),
        correlation=cfg.correlation,
        batch_size=cfg.eval_batch_size,
        signals=s.probe_signals,
    )
    row.update(cols)
    row.update(late)
    if "ww_alpha" in s.signals:
        due = epoch % cfg.ww_every == 0 or epoch == cfg.epochs
        row["ww_alpha"] = ww_alpha(s.core) if due else math.nan
    if want_arrays:
        s.run.save_arrays(epoch, arrays)
    s.run.append_history(row)
    if row["test_loss"] < s.best_loss:
        s.best_loss, s.best_epoch = row["test_loss"], epoch
        s.run.save_checkpoint(s.core.state_dict(), "best")


def _checkpoint(s: _Session, epoch: int) -> None:
    """``checkpoints/last.pt`` (rank 0 writes; every rank's RNG state goes in)."""
    rng_states = _gather_rng(s.world)
    if s.rank == 0:
        s.run.save_checkpoint(
            {
                "epoch": epoch,
                "model": s.core.state_dict(),
                "optimizer": s.optimizer.state_dict(),
                "scaler": s.scaler.state_dict(),
                "data_generator": s.generator.get_state(),
                "rng": rng_states,
                "best_test_loss": s.best_loss,
                "best_epoch": s.best_epoch,
                "epoch_times": s.epoch_times,
                **(
                    {"signals": s.probe_signals.state_dict()} if s.probe_signals is not None else {}
                ),
            },
            "last",
        )
    _barrier(s.world)


def _progress_bar(s: _Session, progress: bool) -> Any:
    if not progress or s.rank != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(
        total=s.cfg.epochs,
        initial=s.start_epoch - 1,
        desc=f"{s.cfg.arm}",
        unit="epoch",
        leave=False,
        dynamic_ncols=True,
    )


def _run_epochs(
    s: _Session, progress: bool, callbacks: Sequence[Callable[[dict[str, Any]], Any]]
) -> bool:
    """Train, evaluate, record and checkpoint every remaining epoch; True if a callback
    stopped the run."""
    bar = _progress_bar(s, progress)
    try:
        for epoch in range(s.start_epoch, s.cfg.epochs + 1):
            t0 = time.perf_counter()
            row, extra, gradients = _train_epoch(s, epoch)
            test_loss, test_acc = _evaluate_epoch(s)
            row.update(test_loss=test_loss, test_acc=test_acc, **extra)
            late: dict[str, Any] = {}
            if s.val_x is not None:
                late["val_loss"], late["val_acc"] = _evaluate_epoch(s, "val")
            late.update(gradients)
            _record(s, epoch, row, late)
            s.epoch_times.append(time.perf_counter() - t0)
            _checkpoint(s, epoch)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    test_loss=f"{test_loss:.3f}", test_acc=f"{test_acc:.3f}", refresh=False
                )
            try:
                for cb in callbacks:
                    cb(dict(row))
            except StopTraining:
                return True
    finally:
        if bar is not None:
            bar.close()
    return False


def train(
    config: TrainConfig | Mapping[str, Any],
    out: str | os.PathLike[str],
    *,
    progress: bool = True,
    callbacks: Sequence[Callable[[dict[str, Any]], Any]] = (),
    model: nn.Module | None = None,
    data: Any = None,
    overwrite: bool = False,
) -> RunDir:
    """Train one run and record every epoch in the run directory ``out``.

    A complete run with the same settings is returned as it is; an interrupted one resumes from
    ``checkpoints/last.pt``. A directory holding a run with other settings is an error unless
    ``overwrite=True`` (which deletes that run's files).

    Args:
        config: a :class:`TrainConfig` or a dict of its fields.
        out: the run directory.
        progress: show a tqdm progress bar over epochs (rank 0).
        callbacks: ``callback(row)`` called with each epoch's history row (a dict) after it is
            written; e.g. :class:`xai_sparsity.runs.analysis.EarlyWarning`. A callback may raise
            :class:`StopTraining` to end the run after that epoch.
        model: any ``nn.Module`` to train instead of ``make_model(config...)``; it is not
            re-created on resume, so pass a freshly built one (same seed) when resuming.
        data: a :class:`xai_sparsity.training.data.DataBundle` instead of ``load_data(config...)``.
        overwrite: replace a different run already in ``out``.

    Returns:
        The :class:`~xai_sparsity.runs.rundir.RunDir`.
    """
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    cfg.validate()
    if cfg.penalty_layers == "auto" and cfg.penalty_lambda > 0 and not cfg.penalty_baseline:
        raise XaiSparsityError(
            "penalty_layers='auto' needs penalty_baseline=RUN_DIR (a finished baseline run); "
            "run_experiment fills it in from its 'baseline' arm"
        )
    rank, world = _dist()
    device = resolve_device(cfg.device, rank, world)
    _set_determinism(cfg.deterministic, device)
    run = _prepare_run_dir(cfg, Path(out), rank, world, overwrite=overwrite)
    if run.is_complete:
        return run
    t_start = time.perf_counter()
    s = _set_up(cfg, run, rank, world, device, model, data)
    _resume(s)
    stopped = _run_epochs(s, progress, callbacks)
    if rank == 0:
        _finish(
            run,
            cfg,
            s.penalty_layers,
            s.best_epoch,
            s.epoch_times,
            time.perf_counter() - t_start,
            device,
            world,
            stopped,
        )
    _barrier(world)
    return run


def _gather_rng(world: int) -> Any:
    state = _rng_state()
    if world <= 1:
        return state
    import torch.distributed as dist

    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, state)
    return gathered


_NEW_FIELD_DEFAULTS: dict[str, Any] = {"val_size": 0, "signals": [], "ww_every": 1}
"""Fields added after runs were written: a run without them had these values."""


def _prepare_run_dir(
    cfg: TrainConfig, path: Path, rank: int, world: int, *, overwrite: bool
) -> RunDir:
    """Create (rank 0) or check the run directory; refuse to mix runs with other settings.

    ``config.json`` holds every TrainConfig field plus ``source: "trainer"``,
    ``penalty_layers_resolved`` (after the run) and the package version.
    """
    settings = cfg.to_dict()
    if rank == 0:
        run = RunDir(path, create=True)
        old_cfg = run.config
        has_run = run.history_path.exists() or run.checkpoint_path("last").exists() or bool(old_cfg)
        if has_run:
            old = (
                {k: old_cfg.get(k, _NEW_FIELD_DEFAULTS.get(k)) for k in settings}
                if old_cfg.get("source") == "trainer"
                else None
            )
            same = old is not None and _same_settings(old, settings)
            if not same and not overwrite:
                if old is None:
                    what = f"a run written by {old_cfg.get('source', 'something else')!r}"
                else:
                    diff = sorted(k for k in settings if old.get(k) != settings[k] and k != "arm")
                    what = f"a run with other settings (differing: {diff})"
                raise XaiSparsityError(
                    f"{str(path)!r} holds {what}; use another folder or overwrite=True "
                    "(--overwrite) to replace it"
                )
            if not same:
                for name in ("history.csv", "summary.json", "probe.npz", "config.json"):
                    (path / name).unlink(missing_ok=True)
                for folder in ("arrays", "checkpoints"):
                    shutil.rmtree(path / folder, ignore_errors=True)
                old_cfg = {}
        run.write_config(
            {
                **old_cfg,
                **settings,
                "source": "trainer",
                "xai_sparsity_version": __version__,
            }
        )
    _barrier(world)
    return run if rank == 0 else RunDir(path)


def _finish(
    run: RunDir,
    cfg: TrainConfig,
    penalty_layers: list[str],
    best_epoch: int,
    epoch_times: list[float],
    wall: float,
    device: torch.device,
    world: int,
    stopped: bool,
) -> None:
    df = run.history()
    summary: dict[str, Any] = {
        "arm": cfg.arm,
        "epochs": int(df["epoch"].max()) if len(df) else 0,
        "stopped_early": stopped,
        "best_test_acc": float(df["test_acc"].max()) if len(df) else None,
        "best_test_acc_epoch": (
            int(df["epoch"].iloc[int(np.argmax(df["test_acc"].to_numpy()))]) if len(df) else None
        ),
        "final_test_acc": float(df["test_acc"].iloc[-1]) if len(df) else None,
        "min_test_loss": float(df["test_loss"].min()) if len(df) else None,
        "min_test_loss_epoch": best_epoch,
        "final_test_loss": float(df["test_loss"].iloc[-1]) if len(df) else None,
        "penalty_lambda": cfg.penalty_lambda,
        "penalty_layers": penalty_layers,
        "device": str(device),
        "world_size": world,
        "seconds_training": float(sum(epoch_times)),
        "seconds_per_epoch": float(np.mean(epoch_times)) if epoch_times else None,
        "seconds_this_session": wall,
    }
    try:
        from xai_sparsity.runs.analysis import analyze

        summary["analysis"] = analyze(df).to_dict()
    except XaiSparsityError as err:
        summary["analysis"] = {"error": str(err)}
    run.write_config({**run.config, "penalty_layers_resolved": penalty_layers})
    run.mark_complete(summary)


# ----------------------------------------------------------------------------------------------
# Experiments


def run_experiment(
    config: TrainConfig | Mapping[str, Any],
    arms: Sequence[str],
    out: str | os.PathLike[str],
    *,
    progress: bool = True,
    callbacks: Sequence[Callable[[dict[str, Any]], Any]] = (),
) -> dict[str, RunDir]:
    """Train several arms with the same seed, data order and schedule; one run dir per arm.

    Args:
        config: the shared settings; each arm switches its regularisers on (see
            :func:`arm_config`).
        arms: e.g. ``["baseline", "penalty", "dropout", "batchnorm", "penalty+batchnorm"]`` or a
            lambda sweep ``["baseline", "penalty@0.1", "penalty@1"]``.
        out: the experiment folder; arm ``a`` is written to ``out/a``.

    ``penalty_layers="auto"`` takes the targets from this experiment's ``"baseline"`` arm (which
    is then trained first); when that baseline did not turn or no layer rose before its t_L,
    the deepest penalisable layer is used and a warning says so.
    """
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    if isinstance(arms, str):
        arms = [a for a in arms.split(",") if a.strip()]
    arms = [a.strip() for a in arms]
    if not arms:
        raise XaiSparsityError("arms=[] names no arm; e.g. ['baseline', 'penalty']")
    dup = sorted({a for a in arms if arms.count(a) > 1})
    if dup:
        raise XaiSparsityError(f"arms {dup} are listed twice")
    configs = {a: arm_config(cfg, a) for a in arms}
    order = sorted(arms, key=lambda a: a != "baseline")
    base = Path(out)
    base.mkdir(parents=True, exist_ok=True)
    from xai_sparsity.base.files import atomic_write_json

    atomic_write_json(base / "experiment.json", {"arms": list(arms), "settings": cfg.to_dict()})
    runs: dict[str, RunDir] = {}
    for arm in order:
        arm_cfg = configs[arm]
        if arm_cfg.penalty_lambda > 0 and arm_cfg.penalty_layers == "auto":
            arm_cfg = resolve_auto_targets(arm_cfg, runs.get("baseline"), base / arm)
        runs[arm] = train(arm_cfg, base / _folder(arm), progress=progress, callbacks=callbacks)
    return {a: runs[a] for a in arms}


def _folder(arm: str) -> str:
    return arm.replace("/", "_").replace(os.sep, "_")


def resolve_auto_targets(cfg: TrainConfig, baseline: RunDir | None, where: Path) -> TrainConfig:
    from xai_sparsity.training.penalty import auto_targets

    if cfg.penalty_baseline:
        return cfg
    if baseline is None:
        raise XaiSparsityError(
            "penalty_layers='auto' in an experiment needs a 'baseline' arm (or penalty_baseline)"
        )
    try:
        targets = auto_targets(baseline)
    except XaiSparsityError as err:
        targets = []
        reason = str(err)
    else:
        reason = "no conv layer's sparsity rose before the baseline's held-out-loss minimum"
    if targets:
        return cfg.replace(penalty_layers=targets, penalty_baseline=str(baseline.path))
    fallback = _deepest_penalisable(baseline)
    warnings.warn(
        f"automatic targeting for {where.name!r}: {reason}; penalising the deepest conv "
        f"activation {fallback!r} instead",
        stacklevel=3,
    )
    return cfg.replace(penalty_layers=[fallback])


def _deepest_penalisable(baseline: RunDir) -> str:
    """The last measured layer that has spatial maps (a conv activation) in the baseline."""
    from xai_sparsity.training.penalty import feature_map_layers

    layers = feature_map_layers(baseline)
    if not layers:
        raise XaiSparsityError(f"baseline run {baseline.name!r} has no measured layers")
    return layers[-1]
