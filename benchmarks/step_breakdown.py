"""Where the time of one engine training step goes on the CPU (torch.profiler, self CPU time).

Builds the engine's step with its defaults (:func:`topkd.engine.bench.build_step`, what
``topkd distill`` runs on this device) for a teacher/student pair, warms it up, profiles
``--steps`` steps on one synthetic batch and splits the self CPU time of the ATen ops into
convolution/matmul kernels (forward and backward; what channels_last and torch.compile can only
re-layout, not remove) and everything else (elementwise ops, BatchNorm, pooling, the loss, the
SGD update, copies: what compilation can fuse). The last share bounds what
any such switch can gain: a step whose convolutions take 85% cannot become more than
1 / 0.85 = 1.18x faster without faster convolutions.

    OMP_NUM_THREADS=1 python benchmarks/step_breakdown.py --threads 1 \\
        --pair fmnist_cnn_teacher,fmnist_cnn_student,10,1,28 --batch 128
    OMP_NUM_THREADS=1 python benchmarks/step_breakdown.py --threads 1 \\
        --pair resnet32x4,resnet8x4,100,3,32 --batch 64 --cached
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from topkd.engine.bench import build_step

#: op name substrings of each category (first match wins).
CATEGORIES = {
    "convolution / matmul": ("conv", "mkldnn", "addmm", "mm", "bmm", "linear"),
}


def category(name: str) -> str:
    n = name.lower()
    for cat, keys in CATEGORIES.items():
        if any(k in n for k in keys):
            return cat
    return "other ops"


def breakdown(teacher: str, student: str, num_classes: int, in_channels: int, size: int,
              batch: int, steps: int, cached: bool, **switches: object) -> dict[str, object]:
    torch.manual_seed(0)
    st = build_step(teacher, student, "kd", num_classes, device="cpu", **switches)
    x = torch.randn(batch, in_channels, size, size)
    y = torch.randint(0, num_classes, (batch,))
    t = None
    if cached:
        with torch.inference_mode():
            t = st.teacher(x.contiguous(memory_format=torch.channels_last)
                           if st.channels_last else x).half()
        st.teacher = st._teacher_run = None
    for _ in range(3):
        st(x, y, epoch=1, cached=t)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            st(x, y, epoch=1, cached=t)
    shares: dict[str, float] = {}
    total = 0.0
    for e in prof.key_averages():
        if not e.key.startswith("aten::"):
            continue
        us = e.self_cpu_time_total
        total += us
        shares[category(e.key)] = shares.get(category(e.key), 0.0) + us
    return {"pair": f"{teacher} -> {student}", "batch": batch, "cached": cached,
            "channels_last": st.channels_last, "ms_per_step": total / steps / 1e3,
            "share": {k: v / total for k, v in sorted(shares.items())}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pair", default="resnet32x4,resnet8x4,100,3,32",
                   help="teacher,student,num_classes,in_channels,size")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cached", action="store_true", help="teacher logits precomputed")
    p.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"])
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    t, s, c, ch, size = a.pair.split(",")
    r = breakdown(t, s, int(c), int(ch), int(size), a.batch, a.steps, a.cached,
                  channels_last={"on": True, "off": False}.get(a.channels_last, "auto"))
    print(f"{r['pair']}, batch {r['batch']}, cached={r['cached']}, channels_last="
          f"{r['channels_last']}: {r['ms_per_step']:.1f} ms of ATen self CPU time per step")
    for k, v in r["share"].items():
        print(f"  {k}: {100 * v:.1f}%")
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
