"""``fashion_mnist_pairs``: a 100-class dataset DERIVED from Fashion-MNIST (not a benchmark).

Each sample is two Fashion-MNIST images side by side (``1 x 28 x 56``); its label is
``10 * a + b`` for a left image of class ``a`` and a right image of class ``b``. Training
samples are composed from the Fashion-MNIST training split only, test samples from its test
split only. The classes have real structure: ``(a, b)`` resembles ``(a, b')`` and ``(a', b)``
(and "Shirt | Coat" resembles "T-shirt | Pullover"), so a good teacher has informative
non-target logits, as CIFAR-100's superclasses give. It exists to test distillation at
C = 100 on real images within a CPU budget; it is not a standard benchmark and its numbers are
not comparable with anything published.

Composition (:func:`compose_pairs`), deterministic in ``pair_seed``:

* composite labels are balanced: ``n`` labels ``0..99`` repeated (``n % 100`` classes get one
  more), in a random order;
* for every Fashion-MNIST class, its images are shuffled and dealt out, first to the composites
  that need that class on the left, then on the right. A size that is a multiple of 100 needs
  ``size / 5`` images of every class, so up to 30,000 training and 5,000 test composites (the
  defaults) no source image appears in two composites, and a validation split of the training
  composites (:func:`topkd.data.train_val_split`) shares no source image with the rest. Larger
  sizes reuse source images (cyclically, as evenly as possible): then composites share halves.

Augmentation (:class:`~topkd.data.transforms.CropFlip` with ``tiles=2``): each half gets its own
pad-2 random crop and horizontal flip, exactly Fashion-MNIST's recipe. Flipping the whole
composite would swap the halves and change the label.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .base import ArrayImageDataset
from .fashion_mnist import CLASSES as FMNIST_CLASSES
from .fashion_mnist import FashionMNIST
from .transforms import Transform

#: Sizes with which every source image is used once (6,000 / 1,000 images per class).
DEFAULT_SIZES = {"train": 30000, "test": 5000}
CLASSES = [f"{a} | {b}" for a in FMNIST_CLASSES for b in FMNIST_CLASSES]


def compose_pairs(labels: np.ndarray, n: int, seed: int | Sequence[int]) -> np.ndarray:
    """``(n, 2)`` indices into ``labels`` (left, right) of ``n`` class-balanced composites.

    The composite label of row ``i`` is ``10 * labels[left] + labels[right]``. See the module
    docstring for the dealing order; a source image is reused only when ``n`` needs more
    images of its class than there are.
    """
    labels = np.asarray(labels)
    if n < 1:
        raise ValueError(f"the number of composites must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % 100)
    src = np.empty((n, 2), np.int64)
    for c in range(10):  # ten source classes, each dealt out in one vectorised step
        pool = np.flatnonzero(labels == c)
        left, right = np.flatnonzero(y // 10 == c), np.flatnonzero(y % 10 == c)
        if len(pool) == 0:
            if len(left) + len(right):
                raise ValueError(f"no source image of Fashion-MNIST class {c} to compose from")
            continue
        dealt = np.resize(rng.permutation(pool), len(left) + len(right))  # cycles if short
        src[left, 0] = dealt[: len(left)]
        src[right, 1] = dealt[len(left):]
    return src


class FashionMNISTPairs(ArrayImageDataset):
    """``n`` composites of one Fashion-MNIST split; ``data`` is ``(n, 28, 56)`` uint8.

    Attributes (besides :class:`ArrayImageDataset`'s): ``sources`` ``(n, 2)`` indices of the
    left/right images in the Fashion-MNIST split, ``split``, ``pair_seed``.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        size: int | None = None,
        pair_seed: int = 0,
        transform: Transform | None = None,
        eval_transform: Transform | None = None,
    ) -> None:
        src = FashionMNIST(root, split)
        n = DEFAULT_SIZES[split] if size is None else int(size)
        labels = np.asarray(src.targets)
        # One seed stream per split: the test composites do not depend on the training size.
        self.sources = compose_pairs(labels, n, seed=[pair_seed, 0 if split == "train" else 1])
        data = np.concatenate([src.data[self.sources[:, 0]], src.data[self.sources[:, 1]]], axis=2)
        targets = (10 * labels[self.sources[:, 0]] + labels[self.sources[:, 1]]).tolist()
        super().__init__(data, targets, list(CLASSES), transform, eval_transform)
        self.split, self.pair_seed = split, pair_seed
