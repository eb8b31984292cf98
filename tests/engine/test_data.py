from __future__ import annotations

import numpy as np
import pytest
import torch

from autoprune.data.datasets import make_splits
from autoprune.errors import AutopruneError


def test_digits_splits_are_seeded_and_disjoint():
    a = make_splits("digits", seed=1)
    b = make_splits("digits", seed=1)
    c = make_splits("digits", seed=2)
    assert torch.equal(a.search_val.x, b.search_val.x)
    assert not torch.equal(a.search_val.x, c.search_val.x)
    assert a.sizes["search_val"] == (a.sizes["train"] + a.sizes["search_val"]) // 10
    # search-val never overlaps the training split used for fine-tuning
    train_x = torch.stack([a.train[i][0] for i in range(len(a.train))]).flatten(1)
    val_x = a.search_val.x.flatten(1)
    dists = torch.cdist(val_x, train_x).min(1).values
    assert (dists > 0).float().mean() > 0.95  # digits has a few exact duplicate images
    # the test split does not move with the seed
    assert len(a.test) == len(c.test) == 359


def _write_folder(root, size=32, per_class=6, classes=("cat", "dog", "eel")):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in classes:
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(per_class):
                arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i}.jpg")


def test_imagefolder_small_images_get_cifar_treatment(tmp_path):
    _write_folder(tmp_path)
    s = make_splits("imagefolder", tmp_path, search_val_size=4, calib_batches=1, calib_batch_size=4)
    assert s.info.num_classes == 3 and s.info.image_size == 32 and s.info.in_channels == 3
    assert s.search_val.x.shape == (4, 3, 32, 32)
    assert len(s.train) == 14 and len(s.test) == 18


def test_imagefolder_errors(tmp_path):
    with pytest.raises(AutopruneError, match="train/"):
        make_splits("imagefolder", tmp_path)
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(AutopruneError, match="val/ nor test/"):
        make_splits("imagefolder", tmp_path)


def test_unknown_dataset():
    with pytest.raises(AutopruneError, match="choose one of: digits"):
        make_splits("mnist-but-typo")


def test_cifar_without_network_is_a_clear_error(tmp_path):
    with pytest.raises(AutopruneError, match="data_dir"):
        make_splits("cifar10", tmp_path, download=False)
