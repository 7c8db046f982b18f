"""Integrations with training frameworks (optional dependencies).

- :mod:`xai_sparsity.integrations.lightning`: ``SparsityCallback`` for PyTorch Lightning
  (``pip install xai-sparsity[lightning]``).
- :mod:`xai_sparsity.integrations.tensorboard`: per-layer scalars and histograms of a run
  directory for TensorBoard (``pip install xai-sparsity[tensorboard]``).

Nothing here is imported by ``import xai_sparsity``.
"""

from __future__ import annotations

__all__: list[str] = []
