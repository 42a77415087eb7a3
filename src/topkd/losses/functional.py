r"""Functional distillation losses (their contract: ``docs/spec.md``).

Conventions shared by every function:

* ``s`` (student) and ``t`` (teacher) are logits of shape ``(B, C)`` or ``(..., C)``; leading
  dims are flattened to rows. ``reduction="none"`` returns the leading shape ``(...)``.
* Labels ``y`` are int class indices of shape ``(...)``, or ``(..., C)`` float probabilities
  (mixup/cutmix) whose argmax is used by the target-dependent parts. ``ignore_index`` drops rows
  whose label equals it: they are excluded from the mean (and are 0 under ``"none"``); a batch
  with every row ignored gives 0, with a graph, never NaN.
* KL divergences are summed over classes, averaged over the batch ("batchmean") and multiplied
  by ``T**2``. Each function returns one term with its own explicit weights; cross-entropy and
  warm-up are not included (the methods of :mod:`topkd.methods` compose them).
* The teacher never receives gradient: it is detached and its side runs under ``no_grad``.
* Half-precision inputs are computed in float32 (the result is float32), so the losses are
  safe under autocast.
* ``validate=True`` checks for NaN/inf logits and out-of-range labels with one fused reduction
  (one host sync); ``validate=False`` skips that, keeping only the free shape/option checks.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from ._validate import (
    as_compute,
    check_k,
    check_nonneg,
    check_positive,
    check_reduction,
    check_schedule,
    check_weights,
    prepare,
    reduce_rows,
)

__all__ = [
    "kd_loss",
    "dkd_loss",
    "standardize",
    "tsm",
    "tdl_loss",
    "contrastive_loss",
    "topkd_loss",
]

#: Margin by which TSM's ground-truth correction puts ``y`` above every other class; keeps ``y``
#: strictly on top even when ``lam == 0``. It is the only non-scale-equivariant constant of TSM.
GT_MARGIN = 1e-3
#: Norm floor of the cosines in TDL (as ``F.cosine_similarity``: each norm clamped separately).
COS_EPS = 1e-8
#: Norm floor of the contrastive term's normalization (as ``F.normalize``).
NORM_EPS = 1e-12


def autocast_off(fn):
    """Run ``fn`` with autocast disabled on its first argument's device.

    Inputs are upcast to float32 explicitly; this only stops an enclosing autocast region
    from downcasting the matmuls again.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        x = args[0] if args else None
        dev = x.device.type if isinstance(x, Tensor) else "cpu"
        if torch.is_autocast_enabled(dev):
            with torch.autocast(dev, enabled=False):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper


# --------------------------------------------------------------------------------------------
# building blocks (rows are (N, C), already validated and in the compute dtype)
# --------------------------------------------------------------------------------------------
def _center(x: Tensor) -> Tensor:
    return x - x.mean(-1, keepdim=True)


def _safe_norm(sq: Tensor, eps: float) -> Tensor:
    """``max(sqrt(sq), eps)`` written so that its gradient is finite at ``sq == 0``."""
    return sq.clamp_min(eps * eps).sqrt()


def _kd_rows(s: Tensor, t: Tensor, T: float) -> Tensor:
    log_ps = F.log_softmax(s / T, dim=-1)
    with torch.no_grad():
        log_pt = F.log_softmax(t / T, dim=-1)
        pt = log_pt.exp()
    return (pt * (log_pt - log_ps)).sum(-1) * (T * T)


def _dkd_parts(z: Tensor, gt: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """log p_y, log(1 - p_y) and non-target log-probs of ``softmax(z)``, all in log space.

    ``log(1 - p_y) = logsumexp(z_{j != y}) - logsumexp(z)`` never reaches ``log(0)``, even for
    a saturated distribution, which is what the spec's "clamp the binary logs" asks for, without
    the bias of a floor. The non-target log-probs are finite everywhere (also at ``y``, where
    the teacher's non-target probability is exactly 0 and so contributes nothing).
    """
    lse = z.logsumexp(-1)
    lse_nt = z.masked_fill(gt, float("-inf")).logsumexp(-1)
    log_py = z.gather(-1, y[:, None]).squeeze(-1) - lse
    log_q = z - lse_nt[:, None]
    return log_py, lse_nt - lse, log_q


def _dkd_rows(
    s: Tensor, t: Tensor, y: Tensor, alpha: float, beta: float, T: float
) -> tuple[Tensor, Tensor]:
    gt = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, y[:, None], True)
    spy, spn, sq = _dkd_parts(s / T, gt, y)
    with torch.no_grad():
        tpy, tpn, tq = _dkd_parts(t / T, gt, y)
        q_t = tq.exp().masked_fill_(gt, 0.0)
    tckd = tpy.exp() * (tpy - spy) + tpn.exp() * (tpn - spn)
    nckd = (q_t * (tq - sq)).sum(-1)
    return tckd * (T * T), nckd * (T * T)


@torch.no_grad()
def _tsm_rows(
    t: Tensor,
    y: Tensor,
    k: int,
    gamma: float,
    lam: float,
    correct_gt: bool,
    schedule: str,
    keep: Tensor | None,
    center: bool = False,
) -> tuple[Tensor, Tensor]:
    """TSM on rows; returns ``(u', corrected)``. See :func:`tsm` for the math.

    ``center=True`` returns ``u' - mean(u')`` (what TDL/contrastive use), the mean being
    updated from the few changed entries instead of another pass over the row.
    """
    C = t.shape[-1]
    u = _center(t)  # fresh tensor: modified in place below
    vals, idx = u.topk(k, dim=-1)  # sorted, ties by torch.topk
    if keep is not None:  # ignored rows: pretend y is the teacher's top-1 (no GT handling)
        y = torch.where(keep, y, idx[:, 0])
    y = y[:, None]
    if schedule == "linear" and k > 1:
        w = [1.0 + gamma * (k - r) / (k - 1) for r in range(1, k + 1)]
    else:
        w = [1.0 + gamma] * k
    sum_top = vals.sum(-1)
    # sum(u) == 0, so mean(u[not I]) = -sum(u[I]) / (C - k): no pass over u needed.
    # k == C: nothing outside the top-k, no bias.
    delta = sum_top * (lam * (1.0 / k + 1.0 / (C - k))) if k < C else torch.zeros_like(sum_top)
    new_top = vals * torch.tensor(w, dtype=u.dtype, device=u.device) + delta[:, None]
    u_y = u.gather(-1, y).squeeze(-1)
    u.scatter_(-1, idx, new_top)
    cur_y = u.gather(-1, y).squeeze(-1)
    new_y = torch.where((idx == y).any(-1), cur_y, u_y * w[-1] + delta)  # y outside I: rank k
    if correct_gt:
        # with gamma, lam >= 0 the rank-1 entry is max_{j != y} u'_j (proof in docs/losses.md)
        corrected = idx[:, 0] != y[:, 0]
        new_y = torch.where(corrected, new_top[:, 0] + delta + GT_MARGIN, new_y)
    else:
        corrected = torch.zeros_like(delta, dtype=torch.bool)
    u.scatter_(-1, y, new_y[:, None])
    if center:  # sum(u) == 0 before the edits: mean(u') = (sum of the changes) / C
        u.sub_(((new_top.sum(-1) - sum_top + new_y - cur_y) / C)[:, None])
    return u, corrected


class _CenterFn(torch.autograd.Function):
    """``x - mean(x)`` over the last dim with a 2-pass backward (``g - mean(g)``, the same
    projection) instead of autograd's sub/neg/expand/accumulate chain."""

    @staticmethod
    def forward(ctx, x):
        return x - x.mean(-1, keepdim=True)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        return g - g.mean(-1, keepdim=True)


def _center_student(x: Tensor) -> Tensor:
    return _CenterFn.apply(x) if x.requires_grad else _center(x)


class _TDLFn(torch.autograd.Function):
    """TDL rows and ``|a|^2`` from centered student ``a`` with a hand-written backward.

    Autograd would build ~30 nodes and several full-size temporaries here; the backward below
    is one dense ``2 (g_aa + g_R) a + g_dot c_R`` (right on R) plus a ``(B, 2k)`` scatter that
    assigns the P and N entries.
    Non-student inputs carry no gradient. Verified by ``gradcheck`` in the tests.
    """

    @staticmethod
    def forward(ctx, a, idx, cPN, cR, cc_parts, weights):
        B, _, k = cPN.shape
        aPN = a.gather(-1, idx).view(B, 2, k)
        aa_parts = aPN.square().sum(-1)  # (B, 2)
        dots = (aPN * cPN).sum(-1)
        if cR is not None:
            # |a_R|^2 as a masked square-sum over R (never |a|^2 - |a_P|^2 - |a_N|^2: in float32
            # that subtraction cancels catastrophically when a_R is small, giving |a_R| ~ 0, a
            # cosine far outside [-1, 1] and gradients ~1e8). Same passes as |a|^2 alone: the
            # square is a temporary, zeroed on P u N in place; |a|^2 is then the sum of the parts.
            sq = a.square().scatter_(-1, idx, 0.0)
            aa_r = sq.sum(-1)
            aa = aa_parts.sum(-1) + aa_r
            aa_parts = torch.cat([aa_parts, aa_r[:, None]], -1)
            dots = torch.cat([dots, (a * cR).sum(-1, keepdim=True)], -1)
        else:
            aa = aa_parts.sum(-1)  # P u N is every class when 2k == C
        na = _safe_norm(aa_parts, COS_EPS)
        nc = _safe_norm(cc_parts, COS_EPS)
        cos = dots / (na * nc)
        ctx.save_for_backward(a, idx, aPN, cPN, cR, aa_parts, na, nc, cos, weights)
        return (1.0 - cos) @ weights, aa

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_loss, g_aa):
        a, idx, aPN, cPN, cR, aa_parts, na, nc, cos, weights = ctx.saved_tensors
        B, _, k = cPN.shape
        g_cos = -g_loss[:, None] * weights  # (B, J), J = 2 or 3
        g_dot = g_cos / (na * nc)
        # d cos / d |x|^2 = -cos / (2 |x|^2), zero where the norm is clamped at eps
        g_sq = torch.where(aa_parts > COS_EPS * COS_EPS, -g_cos * cos / (2 * na * na), 0.0)
        g_aa = g_aa[:, None]  # gradient reaching |a|^2 (from the contrastive term)
        if cR is not None:
            # R entries: d|a_R|^2/da = 2 a, d(a . c_R)/da = c_R; P u N entries are overwritten
            # below (assigned, not accumulated: no +g_r -g_r cancellation at large a_P, a_N)
            grad = torch.addcmul(cR * g_dot[:, 2:3], a, 2 * (g_aa + g_sq[:, 2:3]))
        else:
            grad = torch.empty_like(a)  # 2k == C: P u N covers every entry
        g_pn = (2 * (g_aa + g_sq[:, :2]))[:, :, None] * aPN + g_dot[:, :2, None] * cPN
        grad.scatter_(-1, idx, g_pn.view(B, 2 * k))  # P, N disjoint: no duplicate index
        return grad, None, None, None, None, None


def _tdl_rows(
    a: Tensor, c: Tensor, k: int, alpha: float, beta: float
) -> tuple[Tensor, Tensor, Tensor]:
    """TDL per row on centered ``a`` (student) and ``c`` (target, no grad).

    P and N come from two ``topk`` calls (no sort) and are gathered with one index tensor; the
    three cosines are one ``(B, 3)`` tensor. No masked copy of the student is made: the
    R-cosine uses ``a . c_R`` with ``c_R`` the target zeroed on ``P u N``, ``|c_R|^2`` and
    ``|a_R|^2``, each a sum over R only (no subtraction of norms anywhere, so a small R-part
    keeps full relative precision). Returns the loss rows and ``|a|^2``, ``|c|^2`` (sums of
    their non-negative parts; for the contrastive term).
    """
    B, C = c.shape
    has_r = 2 * k < C  # R is empty when 2k == C: its term is dropped
    with torch.no_grad():
        cP, P = c.topk(k, dim=-1)
        # bottom k among the entries not in P: keeps P and N disjoint even with ties
        cR = c.scatter(-1, P, float("inf"))
        cN, N = cR.topk(k, dim=-1, largest=False)
        idx = torch.cat([P, N], -1)
        cPN = torch.cat([cP, cN], -1).view(B, 2, k)
        cc_parts = cPN.square().sum(-1)  # (B, 2)
        if has_r:
            cR.scatter_(-1, idx, 0.0)
            cc_parts = torch.cat([cc_parts, cR.square().sum(-1, keepdim=True)], -1)
        else:
            cR = None
        cc = cc_parts.sum(-1)  # |c|^2 as a sum of non-negative parts
        w = [alpha, beta, 1.0] if has_r else [alpha, beta]
        weights = torch.tensor(w, dtype=a.dtype, device=a.device)
    loss, aa = _TDLFn.apply(a, idx, cPN, cR, cc_parts, weights)
    return loss, aa, cc


class _InfoNCEFn(torch.autograd.Function):
    """Per-row symmetric InfoNCE from centered student ``a`` (and ``|a|^2``) with a fused
    backward: one ``B x B x C`` matmul plus a handful of ``B x B`` ops, instead of autograd's
    chain through the division, both logsumexps, the diagonal and the mask.

    ``S = (a c^T) * r_a r_c^T / tau`` with ``r = 1 / max(|x|, 1e-12)``; row loss
    ``(lse_row_i + lse_col_i) / 2 - S_ii``. Gradients reach ``a`` and ``aa`` (``|a|^2``, whose
    gradient TDL's backward turns into ``2 g a``; or autograd when TDL is off).
    """

    @staticmethod
    def forward(ctx, a, aa, c, rc_tau, pair):
        ra = 1.0 / _safe_norm(aa, NORM_EPS)
        S = (a @ c.T).mul_(ra[:, None]).mul_(rc_tau[None, :])
        Sm = S.masked_fill(~pair, float("-inf")) if pair is not None else S
        lse_r, lse_c = Sm.logsumexp(1), Sm.logsumexp(0)
        ctx.save_for_backward(c, aa, ra, rc_tau, S, Sm, lse_r, lse_c)
        return (lse_r + lse_c) / 2 - S.diagonal()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        c, aa, ra, rc_tau, S, Sm, lse_r, lse_c = ctx.saved_tensors
        h = g / 2
        G = (Sm - lse_r[:, None]).exp_().mul_(h[:, None])  # row softmax (0 where masked)
        G += (Sm - lse_c[None, :]).exp_().mul_(h[None, :])  # column softmax
        G.diagonal().sub_(g)
        # S_ij = r_i P_ij s_j: dL/dr_i = sum_j G_ij S_ij / r_i, dr/d|a|^2 = -r^3 / 2
        g_aa = torch.where(aa > NORM_EPS * NORM_EPS, -0.5 * ra * ra * (G * S).sum(1), 0.0)
        g_a = G.mul_(ra[:, None]).mul_(rc_tau[None, :]) @ c
        return g_a, g_aa, None, None, None


def _con_rows(a: Tensor, c: Tensor, aa: Tensor, cc: Tensor, tau: float, keep: Tensor | None):
    """Per-row symmetric InfoNCE, ``(CE_row_i + CE_col_i) / 2``; mean over rows is ``L_con``.

    ``S = a c^T / (|a| |c|^T tau)`` is formed without normalized copies of ``a`` and ``c``.
    Ignored rows are masked out of the similarity matrix (they are neither anchors nor
    negatives); the diagonal is always kept so every logsumexp is finite.
    """
    with torch.no_grad():
        rc_tau = 1.0 / (_safe_norm(cc, NORM_EPS) * tau)
        pair = None
        if keep is not None:
            eye = torch.eye(len(keep), dtype=torch.bool, device=a.device)
            pair = (keep[:, None] & keep[None, :]) | eye
    return _InfoNCEFn.apply(a, aa, c, rc_tau, pair)


def _topkd_parts(
    s, t, y, *, k, tau, alpha, beta, gamma, lam, correct_gt, use_tsm, schedule,
    ignore_index, validate, need_con=True, need_tdl=True, fn="topkd_loss",
):  # fmt: skip
    """Shared by :func:`topkd_loss` and the criterion: ``(con, tdl, corrected_rows, rows)``."""
    rows = prepare(fn, s, t, y, ignore_index=ignore_index, validate=validate, need_labels=use_tsm)
    C = rows.s.shape[-1]
    check_k(fn, k, C, two_sided=True)
    check_positive(fn, "tau", tau)
    check_weights(fn, alpha=alpha, beta=beta)
    s2, t2 = as_compute(rows.s), as_compute(rows.t)
    corrected = None
    if use_tsm:
        check_nonneg(fn, "gamma", gamma)
        check_nonneg(fn, "lam", lam)
        check_schedule(fn, schedule)
        c, corrected = _tsm_rows(
            t2, rows.y, k, gamma, lam, correct_gt, schedule, rows.keep, center=True
        )
    else:
        c = _center(t2)
    a = _center_student(s2)  # shared by both terms
    tdl = con = None
    if need_tdl:
        tdl_r, aa, cc = _tdl_rows(a, c, k, alpha, beta)
        tdl = reduce_rows(tdl_r, rows.keep, rows.lead, "mean")
    elif need_con:
        aa, cc = (a * a).sum(-1), (c * c).sum(-1)
    if need_con:
        con = reduce_rows(_con_rows(a, c, aa, cc, tau, rows.keep), rows.keep, rows.lead, "mean")
    if con is None or tdl is None:  # a skipped term is 0, still attached to the graph
        zero = a.sum() * 0.0
        con, tdl = (zero if con is None else con), (zero if tdl is None else tdl)
    return con, tdl, corrected, rows


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
@autocast_off
def kd_loss(
    s: Tensor,
    t: Tensor,
    temperature: float = 4.0,
    reduction: str = "mean",
    *,
    validate: bool = True,
) -> Tensor:
    r"""Hinton knowledge distillation (without CE).

    .. math::
        \ell_b = T^2 \sum_c p^t_{bc} (\log p^t_{bc} - \log p^s_{bc}),\quad
        p = \mathrm{softmax}(z / T)

    KL summed over classes, mean over the batch, times ``T**2`` (equal to mdistiller's
    ``F.kl_div(log_ps, pt, reduction="none").sum(1).mean() * T**2``).

    Args:
        s: student logits ``(B, C)`` or ``(..., C)``.
        t: teacher logits, same shape (detached inside).
        temperature: ``T > 0``.
        reduction: ``"mean"`` (scalar), ``"sum"`` or ``"none"`` (shape ``(...)``).
        validate: check for NaN/inf logits (one host sync).
    """
    fn = "kd_loss"
    check_positive(fn, "temperature", temperature)
    check_reduction(fn, reduction)
    rows = prepare(fn, s, t, validate=validate)
    loss = _kd_rows(as_compute(rows.s), as_compute(rows.t), float(temperature))
    return reduce_rows(loss, None, rows.lead, reduction)


@autocast_off
def dkd_loss(
    s: Tensor,
    t: Tensor,
    y: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    reduction: str = "mean",
    *,
    ignore_index: int | None = None,
    validate: bool = True,
) -> Tensor:
    r"""Decoupled KD (Zhao et al., 2022) without CE and without warm-up.

    .. math::
        \ell_b = \alpha\, T^2\, \mathrm{KL}([p^t_y, 1-p^t_y] \,\|\, [p^s_y, 1-p^s_y])
               + \beta\, T^2\, \mathrm{KL}(\hat q^t \,\|\, \hat q^s)

    with ``p = softmax(z/T)`` and ``q̂`` the softmax over the non-target classes (target logit
    masked out before the softmax). Batch mean; equals mdistiller's ``dkd_loss`` (which masks
    with ``-1000`` and uses ``kl_div(..., reduction="sum") * T**2 / B``) before its warm-up
    factor. Binary logs are computed in log space (``logsumexp`` over non-target classes), so a
    saturated teacher or student never yields ``log(0)`` or NaN.

    Args:
        s, t: logits ``(..., C)``, ``C >= 2``; y: int labels ``(...)`` or probabilities
        ``(..., C)``. alpha: TCKD weight; beta: NCKD weight; temperature: ``T > 0``;
        reduction: ``"mean" | "sum" | "none"``; ignore_index: label value whose rows are dropped.
    """
    fn = "dkd_loss"
    check_positive(fn, "temperature", temperature)
    check_weights(fn, alpha=alpha, beta=beta)
    check_reduction(fn, reduction)
    rows = prepare(fn, s, t, y, ignore_index=ignore_index, validate=validate, need_labels=True)
    if rows.s.shape[-1] < 2:
        raise ValueError(f"{fn}: needs C >= 2 classes, got C={rows.s.shape[-1]}")
    tckd, nckd = _dkd_rows(
        as_compute(rows.s), as_compute(rows.t), rows.y, alpha, beta, float(temperature)
    )
    return reduce_rows(alpha * tckd + beta * nckd, rows.keep, rows.lead, reduction)


@autocast_off
def standardize(z: Tensor, eps: float = 1e-7) -> Tensor:
    r"""Logit standardization (LS, Sun et al., 2024): ``(z - mean(z)) / (std(z) + eps)`` per row.

    ``std`` is the unbiased one (torch's default), over the last dim. Half inputs are computed
    and returned in float32. The variance is floored at ``1e-30`` before the square root so that
    a constant row maps to 0 with a finite gradient (``torch.std`` would give NaN there); values
    are otherwise identical.

    Note: every TopKD term is cosine-based on centered logits (per-row scale invariant) and TSM
    is scale-equivariant up to :data:`GT_MARGIN`, so LS changes ``topkd_loss`` only through that
    constant. LS matters for KD/DKD, not for TopKD.
    """
    if not isinstance(z, Tensor) or not z.is_floating_point():
        raise ValueError(f"standardize: logits must be a floating-point tensor, got {z!r:.60}")
    if z.dim() < 1 or z.shape[-1] < 2:
        raise ValueError(f"standardize: needs (..., C) with C >= 2, got {tuple(z.shape)}")
    z = as_compute(z)
    std = z.var(-1, keepdim=True).clamp_min(1e-30).sqrt()
    return (z - z.mean(-1, keepdim=True)) / (std + eps)


@autocast_off
def tsm(
    t: Tensor,
    y: Tensor,
    k: int,
    gamma: float = 1.0,
    lam: float = 0.5,
    correct_gt: bool = True,
    schedule: str = "linear",
    *,
    ignore_index: int | None = None,
    return_stats: bool = False,
    validate: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""Top-K Scaling Module: a teacher-logit transform (no gradient).

    With ``u = t - mean(t)``, ``I = topk(u, k)`` at ranks ``r = 1..k``:

    * rank weights ``w_r = 1 + gamma (k - r) / (k - 1)`` (``schedule="linear"``; ``k == 1``
      gives ``1 + gamma``) or ``w_r = 1 + gamma`` (``"constant"``);
    * bias ``delta = lam (mean(u_I) - mean(u_{not I}))`` (0 when ``k == C``);
    * ``u'_i = w_r(i) u_i + delta`` for ``i in I``; if ``y`` is not in ``I``,
      ``u'_y = w_k u_y + delta``; other entries unchanged;
    * if ``correct_gt`` and the teacher's argmax is not ``y``:
      ``u'_y = max_{j != y} u'_j + delta + 1e-3``.

    Args:
        t: teacher logits ``(..., C)``; y: labels ``(...)`` or probabilities ``(..., C)``.
        k: ``1 <= k <= C``. gamma, lam: ``>= 0`` (they guarantee the ordering properties).
        ignore_index: rows with this label get the top-k scaling but no label handling.
        return_stats: also return the bool mask ``(...)`` of rows whose label was corrected.

    Returns:
        ``u'`` of ``t``'s shape (float32 for half inputs), or ``(u', corrected)``.
    """
    fn = "tsm"
    rows = prepare(
        fn, t, None, y, ignore_index=ignore_index, validate=validate, need_labels=True,
        what="teacher",
    )  # fmt: skip
    check_k(fn, k, rows.s.shape[-1], two_sided=False)
    check_nonneg(fn, "gamma", gamma)
    check_nonneg(fn, "lam", lam)
    check_schedule(fn, schedule)
    u, corrected = _tsm_rows(
        as_compute(rows.s.detach()), rows.y, k, gamma, lam, correct_gt, schedule, rows.keep
    )
    u = u.reshape(t.shape)
    return (u, corrected.reshape(rows.lead)) if return_stats else u


@autocast_off
def tdl_loss(
    s: Tensor,
    b: Tensor,
    k: int,
    alpha: float = 1.0,
    beta: float = 0.5,
    reduction: str = "mean",
    *,
    ignore_index: int | None = None,
    y: Tensor | None = None,
    validate: bool = True,
) -> Tensor:
    r"""Top-K Decoupled Loss.

    With ``a = centered(s)``, ``c = centered(b)``, ``P`` the ``k`` largest and ``N`` the ``k``
    smallest entries of ``c`` (disjoint), ``R`` the other ``C - 2k``:

    .. math::
        \ell_b = \alpha (1 - \cos(a_P, c_P)) + \beta (1 - \cos(a_N, c_N)) + (1 - \cos(a_R, c_R))

    Cosines clamp each norm at ``1e-8`` (as ``F.cosine_similarity``); the R term is dropped when
    ``2k == C``. Invariant to per-row shift and positive scale of ``s`` and ``b``.

    Args:
        s: student logits ``(..., C)``. b: target logits, ``tsm(t, y, k)`` or ``t`` (no grad).
        k: ``1 <= k``, ``2k <= C``. alpha, beta: weights of the P and N cosines (R has 1).
        reduction: ``"mean" | "sum" | "none"``.
        ignore_index, y: rows with ``y == ignore_index`` are dropped (TDL needs no labels
            otherwise).
    """
    fn = "tdl_loss"
    check_weights(fn, alpha=alpha, beta=beta)
    check_reduction(fn, reduction)
    if ignore_index is not None and y is None:
        raise ValueError(f"{fn}: ignore_index={ignore_index} needs the labels y")
    rows = prepare(fn, s, b, y, ignore_index=ignore_index, validate=validate)
    check_k(fn, k, rows.s.shape[-1], two_sided=True)
    a, c = _center_student(as_compute(rows.s)), _center(as_compute(rows.t))
    loss, _, _ = _tdl_rows(a, c, k, alpha, beta)
    return reduce_rows(loss, rows.keep, rows.lead, reduction)


@autocast_off
def contrastive_loss(
    s: Tensor,
    b: Tensor,
    tau: float = 0.1,
    *,
    ignore_index: int | None = None,
    y: Tensor | None = None,
    validate: bool = True,
) -> Tensor:
    r"""Symmetric InfoNCE between centered, L2-normalized student and target logits.

    ``S = normalize(centered(s)) @ normalize(centered(b)).T / tau`` (``(B, B)``, rows = student
    samples); ``L = (CE(S, arange(B)) + CE(S.T, arange(B))) / 2``. 0 for a batch of one.
    Leading dims are flattened, so all rows of a ``(..., C)`` input form one batch. Under DDP
    it is computed on each rank's local batch (no all-gather). Scale/shift invariant.
    """
    fn = "contrastive_loss"
    check_positive(fn, "tau", tau)
    if ignore_index is not None and y is None:
        raise ValueError(f"{fn}: ignore_index={ignore_index} needs the labels y")
    rows = prepare(fn, s, b, y, ignore_index=ignore_index, validate=validate)
    a, c = _center_student(as_compute(rows.s)), _center(as_compute(rows.t))
    aa, cc = (a * a).sum(-1), (c * c).sum(-1)
    return reduce_rows(_con_rows(a, c, aa, cc, tau, rows.keep), rows.keep, rows.lead, "mean")


@autocast_off
def topkd_loss(
    s: Tensor,
    t: Tensor,
    y: Tensor,
    k: int = 5,
    w_con: float = 1.0,
    w_tdl: float = 1.0,
    tau: float = 0.1,
    alpha: float = 1.0,
    beta: float = 0.5,
    gamma: float = 1.0,
    lam: float = 0.5,
    correct_gt: bool = True,
    use_tsm: bool = True,
    *,
    schedule: str = "linear",
    ignore_index: int | None = None,
    validate: bool = True,
) -> Tensor:
    r"""TopKD distillation term (without CE and warm-up).

    ``w_con * contrastive_loss(s, b, tau) + w_tdl * tdl_loss(s, b, k, alpha, beta)`` with
    ``b = tsm(t, y, k, gamma, lam, correct_gt, schedule)`` if ``use_tsm`` else ``t``; the
    centered student logits and the norms are shared between both terms.

    Both terms are cosine-based on centered logits and TSM is scale-equivariant up to its
    ``1e-3`` correction margin: logit standardization (LS) therefore changes this loss only
    through that margin (exactly not at all when no label is corrected).

    Args:
        s, t: logits ``(..., C)``; y: labels ``(...)`` or probabilities ``(..., C)``.
        k: ``1 <= k``, ``2k <= C``. Other arguments as in :func:`tsm`, :func:`tdl_loss` and
        :func:`contrastive_loss`. A weight of 0 skips the corresponding computation.
    """
    check_weights("topkd_loss", w_con=w_con, w_tdl=w_tdl)
    con, tdl, _, _ = _topkd_parts(
        s, t, y, k=k, tau=tau, alpha=alpha, beta=beta, gamma=gamma, lam=lam,
        correct_gt=correct_gt, use_tsm=use_tsm, schedule=schedule, ignore_index=ignore_index,
        validate=validate, need_con=w_con != 0, need_tdl=w_tdl != 0,
    )  # fmt: skip
    return w_con * con + w_tdl * tdl
