"""Datasets read from their official on-disk formats (never downloaded).

>>> from topkd.data import get_dataset, dataset_info, train_val_split
>>> train = get_dataset("cifar100", "~/data", "train")      # doctest: +SKIP
>>> fit, val = train_val_split(train, 0.1, seed=0)          # doctest: +SKIP

See ``docs/data.md`` for the expected folder layouts.
"""

from .base import ArrayImageDataset, ImageDataset
from .catalog import (
    DATASETS,
    SPLITS,
    DatasetEntry,
    DatasetInfo,
    dataset_info,
    default_root,
    get_dataset,
    list_datasets,
    make_transforms,
    register_dataset,
)
from .cifar import CIFAR, read_cifar
from .errors import DatasetNotFoundError
from .fashion_mnist import FashionMNIST
from .idx import read_idx
from .imagefolder import ImageFolderDataset
from .split import train_val_split
from .stl10 import STL10
from .tiny_imagenet import TinyImageNet
from .transforms import build_transform, crop_flip, imagenet_geometry

__all__ = [
    "CIFAR",
    "DATASETS",
    "SPLITS",
    "STL10",
    "ArrayImageDataset",
    "DatasetEntry",
    "DatasetInfo",
    "DatasetNotFoundError",
    "FashionMNIST",
    "ImageDataset",
    "ImageFolderDataset",
    "TinyImageNet",
    "build_transform",
    "crop_flip",
    "dataset_info",
    "default_root",
    "get_dataset",
    "imagenet_geometry",
    "list_datasets",
    "make_transforms",
    "read_cifar",
    "read_idx",
    "register_dataset",
    "train_val_split",
]
