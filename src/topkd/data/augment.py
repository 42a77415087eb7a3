"""Augmentation policies from timm: RandAugment / AutoAugment / AugMix, RandomErasing, Mixup /
CutMix, label smoothing, and extra views of each image (docs/data.md, "Augmentation").

Per image, inside the dataset transform (so in the DataLoader workers), for the main view and for
each extra view ``data.views.<name>``::

    the dataset's geometry (crop/flip, ``augment``) -> ``auto_augment`` (on PIL images)
    -> float, Normalize -> timm ``RandomErasing`` (on the normalised tensor)

which is the order of timm's ``create_transform`` (and of DeiT's 32x32 recipe, which replaces the
random-resized crop by the dataset's padded random crop). Per batch, in the training step before
the teacher and the student see it (:class:`BatchMix`): timm's ``Mixup`` (Mixup/CutMix with
label smoothing), or label smoothing alone (timm's ``mixup_target``); the labels become
probabilities ``(B, C)``. With extra views a training item is ``({"main": x, name: x_v}, y)``.

Every random draw comes from the global ``random`` / ``numpy`` / ``torch`` generators, which the
engine seeds per DataLoader worker and epoch and saves in its checkpoints (exact resume).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image, ImageDraw

from .transforms import ImageTransform, Transform, build_transform

__all__ = [
    "MAIN",
    "OWN_POLICIES",
    "BatchMix",
    "ImagePolicy",
    "MultiView",
    "UniformRandAugment",
    "apply_policies",
    "auto_augment_transform",
    "build_batch_mix",
    "check_config",
    "mixes_batches",
    "mlkd_strong_augment",
]

#: Key of the main view in a multi-view item.
MAIN = "main"


# --------------------------------------------------------------------------------------------
# Per-image policy
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImagePolicy:
    """The per-image keys of ``data`` (main view) or ``data.views.<name>``; defaults = off.

    ``augment``: the dataset's own crop/flip; ``auto_augment``: a timm policy string
    (``rand-m9-mstd0.5-inc1``, ``original``, ``augmix-m5-w4-d2``, ...) or one of
    :data:`OWN_POLICIES`; ``aa_interpolation``: resampling of timm's geometric ops (timm's
    ``interpolation``; ``random`` = bilinear or bicubic per op); ``re_*``: timm
    ``RandomErasing(probability=re_prob, mode=re_mode, max_count=re_count)``.
    """

    augment: bool = True
    auto_augment: str | None = None
    aa_interpolation: str = "random"
    re_prob: float = 0.0
    re_mode: str = "pixel"
    re_count: int = 1

    @classmethod
    def of(cls, cfg: Any) -> ImagePolicy:
        """The policy of a config section (``DataConfig`` or ``ViewConfig``)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})

    @property
    def adds_to_dataset(self) -> bool:
        """Whether anything beyond the dataset's own transform is applied."""
        return self.auto_augment is not None or self.re_prob > 0


# --------------------------------------------------------------------------------------------
# MLKD's strong augmentation (timm's ops, the reference's sampling)
# --------------------------------------------------------------------------------------------
def _identity(img: Image.Image, *_: Any, **__: Any) -> Image.Image:
    return img


@dataclass(frozen=True)
class UniformOp:
    """One op of :class:`UniformRandAugment`: a ``timm.data.auto_augment`` function applied with
    a value drawn uniformly in ``[low, high]`` (``arg``: ``"none"``, ``"float"`` or ``"int"``).
    Geometric ops use PIL's defaults, nearest resampling and black fill."""

    name: str
    fn: Callable[..., Image.Image]
    low: float
    high: float
    arg: str = "float"
    geometric: bool = False

    def __call__(self, img: Image.Image, value: float) -> Image.Image:
        args = () if self.arg == "none" else (int(value) if self.arg == "int" else value,)
        kw = {"resample": Image.Resampling.NEAREST} if self.geometric else {}
        return self.fn(img, *args, **kw)


def _mlkd_ops() -> tuple[UniformOp, ...]:
    """The op list and ranges of ``augment_list()`` in sunshangquan/logit-standardization-KD
    ``mdistiller/dataset/cifar100.py`` (commit f6e5aa5), mapped onto timm's op functions."""
    from timm.data import auto_augment as aa

    return (
        UniformOp("AutoContrast", aa.auto_contrast, 0, 1, "none"),
        UniformOp("Brightness", aa.brightness, 0.05, 0.95),
        UniformOp("Color", aa.color, 0.05, 0.95),
        UniformOp("Contrast", aa.contrast, 0.05, 0.95),
        UniformOp("Equalize", aa.equalize, 0, 1, "none"),
        UniformOp("Identity", _identity, 0, 1, "none"),
        UniformOp("Posterize", aa.posterize, 4, 8, "int"),
        UniformOp("Rotate", aa.rotate, -30, 30, geometric=True),
        UniformOp("Sharpness", aa.sharpness, 0.05, 0.95),
        UniformOp("ShearX", aa.shear_x, -0.3, 0.3, geometric=True),
        UniformOp("ShearY", aa.shear_y, -0.3, 0.3, geometric=True),
        UniformOp("Solarize", aa.solarize, 0, 256),
        UniformOp("TranslateX", aa.translate_x_rel, -0.3, 0.3, geometric=True),
        UniformOp("TranslateY", aa.translate_y_rel, -0.3, 0.3, geometric=True),
    )


class UniformRandAugment:
    """RandAugment with uniformly drawn magnitudes plus Cutout (FixMatch-style), on PIL images.

    Per image: ``n`` ops drawn with replacement (``random.choices``), each applied with a value
    ``low + (high - low) * random.random()``; then Cutout of a square of side
    ``random.random() * cutout * W`` filled with ``fill``, whose centre is drawn with numpy and
    which is clipped to the image (drawn with PIL's ``ImageDraw.rectangle``, as the reference).

    ``centre="reference"`` draws the centre with ``np.random.uniform(W)``, i.e.
    ``uniform(low=W, high=1)``, in ``(1, W]`` (a quirk of the reference: it meant
    ``uniform(0, W)``); ``centre="uniform"`` draws it in ``[0, W)`` as intended.
    Greyscale images get ``fill`` converted by PIL to one grey level.
    """

    def __init__(self, ops: tuple[UniformOp, ...], n: int = 2, cutout: float = 0.5,
                 fill: tuple[int, int, int] = (125, 123, 114), centre: str = "reference") -> None:
        if centre not in ("reference", "uniform"):
            raise ValueError(f"centre must be 'reference' or 'uniform', got {centre!r}")
        self.ops, self.n, self.cutout, self.fill, self.centre = ops, n, cutout, fill, centre

    def __call__(self, img: Image.Image) -> Image.Image:
        for op in random.choices(self.ops, k=self.n):
            img = op(img, op.low + float(op.high - op.low) * random.random())
        return self._cutout(img, random.random() * self.cutout)

    def _cutout(self, img: Image.Image, frac: float) -> Image.Image:
        if frac <= 0:
            return img
        w, h = img.size
        side = frac * w
        if self.centre == "reference":
            cx, cy = np.random.uniform(w), np.random.uniform(h)  # noqa: NPY002
        else:
            cx, cy = np.random.uniform(0, w), np.random.uniform(0, h)  # noqa: NPY002
        x0, y0 = int(max(0, cx - side / 2.0)), int(max(0, cy - side / 2.0))
        img = img.copy()
        fill = self.fill if img.mode == "RGB" else Image.new("RGB", (1, 1), self.fill).convert(
            img.mode).getpixel((0, 0))
        ImageDraw.Draw(img).rectangle((x0, y0, min(w, x0 + side), min(h, y0 + side)), fill)
        return img

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(n={self.n}, ops=[{', '.join(o.name for o in self.ops)}], "
                f"cutout={self.cutout}, fill={self.fill}, centre={self.centre!r})")


def mlkd_strong_augment(centre: str = "reference") -> UniformRandAugment:
    """The strong augmentation of MLKD's reference code after its crop/flip: ``RandAugment(2,
    10)`` of sunshangquan/logit-standardization-KD ``mdistiller/dataset/cifar100.py`` (its ``m``
    is unused; magnitudes are uniform), with timm's ops."""
    return UniformRandAugment(_mlkd_ops(), n=2, cutout=0.5, fill=(125, 123, 114), centre=centre)


#: Our own named ``auto_augment`` policies (everything else is a timm policy string).
OWN_POLICIES: dict[str, Callable[[], Transform]] = {
    "mlkd": lambda: mlkd_strong_augment("reference"),
    "mlkd_fixed": lambda: mlkd_strong_augment("uniform"),
}


# --------------------------------------------------------------------------------------------
# timm policies
# --------------------------------------------------------------------------------------------
def _posterize(img: Image.Image, bits_to_keep: int, **kw: Any) -> Image.Image:
    """timm's ``posterize``, with 0 bits giving a black image as Pillow < 10 did.

    timm's ``rand-*-inc1`` (DeiT's default) and ``v0`` policies ask for 0 bits at their largest
    magnitudes; recent Pillow raises ``ValueError`` there instead of returning black.
    """
    from timm.data.auto_augment import posterize

    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return posterize(img, bits_to_keep, **kw)


def _patch_posterize(t: Any) -> Any:
    from timm.data.auto_augment import posterize

    groups = [getattr(t, "ops", None) or [], *(getattr(t, "policy", None) or [])]
    for ops in groups:
        for op in ops:
            if getattr(op, "aug_fn", None) is posterize:
                op.aug_fn = _posterize
    return t


def auto_augment_transform(name: str, *, image_size: int, mean: tuple[float, ...],
                           interpolation: str = "random") -> Transform:
    """The PIL transform of ``auto_augment=name``, with the hyper-parameters timm's
    ``create_transform`` gives it (``translate_const = 0.45 * size``, fill = dataset mean)."""
    if name in OWN_POLICIES:
        return OWN_POLICIES[name]()
    from timm.data import auto_augment as aa
    from timm.data.transforms import str_to_pil_interp

    fill = tuple(min(255, round(255 * m)) for m in mean)
    hp: dict[str, Any] = {"translate_const": int(image_size * 0.45),
                          "img_mean": fill if len(fill) > 1 else fill[0]}
    if interpolation != "random":
        hp["interpolation"] = str_to_pil_interp(interpolation)
    if name.startswith("rand"):
        t = aa.rand_augment_transform(name, hp)
    elif name.startswith("augmix"):
        hp["translate_pct"] = 0.3
        t = aa.augment_and_mix_transform(name, hp)
    else:
        t = aa.auto_augment_transform(name, hp)
    return _patch_posterize(t)


def _random_erasing(p: ImagePolicy) -> Transform:
    from timm.data.random_erasing import RandomErasing

    return RandomErasing(p.re_prob, mode=p.re_mode, max_count=p.re_count, device="cpu")


def policy_transform(geometry_of: ImageTransform, policy: ImagePolicy,
                     image_size: int) -> Transform:
    """The dataset transform ``geometry_of`` (its geometry, tensor conversion and normalisation)
    with ``policy``'s auto-augment inserted after the geometry and random erasing appended."""
    base = geometry_of
    geometry = list(base.geometry)
    from_pil = base.from_pil
    if policy.auto_augment is not None:
        if not from_pil:  # uint8 CxHxW tensor -> PIL ("L" or "RGB"), exact round trip
            geometry.append(T.ToPILImage())
        geometry.append(auto_augment_transform(policy.auto_augment, image_size=image_size,
                                               mean=base.mean,
                                               interpolation=policy.aa_interpolation))
        from_pil = True
    t = build_transform(geometry, mean=base.mean, std=base.std, normalize=base.normalize,
                        raw=base.raw, from_pil=from_pil)
    if policy.re_prob > 0:
        return T.Compose([t, _random_erasing(policy)])
    return t  # type: ignore[return-value]


class MultiView:
    """Dataset transform giving ``{"main": main(img), name: view(img), ...}`` of one image."""

    def __init__(self, main: Transform, views: Mapping[str, Transform]) -> None:
        self.main, self.views = main, dict(views)

    def __call__(self, img: Any) -> dict[str, torch.Tensor]:
        out = {MAIN: self.main(img)}
        for name, t in self.views.items():
            out[name] = t(img)
        return out

    def __repr__(self) -> str:
        views = "".join(f"\n  {k}: {v}" for k, v in self.views.items())
        return f"MultiView(\n  {MAIN}: {self.main}{views})"


def apply_policies(ds: Any, data_cfg: Any) -> Any:
    """``ds`` (a training set built with ``augment`` = "any view augments") with the per-image
    policies and extra views of ``data_cfg`` (``ds`` itself when there are none).

    Raises ``ValueError`` for a dataset whose transforms were not made by
    :func:`topkd.data.make_transforms` (the policies need its geometry/normalisation parts).
    """
    main = ImagePolicy.of(data_cfg)
    views = {k: ImagePolicy.of(v) for k, v in data_cfg.views.items()}
    if not main.adds_to_dataset and not views:
        return ds
    train_t, eval_t = ds.transform, ds.eval_transform
    if not isinstance(train_t, ImageTransform) or not isinstance(eval_t, ImageTransform):
        raise ValueError(
            f"dataset {data_cfg.name!r} builds its own transforms, so augmentation policies "
            "(auto_augment, re_prob, views) cannot be inserted: build them with "
            "topkd.data.make_transforms (docs/data.md, 'Registering your own dataset')")
    size = min(ds.info.hw)  # timm's create_transform: the shorter side of non-square images

    def build(p: ImagePolicy) -> Transform:
        return policy_transform(train_t if p.augment else eval_t, p, size)

    t = build(main)
    if views:
        t = MultiView(t, {k: build(p) for k, p in views.items()})
    return ds.with_transform(t)


# --------------------------------------------------------------------------------------------
# Per-batch: Mixup / CutMix / label smoothing
# --------------------------------------------------------------------------------------------
def mixes_batches(d: Any) -> bool:
    """Whether ``data`` mixes images across a batch (Mixup or CutMix)."""
    return d.mixup_alpha > 0 or d.cutmix_alpha > 0


class BatchMix:
    """``x, y = mix(x, y)``: timm ``Mixup`` (Mixup/CutMix + label smoothing), or label smoothing
    alone (timm ``mixup_target`` with ``lam=1``). ``x`` is mixed in place, as timm does; ``y``
    ``(B,)`` int becomes ``(B, C)`` float probabilities."""

    def __init__(self, num_classes: int, *, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                 cutmix_minmax: tuple[float, float] | None = None, prob: float = 1.0,
                 switch_prob: float = 0.5, mode: str = "batch",
                 label_smoothing: float = 0.0) -> None:
        from timm.data import Mixup

        self.num_classes, self.label_smoothing = num_classes, label_smoothing
        self.mixup = None
        if mixup_alpha > 0 or cutmix_alpha > 0:
            self.mixup = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha,
                               cutmix_minmax=cutmix_minmax, prob=prob, switch_prob=switch_prob,
                               mode=mode, label_smoothing=label_smoothing,
                               num_classes=num_classes)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mixup is not None:
            if len(x) % 2:
                raise ValueError(f"Mixup/CutMix pair images within a batch: got an odd batch of "
                                 f"{len(x)}")
            return self.mixup(x, y)
        from timm.data.mixup import mixup_target

        return x, mixup_target(y, self.num_classes, 1.0, self.label_smoothing)


def build_batch_mix(d: Any, num_classes: int) -> BatchMix | None:
    """The :class:`BatchMix` of a data config, or ``None`` when it neither mixes nor smooths."""
    if not mixes_batches(d) and d.label_smoothing == 0:
        return None
    return BatchMix(num_classes, mixup_alpha=d.mixup_alpha, cutmix_alpha=d.cutmix_alpha,
                    cutmix_minmax=d.cutmix_minmax, prob=d.mixup_prob,
                    switch_prob=d.mixup_switch_prob, mode=d.mixup_mode,
                    label_smoothing=d.label_smoothing)


# --------------------------------------------------------------------------------------------
# Validation of the config keys
# --------------------------------------------------------------------------------------------
_AA_FORMS = ("a timm policy string (rand-m9-mstd0.5-inc1, rand-m9-n2-mstd0.5, original, "
             "originalr, v0, 3a, augmix-m5-w4-d2, ...)")


def _bad(key: str, value: Any, what: str) -> ValueError:
    return ValueError(f"invalid value for {key!r}: {value!r}; expected {what}")


def _no_effect(key: str, value: Any, why: str) -> ValueError:
    return ValueError(f"{key}={value!r} has no effect: {why}")


def _check_auto_augment(name: str, key: str) -> None:
    if name in OWN_POLICIES:
        return
    try:
        auto_augment_transform(name, image_size=32, mean=(0.5, 0.5, 0.5))
    except (AssertionError, KeyError, ValueError, IndexError, TypeError) as e:
        detail = f" ({e})" if str(e) else ""
        raise _bad(key, name, f"{_AA_FORMS} or one of {', '.join(OWN_POLICIES)}{detail}") from None


def _check_policy(p: ImagePolicy, prefix: str) -> None:
    d = ImagePolicy()
    if p.auto_augment is not None:
        _check_auto_augment(p.auto_augment, f"{prefix}auto_augment")
    if p.aa_interpolation != d.aa_interpolation and (
            p.auto_augment is None or p.auto_augment in OWN_POLICIES):
        why = ("no auto_augment is set" if p.auto_augment is None else
               f"{p.auto_augment!r} uses PIL's nearest resampling, as its reference")
        raise _no_effect(f"{prefix}aa_interpolation", p.aa_interpolation, why)
    if not 0.0 <= p.re_prob <= 1.0:
        raise _bad(f"{prefix}re_prob", p.re_prob, "a float in [0, 1]")
    if p.re_count < 1:
        raise _bad(f"{prefix}re_count", p.re_count, "an integer >= 1")
    if p.re_prob == 0:
        for k in ("re_mode", "re_count"):
            if getattr(p, k) != getattr(d, k):
                raise _no_effect(f"{prefix}{k}", getattr(p, k),
                                 f"random erasing is off ({prefix}re_prob is 0)")


def check_config(d: Any, prefix: str = "data.") -> None:
    """Check the augmentation keys of a ``DataConfig``; ``ValueError`` naming the key."""
    _check_policy(ImagePolicy.of(d), prefix)
    for name, v in d.views.items():
        if not name.isidentifier() or name == MAIN:
            raise _bad(f"{prefix}views", name, f"view names that are Python identifiers other "
                       f"than {MAIN!r}")
        _check_policy(ImagePolicy.of(v), f"{prefix}views.{name}.")
    for k in ("mixup_alpha", "cutmix_alpha"):
        if getattr(d, k) < 0:
            raise _bad(prefix + k, getattr(d, k), "a float >= 0 (0 = off)")
    if not 0.0 <= d.label_smoothing < 1.0:
        raise _bad(prefix + "label_smoothing", d.label_smoothing, "a float in [0, 1)")
    mm = d.cutmix_minmax
    if mm is not None:
        if not 0.0 <= mm[0] < mm[1] <= 1.0:
            raise _bad(prefix + "cutmix_minmax", list(mm), "[min, max] with 0 <= min < max <= 1")
        if d.cutmix_alpha != 1.0:
            raise _bad(prefix + "cutmix_alpha", d.cutmix_alpha,
                       "1.0 with cutmix_minmax (timm then draws the box size in cutmix_minmax "
                       "and ignores the Beta(cutmix_alpha) draw)")
    mixing = mixes_batches(d)
    if not mixing:
        for k, default in (("mixup_prob", 1.0), ("mixup_switch_prob", 0.5),
                           ("mixup_mode", "batch")):
            if getattr(d, k) != default:
                raise _no_effect(prefix + k, getattr(d, k),
                                 f"Mixup and CutMix are off ({prefix}mixup_alpha and "
                                 f"{prefix}cutmix_alpha are 0)")
        return
    if not 0.0 < d.mixup_prob <= 1.0:
        raise _bad(prefix + "mixup_prob", d.mixup_prob, "a float in (0, 1] (0: set the alphas "
                   "to 0 instead)")
    if d.mixup_alpha > 0 and d.cutmix_alpha > 0:
        if not 0.0 < d.mixup_switch_prob < 1.0:
            raise _bad(prefix + "mixup_switch_prob", d.mixup_switch_prob,
                       "a float in (0, 1) with both Mixup and CutMix on (0 or 1 would never use "
                       "one of them: set its alpha to 0 instead)")
    elif d.mixup_switch_prob != 0.5:
        raise _no_effect(prefix + "mixup_switch_prob", d.mixup_switch_prob,
                         "it chooses between Mixup and CutMix, but only one of them is on")
    if d.views:
        raise ValueError(f"{prefix}views with Mixup/CutMix: the extra views would need the same "
                         "mixing as the main view, which timm's Mixup does not provide; turn "
                         f"{prefix}mixup_alpha/cutmix_alpha off or drop the views")
