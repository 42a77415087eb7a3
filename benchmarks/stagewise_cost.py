"""Training-step cost of methods relative to the first one, on the engine's TrainStep.

    python benchmarks/stagewise_cost.py kd simkd catkd fcfd            # CPU, batch 64

Each method (reference defaults) gets its own resnet8x4 student (same seed) and its modules,
sized from the models as the trainer sizes them; the resnet32x4 teacher (random weights) is
shared. After one warm-up step each, ``--rounds`` rounds time ``--steps`` steps of every method
in turn on one fixed random batch (so a shared machine's slow phases hit all methods alike);
the median seconds per step and its ratio to the first method are printed as a Markdown table,
with the trainable parameters of the method's own modules.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from topkd.config import Config
from topkd.engine.step import build_train_step
from topkd.methods import MethodContext, create_method
from topkd.models import create_model


def build(method: str, teacher: torch.nn.Module, student: str, size: int, nc: int):
    cfg = Config.from_dict({"method": {"name": method}})
    s = create_model(student, nc)
    ctx = MethodContext(num_classes=nc, student=s, teacher=teacher, input_size=(3, size, size),
                        num_samples=50_000)
    m = create_method(cfg.method, ctx)
    m.validate = False  # as the trainer
    return build_train_step(cfg, s, teacher, m, torch.device("cpu"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("methods", nargs="+")
    p.add_argument("--teacher", default="resnet32x4")
    p.add_argument("--student", default="resnet8x4")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    nc, size = 100, 32
    torch.manual_seed(0)
    teacher = create_model(a.teacher, nc).eval().requires_grad_(False)
    x = torch.randn(a.batch, 3, size, size)
    y = torch.randint(0, nc, (a.batch,))
    steps, params = {}, {}
    for name in a.methods:
        torch.manual_seed(0)
        steps[name] = build(name, teacher, a.student, size, nc)
        params[name] = sum(q.numel() for q in steps[name].method.parameters() if q.requires_grad)
        steps[name](x, y, epoch=1)  # warm-up
    times: dict[str, list[float]] = {n: [] for n in a.methods}
    for _ in range(a.rounds):
        for name in a.methods:
            t0 = time.perf_counter()
            for _ in range(a.steps):
                steps[name](x, y, epoch=1)
            times[name].append((time.perf_counter() - t0) / a.steps)
    med = {n: sorted(v)[len(v) // 2] for n, v in times.items()}
    first = a.methods[0]
    print(f"| method | s/step | x {first} | method parameters |\n| --- | --- | --- | --- |")
    for n in a.methods:
        print(f"| {n} | {med[n]:.3f} | {med[n] / med[first]:.2f} | {params[n]:,} |")
    print(json.dumps({"threads": torch.get_num_threads(), "batch": a.batch, "times": times}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
