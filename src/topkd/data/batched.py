"""Batched augmentation of in-memory datasets: a whole batch in a few tensor ops, on any device.

The per-image path of an array-backed dataset (:class:`~topkd.data.base.ArrayImageDataset`) is
``RandomCrop(padding) -> RandomHorizontalFlip -> ToFloat -> Normalize`` on each ``uint8`` image
(:mod:`topkd.data.transforms`), one Python call chain per image in the DataLoader. Here the same
result is computed for a whole batch: pad, one gather for the crop windows (flipped windows read
their columns backwards), ``/255``, normalise; the random parameters are drawn for the batch at
once. Every image is bit-identical to the per-image path given the same crop offsets and flips
(``tests/test_batched_data.py``): integer indexing only, and the float arithmetic of
``ToFloat`` + ``Normalize`` in the same order.

>>> spec = CropFlipSpec.of_transform(ds.transform)   # None if not batchable, see why_not()
>>> params = spec.sample(len(idx), generator)         # (B, 3 * tiles) int64: dy, dx, flip
>>> x = normalize_u8(spec.apply(images_u8[idx], params), mean, std)

Only geometry that is a function of a few integers per image is batched: the zero-padded random
crop and the horizontal flip (also per vertical strip, ``tiles``, for side-by-side composites).
Per-image policies with PIL ops (RandAugment, AutoAugment, AugMix), random erasing and folder
datasets (decoding, resized crops) keep the DataLoader path; Mixup/CutMix already run per batch
in the training step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torchvision.transforms as T
from torch import Tensor

__all__ = ["CropFlipSpec", "crop_flip", "normalize_u8", "why_not_batched"]


def crop_flip(images: Tensor, params: Tensor, padding: int, *, fill: int = 0,
              tiles: int = 1) -> Tensor:
    """Zero-padded crop + optional horizontal flip of every image (and strip) of a batch.

    Args:
        images: ``(B, C, H, W)`` images (any dtype; ``uint8`` in the data path), on any device.
        params: ``(B, 3 * tiles)`` integers ``(dy, dx, flip)`` per strip: the crop window's top
            left corner in the padded strip, ``dy, dx in [0, 2 * padding]`` (torchvision's
            ``RandomCrop.get_params`` ``i, j``), and ``flip`` in ``{0, 1}``.
        padding: pixels of ``fill`` added on every side before cropping.
        tiles: number of equal vertical strips, each cropped and flipped on its own.

    Returns:
        ``(B, C, H, W)`` contiguous tensor: per strip ``out = pad(x)[:, dy:dy+H, dx:dx+w]``,
        mirrored left-right where ``flip``; exactly ``RandomCrop(padding=padding, fill=fill)``
        then ``RandomHorizontalFlip`` with those draws.
    """
    b, c, h, w = images.shape
    if w % tiles:
        raise ValueError(f"crop_flip: image width {w} is not divisible into {tiles} tiles")
    if params.shape != (b, 3 * tiles):
        raise ValueError(f"crop_flip: params must be (B, 3 * tiles) = ({b}, {3 * tiles}), got "
                         f"{tuple(params.shape)}")
    tw, n = w // tiles, b * tiles
    dev = images.device
    p = params.to(device=dev, dtype=torch.long).reshape(n, 3)
    # (B, C, H, tiles, tw) -> (B*tiles, C, H, tw): every strip is an image of its own.
    strips = images.reshape(b, c, h, tiles, tw).permute(0, 3, 1, 2, 4).reshape(n, c, h, tw)
    padded = torch.nn.functional.pad(strips, (padding,) * 4, value=fill)
    rows = p[:, 0:1] + torch.arange(h, device=dev)  # (n, H)
    cols = p[:, 1:2] + torch.arange(tw, device=dev)  # (n, tw)
    cols = torch.where(p[:, 2:3].bool(), cols.flip(1), cols)
    bi = torch.arange(n, device=dev)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]  # (n, H, tw, C)
    # (B, tiles, H, tw, C) -> (B, C, H, tiles, tw) = (B, C, H, W)
    return out.reshape(b, tiles, h, tw, c).permute(0, 4, 2, 1, 3).reshape(b, c, h, w).contiguous()


def normalize_u8(images: Tensor, mean: Tensor | Sequence[float],
                 std: Tensor | Sequence[float]) -> Tensor:
    """``uint8 (B, C, H, W)`` -> float32 ``(x / 255 - mean) / std``, with the arithmetic of
    :class:`~topkd.data.transforms.ToFloat` then ``torchvision.transforms.Normalize`` (so the
    result is bit-identical to the per-image path). ``mean``/``std``: ``C`` values, or tensors
    already shaped ``(C, 1, 1)`` on the images' device (no host sync)."""
    x = images.to(torch.float32).div_(255)
    m, s = (v if isinstance(v, Tensor) else
            torch.as_tensor(v, dtype=torch.float32, device=x.device).view(-1, 1, 1)
            for v in (mean, std))
    return x.sub_(m).div_(s)


@dataclass(frozen=True)
class CropFlipSpec:
    """The train-time geometry of an in-memory dataset as batched parameters.

    ``padding``/``fill``: the zero-padded random crop (``padding=0``: no crop); ``flip_p``: the
    probability of a horizontal flip (0: none); ``tiles``: vertical strips each augmented on
    their own (2 for ``fashion_mnist_pairs``).
    """

    padding: int = 0
    fill: int = 0
    flip_p: float = 0.0
    tiles: int = 1

    @property
    def identity(self) -> bool:
        return self.padding == 0 and self.flip_p == 0

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``(n, 3 * tiles)`` int64 parameters: ``dy, dx`` uniform in ``[0, 2 * padding]``,
        ``flip = U(0, 1) < flip_p`` (the draws of ``RandomCrop`` / ``RandomHorizontalFlip``),
        on the generator's device."""
        dev = generator.device if generator is not None else torch.device("cpu")
        p = torch.empty(n, self.tiles, 3, dtype=torch.long, device=dev)
        p[..., :2] = torch.randint(0, 2 * self.padding + 1, (n, self.tiles, 2),
                                   generator=generator, device=dev)
        p[..., 2] = (torch.rand(n, self.tiles, generator=generator, device=dev)
                     < self.flip_p).long()
        return p.reshape(n, 3 * self.tiles)

    def apply(self, images: Tensor, params: Tensor) -> Tensor:
        """:func:`crop_flip` with this spec (``images`` returned as they are if identity)."""
        if self.identity:
            return images
        return crop_flip(images, params, self.padding, fill=self.fill, tiles=self.tiles)

    @classmethod
    def of_transform(cls, transform: Any, image_hw: tuple[int, int]) -> CropFlipSpec | None:
        """The spec of a dataset transform made by :func:`topkd.data.make_transforms`, or
        ``None`` when it is not batchable (:func:`why_not_batched` says why)."""
        return None if why_not_batched(transform, image_hw) else _parse(transform, image_hw)[0]


def why_not_batched(transform: Any, image_hw: tuple[int, int]) -> str | None:
    """``None`` when ``transform`` (on ``uint8`` ``C x H x W`` images of size ``image_hw``) can
    run batched, else the reason (for error messages and notices)."""
    return _parse(transform, image_hw)[1]


def _parse(transform: Any, image_hw: tuple[int, int]) -> tuple[CropFlipSpec | None, str | None]:
    from .transforms import ImageTransform

    if not isinstance(transform, ImageTransform):
        what = type(transform).__name__ if transform is not None else "no transform"
        return None, (f"its transform ({what}) is not the dataset's own crop/flip + normalise "
                      "(per-image policies such as auto_augment or random erasing, or extra "
                      "views, need the per-image path)")
    if transform.from_pil:
        return None, ("its transform works on PIL images (per-image policies such as "
                      "auto_augment run there)")
    if transform.raw or not transform.normalize:
        return None, "its transform returns unnormalised images"
    ops, tiles = list(transform.geometry), 1
    if len(ops) == 1 and hasattr(ops[0], "tiles") and hasattr(ops[0], "transform"):  # PerTile
        tiles, inner = int(ops[0].tiles), ops[0].transform
        ops = list(getattr(inner, "transforms", [inner]))
    h, w = image_hw
    if w % tiles:
        return None, f"its {w}-pixel-wide images do not split into {tiles} tiles"
    padding, fill, flip_p = 0, 0, 0.0
    for i, op in enumerate(ops):
        if isinstance(op, T.RandomCrop) and i == 0:
            pad = op.padding
            pads = [pad] if isinstance(pad, int) else list(pad or [0])
            ok = (len(set(pads)) == 1 and op.padding_mode == "constant" and isinstance(op.fill, int)
                  and not op.pad_if_needed and tuple(op.size) == (h, w // tiles))
            if not ok:
                return None, f"its {op} is not a full-size crop with equal zero padding"
            padding, fill = int(pads[0]), int(op.fill)
        elif isinstance(op, T.RandomHorizontalFlip) and i == len(ops) - 1:
            flip_p = float(op.p)
        else:
            return None, f"its geometry has {op!r}, which has no batched form"
    return CropFlipSpec(padding, fill, flip_p, tiles), None
