"""Evaluation: top-1/top-5 accuracy and mean CE loss, exact under DDP sharding."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from topkd.utils.dist import all_reduce_sum


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    channels_last: bool = False,
) -> dict[str, float]:
    """``{"acc1", "acc5", "loss", "n"}`` (accuracies in %) summed over every rank's shard."""
    was_training = model.training
    model.eval()
    # Sums stay on the device (float64: exact counts); one host sync at the end.
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    for batch in loader:
        x = batch[0].to(device, non_blocking=True)
        y = batch[1].to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = model(x)
        logits = logits.float()
        k = min(5, logits.size(1))
        hit = logits.topk(k, dim=1).indices.eq(y[:, None])
        sums[0] += F.cross_entropy(logits, y, reduction="sum")
        sums[1] += hit[:, 0].sum()
        sums[2] += hit.any(dim=1).sum()
        sums[3] += y.numel()
    all_reduce_sum(sums)
    model.train(was_training)
    loss, c1, c5, n = sums.tolist()
    n_ = max(n, 1.0)
    return {"acc1": 100.0 * c1 / n_, "acc5": 100.0 * c5 / n_, "loss": loss / n_, "n": int(n)}
