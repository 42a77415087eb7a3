"""Base classes shared by the dataset readers."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .transforms import CropFlip, Transform


class ImageDataset(Dataset):
    """Common surface of every topkd dataset.

    ``transform`` is applied to each sample; ``eval_transform`` is the matching test-time
    (no augmentation) transform, so that a held-out split of a training set can be evaluated
    without augmentation (see :func:`topkd.data.train_val_split`).
    """

    transform: Transform | None
    eval_transform: Transform | None
    targets: list[int]
    classes: list[str]
    #: The dataset recipe's train-time crop + flip (set by the builders of ``topkd.data``, even
    #: when ``augment=False``); the teacher-logit cache replays exactly this augmentation.
    crop_flip: CropFlip | None = None

    def with_transform(self, transform: Transform | None) -> ImageDataset:
        """A shallow copy sharing all arrays/file lists, with ``transform`` replaced."""
        other = copy.copy(self)
        other.transform = transform
        return other

    def eval_view(self) -> ImageDataset:
        """The same samples with the test-time transform."""
        return self.with_transform(self.eval_transform)

    def __len__(self) -> int:
        return len(self.targets)


class ArrayImageDataset(ImageDataset):
    """Images held in one ``uint8`` array (in memory or memory-mapped).

    Attributes:
        data: ``(N, H, W)`` or ``(N, H, W, C)`` ``uint8`` array of raw pixels (upright, RGB).
        targets: ``list[int]`` of labels in ``[0, len(classes))``.
        classes: class names, index = label.
        transform: applied to a ``uint8`` ``CxHxW`` tensor; ``None`` returns that tensor.
    """

    def __init__(
        self,
        data: np.ndarray,
        targets: list[int],
        classes: list[str],
        transform: Transform | None = None,
        eval_transform: Transform | None = None,
    ) -> None:
        if data.dtype != np.uint8 or data.ndim not in (3, 4):
            raise ValueError(f"data must be uint8 (N,H,W[,C]), got {data.dtype} {data.shape}")
        if len(data) != len(targets):
            raise ValueError(f"{len(data)} images but {len(targets)} labels")
        self.data = data
        self.targets = targets
        self.classes = classes
        self.transform = transform
        self.eval_transform = eval_transform

    def raw_tensor(self, index: int) -> torch.Tensor:
        """Image ``index`` as an (untransformed) ``uint8`` ``CxHxW`` tensor (a view, no copy)."""
        t = torch.from_numpy(self.data[index])
        return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = self.raw_tensor(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n={len(self)}, shape={tuple(self.data.shape[1:])}, "
            f"classes={len(self.classes)}, transform={self.transform})"
        )
