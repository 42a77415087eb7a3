"""get_dataset/dataset_info/registry, transforms (exactness, augmentation) and train_val_split."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from fixtures_data import write_cifar, write_fashion_mnist, write_stl10
from topkd.data import (
    DATASETS,
    DatasetInfo,
    dataset_info,
    get_dataset,
    list_datasets,
    make_transforms,
    register_dataset,
    train_val_split,
)

C100_MEAN, C100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)


@pytest.fixture
def cifar_root(tmp_path):
    write_cifar(tmp_path, "cifar100", n_per_file=40)
    return tmp_path


def test_registry_and_info():
    names = {"cifar10", "cifar100", "tiny_imagenet", "stl10", "imagenet", "imagefolder"}
    assert names | {"fashion_mnist"} <= set(list_datasets())
    assert dataset_info("cifar100") == DatasetInfo(100, 32, 3, C100_MEAN, C100_STD)
    assert dataset_info("cifar10").mean == (0.4914, 0.4822, 0.4465)
    assert dataset_info("tiny_imagenet") == DatasetInfo(  # mdistiller's (test_data_formats.py)
        200, 64, 3, (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)
    )
    assert (
        dataset_info("stl10").image_size == 96 and dataset_info("stl10", resize=32).image_size == 32
    )
    assert dataset_info("imagenet", image_size=160).image_size == 160
    assert dataset_info("imagefolder").num_classes is None
    fm = dataset_info("fashion_mnist")
    assert (fm.num_classes, fm.image_size, fm.in_channels, fm.mean, fm.std) == (
        10, 28, 1, (0.2860,), (0.3530,)
    )  # fmt: skip
    with pytest.raises(ValueError, match="unknown dataset 'cifar1000'"):
        get_dataset("cifar1000", ".", "train")


def test_bad_split_and_options(cifar_root):
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'test'\), got 'val'"):
        get_dataset("cifar100", cifar_root, "val")
    with pytest.raises(ValueError, match="raw=True"):
        get_dataset("cifar100", cifar_root, "train", raw=True, augment=True)
    with pytest.raises(ValueError, match="mean/std need 3 values"):
        get_dataset("cifar100", cifar_root, "train", mean=(0.5,), std=(0.5,))


def test_test_transform_is_exact_normalisation(cifar_root):
    ds = get_dataset("cifar100", cifar_root, "test")
    assert ds.info.mean == C100_MEAN and ds.info.std == C100_STD
    pil_ref = T.Compose([T.ToTensor(), T.Normalize(C100_MEAN, C100_STD)])
    for i in (0, 7, 39):
        x, y = ds[i]
        assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and isinstance(y, int)
        raw = torch.from_numpy(ds.data[i]).permute(2, 0, 1).float() / 255
        by_hand = (raw - torch.tensor(C100_MEAN)[:, None, None]) / torch.tensor(C100_STD)[
            :, None, None
        ]
        torch.testing.assert_close(x, by_hand, rtol=0, atol=1e-6)
        assert torch.equal(x, pil_ref(Image.fromarray(ds.data[i])))  # bit-identical to PIL path
    plain = get_dataset("cifar100", cifar_root, "test", normalize=False)[0][0]
    assert torch.equal(plain, torch.from_numpy(ds.data[0]).permute(2, 0, 1).float() / 255)
    custom = get_dataset("cifar100", cifar_root, "test", mean=(0, 0, 0), std=(1, 1, 1))
    assert torch.equal(custom[0][0], plain) and custom.info.mean == (0.0, 0.0, 0.0)


@pytest.mark.parametrize(
    "name, writer, size, pad",
    [("cifar100", write_cifar, 32, 4), ("fashion_mnist", write_fashion_mnist, 28, 2)],
)
def test_train_augmentation_equals_standard_pil_pipeline(tmp_path, name, writer, size, pad):
    if name == "cifar100":
        writer(tmp_path, name, n_per_file=40)
    else:
        writer(tmp_path)
    ds = get_dataset(name, tmp_path, "train")
    info = ds.info
    ref = T.Compose(
        [T.RandomCrop(size, padding=pad), T.RandomHorizontalFlip(), T.ToTensor(),
         T.Normalize(info.mean, info.std)]
    )  # fmt: skip
    deterministic = get_dataset(name, tmp_path, "train", augment=False)
    n_diff = 0
    for i in range(20):
        torch.manual_seed(i)
        ours = ds[i][0]
        torch.manual_seed(i)
        theirs = ref(Image.fromarray(ds.data[i]))
        assert torch.equal(ours, theirs)
        assert ours.shape == deterministic[i][0].shape
        n_diff += not torch.equal(ours, deterministic[i][0])
    assert n_diff >= 15  # augmentation is actually on (identity crop+no flip is rare)


def test_train_val_split(cifar_root):
    ds = get_dataset("cifar100", cifar_root, "train")
    tr, va = train_val_split(ds, 0.25, seed=3)
    tr2, va2 = train_val_split(ds, 0.25, seed=3)
    assert tr.indices == tr2.indices and va.indices == va2.indices
    assert train_val_split(ds, 0.25, seed=4)[1].indices != va.indices
    assert not set(tr.indices) & set(va.indices)
    assert sorted(tr.indices + va.indices) == list(range(len(ds))) and len(va) == 10
    # Stratified: class shares of the validation part follow the full set's (largest remainder).
    counts = np.bincount(ds.targets, minlength=100)
    val_counts = np.bincount([ds.targets[i] for i in va.indices], minlength=100)
    assert np.all(np.abs(val_counts - counts * 0.25) < 1)
    # Validation uses the test-time transform: deterministic and equal to ToTensor+Normalize.
    test_tf = get_dataset("cifar100", cifar_root, "train", augment=False)
    for j, i in enumerate(va.indices[:5]):
        assert torch.equal(va[j][0], va[j][0]) and torch.equal(va[j][0], test_tf[i][0])
        assert va[j][1] == ds.targets[i]
    assert tr.dataset is ds and ds.transform is not ds.eval_transform  # train keeps augmenting
    with pytest.raises(ValueError, match="val_fraction"):
        train_val_split(ds, 1.0, 0)


def test_train_val_split_generic_dataset_warns():
    class Plain(Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return torch.zeros(1), i

    with pytest.warns(UserWarning, match="eval_dataset="):
        tr, va = train_val_split(Plain(), 0.3, seed=0)
    assert len(va) == 3 and len(tr) == 7


def test_register_custom_dataset(tmp_path):
    class Squares(Dataset):
        def __init__(self, n, transform, eval_transform):
            self.data = np.arange(n, dtype=np.uint8).repeat(64).reshape(n, 8, 8)
            self.targets = [i % 2 for i in range(n)]
            self.classes = ["even", "odd"]
            self.transform, self.eval_transform = transform, eval_transform

        def __len__(self):
            return len(self.targets)

        def __getitem__(self, i):
            return self.transform(torch.from_numpy(self.data[i])[None]), self.targets[i]

    @register_dataset("squares_test", DatasetInfo(2, 8, 1, (0.0,), (1.0,)))
    def build(root, split, **opts):
        return Squares(6 if split == "train" else 2, *make_transforms([], [], **opts))

    try:
        assert "squares_test" in list_datasets()
        ds = get_dataset("squares_test", tmp_path, "train")
        x, y = ds[3]
        assert x.dtype == torch.float32 and float(x[0, 0, 0]) == pytest.approx(3 / 255) and y == 1
        assert len(get_dataset("squares_test", tmp_path, "test")) == 2
    finally:
        DATASETS._items.pop("squares_test")


def test_dataloader_batches(tmp_path):
    write_stl10(tmp_path, n_train=6)
    ds = get_dataset("stl10", tmp_path, "train", resize=32)
    x, y = next(iter(DataLoader(ds, batch_size=4, num_workers=1, shuffle=True)))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    raw = get_dataset("stl10", tmp_path, "test", raw=True)
    xb, _ = next(iter(DataLoader(raw, batch_size=3)))
    assert xb.dtype == torch.uint8 and torch.equal(xb[0], raw.raw_tensor(0))
