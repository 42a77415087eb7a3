"""Throughput of the engine's distillation step on synthetic data (no dataset needed).

    python -m topkd.engine.bench --teacher resnet32x4 --student resnet8x4 --batch 64 --steps 5
    python -m topkd.engine.bench --device cuda --amp bf16 --channels-last --compile

Runs the engine's own :class:`~topkd.engine.step.TrainStep` (teacher forward under
inference_mode, student forward/backward, the method's loss, SGD step) with random-weight models
on random 32x32 images, so it measures compute only (no data loading, no evaluation). Reports
images/s after warm-up.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from typing import Any

import torch

from topkd.config import Config
from topkd.engine.step import TrainStep, build_train_step
from topkd.methods import create_method
from topkd.models import create_model
from topkd.utils.dist import resolve_device


def build_step(teacher: str, student: str, method: str = "kd", num_classes: int = 100,
               device: str = "auto", amp: str = "auto", channels_last: bool | str = "auto",
               compile: bool | str = "auto", teacher_model: torch.nn.Module | None = None
               ) -> TrainStep:
    """The engine's :class:`~topkd.engine.step.TrainStep` for a teacher/student pair.

    Built as the trainer builds it (:func:`~topkd.engine.step.build_train_step`) from a real
    :class:`Config` (``method.name=method`` with its reference defaults, default optimiser,
    ``train.amp/channels_last/compile`` as given: ``"auto"`` = the engine's defaults); the
    teacher has random weights (they do not change the cost) and is dropped for methods without
    a teacher (e.g. ``"ce"``: the student alone, as ``topkd train``). ``teacher_model`` reuses
    an existing teacher instead of creating one (converted to channels_last in place if the
    step uses it).
    """
    dev = resolve_device(device)
    cfg = Config.from_dict({"train": {"amp": amp, "channels_last": channels_last,
                                      "compile": compile}, "method": {"name": method}})
    s = create_model(student, num_classes).to(dev)
    m = create_method(cfg.method, num_classes=num_classes).to(dev)
    m.validate = False  # as the trainer
    t: torch.nn.Module | None = None
    if m.needs_teacher:
        t = teacher_model or create_model(teacher, num_classes).to(dev).eval()
        t.requires_grad_(False)
    return build_train_step(cfg, s, t, m, dev)


def step_throughput(teacher: str, student: str, loss: str = "kd", batch: int = 64,
                    steps: int = 5, warmup: int = 2, num_classes: int = 100, size: int = 32,
                    device: str = "auto", amp: str = "none", channels_last: bool = False,
                    compile: bool = False, seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    step = build_step(teacher, student, loss, num_classes, device, amp, channels_last, compile)
    dev, cuda = step.device, step.device.type == "cuda"
    x = torch.randn(batch, 3, size, size, device=dev)
    y = torch.randint(0, num_classes, (batch,), device=dev)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(warmup):
        step(x, y, epoch=1)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        out, _ = step(x, y, epoch=1)
    sync()
    dt = time.perf_counter() - t0
    return {"teacher": teacher, "student": student, "loss": loss, "batch": batch,
            "steps": steps, "device": str(dev), "amp": amp, "channels_last": channels_last,
            "compile": compile, "threads": torch.get_num_threads(),
            "s_per_step": dt / steps, "images_per_s": batch * steps / dt,
            "loss_value": float(out.total.detach())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m topkd.engine.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="resnet32x4")
    p.add_argument("--student", default="resnet8x4")
    p.add_argument("--loss", default="kd", help="method name with its reference defaults (kd, "
                   "dkd, topkd, ...; 'topkd methods')")
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
