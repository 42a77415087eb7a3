"""Distributed (DDP) setup from torchrun's environment, and rank-aware helpers.

torchrun sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``;
a plain ``python -m topkd`` has none of them and runs as a world of one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:<local_rank>`` if CUDA is available, else CPU; else ``torch.device``."""
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"train.device={spec!r} but CUDA is not available (use auto or cpu)")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    return dev


def init_distributed(device_spec: str = "auto") -> DistInfo:
    """Initialise the process group if launched by torchrun (``WORLD_SIZE > 1``).

    Backend: NCCL when the device is CUDA, Gloo on CPU. Idempotent: a second call (e.g. the
    next seed of a multi-seed run) reuses the existing group.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and device_spec.startswith("cuda:"):
        # Each process drives cuda:$LOCAL_RANK; silently replacing the index was a surprise.
        raise ValueError(
            f"train.device={device_spec!r} under DDP ({world} processes): each process uses "
            "cuda:$LOCAL_RANK; set train.device=cuda (or auto) and choose the GPUs with "
            "CUDA_VISIBLE_DEVICES")
    device = resolve_device(device_spec, local_rank)
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            kw = {"device_id": device} if device.type == "cuda" else {}
            dist.init_process_group(backend=backend, **kw)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=device)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no-op outside DDP); returns ``t``."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean_(tensors: list[torch.Tensor]) -> None:
    """Average ``tensors`` over ranks in place (what DDP does to gradients during backward), one
    all-reduce per dtype; no-op outside DDP. Every rank must pass the same shapes in the same
    order."""
    if not (dist.is_available() and dist.is_initialized()) or not tensors:
        return
    world = dist.get_world_size()
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(world)
        for t, v in zip(group, flat.split([t.numel() for t in group])):
            t.copy_(v.view_as(t))


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank ``src``'s ``obj`` on every rank (identity outside DDP)."""
    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj
