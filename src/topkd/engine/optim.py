"""Optimizers and the learning-rate schedule.

The schedule is a pure function of the (fractional) epoch, evaluated before every optimizer
step: nothing stateful to checkpoint, so a resumed run gets the exact same LRs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from topkd.config import OptimConfig, SchedConfig


def build_optimizer(cfg: OptimConfig, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    if cfg.name == "dot":  # the config resolved dot_delta / dot_kd_only_init_wd
        from topkd.engine.dot import DOT

        return DOT(params, lr=cfg.lr, momentum=cfg.momentum, delta=cfg.dot_delta,
                   weight_decay=cfg.weight_decay, kd_only_init_wd=cfg.dot_kd_only_init_wd)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas),
                                 weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.name!r}")  # pragma: no cover - config validates


class LRSchedule:
    """``lr(e)`` for a fractional 0-based epoch ``e = (epoch - 1) + step / steps_per_epoch``.

    * ``multistep``: ``lr * gamma ** #{m in milestones : m <= floor(e)}``. With 1-based epochs
      this is mdistiller's ``epoch > milestone`` rule: constant within an epoch, so the
      per-iteration evaluation equals per-epoch stepping.
    * ``cosine``: per-iteration half cosine from ``lr`` (after warm-up) to ``min_lr`` at the end.
    * ``constant``: ``lr``.
    * ``warmup_epochs > 0``: linear per-iteration ramp ``lr * (it + 1) / warmup_its`` first.
    """

    def __init__(self, cfg: SchedConfig, base_lr: float, epochs: int, steps_per_epoch: int):
        self.cfg, self.base_lr, self.epochs = cfg, base_lr, epochs
        self.steps = max(1, steps_per_epoch)

    def __call__(self, epoch_index: int, step: int) -> float:
        c = self.cfg
        e = epoch_index + step / self.steps
        warm_its = c.warmup_epochs * self.steps
        it = epoch_index * self.steps + step
        if it < warm_its:
            return self.base_lr * (it + 1) / warm_its
        if c.name == "multistep":
            return self.base_lr * c.gamma ** sum(1 for m in c.milestones if m <= epoch_index)
        if c.name == "cosine":
            span = max(self.epochs - c.warmup_epochs, 1e-12)
            frac = min(max((e - c.warmup_epochs) / span, 0.0), 1.0)
            return c.min_lr + (self.base_lr - c.min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))
        return self.base_lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
