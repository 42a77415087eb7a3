"""Errors raised by the dataset readers, with messages that say how to fix the problem."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where the reader looked.

    The message names what is missing, every place that was searched and where to get the data.
    This library never downloads anything, so the fix is always a manual download/extract.
    """


def not_found(
    dataset: str,
    missing: str,
    looked_in: Iterable[Path | str],
    get_it: str,
    layout: str = "",
) -> DatasetNotFoundError:
    """Build a :class:`DatasetNotFoundError` with the standard three-part message."""
    places = "\n".join(f"  - {p}" for p in dict.fromkeys(str(p) for p in looked_in))
    msg = (
        f"{dataset}: cannot find {missing}.\nLooked in:\n{places}\n"
        f"Get it: {get_it}\n(topkd never downloads data.)"
    )
    if layout:
        msg += f"\nExpected layout:\n{layout}"
    return DatasetNotFoundError(msg)


def check_labels(labels: Sequence[int] | np.ndarray, num_classes: int, source: Path | str) -> None:
    """Raise ``ValueError`` naming ``source`` if any label is outside ``[0, num_classes)``."""
    arr = np.asarray(labels)
    if arr.size == 0:
        return
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(
            f"{source}: labels must lie in [0, {num_classes - 1}], found range [{lo}, {hi}] "
            "(corrupt or wrong file?)"
        )
