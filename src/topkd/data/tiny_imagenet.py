"""Tiny-ImageNet-200 from the official zip's folder tree.

::

    tiny-imagenet-200/wnids.txt                      200 WordNet ids
    tiny-imagenet-200/words.txt                      (optional) wnid<TAB>names
    tiny-imagenet-200/train/<wnid>/images/*.JPEG     500 per class
    tiny-imagenet-200/val/images/*.JPEG              10000
    tiny-imagenet-200/val/val_annotations.txt        file<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1

Class index = position of the wnid in **sorted** order, which is what ``ImageFolder(train/)``
gives (the order inside ``wnids.txt`` is not sorted); train and the test split (= official val)
share that mapping. The official test set has no labels and is not used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader
from torchvision.transforms.functional import pil_to_tensor

from ._paths import find_dir
from .base import ImageDataset
from .transforms import Transform

URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
FOLDER = "tiny-imagenet-200"
LAYOUT = (
    f"  {FOLDER}/wnids.txt\n  {FOLDER}/train/<wnid>/images/*.JPEG\n"
    f"  {FOLDER}/val/images/*.JPEG\n  {FOLDER}/val/val_annotations.txt"
)


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMG_EXTENSIONS


def read_wnids(folder: Path) -> list[str]:
    """Sorted wnids from ``wnids.txt`` (checked against ``train/``), else ``train/``'s folders."""
    train_dirs = (
        sorted(p.name for p in (folder / "train").iterdir() if p.is_dir())
        if (folder / "train").is_dir()
        else []
    )
    wnids_file = folder / "wnids.txt"
    if not wnids_file.exists():
        return train_dirs
    wnids = sorted(set(wnids_file.read_text().split()))
    extra = set(train_dirs) - set(wnids)
    if extra:
        raise ValueError(f"{wnids_file}: train/ has classes not listed here: {sorted(extra)[:5]}")
    return wnids


def read_samples(folder: Path, split: str, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    """``(path, label)`` pairs of ``split`` (train = ``train/``, test = ``val/``)."""
    samples: list[tuple[str, int]] = []
    if split == "train":
        for wnid, label in class_to_idx.items():
            d = folder / "train" / wnid
            d = d / "images" if (d / "images").is_dir() else d
            if not d.is_dir():
                raise ValueError(f"{d}: missing image folder for class {wnid}")
            samples += [(str(p), label) for p in sorted(d.iterdir()) if _is_image(p)]
        return samples
    ann = folder / "val" / "val_annotations.txt"
    for lineno, line in enumerate(ann.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2 or parts[1] not in class_to_idx:
            raise ValueError(f"{ann}:{lineno}: expected 'file<TAB>wnid...' with a known wnid")
        samples.append((str(folder / "val" / "images" / parts[0]), class_to_idx[parts[1]]))
    return samples


class TinyImageNet(ImageDataset):
    """Tiny-ImageNet ``train`` (100000) / ``test`` (= official val, 10000), 64x64 RGB.

    Images are decoded lazily; ``in_memory=True`` decodes everything once into ``data``
    (``(N, 64, 64, 3)`` uint8, ~1.2 GB for train) so epochs skip JPEG decoding.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        transform: Transform | None = None,
        eval_transform: Transform | None = None,
        *,
        in_memory: bool = False,
    ) -> None:
        root = Path(root)
        required = ["train"] if split == "train" else ["val/val_annotations.txt", "val/images"]
        self.root = find_dir(
            root,
            [FOLDER],
            required,
            dataset="Tiny-ImageNet",
            get_it=f"download {URL} and unzip it into {root}",
            layout=LAYOUT,
        )
        self.classes = read_wnids(self.root)
        if not self.classes:
            raise ValueError(f"{self.root}: no classes (empty wnids.txt and train/)")
        self.class_to_idx = {w: i for i, w in enumerate(self.classes)}
        self.class_names = self._read_words()
        self.samples = read_samples(self.root, split, self.class_to_idx)
        self.targets = [y for _, y in self.samples]
        self.transform = transform
        self.eval_transform = eval_transform
        self.split = split
        self._data: np.ndarray | None = self._decode_all() if in_memory else None

    @property
    def data(self) -> np.ndarray:
        """``(N, 64, 64, 3)`` uint8 pixels; only with ``in_memory=True`` (else AttributeError, so
        ``hasattr(ds, "data")`` tells array-backed datasets apart)."""
        if self._data is None:
            raise AttributeError("TinyImageNet.data needs in_memory=True (images are lazy)")
        return self._data

    def _read_words(self) -> list[str]:
        words = self.root / "words.txt"
        names = dict.fromkeys(self.classes, "")
        if words.exists():
            for line in words.read_text().splitlines():
                wnid, _, text = line.partition("\t")
                if wnid in names:
                    names[wnid] = text.split(",")[0].strip()
        return [names[w] or w for w in self.classes]

    def _decode_all(self) -> np.ndarray:
        first = np.asarray(default_loader(self.samples[0][0]))
        out = np.empty((len(self.samples), *first.shape), dtype=np.uint8)
        for i, (path, _) in enumerate(self.samples):
            img = np.asarray(default_loader(path))
            if img.shape != first.shape:
                raise ValueError(f"{path}: size {img.shape} differs from {first.shape}")
            out[i] = img
        return out

    def raw_tensor(self, index: int) -> torch.Tensor:
        """Image ``index`` as a ``uint8`` ``3xHxW`` tensor (greyscale JPEGs converted to RGB)."""
        if self._data is not None:
            return torch.from_numpy(self._data[index]).permute(2, 0, 1)
        return pil_to_tensor(default_loader(self.samples[index][0]))

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = self.raw_tensor(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]
