"""Similarity of two representations of the same inputs: linear CKA (Kornblith et al. 2019).

A pure tensor function (no hooks, no models). The trainer's ``cka_drift:<layer>`` history column
is ``1 - linear_cka(previous epoch, this epoch)`` on the probe images' globally average-pooled
activations (see docs/definitions.md, "Competitor signals").

>>> import torch
>>> x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
>>> round(float(linear_cka(x, 3.0 * x)), 6)
1.0
"""

from __future__ import annotations

import torch
from torch import Tensor

from xai_sparsity.base.errors import XaiSparsityError

__all__ = ["linear_cka"]


def linear_cka(x: Tensor, y: Tensor) -> Tensor:
    """Linear centred kernel alignment of two representations of the same n inputs.

    ``CKA(X, Y) = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with ``Xc``, ``Yc`` the
    column-centred matrices (Kornblith et al. 2019, eq. 6). In [0, 1]; 1 for identical
    representations; invariant to orthogonal transforms and isotropic scaling of either side
    (not to arbitrary invertible linear maps).

    Args:
        x: (n, p) one row per input (e.g. a layer's activations, pooled per channel).
        y: (n, q) the same inputs in another representation (another epoch, layer or model).

    Returns:
        A float64 scalar; NaN when either side is constant over the inputs (zero after
        centring), where the similarity is undefined.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise XaiSparsityError(
            f"linear_cka needs (n, p) and (n, q) matrices of the same n inputs, got shapes "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.shape[0] < 2:
        raise XaiSparsityError(f"linear_cka needs at least 2 inputs, got {x.shape[0]}")
    xc = x.double() - x.double().mean(0, keepdim=True)
    yc = y.double() - y.double().mean(0, keepdim=True)
    cross = (yc.T @ xc).square().sum()
    norm_x = torch.linalg.matrix_norm(xc.T @ xc)
    norm_y = torch.linalg.matrix_norm(yc.T @ yc)
    denom = norm_x * norm_y
    if float(denom.detach()) == 0.0:
        return torch.tensor(float("nan"), dtype=torch.float64, device=x.device)
    return (cross / denom).clamp(0.0, 1.0)
