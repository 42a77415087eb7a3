"""Readers of the official on-disk formats, exercised on tiny files built in tmp_path."""

from __future__ import annotations

import gzip
import pickle

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from fixtures_data import (
    TINY_WNIDS,
    asymmetric_image,
    idx_bytes,
    stl_bytes,
    write_cifar,
    write_fashion_mnist,
    write_imagefolder,
    write_stl10,
    write_tiny_imagenet,
)
from topkd.data import DatasetNotFoundError, get_dataset, read_idx

# ---------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("variant", ["cifar100", "cifar10"])
@pytest.mark.parametrize("bytes_keys", [True, False])
def test_cifar_reads_pickles(tmp_path, variant, bytes_keys):
    truth = write_cifar(tmp_path, variant, bytes_keys=bytes_keys)
    k = 100 if variant == "cifar100" else 10
    folder = tmp_path / ("cifar-100-python" if variant == "cifar100" else "cifar-10-batches-py")
    for split in ("train", "test"):
        x, y = truth[split]
        for root in (tmp_path, folder):  # parent or the folder itself
            ds = get_dataset(variant, root, split, raw=True)
            assert ds.data.shape == x.shape and ds.data.dtype == np.uint8
            np.testing.assert_array_equal(ds.data, x)  # upright NHWC RGB
            assert ds.targets == y and all(type(t) is int for t in ds.targets)
            assert len(ds.classes) == k and ds.classes[3] == "class_003"
            img, label = ds[1]
            assert img.dtype == torch.uint8 and img.shape == (3, 32, 32)
            assert torch.equal(img, torch.from_numpy(x[1]).permute(2, 0, 1)) and label == y[1]
    assert len(get_dataset(variant, tmp_path, "train")) == (20 if variant == "cifar10" else 4)


def test_cifar_corrupt_files(tmp_path):
    write_cifar(tmp_path, "cifar100")
    train = tmp_path / "cifar-100-python" / "train"
    d = pickle.loads(train.read_bytes(), encoding="bytes")
    d[b"fine_labels"] = [0, 1, 2, 100]
    train.write_bytes(pickle.dumps(d))
    with pytest.raises(ValueError, match=r"cifar-100-python/train: labels must lie in \[0, 99\]"):
        get_dataset("cifar100", tmp_path, "train")
    d[b"fine_labels"] = [0, 1, 2, 3]
    d[b"data"] = d[b"data"][:, :3000]
    train.write_bytes(pickle.dumps(d))
    with pytest.raises(ValueError, match=r"train: 'data' must be uint8 \(N, 3072\)"):
        get_dataset("cifar100", tmp_path, "train")
    train.write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="train: not a readable CIFAR pickle"):
        get_dataset("cifar100", tmp_path, "train")


# ---------------------------------------------------------------- STL-10


def test_stl10_column_major_reads_upright(tmp_path):
    truth = write_stl10(tmp_path)
    img = asymmetric_image()
    x_path = tmp_path / "stl10_binary" / "train_X.bin"
    x_path.write_bytes(stl_bytes(np.stack([img] * 5)))
    # Spell out the format once more byte by byte: the 2nd byte is R at (row 1, column 0).
    raw = np.fromfile(x_path, np.uint8)
    assert raw[1] == img[1, 0, 0] and raw[96] == img[0, 1, 0] and raw[96 * 96] == img[0, 0, 1]
    for mmap in (True, False):
        ds = get_dataset("stl10", tmp_path, "train", raw=True, mmap=mmap)
        assert ds.data.shape == (5, 96, 96, 3)
        np.testing.assert_array_equal(ds.data[0], img)
        got = ds[0][0].permute(1, 2, 0).numpy()
        assert got[0, 0, 0] == 255 and got[-1, -1, 0] == 0  # red block top-left
        assert got[0, -1, 1] == 255 and got[-1, 0, 2] == 120  # G along x, B along y
    test = get_dataset("stl10", tmp_path.joinpath("stl10_binary"), "test", raw=True)
    np.testing.assert_array_equal(test.data, truth["test"][0])
    assert test.targets == truth["test"][1] and min(test.targets) >= 0
    assert test.classes[0] == "airplane" and len(test.classes) == 10


def test_stl10_resize32_matches_pil_resize(tmp_path):
    truth = write_stl10(tmp_path)
    ds = get_dataset("stl10", tmp_path, "test", resize=32, augment=False)
    assert ds.info.image_size == 32 and ds.data.shape == (3, 32, 32, 3)
    mean, std = ds.info.mean, ds.info.std
    ref = T.Compose([T.Resize(32), T.ToTensor(), T.Normalize(mean, std)])
    for i in range(3):
        expected = ref(Image.fromarray(truth["test"][0][i]))
        assert torch.equal(ds[i][0], expected)
    aug = get_dataset("stl10", tmp_path, "train", resize=32)
    assert aug[0][0].shape == (3, 32, 32)


def test_stl10_corrupt(tmp_path):
    write_stl10(tmp_path)
    d = tmp_path / "stl10_binary"
    (d / "train_y.bin").write_bytes(bytes([1, 2, 0, 4, 5]))
    with pytest.raises(ValueError, match=r"train_y.bin: STL-10 labels must lie in 1..10"):
        get_dataset("stl10", tmp_path, "train")
    (d / "train_y.bin").write_bytes(bytes([1, 2, 3, 4]))
    with pytest.raises(ValueError, match="5 images in train_X.bin, 4 labels"):
        get_dataset("stl10", tmp_path, "train")
    (d / "test_X.bin").write_bytes(b"\0" * 1000)
    with pytest.raises(ValueError, match="test_X.bin: size 1000 is not a multiple"):
        get_dataset("stl10", tmp_path, "test")


# ---------------------------------------------------------------- Tiny-ImageNet


def test_tiny_imagenet_tree(tmp_path):
    truth = write_tiny_imagenet(tmp_path)
    wnids = sorted(TINY_WNIDS)  # ImageFolder(train/) order, not wnids.txt order
    train = get_dataset("tiny_imagenet", tmp_path, "train", raw=True)
    assert train.classes == wnids and train.class_names[0] == "goldfish"
    assert len(train) == 3 * 2 + 2 and len(set(train.targets)) == 3
    for (path, label), i in zip(train.samples, range(len(train))):
        name = path.rsplit("/", 1)[1]
        assert wnids[label] == name.split("_")[0] or name.startswith("z")
        img, y = train[i]
        assert img.dtype == torch.uint8 and img.shape == (3, 64, 64) and y == label
        if name in truth["train"]:  # PNG: pixel exact
            assert torch.equal(img, torch.from_numpy(truth["train"][name]).permute(2, 0, 1))
    test = get_dataset("tiny_imagenet", truth["root"], "test", raw=True)
    assert test.classes == wnids and len(test) == 4
    for i, (x, w) in enumerate(truth["val"]):
        img, y = test[i]
        assert y == wnids.index(w)
        assert torch.equal(img, torch.from_numpy(x).permute(2, 0, 1))
    assert not hasattr(train, "data")  # lazy: not array-backed
    mem = get_dataset("tiny_imagenet", tmp_path, "train", raw=True, in_memory=True)
    assert mem.data.shape == (8, 64, 64, 3)
    assert all(torch.equal(mem[i][0], train[i][0]) for i in range(len(train)))
    norm = get_dataset("tiny_imagenet", tmp_path, "train")
    assert norm[0][0].dtype == torch.float32 and norm[0][0].shape == (3, 64, 64)


# mdistiller's Tiny-ImageNet pipeline, copied from megvii-research/mdistiller,
# mdistiller/dataset/tiny_imagenet.py (commit a08d46f10d6102bd6e3f258ca5ac880b020ea259),
# get_tinyimagenet_dataloader: the pair configs load teachers trained with it.
MDISTILLER_TINY_IMAGENET = {
    "mean": (0.4802, 0.4481, 0.3975),
    "std": (0.2302, 0.2265, 0.2262),
    "rotation_degrees": 20,  # transforms.RandomRotation(20)
    "hflip_p": 0.5,  # transforms.RandomHorizontalFlip(0.5)
}


def _mdistiller_tiny_train_transform() -> T.Compose:
    f = MDISTILLER_TINY_IMAGENET
    return T.Compose([T.RandomRotation(f["rotation_degrees"]),
                      T.RandomHorizontalFlip(f["hflip_p"]),
                      T.ToTensor(), T.Normalize(f["mean"], f["std"])])


def test_tiny_imagenet_pipeline_equals_mdistiller(tmp_path):
    """Train and test tensors are bit-identical to mdistiller's PIL pipeline on the same files
    with the same RNG state (rotation + flip, its mean/std), not ImageNet's crop pipeline."""
    from torchvision.datasets.folder import default_loader

    from topkd.data import dataset_info

    write_tiny_imagenet(tmp_path)
    f = MDISTILLER_TINY_IMAGENET
    info = dataset_info("tiny_imagenet")
    assert (info.mean, info.std) == (f["mean"], f["std"])
    train = get_dataset("tiny_imagenet", tmp_path, "train")
    ref = _mdistiller_tiny_train_transform()
    for i, (path, _) in enumerate(train.samples):
        torch.manual_seed(100 + i)
        ours = train[i][0]
        torch.manual_seed(100 + i)
        assert torch.equal(ours, ref(default_loader(path))), path
    test = get_dataset("tiny_imagenet", tmp_path, "test")
    ref_test = T.Compose([T.ToTensor(), T.Normalize(f["mean"], f["std"])])
    for i, (path, _) in enumerate(test.samples):
        assert torch.equal(test[i][0], ref_test(default_loader(path))), path


def test_tiny_imagenet_errors(tmp_path):
    truth = write_tiny_imagenet(tmp_path)
    ann = truth["root"] / "val" / "val_annotations.txt"
    ann.write_text("val_0.png\tn00000000\t0\t0\t1\t1\n")
    with pytest.raises(ValueError, match=r"val_annotations.txt:1: .*known wnid"):
        get_dataset("tiny_imagenet", tmp_path, "test")
    ann.unlink()
    with pytest.raises(DatasetNotFoundError, match="val/val_annotations.txt") as e:
        get_dataset("tiny_imagenet", tmp_path, "test")
    assert "tiny-imagenet-200.zip" in str(e.value)


# ---------------------------------------------------------------- ImageFolder / ImageNet


def test_imagefolder(tmp_path):
    write_imagefolder(tmp_path, classes=("dog", "cat", "emu"))
    for split in ("train", "test"):
        ds = get_dataset("imagefolder", tmp_path, split, image_size=32)
        assert ds.classes == ["cat", "dog", "emu"] and len(ds) == 6
        assert ds.info.num_classes == 3 and ds.info.image_size == 32
        img, y = ds[5]
        assert img.shape == (3, 32, 32) and img.dtype == torch.float32 and y == 2
    # val/ missing a class keeps train's indices; val/ with an unknown class is an error.
    for f in (tmp_path / "val" / "cat").iterdir():
        f.unlink()
    (tmp_path / "val" / "cat").rmdir()
    test = get_dataset("imagenet", tmp_path, "test", image_size=32)
    assert sorted(set(test.targets)) == [1, 2] and test.info.num_classes == 1000
    (tmp_path / "val" / "zebra").mkdir()
    with pytest.raises(ValueError, match=r"val: class folders not present in train/: \['zebra'\]"):
        get_dataset("imagefolder", tmp_path, "test")
    raw = get_dataset("imagefolder", tmp_path, "train", raw=True, image_size=32)
    assert raw[0][0].dtype == torch.uint8 and raw[0][0].shape == (3, 32, 32)
    (tmp_path / "val" / "zebra").rmdir()
    (tmp_path / "train").rename(tmp_path / "train_gone")  # evaluation-only: val/ alone
    only_val = get_dataset("imagefolder", tmp_path, "test", image_size=32)
    assert only_val.classes == ["dog", "emu"] and only_val.info.num_classes == 2
    with pytest.raises(DatasetNotFoundError, match="cannot find folder 'train/'"):
        get_dataset("imagefolder", tmp_path, "train")


# ---------------------------------------------------------------- Fashion-MNIST / IDX


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx(tmp_path, gz):
    truth = write_fashion_mnist(tmp_path / "fashion-mnist", gz=gz)
    for split in ("train", "test"):
        ds = get_dataset("fashion_mnist", tmp_path / "fashion-mnist", split, raw=True)
        x, y = truth[split]
        assert ds.data.shape == x.shape and ds.data.dtype == np.uint8
        np.testing.assert_array_equal(ds.data, x)
        assert ds.targets == y and ds.classes[9] == "Ankle boot"
        img, label = ds[3]
        assert img.shape == (1, 28, 28) and torch.equal(img[0], torch.from_numpy(x[3]))
    assert len(get_dataset("fashion_mnist", tmp_path, "train")) == 20  # parent folder works too


def test_idx_errors(tmp_path):
    p = tmp_path / "x.gz"
    p.write_bytes(gzip.compress(idx_bytes(np.zeros((2, 28, 28)), 2049)))
    with pytest.raises(ValueError, match="x.gz: bad IDX magic number 2049, expected 2051"):
        read_idx(p, 2051)
    p.write_bytes(gzip.compress(idx_bytes(np.zeros((2, 28, 28)), 2051)[:-5]))
    with pytest.raises(ValueError, match=r"x.gz: header says \(2, 28, 28\)"):
        read_idx(p)
    p.write_bytes(b"\x1f\x8bgarbage")
    with pytest.raises(ValueError, match="x.gz: corrupt gzip"):
        read_idx(p)
    p.write_bytes(idx_bytes(np.arange(6).reshape(2, 3), 0x0802))
    np.testing.assert_array_equal(read_idx(p), np.arange(6).reshape(2, 3))
    root = tmp_path / "fm"
    write_fashion_mnist(root)
    (root / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(np.full(20, 10), 2049))
    )
    with pytest.raises(
        ValueError, match=r"train-labels-idx1-ubyte.gz: labels must lie in \[0, 9\]"
    ):
        get_dataset("fashion_mnist", root, "train")


# ---------------------------------------------------------------- missing data


@pytest.mark.parametrize(
    "name, needle, url",
    [
        ("cifar100", "'train'", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
        ("cifar10", "'data_batch_1'", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
        ("stl10", "'train_X.bin'", "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz"),
        ("tiny_imagenet", "'train'", "http://cs231n.stanford.edu/tiny-imagenet-200.zip"),
        ("imagenet", "folder 'train/'", "https://image-net.org/download.php"),
        ("imagefolder", "folder 'train/'", "root/train/<class>/"),
        ("fashion_mnist", "'train-images-idx3-ubyte.gz'", "apt-get install dataset-fashion-mnist"),
    ],
)
def test_missing_dataset_message(tmp_path, name, needle, url):
    with pytest.raises(DatasetNotFoundError) as e:
        get_dataset(name, tmp_path / "nowhere", "train")
    msg = str(e.value)
    assert isinstance(e.value, FileNotFoundError)
    assert f"cannot find {needle}" in msg and url in msg
    assert str(tmp_path / "nowhere") in msg and "never downloads" in msg
