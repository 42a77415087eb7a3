"""``topkd demo``: teacher -> six distillation methods on real Fashion-MNIST, in minutes on a CPU.

What it does (every step reuses earlier work when its inputs are unchanged):

1. loads Fashion-MNIST (``/usr/share/datasets/fashion-mnist``, Debian ``dataset-fashion-mnist``)
   and carves a stratified held-out validation split from the training set;
2. trains the ``fmnist_cnn_teacher`` (or reuses the checkpoint cached under a hash of its
   training recipe);
3. runs the teacher ONCE over ``--views`` augmented views of the student's training images and
   stores the logits (:mod:`topkd.cache`), so no student epoch pays for a teacher forward;
4. distils ``fmnist_cnn_student`` with each method (CE only, KD, DKD, KD+LS, KD+TSM+TDL, TopKD)
   and seed, through :class:`topkd.losses.DistillationLoss`, selecting the best epoch on the
   validation split;
5. prints a results table (test top-1 at the best-validation epoch and at the last epoch) and
   writes ``results.md``/``results.json`` and three plots to ``--output-dir``.

The loss specs are those of ``configs/methods/*.yaml`` with the Fashion-MNIST overrides of
``configs/fashion_mnist/teacher_student/*.yaml`` (k 3, warm-up 2 epochs); see :data:`METHODS`.
The training loop is a compact in-process one (pre-loaded uint8 tensors, vectorised replayable
augmentation, no DataLoader workers) because on two CPU cores data-loading overhead would
otherwise dominate these tiny CNNs; the loss is the library's criterion, unchanged.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from topkd.cache import (
    CachedLogitDataset,
    ReplayableCropFlip,
    build_cache,
    wrap_dataset,
)

# Loss specs (topkd.losses.LossSpec fields): configs/methods/<m>.yaml + the Fashion-MNIST leaf
# overrides (configs/fashion_mnist/teacher_student/<m>.yaml: k 3, warm-up 2). Kept here so the
# demo works from an installed wheel too; tests/test_demo.py checks they match the YAML files.
_TSM = {"tsm": True, "k": 3, "gamma": 1.0, "lam": 0.5, "correct_gt": True}
_KD = {"ce": 0.1, "base": "kd", "base_weight": 0.9, "temperature": 4.0, "ls": False,
       "tsm": False, "warmup": 0}
METHODS: dict[str, dict[str, Any]] = {
    "ce": {"ce": 1.0, "base": "none"},
    "kd": dict(_KD),
    "dkd": {"ce": 1.0, "base": "dkd", "base_weight": 1.0, "dkd_alpha": 1.0, "dkd_beta": 8.0,
            "temperature": 4.0, "ls": False, "tsm": False, "warmup": 2},
    "kd_ls": {**_KD, "ls": True, "temperature": 2.0, "base_weight": 9.0},
    "kd_tsm_tdl": {**_KD, **_TSM, "tdl_weight": 1.0, "tdl_alpha": 1.0, "tdl_beta": 0.5},
    "topkd": {"ce": 1.0, "base": "topkd", "base_weight": 1.0, "w_con": 1.0, "w_tdl": 1.0,
              "tau": 0.1, **_TSM, "schedule": "linear", "ls": False, "warmup": 2},
}
LABELS = {"ce": "CE only", "kd": "KD", "dkd": "DKD", "kd_ls": "KD+LS",
          "kd_tsm_tdl": "KD+TSM+TDL", "topkd": "TopKD"}
FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                  "Sneaker", "Bag", "Ankle boot"]
TEACHER, STUDENT = "fmnist_cnn_teacher", "fmnist_cnn_student"
INSTALL_HINT = (
    "Fashion-MNIST is needed. Install it with `sudo apt-get install dataset-fashion-mnist` "
    "(Debian/Ubuntu; `bash scripts/bootstrap.sh` does this), or pass --data-root DIR containing "
    "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
    "t10k-labels-idx1-ubyte.gz."
)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
@dataclass
class DemoData:
    """Fashion-MNIST as tensors: the training base, fit/val/test index sets, eval tensors."""

    train: Any                 # topkd.data FashionMNIST (array-backed, train split)
    fit_idx: np.ndarray        # student training indices into train.data
    teacher_idx: np.ndarray    # teacher training indices into train.data
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    images: torch.Tensor = field(init=False)   # (N, 1, 28, 28) uint8
    labels: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.images = torch.from_numpy(np.ascontiguousarray(self.train.data)).unsqueeze(1)
        self.labels = torch.as_tensor(np.asarray(self.train.targets), dtype=torch.long)

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.fit_idx.tobytes())
        h.update(self.teacher_idx.tobytes())
        h.update(str(len(self.train.data)).encode())
        return h.hexdigest()[:16]


def normalise(u8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 images -> float32 normalised (the topkd.data convention)."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (u8.float() / 255.0 - m) / s


def load_data(root: str | None, val_fraction: float = 0.1, subset: int | None = None,
              teacher_subset: int | None = None, test_subset: int | None = None,
              split_seed: int = 0) -> DemoData:
    """Load Fashion-MNIST and carve the splits (raises ``DatasetNotFoundError`` if missing)."""
    from topkd.data import dataset_info, get_dataset, train_val_split

    train = get_dataset("fashion_mnist", root, "train", augment=False)
    test = get_dataset("fashion_mnist", root, "test", augment=False)
    info = dataset_info("fashion_mnist")
    fit, val = train_val_split(train, val_fraction, seed=split_seed)
    fit_all = np.asarray(fit.indices, dtype=np.int64)
    rng = np.random.default_rng(split_seed)

    def sub(idx: np.ndarray, n: int | None) -> np.ndarray:
        return idx if n is None or n >= len(idx) else np.sort(rng.permutation(idx)[:n])

    fit_idx = sub(fit_all, subset)
    teacher_idx = sub(fit_all, teacher_subset)
    val_idx = np.asarray(val.indices, dtype=np.int64)
    if subset is not None:  # keep val proportionate for tiny runs
        val_idx = sub(val_idx, max(200, int(subset * val_fraction / (1 - val_fraction))))
    test_idx = sub(np.arange(len(test.data)), test_subset)
    tx = torch.from_numpy(np.ascontiguousarray(test.data[test_idx])).unsqueeze(1)
    vx = torch.from_numpy(np.ascontiguousarray(train.data[val_idx])).unsqueeze(1)
    return DemoData(
        train=train, fit_idx=fit_idx, teacher_idx=teacher_idx,
        val_x=normalise(vx, info.mean, info.std),
        val_y=torch.as_tensor(np.asarray(train.targets)[val_idx]),
        test_x=normalise(tx, info.mean, info.std),
        test_y=torch.as_tensor(np.asarray(test.targets)[test_idx]),
        mean=tuple(info.mean), std=tuple(info.std),
    )


# --------------------------------------------------------------------------------------------
# Training primitives
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int = 1000
             ) -> tuple[float, torch.Tensor]:
    """Top-1 accuracy (%) and the logits of ``model`` on pre-normalised ``x``."""
    model.eval()
    out = torch.cat([model(x[i:i + bs]) for i in range(0, len(x), bs)])
    return float((out.argmax(1) == y).float().mean() * 100), out


def _sgd(model: nn.Module, lr: float, steps: int) -> tuple[torch.optim.Optimizer, Any]:
    # configs/base/fashion_mnist.yaml: SGD momentum 0.9, wd 5e-4, cosine (here per step)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    return opt, sched


def _augmented_batches(data: DemoData, idx: np.ndarray, aug: ReplayableCropFlip,
                       rng: np.random.Generator, gen: torch.Generator, bs: int
                       ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Fresh random views (online augmentation) in shuffled batches."""
    order = idx[torch.randperm(len(idx), generator=gen).numpy()]
    for s in range(0, len(order), bs):
        b = torch.as_tensor(order[s:s + bs])
        u8 = aug.apply(data.images[b], aug.sample(len(b), rng))
        yield normalise(u8, data.mean, data.std), data.labels[b]


def train_teacher(data: DemoData, epochs: int, lr: float = 0.05, bs: int = 128, seed: int = 0,
                  tick: Callable[[int], None] = lambda n: None) -> nn.Module:
    """Train ``fmnist_cnn_teacher`` with cross-entropy and crop/flip augmentation."""
    from topkd.models import create_model

    torch.manual_seed(seed)
    model = create_model(TEACHER, 10)
    steps = epochs * math.ceil(len(data.teacher_idx) / bs)
    opt, sched = _sgd(model, lr, steps)
    aug, rng = ReplayableCropFlip(padding=2), np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for x, y in _augmented_batches(data, data.teacher_idx, aug, rng, gen, bs):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tick(len(y))
    return model.eval()


def make_criterion(spec: dict[str, Any]) -> nn.Module:
    """``topkd.losses.DistillationLoss`` for a LossSpec dict."""
    from topkd.losses import DistillationLoss, LossSpec

    return DistillationLoss(LossSpec.from_dict(dict(spec)))


@dataclass
class RunResult:
    """One student run: per-epoch history and the selected figures."""

    method: str
    seed: int
    history: list[dict[str, float]]
    best_val_acc1: float
    best_val_epoch: int
    test_acc1_at_best_val: float
    last_test_acc1: float
    epoch_time_s: float            # mean training time per epoch (no evaluation)


def train_student(
    spec: dict[str, Any],
    data: DemoData,
    epochs: int,
    seed: int,
    *,
    cached: CachedLogitDataset | None = None,
    teacher: nn.Module | None = None,
    lr: float = 0.05,
    bs: int = 128,
    method: str = "",
    tick: Callable[[int], None] = lambda n: None,
    max_steps: int | None = None,
    test_every_epoch: bool = False,
    view_seed: int | None = None,
) -> RunResult:
    """Distil ``fmnist_cnn_student`` with ``spec`` for ``epochs``; teacher logits from ``cached``
    (offline, preferred) or from a ``teacher`` forward per batch (online); neither for CE.

    Validation and test accuracy are measured after every epoch; the reported test accuracy
    is the one at the best-validation epoch (and at the last epoch); other epochs' test accuracy
    is only computed with ``test_every_epoch`` (else NaN in the history). ``view_seed`` seeds
    which cached view each sample gets per epoch (default: ``seed``, so seeds vary the views).
    """
    from topkd.models import create_model

    torch.manual_seed(seed)
    model = create_model(STUDENT, 10)
    crit = make_criterion(spec)
    needs_teacher = spec.get("base", "none") != "none" or any(
        float(spec.get(k, 0) or 0) > 0 for k in ("tdl_weight", "con_weight"))
    n = len(cached) if cached is not None else len(data.fit_idx)
    per_epoch = math.ceil(n / bs) if max_steps is None else min(max_steps, math.ceil(n / bs))
    opt, sched = _sgd(model, lr, epochs * per_epoch)
    gen = torch.Generator().manual_seed(seed)
    aug = cached.cache.augment if cached is not None else ReplayableCropFlip(padding=2)
    if cached is not None:
        cached.seed = seed if view_seed is None else view_seed
    history: list[dict[str, float]] = []
    for epoch in range(1, epochs + 1):
        model.train()
        t0 = time.perf_counter()
        tot, cnt, terms_sum = 0.0, 0, {}
        if cached is not None:
            cached.set_epoch(epoch)
            batches: Iterator[Any] = cached.iter_batches(bs, shuffle=True, generator=gen)
        else:
            rng = np.random.default_rng([seed, epoch])
            assert aug is not None
            batches = ((x, y, None) for x, y in
                       _augmented_batches(data, data.fit_idx, aug, rng, gen, bs))
        for step, (x, y, t) in enumerate(batches):
            if max_steps is not None and step >= max_steps:
                break
            if needs_teacher and t is None:
                if teacher is None:
                    raise ValueError(f"method {method!r} needs a teacher or a logit cache")
                with torch.no_grad():
                    t = teacher(x)
            s = model(x)
            loss, terms = crit(s, t if needs_teacher else None, y, epoch=epoch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(y)
            cnt += len(y)
            for k, v in terms.items():
                terms_sum[k] = terms_sum.get(k, 0.0) + float(v) * len(y)
            tick(len(y))
        dt = time.perf_counter() - t0
        val_acc, _ = evaluate(model, data.val_x, data.val_y)
        # the test set is only needed at the best-so-far and last epochs (saves ~40% of eval)
        best_so_far = all(val_acc >= r["val_acc1"] for r in history)
        test_acc = (evaluate(model, data.test_x, data.test_y)[0]
                    if test_every_epoch or best_so_far or epoch == epochs else float("nan"))
        row = {"epoch": epoch, "train_loss": tot / max(cnt, 1), "val_acc1": val_acc,
               "test_acc1": test_acc, "epoch_time_s": dt, "images_per_s": cnt / max(dt, 1e-9)}
        row.update({f"train_{k}": v / max(cnt, 1) for k, v in terms_sum.items()})
        history.append(row)
    best = max(history, key=lambda r: (r["val_acc1"], r["epoch"]))  # ties -> later epoch
    return RunResult(
        method=method, seed=seed, history=history, best_val_acc1=best["val_acc1"],
        best_val_epoch=int(best["epoch"]), test_acc1_at_best_val=best["test_acc1"],
        last_test_acc1=history[-1]["test_acc1"],
        epoch_time_s=float(np.mean([r["epoch_time_s"] for r in history])),
    )


# --------------------------------------------------------------------------------------------
# Caching of the teacher and of its logits
# --------------------------------------------------------------------------------------------
def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def get_teacher(data: DemoData, epochs: int, cache_dir: Path, lr: float = 0.05, seed: int = 0,
                tick: Callable[[int], None] = lambda n: None, force: bool = False,
                log: Callable[[str], None] = print) -> tuple[nn.Module, Path, float]:
    """Train the teacher or reuse the one cached under the hash of its recipe.

    Returns ``(teacher, checkpoint_path, test_acc1)``.
    """
    from topkd.models import create_model

    recipe = {"model": TEACHER, "epochs": epochs, "lr": lr, "bs": 128, "seed": seed,
              "aug": "crop_flip(2)", "data": hashlib.sha256(data.teacher_idx.tobytes())
              .hexdigest()[:16], "n_train": len(data.train.data), "recipe": "demo-teacher/1"}
    ck = cache_dir / f"teacher-{_key(recipe)}.pt"
    if ck.is_file() and not force:
        model = create_model(TEACHER, 10)
        model.load_state_dict(torch.load(ck, map_location="cpu", weights_only=True))
        log(f"[demo] reusing cached teacher {ck}")
    else:
        model = train_teacher(data, epochs, lr=lr, seed=seed, tick=tick)
        ck.parent.mkdir(parents=True, exist_ok=True)
        tmp = ck.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, ck)  # atomic: an interrupted run never leaves a half checkpoint
        (ck.with_suffix(".json")).write_text(json.dumps(recipe, indent=2))
    acc, _ = evaluate(model.eval(), data.test_x, data.test_y)
    return model.eval(), ck, acc


def get_logit_cache(teacher: nn.Module, ckpt: Path, data: DemoData, cache_dir: Path, views: int,
                    topk: int | None, seed: int = 0, progress: bool = False,
                    log: Callable[[str], None] = print) -> CachedLogitDataset:
    """Build (or reuse) the teacher-logit cache of the student's training images."""
    from torch.utils.data import Subset

    key = _key({"teacher": ckpt.name, "fit": data.fingerprint(), "views": views, "topk": topk,
                "seed": seed})
    path = cache_dir / f"logits-{key}"
    fit = Subset(data.train, data.fit_idx.tolist())
    if not (path / "header.json").is_file():
        build_cache(teacher, fit, path, views=views, topk=topk, batch_size=500,
                    progress=progress, augment=ReplayableCropFlip(padding=2), seed=seed,
                    teacher_name=TEACHER, checkpoint=ckpt, dataset_name="fashion_mnist",
                    mean=data.mean, std=data.std)
    else:
        log(f"[demo] reusing teacher-logit cache {path}")
    return wrap_dataset(fit, path, seed=seed, teacher_name=TEACHER, checkpoint=ckpt,
                        dataset_name="fashion_mnist")


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------
def summarise(results: list[RunResult]) -> list[dict[str, Any]]:
    """Per method: mean/std over seeds of test@best-val, last test, best val, epoch time."""
    rows = []
    for m in dict.fromkeys(r.method for r in results):
        rs = [r for r in results if r.method == m]

        def ms(vals: list[float]) -> tuple[float, float]:
            a = np.asarray(vals, dtype=float)
            return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0

        b, bs_ = ms([r.test_acc1_at_best_val for r in rs])
        last, ls_ = ms([r.last_test_acc1 for r in rs])
        v, vs = ms([r.best_val_acc1 for r in rs])
        rows.append({"method": m, "label": LABELS.get(m, m), "seeds": len(rs),
                     "test_at_best_val": b, "test_at_best_val_std": bs_,
                     "last_test": last, "last_test_std": ls_, "best_val": v, "best_val_std": vs,
                     "epoch_time_s": float(np.mean([r.epoch_time_s for r in rs]))})
    return rows


def format_table(rows: list[dict[str, Any]], teacher_acc: float | None = None) -> str:
    """Markdown table of :func:`summarise` rows."""
    out = ["| method | seeds | test top-1 @ best val | test top-1 @ last | best val | "
           "s / epoch |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        out.append(
            f"| {r['label']} | {r['seeds']} | {r['test_at_best_val']:.2f} ± "
            f"{r['test_at_best_val_std']:.2f} | {r['last_test']:.2f} ± {r['last_test_std']:.2f}"
            f" | {r['best_val']:.2f} | {r['epoch_time_s']:.1f} |")
    if teacher_acc is not None:
        out.append(f"| *teacher ({TEACHER})* | - | {teacher_acc:.2f} | - | - | - |")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def _int_list(s: str) -> list[int]:
    try:
        if "-" in s and "," not in s and not s.startswith("-"):
            a, b = s.split("-")
            return list(range(int(a), int(b) + 1))
        return [int(v) for v in s.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected integers like '0,1,2' or '0-2', got {s!r}") \
            from e


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``topkd demo``."""
    parser.description = (
        "Train a Fashion-MNIST teacher (cached), distil a small student with CE only, KD, DKD, "
        "KD+LS, KD+TSM+TDL and TopKD, print a results table and write plots. Defaults fit in "
        "about 10 minutes on 2 CPU cores.")
    g = parser.add_argument_group("schedule")
    g.add_argument("--epochs", type=int, default=5, help="student epochs per method (default 5)")
    g.add_argument("--teacher-epochs", type=int, default=3,
                   help="teacher epochs (default 3; the trained teacher is cached by recipe)")
    g.add_argument("--seeds", type=_int_list, default=[0],
                   help="student seeds, e.g. '0' or '0,1,2' (default 0)")
    g.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)} (default all)")
    g.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (cosine schedule)")
    g.add_argument("--batch-size", type=int, default=128)
    d = parser.add_argument_group("data")
    d.add_argument("--data-root", default=None,
                   help="folder with the Fashion-MNIST IDX files "
                        "(default /usr/share/datasets/fashion-mnist)")
    d.add_argument("--subset", type=int, default=20000,
                   help="student training images (of the 54000 after the val split; "
                        "0 = all; default 20000)")
    d.add_argument("--teacher-subset", type=int, default=30000,
                   help="teacher training images (0 = all 54000; default 30000)")
    d.add_argument("--test-subset", type=int, default=0,
                   help="evaluate on this many test images (0 = all 10000)")
    d.add_argument("--val-fraction", type=float, default=0.1,
                   help="held-out validation share of the training set (best-epoch selection)")
    c = parser.add_argument_group("teacher-logit cache")
    c.add_argument("--views", type=int, default=4,
                   help="augmented views per image stored in the teacher-logit cache (default 4)")
    c.add_argument("--topk", type=int, default=None,
                   help="store only the top-K teacher log-probs (default: full logits)")
    c.add_argument("--no-cache", action="store_true",
                   help="online teacher forward every batch instead of the logit cache")
    o = parser.add_argument_group("output")
    o.add_argument("--output-dir", default="demo_out", help="results, plots (default demo_out)")
    o.add_argument("--cache-dir", default=None,
                   help="teacher checkpoints and logit caches (default OUTPUT_DIR/cache)")
    o.add_argument("--retrain-teacher", action="store_true", help="ignore a cached teacher")
    o.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    o.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns a process exit code."""
    from topkd.data import DatasetNotFoundError

    t_start = time.perf_counter()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"topkd demo: unknown method(s) {unknown}; choose from {list(METHODS)}",
              file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    cache_dir = Path(args.cache_dir) if args.cache_dir else out / "cache"
    out.mkdir(parents=True, exist_ok=True)
    try:
        data = load_data(args.data_root, args.val_fraction, args.subset or None,
                         args.teacher_subset or None, args.test_subset or None)
    except DatasetNotFoundError as e:
        print(f"topkd demo: {e}\n\n{INSTALL_HINT}", file=sys.stderr)
        return 2

    n_fit = len(data.fit_idx)
    distilling = [m for m in methods if m != "ce"]
    total = n_fit * args.epochs * len(methods) * len(args.seeds)
    total += args.teacher_epochs * len(data.teacher_idx)
    if distilling and not args.no_cache:
        total += args.views * n_fit
    bar = _bar(total, not args.no_progress)
    log = bar.write if hasattr(bar, "write") else print
    log(f"[demo] Fashion-MNIST: {n_fit} student / {len(data.teacher_idx)} teacher training "
        f"images, {len(data.val_y)} val, {len(data.test_y)} test; torch threads "
        f"{torch.get_num_threads()}")

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    bar.set_description("teacher")
    teacher, ckpt, teacher_acc = get_teacher(
        data, args.teacher_epochs, cache_dir, lr=args.lr, tick=bar.update,
        force=args.retrain_teacher, log=log)
    timings["teacher_s"] = time.perf_counter() - t0
    log(f"[demo] teacher {TEACHER}: test top-1 {teacher_acc:.2f}% ({timings['teacher_s']:.0f} s)")

    cached = None
    if distilling and not args.no_cache:
        t0 = time.perf_counter()
        bar.set_description("teacher-logit cache")
        cached = get_logit_cache(teacher, ckpt, data, cache_dir, args.views, args.topk,
                                 progress=False, log=log)
        bar.update(args.views * n_fit)
        timings["cache_s"] = time.perf_counter() - t0
        log(f"[demo] teacher-logit cache: {args.views} views x {n_fit} images "
            f"({timings['cache_s']:.0f} s, {cached.cache.disk_bytes() / 2**20:.1f} MiB)")

    results: list[RunResult] = []
    t0 = time.perf_counter()
    for m in methods:
        for seed in args.seeds:
            bar.set_description(f"{LABELS[m]} seed {seed}")
            r = train_student(METHODS[m], data, args.epochs, seed, cached=cached,
                              teacher=teacher, lr=args.lr, bs=args.batch_size, method=m,
                              tick=bar.update)
            results.append(r)
            log(f"[demo] {LABELS[m]:<11} seed {seed}: test {r.test_acc1_at_best_val:.2f}% at "
                f"best val (epoch {r.best_val_epoch}), last {r.last_test_acc1:.2f}%, "
                f"{r.epoch_time_s:.1f} s/epoch")
    timings["students_s"] = time.perf_counter() - t0
    bar.close()

    rows = summarise(results)
    table = format_table(rows, teacher_acc)
    print("\n" + table + "\n")
    plots: list[str] = []
    if not args.no_plots:
        from topkd import plots as P

        _, t_logits = evaluate(teacher, data.test_x, data.test_y)
        plots = [
            P.accuracy_bars(rows, out / "accuracy.png", teacher_acc=teacher_acc),
            P.training_curves(results, out / "curves.png", labels=LABELS),
            P.tsm_effect(t_logits, data.test_y, out / "tsm.png", k=int(_TSM["k"]),
                         gamma=float(_TSM["gamma"]), lam=float(_TSM["lam"]),
                         class_names=FMNIST_CLASSES),
        ]
    timings["total_s"] = time.perf_counter() - t_start
    payload = {"teacher": {"name": TEACHER, "checkpoint": str(ckpt), "test_acc1": teacher_acc},
               "args": {k: v for k, v in vars(args).items() if not callable(v)},
               "methods": {m: METHODS[m] for m in methods}, "summary": rows,
               "runs": [asdict(r) for r in results], "timings": timings}
    (out / "results.json").write_text(json.dumps(payload, indent=2, default=str))
    (out / "results.md").write_text(
        f"# topkd demo results\n\nFashion-MNIST, {TEACHER} -> {STUDENT}, {args.epochs} student "
        f"epochs on {n_fit} images, seeds {args.seeds}.\n\n{table}\n")
    print(f"[demo] wrote {out / 'results.md'}, {out / 'results.json'}"
          + "".join(f", {p}" for p in plots))
    print(f"[demo] done in {timings['total_s']:.0f} s")
    return 0


class _PlainBar:
    def __init__(self, total: int) -> None:
        self.total, self.n, self.desc, self.last = total, 0, "", 0.0

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.perf_counter() - self.last > 5:
            self.last = time.perf_counter()
            print(f"[demo] {self.desc} {100 * self.n / max(self.total, 1):.0f}%", flush=True)

    def set_description(self, d: str) -> None:
        self.desc = d

    def write(self, s: str) -> None:
        print(s, flush=True)

    def close(self) -> None: ...


def _bar(total: int, enabled: bool) -> Any:
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, unit="img", unit_scale=True, dynamic_ncols=True,
                        smoothing=0.05)
        except ImportError:  # pragma: no cover
            pass
    return _PlainBar(total) if enabled else _Silent()


class _Silent(_PlainBar):
    def __init__(self) -> None:
        super().__init__(0)

    def update(self, n: int = 1) -> None: ...


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m topkd.demo``."""
    p = argparse.ArgumentParser(prog="topkd demo")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
