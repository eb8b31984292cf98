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


def _placements(aug: torch.Tensor, plain_u8: torch.Tensor, mean, std, pad: int = 4):
    """For each augmented image, the (row offset, column offset, flipped) that makes it from its
    uint8 original padded with zeros; fails if none does."""
    m, s = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
    found = []
    for a, u in zip(aug, plain_u8):
        padded = torch.nn.functional.pad(u, (pad, pad, pad, pad)).float().div(255).sub(m).div(s)
        h, w = u.shape[1:]
        hit = next(((r, c, f) for r in range(2 * pad + 1) for c in range(2 * pad + 1) for f in (False, True)
                    if torch.equal(a, (lambda x: x.flip(-1) if f else x)(padded[:, r:r + h, c:c + w]))), None)
        assert hit is not None, "an augmented image is no crop or flip of its original"
        found.append(hit)
    return found


def test_the_tensor_path_gives_the_jpeg_loaders_images_and_augmentation(tmp_path):
    from autoprune.data.datasets import CIFAR_MEAN, CIFAR_STD, DATASETS
    from autoprune.data.tensors import ImageTensors

    _write_folder(tmp_path, per_class=40)
    s = make_splits("imagefolder", tmp_path, search_val_size=20, calib_batches=1, calib_batch_size=8)
    train_t, test_t = s.tensors
    assert isinstance(train_t, ImageTensors) and len(train_t) == len(s.train) == 100
    raw = DATASETS.get("imagefolder")(tmp_path, False)
    # plain images: bit for bit what the per-image transforms give
    tx, ty = next(iter(s.test_loader(batch_size=1000)))
    jpeg = torch.stack([raw.test[i][0] for i in range(len(raw.test))])
    assert torch.equal(tx, jpeg) and ty.tolist() == [raw.test[i][1] for i in range(len(raw.test))]
    # augmented: every image a crop of its own pixels padded with zeros, maybe flipped
    gen = torch.Generator().manual_seed(0)
    ours = []
    for _ in range(3):  # three epochs of draws
        x, y = train_t.batch(torch.arange(100), gen, "cpu")
        assert x.shape == (100, 3, 32, 32) and x.dtype == torch.float32 and torch.equal(y, train_t.labels)
        ours += _placements(x, train_t.images, CIFAR_MEAN, CIFAR_STD)
    aug_set = torch.utils.data.Subset(raw.train_aug, s.train.indices)  # the per-image path it replaces
    theirs = []
    for _ in range(3):
        theirs += _placements(torch.stack([aug_set[i][0] for i in range(100)]), train_t.images,
                              CIFAR_MEAN, CIFAR_STD)
    for draws in (ours, theirs):  # the same distributions: uniform offsets in [0, 8], flips half the time
        rows, cols, flips = (np.array([d[k] for d in draws]) for k in range(3))
        assert rows.min() == cols.min() == 0 and rows.max() == cols.max() == 8
        assert abs(rows.mean() - 4) < 0.5 and abs(cols.mean() - 4) < 0.5 and abs(flips.mean() - 0.5) < 0.1
    # the loader: each image once an epoch, and a seeded generator repeats the epoch exactly
    loader = s.train_loader(25, seed=0)
    assert len(loader) == 4
    labels = torch.cat([b[1] for b in loader])
    assert sorted(labels.tolist()) == sorted(train_t.labels.tolist())
    loader.generator.manual_seed(5)
    first = [b[0] for b in loader]
    loader.generator.manual_seed(5)
    assert all(torch.equal(a, b) for a, b in zip(first, (b[0] for b in loader), strict=True))
