"""CRD: Contrastive Representation Distillation (Tian et al., ICLR 2020).

The student's and teacher's pooled features are embedded (linear + L2 normalisation) and
contrasted with a memory bank holding one embedding per training sample: for each sample the
positive is its own bank entry (mode ``exact``; ``relax``: a random sample of its class) and
``nce_k`` negatives are random samples of other classes; an NCE loss with noise ``1 / N`` scores
them. Reference: megvii-research/mdistiller ``mdistiller/distillers/CRD.py`` and its sampling
dataset ``mdistiller/dataset/cifar100.py::CIFAR100InstanceSample`` (commit a08d46f).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._feature import compute_feats, no_ignore_index
from .base import Batch, Method, MethodContext
from .params import MethodParams, param
from .registry import register_method

__all__ = ["CRD", "CRDParams", "Embed", "contrast_scores", "crd_loss", "memory_update",
           "nce_loss", "sample_contrast_indices"]


def _l2_normalize(x: Tensor) -> Tensor:
    # mdistiller's Normalize: x / ||x||_2, no epsilon.
    return x.div(x.pow(2).sum(1, keepdim=True).pow(0.5))


class Embed(nn.Module):
    """``(B, ...) -> (B, dim_out)``: flatten, linear, L2-normalise (mdistiller's ``Embed``)."""

    def __init__(self, dim_in: int, dim_out: int = 128) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return _l2_normalize(self.linear(x.reshape(x.shape[0], -1)))


def contrast_scores(v: Tensor, memory: Tensor, contrast_idx: Tensor, temperature: float,
                    dense: bool | None = None) -> Tensor:
    r"""Unnormalised scores ``exp(<memory[idx_j], v> / T)`` of each sample against its contrast
    set: ``v (B, D)``, ``memory (N, D)`` (not differentiated), ``contrast_idx (B, K+1)`` ->
    ``(B, K+1)`` (mdistiller's ``ContrastMemory.forward`` before the division by ``Z``).

    ``dense`` picks how the dot products are formed (the same values up to float rounding):
    ``False`` gathers the ``B (K+1)`` bank rows and multiplies them (the reference's way, memory
    bound); ``True`` multiplies the whole bank ``(N, D) x (D, B)`` and picks the entries (one
    GEMM, ``N x B`` floats). ``None``: dense when ``N <= 16 (K+1)``, e.g. CIFAR-100 with the
    reference's ``K`` (about 5x faster forward + backward on one CPU thread and 1 GB less per
    step at batch 64: ``benchmarks/feature_methods.py``), gathered for ImageNet-size banks.
    """
    b, d = v.shape
    if dense is None:
        dense = memory.shape[0] <= 16 * contrast_idx.shape[1]
    if dense:
        rows = torch.arange(b, device=v.device).unsqueeze(1)
        dots = (memory.detach() @ v.t())[contrast_idx, rows]
    else:
        w = memory.index_select(0, contrast_idx.reshape(-1)).detach().view(b, -1, d)
        dots = torch.bmm(w, v.view(b, d, 1)).squeeze(2)
    return torch.exp(dots / temperature)


def nce_loss(x: Tensor, num_data: int) -> Tensor:
    r"""CRD's NCE loss of normalised scores ``x (B, K+1)`` (positive first), noise ``P_n = 1/N``:

    .. math:: -\frac1B \sum_b \Big[\log\frac{x_{b0}}{x_{b0} + K P_n + \epsilon}
              + \sum_{j\ge1} \log\frac{K P_n}{x_{bj} + K P_n + \epsilon}\Big], \quad
              \epsilon = 10^{-7}

    (mdistiller's ``ContrastLoss``; ``N`` is the training-set size).
    """
    eps = 1e-7
    b, m = x.shape[0], x.shape[1] - 1
    mpn = m / float(num_data)
    p_pos = x[:, 0]
    log_d1 = torch.log(p_pos / (p_pos + (mpn + eps)))
    p_neg = x[:, 1:]
    log_d0 = torch.log(mpn / (p_neg + (mpn + eps)))
    return -(log_d1.sum() + log_d0.sum()) / b


def crd_loss(emb_s: Tensor, emb_t: Tensor, memory_s: Tensor, memory_t: Tensor,
             contrast_idx: Tensor, temperature: float, z_s: float | Tensor, z_t: float | Tensor,
             num_data: int) -> Tensor:
    r"""CRD's two-sided contrastive loss (mdistiller ``CRD.crd_loss`` with a given ``Z``).

    ``emb_s``, ``emb_t``: ``(B, D)`` normalised embeddings; ``memory_s``/``memory_t``: ``(N, D)``
    banks of past student/teacher embeddings; ``contrast_idx (B, K+1)``. The student is scored
    against the teacher bank and vice versa:

    .. math:: \mathrm{nce}(\mathrm{scores}(e_s, M_t) / Z_s) + \mathrm{nce}(\mathrm{scores}(e_t,
              M_s) / Z_t)
    """
    out_s = contrast_scores(emb_s, memory_t, contrast_idx, temperature) / z_s
    out_t = contrast_scores(emb_t, memory_s, contrast_idx, temperature) / z_t
    return nce_loss(out_s, num_data) + nce_loss(out_t, num_data)


def memory_update(rows: Tensor, v: Tensor, momentum: float) -> Tensor:
    r"""New bank rows ``normalize(momentum * rows + (1 - momentum) * v)`` (``(B, D)`` each)."""
    pos = rows * momentum + v * (1 - momentum)
    return _l2_normalize(pos)


def sample_contrast_indices(index: Tensor, labels: Tensor, train_labels: Tensor, k: int,
                            mode: Literal["exact", "relax"] = "exact",
                            generator: torch.Generator | None = None) -> Tensor:
    r"""Each sample's contrast set ``(B, K+1)``: the positive, then ``k`` negatives.

    ``index (B,)`` and ``labels (B,)``: the batch's dataset indices and labels; ``train_labels
    (N,)``: every training sample's label. The positive is ``index`` (``exact``) or a uniform
    sample of the same class (``relax``, the sample itself included); the negatives are a
    uniform random set of ``k`` samples of *other* classes (without replacement), or ``k``
    uniform draws with replacement when a class has fewer than ``k`` others, as mdistiller's
    ``CIFAR100InstanceSample`` (``np.random.choice``; the order within a set does not matter).
    Drawn with ``generator`` (the top ``k`` of uniform keys, or ``torch.multinomial``), so that a
    resumed run draws the same sets. Rows are processed in chunks of at most ``2**26``
    ``(row, sample)`` pairs to bound memory on large datasets.
    """
    b, n = index.shape[0], train_labels.shape[0]
    dev = index.device
    out = torch.empty(b, k + 1, dtype=torch.long, device=dev)
    step = max(1, 2**26 // max(n, 1))
    for lo in range(0, b, step):  # chunks of rows (one chunk for CIFAR-size data)
        yc = labels[lo:lo + step]
        same = train_labels.unsqueeze(0) == yc.unsqueeze(1)  # (b', N)
        n_other = n - same.sum(1)
        if bool((n_other == 0).any()):
            raise ValueError("crd: a class holds every training sample; there are no negatives")
        keys = torch.rand(same.shape, generator=generator, device=dev).masked_fill_(same, -1.0)
        neg = keys.topk(k, dim=1, sorted=False).indices if k <= n else \
            torch.empty(same.shape[0], k, dtype=torch.long, device=dev)
        rep = n_other < k
        if bool(rep.any()):  # too few negatives: k draws with replacement
            rows = rep.nonzero().squeeze(1)
            neg[rows] = torch.multinomial((~same[rows]).float(), k, replacement=True,
                                          generator=generator)
        out[lo:lo + step, 1:] = neg
        if mode == "exact":
            out[lo:lo + step, 0] = index[lo:lo + step]
        else:
            pos = torch.rand(same.shape, generator=generator, device=dev).masked_fill_(~same, -1.0)
            out[lo:lo + step, 0] = pos.argmax(1)
    return out


def _gather(x: Tensor) -> Tensor:
    """Concatenate ``x`` (rank-major) over the DDP ranks; ``x`` itself outside DDP."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    world = dist.get_world_size()
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    top = int(max(s.item() for s in sizes))
    pad = x.new_zeros((top - x.shape[0], *x.shape[1:]))
    parts = [x.new_empty((top, *x.shape[1:])) for _ in range(world)]
    dist.all_gather(parts, torch.cat([x, pad]))
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def _first_occurrence(idx: Tensor) -> Tensor:
    """Positions of the first occurrence of each distinct value of ``idx``."""
    uniq, inv = torch.unique(idx, return_inverse=True)
    pos = torch.arange(idx.numel(), device=idx.device)
    first = torch.full((uniq.numel(),), idx.numel(), dtype=torch.long, device=idx.device)
    return first.scatter_reduce_(0, inv, pos, "amin")


@dataclass(frozen=True)
class CRDParams(MethodParams):
    ignore_index: int | None = no_ignore_index()
    ce: float = param(1.0, "weight of cross-entropy", check="nonneg")
    feat_weight: float = param(0.8, "weight of the CRD loss", check="pos")
    feat_dim: int = param(128, "embedding dimension of both embedders and the memory bank",
                          check="int1")
    nce_k: int = param(16384, "negatives per sample", check="int1")
    nce_t: float = param(0.07, "NCE temperature", check="pos")
    nce_momentum: float = param(0.5, "momentum of the memory bank update", check="unit_open")
    mode: Literal["exact", "relax"] = param(
        "exact", "positive: the sample's own bank entry (exact) or a random sample of its class "
                 "(relax)")


@register_method("crd")
class CRD(Method):
    r"""CRD: ``ce * CE + feat_weight * (nce(s vs teacher bank) + nce(t vs student bank))``.

    ``e_s = Embed_s(pooled_s)``, ``e_t = Embed_t(pooled_t)`` (linear to ``feat_dim`` + L2 norm,
    input sizes from the models' ``pooled_feat``); scores ``exp(<M[j], e> / nce_t) / Z`` over the
    contrast set of :func:`sample_contrast_indices`; ``Z = mean(first batch's scores) * N`` fixed
    at the first step; after each step the bank rows of the batch move to
    ``normalize(m * M[i] + (1 - m) * e)``. CIFAR-100 reference (mdistiller ``cfg.py``): ce 1,
    feat_weight 0.8, feat_dim 128, nce_k 16384, nce_t 0.07, momentum 0.5, mode exact.

    The contrast sets are drawn as mdistiller's sampling dataset draws them (other-class
    negatives; needs ``MethodContext.train_labels``), from a generator seeded by one draw of the
    global torch RNG plus the DDP rank: a resumed run draws the same sets.

    The memory banks (2 x N x feat_dim floats) and ``Z`` are buffers: saved in checkpoints and
    restored on resume. Under DDP every rank updates its banks with the embeddings and indices
    of all ranks (all-gathered; a sample padded onto two ranks updates once) and ``Z`` is the
    mean over ranks, so the banks stay identical on every rank and equal to a single process
    with the global batch.
    """

    Params = CRDParams
    paper = "Tian et al., 'Contrastive Representation Distillation', ICLR 2020"
    code = "megvii-research/mdistiller: mdistiller/distillers/CRD.py"
    student_taps = ("pooled_feat",)
    teacher_taps = ("pooled_feat",)
    needs_index = True
    trainable_modules = True
    ddp_synced_buffers = ("memory_s", "memory_t", "z", "train_labels")

    def __init__(self, params: CRDParams | None = None, ctx: MethodContext | None = None) -> None:
        super().__init__(params, ctx)
        if ctx is None or ctx.num_samples is None:
            raise ValueError("crd needs MethodContext.num_samples (the training-set size) for "
                             "its memory bank")
        if ctx.train_labels is None:
            raise ValueError("crd needs MethodContext.train_labels (every training sample's "
                             "label) to draw negatives from other classes")
        p, n = self.params, int(ctx.num_samples)
        labels = torch.as_tensor(ctx.train_labels, dtype=torch.long).reshape(-1)
        if labels.numel() != n:
            raise ValueError(f"crd: {labels.numel()} training labels for {n} samples")
        d_s = ctx.feature_shapes("student", ("pooled_feat",))["pooled_feat"]
        d_t = ctx.feature_shapes("teacher", ("pooled_feat",))["pooled_feat"]
        # Construction order as the reference (embed_s, embed_t, memory_v1, memory_v2): the
        # same global-RNG draws give the same initial weights and banks.
        self.embed_s = Embed(math.prod(d_s), p.feat_dim)
        self.embed_t = Embed(math.prod(d_t), p.feat_dim)
        stdv = 1.0 / math.sqrt(p.feat_dim / 3)
        #: Student-embedding bank (mdistiller's memory_v1): scores the teacher embedding.
        self.register_buffer("memory_s", torch.rand(n, p.feat_dim).mul_(2 * stdv).add_(-stdv))
        #: Teacher-embedding bank (memory_v2): scores the student embedding.
        self.register_buffer("memory_t", torch.rand(n, p.feat_dim).mul_(2 * stdv).add_(-stdv))
        #: Normalisation constants (Z_s, Z_t); negative until set from the first batch.
        self.register_buffer("z", torch.full((2,), -1.0))
        self.register_buffer("train_labels", labels, persistent=False)
        self.num_data = n
        self._z_ready = False
        #: How scores are formed (:func:`contrast_scores`): one GEMM over the whole bank when
        #: it is small next to the contrast sets (CIFAR), else the reference's gather.
        self.dense = n <= 16 * (p.nce_k + 1)

    def distill(self, batch: Batch, terms: dict[str, Tensor]) -> Tensor:
        p = self.params
        idx = batch.index
        if idx is None:
            raise ValueError("crd needs batch.index (each sample's index in the training set)")
        idx = idx.to(self.memory_s.device, torch.long)
        y = batch.labels
        if y.is_floating_point():
            raise ValueError("crd needs integer labels to draw negatives (no mixup/cutmix)")
        contrast_idx = sample_contrast_indices(idx, y.to(idx.device), self.train_labels, p.nce_k,
                                               p.mode, self._generator(idx.device))
        e_s = self.embed_s(compute_feats(batch.student.feats["pooled_feat"]))
        e_t = self.embed_t(compute_feats(batch.teacher.feats["pooled_feat"]))  # type: ignore[union-attr]
        out_s = contrast_scores(e_s, self.memory_t, contrast_idx, p.nce_t, self.dense)
        out_t = contrast_scores(e_t, self.memory_s, contrast_idx, p.nce_t, self.dense)
        if not self._z_ready and bool(self.z[0] >= 0):  # set, or restored from a checkpoint
            self._z_ready = True
        if not self._z_ready:  # first step: Z = mean score * N (mean over the ranks)
            with torch.no_grad():
                z = torch.stack([out_s.mean(), out_t.mean()]) * self.num_data
                if dist.is_available() and dist.is_initialized():
                    dist.all_reduce(z)
                    z /= dist.get_world_size()
                self.z.copy_(z)
            self._z_ready = True
        loss = nce_loss(out_s / self.z[0], self.num_data) + \
            nce_loss(out_t / self.z[1], self.num_data)
        self._update_memory(idx, e_s.detach(), e_t.detach())
        terms["crd"] = loss
        return p.feat_weight * loss

    @staticmethod
    def _generator(device: torch.device) -> torch.Generator:
        """A generator seeded from the global torch RNG (one draw, the same on every rank, so a
        resumed run repeats it) plus the DDP rank (ranks draw independent contrast sets)."""
        seed = int(torch.randint(0, 2**62, (1,)).item())
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        return torch.Generator(device).manual_seed(seed + rank)

    @torch.no_grad()
    def _update_memory(self, idx: Tensor, e_s: Tensor, e_t: Tensor) -> None:
        idx = _gather(idx)
        e = _gather(torch.cat([e_s, e_t], 1).to(self.memory_s.dtype))
        keep = _first_occurrence(idx)
        idx, e = idx[keep], e[keep]
        d, m = self.params.feat_dim, self.params.nce_momentum
        for name, v in (("memory_s", e[:, :d]), ("memory_t", e[:, d:])):
            bank = getattr(self, name)
            rows = memory_update(bank.index_select(0, idx), v, m)
            if self.dense:  # this step's scores keep the bank for backward: update a copy
                setattr(self, name, bank.index_copy(0, idx, rows))
            else:
                bank.index_copy_(0, idx, rows)
