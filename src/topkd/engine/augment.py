"""The engine's side of the augmentation policies (:mod:`topkd.data.augment`).

* :func:`check_augmentation`: combinations of data policies, method and run that cannot be right
  are :class:`~topkd.config.ConfigError` s with the reason (views the method does not use or
  that are missing, the teacher-logit cache with policies it cannot replay, odd Mixup batches,
  label smoothing or ``ignore_index`` without an effect).
* :func:`unpack_images`: a batch's images -> the main view and the extra views, on the device.

How a method gets extra views: it declares ``extra_views = ("strong",)``; the config defines
each under ``data.views.<name>`` (e.g. ``data.views.strong.auto_augment=mlkd``); the loader then
yields ``({"main": x, "strong": x_s}, y)``, the trainer passes ``views={"strong": x_s}`` to the
:class:`~topkd.engine.step.TrainStep`, which runs the student and the teacher on every view and
hands the method ``batch.views["strong"] = (student_out, teacher_out)``.
"""

from __future__ import annotations

from typing import Any

import torch

from topkd.config import Config, ConfigError
from topkd.data.augment import MAIN, ImagePolicy, mixes_batches

__all__ = ["check_augmentation", "unpack_images"]


def check_augmentation(cfg: Config, method_cls: Any, *, uses_cache: bool, world_size: int = 1,
                       image_size: int | None = None) -> None:
    """Refuse what cannot be right for this run (see the module docstring); ``image_size`` (of
    the training images) checks that ``data.cutmix_minmax`` gives CutMix boxes."""
    d, name = cfg.data, method_cls.name
    needed, defined = tuple(method_cls.extra_views), tuple(d.views)
    missing = [v for v in needed if v not in defined]
    if missing:
        ex = missing[0]
        raise ConfigError(
            f"method {name!r} trains on the extra view(s) {', '.join(map(repr, missing))} of each "
            f"image, which data.views does not define: add e.g. "
            f"data.views.{ex}.auto_augment=mlkd (the strong augmentation of MLKD's reference "
            "code) or another policy (docs/data.md, 'Extra views')")
    unused = [v for v in defined if v not in needed]
    if unused:
        uses = ", ".join(map(repr, needed)) or "none"
        raise ConfigError(f"data.views.{unused[0]}: method {name!r} does not use an extra view "
                          f"{unused[0]!r} (its extra views: {uses}); remove it")
    mixing = mixes_batches(d)
    main = ImagePolicy.of(d)
    if uses_cache:
        keys = [k for k, on in (("data.auto_augment", main.auto_augment is not None),
                                ("data.re_prob", main.re_prob > 0),
                                ("data.mixup_alpha", d.mixup_alpha > 0),
                                ("data.cutmix_alpha", d.cutmix_alpha > 0)) if on]
        if keys:
            raise ConfigError(
                f"train.teacher_cache with {', '.join(keys)}: the cache holds the teacher's "
                "logits of its own crop/flip views of unmixed images, so the student would be "
                "distilled on other images than the teacher saw; remove train.teacher_cache to "
                "run the teacher online (it then sees the same augmented and mixed images)")
    if mixing:
        per_rank = d.batch_size // max(world_size, 1)
        if per_rank % 2:
            raise ConfigError(
                f"data.batch_size={d.batch_size} gives {per_rank} images per rank: Mixup/CutMix "
                "pair the images of a batch (timm), so it must be even per rank")
        mm = d.cutmix_minmax
        if mm is not None and image_size and int(image_size * mm[0]) >= int(image_size * mm[1]):
            raise ConfigError(
                f"data.cutmix_minmax={list(mm)} gives no CutMix box on {image_size}-pixel images "
                "(timm draws the sides in [int(size * min), int(size * max)))")
    probs = mixing or d.label_smoothing > 0
    method = cfg.method
    if d.label_smoothing > 0 and getattr(method, "ce", 1.0) == 0:
        raise ConfigError(
            f"data.label_smoothing={d.label_smoothing} has no effect: method.ce is 0, and the "
            "distillation terms use only the labels' argmax")
    if probs and getattr(method, "ignore_index", None) is not None:
        raise ConfigError(
            f"method.ignore_index={method.ignore_index} has no effect: with Mixup/CutMix or "
            "label smoothing the labels are probabilities, which have no ignored value")


def unpack_images(images: Any, device: torch.device
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """``x`` or ``{"main": x, name: x_v}`` (a multi-view batch) -> ``(x, views or None)``."""
    if isinstance(images, dict):
        views = {k: v.to(device, non_blocking=True) for k, v in images.items() if k != MAIN}
        return images[MAIN].to(device, non_blocking=True), views
    return images.to(device, non_blocking=True), None
