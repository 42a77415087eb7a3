"""Wall time of a whole training recipe through the engine, on synthetic data of the real shape.

Default: the CIFAR-100 KD recipe for resnet32x4 -> resnet8x4
(``configs/cifar100/res32x4_res8x4/kd.yaml``: 240 epochs, batch 64, evaluation every epoch) on
random CIFAR-shaped images (50,000 train / 10,000 test, written in the official pickle format,
so the engine's own data path runs), with a random-weight teacher, online and with a
teacher-logit cache (``--views`` views, built and timed first). It runs ``--epochs`` epochs of
each with the engine's defaults (``train.amp/channels_last/compile: auto``, the batched loader)
and extrapolates the recipe's ``train.epochs``: first epoch (compilation, warm-up) + the rest at
the mean of the later epochs. Evaluation is included; the accuracy is meaningless.

    python benchmarks/recipe_time.py --device cuda --epochs 3            # a GPU: a few minutes
    python benchmarks/recipe_time.py --device cuda --epochs 3 --override train.amp=none

Extra ``--override key=value`` go to every run (e.g. ``train.compile=false``).
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def write_cifar100(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Random CIFAR-100 in the official python pickle format under ``root/cifar-100-python``."""
    rng = np.random.default_rng(seed)
    d = root / "cifar-100-python"
    d.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = (np.arange(n) % 100).tolist()
        with open(d / split, "wb") as f:
            pickle.dump({b"data": data, b"fine_labels": labels}, f, protocol=4)
    with open(d / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}, f)
    return root


def time_run(cfg: Any, run_dir: Path, epochs: int) -> dict[str, Any]:
    """``epochs`` epochs of ``cfg`` (its ``train.epochs`` unchanged): per-epoch wall times."""
    from topkd.engine import Trainer

    t0 = time.perf_counter()
    tr = Trainer(cfg, "distill", run_dir, quiet=True)
    build = time.perf_counter() - t0
    walls = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        with warnings.catch_warnings():  # fit() again continues this Trainer's own run
            warnings.filterwarnings("ignore", message=".*already holds a run")
            tr.fit(max_epochs=1)
        walls.append(time.perf_counter() - t0)
    later = walls[1:] or walls
    per_epoch = float(np.mean(later))
    total = cfg.train.epochs
    return {"build_s": build, "epoch_wall_s": walls,
            "train_epoch_s": [float(r["epoch_time_s"]) for r in tr.rows],
            "images_per_s": [float(r["images_per_s"]) for r in tr.rows],
            "first_epoch_extra_s": walls[0] - per_epoch,
            "speed": {"amp": str(tr.step.amp_dtype or "fp32").replace("torch.", ""),
                      "channels_last": tr.step.channels_last,
                      "compiled": [c.name for c in tr.step.compiled if c.is_compiled],
                      "loader": type(tr.train_loader).__name__},
            f"estimated_{total}_epochs_s": build + walls[0] + (total - 1) * per_epoch}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs/cifar100/res32x4_res8x4/kd.yaml"))
    p.add_argument("--device", default="auto")
    p.add_argument("--epochs", type=int, default=3, help="epochs run per mode")
    p.add_argument("--images", type=int, default=50000)
    p.add_argument("--test-images", type=int, default=10000)
    p.add_argument("--views", type=int, default=4, help="teacher-logit cache views")
    p.add_argument("--modes", default="online,cache")
    p.add_argument("--override", action="append", default=[])
    p.add_argument("--out", default=None, help="work directory (default: a temp dir)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    from topkd.cache import build_cache
    from topkd.checkpoints import save_weights
    from topkd.config import load_config
    from topkd.engine.data import build_datasets
    from topkd.models import create_model
    from topkd.utils.dist import resolve_device

    work = Path(a.out or tempfile.mkdtemp(prefix="topkd-recipe-"))
    t0 = time.perf_counter()
    write_cifar100(work / "data", a.images, a.test_images)
    base = [f"data.root={work / 'data'}", f"output_dir={work / 'runs'}",
            f"train.device={a.device}", "data.num_workers=0", *a.override]
    cfg = load_config(a.config, base)
    teacher = create_model(cfg.teacher.name, 100)
    save_weights(teacher, work / "teacher.pt")
    base.append(f"teacher.checkpoint={work / 'teacher.pt'}")
    out: dict[str, Any] = {"config": a.config, "device": str(resolve_device(a.device)),
                           "images": a.images, "epochs_run": a.epochs,
                           "recipe_epochs": cfg.train.epochs, "setup_s": time.perf_counter() - t0}
    print(f"[recipe] {a.config} on {out['device']}: {a.images} synthetic images, "
          f"{a.epochs} of {cfg.train.epochs} epochs per mode", flush=True)
    modes = a.modes.split(",")
    if "online" in modes:
        r = time_run(load_config(a.config, base), work / "runs/online", a.epochs)
        out["online"] = r
        print(f"[recipe] online: {json.dumps(r)}", flush=True)
    if "cache" in modes:
        t0 = time.perf_counter()
        dev = resolve_device(a.device)
        build_cache(teacher.to(dev), build_datasets(cfg).train, work / "cache", views=a.views,
                    batch_size=512, device=dev, progress=False, teacher_name=cfg.teacher.name,
                    checkpoint=work / "teacher.pt", dataset_name=cfg.data.name)
        cache_s = time.perf_counter() - t0
        r = time_run(load_config(a.config, [*base, f"train.teacher_cache={work / 'cache'}"]),
                     work / "runs/cache", a.epochs)
        r["cache_build_s"] = cache_s
        key = f"estimated_{cfg.train.epochs}_epochs_s"
        r[f"{key}_incl_cache"] = r[key] + cache_s
        out["cache"] = r
        print(f"[recipe] cache ({a.views} views, built in {cache_s:.1f} s): {json.dumps(r)}",
              flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
