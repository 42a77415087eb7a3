"""Distillation-step throughput: topkd vs a minimal plain-PyTorch KD loop, online vs cached teacher.

Same model pair (``fmnist_cnn_teacher`` -> ``fmnist_cnn_student``), same batches, same optimiser.
Loops timed (images/s of one training step: [teacher forward], student forward, loss, backward,
SGD step):

* ``plain KD (online)``      the way public KD code does it: ``with torch.no_grad(): t = T(x)``,
                             ``F.kl_div`` on temperature-scaled log-softmaxes inline;
* ``topkd KD (online)``      the same with :class:`topkd.losses.DistillationLoss` (KD spec);
* ``topkd TopKD (online)``   DistillationLoss with the TopKD spec (TSM + TDL + contrastive);
* ``... (cache)``            teacher logits read from a :mod:`topkd.cache` teacher-logit cache
                             (including the pixel-exact replay of the cached view), no forward.

Rounds are interleaved and the median per loop is reported, as wall-clock AND process CPU time
(with one thread the CPU time is what an idle machine would show; the shared benchmark machine is
often oversubscribed). ``--epoch`` also times one full epoch of the in-memory loop of
``_fmnist_loop.py`` (the Fashion-MNIST benchmark's, formerly the demo's) online vs cached.

    python benchmarks/throughput.py [--threads 1] [--batch-size 128] [--steps 20] [--epoch]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from _fmnist_loop import METHODS, load_data, make_criterion, train_student
from topkd.cache import ReplayableCropFlip, build_cache, wrap_dataset
from topkd.models import create_model


def plain_kd_step(student: nn.Module, teacher: nn.Module, opt: torch.optim.Optimizer,
                  x: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None, T: float = 4.0
                  ) -> None:
    """Reference step of public KD code (mdistiller-style weights: 0.1 CE + 0.9 KD, T^2)."""
    if t is None:
        with torch.no_grad():
            t = teacher(x)
    s = student(x)
    kd = F.kl_div(F.log_softmax(s / T, 1), F.log_softmax(t / T, 1), reduction="none",
                  log_target=True).sum(1).mean() * T * T
    loss = 0.1 * F.cross_entropy(s, y) + 0.9 * kd
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def topkd_step(crit: nn.Module) -> Callable[..., None]:
    def step(student: nn.Module, teacher: nn.Module, opt: torch.optim.Optimizer,
             x: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None) -> None:
        if t is None:
            with torch.no_grad():
                t = teacher(x)
        loss, _ = crit(student(x), t, y, epoch=10)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="steps per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--epoch", action="store_true", help="also time one loop epoch per mode")
    p.add_argument("--epoch-subset", type=int, default=20000)
    p.add_argument("--data-root", default=None)
    p.add_argument("--json", default=None, help="write the figures here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    bs, steps = a.batch_size, a.steps
    data = load_data(a.data_root, 0.1, subset=bs * steps, teacher_subset=bs * steps,
                     test_subset=1000)
    teacher = create_model("fmnist_cnn_teacher", 10).eval()  # weights don't change the cost
    tmp = Path(tempfile.mkdtemp(prefix="topkd-tp-"))
    from torch.utils.data import Subset

    fit = Subset(data.train, data.fit_idx.tolist())
    build_cache(teacher, fit, tmp / "c", views=4, progress=False,
                augment=ReplayableCropFlip(padding=2), dataset_name="fashion_mnist",
                mean=data.mean, std=data.std)
    cached = wrap_dataset(fit, tmp / "c")
    cached.set_epoch(1)
    batches = list(cached.iter_batches(bs, shuffle=False))  # (x, y, t) — identical for all

    loops: dict[str, tuple[Callable[..., None], bool]] = {
        "plain KD (online)": (plain_kd_step, False),
        "topkd KD (online)": (topkd_step(make_criterion(METHODS["kd"])), False),
        "topkd TopKD (online)": (topkd_step(make_criterion(METHODS["topkd"])), False),
        "plain KD (cache)": (plain_kd_step, True),
        "topkd KD (cache)": (topkd_step(make_criterion(METHODS["kd"])), True),
        "topkd TopKD (cache)": (topkd_step(make_criterion(METHODS["topkd"])), True),
    }
    wall: dict[str, list[float]] = {k: [] for k in loops}
    cpu: dict[str, list[float]] = {k: [] for k in loops}
    for r in range(a.rounds + 1):  # round 0 = warm-up
        for name, (fn, use_cache) in loops.items():
            student = create_model("fmnist_cnn_student", 10).train()
            opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
            w0, c0 = time.perf_counter(), time.process_time()
            for i in range(steps):
                if use_cache:  # the cache path pays for the lookup + replay, as in training
                    x, y, t = cached.batch(np.arange(i * bs, (i + 1) * bs))
                else:
                    x, y, _ = batches[i]
                    t = None
                fn(student, teacher, opt, x, y, t)
            if r:
                wall[name].append(steps * bs / (time.perf_counter() - w0))
                cpu[name].append(steps * bs / (time.process_time() - c0))
    res = {k: {"wall_img_s": statistics.median(wall[k]), "cpu_img_s": statistics.median(cpu[k])}
           for k in loops}
    ref = res["plain KD (online)"]
    print(f"threads={a.threads} batch={bs} steps/round={steps} rounds={a.rounds}")
    print("| loop | img/s (wall) | img/s (CPU time) | vs plain KD online (CPU) |")
    print("| --- | --- | --- | --- |")
    for k, v in res.items():
        print(f"| {k} | {v['wall_img_s']:.0f} | {v['cpu_img_s']:.0f} | "
              f"{v['cpu_img_s'] / ref['cpu_img_s']:.2f}x |")
    out: dict[str, object] = {"step": res, "threads": a.threads, "batch_size": bs}
    if a.epoch:
        ed = load_data(a.data_root, 0.1, subset=a.epoch_subset, teacher_subset=1000,
                       test_subset=1000)
        efit = Subset(ed.train, ed.fit_idx.tolist())
        build_cache(teacher, efit, tmp / "e", views=4, progress=False,
                    augment=ReplayableCropFlip(padding=2), dataset_name="fashion_mnist",
                    mean=ed.mean, std=ed.std)
        ecached = wrap_dataset(efit, tmp / "e")
        ep: dict[str, dict[str, float]] = {}
        for name, kw in (("online", {"teacher": teacher}), ("cache", {"cached": ecached})):
            w0, c0 = time.perf_counter(), time.process_time()
            r = train_student(METHODS["kd"], ed, 1, 0, bs=bs, method="kd", **kw)
            ep[name] = {"train_wall_s": r.epoch_time_s,
                        "total_cpu_s": time.process_time() - c0,
                        "total_wall_s": time.perf_counter() - w0}
        print(f"\nOne KD epoch on {len(ed.fit_idx)} images (training part, wall): online "
              f"{ep['online']['train_wall_s']:.1f} s, cache {ep['cache']['train_wall_s']:.1f} s"
              f" -> {ep['online']['train_wall_s'] / ep['cache']['train_wall_s']:.2f}x; CPU incl."
              f" eval: {ep['online']['total_cpu_s']:.1f} s vs {ep['cache']['total_cpu_s']:.1f} s")
        out["epoch"] = ep
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
