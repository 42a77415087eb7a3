"""Training-step cost of OFD, CRD and ReviewKD relative to KD, their extra parameters and
memory, and CRD's two ways of scoring (docs/benchmarks.md, docs/methods.md).

    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/feature_methods.py

"Step cost": the engine's training step (:class:`topkd.engine.step.TrainStep`: teacher forward
with the method's feature taps, student forward/backward, the method's loss, SGD over student and
method parameters) for resnet32x4 -> resnet8x4 at batch 64 on random 32x32 images, each method
built as the trainer builds it (reference defaults, modules sized from the models, a 50,000-sample
CIFAR-100-size training set). Rounds are interleaved (every method once per round) and each
method's median is kept; times are CPU seconds of this process (``time.process_time``, 1 thread),
which a shared machine's load does not inflate, next to wall seconds.

For each method on a pair: its trainable parameters and its buffers (what it adds to a
checkpoint), built exactly as the trainer builds it (sizes from the models). CRD's memory banks
scale with the training set: it is built with the CIFAR-100 (50,000) and ImageNet-1k (1,281,167)
training-set sizes; "per step" is what CRD allocates per step at batch ``B`` besides the models:
the ``B x N`` keys and mask of the negatives' draw (in chunks of at most ``2**26`` pairs), plus
either the contrast rows gathered from its two banks (``2 B (nce_k + 1) feat_dim`` floats, kept
for backward) or, on the dense path, the ``2 N B`` scores and the out-of-place update of the two
banks.

"CRD scores" times ``contrast_scores`` forward + backward (w.r.t. the embeddings) at the CIFAR-100
reference size (``B`` 64, ``N`` 50,000, ``K`` 16,384, ``D`` 128): the reference's gather of the
``B (K+1)`` bank rows versus one ``(N, D) x (D, B)`` GEMM over the whole bank; rounds are
interleaved and the fastest of each is kept (a shared machine slows some rounds).
"""

from __future__ import annotations

import time

import torch

from topkd.methods import MethodContext, create_method
from topkd.methods.crd import contrast_scores
from topkd.models import create_model

MB = 1e6
PAIRS = {  # dataset: (teacher, student, input size, classes, training samples, batch)
    "CIFAR-100 resnet32x4 -> resnet8x4": ("resnet32x4", "resnet8x4", 32, 100, 50_000, 64),
    "ImageNet resnet34 -> resnet18": ("resnet34", "resnet18", 224, 1000, 1_281_167, 256),
    "ImageNet resnet50 -> mobilenetv1": ("resnet50", "mobilenetv1", 224, 1000, 1_281_167, 256),
}


def sizes(method: torch.nn.Module) -> tuple[int, int]:
    params = sum(p.numel() for p in method.parameters())
    state = sum(t.numel() * t.element_size() for t in method.state_dict().values())
    return params, state


def memory() -> None:
    print("| pair | method | parameters | checkpoint state (MB) | CRD per step (MB) |")
    print("| --- | --- | --- | --- | --- |")
    for pair, (teacher, student, size, nc, n, batch) in PAIRS.items():
        t, s = create_model(teacher, nc).eval(), create_model(student, nc)
        labels = torch.arange(n) % nc
        ctx = MethodContext(nc, s, t, (3, size, size), num_samples=n, train_labels=labels)
        for name in ("ofd", "crd", "reviewkd"):
            if name == "ofd" and teacher == "resnet34":
                continue  # no published setting
            m = create_method({"name": name, **({"stu_preact": True} if size == 224 and
                                                name == "reviewkd" else {})}, ctx)
            params, state = sizes(m)
            step = "-"
            if name == "crd":
                p = m.params
                # float keys + bool mask of the negatives' draw, in chunks of <= 2**26 pairs
                keys = min(batch, max(1, 2**26 // n)) * n * 5
                if m.dense:  # scores of the whole bank + the out-of-place bank update
                    extra, how = 2 * n * batch * 4 + 2 * n * p.feat_dim * 4, "dense"
                else:  # the gathered contrast rows
                    extra, how = 2 * batch * (p.nce_k + 1) * p.feat_dim * 4, "gather"
                step = f"{(extra + keys) / MB:.0f} (B={batch}, {how})"
            print(f"| {pair} | {name} | {params / 1e6:.2f} M | {state / MB:.1f} | {step} |")
            del m


def step_costs(methods=("kd", "ofd", "crd", "reviewkd"), batch: int = 64, rounds: int = 5,
               steps: int = 2, n: int = 50_000) -> None:
    from topkd.config import Config
    from topkd.engine.step import build_train_step

    torch.manual_seed(0)
    dev = torch.device("cpu")
    teacher = create_model("resnet32x4", 100).eval().requires_grad_(False)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 100, (batch,))
    index = torch.randperm(n)[:batch]
    labels = torch.arange(n) % 100
    labels[index] = y
    runs = {}
    for name in methods:
        torch.manual_seed(0)
        cfg = Config.from_dict({"method": {"name": name}})
        s = create_model("resnet8x4", 100)
        ctx = MethodContext(100, s, teacher, (3, 32, 32), num_samples=n, train_labels=labels)
        m = create_method(cfg.method, ctx)
        m.validate = False
        runs[name] = build_train_step(cfg, s, teacher, m, dev)
        runs[name](x, y, epoch=1, index=index)  # warm-up
    cpu = {k: [] for k in methods}
    wall = {k: [] for k in methods}
    for _ in range(rounds):
        for name in methods:
            c0, w0 = time.process_time(), time.perf_counter()
            for _ in range(steps):
                runs[name](x, y, epoch=1, index=index)
            cpu[name].append((time.process_time() - c0) / steps)
            wall[name].append((time.perf_counter() - w0) / steps)
    med = {k: sorted(v)[len(v) // 2] for k, v in cpu.items()}
    medw = {k: sorted(v)[len(v) // 2] for k, v in wall.items()}
    print(f"\nstep cost, resnet32x4 -> resnet8x4, batch {batch}, CPU, "
          f"{torch.get_num_threads()} thread(s), median of {rounds} rounds x {steps} steps:")
    print(f"| method | CPU s/step | x {methods[0]} | wall s/step |\n| --- | --- | --- | --- |")
    for k in methods:
        print(f"| {k} | {med[k]:.3f} | {med[k] / med[methods[0]]:.2f} | {medw[k]:.2f} |")


def crd_scores(rounds: int = 5) -> None:
    g = torch.Generator().manual_seed(0)
    b, n, k, d = 64, 50_000, 16_384, 128
    bank = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    v = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=1).requires_grad_()
    idx = torch.randint(0, n, (b, k + 1), generator=g)
    best = {True: float("inf"), False: float("inf")}
    for _ in range(rounds):
        for dense in (False, True):
            t0 = time.perf_counter()
            contrast_scores(v, bank, idx, 0.07, dense=dense).sum().backward()
            best[dense] = min(best[dense], time.perf_counter() - t0)
    print(f"\nCRD scores fwd+bwd, B {b}, N {n}, K {k}, D {d}, {torch.get_num_threads()} thread(s):"
          f" gather {best[False]:.3f} s, dense {best[True]:.3f} s "
          f"({best[False] / best[True]:.1f}x)")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="cost,memory,scores",
                    help="comma-separated: cost (step cost vs KD), memory, scores (CRD)")
    parts = ap.parse_args().parts.split(",")
    if "cost" in parts:
        step_costs()
    if "memory" in parts:
        memory()
    if "scores" in parts:
        crd_scores()
