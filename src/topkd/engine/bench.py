"""Throughput of the engine's distillation step on synthetic data (no dataset needed).

    python -m topkd.engine.bench --teacher resnet32x4 --student resnet8x4 --batch 64 --steps 5
    python -m topkd.engine.bench --device cuda --amp bf16 --channels-last --compile

Runs :meth:`Trainer._step` itself (teacher forward under inference_mode, student
forward/backward, criterion, SGD step) with random-weight models on random 32x32 images, so
it measures compute only (no data loading, no evaluation). Reports images/s after warm-up.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from types import SimpleNamespace
from typing import Any

import torch

from topkd.config import Config
from topkd.engine.optim import build_optimizer
from topkd.engine.trainer import Trainer
from topkd.losses import DistillationLoss
from topkd.models import create_model
from topkd.utils.dist import resolve_device


def build_step_trainer(teacher: str, student: str, loss: str = "kd", num_classes: int = 100,
                       device: str = "auto", amp: str = "none", channels_last: bool = False,
                       compile: bool = False) -> Trainer:
    """A :class:`Trainer` holding only what :meth:`Trainer._step` needs (no data, no run dir).

    Built from a real :class:`Config` (``loss.preset=loss``, default optimiser); the teacher
    has random weights (they do not change the cost) and is dropped for losses without a
    distillation term (e.g. ``"ce"``: the student alone, as ``topkd train``).
    """
    dev = resolve_device(device)
    cfg = Config.from_dict({"train": {"amp": amp, "channels_last": channels_last,
                                      "compile": compile}, "loss": {"preset": loss}})
    mf = torch.channels_last if channels_last else torch.preserve_format
    s = create_model(student, num_classes).to(dev, memory_format=mf)
    t: torch.nn.Module | None = create_model(teacher, num_classes).to(dev, memory_format=mf)
    t.eval().requires_grad_(False)
    if not cfg.loss.has_distillation:
        t = None
    tr = Trainer.__new__(Trainer)
    cuda = dev.type == "cuda"
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp) if cuda else None
    tr.__dict__.update(
        cfg=cfg, device=dev, model=s, teacher=torch.compile(t) if compile and t else t,
        train_model=torch.compile(s) if compile else s,
        criterion=DistillationLoss(cfg.loss, validate=False).to(dev),  # as Trainer
        optimizer=build_optimizer(cfg.optim, s.parameters()), amp_dtype=amp_dtype,
        scaler=torch.amp.GradScaler(dev.type, enabled=amp_dtype is torch.float16),
        dist=SimpleNamespace(rank=0, world_size=1, distributed=False, is_main=True))
    return tr


def step_throughput(teacher: str, student: str, loss: str = "kd", batch: int = 64,
                    steps: int = 5, warmup: int = 2, num_classes: int = 100, size: int = 32,
                    device: str = "auto", amp: str = "none", channels_last: bool = False,
                    compile: bool = False, seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    tr = build_step_trainer(teacher, student, loss, num_classes, device, amp, channels_last,
                            compile)
    dev, cuda = tr.device, tr.device.type == "cuda"
    x = torch.randn(batch, 3, size, size, device=dev)
    y = torch.randint(0, num_classes, (batch,), device=dev)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(warmup):
        tr._step(x, y, None, epoch=1)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        total, _, _ = tr._step(x, y, None, epoch=1)
    sync()
    dt = time.perf_counter() - t0
    return {"teacher": teacher, "student": student, "loss": loss, "batch": batch,
            "steps": steps, "device": str(dev), "amp": amp, "channels_last": channels_last,
            "compile": compile, "threads": torch.get_num_threads(),
            "s_per_step": dt / steps, "images_per_s": batch * steps / dt,
            "loss_value": float(total.detach())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m topkd.engine.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="resnet32x4")
    p.add_argument("--student", default="resnet8x4")
    p.add_argument("--loss", default="kd", help="LossSpec preset (kd, dkd, topkd, ...)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    a = p.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        r = step_throughput(a.teacher, a.student, a.loss, a.batch, a.steps, a.warmup,
                            device=a.device, amp=a.amp, channels_last=a.channels_last,
                            compile=a.compile)
        print(json.dumps(r))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
