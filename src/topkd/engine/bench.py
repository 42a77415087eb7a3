"""Throughput of the engine's distillation step on synthetic data (no dataset needed).

    python -m topkd.engine.bench --teacher resnet32x4 --student resnet8x4 --batch 64 --steps 5
    python -m topkd.engine.bench --device cuda --compare-amp --steps 50 --warmup 10
    python -m topkd.engine.bench --amp none --channels-last off --compile off   # all off
    python -m topkd.engine.bench --methods kd,fitnet,at,crd --repeats 3   # cost relative to kd

Runs the engine's own :class:`~topkd.engine.step.TrainStep` (teacher forward under
inference_mode, or no_grad with the feature taps a method asks for; student forward/backward, the
method's loss, SGD step over student and method parameters) with random-weight models on random
images, so it measures compute only (no data loading, no evaluation). The speed switches
default to ``auto``, the engine's defaults (:mod:`topkd.engine.speed`); the output names what they
resolved to. Reports images/s after warm-up and the first step's time (which holds any
compilation) apart. ``--methods`` times several methods in one run, interleaved (each repeat
times every method once, in turn, so that a load change on a shared machine hits all of them),
and reports the median seconds per step and its ratio to the first method's.
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
from topkd.methods import (
    Batch,
    MethodContext,
    ModelOutput,
    create_method,
    method_class,
    params_from_dict,
)
from topkd.models import create_model
from topkd.utils.dist import resolve_device


def build_step(teacher: str, student: str, method: str = "kd", num_classes: int = 100,
               device: str = "auto", amp: str = "auto", channels_last: bool | str = "auto",
               compile: bool | str = "auto", teacher_model: torch.nn.Module | None = None,
               size: int = 32, num_samples: int = 50_000) -> TrainStep:
    """The engine's :class:`~topkd.engine.step.TrainStep` for a teacher/student pair.

    Built as the trainer builds it (:func:`~topkd.engine.step.build_train_step`) from a real
    :class:`Config` (``method.name=method`` with its reference defaults, default optimiser,
    ``train.amp/channels_last/compile`` as given: ``"auto"`` = the engine's defaults); the
    teacher has random weights (they do not change the cost) and is dropped for methods without
    a teacher (e.g. ``"ce"``: the student alone, as ``topkd train``). ``teacher_model`` reuses
    an existing teacher instead of creating one (converted to channels_last in place if the
    step uses it). Methods with trainable modules are sized from
    the models as the trainer does (``MethodContext`` with ``size x size`` inputs and
    ``num_samples`` training samples with balanced labels).
    """
    dev = resolve_device(device)
    cfg = Config.from_dict({"train": {"amp": amp, "channels_last": channels_last,
                                      "compile": compile}, "method": {"name": method}})
    s = create_model(student, num_classes).to(dev)  # build_train_step: memory format
    t: torch.nn.Module | None = None
    if method_class(params_from_dict(cfg.method)).needs_teacher:
        t = teacher_model or create_model(teacher, num_classes).to(dev).eval()
        t.requires_grad_(False)
    ctx = MethodContext(num_classes=num_classes, student=s, teacher=t,
                        input_size=(3, size, size), num_samples=num_samples,
                        train_labels=torch.arange(num_samples, device=dev) % num_classes)
    m = create_method(cfg.method, ctx).to(dev)
    m.validate = False  # as the trainer
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
    step = build_step(teacher, student, loss, num_classes, device, amp, channels_last, compile,
                      size=size)
    run = _runner(step, batch, num_classes, size, in_channels, cached)
    first, _, _ = run(1)
    run(max(warmup - 1, 0))
    dt, _, out = run(steps)
    return {"teacher": teacher, "student": student, "loss": loss, "batch": batch,
            "steps": steps, "device": str(step.device), "cached": cached,
            "amp": str(step.amp_dtype).replace("torch.", "") if step.amp_dtype else "none",
            "channels_last": step.channels_last,
            "compiled": [c.name for c in step.compiled if c.is_compiled],
            "threads": torch.get_num_threads(), "first_step_s": first,
            "s_per_step": dt / steps, "images_per_s": batch * steps / dt,
            "loss_value": float(out.total.detach())}


def _runner(step: TrainStep, batch: int, num_classes: int, size: int, in_channels: int = 3,
            cached: bool = False):
    """``run(n) -> (wall seconds, process CPU seconds, last LossOutput)``: ``n`` steps on one
    fixed synthetic batch (with sample indices and extra views when the method asks for them).
    ``cached``: the teacher's logits of that batch are computed once (float16, as the
    teacher-logit cache stores them) and the step runs without its teacher."""
    dev = step.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    x = torch.randn(batch, in_channels, size, size, device=dev)
    y = torch.randint(0, num_classes, (batch,), device=dev)
    m = step.method
    kw: dict[str, Any] = {}
    if cached:
        if step.teacher is None:
            raise ValueError(f"--cached: method {m.name!r} has no teacher")
        with torch.inference_mode(), step.autocast():
            kw["cached"] = step.teacher(x.contiguous(memory_format=torch.channels_last)
                                        if step.channels_last else x).half()
        step.teacher = step._teacher_run = None  # as with train.teacher_cache: no teacher
    if m.needs_index:
        kw["index"] = torch.arange(batch, device=dev)
    if m.extra_views:
        kw["views"] = {v: torch.randn_like(x) for v in m.extra_views}

    def run(n: int) -> tuple[float, float, Any]:
        out = None
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            out, _ = step(x, y, epoch=1, **kw)
        sync()
        return time.perf_counter() - t0, time.process_time() - c0, out

    return run


def _detached(out: ModelOutput) -> ModelOutput:
    """A copy whose logits and features are leaves (the method's graph alone)."""
    def leaf(t: torch.Tensor) -> torch.Tensor:
        return t.detach().requires_grad_(t.is_floating_point())

    feats = {k: [leaf(f) for f in v] if isinstance(v, list) else leaf(v)
             for k, v in out.feats.items()}
    return ModelOutput(leaf(out.logits), feats)


def loss_only(step: TrainStep, batch: int, num_classes: int, size: int, repeats: int = 5,
              seed: int = 0) -> tuple[float, float]:
    """The method's own cost on one batch of real model outputs: the fastest of ``repeats``
    forward+backward calls of the loss (seconds; student outputs detached, so the networks'
    backward is excluded) and the MiB of tensors it saves for backward (unique storages other
    than its inputs: what a step keeps alive beyond the networks' own activations)."""
    g = torch.Generator().manual_seed(seed)
    dev = step.device
    x = torch.randn(batch, 3, size, size, generator=g).to(dev)
    y = torch.randint(0, num_classes, (batch,), generator=g).to(dev)
    with torch.no_grad():
        s_out = step.distiller._run(x)
    t_out = step.teacher_outputs(x, None)
    index = torch.arange(batch, device=dev) if step.method.needs_index else None
    b = Batch(_detached(s_out), t_out, y, 1.0, index)
    inputs = {t.data_ptr() for t in [b.student.logits, *_tensors(b.student), *_tensors(t_out)]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in inputs and not isinstance(t, torch.nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step.method(b)
    del out
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        step.method(b).total.backward()
        sync()
        best = min(best, time.perf_counter() - t0)
    step.optimizer.zero_grad(set_to_none=True)
    return best, sum(seen.values()) / 2**20


def _tensors(out: ModelOutput | None) -> list[torch.Tensor]:
    if out is None:
        return []
    return [f for v in out.feats.values() for f in (v if isinstance(v, list) else [v])] + \
        [out.logits]


def method_costs(methods: list[str], teacher: str = "resnet32x4", student: str = "resnet8x4",
                 batch: int = 64, steps: int = 2, warmup: int = 1, repeats: int = 3,
                 num_classes: int = 100, size: int = 32, device: str = "auto",
                 amp: str = "none", channels_last: bool = False, compile: bool = False,
                 seed: int = 0) -> list[dict[str, Any]]:
    """The training-step cost of each method relative to ``methods[0]`` (e.g. KD).

    Every method gets its own student (same seed) and method modules; the teacher is shared.
    Each of ``repeats`` rounds times ``steps`` steps of every method in turn (after ``warmup``
    steps each, once). Per method: ``s_per_step`` the median wall seconds per step,
    ``ratio`` the median over rounds of its time / the first method's time in the same round
    (so that slow phases of a shared machine cancel), both for wall time and, on CPU, for the
    process CPU time (``cpu_s_per_step``, ``cpu_ratio``: with one thread, insensitive to other
    processes competing for the cores), and ``method_params`` the number of trainable
    parameters of the method's own modules; ``loss_ms`` and ``loss_saved_mib`` are the
    method's loss alone (:func:`loss_only`).
    """
    if not methods:
        raise ValueError("method_costs: give at least one method")
    dev = resolve_device(device)
    mf = torch.channels_last if channels_last else torch.preserve_format
    torch.manual_seed(seed)
    t_model = create_model(teacher, num_classes).to(dev, memory_format=mf).eval()
    runs, extra, loss_s, saved = {}, {}, {}, {}
    for name in methods:
        torch.manual_seed(seed)
        st = build_step(teacher, student, name, num_classes, str(dev), amp, channels_last,
                        compile, teacher_model=t_model, size=size)
        extra[name] = sum(p.numel() for p in st.method.parameters() if p.requires_grad)
        runs[name] = _runner(st, batch, num_classes, size)
        runs[name](warmup)
        loss_s[name], saved[name] = loss_only(st, batch, num_classes, size)
    wall: dict[str, list[float]] = {n: [] for n in methods}
    cpu: dict[str, list[float]] = {n: [] for n in methods}
    for _ in range(repeats):
        for name in methods:
            w, c, _ = runs[name](steps)
            wall[name].append(w / steps)
            cpu[name].append(c / steps)

    def median(v: list[float]) -> float:
        v = sorted(v)
        return (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2

    ref = methods[0]
    rows = []
    for n in methods:
        row = {"method": n, "s_per_step": median(wall[n]),
               "ratio": median([a / b for a, b in zip(wall[n], wall[ref])]),
               "runs_s_per_step": wall[n], "method_params": extra[n],
               "loss_ms": 1e3 * loss_s[n], "loss_saved_mib": saved[n], "teacher": teacher,
               "student": student, "batch": batch, "device": str(dev),
               "threads": torch.get_num_threads()}
        if dev.type == "cpu":
            row |= {"cpu_s_per_step": median(cpu[n]),
                    "cpu_ratio": median([a / b for a, b in zip(cpu[n], cpu[ref])])}
        rows.append(row)
    return rows


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
    p.add_argument("--methods", default=None,
                   help="comma-separated methods to compare (ratios to the first), e.g. "
                        "kd,fitnet,at")
    p.add_argument("--repeats", type=int, default=3, help="rounds of --methods timing (each "
                   "times --steps steps of every method; switches 'auto' mean off there)")
    a = p.parse_args(argv)
    if a.methods:
        # The method-cost table compares the methods' own cost: fp32, eager, NCHW unless asked.
        on = {"auto": False, "on": True, "off": False}
        rows = method_costs(a.methods.split(","), a.teacher, a.student, a.batch, a.steps,
                            a.warmup, a.repeats, a.num_classes, a.size, device=a.device,
                            amp="none" if a.amp == "auto" else a.amp,
                            channels_last=on[a.channels_last], compile=on[a.compile])
        ref, cpu = rows[0]["method"], "cpu_ratio" in rows[0]
        head = f"| method | wall s/step | wall x {ref} |"
        head += f" CPU s/step | CPU x {ref} |" if cpu else ""
        head += " method parameters | loss fwd+bwd ms | loss saved MiB |"
        print(head + "\n" + "| --- " * (head.count("|") - 1) + "|")
        for r in rows:
            line = f"| {r['method']} | {r['s_per_step']:.2f} | {r['ratio']:.2f} |"
            if cpu:
                line += f" {r['cpu_s_per_step']:.2f} | {r['cpu_ratio']:.2f} |"
            print(f"{line} {r['method_params']:,} | {r['loss_ms']:.1f} | "
                  f"{r['loss_saved_mib']:.1f} |")
        print(json.dumps(rows))
        return 0
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
