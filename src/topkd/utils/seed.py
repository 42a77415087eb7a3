"""Seeding, deterministic mode and RNG state capture/restore (``weights_only``-loadable).

The legacy global NumPy RNG is seeded/saved on purpose: it is what third-party augmentation
code draws from (hence the NPY002 exemptions).
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (CPU + every CUDA device); optionally force determinism.

    Deterministic mode makes cuDNN pick deterministic kernels and makes torch raise on ops
    without a deterministic implementation (``warn_only=False``), so a silent source of
    run-to-run noise becomes a visible error instead.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    if deterministic:
        # Required by cuBLAS for deterministic GEMMs (must be set before the first cuBLAS call).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True


def worker_init_fn(worker_id: int) -> None:
    """Seed Python and NumPy in a DataLoader worker from the torch seed the loader gave it.

    torch seeds each worker with ``base_seed + worker_id`` (``base_seed`` drawn from the
    loader's generator), but leaves ``random``/``numpy`` alone: without this, every worker
    would share NumPy's state and augmentations using NumPy would repeat across workers.
    """
    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)  # noqa: NPY002


def get_rng_state() -> dict[str, Any]:
    """All global RNG states as tensors and plain Python types (loadable with weights_only)."""
    np_state = np.random.get_state()  # noqa: NPY002
    return {
        "python": random.getstate(),
        "numpy": {
            "name": str(np_state[0]),
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`get_rng_state`."""
    py = state["python"]
    # weights_only loading may turn the inner tuple into a list; random wants tuples.
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
         n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
