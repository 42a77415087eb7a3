"""Datasets and loaders for the engine: train/val/test, DDP sharding, seeded shuffling."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from topkd.config import Config, ConfigError
from topkd.utils.dist import DistInfo
from topkd.utils.seed import worker_init_fn


@dataclass
class Datasets:
    train: Dataset
    val: Dataset | None
    test: Dataset
    num_classes: int
    input_size: tuple[int, int, int] | None = None  # (C, H, W) of the training images


class WithIndex(Dataset):
    """Appends each sample's index in ``ds`` to its item (for methods with ``needs_index``)."""

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        return (*self.ds[i], i)

    def __getitems__(self, indices: list[int]) -> list[tuple[Any, ...]]:
        get = getattr(self.ds, "__getitems__", None)
        items = get(indices) if get is not None else [self.ds[i] for i in indices]
        return [(*item, i) for item, i in zip(items, indices)]

    def set_epoch(self, epoch: int) -> None:
        self.ds.set_epoch(epoch)  # type: ignore[attr-defined]


def dataset_labels(ds: Dataset) -> torch.Tensor | None:
    """``(len(ds),)`` int64 labels of ``ds`` in index order, through ``Subset``/``WithIndex``
    wrappers, from the base dataset's ``targets``; ``None`` if it has none."""
    import numpy as np

    idx: np.ndarray | None = None
    while True:
        if isinstance(ds, Subset):
            sub = np.asarray(ds.indices, dtype=np.int64)
            idx = sub if idx is None else sub[idx]
            ds = ds.dataset
        elif isinstance(ds, WithIndex):
            ds = ds.ds
        else:
            break
    targets = getattr(ds, "targets", None)
    if targets is None:
        return None
    t = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    return t if idx is None else t[torch.from_numpy(idx)]


def build_datasets(cfg: Config) -> Datasets:
    """Train (augmented per ``data.augment`` and the policies/views of
    :mod:`topkd.data.augment`), optional held-out val (test-time transform), test."""
    from topkd.data import dataset_info, get_dataset, train_val_split
    from topkd.data.augment import apply_policies

    d = cfg.data
    # Built with the training geometry if any view (main or extra) uses it.
    augment = d.augment or any(v.augment for v in d.views.values())
    try:
        train = get_dataset(d.name, d.root, "train", augment=augment, **d.kwargs)
        train = apply_policies(train, d)
        test = get_dataset(d.name, d.root, "test", augment=False, **d.kwargs)
    except (ValueError, TypeError) as e:  # unknown dataset name / option: a config problem
        raise ConfigError(f"data: {e}") from None
    info = getattr(train, "info", None) or dataset_info(d.name, d.root, **d.kwargs)
    val = None
    if d.val_fraction > 0:
        train, val = train_val_split(train, d.val_fraction, seed=d.val_seed)
    if d.train_subset is not None and d.train_subset < len(train):  # type: ignore[arg-type]
        train = train_subset(train, d.train_subset, seed=d.val_seed)
    size = (int(info.in_channels), *info.hw)
    for split, ds in (("train", train), ("test", test)):
        check_labels(ds, int(info.num_classes), f"data {d.name!r} ({split} split)")
    return Datasets(train, val, test, int(info.num_classes), size)


def check_labels(ds: Dataset, num_classes: int, what: str) -> None:
    """Labels in ``[0, num_classes)``, checked once per run: the training step runs its loss
    without a per-step label check (no host sync), where a label of -100 would be silently
    dropped by cross-entropy. Datasets without a ``targets`` array are not checked here."""
    labels = dataset_labels(ds)
    if labels is None or not labels.numel():
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        hint = (" (a negative label marks ignored rows in some datasets: topkd training needs a "
                "class for every sample; set method.ignore_index to use such labels with the "
                "loss functions)") if bad < 0 else ""
        raise ConfigError(f"{what}: labels must be in [0, {num_classes}), found {bad}{hint}")


def train_subset(ds: Dataset, n: int, seed: int = 0) -> Subset:
    """A fixed random subset of ``n`` samples of ``ds`` (sorted positions, a function of ``seed``).

    ``ds`` may itself be a ``Subset`` (e.g. after the val split): the result is then a nested
    ``Subset``, which the teacher-logit cache accepts.
    """
    import numpy as np

    pos = np.sort(np.random.default_rng([seed, n]).permutation(len(ds))[:n])  # type: ignore[arg-type]
    return Subset(ds, pos.tolist())


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` of ``range(n)``: every sample on exactly one rank.

    Unlike ``DistributedSampler`` nothing is padded, so summed correct-counts are exact.
    """

    def __init__(self, n: int, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.rank, self.world = n, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


def per_rank_batch(global_batch: int, world: int, key: str) -> int:
    if global_batch % world:
        raise ConfigError(f"{key}={global_batch} is not divisible by the {world} DDP ranks")
    return global_batch // world


def _loader_kw(cfg: Config, dist: DistInfo) -> dict[str, Any]:
    w = cfg.data.num_workers
    return {
        "num_workers": w,
        "pin_memory": dist.device.type == "cuda",
        "persistent_workers": False,  # workers are re-seeded per epoch through the generator
        "worker_init_fn": worker_init_fn if w > 0 else None,
    }


def _batched(ds: Dataset, cfg: Config, sampler: Sampler[int], batch_size: int,
             dist: DistInfo, drop_last: bool, what: str) -> Any:
    """The :class:`~topkd.engine.batched.BatchedLoader` of ``ds`` per ``data.loader``, or
    ``None`` for the DataLoader path."""
    from topkd.engine.batched import batched_loader, why_not

    mode = cfg.data.loader
    if mode == "dataloader":
        return None
    why = why_not(ds)
    if why is not None:
        if mode == "batched":
            raise ConfigError(f"data.loader=batched: the {what} set of {cfg.data.name!r} cannot be "
                              f"batched: {why}; use data.loader=auto or dataloader")
        return None
    return batched_loader(ds, sampler, batch_size, dist.device, drop_last=drop_last,
                          seed=cfg.seed)


def train_loader(ds: Dataset, cfg: Config, dist: DistInfo) -> tuple[Any, torch.Generator]:
    """Shuffled loader whose order depends only on ``(seed, epoch)`` (``sampler.set_epoch``).

    A ``DistributedSampler`` is used even for one process: its permutation
    (``randperm(n, seed + epoch)``) does not depend on the world size, so an N-rank run sees the
    same global batches as a single process with the same global batch size, and a resumed run
    continues the exact data order from the epoch number alone. In-memory datasets get the
    :class:`~topkd.engine.batched.BatchedLoader` (same order, batches on the device) unless
    ``data.loader=dataloader``.
    """
    from topkd.data.augment import mixes_batches

    sampler = DistributedSampler(ds, num_replicas=dist.world_size, rank=dist.rank,
                                 shuffle=True, seed=cfg.seed, drop_last=False)
    gen = torch.Generator()  # drives worker base seeds; re-seeded per epoch by the trainer
    # Mixup/CutMix pair the images of a batch: drop the last incomplete one (as timm/DeiT).
    mixing = mixes_batches(cfg.data)
    bs = per_rank_batch(cfg.data.batch_size, dist.world_size, "data.batch_size")
    loader = _batched(ds, cfg, sampler, bs, dist, mixing, "training")
    if loader is None:
        loader = DataLoader(ds, batch_size=bs, sampler=sampler, generator=gen, drop_last=mixing,
                            **_loader_kw(cfg, dist))
    if mixing and len(loader) == 0:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size}: with Mixup/CutMix the last "
                          f"incomplete batch is dropped, and {len(sampler)} training images per "
                          "rank make no full batch")
    return loader, gen


def eval_loader(ds: Dataset, cfg: Config, dist: DistInfo) -> Any:
    bs = max(1, cfg.data.eval_batch_size // dist.world_size)
    sampler = ShardSampler(len(ds), dist.rank, dist.world_size)  # type: ignore[arg-type]
    loader = _batched(ds, cfg, sampler, bs, dist, False, "evaluation")
    if loader is not None:
        return loader
    # A private generator so evaluation never draws from the global RNG.
    return DataLoader(ds, batch_size=bs, sampler=sampler,
                      generator=torch.Generator().manual_seed(0), **_loader_kw(cfg, dist))
