"""Data-loading throughput of topkd.data vs a small CNN's training throughput (CPU).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/data_speed.py [--images 5120] [--repeats 3]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/data_speed.py --policies   # augmentation cost
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/data_speed.py --batched    # engine's loader

``--policies`` instead times each augmentation policy of ``topkd.data.augment`` (timm's
RandAugment/AutoAugment/AugMix, random erasing, MLKD's strong view; batch 128) relative to the
plain crop/flip pipeline in the same run: main-process CPU time per sample (``num_workers=0``)
and wall-clock samples/s with 2 workers; and Mixup/CutMix + label smoothing on a batch.

``--batched`` instead times the engine's batched in-memory loader
(:class:`topkd.engine.batched.BatchedLoader`, ``data.loader: auto``: gather, crop, flip and
normalise a whole batch in tensor ops) against the ``DataLoader`` with the per-image train
transforms (``num_workers=0``) over the same dataset, batch 128, both on the CPU, rounds
interleaved, best of ``--repeats``.

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
    for _, y in it:  # images may be a dict of views: count samples
        seen += len(y)
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


#: Policies timed by ``--policies`` (data config keys; DeiT = configs/base/cifar100_vit.yaml).
POLICIES = {
    "crop + flip (baseline)": {},
    "RandAugment rand-m9-mstd0.5-inc1, bicubic": {"auto_augment": "rand-m9-mstd0.5-inc1",
                                                  "aa_interpolation": "bicubic"},
    "AutoAugment original": {"auto_augment": "original"},
    "AugMix augmix-m5-w4-d2": {"auto_augment": "augmix-m5-w4-d2"},
    "random erasing re_prob 0.25 (pixel)": {"re_prob": 0.25},
    "DeiT per-image (RandAugment + erasing 0.25)": {"auto_augment": "rand-m9-mstd0.5-inc1",
                                                    "aa_interpolation": "bicubic",
                                                    "re_prob": 0.25},
    "+ MLKD strong view (views.strong: mlkd)": {"views": {"strong": {"auto_augment": "mlkd"}}},
}


def _cpu_ms_per_sample(ds: Dataset, batch: int, n_images: int) -> float:
    """Main-process CPU time per sample of a ``num_workers=0`` loader (robust to a shared box:
    time spent waiting for a core is not counted)."""
    dl = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=0, drop_last=True)
    it = iter(dl)
    next(it)
    seen, t0 = 0, time.process_time()
    for _, y in it:
        seen += len(y)
        if seen >= n_images:
            break
    return 1000 * (time.process_time() - t0) / seen


def policy_rows(sets: dict, batch: int, images: int, repeats: int) -> list[tuple]:
    """Per dataset and policy: CPU ms/sample (workers 0) and samples/s (2 workers, wall), each
    the best of ``repeats`` rounds that visit every policy in turn (so load drift hits all)."""
    from topkd.config import DataConfig, ViewConfig
    from topkd.data.augment import apply_policies

    rows = []
    for name, ds in sets.items():
        augs = {}
        for pname, keys in POLICIES.items():
            views = {k: ViewConfig(**v) for k, v in keys.get("views", {}).items()}
            d = DataConfig(**{**{k: v for k, v in keys.items() if k != "views"}, "views": views})
            augs[pname] = apply_policies(ds, d)
        cpu = dict.fromkeys(augs, float("inf"))
        wall = dict.fromkeys(augs, 0.0)
        for _ in range(repeats):
            for pname, aug in augs.items():
                cpu[pname] = min(cpu[pname], _cpu_ms_per_sample(aug, batch, images))
                wall[pname] = max(wall[pname], _loader_speed(aug, batch, 2, images))
        base = next(iter(augs))
        for pname in augs:
            rows.append((name, pname, cpu[pname], cpu[pname] / cpu[base], wall[pname],
                         wall[pname] / wall[base]))
    return rows


def mix_speed(batch: int, size: int, repeats: int, steps: int = 50) -> dict[str, float]:
    """Images/s of Mixup/CutMix (+ label smoothing) on a float batch, one thread."""
    from topkd.data.augment import BatchMix

    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 100, (batch,))
    out = {}
    for label, kw in (("label smoothing 0.1 alone", {}),
                      ("Mixup 0.8 / CutMix 1.0 + smoothing 0.1 (DeiT)",
                       {"mixup_alpha": 0.8, "cutmix_alpha": 1.0})):
        mix = BatchMix(100, label_smoothing=0.1, **kw)
        best = 0.0
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(steps):
                mix(x.clone(), y)
            best = max(best, steps * batch / (time.perf_counter() - t0))
        out[label] = best
    return out


def timed_sets(tmp: Path, sizes: bool = True) -> dict[str, Dataset]:
    """The timed datasets: synthetic CIFAR-format pickles (20k images, written to ``tmp``) and
    the real Fashion-MNIST when it is installed (60k); ``sizes`` names the sizes."""
    write_cifar(tmp, "cifar100", n_per_file=20000)
    sets = {f"CIFAR-format (synthetic{', 20k' if sizes else ''})":
            get_dataset("cifar100", tmp, "train")}
    try:
        sets[f"Fashion-MNIST (real{', 60k' if sizes else ''})"] = \
            get_dataset("fashion_mnist", None, "train")
    except FileNotFoundError:
        print("Fashion-MNIST not installed: skipped", file=sys.stderr)
    return sets


def machine_line() -> str:
    """Processor, cores, torch and the load average: the context every table is read in."""
    return (f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}\n")


def main_policies(args: argparse.Namespace) -> None:
    batch = 128
    with tempfile.TemporaryDirectory() as tmp:
        rows = policy_rows(timed_sets(Path(tmp), sizes=False), batch, args.images, args.repeats)
    print(machine_line())
    print(f"| data | per-image policy (batch {batch}) | CPU ms / sample | x baseline | "
          "samples/s, 2 workers | x baseline |\n|---|---|---|---|---|---|")
    for name, pol, cpu, cpu_r, wall, wall_r in rows:
        print(f"| {name} | {pol} | {cpu:.3f} | {cpu_r:.1f} | {wall:,.0f} | {wall_r:.2f} |")
    print(f"\n| per-batch (3x32x32, batch {batch}, 1 thread) | images/s |\n|---|---|")
    for label, speed in mix_speed(batch, 32, args.repeats).items():
        print(f"| {label} | {speed:,.0f} |")


def batched_rows(sets: dict, batch: int, images: int, repeats: int) -> list[tuple]:
    """Per dataset: images/s of the DataLoader (workers 0) and of the engine's batched loader."""
    from torch.utils.data import DistributedSampler

    from topkd.engine.batched import batched_loader

    def batched_speed(ds: Dataset) -> float:
        sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=0)
        loader = batched_loader(ds, sampler, batch, torch.device("cpu"), drop_last=True)
        assert loader is not None
        it = iter(loader)
        next(it)  # the dataset's device copy and the epoch's draws are not timed
        seen, t0 = 0, time.perf_counter()
        for _, y in it:
            seen += len(y)
            if seen >= images:
                break
        return seen / (time.perf_counter() - t0)

    rows = []
    for name, ds in sets.items():
        dl, bl = 0.0, 0.0
        for _ in range(repeats):
            dl = max(dl, _loader_speed(ds, batch, 0, images))
            bl = max(bl, batched_speed(ds))
        rows.append((name, dl, bl))
    return rows


def main_batched(args: argparse.Namespace) -> None:
    batch = 128
    with tempfile.TemporaryDirectory() as tmp:
        rows = batched_rows(timed_sets(Path(tmp)), batch, args.images, args.repeats)
    print(machine_line())
    print(f"| data (train transforms, batch {batch}) | DataLoader, 0 workers, images/s | "
          "engine's batched loader, images/s | ratio |\n|---|---|---|---|")
    for name, dl, bl in rows:
        print(f"| {name} | {dl:,.0f} | {bl:,.0f} | {bl / dl:.1f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=5120, help="images timed per run")
    ap.add_argument("--repeats", type=int, default=3, help="runs per configuration (best kept)")
    ap.add_argument("--quick", action="store_true", help="batch 256 / workers 0,2 only")
    ap.add_argument("--policies", action="store_true",
                    help="time the augmentation policies instead (topkd.data.augment)")
    ap.add_argument("--batched", action="store_true",
                    help="time the engine's batched in-memory loader against the DataLoader")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.policies:
        main_policies(args)
        return
    if args.batched:
        main_batched(args)
        return
    workers = (0, 2) if args.quick else (0, 1, 2)
    batches = (256,) if args.quick else (64, 256)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, ds in timed_sets(Path(tmp)).items():
            info = ds.info
            pad = 4 if info.image_size == 32 else 2
            ref = PILPipeline(ds.data, ds.targets, info.image_size, pad, info.mean, info.std)
            for b in batches:
                for w in workers:
                    rows.append((name, "topkd (uint8 tensor)", b, w,
                                 loader_speed(ds, b, w, args.images, args.repeats)))  # fmt: skip
                pil = loader_speed(ref, b, 0, args.images, args.repeats)
                rows.append((name, "PIL reference", b, 0, pil))
    print(machine_line())
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
