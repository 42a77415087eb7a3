"""Offline distillation with a teacher-logit cache (as in Fast Knowledge Distillation).

The teacher's logits are computed once and reused for every student epoch, method and seed.
For augmented training the cache stores the logits of ``V`` augmented *views* per image together
with the augmentation parameters that produced them; at training time a view is drawn per
sample and epoch, the SAME augmentation is replayed on the image (pixel-exact) and the cached
logits are returned with it, so the student sees exactly the input the teacher saw.

Storage (a directory, every array a memory-mappable ``.npy``)::

    PATH/header.json      format, teacher name, checkpoint/weights SHA-256, dataset, data SHA-256,
                          num_classes, n, V, K, dtype, augmentation schema, normalisation
    PATH/indices.npy      (N,)  int64   row -> index into the base dataset's ``.data``
    PATH/params.npy       (N,V,P) uint8 augmentation parameters of each view
    PATH/logits.npy       (N,V,C)       full form (float16/float32)
    PATH/topk_idx.npy     (N,V,K)       top-K form: class indices (uint8/uint16/int32)
    PATH/topk_logp.npy    (N,V,K)       top-K form: teacher log-probabilities (T=1) of those classes
    PATH/rest_logmass.npy (N,V)         top-K form: log of the probability mass of the C-K others

Top-K reconstruction (``dense`` logits handed to the losses): the K stored entries are the exact
teacher log-probabilities; every other class gets ``log(rest_mass / (C-K))``, i.e. the rest share
the remaining mass uniformly. Consequences (see docs/architecture.md, "Teacher-logit cache"):

* exact for every loss when ``K >= C-1`` (a single remaining class *is* uniform), and always for
  the teacher's top-K ranking, its top-K probabilities at T=1, argmax, and TSM's choice of the
  top-k set and ground-truth correction decision when ``k <= K``;
* an approximation otherwise: the teacher distribution at T=1 moves by at most
  ``||p - p~||_1 <= 2 * rest_mass`` (which bounds the error of the KD(T=1) gradient
  ``q - p`` w.r.t. student logits); at T>1, DKD's NCKD, TDL's non-top-K cosine and the
  contrastive term see a flattened tail. Use the full form when exactness matters.

Engine contract (``train.teacher_cache=PATH``)::

    ds = wrap_dataset(train_dataset, PATH, seed=cfg.seed, teacher_name=cfg.teacher.name,
                      checkpoint=cfg.teacher.checkpoint, dataset_name=cfg.data.name)
    for epoch in range(1, epochs + 1):
        ds.set_epoch(epoch)            # BEFORE creating the DataLoader iterator
        for x, y, t in DataLoader(ds, ...):   # t: (B, C) float32 dense teacher logits
            ...

``train_dataset`` is an array-backed dataset (``.data`` uint8, ``.targets``) or a (nested)
``torch.utils.data.Subset`` of one (e.g. from ``train_val_split``); its own transform is NOT
used: the cache's replayable augmentation and normalisation replace it. Any header field given
(``teacher_name``, ``checkpoint`` -> SHA-256, ``dataset_name``) must match or
:class:`CacheMismatchError` is raised; the images/labels fingerprint is always checked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

# One hash per concept, shared with the engine: a file (checkpoint) and a set of weights.
from topkd.checkpoints import sha256_file as file_sha256
from topkd.checkpoints import state_dict_sha256

__all__ = [
    "CACHE_FORMAT",
    "CacheMismatchError",
    "CachedLogitDataset",
    "ReplayableCropFlip",
    "TeacherLogitCache",
    "build_cache",
    "default_augment",
    "bytes_per_sample",
    "file_sha256",
    "resolve_arrays",
    "transform_mismatch",
    "wrap_dataset",
]

CACHE_FORMAT = "topkd-teacher-cache/1"


class CacheMismatchError(ValueError):
    """The cache was built for another teacher, checkpoint, dataset or data than this run."""


# --------------------------------------------------------------------------------------------
# Replayable augmentation
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReplayableCropFlip:
    """RandomCrop(padding, fill) + RandomHorizontalFlip(0.5) with explicit parameters, per tile.

    The image is cut into ``tiles`` equal vertical strips (1: the whole image; 2 for
    ``fashion_mnist_pairs``, whose halves must not be swapped) and each strip gets its own
    parameters ``(dy, dx, flip)`` (uint8), so one view has ``3 * tiles`` parameters.
    ``sample`` draws them; ``apply`` applies them deterministically to uint8 images
    ``(B, C, H, W)``: zero-pad each strip by ``padding``, crop the strip-sized window at
    ``(dy, dx)``, mirror if ``flip``. Replaying the same parameters always yields the same pixels
    (integer indexing only, no interpolation), which is what lets cached teacher logits be reused
    for the student's input. Equivalent to :class:`topkd.data.transforms.CropFlip` (torchvision's
    ``RandomCrop(padding=p)`` then ``RandomHorizontalFlip`` on each strip) with those draws.
    """

    padding: int = 4
    flip: bool = True
    fill: int = 0
    tiles: int = 1

    name = "crop_flip"

    @property
    def fields(self) -> tuple[str, ...]:
        one = ("dy", "dx", "flip")
        return one if self.tiles == 1 else tuple(f"{f}{t}" for t in range(self.tiles) for f in one)

    @classmethod
    def of(cls, recipe: Any) -> ReplayableCropFlip:
        """The replayable form of a dataset's :class:`topkd.data.transforms.CropFlip`."""
        return cls(padding=recipe.padding, flip=recipe.flip, tiles=recipe.tiles)

    def schema(self) -> dict[str, Any]:
        out = {"name": self.name, "padding": self.padding, "flip": self.flip,
               "fill": self.fill, "fields": list(self.fields)}
        if self.tiles != 1:  # caches of untiled images keep their header unchanged
            out["tiles"] = self.tiles
        return out

    @classmethod
    def from_schema(cls, schema: dict[str, Any]) -> ReplayableCropFlip:
        if schema.get("name") != cls.name:
            raise ValueError(f"unknown augmentation {schema.get('name')!r} in cache header")
        return cls(padding=int(schema["padding"]), flip=bool(schema["flip"]),
                   fill=int(schema.get("fill", 0)), tiles=int(schema.get("tiles", 1)))

    def identity(self, n: int) -> np.ndarray:
        """Parameters of the un-augmented view (centre crop, no flip) for ``n`` images."""
        p = np.zeros((n, self.tiles, 3), np.uint8)
        p[:, :, :2] = self.padding
        return p.reshape(n, 3 * self.tiles)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``(n, 3 * tiles)`` uint8 parameters ``(dy, dx, flip)`` per tile, dy/dx uniform in
        ``[0, 2*padding]``."""
        p = np.empty((n, self.tiles, 3), np.uint8)
        p[:, :, :2] = rng.integers(0, 2 * self.padding + 1, size=(n, self.tiles, 2))
        p[:, :, 2] = rng.integers(0, 2, size=(n, self.tiles)) if self.flip else 0
        return p.reshape(n, 3 * self.tiles)

    def apply(self, images: torch.Tensor, params: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Apply ``params`` ``(B, 3 * tiles)`` to uint8 ``images`` ``(B, C, H, W)`` (vectorised)."""
        b, c, h, w = images.shape
        nt = self.tiles
        if w % nt:
            raise ValueError(f"image width {w} is not divisible into {nt} tiles")
        tw = w // nt
        params = torch.as_tensor(np.asarray(params), dtype=torch.long).reshape(b * nt, 3)
        # (B, C, H, nt, tw) -> (B*nt, C, H, tw): every strip is an image of its own
        tiles = images.reshape(b, c, h, nt, tw).permute(0, 3, 1, 2, 4).reshape(b * nt, c, h, tw)
        pad = self.padding
        padded = torch.nn.functional.pad(tiles, (pad, pad, pad, pad), value=self.fill)
        rows = params[:, 0:1] + torch.arange(h)  # (B*nt, H)
        cols = params[:, 1:2] + torch.arange(tw)  # (B*nt, tw)
        cols = torch.where(params[:, 2:3].bool(), cols.flip(1), cols)
        bi = torch.arange(b * nt)[:, None, None]
        out = padded.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]  # (B*nt,H,tw,C)
        # (B, nt, H, tw, C) -> (B, C, H, nt, tw) = (B, C, H, W)
        out = out.reshape(b, nt, h, tw, c).permute(0, 4, 2, 1, 3).reshape(b, c, h, w)
        return out.contiguous()


def _no_aug_schema() -> dict[str, Any]:
    return {"name": "none", "fields": []}


# --------------------------------------------------------------------------------------------
# Dataset access
# --------------------------------------------------------------------------------------------
def resolve_arrays(dataset: Dataset) -> tuple[Dataset, np.ndarray]:
    """Unwrap (nested) ``Subset``s: ``(base_dataset, base_indices)``.

    The base must be array-backed (``.data`` uint8 images, ``.targets`` labels).
    """
    indices: np.ndarray | None = None
    ds: Any = dataset
    while isinstance(ds, Subset):
        idx = np.asarray(ds.indices, dtype=np.int64)
        indices = idx if indices is None else idx[indices]
        ds = ds.dataset
    if not (hasattr(ds, "data") and hasattr(ds, "targets")):
        raise TypeError(
            f"{type(ds).__name__} is not array-backed: the teacher-logit cache needs a dataset "
            "with uint8 `.data` and `.targets` (or a Subset of one)"
        )
    n = len(ds.data)
    if indices is None:
        indices = np.arange(n, dtype=np.int64)
    return ds, indices


def _images_nchw(data: Any) -> torch.Tensor:
    """Base ``.data`` as a uint8 ``(N, C, H, W)`` tensor (no copy when already in that layout)."""
    if isinstance(data, torch.Tensor):
        t = data
    else:
        arr = np.asarray(data)
        t = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
    if t.dtype != torch.uint8:
        raise TypeError(f"dataset .data must be uint8, got {t.dtype}")
    if t.ndim == 3:  # (N, H, W) grey
        return t.unsqueeze(1)
    if t.ndim == 4 and t.shape[-1] in (1, 3) and t.shape[1] not in (1, 3):  # (N, H, W, C)
        return t.permute(0, 3, 1, 2)
    if t.ndim == 4:
        return t
    raise ValueError(f"unsupported image array shape {tuple(t.shape)}")


def _targets(ds: Any) -> np.ndarray:
    t = ds.targets
    return (t.numpy() if isinstance(t, torch.Tensor) else np.asarray(t)).astype(np.int64)


def _data_sha256(images: torch.Tensor, labels: np.ndarray, indices: np.ndarray) -> str:
    """Fingerprint of exactly the cached samples (pixels + labels, in cache order)."""
    h = hashlib.sha256()
    sel = torch.from_numpy(np.array(indices, dtype=np.int64))  # copy: memmaps are read-only
    for start in range(0, len(indices), 8192):  # bounded memory
        h.update(images[sel[start:start + 8192]].contiguous().numpy().tobytes())
    h.update(np.ascontiguousarray(labels[indices]).tobytes())
    return h.hexdigest()


def _norm_stats(ds: Any, dataset_name: str | None, channels: int,
                mean: Sequence[float] | None, std: Sequence[float] | None
                ) -> tuple[list[float], list[float]]:
    """Normalisation: explicit > ``ds.mean/std`` > ``ds.info`` > ``topkd.data.dataset_info``."""
    if mean is None or std is None:
        info = getattr(ds, "info", None)  # topkd.data datasets carry the DatasetInfo used
        if getattr(ds, "mean", None) is not None and getattr(ds, "std", None) is not None:
            mean, std = ds.mean, ds.std
        elif getattr(info, "mean", None) is not None:
            mean, std = info.mean, info.std
        elif dataset_name is not None:
            from topkd.data import dataset_info  # lazy: keeps the cache usable without it

            info = dataset_info(dataset_name)
            mean, std = info.mean, info.std
        else:
            raise ValueError("pass mean/std (or dataset_name) to know how to normalise images")
    m, s = [float(v) for v in mean], [float(v) for v in std]
    if len(m) == 1 and channels > 1:
        m, s = m * channels, s * channels
    return m, s


def _normalise(u8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (u8.float().div_(255.0) - m) / s


def default_augment(base: Any) -> ReplayableCropFlip:
    """The replayable crop/flip of an (unwrapped) dataset: its ``crop_flip`` recipe (every
    ``topkd.data`` dataset has one; per-half for ``fashion_mnist_pairs``), else crop + flip with
    padding 2 for images up to 28x28 and 4 otherwise (Fashion-MNIST's and CIFAR's recipes)."""
    recipe = getattr(base, "crop_flip", None)
    if recipe is not None:
        return ReplayableCropFlip.of(recipe)
    h, w = _images_nchw(base.data).shape[-2:]
    if h != w:
        raise ValueError(f"{type(base).__name__} has {h}x{w} images and no crop_flip recipe: "
                         "pass augment=ReplayableCropFlip(...) (tiles=2 for two side-by-side "
                         "images) or augment=None")
    return ReplayableCropFlip(padding=2 if w <= 28 else 4, flip=True)


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------
def bytes_per_sample(num_classes: int, views: int = 1, topk: int | None = None,
                     dtype: str = "float16", aug_params: int = 3) -> int:
    """Disk bytes per training sample (all views, excluding the 8-byte index and the header)."""
    vb = np.dtype(dtype).itemsize
    if topk is None:
        per_view = num_classes * vb
    else:
        per_view = topk * (_index_dtype(num_classes).itemsize + vb) + vb
    return views * (per_view + aug_params)


def _index_dtype(num_classes: int) -> np.dtype:
    if num_classes <= 256:
        return np.dtype(np.uint8)
    return np.dtype(np.uint16) if num_classes <= 65536 else np.dtype(np.int32)


@torch.no_grad()
def build_cache(
    teacher: nn.Module,
    dataset: Dataset,
    path: str | Path,
    views: int = 1,
    topk: int | None = None,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
    progress: bool = True,
    *,
    augment: ReplayableCropFlip | None | str = "default",
    dtype: str = "float16",
    seed: int = 0,
    teacher_name: str | None = None,
    checkpoint: str | Path | None = None,
    dataset_name: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    identity_first: bool = False,
) -> Path:
    """Run ``teacher`` once over ``views`` augmented views of every sample and store the logits.

    Args:
        teacher: the teacher network (put in eval mode here).
        dataset: array-backed training set or a Subset of one (its transform is ignored).
        path: output directory (created; existing cache files are overwritten).
        views: ``V``, number of augmented views per image (1 with ``augment=None``).
        topk: ``None`` stores full logits; ``K`` stores the top-K sparse form.
        augment: a :class:`ReplayableCropFlip`, ``None`` (no augmentation) or ``"default"``
            (:func:`default_augment`: the dataset's own crop/flip recipe).
        dtype: ``"float16"`` or ``"float32"`` for stored logits / log-probs.
        seed: seeds the augmentation parameters (the cache is reproducible).
        identity_first: make view 0 the un-augmented image.
        teacher_name, checkpoint, dataset_name: recorded in the header and checked on use.
        mean, std: normalisation (default: the dataset's, or ``topkd.data.dataset_info``).

    Returns the cache directory.
    """
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be 'float16' or 'float32', got {dtype!r}")
    if augment == "default":
        augment = default_augment(resolve_arrays(dataset)[0])
    if augment is None and views != 1:
        raise ValueError("views > 1 needs an augmentation (augment=None gives a single view)")
    if views < 1:
        raise ValueError("views must be >= 1")
    base, indices = resolve_arrays(dataset)
    images = _images_nchw(base.data)
    labels = _targets(base)
    name = dataset_name or getattr(base, "name", None)
    mean_, std_ = _norm_stats(base, name, images.shape[1], mean, std)
    n = len(indices)
    device = torch.device(device)
    teacher = teacher.to(device).eval()

    rng = np.random.default_rng(seed)
    if augment is None:
        params = np.zeros((n, 1, 0), np.uint8)
    else:
        params = np.stack([augment.sample(n, rng) for _ in range(views)], axis=1)
        if identity_first:
            params[:, 0] = augment.identity(n)

    num_classes: int | None = None
    out: dict[str, np.ndarray] = {}
    vdt = np.dtype(dtype)
    bar = _progress(n * views, "teacher-logit cache", progress)
    t0 = time.perf_counter()
    sel_all = torch.from_numpy(np.array(indices, dtype=np.int64))
    for start in range(0, n, batch_size):
        rows = slice(start, min(start + batch_size, n))
        u8 = images[sel_all[rows]]
        for v in range(views):
            x = u8 if augment is None else augment.apply(u8, params[rows, v])
            logits = teacher(_normalise(x, mean_, std_).to(device)).float().cpu()
            if num_classes is None:
                num_classes = logits.shape[1]
                if topk is not None and not 1 <= topk <= num_classes:
                    raise ValueError(f"topk must be in [1, {num_classes}], got {topk}")
                if topk is None:
                    out["logits"] = np.empty((n, views, num_classes), vdt)
                else:
                    out["topk_idx"] = np.empty((n, views, topk), _index_dtype(num_classes))
                    out["topk_logp"] = np.empty((n, views, topk), vdt)
                    out["rest_logmass"] = np.empty((n, views), vdt)
            if topk is None:
                out["logits"][rows, v] = logits.numpy()
            else:
                idx, logp, rest = _sparsify(logits, topk)
                out["topk_idx"][rows, v] = idx.numpy()
                out["topk_logp"][rows, v] = logp.numpy()
                out["rest_logmass"][rows, v] = rest.numpy()
            bar.update(logits.shape[0])
    bar.close()
    assert num_classes is not None, "empty dataset"

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for f in ("logits", "topk_idx", "topk_logp", "rest_logmass"):
        (path / f"{f}.npy").unlink(missing_ok=True)
    np.save(path / "indices.npy", indices)
    np.save(path / "params.npy", params)
    for k, arr in out.items():
        np.save(path / f"{k}.npy", arr)
    header = {
        "format": CACHE_FORMAT,
        "teacher_name": teacher_name,
        "checkpoint_sha256": file_sha256(checkpoint) if checkpoint else None,
        "weights_sha256": state_dict_sha256(teacher.state_dict()),
        "dataset": name,
        "data_sha256": _data_sha256(images, labels, indices),
        "base_n": len(images),
        "n": n,
        "num_classes": num_classes,
        "views": views,
        "topk": topk,
        "dtype": dtype,
        "augment": augment.schema() if augment is not None else _no_aug_schema(),
        "mean": mean_,
        "std": std_,
        "image_shape": list(images.shape[1:]),
        "seed": seed,
        "build_seconds": round(time.perf_counter() - t0, 3),
        "bytes_per_sample": bytes_per_sample(num_classes, views, topk, dtype,
                                             params.shape[2]),
    }
    (path / "header.json").write_text(json.dumps(header, indent=2) + "\n")
    return path


def _sparsify(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k (indices, log-probs) and the log of the remaining probability mass."""
    logp = torch.log_softmax(logits.float(), dim=1)
    vals, idx = logp.topk(k, dim=1)
    if k == logits.shape[1]:
        rest = torch.full((logits.shape[0],), -math.inf)
    else:
        mask = torch.ones_like(logp, dtype=torch.bool).scatter_(1, idx, False)
        rest = torch.logsumexp(logp.masked_fill(~mask, -math.inf), dim=1)
    return idx, vals, rest


class _NullBar:
    def update(self, n: int = 1) -> None: ...

    def close(self) -> None: ...


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return _NullBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the train extra
        return _NullBar()
    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, leave=False)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
class TeacherLogitCache:
    """A cache opened read-only (memory-mapped arrays)."""

    def __init__(self, path: Path, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.path = path
        self.header = header
        self.arrays = arrays
        self.num_classes = int(header["num_classes"])
        self.views = int(header["views"])
        self.topk: int | None = header["topk"]
        aug = header["augment"]
        self.augment = None if aug["name"] == "none" else ReplayableCropFlip.from_schema(aug)
        self.indices: np.ndarray = arrays["indices"]
        self.params: np.ndarray = arrays["params"]

    @classmethod
    def open(cls, path: str | Path, mmap: bool = True) -> TeacherLogitCache:
        """Open a cache directory; raises ``FileNotFoundError``/``CacheMismatchError`` if bad."""
        path = Path(path)
        hp = path / "header.json"
        if not hp.is_file():
            raise FileNotFoundError(
                f"no teacher-logit cache at {path} (missing header.json); build one with "
                "topkd.cache.build_cache or `topkd demo`"
            )
        header = json.loads(hp.read_text())
        if header.get("format") != CACHE_FORMAT:
            raise CacheMismatchError(
                f"{hp}: format {header.get('format')!r}, this topkd reads {CACHE_FORMAT!r}; rebuild"
            )
        names = ["indices", "params"] + (
            ["logits"] if header["topk"] is None else ["topk_idx", "topk_logp", "rest_logmass"])
        mode = "r" if mmap else None
        arrays = {k: np.load(path / f"{k}.npy", mmap_mode=mode) for k in names}
        return cls(path, header, arrays)

    def __len__(self) -> int:
        return len(self.indices)

    def disk_bytes(self) -> int:
        """Total bytes of the cache files on disk."""
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())

    def check(self, **expected: Any) -> None:
        """Raise :class:`CacheMismatchError` listing every header field that differs.

        ``None`` values are not checked. ``checkpoint=PATH`` is compared by SHA-256.
        """
        diffs = []
        ckpt = expected.pop("checkpoint", None)
        if ckpt is not None:
            expected["checkpoint_sha256"] = file_sha256(ckpt)
        for k, v in expected.items():
            if v is not None and self.header.get(k) != v:
                diffs.append(f"  {k}: cache has {self.header.get(k)!r}, this run has {v!r}")
        if diffs:
            raise CacheMismatchError(
                f"teacher-logit cache {self.path} does not match this run:\n" + "\n".join(diffs)
                + "\nRebuild it (topkd.cache.build_cache) or point train.teacher_cache elsewhere."
            )

    def dense_logits(self, rows: np.ndarray, views: np.ndarray) -> torch.Tensor:
        """Dense float32 teacher logits ``(B, C)`` for cache ``rows`` and ``views``.

        Full form: the stored logits. Top-K form: log-probabilities with the non-top-K classes
        sharing the remaining mass uniformly (see the module docstring).
        """
        rows = np.asarray(rows)
        views = np.asarray(views)
        if self.topk is None:
            return torch.from_numpy(self.arrays["logits"][rows, views].astype(np.float32))
        idx = torch.from_numpy(self.arrays["topk_idx"][rows, views].astype(np.int64))
        logp = torch.from_numpy(self.arrays["topk_logp"][rows, views].astype(np.float32))
        c, k = self.num_classes, self.topk
        if k == c:
            fill = torch.zeros(len(rows))
        else:
            rest = torch.from_numpy(self.arrays["rest_logmass"][rows, views].astype(np.float32))
            # floor keeps the losses finite when the tail mass underflows (exp(-80) ~ 1e-35)
            fill = (rest - math.log(c - k)).clamp_min(-80.0)
        dense = fill[:, None].expand(len(rows), c).clone()
        return dense.scatter_(1, idx, logp)


# --------------------------------------------------------------------------------------------
# Training-time dataset
# --------------------------------------------------------------------------------------------
class CachedLogitDataset(Dataset):
    """``(x, y, teacher_logits)`` items: replayed augmented image, label, cached dense logits.

    For every epoch a view index per sample is drawn from ``default_rng([seed, epoch])``
    (deterministic given seed and epoch, independent of DataLoader workers and order); call
    :meth:`set_epoch` before iterating. :meth:`batch` and :meth:`iter_batches` give the same
    items vectorised (much faster than a DataLoader on small images).
    """

    def __init__(self, cache: TeacherLogitCache, base: Any, base_indices: np.ndarray,
                 seed: int = 0) -> None:
        self.cache = cache
        self.seed = seed
        self.augment = cache.augment is not None
        self.images = _images_nchw(base.data)
        self.labels = torch.as_tensor(_targets(base))
        self.base_indices = np.asarray(base_indices, dtype=np.int64)
        row_of = np.full(len(self.images), -1, np.int64)
        row_of[cache.indices] = np.arange(len(cache.indices))
        self.rows = row_of[self.base_indices]
        missing = int((self.rows < 0).sum())
        if missing:
            raise CacheMismatchError(
                f"teacher-logit cache {cache.path} does not cover {missing} of the "
                f"{len(self.rows)} training samples (built on another split?)"
            )
        self.mean, self.std = cache.header["mean"], cache.header["std"]
        self.epoch = 0
        self._views = np.zeros(len(self.rows), np.int64)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's view per sample (deterministic in ``(seed, epoch)``)."""
        self.epoch = int(epoch)
        rng = np.random.default_rng([self.seed, self.epoch])
        self._views = rng.integers(0, self.cache.views, size=len(self.rows))

    def views_for(self, positions: np.ndarray) -> np.ndarray:
        """The view indices used this epoch for dataset positions ``positions``."""
        return self._views[np.asarray(positions)]

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, positions: np.ndarray | Sequence[int]
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Vectorised items for dataset ``positions``: ``(x (B,C,H,W), y (B,), t (B,C))``."""
        pos = np.asarray(positions, dtype=np.int64)
        rows, views = self.rows[pos], self._views[pos]
        u8 = self.images[torch.as_tensor(self.base_indices[pos])]
        if self.augment:
            assert self.cache.augment is not None
            u8 = self.cache.augment.apply(u8, self.cache.params[rows, views])
        x = _normalise(u8, self.mean, self.std)
        y = self.labels[torch.as_tensor(self.base_indices[pos])]
        return x, y, self.cache.dense_logits(rows, views)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        x, y, t = self.batch([i])
        return x[0], int(y[0]), t[0]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
        # DataLoader's batched fetch (torch >= 2.2): one vectorised replay per batch
        x, y, t = self.batch(indices)
        return [(x[j], int(y[j]), t[j]) for j in range(len(indices))]

    def iter_batches(self, batch_size: int, shuffle: bool = True,
                     generator: torch.Generator | None = None, drop_last: bool = False
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Iterate the epoch in vectorised batches (no DataLoader, no worker processes)."""
        n = len(self)
        order = torch.randperm(n, generator=generator).numpy() if shuffle else np.arange(n)
        stop = n - n % batch_size if drop_last else n
        for s in range(0, stop, batch_size):
            yield self.batch(order[s:s + batch_size])


def transform_mismatch(cache: TeacherLogitCache, transform: Any) -> str | None:
    """Why the cache's replayed augmentation and normalisation differ from ``transform``.

    ``transform`` is a topkd.data training transform (``T.Compose`` of geometry ops, the
    ``uint8 -> float`` conversion and ``Normalize``). Returns ``None`` when the cache produces
    exactly what ``transform`` would (same augmentation family and parameters, same mean/std),
    else a one-line reason naming the config key to change. Foreign transforms (not a
    ``Compose``) are not checked.
    """
    import torchvision.transforms as T

    if transform is not None and not isinstance(transform, T.Compose):
        return None
    ops = list(transform.transforms) if transform is not None else []
    norm = [op for op in ops if isinstance(op, T.Normalize)]
    geometry = [op for op in ops if not isinstance(op, (T.Normalize, T.PILToTensor, T.ToTensor))
                and type(op).__name__ != "ToFloat"]
    aug = cache.augment
    cached = ("no augmentation" if aug is None else
              f"RandomCrop(padding {aug.padding}){' + HFlip' if aug.flip else ''}"
              + (f" on each of {aug.tiles} tiles" if aug.tiles != 1 else ""))
    if geometry and aug is None:
        return (f"the dataset's training augmentation ({', '.join(map(repr, geometry))}) would "
                "not be applied: the cache was built without augmentation (one view). Set "
                "data.augment=false, or build an augmented cache")
    if aug is not None and not geometry:
        return (f"data.augment=false, but the cache replays augmented views ({cached}): set "
                "data.augment=true, or build the cache without augmentation (--no-augment)")
    if aug is not None:
        from topkd.data.transforms import PerTile

        tiles, inner = 1, geometry
        if len(geometry) == 1 and isinstance(geometry[0], PerTile):  # per-tile crop/flip
            tiles, inner = geometry[0].tiles, list(getattr(geometry[0].transform, "transforms",
                                                           [geometry[0].transform]))
        crop, flip = inner[0], inner[1:]
        same = (tiles == aug.tiles and isinstance(crop, T.RandomCrop)
                and crop.padding in (aug.padding, [aug.padding])
                and crop.fill == aug.fill and crop.padding_mode == "constant"
                and len(flip) == int(aug.flip)
                and all(isinstance(f, T.RandomHorizontalFlip) and f.p == 0.5 for f in flip))
        if not same:
            return (f"the cache replays {cached}, but this dataset's training augmentation is "
                    f"{', '.join(map(repr, geometry))}: the student would not see the images "
                    "the teacher was trained on. Train online (no train.teacher_cache), or set "
                    "data.augment=false with a cache built without augmentation")
    h_mean, h_std = cache.header["mean"], cache.header["std"]
    if not norm:
        return (f"the dataset is not normalised (normalize=false in data.kwargs?), but the cache "
                f"normalises with mean {h_mean}, std {h_std}")
    mean, std = list(norm[-1].mean), list(norm[-1].std)
    if len(mean) == 1 and len(h_mean) > 1:
        mean, std = mean * len(h_mean), std * len(h_std)
    if not (np.allclose(mean, h_mean, rtol=0, atol=1e-6)
            and np.allclose(std, h_std, rtol=0, atol=1e-6)):
        return (f"the dataset normalises with mean {mean}, std {std} (data.kwargs), the cache with "
                f"mean {h_mean}, std {h_std}: rebuild the cache with the same statistics")
    return None


def wrap_dataset(
    train_dataset: Dataset,
    cache_path: str | Path,
    *,
    seed: int = 0,
    teacher_name: str | None = None,
    checkpoint: str | Path | None = None,
    dataset_name: str | None = None,
    match_transform: bool = False,
) -> CachedLogitDataset:
    """Wrap ``train_dataset`` so that items are ``(x, y, teacher_logits_dense_float32)``.

    See the module docstring for the engine contract. ``teacher_name``/``checkpoint``/
    ``dataset_name`` (when given) must match the cache header; the fingerprint of the cached
    images and labels is always checked. The augmentation is the cache's (replayed per view);
    a cache built with ``augment=None`` yields un-augmented images. With
    ``match_transform=True`` (the engine's setting) the base dataset's own training transform
    must be what the cache replays (augmentation and normalisation, :func:`transform_mismatch`),
    so that no data option is silently replaced; otherwise it is simply ignored.
    """
    cache = TeacherLogitCache.open(cache_path)
    cache.check(teacher_name=teacher_name, checkpoint=checkpoint, dataset=dataset_name)
    base, indices = resolve_arrays(train_dataset)
    if match_transform and (why := transform_mismatch(cache, getattr(base, "transform", None))):
        raise CacheMismatchError(why)
    images = _images_nchw(base.data)
    if list(images.shape[1:]) != list(cache.header["image_shape"]):
        raise CacheMismatchError(
            f"cache {cache.path} images are {cache.header['image_shape']}, "
            f"dataset images are {list(images.shape[1:])}"
        )
    if len(images) != cache.header["base_n"]:
        raise CacheMismatchError(
            f"cache {cache.path} was built on a dataset of {cache.header['base_n']} images, "
            f"this one has {len(images)}"
        )
    fp = _data_sha256(images, _targets(base), np.asarray(cache.indices))
    if fp != cache.header["data_sha256"]:
        raise CacheMismatchError(
            f"cache {cache.path}: the dataset's images/labels differ from those the cache was "
            "built on (data_sha256 mismatch); rebuild the cache"
        )
    return CachedLogitDataset(cache, base, indices, seed=seed)


# --------------------------------------------------------------------------------------------
# Command line: build a cache for `train.teacher_cache`
# --------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m topkd.cache --teacher NAME --checkpoint PT --dataset NAME --out DIR``.

    Builds the cache over the WHOLE training split, so that any ``train_val_split`` of it (any
    ``data.val_fraction``/``val_seed``) is covered by ``wrap_dataset``.
    """
    import argparse

    p = argparse.ArgumentParser(prog="python -m topkd.cache", description=main.__doc__)
    p.add_argument("--teacher", required=True, help="topkd.models name (teacher.name)")
    p.add_argument("--checkpoint", required=True, help="teacher weights (teacher.checkpoint)")
    p.add_argument("--dataset", required=True, help="topkd.data name (data.name)")
    p.add_argument("--root", default=None, help="dataset root (data.root)")
    p.add_argument("--out", required=True, help="cache directory (train.teacher_cache)")
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--topk", type=int, default=None)
    p.add_argument("--padding", type=int, default=None, help="crop padding (default: by size)")
    p.add_argument("--no-flip", action="store_true")
    p.add_argument("--no-augment", action="store_true", help="one un-augmented view")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    from topkd.checkpoints import load_weights
    from topkd.data import dataset_info, get_dataset
    from topkd.models import create_model

    info = dataset_info(a.dataset)
    ds = get_dataset(a.dataset, a.root, "train", augment=False)
    teacher = create_model(a.teacher, int(info.num_classes or 0))
    load_weights(teacher, a.checkpoint)
    aug: ReplayableCropFlip | None = default_augment(ds)
    if a.no_augment:
        aug = None
    elif a.padding is not None or a.no_flip:
        pad = a.padding if a.padding is not None else aug.padding
        aug = dataclasses.replace(aug, padding=pad, flip=not a.no_flip)
    build_cache(teacher, ds, a.out, views=1 if aug is None else a.views, topk=a.topk,
                batch_size=a.batch_size, device=a.device, augment=aug, dtype=a.dtype,
                seed=a.seed, teacher_name=a.teacher, checkpoint=a.checkpoint,
                dataset_name=a.dataset, mean=info.mean, std=info.std)
    c = TeacherLogitCache.open(a.out)
    print(f"wrote {a.out}: {len(c)} images x {c.views} views, {c.disk_bytes() / 2**20:.1f} MiB "
          f"({c.header['bytes_per_sample']} B/sample), {c.header['build_seconds']:.0f} s")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
