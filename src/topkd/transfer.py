"""``topkd transfer``: linear-probe transfer of a trained student's features.

The protocol of the field (CRD, Tian et al., ICLR 2020, Sec. "transferability of
representations", followed by later KD papers): take a student trained on CIFAR-100, freeze it,
and train only a linear classifier on its penultimate features for another dataset -- STL-10 or
Tiny-ImageNet, downsampled to the student's 32x32 input -- then report top-1 on that dataset's
test split.

>>> topkd transfer --model wrn_16_2 --checkpoint runs/x/checkpoints/best.pt \\
...     --dataset stl10 --data-root data --output transfer_stl10.json      # doctest: +SKIP

Implementation. The backbone is put in eval mode (BatchNorm uses its running statistics, which
are never updated), every parameter gets ``requires_grad=False`` and features are computed under
``torch.no_grad``; the images get only the deterministic test-time transform. The feature
of an image is therefore a fixed function of the image, so features are extracted **once** per
split (``model.forward_features``) and the linear layer is trained on the cached tensors. This is
exactly the same optimisation problem as running the frozen backbone at every step, only much
faster. (Papers that augment the probe's training images -- random crops/flips -- solve a
slightly different problem; this module does not augment.)

Solvers: ``sgd`` (default; the field trains the linear layer with SGD): momentum 0.9, lr 0.1,
cosine decay, 100 epochs, batch 256, no weight decay, over shuffled cached features. ``lbfgs``:
full-batch L-BFGS on the (optionally L2-regularised) multinomial logistic loss -- deterministic,
a good cross-check. Exact probe schedules differ between papers and are seldom published; every
constant is a flag and is written to the output JSON.

Resizing: ``stl10`` is resized once with PIL bilinear (``get_dataset(..., resize=N)``, as
``transforms.Resize`` would); any other dataset whose images differ from the input size is
resized per batch with ``torch.nn.functional.interpolate(mode="bilinear", antialias=True)``
(Tiny-ImageNet 64 -> 32). Normalisation defaults to the source dataset's statistics (those the
student was trained with, ``--source-dataset``); ``--normalize target`` uses the target's own.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset


@dataclass
class ProbeConfig:
    """How the linear classifier is trained on cached features."""

    solver: str = "sgd"  # sgd | lbfgs
    epochs: int = 100  # sgd epochs; lbfgs: outer steps of up to 20 iterations each
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.solver not in ("sgd", "lbfgs"):
            raise ValueError(f"solver must be 'sgd' or 'lbfgs', got {self.solver!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"invalid probe config {self}")


def _resize(x: torch.Tensor, size: int | None) -> torch.Tensor:
    if size is None or tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True)


@torch.no_grad()
def extract_features(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    resize_to: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features (N, D) float32, labels (N,) int64)`` on the CPU, from ``forward_features``.

    The model is switched to eval mode and frozen (``requires_grad_(False)``); nothing in it is
    modified (eval-mode BatchNorm does not update its running statistics).
    """
    model.eval()
    model.requires_grad_(False)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    feats, labels = [], []
    for x, y in loader:
        x = _resize(x.to(device, non_blocking=True), resize_to)
        f = model.forward_features(x)
        if f.dim() != 2:
            raise ValueError(f"forward_features must return (B, D), got {tuple(f.shape)}")
        feats.append(f.float().cpu())
        labels.append(torch.as_tensor(y, dtype=torch.long).cpu())
    if not feats:
        raise ValueError("empty dataset: no features extracted")
    return torch.cat(feats), torch.cat(labels)


def train_linear(
    feats: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    cfg: ProbeConfig | None = None,
    device: str | torch.device = "cpu",
) -> nn.Linear:
    """Train ``nn.Linear(D, num_classes)`` with cross-entropy on cached features."""
    cfg = cfg or ProbeConfig()
    gen = torch.Generator().manual_seed(cfg.seed)
    linear = nn.Linear(feats.shape[1], num_classes)
    with torch.no_grad():  # seeded init (nn.Linear's default init, from our generator)
        bound = 1.0 / math.sqrt(feats.shape[1])
        linear.weight.copy_(torch.rand(linear.weight.shape, generator=gen) * 2 * bound - bound)
        linear.bias.copy_(torch.rand(linear.bias.shape, generator=gen) * 2 * bound - bound)
    linear.to(device)
    x, y = feats.to(device), labels.to(device)
    if cfg.solver == "lbfgs":
        opt = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=20,
                                line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(linear(x), y)
            if cfg.weight_decay:
                loss = loss + 0.5 * cfg.weight_decay * linear.weight.pow(2).sum()
            loss.backward()
            return loss

        for _ in range(cfg.epochs):
            opt.step(closure)
        return linear.cpu()

    opt = torch.optim.SGD(linear.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    n = x.shape[0]
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=gen).to(device)
        for i in range(0, n, cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            loss = F.cross_entropy(linear(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return linear.cpu()


@torch.no_grad()
def accuracy(linear: nn.Linear, feats: torch.Tensor, labels: torch.Tensor,
             topk: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracies (percent) of ``linear`` on cached features."""
    logits = linear(feats)
    out = {}
    for k in topk:
        k_eff = min(k, logits.shape[1])
        hit = (logits.topk(k_eff, dim=1).indices == labels[:, None]).any(dim=1)
        out[f"acc{k}"] = 100.0 * hit.float().mean().item()
    return out


def linear_probe(
    model: nn.Module,
    train_set: Dataset,
    test_set: Dataset,
    num_classes: int,
    cfg: ProbeConfig | None = None,
    *,
    device: str | torch.device = "cpu",
    resize_to: int | None = None,
    feature_batch_size: int = 256,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Freeze ``model``, cache its features on both splits, train and evaluate a linear probe.

    Returns ``{"train_acc1", "test_acc1", "test_acc5", "feature_dim", "train_samples",
    "test_samples", "extract_s", "probe_s", "linear": nn.Linear}``.
    """
    cfg = cfg or ProbeConfig()
    model.to(device)
    t0 = time.perf_counter()
    kw = dict(batch_size=feature_batch_size, num_workers=num_workers, device=device,
              resize_to=resize_to)
    ftr, ytr = extract_features(model, train_set, **kw)
    fte, yte = extract_features(model, test_set, **kw)
    t1 = time.perf_counter()
    for name, y in (("train", ytr), ("test", yte)):
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(f"{name} labels outside [0, {num_classes}): check num_classes")
    linear = train_linear(ftr, ytr, num_classes, cfg, device)
    t2 = time.perf_counter()
    tr, te = accuracy(linear, ftr, ytr), accuracy(linear, fte, yte)
    return {
        "train_acc1": tr["acc1"], "test_acc1": te["acc1"], "test_acc5": te["acc5"],
        "feature_dim": int(ftr.shape[1]), "train_samples": int(ftr.shape[0]),
        "test_samples": int(fte.shape[0]), "extract_s": round(t1 - t0, 3),
        "probe_s": round(t2 - t1, 3), "linear": linear,
    }


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``topkd transfer``."""
    g = parser.add_argument_group("student")
    g.add_argument("--model", required=True,
                   help="registered model name (docs/models.md; topkd.models.list_models())")
    g.add_argument("--checkpoint", type=Path, default=None,
                   help="trained weights (any format topkd.checkpoints.load_weights reads)")
    g.add_argument("--random-init", action="store_true",
                   help="no checkpoint: probe a randomly initialised network (a baseline)")
    g.add_argument("--source-dataset", default="cifar100",
                   help="dataset the student was trained on: its class count sizes the head the "
                        "checkpoint holds, and its mean/std normalise inputs (default cifar100)")
    g.add_argument("--source-classes", type=int, default=None,
                   help="override the head size (default: the source dataset's class count)")
    g.add_argument("--model-kwargs", type=json.loads, default={},
                   help='JSON kwargs for create_model, e.g. \'{"img_size": 32}\'')
    d = parser.add_argument_group("target data")
    d.add_argument("--dataset", default="stl10", help="target dataset (stl10, tiny_imagenet...)")
    d.add_argument("--data-root", default=None, help="dataset folder or its parent")
    d.add_argument("--input-size", type=int, default=None,
                   help="resize images to this side (default: the model's input size)")
    d.add_argument("--normalize", choices=("source", "target"), default="source",
                   help="normalise with the source dataset's mean/std (default) or the target's")
    p = parser.add_argument_group("linear probe")
    p.add_argument("--solver", choices=("sgd", "lbfgs"), default="sgd")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=256, help="linear-probe batch size")
    p.add_argument("--feature-batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", "-o", type=Path, default=None,
                        help="write the result JSON here (it is always printed)")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run(args: argparse.Namespace) -> int:
    """Run ``topkd transfer``; return the exit status (2 for bad inputs)."""
    from topkd.checkpoints import STRICT_HINT, CheckpointMismatchError, load_weights
    from topkd.data import dataset_info, get_dataset
    from topkd.data.errors import DatasetNotFoundError
    from topkd.models import create_model, model_info

    def fail(msg: str) -> int:
        print(f"topkd transfer: {msg}", file=sys.stderr)
        return 2

    if args.checkpoint is None and not args.random_init:
        return fail("--checkpoint is required (or --random-init for a random-features baseline)")
    if args.checkpoint is not None and args.random_init:
        return fail("give either --checkpoint or --random-init, not both")
    try:
        cfg = ProbeConfig(args.solver, args.epochs, args.lr, args.momentum, args.weight_decay,
                          args.batch_size, args.seed)
        src = dataset_info(args.source_dataset)
        source_classes = args.source_classes or src.num_classes
        input_size = args.input_size or model_info(args.model).input_size[-1]
        torch.manual_seed(args.seed)
        model = create_model(args.model, source_classes, **args.model_kwargs)
        sha = None
        if args.checkpoint is not None:
            try:
                sha = load_weights(model, args.checkpoint, strict=True, verbose=False).sha256
            except CheckpointMismatchError as e:  # the library's hint names strict=False
                return fail(str(e).replace(STRICT_HINT, "  (do --model, --model-kwargs and "
                                           "--source-classes describe the saved network?)"))
        kw: dict[str, Any] = {"resize": input_size} if args.dataset.lower() == "stl10" else {}
        if args.normalize == "source":
            kw.update(mean=src.mean, std=src.std)
        train_set = get_dataset(args.dataset, args.data_root, "train", augment=False, **kw)
        test_set = get_dataset(args.dataset, args.data_root, "test", augment=False, **kw)
        info = train_set.info
        if info.in_channels != src.in_channels:
            return fail(f"{args.dataset} has {info.in_channels} channels, the student expects "
                        f"{src.in_channels}")
        device = _device(args.device)
        result = linear_probe(
            model, train_set, test_set, int(info.num_classes), cfg, device=device,
            resize_to=input_size, feature_batch_size=args.feature_batch_size,
            num_workers=args.num_workers,
        )
    except (DatasetNotFoundError, FileNotFoundError, ValueError, RuntimeError) as e:
        return fail(str(e))
    result.pop("linear")
    out = {
        "protocol": "linear probe on frozen penultimate features (forward_features)",
        "model": args.model, "model_kwargs": args.model_kwargs,
        "checkpoint": None if args.checkpoint is None else str(args.checkpoint),
        "checkpoint_sha256": sha, "source_dataset": args.source_dataset,
        "source_classes": source_classes, "dataset": args.dataset,
        "data_root": args.data_root, "num_classes": int(info.num_classes),
        "input_size": input_size, "normalize": args.normalize,
        "mean": list(info.mean), "std": list(info.std), "device": str(device),
        "probe": asdict(cfg), **result,
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.output is not None:
        from topkd.utils.io import atomic_write_text

        atomic_write_text(args.output, text + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m topkd.transfer ...``."""
    parser = argparse.ArgumentParser(prog="topkd transfer", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
