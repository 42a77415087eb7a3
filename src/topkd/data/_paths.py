"""Locating a dataset folder given a user ``root`` (the folder itself or one of its parents)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .errors import not_found


def find_dir(
    root: Path,
    subdirs: Sequence[str],
    required: Sequence[str],
    *,
    dataset: str,
    get_it: str,
    layout: str = "",
) -> Path:
    """Return the first of ``root``, ``root/<subdir>``... that contains every ``required`` path.

    Raises :class:`DatasetNotFoundError` naming the first missing file of the best candidate.
    """
    root = Path(root).expanduser()
    candidates = [root] + [root / s for s in subdirs]
    for cand in candidates:
        if all((cand / r).exists() for r in required):
            return cand
    # Report against the candidate that exists and has the most of what we need.
    best = max(candidates, key=lambda c: (c.is_dir(), sum((c / r).exists() for r in required)))
    missing = next(r for r in required if not (best / r).exists())
    raise not_found(dataset, f"'{missing}'", candidates, get_it, layout)
