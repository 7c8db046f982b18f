"""Small torch helpers every layer of the package uses: unwrapping a model, eval mode, devices.

Each exists once here; the rest of the package imports them by these public names.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import nn

from xai_sparsity.base.errors import XaiSparsityError

__all__ = [
    "eval_mode",
    "eval_no_grad",
    "model_device",
    "model_device_dtype",
    "resolve_device",
    "unwrap",
]


def unwrap(model: nn.Module) -> nn.Module:
    """The module whose submodule names the user sees (strips DataParallel/DDP wrappers)."""
    if not isinstance(model, nn.Module):
        raise XaiSparsityError(
            f"model must be a torch.nn.Module, got {type(model).__name__}: {model!r:.80}"
        )
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode; restore each one's own flag afterwards, also on error."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def eval_no_grad(model: nn.Module) -> Iterator[None]:
    """:func:`eval_mode` and no autograd: how every measurement forward runs."""
    with eval_mode(model), torch.no_grad():
        yield


def model_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter or buffer; ``None`` for a stateless model."""
    return model_device_dtype(model)[0]


def model_device_dtype(model: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    """Device and floating dtype of the model's first parameter (or buffer)."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device, (t.dtype if t.is_floating_point() else None)
    return None, None


def resolve_device(name: str = "auto", rank: int = 0, world: int = 1) -> torch.device:
    """``"auto"``: CUDA (the local rank's GPU under torchrun), else MPS, else CPU.

    An explicit name is checked: a CUDA or MPS device that is not available raises
    :class:`XaiSparsityError` saying so.
    """
    if name == "auto":
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", rank if world > 1 else 0))
            return torch.device("cuda", local % torch.cuda.device_count())
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise XaiSparsityError(f"device={name!r} but CUDA is not available; use device='auto'")
    if name == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise XaiSparsityError("device='mps' but MPS is not available; use device='auto'")
    try:
        return torch.device(name)
    except RuntimeError:
        raise XaiSparsityError(
            f"device={name!r} is not a device name; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"
        ) from None
