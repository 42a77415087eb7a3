"""Fashion-MNIST from its IDX files (as shipped by Debian's ``dataset-fashion-mnist``)."""

from __future__ import annotations

from pathlib import Path

from .base import ArrayImageDataset
from .errors import check_labels, not_found
from .idx import IMAGES_MAGIC, LABELS_MAGIC, read_idx
from .transforms import Transform

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
URL = "https://github.com/zalandoresearch/fashion-mnist (files under data/fashion/)"
GET_IT = f"`apt-get install dataset-fashion-mnist` (installs {DEFAULT_ROOT}) or download {URL}"
CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
PREFIX = {"train": "train", "test": "t10k"}


def _find(root: Path, stem: str, looked: list[Path]) -> Path | None:
    # Debian/official layout, a "fashion-mnist" subfolder, or torchvision's FashionMNIST/raw.
    for d in (root, root / "fashion-mnist", root / "FashionMNIST" / "raw"):
        looked.append(d)
        for name in (f"{stem}.gz", stem):
            if (d / name).is_file():
                return d / name
    return None


class FashionMNIST(ArrayImageDataset):
    """Fashion-MNIST ``train`` (60000) / ``test`` (10000); ``data`` is ``(N, 28, 28)`` uint8."""

    def __init__(
        self,
        root: str | Path,
        split: str,
        transform: Transform | None = None,
        eval_transform: Transform | None = None,
    ) -> None:
        root = Path(root).expanduser()
        files = []
        for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
            stem = f"{PREFIX[split]}-{kind}"
            looked: list[Path] = []
            path = _find(root, stem, looked)
            if path is None:
                raise not_found("Fashion-MNIST", f"'{stem}.gz' (or '{stem}')", looked, GET_IT)
            files.append(path)
        images = read_idx(files[0], IMAGES_MAGIC)
        labels = read_idx(files[1], LABELS_MAGIC)
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise ValueError(f"{files[0]}: expected (N, 28, 28) images, got {images.shape}")
        if len(labels) != len(images):
            raise ValueError(f"{files[1]}: {len(labels)} labels for {len(images)} images")
        check_labels(labels, 10, files[1])
        super().__init__(
            images, labels.astype(int).tolist(), list(CLASSES), transform, eval_transform
        )
        self.split = split
