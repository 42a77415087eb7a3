"""Throughput of the engine's distillation step on synthetic data (no dataset needed).

    python -m topkd.engine.bench --teacher resnet32x4 --student resnet8x4 --batch 64 --steps 5
    python -m topkd.engine.bench --device cuda --compare-amp --steps 50 --warmup 10
    python -m topkd.engine.bench --amp none --channels-last off --compile off   # all off

Runs the engine's own :class:`~topkd.engine.step.TrainStep` (teacher forward under
inference_mode, student forward/backward, the method's loss, SGD step) with random-weight models
on random 32x32 images, so it measures compute only (no data loading, no evaluation). The speed
switches default to ``auto``, the engine's defaults (:mod:`topkd.engine.speed`); the output
names what they resolved to. Reports images/s after warm-up and the first step's time (which
holds any compilation) apart.
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
                    device: str = "auto", amp: str = "auto", channels_last: bool | str = "auto",
                    compile: bool | str = "auto", cached: bool = False, in_channels: int = 3,
                    seed: int = 0) -> dict[str, Any]:
    """images/s of the engine's step after ``warmup`` steps (the first one, which holds any
    compilation, is reported apart as ``first_step_s``). ``cached``: the teacher's logits are
    precomputed (float16, as the teacher-logit cache stores them) and passed as ``cached``."""
    torch.manual_seed(seed)
    step = build_step(teacher, student, loss, num_classes, device, amp, channels_last, compile)
    dev, cuda = step.device, step.device.type == "cuda"
    x = torch.randn(batch, in_channels, size, size, device=dev)
    y = torch.randint(0, num_classes, (batch,), device=dev)
    t = None
    if cached:
        assert step.teacher is not None, f"method {loss!r} has no teacher"
        with torch.inference_mode(), step.autocast():
            t = step.teacher(x.contiguous(memory_format=torch.channels_last)
                             if step.channels_last else x).half()
        step.teacher = step._teacher_run = None  # as with train.teacher_cache: no teacher
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    step(x, y, epoch=1, cached=t)
    sync()
    first = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        step(x, y, epoch=1, cached=t)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        out, _ = step(x, y, epoch=1, cached=t)
    sync()
    dt = time.perf_counter() - t0
    return {"teacher": teacher, "student": student, "loss": loss, "batch": batch,
            "steps": steps, "device": str(dev), "cached": cached,
            "amp": str(step.amp_dtype).replace("torch.", "") if step.amp_dtype else "none",
            "channels_last": step.channels_last,
            "compiled": [c.name for c in step.compiled if c.is_compiled],
            "threads": torch.get_num_threads(), "first_step_s": first,
            "s_per_step": dt / steps, "images_per_s": batch * steps / dt,
            "loss_value": float(out.total.detach())}


def _switch(v: str) -> bool | str:
    return {"on": True, "off": False}.get(v, v)


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
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--size", type=int, default=32, help="image side")
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto", choices=["auto", "none", "bf16", "fp16"])
    p.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--cached", action="store_true",
                   help="teacher logits precomputed (as with train.teacher_cache)")
    p.add_argument("--compare-amp", action="store_true",
                   help="run --amp none and --amp bf16 (other switches as given) and print the "
                        "bf16/fp32 images/s ratio")
    a = p.parse_args(argv)
    kw = dict(loss=a.loss, batch=a.batch, steps=a.steps, warmup=a.warmup,
              num_classes=a.num_classes, size=a.size, device=a.device,
              channels_last=_switch(a.channels_last), compile=_switch(a.compile),
              cached=a.cached, in_channels=a.in_channels)
    with contextlib.suppress(KeyboardInterrupt):
        if a.compare_amp:
            r = {amp: step_throughput(a.teacher, a.student, amp=amp, **kw)
                 for amp in ("none", "bf16")}
            for v in r.values():
                print(json.dumps(v))
            print(json.dumps({"bf16_over_fp32": r["bf16"]["images_per_s"]
                              / r["none"]["images_per_s"]}))
        else:
            print(json.dumps(step_throughput(a.teacher, a.student, amp=a.amp, **kw)))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
