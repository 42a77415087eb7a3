"""fashion_mnist_pairs: composition, labels, splits, per-half augmentation, cache replay, engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as tvf
from torch import nn

from fixtures_data import write_fashion_mnist
from topkd.cache import (
    CacheMismatchError,
    ReplayableCropFlip,
    TeacherLogitCache,
    build_cache,
    wrap_dataset,
)
from topkd.data import DatasetInfo, dataset_info, get_dataset, train_val_split
from topkd.data.fashion_mnist import CLASSES as FMNIST_CLASSES
from topkd.data.fashion_mnist_pairs import compose_pairs

MEAN, STD = (0.2860,), (0.3530,)
N_TRAIN, N_TEST = 200, 100  # 20 / 10 source images per class: 100 / 50 disjoint composites


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory):
    root = tmp_path_factory.mktemp("fm")
    return root, write_fashion_mnist(root, n_train=N_TRAIN, n_test=N_TEST)


def _pairs(root, split="train", **kw):
    return get_dataset("fashion_mnist_pairs", root, split, train_size=100, test_size=50, **kw)


def test_info_is_100_classes_of_28x56_and_square_sets_unchanged():
    info = dataset_info("fashion_mnist_pairs")
    assert info == DatasetInfo(100, (28, 56), 1, MEAN, STD) and info.hw == (28, 56)
    fm = dataset_info("fashion_mnist")
    assert fm.image_size == 28 and fm.hw == (28, 28)  # an int as before
    assert dataset_info("cifar100").hw == (32, 32)


def test_compose_pairs_balanced_disjoint_deterministic():
    labels = np.repeat(np.arange(10), 60)  # 60 images per class, shuffled
    labels = np.random.default_rng(5).permutation(labels)
    src = compose_pairs(labels, 300, seed=0)  # 30 per class left + 30 right = 60: all used once
    y = 10 * labels[src[:, 0]] + labels[src[:, 1]]
    assert np.array_equal(np.bincount(y, minlength=100), np.full(100, 3))
    assert len(np.unique(src)) == 600
    assert np.array_equal(compose_pairs(labels, 300, seed=0), src)
    assert not np.array_equal(compose_pairs(labels, 300, seed=1), src)
    # larger than the pool: every image reused as evenly as possible (here exactly twice)
    big = compose_pairs(labels, 600, seed=0)
    assert np.array_equal(np.bincount(big.ravel(), minlength=600), np.full(600, 2))
    y_big = 10 * labels[big[:, 0]] + labels[big[:, 1]]
    assert np.array_equal(np.bincount(y_big, minlength=100), np.full(100, 6))
    # 150 composites: classes 0..49 get 2, 50..99 get 1 (n % 100 classes get one more)
    odd = compose_pairs(labels, 150, seed=0)
    y_odd = 10 * labels[odd[:, 0]] + labels[odd[:, 1]]
    assert sorted(np.bincount(y_odd, minlength=100)) == [1] * 50 + [2] * 50
    with pytest.raises(ValueError, match="no source image of Fashion-MNIST class 3"):
        compose_pairs(np.where(labels == 3, 4, labels), 100, seed=0)
    with pytest.raises(ValueError, match=">= 1"):
        compose_pairs(labels, 0, seed=0)


@pytest.mark.parametrize("split", ["train", "test"])
def test_composites_are_source_images_side_by_side(fmnist, split):
    root, truth = fmnist
    x_src, y_src = truth[split]  # the other split must never be used
    ds = _pairs(root, split, raw=True)
    n = 100 if split == "train" else 50
    assert ds.data.shape == (n, 28, 56) and ds.data.dtype == np.uint8 and len(ds) == n
    y_src = np.asarray(y_src)
    for i in range(n):
        a, b = ds.sources[i]
        assert np.array_equal(ds.data[i, :, :28], x_src[a])
        assert np.array_equal(ds.data[i, :, 28:], x_src[b])
        assert ds.targets[i] == 10 * y_src[a] + y_src[b]
        names = FMNIST_CLASSES[y_src[a]], FMNIST_CLASSES[y_src[b]]
        assert ds.classes[ds.targets[i]] == " | ".join(names)
    if split == "train":  # n a multiple of 100 and n / 5 <= images per class: each used once
        assert len(np.unique(ds.sources)) == 2 * n
    counts = np.bincount(ds.targets, minlength=100)
    assert counts.max() - counts.min() <= 1  # balanced (n % 100 classes get one more)
    again = _pairs(root, split, raw=True)
    assert np.array_equal(again.data, ds.data) and again.targets == ds.targets
    other = _pairs(root, split, raw=True, pair_seed=1)
    assert not np.array_equal(other.sources, ds.sources)


def test_default_sizes_use_every_real_image_once():
    from topkd.data.fashion_mnist_pairs import DEFAULT_SIZES

    # Fashion-MNIST has 6000 / 1000 images per class: 30000 / 5000 composites use each once
    assert DEFAULT_SIZES == {"train": 30000, "test": 5000}


def test_val_split_shares_no_source_image(fmnist):
    root, _ = fmnist
    ds = _pairs(root)
    tr, va = train_val_split(ds, 0.2, seed=0)
    used_tr = set(ds.sources[tr.indices].ravel().tolist())
    used_va = set(ds.sources[va.indices].ravel().tolist())
    assert len(va) == 20 and not used_tr & used_va


def test_augmentation_is_fashion_mnist_recipe_on_each_half(fmnist):
    root, _ = fmnist
    ds = _pairs(root)
    raw = _pairs(root, raw=True)
    half = T.Compose([T.RandomCrop(28, padding=2), T.RandomHorizontalFlip()])
    norm = T.Normalize(MEAN, STD)
    for i in range(40):
        torch.manual_seed(i)
        ours, y = ds[i]
        assert y == raw.targets[i]  # augmentation never changes the label
        torch.manual_seed(i)
        img = torch.from_numpy(raw.data[i]).unsqueeze(0)
        left, right = half(img[..., :28]), half(img[..., 28:])  # left half draws first
        ref = norm(torch.cat([left, right], -1).float() / 255)
        assert ours.shape == (1, 28, 56) and torch.equal(ours, ref)
        # a whole-image flip would put (a flipped copy of) the right image on the left
        whole = norm(tvf.hflip(img).float() / 255)
        assert not torch.equal(ours[..., :28], whole[..., :28])
    assert ds.crop_flip.tiles == 2 and ds.crop_flip.padding == 2


def test_replay_per_tile_matches_torchvision_pixel_exact():
    aug = ReplayableCropFlip(padding=2, flip=True, tiles=2)
    g = np.random.default_rng(3)
    imgs = torch.as_tensor(g.integers(0, 256, size=(16, 1, 28, 56), dtype=np.uint8))
    params = aug.sample(16, g)
    assert params.shape == (16, 6) and aug.fields == ("dy0", "dx0", "flip0", "dy1", "dx1", "flip1")
    out = aug.apply(imgs, params)
    assert out.shape == imgs.shape and out.dtype == torch.uint8
    for i in range(16):
        halves = []
        for t, sl in enumerate((slice(0, 28), slice(28, 56))):
            dy, dx, fl = (int(v) for v in params[i, 3 * t:3 * t + 3])
            ref = tvf.crop(tvf.pad(imgs[i][..., sl], [2], fill=0), dy, dx, 28, 28)
            halves.append(tvf.hflip(ref) if fl else ref)
        assert torch.equal(out[i], torch.cat(halves, -1))
    assert torch.equal(aug.apply(imgs, aug.identity(16)), imgs)
    # one tile is the old augmentation, bit for bit (same draws, same pixels)
    one = ReplayableCropFlip(padding=2)
    sq = imgs[..., :28].contiguous()
    p1 = one.sample(16, np.random.default_rng(0))
    assert p1.shape == (16, 3) and one.fields == ("dy", "dx", "flip")
    assert "tiles" not in one.schema() and aug.schema()["tiles"] == 2
    assert ReplayableCropFlip.from_schema(aug.schema()) == aug
    with pytest.raises(ValueError, match="not divisible into 2 tiles"):
        aug.apply(imgs[..., :27], aug.sample(16, g))
    assert torch.equal(one.apply(sq, p1), ReplayableCropFlip(padding=2, tiles=1).apply(sq, p1))


def _teacher() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d((2, 4)),
                         nn.Flatten(), nn.Linear(32, 100)).eval()


def test_cache_replays_per_half_views_exactly(fmnist, tmp_path):
    root, _ = fmnist
    ds = _pairs(root, augment=False)
    fit, _ = train_val_split(ds, 0.2, seed=0)
    build_cache(_teacher(), ds, tmp_path / "c", views=3, progress=False, dtype="float32",
                teacher_name="t", dataset_name="fashion_mnist_pairs")
    cache = TeacherLogitCache.open(tmp_path / "c")
    assert cache.augment == ReplayableCropFlip(padding=2, tiles=2)  # the dataset's own recipe
    assert cache.params.shape == (100, 3, 6) and cache.header["image_shape"] == [1, 28, 56]
    w = wrap_dataset(fit, tmp_path / "c", seed=1, teacher_name="t",
                     dataset_name="fashion_mnist_pairs")
    w.set_epoch(2)
    pos = np.arange(len(fit))
    x, y, t = w.batch(pos)
    with torch.no_grad():
        torch.testing.assert_close(t, _teacher()(x), rtol=1e-5, atol=1e-5)
    base = torch.from_numpy(ds.data[np.asarray(fit.indices)]).unsqueeze(1)
    views = w.views_for(pos)
    u8 = cache.augment.apply(base, cache.params[w.rows, views])
    torch.testing.assert_close(x, (u8.float() / 255 - MEAN[0]) / STD[0], rtol=0, atol=1e-6)
    assert torch.equal(y, torch.tensor([ds.targets[i] for i in fit.indices]))
    # the engine's check: the cache replays exactly the augmented dataset's own transform ...
    aug_fit, _ = train_val_split(_pairs(root), 0.2, seed=0)
    wrap_dataset(aug_fit, tmp_path / "c", match_transform=True)
    # ... which a whole-image crop/flip cache is not
    build_cache(_teacher(), ds, tmp_path / "whole", views=1, progress=False,
                augment=ReplayableCropFlip(padding=2))
    with pytest.raises(CacheMismatchError, match="PerTile"):
        wrap_dataset(aug_fit, tmp_path / "whole", match_transform=True)


def test_engine_input_size_is_28x56(fmnist):
    from topkd.config import Config
    from topkd.engine.data import build_datasets

    root, _ = fmnist
    cfg = Config.from_dict({"data": {"name": "fashion_mnist_pairs", "root": str(root),
                                     "val_fraction": 0.2,
                                     "kwargs": {"train_size": 100, "test_size": 50}}})
    d = build_datasets(cfg)
    assert d.num_classes == 100 and d.input_size == (1, 28, 56)
    assert len(d.train) == 80 and len(d.val) == 20 and len(d.test) == 50


def test_timm_policies_and_extra_views_on_28x56(fmnist):
    """RandAugment (translations sized on the shorter side, as timm's create_transform) and
    MLKD's strong view work on the non-square composites; the main view keeps its label."""
    from topkd.config import Config
    from topkd.engine.data import build_datasets

    root, _ = fmnist
    cfg = Config.from_dict({"data": {"name": "fashion_mnist_pairs", "root": str(root),
                                     "kwargs": {"train_size": 100, "test_size": 50},
                                     "auto_augment": "rand-m9-mstd0.5-inc1",
                                     "views": {"strong": {"auto_augment": "mlkd"}}}})
    train = build_datasets(cfg).train
    torch.manual_seed(0)
    x, y = train[3]
    assert x["main"].shape == x["strong"].shape == (1, 28, 56) and y == train.targets[3]
