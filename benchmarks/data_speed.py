"""Data-loading throughput of topkd.data vs a small CNN's training throughput (CPU).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/data_speed.py [--images 5120] [--repeats 3]

Measures images/s of a ``DataLoader`` (shuffle, train transforms) over (a) the real
Fashion-MNIST (if installed) and (b) synthetic CIFAR-100-format pickles written to a temp dir,
for num_workers in {0, 1, 2} and batch size in {64, 256}; the first batch (worker start-up) is
not timed and the best of ``--repeats`` runs is kept (the machine may be shared). For reference
it also times the classic PIL pipeline (torchvision-style dataset:
``Image.fromarray`` -> RandomCrop/Flip -> ToTensor -> Normalize) and a 2-conv CNN's fwd+bwd+SGD.
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fixtures_data import write_cifar  # noqa: E402
from topkd.data import get_dataset  # noqa: E402


class PILPipeline(Dataset):
    """Reference: what torchvision.datasets.CIFAR100 + the usual transforms do per sample."""

    def __init__(self, data: np.ndarray, targets: list[int], size: int, pad: int, mean, std):
        self.data, self.targets = data, targets
        self.tf = T.Compose(
            [T.RandomCrop(size, padding=pad), T.RandomHorizontalFlip(), T.ToTensor(),
             T.Normalize(mean, std)]
        )  # fmt: skip

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.tf(Image.fromarray(self.data[i])), self.targets[i]


def loader_speed(ds: Dataset, batch: int, workers: int, n_images: int, repeats: int) -> float:
    """Best of ``repeats`` runs: on a shared machine the best run is the least disturbed one."""
    return max(_loader_speed(ds, batch, workers, n_images) for _ in range(repeats))


def _loader_speed(ds: Dataset, batch: int, workers: int, n_images: int) -> float:
    dl = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                    persistent_workers=False)  # fmt: skip
    it = iter(dl)
    next(it)  # worker start-up and first batch are not timed
    seen, t0 = 0, time.perf_counter()
    for x, _ in it:
        seen += len(x)
        if seen >= n_images:
            break
    return seen / (time.perf_counter() - t0)


def cnn_speed(in_ch: int, size: int, batch: int, threads: int, steps: int = 10) -> float:
    torch.set_num_threads(threads)
    net = nn.Sequential(
        nn.Conv2d(in_ch, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 100),
    )  # fmt: skip
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, in_ch, size, size), torch.randint(0, 10, (batch,))
    for i in range(steps + 2):
        if i == 2:
            t0 = time.perf_counter()
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    speed = steps * batch / (time.perf_counter() - t0)
    torch.set_num_threads(1)
    return speed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=5120, help="images timed per run")
    ap.add_argument("--repeats", type=int, default=3, help="runs per configuration (best kept)")
    ap.add_argument("--quick", action="store_true", help="batch 256 / workers 0,2 only")
    args = ap.parse_args()
    torch.set_num_threads(1)
    workers = (0, 2) if args.quick else (0, 1, 2)
    batches = (256,) if args.quick else (64, 256)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_cifar(Path(tmp), "cifar100", n_per_file=20000)
        sets = {"CIFAR-format (synthetic, 20k)": get_dataset("cifar100", tmp, "train")}
        try:
            sets["Fashion-MNIST (real, 60k)"] = get_dataset("fashion_mnist", None, "train")
        except FileNotFoundError:
            print("Fashion-MNIST not installed: skipped", file=sys.stderr)
        for name, ds in sets.items():
            info = ds.info
            pad = 4 if info.image_size == 32 else 2
            ref = PILPipeline(ds.data, ds.targets, info.image_size, pad, info.mean, info.std)
            for b in batches:
                for w in workers:
                    rows.append((name, "topkd (uint8 tensor)", b, w,
                                 loader_speed(ds, b, w, args.images, args.repeats)))  # fmt: skip
                pil = loader_speed(ref, b, 0, args.images, args.repeats)
                rows.append((name, "PIL reference", b, 0, pil))
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}\n")  # fmt: skip
    print("| data | pipeline | batch | workers | images/s |\n|---|---|---|---|---|")
    for name, pipe, b, w, s in rows:
        print(f"| {name} | {pipe} | {b} | {w} | {s:,.0f} |")
    print("\n| 2-conv CNN fwd+bwd+SGD | batch | torch threads | images/s |\n|---|---|---|---|")
    for in_ch, size, label in ((3, 32, "3x32x32"), (1, 28, "1x28x28")):
        for b in batches:
            for threads in (1, 2):
                best = max(cnn_speed(in_ch, size, b, threads) for _ in range(args.repeats))
                print(f"| {label} | {b} | {threads} | {best:,.0f} |")


if __name__ == "__main__":
    main()
