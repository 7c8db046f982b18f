"""Filter correlation: Pearson correlation between the channels of a layer, batch or streamed.

For a layer with C channels the samples of channel c are its activations over all images and
positions (``over="positions"``, n = images * H * W) or its global-average-pooled value per image
(``over="images"``, n = images). The C x C Pearson matrix is

    r_cd = (n S_cd - S_c S_d) / sqrt((n S_cc - S_c^2) (n S_dd - S_d^2))

with float64 sums S_c = sum f_c and S_cd = sum f_c f_d, so a :class:`CorrelationAccumulator` needs
only O(C^2) memory whatever the number of images. A channel whose samples are all equal (a *dead*
channel, zero variance) has no correlation: its row and column are 0 (diagonal 0 too), it is
counted in ``num_dead`` and left out of the summary, which is never NaN.

>>> import torch
>>> x = torch.randn(8, 3, 4, 4)
>>> x[:, 1] = 2 * x[:, 0] + 1  # channel 1 is a copy of channel 0
>>> round(filter_correlation(x)[0, 1].item(), 6)
1.0
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from xai_sparsity.base.errors import XaiSparsityError, check_choice

__all__ = [
    "OVER",
    "PRECISIONS",
    "CorrelationAccumulator",
    "correlation_summary",
    "filter_correlation",
    "weight_similarity",
]

OVER: tuple[str, ...] = ("positions", "images")
PRECISIONS: tuple[str, ...] = ("double", "single")
_STATE_VERSION = 1
_SLICE_VALUES = 2**24  # values per float64 slice in CorrelationAccumulator.update (128 MiB)
_CHUNK_VALUES = 2**18  # values per chunk of the (B, C, positions) path: the buffer stays in cache


def _shape_str(x: Tensor) -> str:
    return "(" + ", ".join(str(d) for d in x.shape) + ")"


def _validated(x: Any, over: str, fn: str) -> Tensor:
    """x detached, on a device with float64 (CPU for MPS), after the shape checks."""
    check_choice("over", over, OVER)
    if not isinstance(x, Tensor):
        raise XaiSparsityError(
            f"{fn} expects a torch.Tensor of shape (B, C, ...) or (B, C); got {type(x).__name__}."
        )
    if x.is_complex():
        raise XaiSparsityError(f"{fn} expects real activations; got dtype={x.dtype}.")
    if x.ndim < 2:
        raise XaiSparsityError(
            f"{fn} expects activations of shape (B, C, ...) or (B, C) (rank >= 2); got shape "
            f"{_shape_str(x)} (rank {x.ndim})."
        )
    if x.shape[0] == 0 or x.shape[1] == 0 or x.numel() == 0:
        raise XaiSparsityError(
            f"{fn} got no samples: shape {_shape_str(x)} (B = {x.shape[0]}, C = {x.shape[1]})."
        )
    x = x.detach()
    return x.cpu() if x.device.type == "mps" else x  # no float64 on MPS


def _samples(x: Tensor, over: str) -> Tensor:
    """Channel samples of a validated x as a float64 (C, n) matrix that the caller owns."""
    if x.ndim > 2 and over == "images":
        x = x.flatten(2).mean(2, dtype=torch.float64)
    # (B, C, ...) -> (C, B, ...) in one float64 copy, viewed as (C, n)
    moved = x.transpose(0, 1)
    out = torch.empty(moved.shape, dtype=torch.float64, device=x.device)
    return out.copy_(moved).view(x.shape[1], -1)


@contextlib.contextmanager
def _full_float32_matmul(active: bool) -> Iterator[None]:
    """Full float32 products inside (no TF32/bfloat16 matmuls on CUDA), the setting restored."""
    if not active:
        yield
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _check_finite(sums: Tensor, x_shape: str, fn: str) -> None:
    if not bool(torch.isfinite(sums).all()):
        bad = int((~torch.isfinite(sums)).sum())
        raise XaiSparsityError(
            f"{fn}: the activations of shape {x_shape} contain NaN or Inf values "
            f"({bad} of {sums.numel()} channels affected)."
        )


def _pearson(cov: Tensor, dead: Tensor) -> Tensor:
    """Pearson matrix from a (scaled) covariance matrix; dead channels masked to 0."""
    var = torch.diagonal(cov).clone()
    dead = dead | (var <= 0)
    std = torch.sqrt(torch.where(dead, torch.ones_like(var), var))
    r = cov / std[:, None] / std[None, :]
    r = ((r + r.t()) / 2).clamp(-1.0, 1.0)  # exactly symmetric
    live = (~dead).to(r.dtype)
    r = r * live[:, None] * live[None, :]
    r.diagonal().copy_(live)
    return r


def filter_correlation(x: Tensor, over: str = "positions") -> Tensor:
    """Pearson correlation between the channels of one batch of activations.

    Args:
        x: activations (B, C, H, W) (any rank >= 3) or pooled/dense (B, C).
        over: ``"positions"``: samples are every image and position (n = B*H*W);
            ``"images"``: each channel is global-average-pooled per image first (n = B).
            Irrelevant for (B, C) input (samples are the images).

    Returns:
        (C, C) float64 on x's device; dead (constant) channels have row, column and diagonal 0.

    >>> x = torch.tensor([[1.0, -1.0, 5.0], [2.0, -2.0, 5.0], [4.0, -4.0, 5.0]])
    >>> filter_correlation(x).tolist()
    [[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    """
    fn = "filter_correlation"
    samples = _samples(_validated(x, over, fn), over)
    _check_finite(samples.sum(1), _shape_str(x), fn)
    dead = samples.amax(1) == samples.amin(1)
    centred = samples - samples.mean(1, keepdim=True)
    return _pearson(centred @ centred.t(), dead)


def correlation_summary(
    r: Tensor | np.ndarray, dead_mask: Tensor | np.ndarray | None = None
) -> float:
    """Mean |r| over the off-diagonal pairs of live channels (0.0 if fewer than 2 live channels).

    Without ``dead_mask`` a channel is taken as dead when its diagonal entry is 0 or not finite
    (as :func:`filter_correlation` and :meth:`CorrelationAccumulator.correlation` mark them).

    >>> correlation_summary(torch.tensor([[1.0, -0.5, 0.0], [-0.5, 1.0, 0.0], [0.0, 0.0, 0.0]]))
    0.5
    """
    fn = "correlation_summary"
    r = torch.as_tensor(r).detach()
    if r.ndim != 2 or r.shape[0] != r.shape[1]:
        raise XaiSparsityError(
            f"{fn} expects a square (C, C) correlation matrix; got shape {_shape_str(r)}."
        )
    diag = torch.diagonal(r)
    if dead_mask is None:
        dead = ~torch.isfinite(diag) | (diag == 0)
    else:
        dead = torch.as_tensor(dead_mask, device=r.device)
        if dead.shape != (r.shape[0],) or dead.dtype != torch.bool:
            raise XaiSparsityError(
                f"{fn}: dead_mask must be a bool tensor of shape ({r.shape[0]},); got "
                f"shape {_shape_str(dead)} and dtype {dead.dtype}."
            )
    live = ~dead
    k = int(live.sum())
    if k < 2:
        return 0.0
    sub = r[live][:, live].to(torch.float64)
    off = sub[~torch.eye(k, dtype=torch.bool, device=sub.device)]
    if not bool(torch.isfinite(off).all()):
        raise XaiSparsityError(
            f"{fn}: the correlation matrix has NaN/Inf entries between live channels; mark those "
            f"channels in dead_mask."
        )
    return float(off.abs().mean())


def weight_similarity(conv_or_weight: nn.Module | Tensor) -> Tensor:
    """Cosine similarity of the flattened filters of a layer (needs no data).

    Args:
        conv_or_weight: a module with a ``weight`` (Conv1d/2d/3d, Linear; for ConvTranspose the
            output filters are taken along dim 1), or a weight tensor (C_out, ...) of rank >= 2.

    Returns:
        (C_out, C_out) float64; an all-zero filter has row, column and diagonal 0.

    >>> conv = torch.nn.Conv2d(3, 4, 3)
    >>> weight_similarity(conv).shape
    torch.Size([4, 4])
    """
    fn = "weight_similarity"
    if isinstance(conv_or_weight, nn.Module):
        w = getattr(conv_or_weight, "weight", None)
        if not isinstance(w, Tensor):
            raise XaiSparsityError(
                f"{fn}: {type(conv_or_weight).__name__} has no weight tensor; pass a conv or "
                f"linear layer, or its weight (C_out, C_in, ...)."
            )
        if isinstance(conv_or_weight, nn.modules.conv._ConvTransposeNd):
            if conv_or_weight.groups != 1:
                raise XaiSparsityError(
                    f"{fn}: grouped transposed convolutions (groups={conv_or_weight.groups}) are "
                    f"not supported; pass the weight of one group."
                )
            w = w.transpose(0, 1)
    elif isinstance(conv_or_weight, Tensor):
        w = conv_or_weight
    else:
        raise XaiSparsityError(
            f"{fn} expects an nn.Module with a weight or a tensor; got "
            f"{type(conv_or_weight).__name__}."
        )
    if w.ndim < 2 or w.shape[0] == 0:
        raise XaiSparsityError(
            f"{fn} expects a weight of shape (C_out, ...) with rank >= 2; got {_shape_str(w)}."
        )
    flat = w.detach().flatten(1).to(torch.float64)
    if not bool(torch.isfinite(flat).all()):
        raise XaiSparsityError(f"{fn}: the weight of shape {_shape_str(w)} has NaN/Inf entries.")
    norm = torch.linalg.vector_norm(flat, dim=1)
    zero = norm == 0
    unit = flat / torch.where(zero, torch.ones_like(norm), norm)[:, None]
    sim = unit @ unit.t()
    sim = ((sim + sim.t()) / 2).clamp(-1.0, 1.0)  # exactly symmetric
    sim.diagonal().copy_((~zero).to(sim.dtype))
    return sim


class CorrelationAccumulator:
    """Streaming filter correlation of one layer: float64 sums n, S_c, S_cd; O(C^2) memory.

    The sums are kept about a per-channel shift (the mean of the first batch), which makes
    streaming agree with :func:`filter_correlation` to ~1e-12 also for data with a large mean.
    Maps (B, C, ...) with ``over="positions"`` are processed in cache-sized chunks of samples:
    shifted into a reused buffer laid out channels first, (C, k * positions), then one GEMM per
    chunk gives its C x C products, summed over chunks in float64. ``precision="single"`` keeps a
    float32 (or float16/bfloat16) input in float32 for the shifted values and the chunk's products
    (on CUDA without TF32; the sums over chunks stay float64): about twice as fast, mean |r|
    within ~1e-7 of float64 on trained CNN layers (up to ~1e-5 for a channel that is nearly
    constant). It is the choice of :func:`~xai_sparsity.capturing.sweeps.sweep` and of the
    trainer's and the monitor's probe pass (:mod:`xai_sparsity.training.probe`). ``"double"``
    (default) works in float64 throughout.
    Updates run on the tensor's device. Accumulators over parts of the data combine with
    :meth:`merge` (or ``a + b``, ``a += b``) and across processes with :meth:`all_reduce`;
    :meth:`state_dict` is picklable (e.g. to collect results from DataLoader workers).

    >>> acc = CorrelationAccumulator()
    >>> for _ in range(3):
    ...     acc.update(torch.randn(4, 5, 6, 6))
    >>> acc.n, acc.correlation().shape, acc.num_dead
    (432, torch.Size([5, 5]), 0)
    """

    def __init__(self, over: str = "positions", precision: str = "double") -> None:
        self.over: str = check_choice("over", over, OVER)
        self.precision: str = check_choice("precision", precision, PRECISIONS)
        self._buf: Tensor | None = None  # chunk scratch of the positions path (not state)
        self._n = 0
        self._shift: Tensor | None = None  # (C,) float64
        self._sum: Tensor | None = None  # (C,)   sum of (f - shift)
        self._outer: Tensor | None = None  # (C, C) sum of (f - shift)(f - shift)^T
        self._min: Tensor | None = None  # (C,) for the dead (constant) channel test
        self._max: Tensor | None = None

    # ---- properties ------------------------------------------------------------------------

    @property
    def n(self) -> int:
        """Number of samples per channel seen so far."""
        return self._n

    @property
    def num_channels(self) -> int | None:
        """C, fixed by the first update (None before)."""
        return None if self._shift is None else int(self._shift.shape[0])

    @property
    def device(self) -> torch.device | None:
        return None if self._shift is None else self._shift.device

    def _require_data(self, what: str) -> None:
        if self._n == 0:
            raise XaiSparsityError(
                f"CorrelationAccumulator.{what}: no data yet; call update(x) with activations "
                f"(B, C, ...) first."
            )

    @property
    def dead_mask(self) -> Tensor:
        """(C,) bool: channels whose samples were all equal (zero variance)."""
        self._require_data("dead_mask")
        assert self._min is not None and self._max is not None and self._outer is not None
        assert self._sum is not None
        var = self._n * torch.diagonal(self._outer) - self._sum**2
        return (self._max == self._min) | (var <= 0)

    @property
    def num_dead(self) -> int:
        return int(self.dead_mask.sum())

    # ---- accumulation ----------------------------------------------------------------------

    def update(self, x: Tensor) -> None:
        """Add a batch of activations x (B, C, ...) or (B, C) (detached; no gradient).

        Large batches are processed in slices (chunks), bounding every temporary.
        """
        fn = "CorrelationAccumulator.update"
        with torch.no_grad():
            x = _validated(x, self.over, fn)
            c = x.shape[1]
            if self._shift is not None and c != self._shift.shape[0]:
                raise XaiSparsityError(
                    f"{fn}: got {c} channels (shape {_shape_str(x)}) but this accumulator holds "
                    f"{self._shift.shape[0]} channels from its first update; use one accumulator "
                    f"per layer."
                )
            self._to(x.device)
            if x.ndim > 2 and self.over == "positions":
                parts = self._position_sums(x)
            else:
                parts = self._sample_sums(x)
            batch_sum, batch_outer, low, high, shift, n = parts
            _check_finite(batch_sum, _shape_str(x), fn)  # before the state changes
            if self._shift is None:
                self._shift, self._sum, self._outer = shift, batch_sum, batch_outer
                self._min, self._max = low, high
            else:
                assert self._sum is not None and self._outer is not None
                assert self._min is not None and self._max is not None
                # out of place: the O(C^2) state may hold inference-mode tensors
                self._sum = self._sum + batch_sum
                self._outer = self._outer + batch_outer
                self._min = torch.minimum(self._min, low)
                self._max = torch.maximum(self._max, high)
            self._n += n

    def _sample_sums(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, int]:
        """Sums of one batch through float64 (C, n) sample matrices, in slices."""
        shift = self._shift
        step = max(1, _SLICE_VALUES // max(1, x[0].numel()))
        n = 0
        batch_sum = batch_outer = low = high = None
        for part in x.split(step):
            samples = _samples(part, self.over)  # (C, n) float64
            if shift is None:
                shift = samples.mean(1)
            p_low, p_high = samples.amin(1), samples.amax(1)
            samples -= shift[:, None]
            p_sum, p_outer = samples.sum(1), samples @ samples.t()
            if batch_sum is None:
                batch_sum, batch_outer, low, high = p_sum, p_outer, p_low, p_high
            else:
                assert batch_outer is not None and low is not None and high is not None
                batch_sum += p_sum
                batch_outer += p_outer
                torch.minimum(low, p_low, out=low)
                torch.maximum(high, p_high, out=high)
            n += samples.shape[1]
        assert batch_sum is not None and batch_outer is not None and shift is not None
        assert low is not None and high is not None
        return batch_sum, batch_outer, low, high, shift, n

    def _position_sums(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, int]:
        """Sums of a batch of maps (B, C, ...) over samples and positions, in chunks of samples:
        the shifted chunk in a reused buffer as (C, B_k * P), its Gram matrix by one GEMM."""
        f64 = torch.float64
        b, c = x.shape[0], x.shape[1]
        units = x.reshape(b, c, -1)
        p = units.shape[2]
        work = f64 if self.precision == "double" or x.dtype == f64 else torch.float32
        k = max(1, min(b, min(_SLICE_VALUES, _CHUNK_VALUES) // max(1, c * p)))
        # at least ~2C columns per GEMM: each chunk writes a C x C result, which must not
        # outweigh its C x C x (k P) products when P is small next to C (deep layers)
        k = min(b, max(k, -(-2 * c // max(1, p))))
        buf = self._buf
        if (
            buf is None
            or buf.dtype != work
            or buf.device != x.device
            or buf.numel() < k * c * p
            or buf.is_inference() != torch.is_inference_mode_enabled()
        ):
            buf = self._buf = torch.empty(k * c * p, dtype=work, device=x.device)
        shift = self._shift
        if shift is None:  # the first chunk's mean, exactly representable in the work dtype
            shift = units[:k].mean(dim=(0, 2), dtype=f64).to(work).to(f64)
        shift_w = shift.to(work).view(1, c, 1)
        # The min/max only tell dead (constant) channels: once a channel has varied it stays
        # live, so its extremes need no more passes (on the CPU, where the check is free).
        track = True
        if self._min is not None and self._max is not None and x.device.type == "cpu":
            track = bool((self._min == self._max).any())
        sums: list[Tensor] = []
        outers: list[Tensor] = []
        lows: list[Tensor] = []
        highs: list[Tensor] = []
        with _full_float32_matmul(work == torch.float32 and x.device.type == "cuda"):
            for start in range(0, b, k):
                part = units[start : start + k]
                m = part.shape[0]
                # channels first: the chunk's positions of all its samples form one (C, m*P)
                # matrix, so one GEMM gives the chunk's C x C products (per-sample bmm would
                # write m Gram matrices, costly when P is small next to C)
                d = buf[: m * c * p].view(c, m, p)
                torch.sub(part.transpose(0, 1), shift_w.view(c, 1, 1), out=d)
                if track:
                    lows.append(part.amin(dim=2).amin(dim=0))  # (aminmax with a dim is slower)
                    highs.append(part.amax(dim=2).amax(dim=0))
                flat = d.view(c, m * p)
                sums.append(flat.sum(dim=1, dtype=f64))
                outers.append((flat @ flat.t()).to(f64))
        batch_sum = torch.stack(sums).sum(0)
        batch_outer = torch.stack(outers).sum(0)
        if track:
            low = torch.stack(lows).amin(0).to(f64)
            high = torch.stack(highs).amax(0).to(f64)
        else:
            assert self._min is not None and self._max is not None
            low, high = self._min, self._max
        return batch_sum, batch_outer, low, high, shift, b * p

    def _to(self, device: torch.device) -> None:
        for name in ("_shift", "_sum", "_outer", "_min", "_max"):
            value = getattr(self, name)
            if value is not None and value.device != device:
                setattr(self, name, value.to(device))

    def _reshift(self, new_shift: Tensor) -> None:
        """Express the sums about another shift (exact algebra)."""
        assert self._shift is not None and self._sum is not None and self._outer is not None
        d = self._shift - new_shift  # f - new = (f - old) + d
        cross = torch.outer(d, self._sum)
        self._outer = self._outer + cross + cross.t() + self._n * torch.outer(d, d)
        self._sum = self._sum + self._n * d
        self._shift = new_shift.clone()

    def merge(self, other: CorrelationAccumulator) -> CorrelationAccumulator:
        """Add the data of ``other`` to this accumulator (in place); returns self."""
        if not isinstance(other, CorrelationAccumulator):
            raise XaiSparsityError(
                f"merge expects a CorrelationAccumulator; got {type(other).__name__}."
            )
        if other.over != self.over:
            raise XaiSparsityError(
                f"cannot merge accumulators with over={self.over!r} and over={other.over!r}."
            )
        if other._n == 0:
            return self
        if self._n == 0:
            self.load_state_dict(other.state_dict())
            return self
        if other.num_channels != self.num_channels:
            raise XaiSparsityError(
                f"cannot merge accumulators with {self.num_channels} and {other.num_channels} "
                f"channels."
            )
        assert self._shift is not None and self._sum is not None and self._outer is not None
        assert self._min is not None and self._max is not None
        theirs = copy.deepcopy(other)
        theirs._to(self._shift.device)
        theirs._reshift(self._shift)
        assert theirs._sum is not None and theirs._outer is not None
        assert theirs._min is not None and theirs._max is not None
        self._sum = self._sum + theirs._sum
        self._outer = self._outer + theirs._outer
        self._min = torch.minimum(self._min, theirs._min)
        self._max = torch.maximum(self._max, theirs._max)
        self._n += theirs._n
        return self

    def __add__(self, other: CorrelationAccumulator) -> CorrelationAccumulator:
        return copy.deepcopy(self).merge(other)

    def __iadd__(self, other: CorrelationAccumulator) -> CorrelationAccumulator:
        return self.merge(other)

    def all_reduce(self, group: Any = None) -> None:
        """Sum the statistics of all processes of a torch.distributed group (in place, on each).

        Every process must call it. A process without data takes part with empty statistics.
        With the NCCL backend the state moves to the current CUDA device.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise XaiSparsityError(
                "all_reduce needs an initialised torch.distributed process group "
                "(torch.distributed.init_process_group)."
            )
        if dist.get_backend(group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = self.device or torch.device("cpu")
        info = torch.tensor([self.num_channels or 0], dtype=torch.int64, device=device)
        dist.all_reduce(info, op=dist.ReduceOp.MAX, group=group)
        c = int(info.item())
        if c == 0:
            return  # no process has data
        if self._n > 0 and self.num_channels != c:
            raise XaiSparsityError(
                f"all_reduce: this process holds {self.num_channels} channels, another {c}."
            )
        if self._n == 0:
            zeros = torch.zeros(c, dtype=torch.float64, device=device)
            self._shift, self._sum = zeros.clone(), zeros.clone()
            self._outer = torch.zeros(c, c, dtype=torch.float64, device=device)
            self._min = torch.full((c,), float("inf"), dtype=torch.float64, device=device)
            self._max = torch.full((c,), float("-inf"), dtype=torch.float64, device=device)
        self._to(device)
        assert self._shift is not None
        # a common shift: the mean of the shifts of the processes that have data
        has = 1.0 if self._n > 0 else 0.0
        shift_sum = torch.cat([self._shift * has, torch.tensor([has], device=device)])
        dist.all_reduce(shift_sum, op=dist.ReduceOp.SUM, group=group)
        self._reshift(shift_sum[:c] / shift_sum[c])
        assert self._sum is not None and self._outer is not None
        assert self._min is not None and self._max is not None
        total = torch.cat(
            [torch.tensor([float(self._n)], dtype=torch.float64, device=device), self._sum]
        )
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        self._outer, self._min, self._max = (
            self._outer.clone(),
            self._min.clone(),
            self._max.clone(),
        )
        dist.all_reduce(self._outer, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(self._min, op=dist.ReduceOp.MIN, group=group)
        dist.all_reduce(self._max, op=dist.ReduceOp.MAX, group=group)
        self._n = round(float(total[0]))
        self._sum = total[1:].clone()

    # ---- results ---------------------------------------------------------------------------

    def correlation(self) -> Tensor:
        """(C, C) float64 Pearson matrix; dead channels have row, column and diagonal 0."""
        self._require_data("correlation")
        assert self._sum is not None and self._outer is not None
        cov = self._n * self._outer - torch.outer(self._sum, self._sum)
        return _pearson(cov, self.dead_mask)

    def mean_abs(self) -> float:
        """Mean |r| over off-diagonal pairs of live channels; 0.0 with fewer than 2 live."""
        return correlation_summary(self.correlation(), self.dead_mask)

    def state_dict(self) -> dict[str, Any]:
        """Picklable state (CPU tensors)."""

        def cpu(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().cpu().clone()

        return {
            "version": _STATE_VERSION,
            "over": self.over,
            "n": self._n,
            "shift": cpu(self._shift),
            "sum": cpu(self._sum),
            "outer": cpu(self._outer),
            "min": cpu(self._min),
            "max": cpu(self._max),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (replaces the current statistics)."""
        keys = {"version", "over", "n", "shift", "sum", "outer", "min", "max"}
        if not isinstance(state, dict) or set(state) != keys:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise XaiSparsityError(
                f"load_state_dict expects a dict with keys {sorted(keys)}; got {got}."
            )
        if state["version"] != _STATE_VERSION:
            raise XaiSparsityError(
                f"load_state_dict: state version {state['version']!r} is not {_STATE_VERSION}."
            )
        self.over = check_choice("over", state["over"], OVER)
        self._n = int(state["n"])

        def own(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().clone().to(torch.float64)

        self._shift, self._sum, self._outer = (
            own(state["shift"]),
            own(state["sum"]),
            own(state["outer"]),
        )
        self._min, self._max = own(state["min"]), own(state["max"])

    def __repr__(self) -> str:
        return (
            f"CorrelationAccumulator(over={self.over!r}, channels={self.num_channels}, n={self._n})"
        )
