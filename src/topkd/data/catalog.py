"""Dataset registry: names -> builders + static :class:`DatasetInfo`, and ``get_dataset``."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from ..registry import Registry
from . import cifar, fashion_mnist, fashion_mnist_pairs, imagefolder, stl10, tiny_imagenet
from .transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    STL10_MEAN,
    STL10_STD,
    TINY_IMAGENET_MEAN,
    TINY_IMAGENET_STD,
    CropFlip,
    Transform,
    build_transform,
    imagenet_geometry,
    rotate_flip,
)

SPLITS = ("train", "test")


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset.

    ``num_classes`` is ``None`` only for ``imagefolder`` queried without a ``root`` (it is the
    number of class folders in ``root/train``).
    """

    num_classes: int | None
    image_size: int | tuple[int, int]  # side of square images, else (height, width)
    in_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def hw(self) -> tuple[int, int]:
        """``(height, width)`` of the images."""
        s = self.image_size
        return (int(s), int(s)) if isinstance(s, int) else (int(s[0]), int(s[1]))


Builder = Callable[..., Dataset]
InfoResolver = Callable[[DatasetInfo, "Path | None", dict[str, Any]], DatasetInfo]


@dataclass(frozen=True)
class DatasetEntry:
    """A registered dataset: ``build(root, split, *, augment, normalize, raw, mean, std, **kw)``."""

    name: str
    build: Builder
    info: DatasetInfo
    default_root: str | None = None
    resolve_info: InfoResolver | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Dataset:
        return self.build(*args, **kwargs)


DATASETS: Registry[DatasetEntry] = Registry("dataset")


def register_dataset(
    name: str,
    info: DatasetInfo,
    *,
    default_root: str | None = None,
    resolve_info: InfoResolver | None = None,
) -> Callable[[Builder], Builder]:
    """Decorator registering ``build(root: Path, split, *, augment, normalize, raw, mean, std,
    **kw)`` under ``name``. The builder returns a Dataset of ``(tensor, int)``; build its
    transforms with :func:`make_transforms` to honour ``augment``/``normalize``/``raw``.
    """

    def deco(fn: Builder) -> Builder:
        DATASETS.register(name)(DatasetEntry(name.lower(), fn, info, default_root, resolve_info))
        return fn

    return deco


def list_datasets() -> list[str]:
    """Registered dataset names."""
    return DATASETS.names()


def default_root(name: str) -> Path:
    """Where ``get_dataset(name, root=None)`` looks: the dataset's own default (Fashion-MNIST's
    Debian path) or ``$TOPKD_DATA`` (default ``./data``)."""
    entry = DATASETS.get(name)
    return Path(entry.default_root or os.environ.get("TOPKD_DATA", "data")).expanduser()


def dataset_info(name: str, root: str | Path | None = None, **kw: Any) -> DatasetInfo:
    """Static info of ``name``; options that change it (``resize=`` for stl10, ``image_size=`` for
    imagenet/imagefolder) may be passed, and ``root`` lets ``imagefolder`` count its classes."""
    entry = DATASETS.get(name)
    info = entry.info
    if entry.resolve_info is not None:
        info = entry.resolve_info(info, Path(root).expanduser() if root else None, kw)
    return info


def get_dataset(
    name: str,
    root: str | Path | None = None,
    split: str = "train",
    *,
    augment: bool | None = None,
    normalize: bool = True,
    raw: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kw: Any,
) -> Dataset:
    """Build dataset ``name`` of ``(float32 CxHxW normalised tensor, int label)``.

    Args:
        root: the dataset folder or its parent (``None``: :func:`default_root`).
        split: ``"train"`` or ``"test"``.
        augment: train-time augmentation; default ``split == "train"``.
        normalize: ``False`` gives float tensors in [0, 1].
        raw: ``True`` gives ``uint8`` CxHxW tensors with only the deterministic test-time
            geometry (nothing at all for array-backed datasets); implies no augmentation.
        mean, std: override the dataset's normalisation (e.g. CIFAR-100's for transfer).
        **kw: dataset options (``resize`` for stl10, ``in_memory`` for tiny_imagenet,
            ``image_size``/``resize_size`` for imagenet/imagefolder, ``mmap`` for stl10).

    The result has ``.info`` (:class:`DatasetInfo` as used), ``.targets``, ``.classes``,
    ``.transform``, ``.eval_transform``; array-backed ones (cifar*, stl10, fashion_mnist) also
    ``.data`` (uint8 ``(N,H,W[,C])``).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    entry = DATASETS.get(name)
    if augment is None:
        augment = split == "train" and not raw
    elif augment and raw:
        raise ValueError("raw=True returns unaugmented uint8 images; do not pass augment=True")
    root_path = Path(root).expanduser() if root is not None else default_root(name)
    info = dataset_info(name, root_path, **kw)
    mean_t = tuple(float(m) for m in (mean if mean is not None else info.mean))
    std_t = tuple(float(s) for s in (std if std is not None else info.std))
    if len(mean_t) != info.in_channels or len(std_t) != info.in_channels:
        raise ValueError(f"{name}: mean/std need {info.in_channels} values, got {mean_t}, {std_t}")
    ds = entry.build(
        root_path,
        split,
        augment=augment,
        normalize=normalize,
        raw=raw,
        mean=mean_t,
        std=std_t,
        **kw,
    )
    info = dataclasses.replace(info, mean=mean_t, std=std_t)
    if info.num_classes is None:
        info = dataclasses.replace(info, num_classes=len(ds.classes))
    ds.info = info
    return ds


def make_transforms(
    train_geometry: Sequence[Transform],
    eval_geometry: Sequence[Transform],
    *,
    augment: bool,
    normalize: bool,
    raw: bool,
    mean: Sequence[float],
    std: Sequence[float],
    from_pil: bool = False,
) -> tuple[Transform | None, Transform | None]:
    """``(transform, eval_transform)`` for a builder; see :func:`build_transform`."""
    common = dict(mean=mean, std=std, normalize=normalize, raw=raw, from_pil=from_pil)
    geometry = train_geometry if augment else eval_geometry
    return build_transform(geometry, **common), build_transform(eval_geometry, **common)


# --------------------------------------------------------------------------------------------
# Built-in datasets


def _cifar_builder(fmt: cifar.CifarFormat) -> Builder:
    def build(root: Path, split: str, **opts: Any) -> Dataset:
        aug = CropFlip(padding=4)
        ds = cifar.CIFAR(root, split, fmt, *make_transforms(aug.geometry(32, 32), [], **opts))
        ds.crop_flip = aug
        return ds

    return build


register_dataset("cifar10", DatasetInfo(10, 32, 3, CIFAR10_MEAN, CIFAR10_STD))(
    _cifar_builder(cifar.CIFAR10)
)
register_dataset("cifar100", DatasetInfo(100, 32, 3, CIFAR100_MEAN, CIFAR100_STD))(
    _cifar_builder(cifar.CIFAR100)
)


def _stl10_info(info: DatasetInfo, root: Path | None, kw: dict[str, Any]) -> DatasetInfo:
    resize = kw.get("resize")
    return dataclasses.replace(info, image_size=int(resize)) if resize else info


@register_dataset("stl10", DatasetInfo(10, 96, 3, STL10_MEAN, STL10_STD), resolve_info=_stl10_info)
def _build_stl10(
    root: Path, split: str, *, resize: int | None = None, mmap: bool = True, **opts: Any
) -> Dataset:
    size = resize or stl10.SIDE
    # size // 8 padding: 4 at 32x32 (as CIFAR), 12 at 96x96.
    aug = CropFlip(padding=size // 8)
    transforms = make_transforms(aug.geometry(size, size), [], **opts)
    ds = stl10.STL10(root, split, *transforms, resize=resize, mmap=mmap)
    ds.crop_flip = aug
    return ds


@register_dataset("tiny_imagenet", DatasetInfo(200, 64, 3, TINY_IMAGENET_MEAN, TINY_IMAGENET_STD))
def _build_tiny_imagenet(root: Path, split: str, *, in_memory: bool = False, **opts: Any):
    # mdistiller's Tiny-ImageNet pipeline (its teachers were trained with it): rotation by up
    # to 20 degrees + flip, no crop; its own mean/std.
    transforms = make_transforms(rotate_flip(20), [], **opts)
    return tiny_imagenet.TinyImageNet(root, split, *transforms, in_memory=in_memory)


@register_dataset(
    "fashion_mnist",
    DatasetInfo(10, 28, 1, FASHION_MNIST_MEAN, FASHION_MNIST_STD),
    default_root=fashion_mnist.DEFAULT_ROOT,
)
def _build_fashion_mnist(root: Path, split: str, **opts: Any) -> Dataset:
    # Augmentation is our choice (no single standard): pad-2 random crop + horizontal flip.
    aug = CropFlip(padding=2)
    ds = fashion_mnist.FashionMNIST(root, split, *make_transforms(aug.geometry(28, 28), [], **opts))
    ds.crop_flip = aug
    return ds


@register_dataset(
    "fashion_mnist_pairs",
    DatasetInfo(100, (28, 56), 1, FASHION_MNIST_MEAN, FASHION_MNIST_STD),
    default_root=fashion_mnist.DEFAULT_ROOT,
)
def _build_fashion_mnist_pairs(
    root: Path, split: str, *, train_size: int | None = None, test_size: int | None = None,
    pair_seed: int = 0, **opts: Any,
) -> Dataset:
    # Derived, not a benchmark (topkd.data.fashion_mnist_pairs). Each half is augmented as a
    # Fashion-MNIST image: its own pad-2 crop and flip (a whole-image flip swaps the labels).
    aug = CropFlip(padding=2, tiles=2)
    size = train_size if split == "train" else test_size
    ds = fashion_mnist_pairs.FashionMNISTPairs(
        root, split, size, pair_seed, *make_transforms(aug.geometry(28, 56), [], **opts))
    ds.crop_flip = aug
    return ds


def _folder_info(info: DatasetInfo, root: Path | None, kw: dict[str, Any]) -> DatasetInfo:
    info = dataclasses.replace(info, image_size=int(kw.get("image_size", info.image_size)))
    if info.num_classes is None and root is not None and (root / "train").is_dir():
        with contextlib.suppress(FileNotFoundError):  # get_dataset raises the proper error
            n = len(imagefolder.class_dirs(root / "train"))
            info = dataclasses.replace(info, num_classes=n)
    return info


def _folder_builder(title: str, get_it: str) -> Builder:
    def build(
        root: Path, split: str, *, image_size: int = 224, resize_size: int | None = None, **opts
    ) -> Dataset:
        transforms = make_transforms(
            imagenet_geometry(True, image_size),
            imagenet_geometry(False, image_size, resize_size),
            from_pil=True,
            **opts,
        )
        return imagefolder.ImageFolderDataset(root, split, *transforms, title=title, get_it=get_it)

    return build


register_dataset(
    "imagenet", DatasetInfo(1000, 224, 3, IMAGENET_MEAN, IMAGENET_STD), resolve_info=_folder_info
)(_folder_builder("ImageNet", f"download from {imagefolder.IMAGENET_URL}"))
register_dataset(
    "imagefolder", DatasetInfo(None, 224, 3, IMAGENET_MEAN, IMAGENET_STD), resolve_info=_folder_info
)(
    _folder_builder(
        "ImageFolder", "arrange your images as root/train/<class>/*.jpg and root/val/<class>/*.jpg"
    )
)
