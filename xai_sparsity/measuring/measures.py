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
Without autograd (measurement inside forward hooks) perplexity and entropy take a fast path that
works on one temporary buffer in place; with autograd (``torch.is_grad_enabled()`` and
``x.requires_grad``, the sparsity penalty) a guarded form with finite values and gradients at exact
zeros is used. Both divide by the sum before taking logarithms, so values up to ~1e30 neither
overflow float32 nor lose precision.

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


def _transformed(x: Tensor, transform: str, *, owned: bool) -> Tensor:
    """Non-negative activations in the working dtype.

    ``owned=True`` returns a fresh buffer that the caller may overwrite in place (no-grad path).
    """
    check_choice("transform", transform, TRANSFORMS)
    dtype = work_dtype(x)
    if x.dtype != dtype:
        a = x.to(dtype)
        return a.abs_() if transform == "abs" else a.clamp_min_(0)
    if owned:
        return x.abs() if transform == "abs" else x.clamp_min(0)
    return x.abs() if transform == "abs" else torch.relu(x)


def _differentiable(x: Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


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
    """Shannon entropy H (natural log) over ``dims`` and the dead-map mask (sum == 0).

    Returns H and dead, both with the reduced dims removed.
    """
    if x.device.type == "cpu":
        # CPU: cache-sized chunks, no tensor-sized temporary (see _chunked_entropy)
        check_choice("transform", transform, TRANSFORMS)
        if _differentiable(x):
            h, total = _ChunkedEntropy.apply(x, dims, transform)
        else:
            with torch.no_grad():
                h, total = _chunked_entropy(x, dims, transform)
        return h, (total == 0).squeeze(dims)
    if _differentiable(x):
        a = _transformed(x, transform, owned=False)
        total = a.sum(dim=dims, keepdim=True)
        dead = total == 0
        p = a / torch.where(dead, torch.ones_like(total), total)
        tiny = torch.finfo(p.dtype).tiny
        # p * log(max(p, tiny)): value and gradient finite at p = 0 (no log(0), no 0/0).
        h = -(p * torch.log(p.clamp_min(tiny))).sum(dim=dims)
        return h, dead.squeeze(dims) if dims else dead
    with torch.no_grad():
        a = _transformed(x, transform, owned=True)
        total = a.sum(dim=dims, keepdim=True)
        dead = total == 0
        # Fast path on the one temporary, in place: p = a / S (dividing first keeps sums of 1e30
        # values finite and avoids the cancellation in ln S - sum(a ln a) / S), then -sum p ln p.
        a.div_(torch.where(dead, torch.ones_like(total), total))
        return _neg_plogp_sum(a, dims, fused=a.device.type != "cpu"), dead.squeeze(dims)


_CHUNK_ELEMENTS = 1 << 17
"""Elements per chunk of the CPU entropy kernel: two float32 buffers of 512 KiB stay in L2."""


def _chunk_rows(x: Tensor) -> int:
    """Samples per chunk: about ``_CHUNK_ELEMENTS`` elements, at least one sample."""
    per_sample = max(1, math.prod(x.shape[1:]))
    return max(1, min(x.shape[0], _CHUNK_ELEMENTS // per_sample))


def _load(xc: Tensor, out: Tensor, transform: str) -> Tensor:
    """Write the transformed chunk ``xc`` into the working-dtype buffer ``out``."""
    if xc.dtype == out.dtype:
        if transform == "abs":
            return torch.abs(xc, out=out)
        return torch.clamp_min(xc, 0, out=out)
    out.copy_(xc)
    return out.abs_() if transform == "abs" else out.clamp_min_(0)


def _chunked_entropy(x: Tensor, dims: tuple[int, ...], transform: str) -> tuple[Tensor, Tensor]:
    """H over ``dims`` (reduced dims removed) and the sums S (``keepdim``), without autograd.

    The batch is processed in chunks of a few samples through two reused buffers of about
    ``_CHUNK_ELEMENTS`` elements: a = |x| (or relu), S = sum a, p = a / S in place, then
    -sum p ln max(p, tiny) with a vectorised log (on CPU ``xlogy`` is scalar code). No
    tensor-sized temporary is allocated, which matters most where every large allocation is a
    fresh ``mmap`` (pinned glibc malloc settings) and keeps the passes in cache.
    """
    dtype = work_dtype(x)
    k = _chunk_rows(x)
    buf = torch.empty((k, *x.shape[1:]), dtype=dtype, device=x.device)
    logs = torch.empty_like(buf)
    tiny = torch.finfo(dtype).tiny
    hs: list[Tensor] = []
    totals: list[Tensor] = []
    for start in range(0, x.shape[0], k):
        xc = x[start : start + k]
        n = xc.shape[0]
        a, lg = (buf, logs) if n == k else (buf[:n], logs[:n])
        _load(xc, a, transform)
        total = a.sum(dim=dims, keepdim=True)
        a.div_(torch.where(total == 0, 1.0, total))
        torch.clamp_min(a, tiny, out=lg)
        hs.append(lg.log_().mul_(a).sum(dim=dims).neg_())
        totals.append(total)
    if len(hs) == 1:
        return hs[0], totals[0]
    return torch.cat(hs), torch.cat(totals)


class _ChunkedEntropy(torch.autograd.Function):
    """H with a hand-written backward that, like the forward, needs no tensor-sized temporary.

    The gradient is that of the guarded form -sum p ln max(p, tiny):
    dH/da_j = -(ln max(p_j, tiny) + H) / S, times d a / d x (sign(x) for "abs", 1[x > 0] for
    "relu"), so it is 0 at exact zeros and for dead maps. First-order only.
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, dims: tuple[int, ...], transform: str
    ) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            h, total = _chunked_entropy(x, dims, transform)
        ctx.save_for_backward(x, h, total)
        ctx.dims, ctx.transform = dims, transform
        ctx.mark_non_differentiable(total)
        return h, total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_h: Tensor, _grad_total: Tensor | None) -> tuple[Any, ...]:
        x, h, total = ctx.saved_tensors
        safe = torch.where(total == 0, 1.0, total)
        h_k = h.reshape(total.shape)
        scale = grad_h.reshape(total.shape).to(total.dtype).div(safe).neg_()  # -dL/dH / S
        tiny = torch.finfo(total.dtype).tiny
        grad_x = torch.empty_like(x)
        k = _chunk_rows(x)
        shape = (k, *x.shape[1:])
        direct = grad_x.dtype == total.dtype  # compute straight into grad_x, no copy
        buf = None if direct else torch.empty(shape, dtype=total.dtype, device=x.device)
        sign_dtype = x.dtype if ctx.transform == "abs" else torch.bool
        sign = torch.empty(shape, dtype=sign_dtype, device=x.device)
        for start in range(0, x.shape[0], k):
            stop = start + k
            xc = x[start:stop]
            n = xc.shape[0]
            a = grad_x[start:stop] if buf is None else buf[:n]
            _load(xc, a, ctx.transform)
            a.div_(safe[start:stop]).clamp_min_(tiny).log_()
            a.add_(h_k[start:stop]).mul_(scale[start:stop])
            if ctx.transform == "abs":
                a.mul_(torch.sign(xc, out=sign[:n]))
            else:
                a.mul_(torch.gt(xc, 0, out=sign[:n]))
            if buf is not None:
                grad_x[start:stop].copy_(a)
        return grad_x, None, None


def _neg_plogp_sum(p: Tensor, dims: tuple[int, ...], *, fused: bool) -> Tensor:
    """-sum(p ln p) over ``dims`` with 0 ln 0 = 0; overwrites ``p``.

    ``fused``: one xlogy pass (memory-bound devices). Otherwise zeros are raised to the smallest
    normal float (changing H by < N * 1e-36) and a vectorised log is used: on CPU xlogy is
    scalar code and about 3x slower, and log(0) takes a slow path.
    """
    if fused:
        return -p.xlogy_(p).sum(dim=dims)
    p.clamp_min_(torch.finfo(p.dtype).tiny)
    return -torch.log(p).mul_(p).sum(dim=dims)


def sparsity_from_entropy(h: Tensor, dead: Tensor, n: int, kind: str) -> Tensor:
    # A dead map counts as PP = 1 (H = 0): s = 1 (normalized, entropy), 1 - 1/N (relative). The
    # `where` also cuts the gradient of dead maps to exactly zero.
    h = torch.where(dead, torch.zeros_like(h), h)
    if kind == "entropy":
        s = 1.0 - h / math.log(n)
        hi = 1.0
    else:
        pp = torch.exp(h)
        if kind == "normalized":
            s = (n - pp) / (n - 1)
            hi = 1.0
        else:  # relative
            s = 1.0 - pp / n
            hi = 1.0 - 1.0 / n
    return s.clamp(0.0, hi)


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
    grad = _differentiable(x)
    with torch.set_grad_enabled(grad):
        a = _transformed(x, transform, owned=not grad)
        peak = a.detach().amax(dim=dims, keepdim=True)  # the ratio is scale invariant
        peak = torch.where(peak == 0, torch.ones_like(peak), peak)
        a = a / peak if grad else a.div_(peak)
        l1 = a.sum(dim=dims)
        if grad:  # sqrt of a guarded sum of squares: finite gradient also for all-zero maps
            sq = (a * a).sum(dim=dims)
            dead = sq == 0
            l2 = torch.sqrt(torch.where(dead, torch.ones_like(sq), sq))
        else:  # no temporary
            l2 = torch.linalg.vector_norm(a, 2, dim=dims)
            dead = l2 == 0
            l2 = torch.where(dead, torch.ones_like(l2), l2)
        ratio = l1 / l2
        root_n = math.sqrt(n)
        s = ((root_n - ratio) / (root_n - 1)).clamp(0.0, 1.0)
        s = torch.where(dead, torch.ones_like(s), s)
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
        a = _transformed(x, transform, owned=not _differentiable(x))
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
