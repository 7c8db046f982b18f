"""Shared test settings and fixtures: deterministic, small and single-threaded where it matters.

Fixtures:
- ``small_cnn``: a factory of the small CNNs the tests train and explain (see
  :func:`make_small_cnn`); call it with the sizes a test needs.
- ``one_thread``: torch on one thread for the tests of a module (``pytestmark =
  pytest.mark.usefixtures("one_thread")``); small tensors run faster so on a shared machine.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence

import pytest
import torch
from torch import nn

os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def make_small_cnn(
    in_channels: int = 1,
    widths: Sequence[int] = (6, 8),
    *,
    image_size: int = 12,
    num_classes: int = 3,
    norm_after: Sequence[int] = (0,),
    pool_after: Sequence[int] = (0,),
    inplace: bool = False,
    dropout: float | None = None,
    seed: int | None = 0,
) -> nn.Sequential:
    """A small CNN: per width a 3x3 conv (padding 1), a BatchNorm after the convs listed in
    ``norm_after``, a ReLU and a 2x2 max-pool after those in ``pool_after``; then Flatten, an
    optional Dropout and the Linear classifier. Seeded with ``seed`` (None: the current RNG).

    The default: ``Conv(1, 6), BN, ReLU, MaxPool, Conv(6, 8), ReLU, Flatten, Linear(288, 3)``
    for (B, 1, 12, 12) images, layer names ``"0"`` ... ``"7"``.
    """
    if seed is not None:
        torch.manual_seed(seed)
    layers: list[nn.Module] = []
    previous = in_channels
    for i, width in enumerate(widths):
        layers.append(nn.Conv2d(previous, width, 3, padding=1))
        if i in norm_after:
            layers.append(nn.BatchNorm2d(width))
        layers.append(nn.ReLU(inplace=inplace))
        if i in pool_after:
            layers.append(nn.MaxPool2d(2))
        previous = width
    layers.append(nn.Flatten())
    if dropout is not None:
        layers.append(nn.Dropout(dropout))
    side = image_size // 2 ** len(pool_after)
    layers.append(nn.Linear(previous * side * side, num_classes))
    return nn.Sequential(*layers)


@pytest.fixture(scope="session")
def small_cnn() -> Callable[..., nn.Sequential]:
    """The factory :func:`make_small_cnn` (a new, seeded model per call)."""
    return make_small_cnn


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """torch on one thread while a module's tests run; the previous count restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
