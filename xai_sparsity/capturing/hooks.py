"""Layer discovery and hook-based capture of activations or of their sparsity.

Two steps, as in torchvision's feature extraction: :func:`list_layers` discovers what a model
computes (one probe forward), :func:`capture` records the outputs of the selected layers while a
``with`` block runs.

>>> import torch, torch.nn as nn
>>> from xai_sparsity.capturing.hooks import capture, list_layers
>>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
>>> x = torch.randn(2, 3, 8, 8)
>>> list_layers(net, x).names
['0', '1', '2', '3']
>>> with capture(net, ["1"]) as cap:
...     _ = net(x)
>>> cap.activations["1"].shape
torch.Size([2, 4, 6, 6])

Hooks are global state of the model: they are added in ``__enter__`` and removed in ``finally``,
also when the block raises, and a capture never changes train/eval flags or BatchNorm statistics.
Module hooks see modules only: functional calls (``torch.relu(x)``, ``x + y``) and direct calls of
``module.forward(...)`` are invisible to them.
"""

from __future__ import annotations

import fnmatch
import html
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import astuple, dataclass, fields
from typing import TYPE_CHECKING, Any, Literal, overload

import torch
from torch import Tensor, nn

from xai_sparsity.base.errors import XaiSparsityError, check_choice, closest
from xai_sparsity.base.modules import eval_mode, model_device, unwrap

if TYPE_CHECKING:
    import pandas as pd

    from xai_sparsity.measuring.engine import Plan, Sums

StatsFn = Callable[[str, Tensor, "dict[str, Tensor]", "Sums | None"], None]
"""``stats_fn(name, output, values, sums)`` of :func:`capture` (reduce mode)."""

__all__ = [
    "Capture",
    "LayerInfo",
    "LayerSpec",
    "LayerTable",
    "capture",
    "layer_kind",
    "list_layers",
    "resolve_layers",
]

SCOPES: tuple[str, ...] = ("layer", "channel", "spatial")
MODES: tuple[str, ...] = ("keep", "reduce")
ON_REUSE: tuple[str, ...] = ("per_call", "warn", "error")

_ACTIVATION_NAMES: tuple[str, ...] = (
    "ReLU",
    "ReLU6",
    "LeakyReLU",
    "PReLU",
    "RReLU",
    "ELU",
    "SELU",
    "CELU",
    "GELU",
    "SiLU",
    "Mish",
    "Sigmoid",
    "Tanh",
    "Hardswish",
    "Hardsigmoid",
    "Hardtanh",
    "Softplus",
    "Softsign",
    "Softshrink",
    "Hardshrink",
    "Tanhshrink",
    "Threshold",
    "LogSigmoid",
    "GLU",
    "Softmax",
    "Softmin",
    "LogSoftmax",
    "Softmax2d",
)
ACTIVATION_TYPES: tuple[type[nn.Module], ...] = tuple(
    getattr(nn, n) for n in _ACTIVATION_NAMES if hasattr(nn, n)
)
CONV_TYPES: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd,)
LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Bilinear)
NORM_TYPES: tuple[type[nn.Module], ...] = tuple(
    t
    for t in (
        nn.modules.batchnorm._NormBase,
        getattr(nn, "LayerNorm", None),
        getattr(nn, "GroupNorm", None),
        getattr(nn, "LocalResponseNorm", None),
        getattr(nn, "RMSNorm", None),
    )
    if t is not None
)
POOL_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._LPPoolNd,
    nn.FractionalMaxPool2d,
    nn.FractionalMaxPool3d,
)

LayerSpec = (
    None
    | str
    | type[nn.Module]
    | nn.Module
    | Callable[[str, nn.Module], bool]
    | Sequence["str | type[nn.Module] | nn.Module | Callable[[str, nn.Module], bool]"]
)
"""What :func:`resolve_layers` accepts; see there."""


def layer_kind(module: nn.Module) -> str:
    """The kind of a module: ``"conv"``, ``"activation"``, ``"linear"``, ``"norm"``, ``"pool"``
    or ``"other"``.

    >>> layer_kind(nn.Conv2d(1, 1, 3)), layer_kind(nn.ReLU()), layer_kind(nn.Sequential())
    ('conv', 'activation', 'other')
    """
    for kind, types in (
        ("conv", CONV_TYPES),
        ("activation", ACTIVATION_TYPES),
        ("linear", LINEAR_TYPES),
        ("norm", NORM_TYPES),
        ("pool", POOL_TYPES),
    ):
        if isinstance(module, types):
            return kind
    return "other"


def _named_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """All named submodules of ``model`` (unwrapped), in registration order, root excluded."""
    return [(n, m) for n, m in unwrap(model).named_modules() if n]


# ----------------------------------------------------------------------------- layer discovery


@dataclass(frozen=True)
class LayerInfo:
    """One module of a model as seen by one probe forward.

    ``output_shape`` is per sample (batch dimension dropped); ``calls`` counts the calls in one
    forward (``> 1``: :func:`capture` names them ``name#0``, ``name#1``, ...); ``inplace_after``
    is True when an in-place operation later in the forward modified the output (capture it with
    ``clone=True`` or in reduce mode).
    """

    name: str
    type: str
    output_shape: tuple[int, ...]
    bytes_per_sample: int
    calls: int
    inplace_after: bool
    kind: str


class LayerTable(Sequence[LayerInfo]):
    """The result of :func:`list_layers`: a sequence of :class:`LayerInfo` in call order.

    ``str(table)`` is an aligned text table, ``table.to_dataframe()`` a pandas DataFrame, and in
    Jupyter the table renders as HTML. Index by position or by layer name.
    """

    def __init__(self, rows: Iterable[LayerInfo]) -> None:
        self._rows: list[LayerInfo] = list(rows)
        self._by_name = {r.name: r for r in self._rows}

    @overload
    def __getitem__(self, index: int) -> LayerInfo: ...
    @overload
    def __getitem__(self, index: slice) -> LayerTable: ...
    @overload
    def __getitem__(self, index: str) -> LayerInfo: ...
    def __getitem__(self, index: int | slice | str) -> LayerInfo | LayerTable:
        if isinstance(index, str):
            try:
                return self._by_name[index]
            except KeyError:
                raise XaiSparsityError(
                    f"layer {index!r} is not in the table; closest: {closest(index, self.names)}"
                ) from None
        if isinstance(index, slice):
            return LayerTable(self._rows[index])
        return self._rows[index]

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def names(self) -> list[str]:
        """Module names in call order."""
        return [r.name for r in self._rows]

    def _cells(self) -> tuple[list[str], list[list[str]]]:
        header = [f.name for f in fields(LayerInfo)]
        rows = []
        for r in self._rows:
            cells = []
            for v in astuple(r):
                if isinstance(v, tuple):
                    cells.append("x".join(str(d) for d in v) if v else "()")
                elif isinstance(v, bool):
                    cells.append("yes" if v else "")
                else:
                    cells.append(str(v))
            rows.append(cells)
        return header, rows

    def __str__(self) -> str:
        header, rows = self._cells()
        widths = [max(len(c) for c in col) for col in zip(header, *rows, strict=False)]
        numeric = {"bytes_per_sample", "calls"}

        def line(cells: list[str]) -> str:
            return "  ".join(
                c.rjust(w) if h in numeric else c.ljust(w)
                for c, w, h in zip(cells, widths, header, strict=True)
            ).rstrip()

        out = [line(header), line(["-" * w for w in widths])]
        out += [line(r) for r in rows]
        return "\n".join(out)

    def __repr__(self) -> str:
        return f"LayerTable({len(self)} layers)\n{self}"

    def _repr_html_(self) -> str:
        header, rows = self._cells()
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def to_dataframe(self) -> pd.DataFrame:
        """The table as a pandas DataFrame, one row per module."""
        import pandas as pd

        cols = [f.name for f in fields(LayerInfo)]
        return pd.DataFrame([astuple(r) for r in self._rows], columns=cols)


def _call(model: nn.Module, example_input: Any) -> Any:
    """Call the model on a tensor, a tuple/list of positional args or a dict of keyword args."""
    if isinstance(example_input, Tensor):
        return model(example_input)
    if isinstance(example_input, (tuple, list)):
        return model(*example_input)
    if isinstance(example_input, Mapping):
        return model(**example_input)
    raise XaiSparsityError(
        f"example_input must be a Tensor, a tuple/list of positional inputs or a dict of "
        f"keyword inputs, got {type(example_input).__name__}"
    )


def list_layers(model: nn.Module, example_input: Any) -> LayerTable:
    """Discover the modules of ``model`` that produce a tensor, with one probe forward.

    The probe runs under ``torch.no_grad`` with every submodule temporarily in eval mode (each
    submodule's own flag is restored afterwards, also on error), so BatchNorm statistics do not
    change. Modules are listed in call order (the order in which their forward starts, so a
    container comes before its children); modules that never ran or returned no tensor are left
    out.

    Args:
        model: any ``nn.Module`` (DataParallel/DDP wrappers are looked through).
        example_input: a batch ``(B, ...)`` (moved to the model's device), or a tuple/list of
            positional inputs, or a dict of keyword inputs.

    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(inplace=True))
    >>> t = list_layers(net, torch.randn(2, 3, 10, 10))
    >>> t[0].output_shape, t[0].bytes_per_sample, t[0].inplace_after
    ((8, 8, 8), 2048, True)
    """
    root = unwrap(model)
    if isinstance(example_input, Tensor):
        device = model_device(root)
        if device is not None and example_input.device != device:
            example_input = example_input.to(device)
    named = _named_layers(root)
    order: dict[str, int] = {}
    calls: dict[str, int] = {}
    first: dict[str, tuple[tuple[int, ...], int]] = {}
    seen_outputs: list[tuple[str, Tensor, int | None]] = []
    batch = [example_input.shape[0] if isinstance(example_input, Tensor) else None]

    def pre_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            order.setdefault(name, len(order))
            if batch[0] is None:  # non-tensor example input: first tensor argument gives B
                for a in args:
                    if isinstance(a, Tensor) and a.dim() > 0:
                        batch[0] = a.shape[0]
                        break

        return hook

    def fwd_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not isinstance(output, Tensor):
                return
            calls[name] = calls.get(name, 0) + 1
            seen_outputs.append((name, output, _version_of(output)))
            if name not in first:
                b = output.shape[0] if output.dim() > 0 else 1
                b = b or 1
                per_sample = output.numel() // b * output.element_size()
                first[name] = (tuple(output.shape[1:]), per_sample)

        return hook

    handles = []
    try:
        for name, module in named:
            handles.append(module.register_forward_pre_hook(pre_hook(name)))
            handles.append(module.register_forward_hook(fwd_hook(name)))
        with eval_mode(root), torch.no_grad():
            _call(model, example_input)
    finally:
        for h in handles:
            h.remove()
    inplace = {n for n, t, v in seen_outputs if v is not None and t._version != v}
    seen_outputs.clear()
    modules = dict(named)
    rows = [
        LayerInfo(
            name=n,
            type=type(modules[n]).__name__,
            output_shape=first[n][0],
            bytes_per_sample=first[n][1],
            calls=calls[n],
            inplace_after=n in inplace,
            kind=layer_kind(modules[n]),
        )
        for n in sorted(first, key=lambda n: order.get(n, len(order)))
    ]
    return LayerTable(rows)


# ----------------------------------------------------------------------------- layer selection


def _is_default_layer(name: str, module: nn.Module) -> bool:
    return layer_kind(module) in ("conv", "activation")


def _describe(item: Any) -> str:
    if isinstance(item, type):
        return f"type {item.__name__}"
    if isinstance(item, nn.Module):
        return f"module {type(item).__name__}"
    if callable(item):
        return f"predicate {getattr(item, '__name__', repr(item))}"
    return repr(item)


def _matches(item: Any, named: list[tuple[str, nn.Module]]) -> list[str]:
    if isinstance(item, str):
        if any(c in item for c in "*?["):
            return [n for n, _ in named if fnmatch.fnmatchcase(n, item)]
        return [n for n, _ in named if n == item]
    if isinstance(item, type):
        if not issubclass(item, nn.Module):
            raise XaiSparsityError(f"layer type {item.__name__} is not an nn.Module subclass")
        return [n for n, m in named if isinstance(m, item)]
    if isinstance(item, nn.Module):
        return [n for n, m in named if m is item]
    if callable(item):
        return [n for n, m in named if bool(item(n, m))]
    raise XaiSparsityError(
        f"cannot select layers with {item!r} ({type(item).__name__}); use a name or glob "
        f"pattern (str), an nn.Module subclass, a submodule, a callable(name, module) -> bool, "
        f"or a list of these"
    )


def resolve_layers(model: nn.Module, spec: LayerSpec = None) -> list[str]:
    """The names of the submodules of ``model`` selected by ``spec``, in registration order.

    ``spec`` is one of, or a list/tuple of:

    - ``None``: every convolution and activation module (``kind`` "conv" or "activation");
    - a ``str``: an exact module name, or a glob pattern (``"features.*"``, ``"layer?.0.relu"``);
    - an ``nn.Module`` subclass: every instance of it (``nn.Conv2d``);
    - an ``nn.Module`` that is a submodule of ``model``;
    - a ``callable(name, module) -> bool``.

    A spec item that matches nothing raises :class:`XaiSparsityError` naming the item and the
    closest valid names. DataParallel/DDP wrappers are looked through (their ``module.`` prefix
    is not part of the names).

    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2))
    >>> resolve_layers(net), resolve_layers(net, nn.Linear), resolve_layers(net, ["0", "?"])
    (['0', '1'], ['3'], ['0', '1', '2', '3'])
    """
    named = _named_layers(model)
    if spec is None:
        names = [n for n, m in named if _is_default_layer(n, m)]
        if not names:
            raise XaiSparsityError(
                f"{type(unwrap(model)).__name__} has no convolution or activation modules to "
                f"select by default; pass layers= (names: {[n for n, _ in named][:10]})"
            )
        return names
    items: Sequence[Any] = (
        spec if isinstance(spec, (list, tuple)) and not isinstance(spec, str) else [spec]
    )
    if len(items) == 0:
        raise XaiSparsityError("layers=[] selects nothing; pass None for the default layers")
    selected: set[str] = set()
    for item in items:
        found = _matches(item, named)
        if not found:
            all_names = [n for n, _ in named]
            if isinstance(item, str):
                near = closest(item.replace("*", "").replace("?", ""), all_names)
                hint = (
                    f"closest names: {near}"
                    if near
                    else f"top-level names: {[n for n in all_names if '.' not in n][:12]}"
                )
            elif isinstance(item, type):
                types = sorted({type(m).__name__ for _, m in named})
                hint = f"module types in the model: {types}"
            else:
                hint = f"some names: {all_names[:8]}"
            raise XaiSparsityError(
                f"layer spec {_describe(item)} matches no submodule of "
                f"{type(unwrap(model)).__name__}; {hint}"
            )
        selected.update(found)
    return [n for n, _ in named if n in selected]


# ----------------------------------------------------------------------------- capture


def _version_of(t: Tensor) -> int | None:
    """``t._version``, or None for inference-mode tensors (they have no version counter)."""
    return None if t.is_inference() else t._version


class _Chunk:
    """One recorded tensor and the version it had when recorded."""

    __slots__ = ("tensor", "version")

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor
        self.version = _version_of(tensor)


class _LazyView(Mapping[str, Any]):
    """A read-only mapping whose values are built (concatenated, checked) on access."""

    def __init__(self, keys: Callable[[], list[str]], get: Callable[[str], Any], what: str) -> None:
        self._keys, self._get, self._what = keys, get, what

    def __getitem__(self, key: str) -> Any:
        return self._get(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    def __contains__(self, key: object) -> bool:
        return key in self._keys()

    def __repr__(self) -> str:
        return f"<{self._what}: {self._keys()}>"


def _first_tensor(name: str, output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    raise XaiSparsityError(
        f"layer {name!r} returned {type(output).__name__}, not a Tensor; capture a submodule "
        f"that returns a tensor (see list_layers)"
    )


def _check_measure_options(
    options: Mapping[str, Any], registry: Mapping[str, Callable[..., Tensor]]
) -> None:
    """Validate measure_options keys against each measure's keyword arguments, up front."""
    import inspect

    for m, opts in options.items():
        if m not in registry or not isinstance(opts, Mapping):
            continue  # reported by the caller with its own message
        accepted = [p for p in inspect.signature(registry[m]).parameters if p not in ("x", "scope")]
        for key in opts:
            if key not in accepted:
                raise XaiSparsityError(
                    f"measure_options[{m!r}] has option {key!r}, which {m!r} does not take; "
                    f"its options are {accepted}"
                )


def scope_applies(scope: str, out: Tensor) -> bool:
    """Whether ``scope`` gives N >= 2 units for ``out`` (B, C, ...): (B, F) outputs have no
    channel/spatial scope, a 1x1 map no channel scope, a one-channel map no spatial scope."""
    from xai_sparsity.measuring.engine import scope_size

    return scope_size(scope, out.shape) >= 2


def _check_reduce_options(
    mode: str,
    measures: tuple[str, ...],
    scopes: tuple[str, ...],
    options: Mapping[str, Any],
    reduce_fn: Any,
    stats_fn: Any,
) -> None:
    """The measure, option and callback arguments of :class:`Capture`, checked up front."""
    if mode == "reduce":
        from xai_sparsity.measuring.measures import MEASURES

        for m in measures:
            check_choice("measure", m, tuple(MEASURES))
        _check_measure_options(options, MEASURES)
        if not measures and reduce_fn is None and stats_fn is None:
            raise XaiSparsityError("mode='reduce' needs measures=(...) or a reduce_fn")
        if not scopes and measures:
            raise XaiSparsityError("mode='reduce' needs at least one scope")
    for m, opts in options.items():
        if m not in measures:
            raise XaiSparsityError(
                f"measure_options has key {m!r}, which is not among measures={measures}"
            )
        if not isinstance(opts, Mapping):
            raise XaiSparsityError(
                f"measure_options[{m!r}] must be a dict of keyword arguments, got {opts!r}"
            )
    if reduce_fn is not None and not callable(reduce_fn):
        raise XaiSparsityError(f"reduce_fn must be callable(name, output), got {reduce_fn!r}")
    if stats_fn is not None and (mode != "reduce" or not callable(stats_fn)):
        raise XaiSparsityError(
            f"stats_fn must be callable(name, output, values, sums) with mode='reduce', "
            f"got {stats_fn!r} with mode={mode!r}"
        )


_RELU_FEEDS: weakref.WeakKeyDictionary[nn.Module, set[str]] = weakref.WeakKeyDictionary()
"""Per model: the layers whose output a selected ``nn.ReLU`` takes as input, learnt by reduce-mode
captures (a hint only: every use is checked by tensor identity and version)."""


def _hook(ref: weakref.ReferenceType[Capture], name: str) -> Callable[..., None]:
    # The hook holds the Capture weakly: a hook left on a module can never keep tensors alive.
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        cap = ref()
        if cap is not None:
            cap._record(name, output, module, args)

    return hook


def _root_pre_hook(ref: weakref.ReferenceType[Capture]) -> Callable[..., None]:
    def hook(module: nn.Module, args: Any) -> None:
        cap = ref()
        if cap is not None:
            cap._forward_begins()

    return hook


def _root_post_hook(ref: weakref.ReferenceType[Capture]) -> Callable[..., None]:
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        cap = ref()
        if cap is not None:
            cap._forward_ends()

    return hook


class Capture:
    """Records what the selected layers compute while a ``with`` block runs.

    Build it with :func:`capture`. Attributes:

    - ``layers``: the resolved module names; ``activations`` (keep mode) and ``stats`` (reduce
      mode) are keyed by them, a module called k > 1 times per forward by ``name#0`` ..
      ``name#{k-1}``;
    - ``activations[name]``: (B_total, ...) detached outputs, concatenated over the forwards;
    - ``stats[name][f"{measure}:{scope}"]``: per-sample values, (B,), (B, C) or (B, H, W);
    - ``missing``: selected layers that have not run; ``reused``: modules called more than once
      in one forward.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: LayerSpec = None,
        *,
        mode: str = "keep",
        offload: bool = False,
        clone: bool = False,
        measures: Sequence[str] = ("perplexity",),
        scopes: Sequence[str] = ("layer",),
        measure_options: Mapping[str, Mapping[str, Any]] | None = None,
        differentiable: bool = False,
        reduce_fn: Callable[[str, Tensor], None] | None = None,
        on_reuse: str = "per_call",
        check_finite: bool = True,
        kernel: str | None = None,
        stats_fn: StatsFn | None = None,
    ) -> None:
        self.mode = check_choice("mode", mode, MODES)
        if kernel is not None:
            from xai_sparsity.measuring.engine import KERNELS

            check_choice("kernel", kernel, KERNELS)
        self.kernel = kernel
        self.on_reuse = check_choice("on_reuse", on_reuse, ON_REUSE)
        if isinstance(measures, str):
            measures = (measures,)
        if isinstance(scopes, str):
            scopes = (scopes,)
        self.measures: tuple[str, ...] = tuple(measures)
        self.scopes: tuple[str, ...] = tuple(scopes)
        for s in self.scopes:
            check_choice("scope", s, SCOPES)
        options = dict(measure_options or {})
        _check_reduce_options(mode, self.measures, self.scopes, options, reduce_fn, stats_fn)
        self.stats_fn = stats_fn
        self.measure_options: dict[str, dict[str, Any]] = {m: dict(o) for m, o in options.items()}
        self.offload = bool(offload)
        self.clone = bool(clone)
        self.differentiable = bool(differentiable)
        self.reduce_fn = reduce_fn
        self.check_finite = bool(check_finite)
        self._model = model
        self._root = unwrap(model)
        self.layers: list[str] = resolve_layers(self._root, layers)
        self._modules = dict(_named_layers(self._root))
        self._handles: list[Any] = []
        self._active = False
        self._measure_fn: Callable[..., Tensor] | None = None
        self.clear()
        self._seen: set[str] = set()
        self.reused: set[str] = set()
        self._warned_reuse: set[str] = set()
        self._depth = 0
        self._calls: dict[str, int] = {}
        self._forwards = 0
        self._pending_sync = False
        self._plan = self._engine_plan()
        # layer -> ReLU sharing (see _engine_values): the last measured output, the layers whose
        # output a measured ReLU consumes, and the relu(x) sums of the last such output
        self._last: tuple[str, weakref.ReferenceType[Tensor], int] | None = None
        self._feeds_relu: set[str] = _RELU_FEEDS.setdefault(self._root, set())
        self._pos_sums: tuple[weakref.ReferenceType[Tensor], int, Sums] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Capture:
        if self._active:
            raise XaiSparsityError("this Capture is already active; create a new one to nest")
        if self.mode == "reduce" and self.measures:
            from xai_sparsity.measuring.measures import compute_measure

            self._measure_fn = compute_measure
        ref = weakref.ref(self)
        try:
            self._handles.append(self._root.register_forward_pre_hook(_root_pre_hook(ref)))
            self._handles.append(
                self._root.register_forward_hook(_root_post_hook(ref), always_call=True)
            )
            for name in self.layers:
                self._handles.append(self._modules[name].register_forward_hook(_hook(ref, name)))
        except BaseException:
            self.remove_hooks()
            raise
        self._active = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove_hooks()
        self._depth = 0
        if exc[0] is None and self.missing:
            if not self._seen and self._forwards == 0:
                msg = "no forward pass of the model ran inside the capture block"
            else:
                msg = (
                    f"selected layers never ran inside the capture block: {self.missing}; they "
                    f"may be skipped by the model's forward or called as functions"
                )
            warnings.warn(msg, stacklevel=2)

    def remove_hooks(self) -> None:
        """Remove every hook this capture added (idempotent)."""
        handles, self._handles = self._handles, []
        for h in handles:
            h.remove()
        self._active = False

    def clear(self) -> None:
        """Drop every recorded tensor (call it once per training step in reduce mode)."""
        self._chunks: dict[tuple[str, int], list[_Chunk]] = {}
        self._stat_chunks: dict[tuple[str, int], dict[str, list[Tensor]]] = {}
        self._checked: set[tuple[str, int, str]] = set()

    # -- hook side ---------------------------------------------------------------------------

    def _forward_begins(self) -> None:
        if self._depth == 0:
            self._calls = {}
            self._forwards += 1
        self._depth += 1

    def _forward_ends(self) -> None:
        self._depth = max(0, self._depth - 1)

    def _call_index(self, name: str) -> int:
        if self._depth == 0:  # a submodule called outside a forward of the model
            return 0
        k = self._calls.get(name, 0)
        self._calls[name] = k + 1
        if k > 0:
            self.reused.add(name)
            if self.on_reuse == "error":
                raise XaiSparsityError(
                    f"layer {name!r} ran {k + 1} times in one forward; capture with "
                    f"on_reuse='per_call' to get {name}#0, {name}#1, ... or give each call its "
                    f"own module"
                )
            if self.on_reuse == "warn":
                if name not in self._warned_reuse:
                    self._warned_reuse.add(name)
                    warnings.warn(
                        f"layer {name!r} runs more than once per forward; keeping only its last "
                        f"call. Use on_reuse='per_call' to capture each call as {name}#k.",
                        stacklevel=4,
                    )
                return -k  # marks "replace the previous call of this forward"
        return k

    def _store(self, store: dict[tuple[str, int], list[Any]], name: str, k: int, item: Any) -> None:
        if k < 0:  # on_reuse="warn": the last call wins
            store[(name, 0)][-1] = item
        else:
            store.setdefault((name, k), []).append(item)

    def _to_host(self, t: Tensor) -> Tensor:
        if not self.offload or t.device.type == "cpu":
            return t
        self._pending_sync = True
        return t.to("cpu", non_blocking=True)

    def _engine_plan(self) -> Plan | None:
        """The measures x scopes that the statistics engine computes in the hook (reduce mode;
        with ``differentiable`` the perplexity and entropy measures); the rest go through the
        measure functions."""
        if self.mode != "reduce" or not self.measures:
            return None
        from xai_sparsity.measuring.engine import Plan

        plan = Plan(
            self.measures, self.scopes, self.measure_options, channel=self.stats_fn is not None
        )
        return plan if plan else None

    def _shared_sums(self, module: nn.Module | None, args: Any) -> Sums | None:
        """The sums of a ``nn.ReLU``'s output computed by the pass of its input, when that input
        is the output measured just before (same tensor; ``_version`` unchanged, or +1 for
        ``inplace=True``). Learns the pairing on a first forward (kept per model in
        ``_RELU_FEEDS``: the next pass of that layer adds the relu(x) sums)."""
        inp = args[0] if args and isinstance(args[0], Tensor) else None
        pos = None
        if type(module) is nn.ReLU and inp is not None and not inp.is_inference():
            want = inp._version - (1 if module.inplace else 0)
            if self._pos_sums is not None:
                ref, version, sums = self._pos_sums
                if ref() is inp and version == want:
                    pos = sums.positive()  # relu output: |a| = relu(a) = relu(input)
            if pos is None and self._last is not None:
                src, ref, version = self._last
                if ref() is inp and version == want:
                    self._feeds_relu.add(src)
        self._pos_sums = None
        return pos

    def _engine_values(
        self, plan: Plan, name: str, out: Tensor, module: nn.Module | None, args: Any
    ) -> tuple[dict[str, Tensor], Sums | None]:
        """The values of ``plan`` from one pass of the statistics engine over ``out`` (or from
        the pass of the layer before, for a ReLU; see :meth:`_shared_sums`). Returns ({}, None)
        to fall back to the measure functions: CPU output with NaN/Inf (they report it; on
        accelerators the check would wait for the device, and the values hold the NaN)."""
        from xai_sparsity.measuring.engine import batch_sums, sums_finite

        sums = self._shared_sums(module, args)
        if sums is None:
            relu = name in self._feeds_relu
            sums = batch_sums(out, plan.request(out, relu=relu), kernel=self.kernel)
            if out.device.type == "cpu" and not sums_finite(sums):
                self._last = None
                return {}, None
            version = _version_of(out)
            if version is None:  # inference mode: no version counter, so no sharing
                self._last = None
            else:
                if relu:
                    self._pos_sums = (weakref.ref(out), version, sums)
                self._last = (name, weakref.ref(out), version)
        return plan.values(sums, out), sums

    def _reduce(
        self, name: str, out: Tensor, module: nn.Module | None, args: Any
    ) -> dict[str, Tensor]:
        """Every requested measure x scope of one output, keyed ``f"{measure}:{scope}"``."""
        fast: dict[str, Tensor] = {}
        sums = None
        if self._plan is not None and out.is_floating_point():
            if self.differentiable:
                with torch.enable_grad():
                    fast = self._plan.grad_values(out)
            else:
                with torch.no_grad():
                    fast, sums = self._engine_values(self._plan, name, out, module, args)
        grad = torch.enable_grad() if self.differentiable else torch.no_grad()
        assert self._measure_fn is not None or not self.measures
        values: dict[str, Tensor] = {}
        with grad:
            for m in self.measures:
                opts = {**self.measure_options.get(m, {}), "check_finite": False}
                for s in self.scopes:  # check_finite: lazily on access, no host sync here
                    key = f"{m}:{s}"
                    if key in fast:
                        values[key] = self._to_host(fast[key])
                    elif scope_applies(s, out):
                        assert self._measure_fn is not None
                        values[key] = self._to_host(self._measure_fn(m, out, s, **opts))
        if self.stats_fn is not None:
            self.stats_fn(name, out, values, sums)
        return values

    def _record(
        self, name: str, output: Any, module: nn.Module | None = None, args: Any = ()
    ) -> None:
        out = _first_tensor(name, output)
        self._seen.add(name)
        k = self._call_index(name)
        call_name = name if abs(k) == 0 else f"{name}#{abs(k)}"
        if self.reduce_fn is not None:
            self.reduce_fn(call_name, out)
        if self.mode == "keep":
            t = out.detach()
            if self.clone:
                t = t.clone()
            t = self._to_host(t)
            self._store(self._chunks, name, k, _Chunk(t))
            return
        values = self._reduce(call_name, out, module, args)
        if not self.measures:
            return
        if k < 0:
            store = self._stat_chunks[(name, 0)]
            for key, v in values.items():
                store[key][-1] = v
        else:
            store = self._stat_chunks.setdefault((name, k), {})
            for key, v in values.items():
                store.setdefault(key, []).append(v)

    # -- read side ---------------------------------------------------------------------------

    def _names(self, keys: Iterable[tuple[str, int]]) -> dict[str, tuple[str, int]]:
        keys = list(keys)
        multi = {n for n, k in keys if k > 0} | (
            self.reused if self.on_reuse == "per_call" else set()
        )
        out: dict[str, tuple[str, int]] = {}
        order = {n: i for i, n in enumerate(self.layers)}
        for n, k in sorted(keys, key=lambda nk: (order.get(nk[0], 0), nk[1])):
            out[f"{n}#{k}" if n in multi else n] = (n, k)
        return out

    def _sync(self) -> None:
        if self._pending_sync and torch.cuda.is_available():
            torch.cuda.synchronize()
        self._pending_sync = False

    def _lookup(self, store: Mapping[tuple[str, int], Any], key: str, what: str) -> tuple[str, int]:
        names = self._names(store)
        if key not in names:
            if key in self.layers:
                raise XaiSparsityError(
                    f"layer {key!r} has no {what} yet (did a forward run inside the block? "
                    f"recorded: {list(names)})"
                )
            raise XaiSparsityError(
                f"{key!r} is not a captured layer; captured: {list(names)}; "
                f"closest: {closest(key, list(names) + self.layers)}"
            )
        return names[key]

    def _activation(self, key: str) -> Tensor:
        if self.mode != "keep":
            raise XaiSparsityError("activations are kept only with mode='keep'; use cap.stats")
        nk = self._lookup(self._chunks, key, "activations")
        chunks = self._chunks[nk]
        self._sync()
        for c in chunks:
            if c.version is not None and c.tensor._version != c.version:
                raise XaiSparsityError(
                    f"the output of layer {key!r} was modified in place after it was captured "
                    f"(e.g. by a following ReLU(inplace=True) or '+='), so it no longer holds "
                    f"what the layer computed. Capture with clone=True, or use mode='reduce' "
                    f"(measures are computed before any later in-place operation)."
                )
        if len(chunks) > 1:
            chunks[:] = [_Chunk(torch.cat([c.tensor for c in chunks], dim=0))]
        return chunks[0].tensor

    def _stats_of(self, key: str) -> dict[str, Tensor]:
        if self.mode != "reduce":
            raise XaiSparsityError("stats are computed only with mode='reduce'; use activations")
        nk = self._lookup(self._stat_chunks, key, "stats")
        per = self._stat_chunks[nk]
        self._sync()
        result = {}
        for mk, vals in per.items():
            if len(vals) > 1:
                vals[:] = [torch.cat(vals, dim=0)]
            v = vals[0]
            if self.check_finite and (nk[0], nk[1], mk) not in self._checked:
                if not bool(torch.isfinite(v.detach()).all()):
                    raise XaiSparsityError(
                        f"{mk} of layer {key!r} is not finite (NaN/Inf): the layer's output "
                        f"holds NaN or Inf values. Pass check_finite=False to keep them."
                    )
                self._checked.add((nk[0], nk[1], mk))
            result[mk] = v
        return result

    @property
    def activations(self) -> Mapping[str, Tensor]:
        """Layer name -> (B_total, ...) detached output, concatenated over forwards (keep mode)."""
        return _LazyView(lambda: list(self._names(self._chunks)), self._activation, "activations")

    @property
    def stats(self) -> Mapping[str, dict[str, Tensor]]:
        """Layer name -> {f"{measure}:{scope}": per-sample values} (reduce mode)."""
        return _LazyView(lambda: list(self._names(self._stat_chunks)), self._stats_of, "stats")

    @property
    def missing(self) -> list[str]:
        """Selected layers whose forward has not run while the capture was active."""
        return [n for n in self.layers if n not in self._seen]

    @property
    def active(self) -> bool:
        """True between ``__enter__`` and ``__exit__``."""
        return self._active

    def __repr__(self) -> str:
        state = "active" if self._active else "inactive"
        return f"Capture(mode={self.mode!r}, {len(self.layers)} layers, {state})"


def capture(
    model: nn.Module,
    layers: LayerSpec = None,
    *,
    mode: Literal["keep", "reduce"] | str = "keep",
    offload: bool = False,
    clone: bool = False,
    measures: Sequence[str] = ("perplexity",),
    scopes: Sequence[str] = ("layer",),
    measure_options: Mapping[str, Mapping[str, Any]] | None = None,
    differentiable: bool = False,
    reduce_fn: Callable[[str, Tensor], None] | None = None,
    on_reuse: Literal["per_call", "warn", "error"] | str = "per_call",
    check_finite: bool = True,
    kernel: Literal["eager", "compiled"] | str | None = None,
    stats_fn: StatsFn | None = None,
) -> Capture:
    """Capture the outputs (``mode="keep"``) or their sparsity (``mode="reduce"``) of layers.

    Use it as a context manager; hooks exist only inside the block::

        with capture(model, "features.*", mode="reduce", scopes=("layer", "spatial")) as cap:
            model(x)
        cap.stats["features.1"]["perplexity:spatial"]   # (B, H, W)

    Args:
        model: the model (DataParallel/DDP wrappers are looked through).
        layers: what :func:`resolve_layers` accepts; ``None`` = every conv and activation module.
        mode: ``"keep"`` stores detached outputs in ``cap.activations``; ``"reduce"`` computes
            ``measures`` x ``scopes`` in the hook, on the layer's device, into ``cap.stats``
            (a scope with fewer than 2 units is skipped: ``"channel"``/``"spatial"`` for (B, F)
            outputs, ``"channel"`` for 1x1 maps, ``"spatial"`` for one-channel maps).
        offload: move what is kept to the CPU (non-blocking where possible).
        clone: keep a copy of each output, safe against later in-place operations.
        measures: names from ``xai_sparsity.measuring.measures.MEASURES``.
        scopes: ``"layer"``, ``"channel"``, ``"spatial"``.
        measure_options: per measure keyword arguments, e.g.
            ``{"perplexity": {"variant": "relative"}}``.
        differentiable: reduce mode only: keep the autograd graph (for a training penalty);
            otherwise measures run under ``torch.no_grad``.
        reduce_fn: ``reduce_fn(name, output)`` called in every hook before anything else, with
            the raw output. ``name`` is the module name for a module's first call in a forward
            and ``name#k`` for its call k >= 1 (``cap.reused`` lists such modules, whose first
            call the stored results call ``name#0``).
        on_reuse: a module called several times in one forward: ``"per_call"`` keeps each call
            (``name#0``, ``name#1``, ...), ``"warn"`` keeps the last one and warns, ``"error"``
            raises.
        check_finite: reduce mode: raise when a stored measure holds NaN/Inf (checked on first
            access, not in the hook, so the hook never waits for the device).
        kernel: reduce mode: the measures come from one pass per layer of the statistics
            engine (:func:`xai_sparsity.measuring.engine.batch_sums`), with this kernel
            (``"eager"`` or ``"compiled"``; default :func:`~xai_sparsity.measuring.engine.get_kernel`).
            A ReLU right after a measured layer is measured from that layer's pass (its output
            is relu of the input), from the second forward on.
        stats_fn: reduce mode: ``stats_fn(name, output, values, sums)`` called in the hook with
            the values of the call (``name`` as for ``reduce_fn``) and the engine's
            :class:`~xai_sparsity.measuring.engine.Sums` per channel (None where the measure
            functions computed the values); :func:`~xai_sparsity.capturing.sweeps.sweep` uses it.

    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    >>> with capture(net, nn.ReLU, mode="reduce", scopes=("layer", "channel")) as cap:
    ...     _ = net(torch.randn(5, 3, 8, 8))
    >>> {k: tuple(v.shape) for k, v in cap.stats["1"].items()}
    {'perplexity:layer': (5,), 'perplexity:channel': (5, 4)}
    """
    return Capture(
        model,
        layers,
        mode=mode,
        offload=offload,
        clone=clone,
        measures=measures,
        scopes=scopes,
        measure_options=measure_options,
        differentiable=differentiable,
        reduce_fn=reduce_fn,
        on_reuse=on_reuse,
        check_finite=check_finite,
        kernel=kernel,
        stats_fn=stats_fn,
    )
