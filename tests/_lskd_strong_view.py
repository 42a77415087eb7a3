"""Test oracle: the weak/strong pair of MLKD's CIFAR-100 training data, transcribed.

Source: sunshangquan/logit-standardization-KD @ f6e5aa5172bad618e801163c3385322eea673754,
mdistiller/dataset/cifar100.py (``get_cifar100_train_transform_strong`` and the FixMatch-style
``RandAugment(2, 10)`` it uses). Transcribed here in our words as a behavioural reference for
``topkd.data.augment`` (never imported by ``src/``). What the reference does, per image:

* weak view: RandomCrop(32, padding 4), RandomHorizontalFlip, ToTensor, Normalize;
* strong view: its own RandomCrop + flip, then 2 ops drawn with replacement (``random.choices``)
  from the 14-op table below, each with a magnitude ``lo + (hi - lo) * random.random()``, then a
  Cutout of side ``random.random() * 0.5 * W`` whose centre is ``np.random.uniform(W)`` (that is
  uniform(W, 1): a draw in (1, W], the reference's quirk) filled with (125, 123, 114);
* both views come from independent draws on the same PIL image (weak first).
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps
from torchvision import transforms as T

MEAN, STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)


def _affine(img: Image.Image, coeffs: tuple[float, ...]) -> Image.Image:
    return img.transform(img.size, Image.AFFINE, coeffs)


# (op, lo, hi) in the reference's order; magnitudes are used as drawn (no random sign).
OPS = [
    (lambda img, v: ImageOps.autocontrast(img), 0, 1),
    (lambda img, v: ImageEnhance.Brightness(img).enhance(v), 0.05, 0.95),
    (lambda img, v: ImageEnhance.Color(img).enhance(v), 0.05, 0.95),
    (lambda img, v: ImageEnhance.Contrast(img).enhance(v), 0.05, 0.95),
    (lambda img, v: ImageOps.equalize(img), 0, 1),
    (lambda img, v: img, 0, 1),  # identity
    (lambda img, v: ImageOps.posterize(img, max(1, int(v))), 4, 8),
    (lambda img, v: img.rotate(v), -30, 30),
    (lambda img, v: ImageEnhance.Sharpness(img).enhance(v), 0.05, 0.95),
    (lambda img, v: _affine(img, (1, v, 0, 0, 1, 0)), -0.3, 0.3),  # shear x
    (lambda img, v: _affine(img, (1, 0, 0, v, 1, 0)), -0.3, 0.3),  # shear y
    (lambda img, v: ImageOps.solarize(img, v), 0, 256),
    (lambda img, v: _affine(img, (1, 0, v * img.size[0], 0, 1, 0)), -0.3, 0.3),  # translate x
    (lambda img, v: _affine(img, (1, 0, 0, 0, 1, v * img.size[1])), -0.3, 0.3),  # translate y
]


def cutout(img: Image.Image, frac: float, centre=np.random.uniform) -> Image.Image:
    """Square of side ``frac * W`` (nothing when 0) at a random centre, clipped to the image."""
    if frac <= 0:
        return img
    v = frac * img.size[0]
    w, h = img.size
    x0, y0 = int(max(0, centre(w) - v / 2.0)), int(max(0, centre(h) - v / 2.0))
    img = img.copy()
    ImageDraw.Draw(img).rectangle((x0, y0, min(w, x0 + v), min(h, y0 + v)), (125, 123, 114))
    return img


class StrongOps:
    """The reference's RandAugment(n=2): two ops with random magnitudes, then Cutout."""

    def __init__(self, centre=np.random.uniform) -> None:
        self.centre = centre

    def __call__(self, img: Image.Image) -> Image.Image:
        for op, lo, hi in random.choices(OPS, k=2):
            img = op(img, lo + float(hi - lo) * random.random())
        return cutout(img, random.random() * 0.5, self.centre)


def weak_strong(centre=np.random.uniform):
    """``img -> [weak, strong]`` as the reference's MultipleApply of its two transforms."""
    tail = [T.ToTensor(), T.Normalize(MEAN, STD)]
    weak = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), *tail])
    strong = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(),
                        StrongOps(centre), *tail])
    return lambda img: [weak(img), strong(img)]
