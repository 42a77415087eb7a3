"""STL-10 from the official binaries (``stl10_binary/{train,test}_{X,y}.bin``).

Format (https://cs.stanford.edu/~acoates/stl10/): ``*_X.bin`` is raw ``uint8``, 3x96x96 per
image, one channel after the other (R, G, B), each channel stored **column-major**; ``*_y.bin`` is
one ``uint8`` label per image in 1..10. Images are memory-mapped, not read into RAM.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ._paths import find_dir
from .base import ArrayImageDataset
from .transforms import Transform

URL = "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz"
FOLDER = "stl10_binary"
SIDE = 96
IMAGE_BYTES = 3 * SIDE * SIDE
CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


def read_stl10_images(path: Path, mmap: bool = True) -> np.ndarray:
    """``*_X.bin`` -> ``(N, 96, 96, 3)`` upright RGB ``uint8`` view (memory-mapped by default)."""
    size = path.stat().st_size
    if size == 0 or size % IMAGE_BYTES:
        raise ValueError(f"{path}: size {size} is not a multiple of 3*96*96 = {IMAGE_BYTES} bytes")
    # mode "c" (copy-on-write) keeps the file read-only yet gives torch a writable array.
    raw = np.memmap(path, dtype=np.uint8, mode="c") if mmap else np.fromfile(path, np.uint8)
    # (N, C, x, y): column-major per channel means the column index varies slowest.
    planes = raw.reshape(-1, 3, SIDE, SIDE)
    return planes.transpose(0, 3, 2, 1)  # -> (N, y, x, C)


def read_stl10_labels(path: Path) -> list[int]:
    """``*_y.bin`` (1..10) -> 0-based labels."""
    y = np.fromfile(path, dtype=np.uint8).astype(np.int64)
    if y.size and (y.min() < 1 or y.max() > 10):
        raise ValueError(
            f"{path}: STL-10 labels must lie in 1..10, found {int(y.min())}..{int(y.max())}"
        )
    return (y - 1).tolist()


def resize_images(data: np.ndarray, size: int) -> np.ndarray:
    """Resize every image with PIL bilinear, exactly as ``transforms.Resize(size)`` on PIL does."""
    out = np.empty((len(data), size, size, data.shape[3]), dtype=np.uint8)
    for i, im in enumerate(data):
        pil = Image.fromarray(np.ascontiguousarray(im))
        out[i] = np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR))
    return out


class STL10(ArrayImageDataset):
    """STL-10 labelled ``train`` (5000) or ``test`` (8000) split.

    ``data`` is ``(N, 96, 96, 3)`` (memory-mapped), or ``(N, resize, resize, 3)`` in RAM when
    ``resize`` is given: resizing once up front equals ``Resize(resize)`` at every epoch and is
    what the 32x32 transfer protocol needs.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        transform: Transform | None = None,
        eval_transform: Transform | None = None,
        *,
        resize: int | None = None,
        mmap: bool = True,
    ) -> None:
        root = Path(root)
        x_name, y_name = f"{split}_X.bin", f"{split}_y.bin"
        folder = find_dir(
            root,
            [FOLDER],
            [x_name, y_name],
            dataset="STL-10",
            get_it=f"download {URL} and extract it (tar xzf) into {root}",
            layout=f"  {root}/{FOLDER}/{{{x_name},{y_name},class_names.txt}}",
        )
        data = read_stl10_images(folder / x_name, mmap=mmap)
        labels = read_stl10_labels(folder / y_name)
        if len(labels) != len(data):
            raise ValueError(f"{folder}: {len(data)} images in {x_name}, {len(labels)} labels")
        names_file = folder / "class_names.txt"
        classes = names_file.read_text().split() if names_file.exists() else list(CLASSES)
        if len(classes) != 10:
            raise ValueError(f"{names_file}: expected 10 class names, got {len(classes)}")
        if resize is not None and resize != SIDE:
            data = resize_images(data, resize)
        super().__init__(data, labels, classes, transform, eval_transform)
        self.split = split
