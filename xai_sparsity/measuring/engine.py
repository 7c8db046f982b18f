"""Per-unit entropy sums: the one pass over a layer's output that the entropy measures need.

Per sample b, with a = |x| divided by the sample's mean m_b = mean |x| (1 for an all-zero sample),
the kernel returns per unit c (a channel, summed over its positions)

    S[b, c] = sum a          T[b, c] = sum a ln a

and, with ``split=True``, the same sums of the positive part relu(x) / m_b (``s_pos``,
``t_pos``). From them, for any group of units (one channel, or all channels of a sample),

    H = ln S - T / S,        PP = exp(H),        s = (N - PP) / (N - 1)

which is the perplexity of :func:`xai_sparsity.measuring.measures.perplexity_sparsity`: H does not depend on
the scale, and dividing by m_b first keeps ln a near 0, so H = ln S - T / S does not cancel
digits for activations of any magnitude (``ln`` is taken of ``max(a, tiny)``: exact zeros add
``0 * ln tiny = 0``). Raw sums are ``S * scale`` and ``scale * (T + S ln scale)``.

One ``log`` per element serves the layer and the channel scope, and with ``split`` also a ReLU
that follows the layer, whose output is relu(x): :func:`~xai_sparsity.capturing.hooks.capture` uses this
to measure a conv and its ReLU from one pass.

Two implementations (``kernel``):

- ``"eager"`` (default): chunks of about 2^17 elements through reused scratch buffers, so no
  tensor-sized temporary is allocated and every pass stays in cache;
- ``"compiled"``: ``torch.compile`` fuses the passes into two loops over x (the mean, then
  everything else). The first call per dtype/rank compiles (seconds; on CPU a C++ compiler is
  needed; the result is cached on disk); if compiling fails the eager kernel is used, with a
  warning.

Choose with :func:`set_kernel`, the ``kernel=`` argument, or the environment variable
``XAI_SPARSITY_KERNEL``. Non-finite input gives non-finite sums (``sums_finite`` is False), and
callers fall back to the measure functions, which report it.

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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor

from xai_sparsity.base.errors import XaiSparsityError, check_choice
from xai_sparsity.measuring.measures import sparsity_from_entropy, work_dtype

__all__ = [
    "KERNELS",
    "UnitSums",
    "entropy_from_sums",
    "get_kernel",
    "layer_stats",
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

_CHUNK_ELEMENTS = 1 << 17


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
    kernel = _kernel if kernel is None else check_choice("kernel", kernel, KERNELS)
    units = _as_units(x.detach())
    if not per_unit:
        units = units.reshape(units.shape[0], 1, -1)
    with torch.no_grad():
        if kernel == "compiled":
            fn = _compiled(split, units)
            if fn is not None:
                try:
                    s, t, s_pos, t_pos, scale = fn(units)
                    assert s is not None and t is not None and scale is not None
                    return UnitSums(s, t, s_pos, t_pos, scale)
                except Exception as err:  # a compiler missing or failing: never lose the result
                    _compile_failed(err)
        return _eager_sums(units, split)


_SCRATCH_LIMIT = 1 << 22
"""Scratch buffers up to this many elements are kept between calls (per thread, dtype and
device): a fresh buffer of that size would cost its page faults on every call."""

_local = threading.local()


def _scratch(numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A flat buffer of at least ``numel`` elements, reused between calls when small enough."""
    if numel > _SCRATCH_LIMIT:
        return torch.empty(numel, dtype=dtype, device=device)
    cache: dict[tuple[torch.dtype, torch.device], Tensor] = _local.__dict__.setdefault("bufs", {})
    buf = cache.get((dtype, device))
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype, device=device)
        cache[(dtype, device)] = buf
    return buf[:numel]


def _eager_sums(units: Tensor, split: bool) -> UnitSums:
    """Chunked: |x| -> buffer, sums, / mean, floor, ln -> second buffer, a ln a sums (and relu(x)
    in a third buffer)."""
    dtype = work_dtype(units)
    b, c, p = units.shape
    per_sample = max(1, c * p)
    budget = _CHUNK_ELEMENTS // 2 if split else _CHUNK_ELEMENTS  # the buffers stay in L2
    k = max(1, min(b, budget // per_sample))
    nbuf = 3 if split else 2
    bufs = _scratch(nbuf * k * c * p, dtype, units.device).view(nbuf, k, c, p)
    floor = LOG_FLOOR[dtype]
    parts: list[list[Tensor]] = [[], [], [], [], []]
    for start in range(0, b, k):
        xc = units[start : start + k]
        n = xc.shape[0]
        a, lg = bufs[0, :n], bufs[1, :n]
        if xc.dtype == dtype:
            torch.abs(xc, out=a)
        else:
            a.copy_(xc).abs_()
        s_u = a.sum(dim=2)  # (n, C)
        scale = s_u.sum(dim=1).div_(per_sample)
        scale = torch.where(scale > 0, scale, 1.0)  # (n,)
        a.mul_(scale.reciprocal().view(n, 1, 1)).clamp_min_(floor)  # floor: exact zeros only
        torch.log(a, out=lg)
        if split:
            pos = bufs[2, :n]
            if xc.dtype == dtype:
                torch.clamp_min(xc, 0, out=pos)
            else:
                pos.copy_(xc).clamp_min_(0)
            inv = scale.reciprocal().view(n, 1)
            parts[2].append(pos.sum(dim=2).mul_(inv))
            parts[3].append(pos.mul_(lg).sum(dim=2).mul_(inv))
        parts[0].append(s_u.div_(scale.view(n, 1)))
        parts[1].append(lg.mul_(a).sum(dim=2))
        parts[4].append(scale)
    s_, t_, sp, tp, sc = (torch.cat(q) if len(q) > 1 else q[0] if q else None for q in parts)
    assert s_ is not None and t_ is not None and sc is not None
    return UnitSums(s_, t_, sp, tp, sc)


# --------------------------------------------------------------------------------------------
# compiled kernel

_COMPILED: dict[tuple[bool, torch.dtype, str], Callable[[Tensor], tuple[Tensor | None, ...]]] = {}
_COMPILE_BROKEN: list[str] = []


def _sums_fn(split: bool) -> Callable[[Tensor], tuple[Tensor | None, ...]]:
    # Each sum is written as its own expression: inductor then fuses all of them into one loop
    # over x; a shared intermediate (a ln a used twice) would be materialised tensor-sized.
    def sums(x: Tensor) -> tuple[Tensor | None, ...]:
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        floor = LOG_FLOOR[work]
        xw = x.to(work)
        mean = xw.abs().mean(dim=(1, 2), keepdim=True)
        scale = torch.where(mean > 0, mean, 1.0)  # (B, 1, 1)
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


def _compile_failed(err: BaseException) -> None:
    _COMPILE_BROKEN.append(f"{type(err).__name__}: {err}")
    warnings.warn(
        f"the compiled sparsity kernel is not available here ({type(err).__name__}: "
        f"{str(err)[:300]}); using the eager kernel. On CPU torch.compile needs a C++ compiler "
        f"(g++ or clang); set_kernel('eager') silences this.",
        RuntimeWarning,
        stacklevel=3,
    )


def compiled_available() -> bool:
    """Whether the compiled kernel has not failed in this process (it is tried on first use)."""
    return not _COMPILE_BROKEN


# --------------------------------------------------------------------------------------------
# from sums to measures


def sums_finite(sums: UnitSums) -> bool:
    """Whether the sums and scales are finite (a host sync on accelerators)."""
    return bool(torch.isfinite(sums.t.sum() + sums.scale.sum()))


def entropy_from_sums(s: Tensor, t: Tensor) -> Tensor:
    """H = ln S - T / S (natural log), 0 for an all-zero map (S = 0); same shape as ``s``."""
    dead = s <= 0
    safe = torch.where(dead, torch.ones_like(s), s)
    h = (torch.log(safe) - t / safe).clamp_min(0.0)
    return torch.where(dead, torch.zeros_like(h), h)


def sparsity_from_sums(s: Tensor, t: Tensor, n: int, kind: str = "normalized") -> Tensor:
    """The measure of N units with sums S, T: ``kind`` is a perplexity variant
    (``"normalized"``, ``"relative"``) or ``"entropy"`` (1 - H / ln N). Dead maps give 1
    (1 - 1/N for ``"relative"``), as in :mod:`xai_sparsity.measuring.measures`."""
    if n < 2:
        raise XaiSparsityError(f"a sparsity needs N >= 2 units, got N = {n}")
    check_choice("kind", kind, ("normalized", "relative", "entropy"))
    return sparsity_from_entropy(entropy_from_sums(s, t), s <= 0, n, kind)


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
    :func:`unit_sums` pass plus, on request, an L2 norm and a zero count.

    The definitions of :mod:`xai_sparsity.measuring.measures` with their defaults (transform ``"abs"``,
    perplexity variant ``"normalized"``, zero tolerance 0; an all-zero map counts as 1 for every
    measure). No autograd.

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
    b = x.shape[0]
    n = math.prod(x.shape[1:])
    if x.dim() < 2 or n < 2:
        raise XaiSparsityError(
            f"layer_stats needs (B, ...) with at least 2 units per sample, got {tuple(x.shape)}"
        )
    sums = unit_sums(x, kernel=kernel)
    positions = n // sums.s.shape[1]
    with torch.no_grad():
        s, t = sums.s.sum(1), sums.t.sum(1)
        h, dead = entropy_from_sums(s, t), s <= 0
        out: dict[str, Tensor] = {
            "perplexity": sparsity_from_entropy(h, dead, n, "normalized").float(),
            "entropy": sparsity_from_entropy(h, dead, n, "entropy").float(),
            # per unit: channels, or each feature of (B, F) input
            "unit_sum": (sums.s * sums.scale.view(b, 1)).float()
            if x.dim() >= 3
            else x.abs().float(),
        }
        if channel and x.dim() >= 3 and positions >= 2:
            out["channel"] = sparsity_from_sums(sums.s, sums.t, positions).float()
        flat = x.reshape(b, n)
        if hoyer:
            l2 = torch.linalg.vector_norm(flat, dim=1, dtype=s.dtype)
            dead = l2 == 0
            ratio = (s * sums.scale) / torch.where(dead, torch.ones_like(l2), l2)
            root_n = math.sqrt(n)
            value = ((root_n - ratio) / (root_n - 1)).clamp(0.0, 1.0)
            out["hoyer"] = torch.where(dead, torch.ones_like(value), value).float()
        if zeros:
            nonzero = torch.count_nonzero(flat, dim=1)
            out["zero_fraction"] = ((n - nonzero) / n).float()
    return out
