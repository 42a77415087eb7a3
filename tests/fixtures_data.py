"""Writers of tiny datasets in each official on-disk format (used by tests/test_data*.py).

Each writer returns the raw pixels/labels it wrote so tests can compare what the readers return
against ground truth that does not go through the reader code.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR_STD_KEYS = {
    "cifar100": ("cifar-100-python", ("train",), ("test",), "meta", "fine_labels", 100),
    "cifar10": (
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "batches.meta",
        "labels",
        10,
    ),
}


def rand_images(rng: np.random.Generator, n: int, h: int, w: int, c: int | None = 3) -> np.ndarray:
    shape = (n, h, w) if c is None else (n, h, w, c)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def _dump(path: Path, obj: dict, bytes_keys: bool) -> None:
    if bytes_keys:  # the official files have bytes keys (pickled by Python 2)
        obj = {k.encode(): v for k, v in obj.items()}
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar(
    root: Path, variant: str, n_per_file: int = 4, seed: int = 0, bytes_keys: bool = True
) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Write ``root/<folder>/...``; returns ``{split: (data NHWC, labels)}``."""
    folder, train_files, test_files, meta, label_key, k = CIFAR_STD_KEYS[variant]
    d = root / folder
    d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    out = {}
    for split, files in (("train", train_files), ("test", test_files)):
        xs, ys = [], []
        for name in files:
            x = rand_images(rng, n_per_file, 32, 32)
            y = [int(v) for v in rng.integers(0, k, n_per_file)]
            # Official row layout: R plane (1024 bytes, row-major), then G, then B.
            rows = np.concatenate([x[..., c].reshape(n_per_file, -1) for c in range(3)], axis=1)
            batch = {"batch_label": name, "data": rows, label_key: y, "filenames": ["a"] * len(y)}
            if variant == "cifar100":
                batch["coarse_labels"] = [v // 5 for v in y]
            _dump(d / name, batch, bytes_keys)
            xs.append(x)
            ys += y
        out[split] = (np.concatenate(xs), ys)
    names_key = "fine_label_names" if variant == "cifar100" else "label_names"
    names = [f"class_{i:03d}".encode() for i in range(k)]
    _dump(d / meta, {names_key: names, "coarse_label_names": [b"c"] * 20}, bytes_keys)
    return out


def stl_bytes(images: np.ndarray) -> bytes:
    """STL-10 ``*_X.bin`` bytes from upright NHWC images: per image, per channel, column-major.

    Written with ``order="F"`` on each HxW plane -- an independent statement of the format, not
    the inverse of the reader's reshape/transpose.
    """
    return b"".join(im[..., c].ravel(order="F").tobytes() for im in images for c in range(3))


def write_stl10(root: Path, n_train: int = 5, n_test: int = 3, seed: int = 0) -> dict:
    d = root / "stl10_binary"
    d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rand_images(rng, n, 96, 96)
        y = rng.integers(0, 10, n)
        (d / f"{split}_X.bin").write_bytes(stl_bytes(x))
        (d / f"{split}_y.bin").write_bytes((y + 1).astype(np.uint8).tobytes())  # 1-based
        out[split] = (x, y.tolist())
    names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (d / "class_names.txt").write_text("\n".join(names) + "\n")
    return out


def asymmetric_image(h: int = 96, w: int = 96) -> np.ndarray:
    """An image whose orientation is unambiguous: red top-left block, G grows with x, B with y."""
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 4, : w // 8, 0] = 255
    img[..., 1] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    img[..., 2] = np.linspace(0, 120, h, dtype=np.uint8)[:, None]
    return img


TINY_WNIDS = ["n09999999", "n01443537", "n05000000"]  # deliberately not sorted in wnids.txt


def write_tiny_imagenet(root: Path, per_class: int = 2, n_val: int = 4, seed: int = 0) -> dict:
    """Tiny-ImageNet tree (PNG pixels exact, one JPEG and one greyscale image for realism)."""
    d = root / "tiny-imagenet-200"
    rng = np.random.default_rng(seed)
    (d / "val" / "images").mkdir(parents=True)
    (d / "wnids.txt").write_text("\n".join(TINY_WNIDS) + "\n")
    (d / "words.txt").write_text(
        "n01443537\tgoldfish, Carassius auratus\nn09999999\tzzz thing\nn05000000\tmiddle\n"
    )
    train = {}
    for w in TINY_WNIDS:
        img_dir = d / "train" / w / "images"
        img_dir.mkdir(parents=True)
        (d / "train" / w / f"{w}_boxes.txt").write_text("")  # official extra file, not an image
        for i in range(per_class):
            x = rand_images(rng, 1, 64, 64)[0]
            Image.fromarray(x).save(img_dir / f"{w}_{i}.png")
            train[f"{w}_{i}.png"] = x
    Image.fromarray(rand_images(rng, 1, 64, 64)[0]).save(
        d / "train" / TINY_WNIDS[0] / "images" / "z.JPEG"
    )
    Image.fromarray(rand_images(rng, 1, 64, 64, None)[0], "L").save(
        d / "train" / TINY_WNIDS[1] / "images" / "zz_grey.JPEG"
    )
    lines, val = [], []
    for i in range(n_val):
        x = rand_images(rng, 1, 64, 64)[0]
        w = TINY_WNIDS[i % len(TINY_WNIDS)]
        Image.fromarray(x).save(d / "val" / "images" / f"val_{i}.png")
        lines.append(f"val_{i}.png\t{w}\t0\t0\t63\t63")
        val.append((x, w))
    (d / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return {"train": train, "val": val, "root": d}


def write_imagefolder(root: Path, classes=("cat", "dog"), per_class: int = 2, size=(40, 48)):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                x = rand_images(rng, 1, size[0], size[1])[0]
                Image.fromarray(x).save(root / split / c / f"{i}.png")
    return root


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", s) for s in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fashion_mnist(
    root: Path, n_train: int = 20, n_test: int = 10, gz: bool = True, seed: int = 0
) -> dict:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        x = rand_images(rng, n, 28, 28, None)
        y = np.arange(n) % 10
        for stem, arr, magic in (
            (f"{prefix}-images-idx3-ubyte", x, 2051),
            (f"{prefix}-labels-idx1-ubyte", y, 2049),
        ):
            data = idx_bytes(arr, magic)
            if gz:
                (root / f"{stem}.gz").write_bytes(gzip.compress(data))
            else:
                (root / stem).write_bytes(data)
        out[split] = (x, y.tolist())
    return out
