"""CIFAR-10 / CIFAR-100 from the official "python version" pickles.

Parsed here rather than through ``torchvision.datasets.CIFAR*``, which insists on the md5 sums
of the full archives (so it cannot read the tiny files the tests build).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._paths import find_dir
from .base import ArrayImageDataset
from .errors import check_labels
from .transforms import Transform


@dataclass(frozen=True)
class CifarFormat:
    """File names and pickle keys of one CIFAR variant."""

    title: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    num_classes: int
    url: str


CIFAR10 = CifarFormat(
    title="CIFAR-10",
    folder="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_files=("test_batch",),
    meta_file="batches.meta",
    label_key="labels",
    names_key="label_names",
    num_classes=10,
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
)
CIFAR100 = CifarFormat(
    title="CIFAR-100",
    folder="cifar-100-python",
    train_files=("train",),
    test_files=("test",),
    meta_file="meta",
    label_key="fine_labels",
    names_key="fine_label_names",
    num_classes=100,
    url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
)


def _unpickle(path: Path) -> dict[str, Any]:
    """Load one batch file; keys normalised to ``str`` (the files use ``bytes`` keys)."""
    try:
        with open(path, "rb") as f:
            # encoding='bytes' is what the official files need under Python 3.
            obj = pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: not a readable CIFAR pickle ({e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict, got {type(obj).__name__}")
    return {k.decode() if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _text(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def read_cifar(fmt: CifarFormat, root: Path, split: str) -> tuple[np.ndarray, list[int], list[str]]:
    """Read ``split`` of a CIFAR variant -> ``(data (N,32,32,3) uint8, labels, class_names)``.

    ``root`` may be the ``cifar-*-python``/``cifar-10-batches-py`` folder or its parent.
    """
    files = fmt.train_files if split == "train" else fmt.test_files
    folder = find_dir(
        root,
        [fmt.folder],
        [*files, fmt.meta_file],
        dataset=fmt.title,
        get_it=f"download {fmt.url} and extract it (tar xzf) into {root}",
        layout=f"  {root}/{fmt.folder}/{{{','.join((*files, fmt.meta_file))}}}",
    )
    chunks, labels = [], []
    for name in files:
        path = folder / name
        d = _unpickle(path)
        if "data" not in d or fmt.label_key not in d:
            raise ValueError(f"{path}: missing key 'data' or {fmt.label_key!r} (keys: {list(d)})")
        x = np.asarray(d["data"])
        y = [int(v) for v in d[fmt.label_key]]
        if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
            raise ValueError(f"{path}: 'data' must be uint8 (N, 3072), got {x.dtype} {x.shape}")
        if len(y) != len(x):
            raise ValueError(f"{path}: {len(x)} images but {len(y)} labels")
        check_labels(y, fmt.num_classes, path)
        chunks.append(x)
        labels.extend(y)
    # Rows are three 1024-byte planes (R, G, B), each 32x32 row-major -> NHWC like torchvision.
    data = np.ascontiguousarray(np.concatenate(chunks).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    meta_path = folder / fmt.meta_file
    meta = _unpickle(meta_path)
    if fmt.names_key not in meta:
        raise ValueError(f"{meta_path}: missing key {fmt.names_key!r} (keys: {list(meta)})")
    classes = [_text(n) for n in meta[fmt.names_key]]
    if len(classes) != fmt.num_classes:
        raise ValueError(f"{meta_path}: {len(classes)} class names, expected {fmt.num_classes}")
    return data, labels, classes


class CIFAR(ArrayImageDataset):
    """CIFAR-10/100 split as an :class:`ArrayImageDataset` (``data`` is ``(N, 32, 32, 3)``)."""

    def __init__(
        self,
        root: str | Path,
        split: str,
        fmt: CifarFormat,
        transform: Transform | None = None,
        eval_transform: Transform | None = None,
    ) -> None:
        data, labels, classes = read_cifar(fmt, Path(root), split)
        super().__init__(data, labels, classes, transform, eval_transform)
        self.split = split
