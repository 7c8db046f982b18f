"""Activation sparsity measures: pure tensor functions, no hooks and no models.

Every measure maps a batch of activations ``x`` of shape (B, C, H, W) (any rank >= 2: (B, F),
(B, C, L), (B, C, D, H, W)) to one value in [0, 1] per sample and *scope* unit:

- ``"layer"``:   all non-batch dims, N = C*H*W units          -> (B,)
- ``"channel"``: dims 2.., N = H*W units per channel (rank >= 3) -> (B, C)
- ``"spatial"``: dim 1, N = C units per position (rank >= 3)     -> (B, H, W)

High values mean sparse (few units carry the activity), 0 means all units equally active. The
perplexity measure is the project's definition (see the docs): with p = a / sum(a) and
H = -sum p ln p, PP = exp(H) and s = (N - PP) / (N - 1). An all-zero ("dead") map has s = 1 for
every measure (1 - 1/N for the "relative" variant, the value of PP = 1), and a zero gradient.

Numerics: reductions run in float32 for float16/bfloat16 (and integer) input, float64 stays float64.
This module is the plain, differentiable reference: one guarded form (finite values and gradients
at exact zeros, p = a / sum(a) taken before any logarithm, so values up to ~1e30 neither overflow
float32 nor lose precision), with or without autograd. Measuring inside forward hooks and over
datasets goes through :mod:`xai_sparsity.measuring.engine`, which computes the same values from one
pass of sums and is tested against these functions.

>>> import torch
>>> perplexity_sparsity(torch.tensor([[1.0, 1.0, 0.0, 0.0]])).tolist()  # doctest: +ELLIPSIS
[0.666...]
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from xai_sparsity.base.errors import XaiSparsityError, check_choice

__all__ = [
    "MEASURES",
    "SCOPES",
    "TRANSFORMS",
    "VARIANTS",
    "compute_measure",
    "entropy_sparsity",
    "hoyer_sparsity",
    "lifetime_sparsity",
    "perplexity_sparsity",
    "zero_fraction",
]

SCOPES: tuple[str, ...] = ("layer", "channel", "spatial")
VARIANTS: tuple[str, ...] = ("normalized", "relative")
TRANSFORMS: tuple[str, ...] = ("abs", "relu")


# --------------------------------------------------------------------------------------------
# input handling


def _shape_str(x: Tensor) -> str:
    return "(" + ", ".join(str(d) for d in x.shape) + ")"


def _check_tensor(x: Any, fn: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise XaiSparsityError(
            f"{fn} expects a torch.Tensor of shape (B, C, ...) or (B, F); got {type(x).__name__}."
        )
    if x.is_complex():
        raise XaiSparsityError(
            f"{fn} expects a real floating-point tensor; got dtype={x.dtype} (complex)."
        )
    if x.ndim < 2:
        raise XaiSparsityError(
            f"{fn} expects a batch of shape (B, C, ...) or (B, F) (rank >= 2); got shape "
            f"{_shape_str(x)} (rank {x.ndim}). Add a batch dim with x.unsqueeze(0)."
        )
    if x.shape[0] == 0:
        raise XaiSparsityError(f"{fn} got an empty batch: shape {_shape_str(x)} has B = 0 samples.")
    return x


def _reduce_dims(x: Tensor, scope: str, fn: str) -> tuple[tuple[int, ...], int]:
    """The dims a scope reduces over and the number N of units they hold."""
    check_choice("scope", scope, SCOPES)
    if scope != "layer" and x.ndim < 3:
        raise XaiSparsityError(
            f"{fn}: scope={scope!r} needs an input with channels and positions, shape (B, C, ...) "
            f"(rank >= 3); got shape {_shape_str(x)}. Use scope='layer' for dense (B, F) input."
        )
    if scope == "layer":
        dims = tuple(range(1, x.ndim))
    elif scope == "channel":
        dims = tuple(range(2, x.ndim))
    else:
        dims = (1,)
    n = math.prod(x.shape[d] for d in dims)
    if n < 2:
        raise XaiSparsityError(
            f"{fn}: scope={scope!r} on shape {_shape_str(x)} gives N = {n} unit(s) per value; "
            f"a sparsity needs N >= 2. Choose another scope from {SCOPES}."
        )
    return dims, n


def work_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _transformed(x: Tensor, transform: str) -> Tensor:
    """Non-negative activations in the working dtype."""
    check_choice("transform", transform, TRANSFORMS)
    a = x.to(work_dtype(x))
    return a.abs() if transform == "abs" else torch.relu(a)


def _check_result(s: Tensor, x: Tensor, fn: str, scope: str, check_finite: bool) -> Tensor:
    if check_finite and not bool(torch.isfinite(s).all()):
        bad = int((~torch.isfinite(s)).sum())
        raise XaiSparsityError(
            f"{fn}: the input of shape {_shape_str(x)} contains NaN or Inf values ({bad} of "
            f"{s.numel()} scope={scope!r} results are not finite). Check the model for diverged "
            f"weights or pass check_finite=False to get NaN instead of this error."
        )
    return s


def _entropy(x: Tensor, dims: tuple[int, ...], transform: str) -> tuple[Tensor, Tensor]:
    """Shannon entropy H (natural log) over ``dims`` and the dead-map mask (sum == 0), both with
    the reduced dims removed.

    The guarded form p = a / S, H = -sum p ln max(p, tiny): value and gradient finite at exact
    zeros (no log(0), no 0/0), and dividing first keeps sums of 1e30 values finite in float32.
    Dead maps get exactly zero gradient (through the ``where`` in :func:`sparsity_from_entropy`).
    """
    a = _transformed(x, transform)
    total = a.sum(dim=dims, keepdim=True)
    dead = total == 0
    p = a / torch.where(dead, torch.ones_like(total), total)
    h = -(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum(dim=dims)
    return h, dead.squeeze(dims)


def sparsity_from_entropy(h: Tensor, dead: Tensor, n: int, kind: str) -> Tensor:
    """Perplexity sparsity (``kind`` a variant) or entropy sparsity (``kind="entropy"``) of groups
    of N units from their entropy H; ``dead`` groups (all zero) count as PP = 1."""
    # A dead map counts as PP = 1 (H = 0): s = 1 (normalized, entropy), 1 - 1/N (relative). The
    # `where` also cuts the gradient of dead maps to exactly zero. One temporary per step, the
    # rest in place (autograd-safe: no in-place op touches a tensor a backward needs).
    h = torch.where(dead, 0.0, h)
    if kind == "entropy":
        return h.mul(-1.0 / math.log(n)).add_(1.0).clamp_(0.0, 1.0)
    pp = torch.exp(h)
    if kind == "normalized":
        return pp.neg().add_(n).div_(n - 1).clamp_(0.0, 1.0)
    return pp.div(-n).add_(1.0).clamp_(0.0, 1.0 - 1.0 / n)  # relative


def hoyer_from_norms(l1: Tensor, l2: Tensor, dead: Tensor, n: int) -> Tensor:
    """Hoyer sparsity (sqrt(N) - l1 / l2) / (sqrt(N) - 1) of groups of N values from their L1 and
    L2 norms, clamped to [0, 1]; 1 where ``dead`` (an all-zero map, where l2 may be 0)."""
    root_n = math.sqrt(n)
    s = (l1 / torch.where(dead, 1.0, l2)).sub_(root_n).div_(1.0 - root_n).clamp_(0.0, 1.0)
    return torch.where(dead, 1.0, s)


def _out(s: Tensor, x: Tensor) -> Tensor:
    return s.to(work_dtype(x))


# --------------------------------------------------------------------------------------------
# measures


def perplexity_sparsity(
    x: Tensor,
    scope: str = "layer",
    variant: str = "normalized",
    transform: str = "abs",
    check_finite: bool = True,
) -> Tensor:
    """Perplexity-based sparsity s = (N - PP) / (N - 1), PP = exp(H), H = -sum p ln p, p = a / sum a.

    Args:
        x: activations (B, C, H, W), or any (B, ...) with rank >= 2.
        scope: ``"layer"`` -> (B,), ``"channel"`` -> (B, C), ``"spatial"`` -> (B, H, W).
        variant: ``"normalized"`` (range [0, 1]) or ``"relative"``: s = 1 - PP / N
            (range [0, 1 - 1/N]).
        transform: ``"abs"`` (a = |x|) or ``"relu"`` (a = max(x, 0)); the identity after a ReLU.
        check_finite: raise XaiSparsityError if the result is NaN/Inf (non-finite input).

    Returns:
        float32 tensor (float64 for float64 input); 1 for all-zero maps.
        Differentiable when ``x.requires_grad`` (guarded form, finite gradients at zeros).

    >>> perplexity_sparsity(torch.tensor([[4.0, 3.0, 2.0, 1.0]])).tolist()  # doctest: +ELLIPSIS
    [0.1346...]
    """
    fn = "perplexity_sparsity"
    x = _check_tensor(x, fn)
    dims, n = _reduce_dims(x, scope, fn)
    check_choice("variant", variant, VARIANTS)
    h, dead = _entropy(x, dims, transform)
    s = sparsity_from_entropy(h, dead, n, variant)
    return _check_result(_out(s, x), x, fn, scope, check_finite)


def entropy_sparsity(
    x: Tensor, scope: str = "layer", transform: str = "abs", check_finite: bool = True
) -> Tensor:
    """Normalised entropy sparsity 1 - H / ln N (range [0, 1]; 1 for all-zero maps).

    Shapes, scopes and numerics as :func:`perplexity_sparsity`.

    >>> entropy_sparsity(torch.tensor([[1.0, 1.0, 0.0, 0.0]])).tolist()
    [0.5]
    """
    fn = "entropy_sparsity"
    x = _check_tensor(x, fn)
    dims, n = _reduce_dims(x, scope, fn)
    h, dead = _entropy(x, dims, transform)
    s = sparsity_from_entropy(h, dead, n, "entropy")
    return _check_result(_out(s, x), x, fn, scope, check_finite)


def hoyer_sparsity(
    x: Tensor, scope: str = "layer", transform: str = "abs", check_finite: bool = True
) -> Tensor:
    """Hoyer sparsity (sqrt(N) - ||a||_1 / ||a||_2) / (sqrt(N) - 1) (range [0, 1]; 1 if all-zero).

    The map is divided by its maximum first, so values up to ~1e30 do not overflow float32.
    Shapes and scopes as :func:`perplexity_sparsity`.

    >>> round(hoyer_sparsity(torch.tensor([[1.0, 0.0, 0.0, 0.0]])).item(), 5)
    1.0
    """
    fn = "hoyer_sparsity"
    x = _check_tensor(x, fn)
    dims, n = _reduce_dims(x, scope, fn)
    a = _transformed(x, transform)
    peak = a.detach().amax(dim=dims, keepdim=True)  # the ratio is scale invariant
    a = a / torch.where(peak == 0, torch.ones_like(peak), peak)
    sq = (a * a).sum(dim=dims)
    dead = sq == 0
    # sqrt of a guarded sum of squares: finite gradient also for all-zero maps
    l2 = torch.sqrt(torch.where(dead, torch.ones_like(sq), sq))
    s = hoyer_from_norms(a.sum(dim=dims), l2, dead, n)
    return _check_result(_out(s, x), x, fn, scope, check_finite)


def zero_fraction(
    x: Tensor, scope: str = "layer", tol: float = 0.0, check_finite: bool = True
) -> Tensor:
    """Share of units with |x| <= tol (range [0, 1]). Not differentiable.

    With ``check_finite`` a NaN/Inf anywhere in a map raises XaiSparsityError (two extra
    read-only reductions; a NaN would otherwise count as non-zero).

    >>> zero_fraction(torch.tensor([[3.0, 1.0, 0.0, 0.0]])).tolist()
    [0.5]
    """
    fn = "zero_fraction"
    x = _check_tensor(x, fn)
    dims, n = _reduce_dims(x, scope, fn)
    if (
        not isinstance(tol, (int, float))
        or isinstance(tol, bool)
        or not tol >= 0
        or math.isinf(tol)
    ):
        raise XaiSparsityError(f"{fn}: tol={tol!r} must be a finite number >= 0.")
    with torch.no_grad():
        if not x.is_floating_point():
            x = x.to(torch.float32)
        off = (x == 0) if tol == 0 else (x.abs() <= tol)
        s = off.sum(dim=dims, dtype=torch.int64).to(work_dtype(x)) / n
        if check_finite:
            # max and min propagate NaN and show +-Inf; kept apart so that fp16 cannot overflow
            _check_result(torch.stack([x.amax(dim=dims), x.amin(dim=dims)]), x, fn, scope, True)
    return s


def lifetime_sparsity(
    x: Tensor,
    variant: str = "normalized",
    transform: str = "abs",
    check_finite: bool = True,
) -> Tensor:
    """Lifetime (selectivity) sparsity per unit across the M samples of a probe set.

    Each channel of ``x`` (M, C, ...) is first averaged over its positions per sample (after the
    transform), giving (M, C); a dense ``x`` (M, F) is used as is. Then the perplexity sparsity of
    each unit's M values is taken (N = M). High = the unit answers to few inputs.

    Returns (C,) (or (F,)), float32 (float64 for float64 input); 1 for a unit never active.

    >>> x = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 1.0]])  # 3 samples, 2 units
    >>> [round(v, 4) for v in lifetime_sparsity(x).tolist()]
    [1.0, 0.0]
    """
    fn = "lifetime_sparsity"
    x = _check_tensor(x, fn)
    check_choice("variant", variant, VARIANTS)
    if x.shape[0] < 2:
        raise XaiSparsityError(
            f"{fn} needs M >= 2 samples along dim 0; got shape {_shape_str(x)} (M = {x.shape[0]})."
        )
    if x.ndim > 2:
        a = _transformed(x, transform)
        units = a.mean(dim=tuple(range(2, x.ndim)))  # (M, C)
        transform = "relu"  # already non-negative: identity
    else:
        units = x
    return perplexity_sparsity(
        units.transpose(0, 1), "layer", variant, transform, check_finite=check_finite
    )


# --------------------------------------------------------------------------------------------
# registry

MEASURES: dict[str, Callable[..., Tensor]] = {
    "perplexity": perplexity_sparsity,
    "zero_fraction": zero_fraction,
    "hoyer": hoyer_sparsity,
    "entropy": entropy_sparsity,
}

_OPTIONS: dict[str, tuple[str, ...]] = {
    name: tuple(p for p in inspect.signature(f).parameters if p not in ("x", "scope"))
    for name, f in MEASURES.items()
}


def compute_measure(name: str, x: Tensor, scope: str = "layer", **options: Any) -> Tensor:
    """Compute the measure registered as ``name`` in :data:`MEASURES`, validating the options.

    >>> compute_measure("zero_fraction", torch.tensor([[1.0, 0.0]]), "layer").tolist()
    [0.5]
    """
    check_choice("measure", name, tuple(MEASURES))
    accepted = _OPTIONS[name]
    for key in options:
        if key not in accepted:
            raise XaiSparsityError(
                f"measure {name!r} has no option {key!r}; its options are "
                f"{', '.join(repr(k) for k in accepted)}."
            )
    return MEASURES[name](x, scope, **options)
