"""The batched loader of in-memory datasets (``data.loader``: ``auto`` / ``batched``).

:class:`BatchedLoader` stands in for the ``DataLoader`` when the training (or evaluation) set is
array-backed and its per-image transform has a batched form (:mod:`topkd.data.batched`): the
whole ``uint8`` dataset is one tensor on the training device, and each batch is gathered,
cropped, flipped and normalised there in a few tensor ops. It yields what the DataLoader would
(``(x, y)``, ``(x, y, teacher_logits)`` with the teacher-logit cache, ``index`` last for methods
with ``needs_index``), already on the device, in the same order (the same
``DistributedSampler`` / shard order).

Random draws: the crop/flip parameters of every sample of an epoch are drawn at the start of
the epoch from a generator seeded with ``(seed, epoch)`` and indexed by the sample's position,
so they are a function of ``(seed, epoch, sample)`` alone: independent of the batch size, the
number of ranks, and of anything else drawing random numbers (resume is exact). The
teacher-logit cache's views are its own (``CachedLogitDataset.set_epoch``) and are replayed
exactly (:func:`topkd.data.batched.crop_flip` is the cache's ``ReplayableCropFlip.apply``).

Folder datasets, per-image policies (``auto_augment``, ``re_prob``) and extra views keep the
DataLoader; :func:`why_not` says why a dataset is not batched.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler, Subset

from topkd.data.batched import CropFlipSpec, crop_flip, normalize_u8, why_not_batched

__all__ = ["BatchedLoader", "batched_loader", "why_not"]

_TAG = 0x62617463  # "batc": keeps these draws apart from any other use of (seed, epoch)


class _Arrays:
    """A dataset unwrapped: base images/labels on the device, positions -> base indices, the
    augmentation, and (cache) the teacher-logit source."""

    def __init__(self, images: Tensor, labels: Tensor, index: np.ndarray, mean: Sequence[float],
                 std: Sequence[float], spec: CropFlipSpec | None, cached: Any = None,
                 with_index: bool = False) -> None:
        dev = images.device
        self.images, self.labels = images, labels
        self.index = torch.as_tensor(index, dtype=torch.long, device=dev)
        self.mean = torch.tensor([float(m) for m in mean], device=dev).view(-1, 1, 1)
        self.std = torch.tensor([float(s) for s in std], device=dev).view(-1, 1, 1)
        if self.mean.numel() == 1 and images.shape[1] > 1:
            self.mean, self.std = (v.expand(images.shape[1], 1, 1) for v in (self.mean, self.std))
        self.spec, self.cached, self.with_index = spec, cached, with_index
        self.keep: Any = None


def why_not(ds: Dataset) -> str | None:
    """``None`` if ``ds`` (the engine's training or evaluation set) can be batched, else why."""
    return _unwrap(ds, None, probe=True)[1]


#: (id of a dataset's ``.data``, device) -> its images on that device, shared by the loaders
#: of the train and val splits of one array. Every holder of a value also holds the array, so
#: the id cannot be reused while the entry exists.
_DEVICE_IMAGES: weakref.WeakValueDictionary[tuple[int, str], Tensor] = \
    weakref.WeakValueDictionary()


def _device_images(data: Any, device: torch.device) -> Tensor:
    """``data`` (``(N, H, W)`` or ``(N, H, W, C)`` uint8) as ``(N, C, H, W)`` on ``device``; a view
    of the array on the CPU (no copy), one copy on another device."""
    key = (id(data), str(device))
    t = _DEVICE_IMAGES.get(key)
    if t is None:
        t = data if isinstance(data, Tensor) else torch.from_numpy(np.asarray(data))
        t = t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2)
        t = t.to(device)
        _DEVICE_IMAGES[key] = t
    return t


def _unwrap(ds: Dataset, device: torch.device | None, probe: bool = False
            ) -> tuple[_Arrays | None, str | None]:
    from topkd.cache import CachedLogitDataset, resolve_arrays
    from topkd.data.base import ArrayImageDataset

    with_index = False
    from topkd.engine.data import WithIndex

    if isinstance(ds, WithIndex):
        ds, with_index = ds.ds, True
    if isinstance(ds, CachedLogitDataset):
        if probe:
            return None, None
        assert device is not None
        images = ds.images.to(device)
        labels = ds.labels.to(device)
        return _Arrays(images, labels, ds.base_indices, ds.mean, ds.std, None, cached=ds,
                       with_index=with_index), None
    inner: Any = ds
    while isinstance(inner, Subset):
        inner = inner.dataset
    if not isinstance(inner, ArrayImageDataset):
        return None, (f"{type(inner).__name__} is not an in-memory (array-backed) dataset; "
                      "folder datasets decode and resize images one by one")
    hw = (int(inner.data.shape[1]), int(inner.data.shape[2]))
    why = why_not_batched(inner.transform, hw)
    if why is not None:
        return None, why
    if probe:
        return None, None
    assert device is not None
    base, index = resolve_arrays(ds)
    spec = CropFlipSpec.of_transform(base.transform, hw)
    t = base.transform
    images = _device_images(base.data, device)
    labels = torch.as_tensor(np.asarray(base.targets), dtype=torch.long, device=device)
    arrays = _Arrays(images, labels, index, t.mean, t.std, spec, with_index=with_index)
    arrays.keep = base.data  # see _DEVICE_IMAGES
    return arrays, None


class BatchedLoader:
    """Iterable of device batches over ``sampler``'s order (see the module docstring).

    ``sampler`` is the DataLoader path's sampler (``DistributedSampler`` for training, with
    ``set_epoch``; the shard sampler for evaluation); ``seed`` seeds the augmentation draws.
    """

    def __init__(self, arrays: _Arrays, sampler: Sampler[int], batch_size: int, *,
                 drop_last: bool = False, seed: int = 0) -> None:
        self.arrays, self.sampler = arrays, sampler
        self.batch_size, self.drop_last, self.seed = batch_size, drop_last, seed
        self.device = arrays.images.device
        self._params: Tensor | None = None
        self._params_epoch: int | None = None

    def __len__(self) -> int:
        n = len(self.sampler)  # type: ignore[arg-type]
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def epoch_params(self, epoch: int) -> Tensor | None:
        """The ``(N, 3 * tiles)`` crop/flip parameters of every sample position in ``epoch``."""
        spec = self.arrays.spec
        if spec is None or spec.identity:
            return None
        if self._params_epoch != epoch:
            ss = np.random.SeedSequence([self.seed, epoch, _TAG]).generate_state(2, np.uint32)
            g = torch.Generator().manual_seed(int(ss[0]) << 31 ^ int(ss[1]))
            n = len(self.arrays.index)
            self._params = spec.sample(n, g).to(self.device)
            self._params_epoch = epoch
        return self._params

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        a = self.arrays
        order = torch.as_tensor(list(iter(self.sampler)), dtype=torch.long)
        stop = len(self) * self.batch_size if self.drop_last else len(order)
        params = self.epoch_params(int(getattr(self.sampler, "epoch", 0)))
        for s in range(0, stop, self.batch_size):
            pos_cpu = order[s:s + self.batch_size]
            pos = pos_cpu.to(self.device, non_blocking=True)
            idx = a.index[pos]
            u8 = a.images[idx]
            if a.cached is not None:
                x, t = self._replay(u8, pos_cpu.numpy())
            else:
                if params is not None:
                    u8 = a.spec.apply(u8, params[pos])  # type: ignore[union-attr]
                x, t = normalize_u8(u8, a.mean, a.std), None
            out: tuple[Tensor, ...] = (x, a.labels[idx])
            if t is not None:
                out = (*out, t)
            if a.with_index:
                out = (*out, pos)
            yield out

    def _replay(self, u8: Tensor, pos: np.ndarray) -> tuple[Tensor, Tensor]:
        """The teacher-logit cache's view of each sample: its stored crop/flip, its logits."""
        ds = self.arrays.cached
        rows, views = ds.rows[pos], ds.views_for(pos)
        aug = ds.cache.augment
        if aug is not None:
            params = torch.from_numpy(np.asarray(ds.cache.params[rows, views], dtype=np.int64))
            u8 = crop_flip(u8, params.reshape(len(pos), -1), aug.padding, fill=aug.fill,
                           tiles=int(getattr(aug, "tiles", 1)))
        t = ds.cache.dense_logits(rows, views).to(self.device, non_blocking=True)
        return normalize_u8(u8, self.arrays.mean, self.arrays.std), t


def batched_loader(ds: Dataset, sampler: Sampler[int], batch_size: int, device: torch.device,
                   *, drop_last: bool = False, seed: int = 0) -> BatchedLoader | None:
    """A :class:`BatchedLoader` over ``ds``, or ``None`` when it cannot be batched."""
    arrays, _ = _unwrap(ds, device)
    if arrays is None:
        return None
    return BatchedLoader(arrays, sampler, batch_size, drop_last=drop_last, seed=seed)
