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


def _rows(x: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in x.flatten(1)}


def _images(ds) -> torch.Tensor:
    return torch.stack([ds[i][0] for i in range(len(ds))])


def test_a_heldout_search_val_is_a_seeded_part_of_test_and_the_report_keeps_the_rest(tmp_path):
    _write_folder(tmp_path, per_class=8)
    s = make_splits("imagefolder", tmp_path, seed=3, calib_batches=1, calib_batch_size=8, search_val="heldout")
    assert s.search_val_from == "test" and s.sizes["search_val"] == 12 and len(s.test) == 12  # half of 24
    from autoprune.data.datasets import DATASETS

    plain_train = DATASETS.get("imagefolder")(tmp_path, False).train  # without the fine-tune's augmentation
    val, test, train = _rows(s.search_val.x), _rows(_images(s.test)), _rows(_images(plain_train))
    assert len(s.train) == len(plain_train) == 24  # fine-tuning keeps every training image
    whole_test = _rows(_images(make_splits("imagefolder", tmp_path, search_val_size=4).test))
    assert not val & test and val | test == whole_test  # never scored twice, none lost
    assert not val & train and _rows(s.calib.x) <= train  # calibration: training images only
    again = make_splits("imagefolder", tmp_path, seed=3, calib_batches=1, calib_batch_size=8, search_val="heldout")
    assert torch.equal(again.search_val.x, s.search_val.x)


def test_a_val_folder_beside_test_is_the_heldout_search_val(tmp_path):
    _write_folder(tmp_path, per_class=4)
    import shutil

    shutil.copytree(tmp_path / "test", tmp_path / "val")  # same classes; images re-drawn below
    rng = np.random.default_rng(7)
    from PIL import Image

    for f in (tmp_path / "val").rglob("*.jpg"):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(f)
    s = make_splits("imagefolder", tmp_path, search_val="heldout", calib_batches=1, calib_batch_size=4)
    assert s.search_val_from == "val" and len(s.search_val) == 12 and len(s.test) == 12
    assert not _rows(s.search_val.x) & _rows(_images(s.test))
    assert _rows(_images(s.test)) == _rows(_images(make_splits("imagefolder", tmp_path, search_val_size=2).test))
    shutil.copy(tmp_path / "test" / "dog" / "1.jpg", tmp_path / "val" / "dog" / "1.jpg")
    with pytest.raises(AutopruneError, match="share 1 image.*must not overlap the reported test images"):
        make_splits("imagefolder", tmp_path, search_val="heldout")
    shutil.rmtree(tmp_path / "val")
    (tmp_path / "val").symlink_to(tmp_path / "test")
    with pytest.raises(AutopruneError, match="share 12 image"):
        make_splits("imagefolder", tmp_path, search_val="heldout")
    (tmp_path / "val").unlink()
    shutil.copytree(tmp_path / "test", tmp_path / "val")
    for f in (tmp_path / "val").rglob("*.jpg"):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(f)
    (tmp_path / "val" / "cat").rename(tmp_path / "val" / "lion")
    with pytest.raises(AutopruneError, match="different class folders: lion not in train/; cat missing"):
        make_splits("imagefolder", tmp_path, search_val="heldout")


def test_search_val_source_is_checked():
    with pytest.raises(AutopruneError, match="unknown search_val 'test'"):
        make_splits("digits", search_val="test")
    with pytest.raises(AutopruneError, match=r"search-val size must be in \[1, 358\].*the test split"):
        make_splits("digits", search_val="heldout", search_val_size=400)
