"""Linear CKA: analytic values and invariances."""

from __future__ import annotations

import math

import pytest
import torch

from xai_sparsity import XaiSparsityError
from xai_sparsity.measuring.similarity import linear_cka


def _rand(n: int, p: int, seed: int) -> torch.Tensor:
    return torch.randn(n, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_identical_representations_give_one() -> None:
    x = _rand(40, 6, 0)
    assert float(linear_cka(x, x)) == pytest.approx(1.0, abs=1e-12)


def test_invariant_to_orthogonal_transform_isotropic_scaling_and_shift() -> None:
    x, y = _rand(60, 5, 1), _rand(60, 7, 2)
    q, _ = torch.linalg.qr(_rand(5, 5, 3))
    base = float(linear_cka(x, y))
    assert float(linear_cka(x @ q, y)) == pytest.approx(base, abs=1e-12)
    assert float(linear_cka(4.0 * x + 3.0, 0.1 * y)) == pytest.approx(base, abs=1e-12)
    assert float(linear_cka(x, y)) == pytest.approx(float(linear_cka(y, x)), abs=1e-12)
    assert 0.0 <= base <= 1.0


def test_known_small_example() -> None:
    # one-column representations: CKA is the squared Pearson correlation
    x = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    y = torch.tensor([[1.0], [3.0], [2.0], [4.0]])
    r = 0.8  # Pearson(x, y)
    assert float(linear_cka(x, y)) == pytest.approx(r**2, abs=1e-12)
    # orthogonal centred columns: X = [e1], Y = [e2] in the centred space -> 0
    a = torch.tensor([[1.0], [-1.0], [1.0], [-1.0]])
    b = torch.tensor([[1.0], [1.0], [-1.0], [-1.0]])
    assert float(linear_cka(a, b)) == pytest.approx(0.0, abs=1e-12)
    # X = [a, b], Y = [a]: ||Y^T X||^2 = 16, ||X^T X|| = 4 sqrt(2), ||Y^T Y|| = 4
    ab = torch.cat([a, b], dim=1)
    assert float(linear_cka(ab, a)) == pytest.approx(16 / (4 * math.sqrt(2) * 4), abs=1e-12)


def test_constant_side_is_nan_and_bad_shapes_raise() -> None:
    assert math.isnan(float(linear_cka(torch.ones(5, 2), _rand(5, 2, 0))))
    with pytest.raises(XaiSparsityError, match="same n inputs"):
        linear_cka(torch.ones(5, 2), torch.ones(4, 2))
    with pytest.raises(XaiSparsityError, match="at least 2"):
        linear_cka(torch.ones(1, 2), torch.ones(1, 2))
