"""Training throughput: the topkd engine with its defaults vs a plain eager PyTorch KD loop.

"topkd" rows run the engine's own training step, :class:`topkd.engine.step.TrainStep`, built
from a real :class:`topkd.config.Config` (``method.name`` kd / topkd with their reference
defaults, default SGD optimiser) by :func:`topkd.engine.bench.build_step`, as the trainer builds
it: "defaults" leaves ``train.amp / channels_last / compile`` at ``auto`` (what ``topkd
distill`` does on this device; on a CPU: channels_last for these convolutional models, fp32,
eager), "switches off" sets all three off (the engine's own overhead), "bf16" is the explicit
``train.amp=bf16`` (``--bf16``), "compiled" is the defaults plus ``train.compile=true``
(``--compile``: inductor on the CPU; its compilation is in the warm-up round, reported apart as
"warm-up s"). The reference is the loop public KD code writes: ``with
torch.no_grad(): t = T(x)``, student forward, ``0.1*CE + 0.9*T^2*KL`` with ``F.kl_div`` on
temperature-scaled log-softmaxes, backward, SGD step (same lr/momentum/weight decay).

Step tables (one training step on ready batches; ratio against ``plain KD (online)``):

* ``(online)``  teacher forward every step;
* ``(cache)``   teacher logits from a :mod:`topkd.cache` teacher-logit cache, passed as the
                step's ``cached`` argument as the engine does with ``train.teacher_cache`` (the
                plain loop uses them instead of ``T(x)``); on Fashion-MNIST the timed loop pays
                the cache lookup + pixel-exact replay (``CachedLogitDataset.batch``).

``--data``: whole iterations on Fashion-MNIST, data loading included: the plain loop reads a
``torch.utils.data.DataLoader`` over the dataset with its per-image transforms (crop + flip +
normalise; ``num_workers=0``, the engine's CPU recommendation), or over the cache's dataset; the
engine reads its own loader (``topkd.engine.data.train_loader``: the batched in-memory loader by
default) and runs its default step.

Pair ``fmnist``: ``fmnist_cnn_teacher`` -> ``fmnist_cnn_student`` on real Fashion-MNIST batches.
``--cifar`` adds resnet32x4 -> resnet8x4 (100 classes) on synthetic 32x32 batches, its "cache"
being teacher logits precomputed in float16 (the cache's default storage), no lookup cost.
Every loop sees the same batches; rounds are interleaved (round 0 is warm-up, which also holds
any compilation) and the median per loop is reported, as wall-clock AND process CPU time (with
one thread the CPU time is what an idle core would show; the shared benchmark box is often
oversubscribed). ``--epoch`` also times one whole engine epoch (:class:`topkd.engine.Trainer`
on ``configs/fashion_mnist/teacher_student/kd.yaml``: its loader, steps, evaluation) with the
teacher online vs a teacher-logit cache.

    python benchmarks/throughput.py [--threads 1] [--batch-size 128] [--steps 20] [--rounds 5]
        [--data] [--bf16] [--compile] [--cifar [--cifar-steps 3 --cifar-rounds 2]] [--epoch]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
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

from topkd.cache import build_cache, wrap_dataset
from topkd.engine.bench import build_step
from topkd.models import create_model

ROOT = Path(__file__).resolve().parents[1]

REF = "plain KD (online)"
DATA_REF = "plain KD + DataLoader (online)"
Step = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], Any]
Iteration = Callable[[int], Any]
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


#: Engine variants: name -> build_step keyword arguments (see the module docstring).
VARIANTS = {"defaults": {}, "switches off": {"amp": "none", "channels_last": False,
                                             "compile": False}}
BF16 = {"bf16": {"amp": "bf16"}}
COMPILED = {"compiled": {"compile": True}}


def make_loops(teacher_name: str, student_name: str, num_classes: int, bf16: bool = False,
               compiled: bool = False) -> tuple[dict[str, tuple[Step, bool]], nn.Module]:
    """name -> (step(x, y, cached_or_None), uses_cache), and the shared teacher."""
    loops: dict[str, tuple[Step, bool]] = {}
    ref = build_step(teacher_name, student_name, "kd", num_classes, device="cpu", amp="none",
                     channels_last=False, compile=False)
    teacher = ref.teacher
    o = ref.optimizer.param_groups[0]  # the engine's default SGD settings
    assert teacher is not None
    variants = {**VARIANTS, **(BF16 if bf16 else {}), **(COMPILED if compiled else {})}
    # (label, method, variant): TopKD with the defaults only, KD with every variant
    rows = [("KD, defaults", "kd", "defaults"), ("TopKD, defaults", "topkd", "defaults"),
            *((f"KD, {v}", "kd", v) for v in variants if v != "defaults")]
    for tag, use_cache in (("online", False), ("cache", True)):
        student = create_model(student_name, num_classes).train()
        opt = torch.optim.SGD(student.parameters(), lr=o["lr"], momentum=o["momentum"],
                              weight_decay=o["weight_decay"])
        loops[f"plain KD ({tag})"] = ((lambda x, y, t, s=student, op=opt:
                                       plain_kd_step(s, teacher, op, x, y, t)), use_cache)
        for label, loss, v in rows:
            # one teacher for every loop: contiguous for the plain loop and "switches off",
            # converted per step (as the engine's TrainStep would hold its own copy)
            tm = teacher if v == "switches off" else copy.deepcopy(teacher)
            st = build_step(teacher_name, student_name, loss, num_classes, device="cpu",
                            teacher_model=tm, **variants[v])
            ep = st.method.params.warmup + 1  # past the warm-up: every term at full weight
            loops[f"topkd {label} ({tag})"] = (
                (lambda x, y, t, st=st, ep=ep: st(x, y, epoch=ep, cached=t)), use_cache)
    return loops, teacher


def as_iterations(loops: dict[str, tuple[Step, bool]], get_batch: Callable[[int, bool], Batch]
                  ) -> dict[str, Iteration]:
    """Step loops on ready batches -> one-iteration callables ``run(i)``."""
    def run(fn: Step, use_cache: bool) -> Iteration:
        return lambda i: fn(*get_batch(i, use_cache))
    return {k: run(fn, c) for k, (fn, c) in loops.items()}


def time_loops(loops: dict[str, Iteration], steps: int, rounds: int, batch_size: int,
               ref: str = REF) -> dict[str, dict[str, float]]:
    """Median images/s per loop over ``rounds`` interleaved rounds (after one warm-up round,
    whose wall seconds, compilation included, are ``warmup_s``)."""
    warm: dict[str, float] = {}
    wall: dict[str, list[float]] = {k: [] for k in loops}
    cpu: dict[str, list[float]] = {k: [] for k in loops}
    for r in range(rounds + 1):  # round 0 = warm-up
        for name, run in loops.items():
            w0, c0 = time.perf_counter(), time.process_time()
            for i in range(steps):
                run(i)
            if not r:
                warm[name] = time.perf_counter() - w0
            else:
                wall[name].append(steps * batch_size / (time.perf_counter() - w0))
                cpu[name].append(steps * batch_size / max(time.process_time() - c0, 1e-9))
    res = {k: {"wall_img_s": statistics.median(wall[k]), "cpu_img_s": statistics.median(cpu[k]),
               "warmup_s": warm[k]} for k in loops}
    for v in res.values():
        v["ratio_cpu"] = v["cpu_img_s"] / res[ref]["cpu_img_s"]
        v["ratio_wall"] = v["wall_img_s"] / res[ref]["wall_img_s"]
    return res


def data_loops(teacher: nn.Module, fit_idx: list[int], cached: Any, bs: int, root: str | None
               ) -> dict[str, Iteration]:
    """Whole iterations (loading included) over the Fashion-MNIST training subset ``fit``:
    DataLoader + plain step vs the engine's loader + default step (see ``--data``)."""
    from torch.utils.data import DataLoader, Subset

    from topkd.config import Config
    from topkd.data import get_dataset
    from topkd.engine.data import train_loader
    from topkd.utils.dist import DistInfo

    aug = Subset(get_dataset("fashion_mnist", root, "train"), fit_idx)
    cfg = Config.from_dict({"data": {"name": "fashion_mnist", "batch_size": bs}})
    dist = DistInfo(device=torch.device("cpu"))
    ref = build_step("fmnist_cnn_teacher", "fmnist_cnn_student", "kd", 10, device="cpu",
                     amp="none", channels_last=False, compile=False)
    o = ref.optimizer.param_groups[0]
    out: dict[str, Iteration] = {}
    for tag, ds in (("online", aug), ("cache", cached)):
        student = create_model("fmnist_cnn_student", 10).train()
        opt = torch.optim.SGD(student.parameters(), lr=o["lr"], momentum=o["momentum"],
                              weight_decay=o["weight_decay"])
        plain = DataLoader(ds, batch_size=bs, shuffle=True, drop_last=True)
        engine, _ = train_loader(ds, cfg, dist)
        st = build_step("fmnist_cnn_teacher", "fmnist_cnn_student", "kd", 10, device="cpu",
                        teacher_model=copy.deepcopy(teacher))
        assert type(engine).__name__ == "BatchedLoader"

        pc, ec = _Cycle(plain), _Cycle(engine, epochs=True)

        def plain_it(i: int, it=pc, s=student, op=opt) -> None:
            b = it.next()
            plain_kd_step(s, teacher, op, b[0], b[1], b[2] if len(b) > 2 else None)

        def engine_it(i: int, it=ec, st=st) -> None:
            b = it.next()
            st(b[0], b[1], epoch=1, cached=b[2] if len(b) > 2 else None)

        out[f"plain KD + DataLoader ({tag})"] = plain_it
        out[f"topkd KD, defaults + engine loader ({tag})"] = engine_it
    return out


class _Cycle:
    """Endless batches of a loader (a new epoch, and for the engine's loader a new
    ``set_epoch``, whenever it runs out)."""

    def __init__(self, loader: Any, epochs: bool = False) -> None:
        self.loader, self.epochs, self.epoch = loader, epochs, 0
        self.it: Any = iter(())

    def next(self) -> Any:
        try:
            return next(self.it)
        except StopIteration:
            self.epoch += 1
            if self.epochs:
                self.loader.sampler.set_epoch(self.epoch)
            self.it = iter(self.loader)
            return next(self.it)


def print_table(title: str, res: dict[str, dict[str, float]], ref: str = REF) -> None:
    print(f"\n{title}")
    print(f"| loop | img/s (wall) | img/s (CPU time) | vs {ref} (CPU) | (wall) | warm-up s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for k, v in res.items():
        print(f"| {k} | {v['wall_img_s']:.0f} | {v['cpu_img_s']:.0f} | "
              f"{v['ratio_cpu']:.2f}x | {v['ratio_wall']:.2f}x | {v['warmup_s']:.1f} |")


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
    p.add_argument("--data", action="store_true",
                   help="also whole iterations with data loading (DataLoader vs engine loader)")
    p.add_argument("--bf16", action="store_true", help="also the explicit train.amp=bf16 rows")
    p.add_argument("--compile", action="store_true",
                   help="also the train.compile=true rows (inductor; compilation in warm-up s)")
    p.add_argument("--epoch", action="store_true",
                   help="also time one engine epoch (Trainer) with the teacher online vs cached")
    p.add_argument("--epoch-subset", type=int, default=20000)
    p.add_argument("--data-root", default=None)
    p.add_argument("--json", default=None, help="write the figures here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    bs, steps = a.batch_size, a.steps
    from torch.utils.data import Subset

    from topkd.data import get_dataset

    train = get_dataset("fashion_mnist", a.data_root, "train", augment=False)
    loops, teacher = make_loops("fmnist_cnn_teacher", "fmnist_cnn_student", 10, a.bf16,
                                a.compile)
    tmp = Path(tempfile.mkdtemp(prefix="topkd-tp-"))
    fit_idx = list(range(bs * steps))
    fit = Subset(train, fit_idx)
    # the dataset's own crop/flip recipe (pad 2 + flip), replayed per cached view
    build_cache(teacher, fit, tmp / "c", views=4, progress=False, dataset_name="fashion_mnist")
    cached = wrap_dataset(fit, tmp / "c")
    cached.set_epoch(1)
    batches = list(cached.iter_batches(bs, shuffle=False))  # (x, y, t) — identical for all

    def fmnist_batch(i: int, use_cache: bool) -> Batch:
        if use_cache:  # the cache path pays for the lookup + replay, as in training
            return cached.batch(np.arange(i * bs, (i + 1) * bs))
        x, y, _ = batches[i]
        return x, y, None

    step_res = {"fmnist": time_loops(as_iterations(loops, fmnist_batch), steps, a.rounds, bs)}
    print(f"threads={a.threads} batch={bs} steps/round={steps} rounds={a.rounds}")
    print_table("fmnist_cnn_teacher -> fmnist_cnn_student (Fashion-MNIST batches)",
                step_res["fmnist"])
    if a.data:
        dl = data_loops(teacher, fit_idx, cached, bs, a.data_root)
        step_res["fmnist_data"] = time_loops(dl, steps, a.rounds, bs, ref=DATA_REF)
        print_table("fmnist_cnn_teacher -> fmnist_cnn_student, iterations with data loading",
                    step_res["fmnist_data"], ref=DATA_REF)
    if a.cifar:
        cb, cs = a.cifar_batch_size, a.cifar_steps
        cloops, cteacher = make_loops("resnet32x4", "resnet8x4", 100, a.bf16, a.compile)
        g = torch.Generator().manual_seed(0)
        cbatches = [(torch.randn(cb, 3, 32, 32, generator=g),
                     torch.randint(0, 100, (cb,), generator=g)) for _ in range(cs)]
        with torch.no_grad():
            clogits = [cteacher(x).half() for x, _ in cbatches]

        def cifar_batch(i: int, use_cache: bool) -> Batch:
            x, y = cbatches[i]
            return x, y, clogits[i] if use_cache else None

        step_res["cifar"] = time_loops(as_iterations(cloops, cifar_batch), cs, a.cifar_rounds,
                                       cb)
        print(f"\nbatch={cb} steps/round={cs} rounds={a.cifar_rounds}")
        print_table("resnet32x4 -> resnet8x4 (synthetic 32x32 batches, 100 classes)",
                    step_res["cifar"])
    out: dict[str, Any] = {"step": step_res, "threads": a.threads, "batch_size": bs}
    if a.epoch:
        out["epoch"] = engine_epoch(teacher, a.data_root, a.epoch_subset, bs, tmp)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return out


def engine_epoch(teacher: nn.Module, data_root: str | None, subset: int, bs: int, tmp: Path
                 ) -> dict[str, dict[str, float]]:
    """One KD epoch of the engine (``Trainer.fit`` with its defaults, evaluation included) with
    the teacher online and with a teacher-logit cache of the same training images (4 views)."""
    from topkd.checkpoints import save_weights
    from topkd.config import load_config
    from topkd.engine import Trainer
    from topkd.engine.data import build_datasets

    ckpt = tmp / "teacher.pt"
    save_weights(teacher, ckpt)
    ov = [f"data.train_subset={subset}", "train.epochs=1", "data.num_workers=0",
          f"data.batch_size={bs}", f"teacher.checkpoint={ckpt}", f"output_dir={tmp}",
          "train.device=cpu"] + ([f"data.root={data_root}"] if data_root else [])
    leaf = ROOT / "configs" / "fashion_mnist" / "teacher_student" / "kd.yaml"
    cfg = load_config(leaf, ov)
    build_cache(teacher, build_datasets(cfg).train, tmp / "e", views=4, progress=False,
                teacher_name=cfg.teacher.name, checkpoint=ckpt, dataset_name=cfg.data.name)
    ep: dict[str, dict[str, float]] = {}
    for name, extra in (("online", []), ("cache", [f"train.teacher_cache={tmp / 'e'}"])):
        run = load_config(leaf, [*ov, *extra, f"name=epoch_{name}"])
        w0, c0 = time.perf_counter(), time.process_time()
        trainer = Trainer(run, "distill", quiet=True)
        trainer.fit()
        ep[name] = {"train_wall_s": float(trainer.rows[-1]["epoch_time_s"]),
                    "total_cpu_s": time.process_time() - c0,
                    "total_wall_s": time.perf_counter() - w0}
    print(f"\nOne engine KD epoch on {subset} images (training part, wall): online "
          f"{ep['online']['train_wall_s']:.1f} s, cache {ep['cache']['train_wall_s']:.1f} s"
          f" -> {ep['online']['train_wall_s'] / ep['cache']['train_wall_s']:.2f}x; CPU incl."
          f" eval: {ep['online']['total_cpu_s']:.1f} s vs {ep['cache']['total_cpu_s']:.1f} s")
    return ep


def main(argv: list[str] | None = None) -> int:
    benchmark(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
