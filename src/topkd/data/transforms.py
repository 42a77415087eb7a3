"""Standard per-dataset transforms and normalisation constants.

Array-backed datasets feed ``uint8`` CxHxW tensors straight into torchvision (v1) tensor
transforms: no PIL round trip, and the result is bit-identical to the usual PIL pipeline
``RandomCrop -> RandomHorizontalFlip -> ToTensor -> Normalize`` (same random draws, zero padding,
same ``/255`` arithmetic). v1 is used rather than v2 because v2's per-call dispatch costs ~10% on
32x32 images and buys nothing here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torchvision.transforms as T

Transform = Callable[[Any], Any]

# CIFAR-100 statistics exactly as mdistiller/CRD use them.
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
# CIFAR-10 per-channel pixel mean/std over the training set.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Tiny-ImageNet as mdistiller trains its Tiny-ImageNet teachers (mdistiller/dataset/
# tiny_imagenet.py): the teachers the pair configs load expect exactly these.
TINY_IMAGENET_MEAN = (0.4802, 0.4481, 0.3975)
TINY_IMAGENET_STD = (0.2302, 0.2265, 0.2262)
# STL-10 labelled train split statistics (pass CIFAR-100's for the 32x32 transfer protocol).
STL10_MEAN = (0.4467, 0.4398, 0.4066)
STL10_STD = (0.2603, 0.2566, 0.2713)
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)


class ToFloat:
    """``uint8`` tensor -> ``float32`` in [0, 1] with exactly ``ToTensor``'s arithmetic (``/255``).

    (v2 ``ToDtype(scale=True)`` multiplies by 1/255 instead, which can differ in the last ulp.)
    """

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32).div_(255)

    def __repr__(self) -> str:
        return "ToFloat()"


class ImageTransform(T.Compose):
    """The ``T.Compose`` made by :func:`build_transform`, remembering how it was made.

    ``topkd.data.augment`` rebuilds a dataset's transform from these parts to insert
    augmentation policies between the geometry (on ``uint8`` tensors or PIL images) and the
    float conversion, so that the policies apply to every dataset built with
    :func:`~topkd.data.make_transforms`.
    """

    def __init__(self, ops: Sequence[Transform], *, geometry: Sequence[Transform],
                 mean: Sequence[float], std: Sequence[float], normalize: bool, raw: bool,
                 from_pil: bool) -> None:
        super().__init__(list(ops))
        self.geometry = tuple(geometry)
        self.mean, self.std = tuple(mean), tuple(std)
        self.normalize, self.raw, self.from_pil = normalize, raw, from_pil


def build_transform(
    geometry: Sequence[Transform],
    *,
    mean: Sequence[float],
    std: Sequence[float],
    normalize: bool = True,
    raw: bool = False,
    from_pil: bool = False,
) -> ImageTransform | None:
    """Compose ``geometry`` (crops/flips/resizes) with the tensor conversion and normalisation.

    ``raw=True`` stops after the geometry and returns ``uint8`` tensors (``None`` if nothing is
    left to do); ``normalize=False`` gives float tensors in [0, 1]. ``from_pil`` inserts
    ``PILToTensor`` after the geometry for datasets whose samples are PIL images.
    """
    ops: list[Transform] = list(geometry)
    if from_pil:
        ops.append(T.PILToTensor())
    if not raw:
        ops.append(ToFloat())
        if normalize:
            ops.append(T.Normalize(tuple(mean), tuple(std)))
    if not ops:
        return None
    return ImageTransform(ops, geometry=geometry, mean=mean, std=std, normalize=normalize,
                          raw=raw, from_pil=from_pil)


def crop_flip(size: int, padding: int) -> list[Transform]:
    """The field's small-image augmentation: zero-padded random crop + horizontal flip."""
    return [T.RandomCrop(size, padding=padding), T.RandomHorizontalFlip()]


class PILRandomRotation:
    """``T.RandomRotation(degrees)`` applied through PIL to a ``uint8`` CxHxW tensor.

    The reference pipelines rotate PIL images (nearest neighbour, zero fill); torchvision's tensor
    rotation rounds differently at ~0.03 % of the pixels, so we go through PIL to be pixel-exact.
    The random draw is ``RandomRotation``'s own (same RNG stream as the reference).
    """

    def __init__(self, degrees: float) -> None:
        self.rotation = T.RandomRotation(degrees)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.functional import pil_to_tensor, to_pil_image

        return pil_to_tensor(self.rotation(to_pil_image(x)))

    def __repr__(self) -> str:
        return f"PILRandomRotation(degrees={list(self.rotation.degrees)})"


def rotate_flip(degrees: float) -> list[Transform]:
    """mdistiller's Tiny-ImageNet augmentation: RandomRotation(degrees) + horizontal flip."""
    return [PILRandomRotation(degrees), T.RandomHorizontalFlip(0.5)]


def imagenet_geometry(train: bool, image_size: int = 224, resize_size: int | None = None) -> list:
    """ImageNet geometry on PIL images: RandomResizedCrop+flip, or Resize+CenterCrop.

    ``resize_size`` defaults to ``round(image_size / 0.875)`` (256 for 224).
    """
    if train:
        return [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()]
    resize = resize_size if resize_size is not None else round(image_size / 0.875)
    return [T.Resize(resize), T.CenterCrop(image_size)]


@dataclass(frozen=True)
class CropFlip:
    """A dataset's crop + flip recipe, shared by its transform and the teacher-logit cache.

    Each image is cut into ``tiles`` equal vertical strips (1: the whole image) and every strip
    gets its own zero-padded random crop (``padding``) and, if ``flip``, its own horizontal flip.
    ``tiles=2`` is for images made of two side-by-side images whose order carries the label
    (``fashion_mnist_pairs``): a flip of the whole image would swap the halves. The cache's
    replayable version is :class:`topkd.cache.ReplayableCropFlip` with the same fields.
    """

    padding: int
    flip: bool = True
    tiles: int = 1

    def geometry(self, height: int, width: int) -> list[Transform]:
        """torchvision geometry for ``height x width`` images (per strip when ``tiles > 1``)."""
        if width % self.tiles:
            raise ValueError(f"width {width} is not divisible into {self.tiles} tiles")
        ops: list[Transform] = [T.RandomCrop((height, width // self.tiles), padding=self.padding)]
        if self.flip:
            ops.append(T.RandomHorizontalFlip())
        return ops if self.tiles == 1 else [PerTile(self.tiles, T.Compose(ops))]


class PerTile:
    """Apply ``transform`` to each of ``tiles`` equal vertical strips of a ``(..., H, W)`` tensor,
    left to right (each strip draws its own random parameters)."""

    def __init__(self, tiles: int, transform: Transform) -> None:
        self.tiles, self.transform = tiles, transform

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % self.tiles:
            raise ValueError(f"width {x.shape[-1]} is not divisible into {self.tiles} tiles")
        return torch.cat([self.transform(t) for t in x.chunk(self.tiles, dim=-1)], dim=-1)

    def __repr__(self) -> str:
        return f"PerTile(tiles={self.tiles}, {self.transform})"
