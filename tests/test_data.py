"""Datasets: splits are fixed, disjoint, stratified and seeded; missing data fails clearly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xai_sparsity import XaiSparsityError
from xai_sparsity.training.data import _fashion_deb_dir, load_data, stratified_split


def _dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def _images(ds: torch.utils.data.Dataset) -> torch.Tensor:  # type: ignore[type-arg]
    return torch.stack([ds[i][0] for i in range(len(ds))])  # type: ignore[arg-type]


def test_stratified_split_disjoint_balanced() -> None:
    labels = np.repeat(np.arange(10), 50)
    a, b, c = stratified_split(labels, [100, 50, None], seed=3)
    assert len(a) == 100 and len(b) == 50 and len(c) == 350
    assert not set(a) & set(b) and not set(a) & set(c) and not set(b) & set(c)
    assert np.bincount(labels[a]).tolist() == [10] * 10
    assert np.bincount(labels[b]).tolist() == [5] * 10
    again = stratified_split(labels, [100, 50, None], seed=3)
    assert all((x == y).all() for x, y in zip((a, b, c), again, strict=True))


def test_stratified_split_too_large() -> None:
    with pytest.raises(XaiSparsityError, match="only 10 remain"):
        stratified_split(np.repeat(np.arange(2), 10), [10, 30], seed=0)


def test_mnist5k_splits() -> None:
    data = load_data("mnist5k", train_size=200, probe_size=100, test_size=300, seed=1)
    assert (len(data.train), len(data.probe), len(data.test)) == (200, 100, 300)
    assert len(data.train_probe) == 100
    assert data.num_classes == 10 and data.in_channels == 1 and data.image_size == (28, 28)
    x, y = data.train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    labels = torch.stack([data.train[i][1] for i in range(len(data.train))])
    assert torch.bincount(labels).tolist() == [20] * 10
    # train, probe and test are disjoint images
    tr, pr, te = (_images(d).flatten(1) for d in (data.train, data.probe, data.test))
    assert _dist(tr, pr).min() > 1e-2 and _dist(pr, te).min() > 1e-2
    # the train probe is a subset of the training inputs
    assert _dist(_images(data.train_probe).flatten(1), tr).min(dim=1).values.max() < 1e-2
    # normalised: roughly zero mean, unit std
    assert abs(float(tr.mean())) < 0.3 and 0.7 < float(tr.std()) < 1.3
    # deterministic for a seed, different for another
    again = load_data("mnist5k", train_size=200, probe_size=100, test_size=300, seed=1)
    assert torch.equal(_images(again.probe), _images(data.probe))
    other = load_data("mnist5k", train_size=200, probe_size=100, test_size=300, seed=2)
    assert not torch.equal(_images(other.probe), _images(data.probe))


def test_augment_changes_training_images_only() -> None:
    data = load_data("mnist5k", train_size=50, probe_size=20, test_size=20, augment=True)
    torch.manual_seed(0)
    a = torch.stack([data.train[i][0] for i in range(50)])
    b = torch.stack([data.train[i][0] for i in range(50)])
    assert a.shape == (50, 1, 28, 28) and not torch.equal(a, b)
    assert torch.equal(data.probe[0][0], data.probe[0][0])


def test_digits_optional() -> None:
    pytest.importorskip("sklearn")
    data = load_data("digits", train_size=100, probe_size=50)
    assert data.image_size == (8, 8) and len(data.test) == 1797 - 150


@pytest.mark.skipif(_fashion_deb_dir() is None, reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_from_debian_package() -> None:
    data = load_data("fashion_mnist", train_size=100, probe_size=50, test_size=100)
    assert len(data.train) == 100 and data.class_names[0] == "T-shirt/top"


def test_missing_and_bad_inputs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(XaiSparsityError, match="download=True"):
        load_data("cifar10", root=tmp_path)
    with pytest.raises(XaiSparsityError, match="'mnist5k'"):
        load_data("mnist5K")
    with pytest.raises(XaiSparsityError, match="train_size"):
        load_data("mnist5k", train_size=0)
    with pytest.raises(XaiSparsityError, match="root=PATH"):
        load_data("imagefolder")


def test_imagefolder(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(12):
            arr = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / cls / f"{i}.png")
    data = load_data("imagefolder", root=tmp_path, train_size=8, probe_size=6, image_size=16)
    assert data.class_names == ["cat", "dog"] and len(data.test) == 10
    assert data.train[0][0].shape == (3, 16, 16)
    val = load_data(
        "imagefolder", root=tmp_path, train_size=8, probe_size=6, image_size=16, val_size=4
    )
    assert len(val.val) == 4 and len(val.test) == 6  # type: ignore[arg-type]
    assert val.train.indices == data.train.indices  # type: ignore[attr-defined]
    assert not set(val.val.indices) & set(val.train.indices + val.test.indices + val.probe.indices)  # type: ignore[union-attr, attr-defined]


def test_val_split_is_disjoint_and_leaves_training_images_unchanged() -> None:
    def images(ds: object) -> set[bytes]:
        return {bytes(x.numpy().tobytes()) for x in ds.tensors[0]}  # type: ignore[attr-defined]

    plain = load_data("mnist5k", train_size=200, probe_size=100, test_size=300, seed=3)
    with_val = load_data(
        "mnist5k", train_size=200, probe_size=100, test_size=300, seed=3, val_size=150
    )
    rest = load_data("mnist5k", train_size=200, probe_size=100, seed=3, val_size=150)
    assert plain.val is None and len(with_val.val) == 150  # type: ignore[arg-type]
    for bundle in (with_val, rest):
        assert torch.equal(bundle.train.tensors[0], plain.train.tensors[0])  # type: ignore[attr-defined]
        assert torch.equal(bundle.probe.tensors[0], plain.probe.tensors[0])  # type: ignore[attr-defined]
        val = images(bundle.val)
        assert len(val) == 150
        for other in (bundle.train, bundle.probe, bundle.test):
            assert not val & images(other)
    assert torch.equal(with_val.test.tensors[0], plain.test.tensors[0])  # type: ignore[attr-defined]
    assert len(rest.test) == 5000 - 200 - 100 - 150
    labels = with_val.val.tensors[1]  # type: ignore[union-attr]
    assert torch.bincount(labels, minlength=10).tolist() == [15] * 10  # stratified


def test_val_size_errors_name_the_setting_and_the_count() -> None:
    with pytest.raises(XaiSparsityError, match=r"val_size=5000 is more than the 4699 images"):
        load_data("mnist5k", train_size=200, probe_size=100, val_size=5000)
    with pytest.raises(XaiSparsityError, match=r"val_size=4501 is more than the 4500 images"):
        load_data("mnist5k", train_size=200, probe_size=100, test_size=200, val_size=4501)
    with pytest.raises(XaiSparsityError, match=r"val_size=-1"):
        load_data("mnist5k", train_size=200, val_size=-1)
