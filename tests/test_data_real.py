"""The real Fashion-MNIST as installed by Debian's ``dataset-fashion-mnist`` (skipped if absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from topkd.data import get_dataset

ROOT = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(
    not (ROOT / "train-images-idx3-ubyte.gz").exists(), reason=f"no Fashion-MNIST in {ROOT}"
)


def test_real_fashion_mnist():
    train = get_dataset("fashion_mnist", None, "train")  # default root is the Debian path
    test = get_dataset("fashion_mnist", ROOT, "test")
    assert len(train) == 60000 and len(test) == 10000
    assert train.data.shape == (60000, 28, 28) and train.data.dtype == np.uint8
    assert len(train.classes) == 10 and train.info.num_classes == 10
    assert np.bincount(train.targets).tolist() == [6000] * 10
    assert np.bincount(test.targets).tolist() == [1000] * 10
    # The published statistics (0.2860, 0.3530) are the train set's.
    pixels = train.data.astype(np.float64) / 255
    assert abs(pixels.mean() - 0.2860) < 5e-4 and abs(pixels.std() - 0.3530) < 5e-4
    x, y = test[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y == 9  # first is a boot
