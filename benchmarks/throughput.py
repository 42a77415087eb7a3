"""Distillation-step throughput: the topkd engine's step vs a minimal plain-PyTorch KD loop.

"ours" is the engine's own training step, :class:`topkd.engine.step.TrainStep`, built from a
real :class:`topkd.config.Config` (``method.name`` kd / topkd with their reference defaults,
default SGD optimiser) by :func:`topkd.engine.bench.build_step`, as the trainer builds it.
The reference is the loop public KD code writes: ``with torch.no_grad(): t = T(x)``, student
forward, ``0.1*CE + 0.9*T^2*KL`` with ``F.kl_div`` on temperature-scaled log-softmaxes,
backward, SGD step (same lr/momentum/weight decay as the engine's default).
Rows (images/s of one training step):

* ``plain KD (online)``        the reference, teacher forward every step (ratio 1.00);
* ``topkd KD/TopKD (online)``  ``step(x, y, epoch=epoch)``;
* ``... (cache)``              teacher logits from a :mod:`topkd.cache` teacher-logit cache,
                               passed as the step's ``cached`` argument as the engine does with
                               ``train.teacher_cache`` (the plain loop uses them instead of
                               ``T(x)``); the timed loop pays the cache lookup + pixel-exact
                               replay of the cached view (``CachedLogitDataset.batch``).

Pair ``fmnist``: ``fmnist_cnn_teacher`` -> ``fmnist_cnn_student`` on real Fashion-MNIST batches.
``--cifar`` adds resnet32x4 -> resnet8x4 (100 classes) on synthetic 32x32 batches, its "cache"
being teacher logits precomputed in float16 (the cache's default storage), no lookup cost.
Every loop sees the same batches; rounds are interleaved (round 0 is warm-up) and the median
per loop is reported, as wall-clock AND process CPU time (with one thread the CPU time is what
an idle core would show; the shared benchmark box is often oversubscribed). ``--epoch`` also
times one full epoch of the in-memory loop of ``_fmnist_loop.py`` (the Fashion-MNIST
benchmark's) online vs cached.

    python benchmarks/throughput.py [--threads 1] [--batch-size 128] [--steps 20] [--rounds 5]
        [--cifar [--cifar-steps 3 --cifar-rounds 2]] [--epoch] [--json out.json]
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
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from _fmnist_loop import METHODS, load_data, train_student
from topkd.cache import ReplayableCropFlip, build_cache, wrap_dataset
from topkd.engine.bench import build_step
from topkd.models import create_model

REF = "plain KD (online)"
Step = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], Any]
Batch = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]


def plain_kd_step(student: nn.Module, teacher: nn.Module, opt: torch.optim.Optimizer,
                  x: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None, T: float = 4.0
                  ) -> None:
    """Reference step of public KD code (mdistiller-style weights: 0.1 CE + 0.9 KD, T^2)."""
    if t is None:
        with torch.no_grad():
            t = teacher(x)
    t = t.float()  # the cache stores float16
    s = student(x)
    kd = F.kl_div(F.log_softmax(s / T, 1), F.log_softmax(t / T, 1), reduction="none",
                  log_target=True).sum(1).mean() * T * T
    loss = 0.1 * F.cross_entropy(s, y) + 0.9 * kd
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def make_loops(teacher_name: str, student_name: str, num_classes: int
               ) -> tuple[dict[str, tuple[Step, bool]], nn.Module]:
    """name -> (step(x, y, cached_or_None), uses_cache), and the shared teacher."""
    loops: dict[str, tuple[Step, bool]] = {}
    ref = build_step(teacher_name, student_name, "kd", num_classes, device="cpu")
    teacher = ref.teacher
    o = ref.optimizer.param_groups[0]  # the engine's default SGD settings
    assert teacher is not None
    plain: dict[bool, Step] = {}
    engine: dict[tuple[str, bool], Step] = {}
    for use_cache in (False, True):
        student = create_model(student_name, num_classes).train()
        opt = torch.optim.SGD(student.parameters(), lr=o["lr"], momentum=o["momentum"],
                              weight_decay=o["weight_decay"])
        plain[use_cache] = (lambda x, y, t, s=student, op=opt:
                            plain_kd_step(s, teacher, op, x, y, t))
        for loss in ("kd", "topkd"):
            st = build_step(teacher_name, student_name, loss, num_classes, device="cpu",
                            teacher_model=teacher)  # one teacher for every loop
            ep = st.method.params.warmup + 1  # past the warm-up: every term at full weight
            engine[loss, use_cache] = (lambda x, y, t, st=st, ep=ep: st(x, y, epoch=ep, cached=t))
    for use_cache, tag in ((False, "online"), (True, "cache")):
        loops[f"plain KD ({tag})"] = (plain[use_cache], use_cache)
        loops[f"topkd KD ({tag})"] = (engine["kd", use_cache], use_cache)
        loops[f"topkd TopKD ({tag})"] = (engine["topkd", use_cache], use_cache)
    return loops, teacher


def time_loops(loops: dict[str, tuple[Step, bool]], get_batch: Callable[[int, bool], Batch],
               steps: int, rounds: int, batch_size: int) -> dict[str, dict[str, float]]:
    """Median images/s per loop over ``rounds`` interleaved rounds (after one warm-up round)."""
    wall: dict[str, list[float]] = {k: [] for k in loops}
    cpu: dict[str, list[float]] = {k: [] for k in loops}
    for r in range(rounds + 1):  # round 0 = warm-up
        for name, (fn, use_cache) in loops.items():
            w0, c0 = time.perf_counter(), time.process_time()
            for i in range(steps):
                x, y, t = get_batch(i, use_cache)
                fn(x, y, t)
            if r:
                wall[name].append(steps * batch_size / (time.perf_counter() - w0))
                cpu[name].append(steps * batch_size / max(time.process_time() - c0, 1e-9))
    res = {k: {"wall_img_s": statistics.median(wall[k]), "cpu_img_s": statistics.median(cpu[k])}
           for k in loops}
    ref = res[REF]
    for v in res.values():
        v["ratio_cpu"] = v["cpu_img_s"] / ref["cpu_img_s"]
        v["ratio_wall"] = v["wall_img_s"] / ref["wall_img_s"]
    return res


def print_table(title: str, res: dict[str, dict[str, float]]) -> None:
    print(f"\n{title}")
    print("| loop | img/s (wall) | img/s (CPU time) | vs plain KD online (CPU) | (wall) |")
    print("| --- | --- | --- | --- | --- |")
    for k, v in res.items():
        print(f"| {k} | {v['wall_img_s']:.0f} | {v['cpu_img_s']:.0f} | "
              f"{v['ratio_cpu']:.2f}x | {v['ratio_wall']:.2f}x |")


def benchmark(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the comparison; returns ``{"step": {pair: {loop: figures}}, ...}``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="steps per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--cifar", action="store_true", help="also resnet32x4 -> resnet8x4")
    p.add_argument("--cifar-batch-size", type=int, default=64)
    p.add_argument("--cifar-steps", type=int, default=3)
    p.add_argument("--cifar-rounds", type=int, default=2)
    p.add_argument("--epoch", action="store_true",
                   help="also time one epoch of the in-memory benchmark loop per mode")
    p.add_argument("--epoch-subset", type=int, default=20000)
    p.add_argument("--data-root", default=None)
    p.add_argument("--json", default=None, help="write the figures here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    bs, steps = a.batch_size, a.steps
    data = load_data(a.data_root, 0.1, subset=bs * steps, teacher_subset=bs * steps,
                     test_subset=1000)
    loops, teacher = make_loops("fmnist_cnn_teacher", "fmnist_cnn_student", 10)
    tmp = Path(tempfile.mkdtemp(prefix="topkd-tp-"))
    from torch.utils.data import Subset

    fit = Subset(data.train, data.fit_idx.tolist())
    build_cache(teacher, fit, tmp / "c", views=4, progress=False,
                augment=ReplayableCropFlip(padding=2), dataset_name="fashion_mnist",
                mean=data.mean, std=data.std)
    cached = wrap_dataset(fit, tmp / "c")
    cached.set_epoch(1)
    batches = list(cached.iter_batches(bs, shuffle=False))  # (x, y, t) — identical for all

    def fmnist_batch(i: int, use_cache: bool) -> Batch:
        if use_cache:  # the cache path pays for the lookup + replay, as in training
            return cached.batch(np.arange(i * bs, (i + 1) * bs))
        x, y, _ = batches[i]
        return x, y, None

    step_res = {"fmnist": time_loops(loops, fmnist_batch, steps, a.rounds, bs)}
    print(f"threads={a.threads} batch={bs} steps/round={steps} rounds={a.rounds}")
    print_table("fmnist_cnn_teacher -> fmnist_cnn_student (Fashion-MNIST batches)",
                step_res["fmnist"])
    if a.cifar:
        cb, cs = a.cifar_batch_size, a.cifar_steps
        cloops, cteacher = make_loops("resnet32x4", "resnet8x4", 100)
        g = torch.Generator().manual_seed(0)
        cbatches = [(torch.randn(cb, 3, 32, 32, generator=g),
                     torch.randint(0, 100, (cb,), generator=g)) for _ in range(cs)]
        with torch.no_grad():
            clogits = [cteacher(x).half() for x, _ in cbatches]

        def cifar_batch(i: int, use_cache: bool) -> Batch:
            x, y = cbatches[i]
            return x, y, clogits[i] if use_cache else None

        step_res["cifar"] = time_loops(cloops, cifar_batch, cs, a.cifar_rounds, cb)
        print(f"\nbatch={cb} steps/round={cs} rounds={a.cifar_rounds}")
        print_table("resnet32x4 -> resnet8x4 (synthetic 32x32 batches, 100 classes)",
                    step_res["cifar"])
    out: dict[str, Any] = {"step": step_res, "threads": a.threads, "batch_size": bs}
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
    return out


def main(argv: list[str] | None = None) -> int:
    benchmark(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
