"""The statistics engine: every measure of a layer's output from one pass of sums.

One pass over an activation x (B, C, ...) gives, per sample b and unit (a channel, summed over its
positions; or one unit per sample), and with ``spatial`` also per position (summed over the
channels), the sums of a' = a / m_b, where a = |x| or relu(x) (the *transform*) and m_b is the
sample's mean of a (1 where it is 0; the mean of the finite values for a sample holding NaN/Inf):

    S = sum a'      T = sum a' ln a'      Q = K sum a'^2      Z = #{a <= tol}

Every measure of :mod:`xai_sparsity.measuring.measures` follows from them (the formulas live
once, in :func:`measure_from_sums` and the functions it calls):

    H = ln S - T / S,  PP = exp(H)   perplexity (both variants) and entropy sparsity
    ||a||_1 / ||a||_2 = S / sqrt(Q / K)   Hoyer sparsity
    Z / N                            zero fraction

H does not depend on the scale, and dividing by m_b first keeps ln a' near 0, so the
subtraction keeps its digits for activations of any magnitude (``ln`` is taken of
``max(a', floor)``: exact zeros add ``0 * ln floor = 0``). K (2^40 in float32, 1 in float64)
keeps the squares of values far below the mean above float32's underflow. Raw sums are
``S * m_b``. One ``log`` per element serves perplexity and entropy at every scope, and, with a
``relu`` part next to the ``abs`` one, also the positive part relu(x) (ln relu(x)' = ln |x|'
where relu(x) > 0): :func:`~xai_sparsity.capturing.hooks.capture` measures a layer and the
``nn.ReLU`` that follows it from one pass.

Two implementations (``kernel``):

- ``"eager"`` (default): on the CPU, chunks of samples (:data:`CHUNK_ELEMENTS` values per slot)
  through one reused scratch buffer, so no tensor-sized temporary is allocated and every pass
  stays in cache; on accelerators the whole batch is one chunk;
- ``"compiled"``: ``torch.compile`` fuses the entropy sums into two loops over x (the mean, then
  everything else). Used for entropy-only requests (S, T per channel or sample); others run
  eagerly. The first call per dtype/rank compiles (seconds; on CPU a C++ compiler is needed); if
  compiling fails the eager kernel is used, with a warning.

Choose with :func:`set_kernel`, the ``kernel=`` argument, or the environment variable
``XAI_SPARSITY_KERNEL``. Non-finite input gives non-finite sums in the units it touches
(``sums_finite`` is False). :class:`Plan` turns a capture's measures, scopes and options into a
:class:`Request` and its values; :meth:`Plan.grad_values` gives perplexity and entropy with
autograd (the sparsity penalty). The property tests in ``tests/test_engine.py`` hold all of it to
:mod:`xai_sparsity.measuring.measures`.

>>> import torch
>>> u = unit_sums(torch.tensor([[[6.0, -2.0, 0.0, 0.0]]]), split=True)
>>> [round(v.item(), 4) for v in (u.s, u.t, u.s_pos, u.t_pos, u.scale)]
[4.0, 3.2958, 3.0, 3.2958, 2.0]
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from xai_sparsity.base.errors import XaiSparsityError, check_choice
from xai_sparsity.measuring.measures import (
    TRANSFORMS,
    VARIANTS,
    hoyer_from_norms,
    sparsity_from_entropy,
    work_dtype,
)

__all__ = [
    "CHUNK_ELEMENTS",
    "KERNELS",
    "LOG_FLOOR",
    "SQUARE_FACTOR",
    "Need",
    "Plan",
    "Request",
    "Sums",
    "UnitSums",
    "batch_sums",
    "compiled_available",
    "entropy_from_sums",
    "entropy_sums",
    "get_kernel",
    "layer_and_channel",
    "layer_stats",
    "measure",
    "measure_from_sums",
    "scope_size",
    "set_kernel",
    "sparsity_from_sums",
    "sums_finite",
    "unit_sums",
    "use_kernel",
]

KERNELS: tuple[str, ...] = ("eager", "compiled")
ENV_VAR = "XAI_SPARSITY_KERNEL"

LOG_FLOOR = {torch.float32: 1e-37, torch.float64: 1e-300}
"""``ln`` is taken of max(a, floor): exact zeros then add 0 * ln(floor) = 0. The float32 floor sits
above the smallest normal number: ``log`` of values at that boundary takes a slow path."""

SQUARE_FACTOR = {torch.float32: 2.0**40, torch.float64: 1.0}
"""K in Q = K sum a'^2: values 1e-25 of their sample's mean still square above float32's
underflow; K (C P)^2 overflows only beyond 10^13 values per sample."""

CHUNK_ELEMENTS = 1 << 17
"""Values per slot buffer of a chunk of the CPU pass (512 KiB in float32; the entropy sums use two
such buffers, a sweep's four measures four or five): the passes over a chunk stay in cache."""

MEASURE_NAMES: tuple[str, ...] = ("perplexity", "zero_fraction", "hoyer", "entropy")
"""The measures the engine computes (those of ``measures.MEASURES``)."""

_OPTIONS: dict[str, frozenset[str]] = {
    "perplexity": frozenset({"variant", "transform", "check_finite"}),
    "entropy": frozenset({"transform", "check_finite"}),
    "hoyer": frozenset({"transform", "check_finite"}),
    "zero_fraction": frozenset({"tol", "check_finite"}),
}


# --------------------------------------------------------------------------------------------
# kernel choice


def _initial_kernel() -> str:
    value = os.environ.get(ENV_VAR, "eager").strip() or "eager"
    if value not in KERNELS:
        warnings.warn(
            f"{ENV_VAR}={value!r} is not a kernel; choose one of {KERNELS}. Using 'eager'.",
            stacklevel=2,
        )
        return "eager"
    return value


_kernel = _initial_kernel()


def get_kernel() -> str:
    """The kernel used when none is passed: ``"eager"`` or ``"compiled"``."""
    return _kernel


def set_kernel(name: str) -> str:
    """Set the default kernel (``"eager"`` or ``"compiled"``); returns the previous one."""
    global _kernel
    check_choice("kernel", name, KERNELS)
    previous, _kernel = _kernel, name
    return previous


@contextmanager
def use_kernel(name: str) -> Iterator[None]:
    """``with use_kernel("compiled"): ...``: the default kernel inside the block only."""
    previous = set_kernel(name)
    try:
        yield
    finally:
        set_kernel(previous)


# --------------------------------------------------------------------------------------------
# what a pass computes


class Need(NamedTuple):
    """The sums one transform must give besides S: T (``log``), Q (``sq``), Z (``zero``, the
    count of a <= ``tol``)."""

    log: bool = False
    sq: bool = False
    zero: bool = False
    tol: float = 0.0

    def __or__(self, other: tuple[Any, ...]) -> Need:
        o = Need(*other)
        return Need(
            self.log or o.log, self.sq or o.sq, self.zero or o.zero, o.tol if o.zero else self.tol
        )

    def slots(self) -> tuple[str, ...]:
        return ("s",) + ("t",) * self.log + ("q",) * self.sq + ("z",) * self.zero


@dataclass(frozen=True)
class Request:
    """What one pass computes: the needs of the ``abs`` and of the ``relu`` transform (None: not
    computed; with both, relu(x) comes from the pass of |x| and shares its log and scale), sums
    per channel (``channel``; otherwise one unit per sample) and per position (``spatial``)."""

    abs: Need | None = None
    relu: Need | None = None
    channel: bool = True
    spatial: bool = False


class Part:
    """The sums of one transform: ``c(name)`` per sample and unit (B, U), ``p(name)`` per sample
    and position (B, P) (``spatial`` requests), ``scale`` (B,) the m_b of the pass; ``name`` is
    one of "s", "t", "q", "z"."""

    __slots__ = ("_c", "_p", "scale")

    def __init__(self, c: dict[str, Tensor], p: dict[str, Tensor] | None, scale: Tensor) -> None:
        self._c, self._p, self.scale = c, p, scale

    def c(self, name: str) -> Tensor:
        return self._c[name]

    def p(self, name: str) -> Tensor:
        if self._p is None:
            raise XaiSparsityError("these sums were computed without spatial=True")
        return self._p[name]

    def of(self, name: str, scope: str) -> Tensor:
        """The sums of ``name`` for the groups of a scope: (B,), (B, C) or (B, P)."""
        if scope == "layer":
            return self.c(name).sum(1)
        return self.c(name) if scope == "channel" else self.p(name)

    def finite(self) -> Tensor:
        """0-d bool: every sum and scale is finite."""
        total = self.scale.sum() + sum(t.sum() for t in self._c.values())
        return torch.isfinite(total)


class Sums:
    """The result of :func:`batch_sums`: a :class:`Part` per transform, for an output of shape
    ``shape`` (B, ...)."""

    __slots__ = ("parts", "shape")

    def __init__(self, parts: Mapping[str, Part], shape: tuple[int, ...]) -> None:
        self.parts, self.shape = dict(parts), shape

    def part(self, transform: str) -> Part:
        part = self.parts.get(transform)
        if part is None:
            raise XaiSparsityError(f"these sums were computed without the {transform!r} transform")
        return part

    def positive(self) -> Sums:
        """The sums of relu(x), as the sums of a ReLU's output (both of its transforms)."""
        pos = self.part("relu")
        return Sums({"abs": pos, "relu": pos}, self.shape)


def scope_size(scope: str, shape: Sequence[int]) -> int:
    """N, the number of units per value of ``scope`` for an output of ``shape`` (B, ...); 0 where
    the scope does not apply (channel/spatial for (B, F))."""
    if scope == "layer":
        return math.prod(shape[1:]) if len(shape) >= 2 else 0
    if len(shape) < 3:
        return 0
    return math.prod(shape[2:]) if scope == "channel" else shape[1]


# --------------------------------------------------------------------------------------------
# the pass

_local = threading.local()

_SCRATCH_LIMIT = 1 << 22
"""Scratch buffers up to this many elements are kept between calls (per thread, dtype, device
and inference mode): a fresh buffer would cost its page faults on every call."""


def _scratch(numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A flat buffer of at least ``numel`` elements, reused between calls when small enough."""
    if numel > _SCRATCH_LIMIT or device.type != "cpu":
        return torch.empty(numel, dtype=dtype, device=device)
    key = (dtype, device, torch.is_inference_mode_enabled())
    cache: dict[tuple[Any, ...], Tensor] = _local.__dict__.setdefault("bufs", {})
    buf = cache.get(key)
    if buf is None or buf.numel() < numel:
        buf = cache[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def _chunked(device: torch.device) -> bool:
    """CPU: cache-sized chunks, NaN/Inf samples redone after the pass (reading a flag is free).
    Accelerators: one chunk, no host sync."""
    return device.type == "cpu"


def _load(xc: Tensor, out: Tensor, transform: str) -> None:
    """out = transform(xc), in out's dtype."""
    if xc.dtype == out.dtype:
        if transform == "abs":
            torch.abs(xc, out=out)
        else:
            torch.clamp_min(xc, 0, out=out)
    else:
        out.copy_(xc)
        out.abs_() if transform == "abs" else out.clamp_min_(0)


def _zeros(a: Tensor, tol: float, out: Tensor) -> None:
    """out = 1 where a <= tol (NaN counts as non-zero, as in ``zero_fraction``)."""
    if tol == 0:
        torch.eq(a, 0, out=out)
    else:
        torch.le(a, tol, out=out)


class _Layout(NamedTuple):
    primary: str
    need: Need  # of the primary transform (with the log the relu part needs)
    relu: Need | None  # the relu part of a split pass
    slots: tuple[str, ...]  # of the primary part, then the relu part
    at: dict[str, int]  # slot of each sum of the primary part
    stacked: int  # slots reduced together: all, or the primary ones for a light relu part
    light: bool  # a relu part of S, T only, no spatial sums: relu(x) unscaled in one slot, its
    # sums scaled afterwards (two passes fewer)


def _layout(req: Request) -> _Layout:
    if req.abs is None and req.relu is None:
        raise XaiSparsityError("a Request needs the abs or the relu transform")
    if req.abs is None:
        assert req.relu is not None
        slots = req.relu.slots()
        return _Layout("relu", req.relu, None, slots, _index(req.relu), len(slots), False)
    need, relu = req.abs, req.relu
    if relu is None:
        return _Layout("abs", need, None, need.slots(), _index(need), len(need.slots()), False)
    need = need | Need(log=relu.log)  # the relu part reuses the log of |x|
    if relu == Need(log=True) and not req.spatial:
        slots = (*need.slots(), "pos")
        return _Layout("abs", need, relu, slots, _index(need), len(need.slots()), True)
    slots = need.slots() + relu.slots()
    return _Layout("abs", need, relu, slots, _index(need), len(slots), False)


def _index(need: Need) -> dict[str, int]:
    return {name: i for i, name in enumerate(need.slots())}


_FINITE_MEAN = 2
"""``fix_inf`` of the redo: m_b is the mean of the finite values (1 = an Inf mean becomes 1)."""


def _eager(units: Tensor, req: Request, *, fix_inf: int = 0) -> Sums:
    """The pass over (B, C, P) ``units``: per chunk of samples one (slots, k, C, P) buffer holds
    a' and the terms of T, Q, Z of every part, reduced over positions (and over channels).

    ``fix_inf``: 1: m_b = 1 where the mean is not finite (accelerators); :data:`_FINITE_MEAN`:
    m_b = the mean of the finite values (on the CPU, samples with a NaN or Inf are redone so
    after the pass): a NaN or Inf then stays in its own units."""
    lay = _layout(req)
    b, c, p = units.shape
    nslot, on_cpu = len(lay.slots), _chunked(units.device)
    k = max(1, min(b, CHUNK_ELEMENTS // max(1, c * p))) if on_cpu else b
    buf = _scratch(nslot * k * c * p, work_dtype(units), units.device).view(nslot, k, c, p)
    squares = lay.need.sq or (lay.relu is not None and lay.relu.sq)
    zero = torch.zeros((), dtype=buf.dtype, device=buf.device) if squares else None
    firsts, rests, positions, scales, lights = [], [], [], [], []
    views = _Views(buf)
    fix = fix_inf or int(not on_cpu)
    for start in range(0, b, k):
        xc = units[start : start + k]
        w, ws = views.of(xc.shape[0])
        first, rest, scale, light = _chunk(xc, w, ws, lay, zero, fix, req.spatial)
        firsts.append(first)
        rests.append(rest)
        scales.append(scale)
        lights.append(light)
        if req.spatial:
            positions.append(w.sum(dim=2))  # (slots, n, P)
    first_s, scale = _cat(firsts, 0), _cat(scales, 0)
    cs = [first_s]
    if lay.stacked == 2:
        cs.append(_cat(rests, 0))
    elif lay.stacked > 2:
        cs.extend(_cat(rests, 1).unbind(0))
    if lay.light:
        cs.extend(_cat([pair[i] for pair in lights], 0) for i in range(2))
    ps = list(_cat(positions, 1).unbind(0)) if req.spatial else None
    parts: dict[str, Part] = {}
    at = 0
    for transform, need in ((lay.primary, lay.need), ("relu", lay.relu)):
        if need is None or transform in parts:
            continue
        names = need.slots()
        span = range(at, at + len(names))
        pp = None if ps is None else {nm: ps[i] for nm, i in zip(names, span, strict=True)}
        parts[transform] = Part({nm: cs[i] for nm, i in zip(names, span, strict=True)}, pp, scale)
        at += len(names)
    sums = Sums(parts, tuple(units.shape))
    if on_cpu and not fix_inf and not bool(torch.isfinite(scale).all()):
        _redo_unscaled(units, req, sums)
    return sums


class _Views:
    """The buffer of a chunk of n samples (slots, n, C, P) and its slots, built once per size
    (views cost microseconds, and a pass has many chunks)."""

    def __init__(self, buf: Tensor) -> None:
        self.buf = buf
        self.cache: dict[int, tuple[Tensor, list[Tensor]]] = {}

    def of(self, n: int) -> tuple[Tensor, list[Tensor]]:
        got = self.cache.get(n)
        if got is None:
            w = self.buf[:, :n]
            got = self.cache[n] = (w, list(w.unbind(0)))
        return got


def _cat(parts: list[Tensor], dim: int) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _redo_unscaled(units: Tensor, req: Request, sums: Sums) -> None:
    """Samples whose mean is not finite (a NaN or Inf, or a sum beyond the dtype's range): their
    sums again with m_b = the mean of their finite values, so the other units of the sample stay
    as the measure functions give them."""
    rows = torch.nonzero(~torch.isfinite(sums.parts[next(iter(sums.parts))].scale)).flatten()
    again = _eager(units[rows], req, fix_inf=_FINITE_MEAN)
    for name, part in sums.parts.items():
        redo = again.parts[name]
        part.scale[rows] = redo.scale
        for slot, t in part._c.items():
            t[rows] = redo._c[slot]
        if part._p is not None and redo._p is not None:
            for slot, t in part._p.items():
                t[rows] = redo._p[slot]


def _chunk(
    xc: Tensor,
    w: Tensor,
    ws: list[Tensor],
    lay: _Layout,
    zero: Tensor | None,
    fix_inf: int,
    spatial: bool,
) -> tuple[Tensor, Any, Tensor, Any]:
    """One chunk of :func:`_eager`: fills w (slots, n, C, P); returns S per unit (n, C) of the
    primary part, the sums of the other stacked slots ((n, C) for one, else (slots - 1, n, C)),
    m_b (n,) and, for a light relu part, its (S, T) per unit; ``ws`` are the slots of ``w``. ``fix_inf``: a
    sample whose mean is not finite gets m_b = 1 (accelerators: one chunk, one extra op)."""
    n, need = xc.shape[0], lay.need
    slot = lay.at
    a = ws[0]
    _load(xc, a, lay.primary)
    if need.zero:
        _zeros(a, need.tol, ws[slot["z"]])
    s_raw = a.sum(dim=2)  # (n, C)
    if fix_inf == _FINITE_MEAN:  # the redo of samples with a NaN/Inf: the mean of the rest
        scale = torch.where(torch.isfinite(a), a, 0.0).sum(dim=(1, 2))
    else:
        scale = s_raw.sum(1)
    # 0: 1; NaN or Inf: redone on the CPU (see _eager), 1 on accelerators
    scale = torch.where(scale == 0, 1.0, scale.div_(a.shape[1] * a.shape[2]))
    if fix_inf:
        scale.nan_to_num_(nan=1.0, posinf=1.0)
    inv = scale.reciprocal().view(n, 1, 1)
    a.mul_(inv)
    if need.log:
        lg = ws[slot["t"]]
        if spatial:  # a' itself is summed per position: floor the log's copy only
            torch.log(torch.clamp_min(a, LOG_FLOOR[w.dtype], out=lg), out=lg)
        else:  # a' ln a' with a' floored adds 0 * ln floor = 0 to T (and about 0 to Q)
            torch.log(a.clamp_min_(LOG_FLOOR[w.dtype]), out=lg)
    light = None
    if lay.light:  # relu(x) unscaled: its two sums are scaled instead
        pos = ws[-1]
        _load(xc, pos, "relu")
        light = (pos.sum(dim=2).mul_(inv.view(n, 1)), pos.mul_(lg).sum(dim=2).mul_(inv.view(n, 1)))
    elif lay.relu is not None:
        _relu_slots(xc, ws[len(slot) :], lay.relu, inv, lg if lay.relu.log else None, zero)
    if need.log:
        lg.mul_(a)
    if need.sq:
        assert zero is not None
        torch.addcmul(zero, a, a, value=SQUARE_FACTOR[w.dtype], out=ws[slot["q"]])
    rest = None
    if lay.stacked == 2:
        rest = ws[1].sum(dim=2)
    elif lay.stacked > 2:
        rest = w[1 : lay.stacked].sum(dim=3)
    return s_raw.mul_(inv.view(n, 1)), rest, scale, light


def _relu_slots(
    xc: Tensor, w: list[Tensor], need: Need, inv: Tensor, lg: Tensor | None, zero: Tensor | None
) -> None:
    """The relu part of a split pass into its slots ``w``: relu(x) / m_b and its terms, with the
    log of |x|' (ln relu(x)' = ln |x|' where relu(x) > 0; the terms are 0 elsewhere)."""
    slot = _index(need)
    pos = w[0]
    _load(xc, pos, "relu")
    if need.zero:
        _zeros(pos, need.tol, w[slot["z"]])
    pos.mul_(inv)
    if need.log:
        assert lg is not None
        torch.mul(pos, lg, out=w[slot["t"]])
    if need.sq:
        assert zero is not None
        torch.addcmul(zero, pos, pos, value=SQUARE_FACTOR[pos.dtype], out=w[slot["q"]])


def batch_sums(x: Tensor, request: Request, *, kernel: str | None = None) -> Sums:
    """The sums of ``request`` for a batch ``x`` (B, C, ...) or (B, F) (one unit of F values),
    in one pass (see the module docs). No autograd: the result is detached, in float32
    (float64 for float64 input)."""
    kernel = _kernel if kernel is None else check_choice("kernel", kernel, KERNELS)
    units = _as_units(x.detach())
    if not request.channel and not request.spatial:
        units = units.reshape(units.shape[0], 1, -1)
    with torch.no_grad():
        if kernel == "compiled" and _compilable(request):
            sums = _compiled_sums(units, request)
            if sums is not None:
                return sums
        return _eager(units, request)


def _as_units(x: Tensor) -> Tensor:
    """(B, C, ...) -> (B, C, P); (B, F) -> (B, 1, F)."""
    if x.dim() < 2:
        raise XaiSparsityError(
            f"unit_sums needs a batch (B, ...) of rank >= 2, got shape {tuple(x.shape)}"
        )
    b = x.shape[0]
    if x.dim() == 2:
        return x.reshape(b, 1, x.shape[1])
    return x.reshape(b, x.shape[1], -1)


# --------------------------------------------------------------------------------------------
# compiled kernel (the entropy sums only)

_COMPILED: dict[tuple[bool, torch.dtype, str], Callable[[Tensor], tuple[Tensor | None, ...]]] = {}
_COMPILE_BROKEN: list[str] = []


def _compilable(req: Request) -> bool:
    plain = Need(log=True)
    return not req.spatial and req.abs == plain and req.relu in (None, plain)


def _sums_fn(split: bool) -> Callable[[Tensor], tuple[Tensor | None, ...]]:
    # Each sum is written as its own expression: inductor then fuses all of them into one loop
    # over x; a shared intermediate (a ln a used twice) would be materialised tensor-sized.
    def sums(x: Tensor) -> tuple[Tensor | None, ...]:
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        floor = LOG_FLOOR[work]
        xw = x.to(work)
        mean = xw.abs().mean(dim=(1, 2), keepdim=True)
        scale = torch.where(torch.isfinite(mean) & (mean > 0), mean, 1.0)  # (B, 1, 1)
        inv = scale.reciprocal()  # a multiply per element instead of a divide
        s = (xw.abs() * inv).sum(-1)
        t = ((xw.abs() * inv).clamp_min(floor) * (xw.abs() * inv).clamp_min(floor).log()).sum(-1)
        flat = scale.reshape(-1)
        if not split:
            return s, t, None, None, flat
        s_pos = (xw.clamp_min(0) * inv).sum(-1)
        t_pos = ((xw.clamp_min(0) * inv) * (xw.abs() * inv).clamp_min(floor).log()).sum(-1)
        return s, t, s_pos, t_pos, flat

    return sums


def _compiled(split: bool, units: Tensor) -> Callable[[Tensor], tuple[Tensor | None, ...]] | None:
    if _COMPILE_BROKEN:
        return None
    key = (split, units.dtype, units.device.type)
    fn = _COMPILED.get(key)
    if fn is None:
        fn = torch.compile(_sums_fn(split), dynamic=True, fullgraph=True)
        _COMPILED[key] = fn
    return fn


def _compiled_sums(units: Tensor, req: Request) -> Sums | None:
    split = req.relu is not None
    fn = _compiled(split, units)
    if fn is None:
        return None
    try:
        s, t, s_pos, t_pos, scale = fn(units)
    except Exception as err:  # a compiler missing or failing: never lose the result
        _compile_failed(err)
        return None
    assert s is not None and t is not None and scale is not None
    parts = {"abs": Part({"s": s, "t": t}, None, scale)}
    if split:
        assert s_pos is not None and t_pos is not None
        parts["relu"] = Part({"s": s_pos, "t": t_pos}, None, scale)
    return Sums(parts, tuple(units.shape))


def _compile_failed(err: BaseException) -> None:
    _COMPILE_BROKEN.append(f"{type(err).__name__}: {err}")
    warnings.warn(
        f"the compiled sparsity kernel is not available here ({type(err).__name__}: "
        f"{str(err)[:300]}); using the eager kernel. On CPU torch.compile needs a C++ compiler "
        f"(g++ or clang); set_kernel('eager') silences this.",
        RuntimeWarning,
        stacklevel=4,
    )


def compiled_available() -> bool:
    """Whether the compiled kernel has not failed in this process (it is tried on first use)."""
    return not _COMPILE_BROKEN


# --------------------------------------------------------------------------------------------
# from sums to measures: the formulas


def entropy_from_sums(s: Tensor, t: Tensor) -> Tensor:
    """H = ln S - T / S (natural log), 0 for an all-zero map (S = 0); same shape as ``s``. No
    autograd (two temporaries, the rest in place)."""
    safe = s.clamp_min(torch.finfo(s.dtype).tiny)
    ratio = torch.div(t, safe)
    return safe.log_().sub_(ratio).clamp_min_(0.0).masked_fill_(s <= 0, 0.0)


def sparsity_from_sums(s: Tensor, t: Tensor, n: int, kind: str = "normalized") -> Tensor:
    """The measure of N units with sums S, T: ``kind`` is a perplexity variant
    (``"normalized"``, ``"relative"``) or ``"entropy"`` (1 - H / ln N). Dead maps give 1
    (1 - 1/N for ``"relative"``), as in :mod:`xai_sparsity.measuring.measures`."""
    if n < 2:
        raise XaiSparsityError(f"a sparsity needs N >= 2 units, got N = {n}")
    check_choice("kind", kind, ("normalized", "relative", "entropy"))
    return sparsity_from_entropy(entropy_from_sums(s, t), s <= 0, n, kind)


def entropy_sums(a: Tensor, dim: int = 0) -> tuple[Tensor, Tensor]:
    """S = sum a and T = sum a ln a (0 ln 0 = 0) of small non-negative ``a`` over ``dim``:
    :func:`sparsity_from_sums` of them is the perplexity over that dim (lifetime sparsity of
    streamed per-sample unit means)."""
    return a.sum(dim), torch.xlogy(a, a).sum(dim)


def measure_from_sums(
    part: Part,
    measure: str,
    scope: str,
    n: int,
    *,
    kind: str = "normalized",
    entropy: Tensor | None = None,
) -> Tensor:
    """``measure`` ("perplexity" with ``kind`` its variant, "entropy", "hoyer", "zero_fraction")
    of the groups of ``scope`` (N = ``n`` units each) from the sums of one transform.
    ``entropy``: H of these groups, when already known."""
    if measure in ("perplexity", "entropy"):
        s = part.of("s", scope)
        h = entropy_from_sums(s, part.of("t", scope)) if entropy is None else entropy
        return sparsity_from_entropy(h, s <= 0, n, "entropy" if measure == "entropy" else kind)
    if measure == "hoyer":
        s, q = part.of("s", scope), part.of("q", scope)
        l2 = torch.sqrt(q).div_(math.sqrt(SQUARE_FACTOR[q.dtype]))
        return hoyer_from_norms(s, l2, q <= 0, n)
    check_choice("measure", measure, MEASURE_NAMES)
    return part.of("z", scope) / n


def measure(name: str, x: Tensor, scope: str = "layer", **options: Any) -> Tensor:
    """One measure of ``x`` at one scope from one engine pass, without autograd.

    The fast counterpart of :func:`xai_sparsity.measuring.measures.compute_measure` (same
    arguments, same values to float tolerance; the property tests hold them together) for bulk
    measurement of tensors that need no gradient. Options the engine does not take, and bad
    values, go to ``compute_measure``, which computes them or says what is wrong.

    >>> round(measure("perplexity", torch.tensor([[3.0, 1.0, 0.0, 0.0]])).item(), 5)
    0.74841
    """
    from xai_sparsity.measuring.measures import SCOPES, compute_measure

    engine_options = {k: v for k, v in options.items() if k != "check_finite"}
    plan = Plan((name,), (scope,), {name: engine_options}) if scope in SCOPES else None
    if plan is None or not plan or not isinstance(x, Tensor) or x.dim() < 2 or x.requires_grad:
        return compute_measure(name, x, scope, **options)
    values = plan.values(batch_sums(x.detach(), plan.request(x)), x)
    value = values.get(f"{name}:{scope}")
    if value is None:  # fewer than 2 units at this scope: the measure function says so
        return compute_measure(name, x, scope, **options)
    if options.get("check_finite", True) and not bool(torch.isfinite(value).all()):
        return compute_measure(name, x, scope, **options)  # raises, naming the bad input
    return value


def sums_finite(sums: UnitSums | Sums) -> bool:
    """Whether the sums and scales are finite (a host sync on accelerators)."""
    if isinstance(sums, UnitSums):
        return bool(torch.isfinite(sums.t.sum() + sums.scale.sum()))
    return all(bool(part.finite()) for part in sums.parts.values())


# --------------------------------------------------------------------------------------------
# a plan: which measures a capture computes from which sums


class _Item(NamedTuple):
    measure: str
    scope: str
    kind: str
    transform: str


class Plan:
    """The measures x scopes of a reduce-mode capture that the engine computes, and the
    :class:`Request` of the pass that gives them.

    Measures with options the engine does not know, or with option values that are not valid,
    are left out (``plan.covers(measure)`` is False): their measure function computes them (and
    reports bad values).

    >>> plan = Plan(("perplexity", "hoyer"), ("layer", "channel"), {})
    >>> x = torch.rand(3, 4, 5, 5)
    >>> sorted(plan.values(batch_sums(x, plan.request(x)), x))
    ['hoyer:channel', 'hoyer:layer', 'perplexity:channel', 'perplexity:layer']
    """

    def __init__(
        self,
        measures: Sequence[str],
        scopes: Sequence[str],
        options: Mapping[str, Mapping[str, Any]],
        *,
        channel: bool = False,
    ) -> None:
        self.items: list[_Item] = []
        self.needs: dict[str, Need] = {}
        for m in measures:
            item = _plan_item(m, options.get(m, {}))
            if item is None:
                continue
            kind, transform, need = item
            self.needs[transform] = self.needs.get(transform, Need()) | need
            self.items.extend(_Item(m, s, kind, transform) for s in scopes)
        self.scopes = tuple(scopes)
        self.channel = channel or "channel" in self.scopes
        self.spatial = "spatial" in self.scopes

    def covers(self, measure: str) -> bool:
        return any(i.measure == measure for i in self.items)

    def __bool__(self) -> bool:
        return bool(self.items)

    def request(self, x: Tensor, *, relu: bool = False) -> Request:
        """The pass for output ``x``; ``relu``: also the sums of relu(x) for a following ReLU
        (which needs everything, on its relu(x) = |relu(x)|)."""
        needs = dict(self.needs)
        if relu:
            every = Need()
            for need in self.needs.values():
                every = every | need
            needs["relu"] = needs.get("relu", Need()) | every
        deep = x.dim() >= 3
        return Request(
            needs.get("abs"),
            needs.get("relu"),
            channel=deep and self.channel,
            spatial=deep and self.spatial and x.shape[1] >= 2,
        )

    def values(self, sums: Sums, x: Tensor) -> dict[str, Tensor]:
        """``{f"{measure}:{scope}": values}`` for output ``x``, scopes with N >= 2 only."""
        out: dict[str, Tensor] = {}
        entropies: dict[tuple[str, str], Tensor] = {}
        b = x.shape[0]
        for m, scope, kind, transform in self.items:
            n = scope_size(scope, x.shape)
            if n < 2:
                continue
            part = sums.part(transform)
            h = None
            if m in ("perplexity", "entropy"):
                h = entropies.get((transform, scope))
                if h is None:
                    s, t = part.of("s", scope), part.of("t", scope)
                    h = entropies[(transform, scope)] = entropy_from_sums(s, t)
            v = measure_from_sums(part, m, scope, n, kind=kind, entropy=h)
            out[f"{m}:{scope}"] = v.view(b, *x.shape[2:]) if scope == "spatial" else v
        return out

    def grad_values(self, x: Tensor) -> dict[str, Tensor]:
        """The perplexity and entropy values of the plan with autograd (the sparsity penalty):
        H from one pass of sums, its gradient dH/da_j = -(ln p_j + H) / S in a chunked backward
        without tensor-sized temporaries (first order only). Other measures: not here."""
        out: dict[str, Tensor] = {}
        entropies: dict[tuple[str, str], tuple[Tensor, Tensor]] = {}
        for m, scope, kind, transform in self.items:
            n = scope_size(scope, x.shape)
            if m not in ("perplexity", "entropy") or n < 2:
                continue
            if (transform, scope) not in entropies:
                entropies[(transform, scope)] = _Entropy.apply(x, scope, transform)
            h, s = entropies[(transform, scope)]
            v = sparsity_from_entropy(h, s <= 0, n, "entropy" if m == "entropy" else kind)
            out[f"{m}:{scope}"] = v.view(x.shape[0], *x.shape[2:]) if scope == "spatial" else v
        return out


class _Entropy(torch.autograd.Function):
    """H of the groups of a scope (and their S, not differentiable) from one :func:`batch_sums`
    pass; backward dH/da_j = -(ln a'_j - ln S' + H) / (S' m_b), times da/dx (sign(x) for "abs",
    1[x > 0] for "relu"): 0 at exact zeros and for dead groups. First order only."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scope: str, transform: str) -> tuple[Tensor, Tensor]:
        need = Need(log=True)
        req = Request(
            need if transform == "abs" else None,
            need if transform == "relu" else None,
            channel=scope != "layer",
            spatial=scope == "spatial",
        )
        part = batch_sums(x, req).part(transform)
        s = part.of("s", scope)
        h = entropy_from_sums(s, part.of("t", scope))
        ctx.save_for_backward(x, h, s, part.scale)
        ctx.scope, ctx.transform = scope, transform
        ctx.mark_non_differentiable(s)
        return h, s

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_h: Tensor, _grad_s: Tensor | None) -> tuple[Any, ...]:
        x, h, s, scale = ctx.saved_tensors
        units = _as_units(x)
        b, c, p = units.shape
        group = {"layer": (b, 1, 1), "channel": (b, c, 1), "spatial": (b, 1, p)}[ctx.scope]
        s, h = s.reshape(group), h.reshape(group)
        live = s > 0
        safe = torch.where(live, s, 1.0)
        off = torch.where(live, safe.log() - h, 0.0)  # ln S' - H
        coef = torch.where(live, grad_h.reshape(group).to(s.dtype), 0.0)
        coef = coef.div_(safe * scale.view(b, 1, 1)).neg_()  # -dL/dH / S
        inv = scale.reciprocal().view(b, 1, 1)
        grad = torch.empty_like(units)
        k = max(1, min(b, CHUNK_ELEMENTS // max(1, c * p))) if _chunked(x.device) else b
        buf = _scratch(2 * k * c * p, s.dtype, x.device).view(2, k, c, p)
        direct = grad.dtype == s.dtype  # work straight in the gradient's memory, no copy
        for start in range(0, b, k):
            stop = start + k
            xc = units[start:stop]
            a, d = buf[0, : xc.shape[0]], buf[1, : xc.shape[0]]
            if direct:
                a = grad[start:stop]
            _load(xc, a, ctx.transform)
            a.mul_(inv[start:stop]).clamp_min_(LOG_FLOOR[a.dtype]).log_()
            a.sub_(off[start:stop]).mul_(coef[start:stop])
            if ctx.transform == "abs":
                a.mul_(torch.sign(xc, out=d) if xc.dtype == d.dtype else torch.sign(xc))
            else:
                a.mul_(xc > 0)
            if not direct:
                grad[start:stop].copy_(a)
        return grad.view(x.shape), None, None


def _plan_item(measure: str, opts: Mapping[str, Any]) -> tuple[str, str, Need] | None:
    """(kind, transform, need) of a measure with these options, or None to leave it to its
    measure function."""
    if measure not in _OPTIONS or not set(opts) <= _OPTIONS[measure]:
        return None
    if measure == "zero_fraction":
        tol = opts.get("tol", 0.0)
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < math.inf:
            return None
        return "zero", "abs", Need(zero=True, tol=float(tol))
    transform = opts.get("transform", "abs")
    kind = "entropy" if measure == "entropy" else opts.get("variant", "normalized")
    if transform not in TRANSFORMS or (measure == "perplexity" and kind not in VARIANTS):
        return None
    need = Need(sq=True) if measure == "hoyer" else Need(log=True)
    return str(kind), str(transform), need


# --------------------------------------------------------------------------------------------
# the entropy sums per unit, and every layer-scope measure of a batch


class UnitSums(NamedTuple):
    """Sums per sample and unit, each (B, U) in the working dtype (float32 or float64).

    With a = |x| / scale: ``s`` = sum a, ``t`` = sum a ln a; ``s_pos``, ``t_pos``: the same of
    relu(x) / scale (``None`` unless ``split=True``); ``scale``: (B,) the mean |x| per sample
    (1 where it is 0).
    """

    s: Tensor
    t: Tensor
    s_pos: Tensor | None
    t_pos: Tensor | None
    scale: Tensor


def unit_sums(
    x: Tensor, *, split: bool = False, per_unit: bool = True, kernel: str | None = None
) -> UnitSums:
    """S = sum |x| and T = sum |x| ln |x| per sample and channel (see the module docs).

    Args:
        x: (B, C, ...) activations (units = channels, summed over the remaining dims) or (B, F)
            (one unit of F values). No autograd: the result is detached.
        split: also return the sums of relu(x).
        per_unit: ``False`` sums over all non-batch dims (one unit per sample: (B, 1) results,
            enough for the layer scope).
        kernel: ``"eager"`` or ``"compiled"`` (default: :func:`get_kernel`).

    Returns:
        :class:`UnitSums` of (B, C) tensors ((B, 1) for (B, F) input or ``per_unit=False``).
    """
    log = Need(log=True)
    sums = batch_sums(x, Request(log, log if split else None, channel=per_unit), kernel=kernel)
    a = sums.part("abs")
    pos = sums.parts.get("relu")
    return UnitSums(
        a.c("s"),
        a.c("t"),
        None if pos is None else pos.c("s"),
        None if pos is None else pos.c("t"),
        a.scale,
    )


def layer_and_channel(
    sums: UnitSums,
    positions: int,
    kind: str,
    *,
    positive: bool = False,
    scopes: tuple[str, ...] = ("layer", "channel"),
) -> dict[str, Tensor]:
    """``{"layer": (B,), "channel": (B, C)}`` measures from unit sums, for the requested
    ``scopes`` (channel only when each unit has >= 2 positions; ``positive``: the relu sums)."""
    s, t = (sums.s_pos, sums.t_pos) if positive else (sums.s, sums.t)
    if s is None or t is None:
        raise XaiSparsityError("these sums were computed without split=True")
    out: dict[str, Tensor] = {}
    n_units = s.shape[1] * positions
    if "layer" in scopes and n_units >= 2:
        out["layer"] = sparsity_from_sums(s.sum(1), t.sum(1), n_units, kind)
    if "channel" in scopes and positions >= 2:
        out["channel"] = sparsity_from_sums(s, t, positions, kind)
    return out


def layer_stats(
    x: Tensor,
    *,
    hoyer: bool = True,
    zeros: bool = True,
    channel: bool = True,
    kernel: str | None = None,
) -> dict[str, Tensor]:
    """Every layer-scope measure of one batch (and the channel-scope perplexity) from one
    :func:`batch_sums` pass.

    The definitions of :mod:`xai_sparsity.measuring.measures` with their defaults (transform
    ``"abs"``, perplexity variant ``"normalized"``, zero tolerance 0; an all-zero map counts as 1
    for every measure). No autograd.

    Args:
        x: activations (B, C, ...) or (B, F) with at least 2 units per sample.
        hoyer, zeros: also compute Hoyer sparsity and the zero fraction.
        channel: also the channel-scope perplexity (rank >= 3 with >= 2 positions).
        kernel: see :func:`unit_sums`.

    Returns:
        ``perplexity``, ``entropy`` (and ``hoyer``, ``zero_fraction``): (B,) float32;
        ``unit_sum``: (B, C) sums of |x| per channel ((B, F) |x| for (B, F) input);
        ``channel``: (B, C) channel-scope perplexity sparsity.

    >>> s = layer_stats(torch.tensor([[3.0, 1.0, 0.0, 0.0]]))
    >>> round(s["perplexity"].item(), 5), s["zero_fraction"].item()
    (0.74841, 0.5)
    """
    x = x.detach()
    n = math.prod(x.shape[1:])
    if x.dim() < 2 or n < 2:
        raise XaiSparsityError(
            f"layer_stats needs (B, ...) with at least 2 units per sample, got {tuple(x.shape)}"
        )
    deep = x.dim() >= 3
    need = Need(log=True, sq=hoyer, zero=zeros)
    part = batch_sums(x, Request(need, channel=deep), kernel=kernel).part("abs")
    with torch.no_grad():
        h = entropy_from_sums(part.of("s", "layer"), part.of("t", "layer"))
        out: dict[str, Tensor] = {
            m: measure_from_sums(part, m, "layer", n, entropy=h).float()
            for m in ("perplexity", "entropy")
        }
        # per unit: channels, or each feature of (B, F) input
        out["unit_sum"] = (part.c("s") * part.scale[:, None]).float() if deep else x.abs().float()
        positions = n // part.c("s").shape[1]
        if channel and deep and positions >= 2:
            out["channel"] = measure_from_sums(part, "perplexity", "channel", positions).float()
        for m, wanted in (("hoyer", hoyer), ("zero_fraction", zeros)):
            if wanted:
                out[m] = measure_from_sums(part, m, "layer", n).float()
    return out
