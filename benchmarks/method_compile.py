"""The method's loss computation, eager vs compiled as the engine compiles it (``train.compile``).

For each method (reference defaults, ``validate=False`` as in the engine): forward + backward of
``method(student_logits, teacher_logits, labels, epoch=...)`` w.r.t. the student logits, eagerly
and after :func:`topkd.engine.speed.compile_method` (its ``task_loss`` and ``distill`` through
``torch.compile(fullgraph=True)``, inductor). The first compiled call (the compilation) is
reported apart; times are the fastest block of ``--rounds`` interleaved
``torch.utils.benchmark`` measurements.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/method_compile.py --shapes 64x100
    .venv/bin/python benchmarks/method_compile.py --device cuda --shapes 64x100,512x1000
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils import benchmark

from topkd.engine.speed import compile_method
from topkd.methods import create_method


def _fwd_bwd(m, s, t, y) -> None:
    s.grad = None
    m(s, t, y, epoch=30.0).total.backward()


def measure(names: list[str], shapes: list[tuple[int, int]], device: str, rounds: int,
            min_time: float) -> list[dict]:
    rows = []
    for b, c in shapes:
        g = torch.Generator().manual_seed(0)
        s = (torch.randn(b, c, generator=g) * 3).to(device).requires_grad_(True)
        t = (torch.randn(b, c, generator=g) * 3).to(device)
        y = torch.randint(0, c, (b,), generator=g).to(device)
        for name in names:
            eager = create_method(name, num_classes=c).to(device)
            comp = create_method(name, num_classes=c).to(device)
            eager.validate = comp.validate = False
            parts = compile_method(comp)
            _fwd_bwd(eager, s, t, y)
            t0 = time.perf_counter()
            _fwd_bwd(comp, s, t, y)
            _fwd_bwd(comp, s, t, y)  # a second call: the backward's first run is done too
            first = time.perf_counter() - t0
            best = {"eager": float("inf"), "compiled": float("inf")}
            for _ in range(rounds):
                for label, m in (("eager", eager), ("compiled", comp)):
                    timer = benchmark.Timer("f(m, s, t, y)", globals={
                        "f": _fwd_bwd, "m": m, "s": s, "t": t, "y": y},
                        num_threads=torch.get_num_threads())
                    best[label] = min(best[label],
                                      min(timer.blocked_autorange(min_run_time=min_time).times))
            rows.append({"shape": f"{b}x{c}", "method": name, "eager_ms": best["eager"] * 1e3,
                         "compiled_ms": best["compiled"] * 1e3,
                         "speedup": best["eager"] / best["compiled"], "compile_s": first,
                         "all_compiled": all(p.is_compiled for p in parts)})
            r = rows[-1]
            print(f"| {r['shape']} | {name} | {r['eager_ms']:.3f} | {r['compiled_ms']:.3f} | "
                  f"{r['speedup']:.2f}x | {first:.1f} | {r['all_compiled']} |", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="kd,dkd,topkd")
    p.add_argument("--shapes", default="64x100", help="BxC,BxC,...")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min-time", type=float, default=0.3)
    a = p.parse_args(argv)
    shapes = [tuple(int(v) for v in sh.lower().split("x")) for sh in a.shapes.split(",")]
    print(f"torch {torch.__version__}, device {a.device}, threads {torch.get_num_threads()}\n")
    print("| B x C | method | eager fwd+bwd ms | compiled ms | speed-up | compile s "
          "| all parts compiled |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- |")
    measure(a.methods.split(","), shapes, a.device, a.rounds, a.min_time)  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
