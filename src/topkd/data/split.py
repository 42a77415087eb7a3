"""Deterministic held-out validation split of a training set."""

from __future__ import annotations

import warnings

import numpy as np
from torch.utils.data import Dataset, Subset


def _val_counts(counts: np.ndarray, val_fraction: float) -> np.ndarray:
    """Per-class validation sizes summing to ``round(N * val_fraction)`` (largest remainder)."""
    quota = counts * val_fraction
    n_val = np.floor(quota).astype(np.int64)
    short = round(counts.sum() * val_fraction) - n_val.sum()
    order = np.argsort(-(quota - n_val), kind="stable")
    n_val[order[:short]] += 1
    return n_val


def train_val_split(
    dataset: Dataset,
    val_fraction: float,
    seed: int = 0,
    *,
    stratify: bool = True,
    eval_dataset: Dataset | None = None,
) -> tuple[Subset, Subset]:
    """Split a training set into ``(train_subset, val_subset)``, deterministically in ``seed``.

    The split is stratified by ``dataset.targets`` when available (each class contributes its
    share; the total is ``round(len(dataset) * val_fraction)``). The validation subset indexes
    ``eval_dataset`` if given, else ``dataset.eval_view()`` -- the same samples with the
    test-time transform -- so validation images are never augmented. Indices are sorted.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n = len(dataset)  # type: ignore[arg-type]
    if eval_dataset is None:
        if hasattr(dataset, "eval_view"):
            eval_dataset = dataset.eval_view()
        else:
            warnings.warn(
                f"{type(dataset).__name__} has no eval_view(); the validation subset uses the "
                "training transform. Pass eval_dataset= to avoid augmenting validation images.",
                stacklevel=2,
            )
            eval_dataset = dataset
    if len(eval_dataset) != n:  # type: ignore[arg-type]
        raise ValueError(f"eval_dataset has {len(eval_dataset)} samples, dataset has {n}")  # type: ignore[arg-type]
    rng = np.random.default_rng(seed)
    targets = getattr(dataset, "targets", None)
    is_val = np.zeros(n, dtype=bool)
    if stratify and targets is not None:
        y = np.asarray(targets)
        classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
        for c, k in enumerate(_val_counts(counts, val_fraction)):
            members = np.flatnonzero(inverse == c)
            is_val[rng.permutation(members)[:k]] = True
    else:
        is_val[rng.permutation(n)[: round(n * val_fraction)]] = True
    train_idx = np.flatnonzero(~is_val).tolist()
    val_idx = np.flatnonzero(is_val).tolist()
    return Subset(dataset, train_idx), Subset(eval_dataset, val_idx)
