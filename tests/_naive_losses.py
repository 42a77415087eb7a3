"""Independent reference implementations for the loss tests.

Written straight from ``docs/spec.md``, one sample at a time, in float64, with Python
loops and no shared code with ``topkd.losses``. Plus the mdistiller reference formulas for KD
and DKD (vectorized, copied in spirit from their ``kd.py`` / ``dkd.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _row_softmax(z):
    m = max(z)
    e = [math.exp(v - m) for v in z]
    tot = sum(e)
    return [v / tot for v in e]


def _kl(p, q):
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def kd(s, t, T):
    """s, t: (B, C) tensors -> float, batch mean."""
    out = []
    for sb, tb in zip(s.double().tolist(), t.double().tolist()):
        ps = _row_softmax([v / T for v in sb])
        pt = _row_softmax([v / T for v in tb])
        out.append(_kl(pt, ps) * T * T)
    return out


def dkd(s, t, y, alpha, beta, T):
    out = []
    for sb, tb, yb in zip(s.double().tolist(), t.double().tolist(), y.tolist()):
        ps = _row_softmax([v / T for v in sb])
        pt = _row_softmax([v / T for v in tb])
        tckd = _kl([pt[yb], 1 - pt[yb]], [ps[yb], 1 - ps[yb]])
        qs = _row_softmax([v / T for j, v in enumerate(sb) if j != yb])
        qt = _row_softmax([v / T for j, v in enumerate(tb) if j != yb])
        out.append((alpha * tckd + beta * _kl(qt, qs)) * T * T)
    return out


def center(row):
    m = sum(row) / len(row)
    return [v - m for v in row]


def tsm(t, y, k, gamma=1.0, lam=0.5, correct_gt=True, schedule="linear"):
    """Returns (B, C) float64 tensor and a list of corrected flags."""
    rows, flags = [], []
    for tb, yb in zip(t.double(), y.tolist()):
        u = center(tb.tolist())
        C = len(u)
        order = torch.topk(tb.double() - tb.double().mean(), k).indices.tolist()
        w = []
        for r in range(1, k + 1):
            if schedule == "linear":
                w.append(1 + gamma * (k - r) / (k - 1) if k > 1 else 1 + gamma)
            else:
                w.append(1 + gamma)
        top_mean = sum(u[i] for i in order) / k
        rest = [u[i] for i in range(C) if i not in order]
        delta = lam * (top_mean - sum(rest) / len(rest)) if rest else 0.0
        out = list(u)
        for r, i in enumerate(order):
            out[i] = w[r] * u[i] + delta
        if yb not in order:
            out[yb] = w[-1] * u[yb] + delta
        corrected = False
        if correct_gt and order[0] != yb:
            out[yb] = max(out[j] for j in range(C) if j != yb) + delta + 1e-3
            corrected = True
        rows.append(out)
        flags.append(corrected)
    return torch.tensor(rows, dtype=torch.float64), flags


def _cos(x, z):
    return F.cosine_similarity(
        torch.tensor(x, dtype=torch.float64), torch.tensor(z, dtype=torch.float64), dim=0, eps=1e-8
    ).item()


def tdl(s, b, k, alpha=1.0, beta=0.5):
    out = []
    for sb, bb in zip(s.double().tolist(), b.double().tolist()):
        a, c = center(sb), center(bb)
        C = len(c)
        order = sorted(range(C), key=lambda j: -c[j])  # full sort: fine for distinct values
        P, N = order[:k], order[C - k :]
        R = [j for j in range(C) if j not in P and j not in N]
        val = alpha * (1 - _cos([a[j] for j in P], [c[j] for j in P]))
        val += beta * (1 - _cos([a[j] for j in N], [c[j] for j in N]))
        if R:
            val += 1 - _cos([a[j] for j in R], [c[j] for j in R])
        out.append(val)
    return out


def contrastive(s, b, tau):
    A = [center(r) for r in s.double().tolist()]
    Bm = [center(r) for r in b.double().tolist()]

    def unit(v):
        n = max(math.sqrt(sum(x * x for x in v)), 1e-12)
        return [x / n for x in v]

    A, Bm = [unit(v) for v in A], [unit(v) for v in Bm]
    n = len(A)
    S = [[sum(x * z for x, z in zip(A[i], Bm[j])) / tau for j in range(n)] for i in range(n)]

    def ce(row, i):
        m = max(row)
        return m + math.log(sum(math.exp(v - m) for v in row)) - row[i]

    rows = sum(ce(S[i], i) for i in range(n)) / n
    cols = sum(ce([S[j][i] for j in range(n)], i) for i in range(n)) / n
    return (rows + cols) / 2


def topkd(s, t, y, k, w_con=1.0, w_tdl=1.0, tau=0.1, alpha=1.0, beta=0.5, gamma=1.0, lam=0.5,
          correct_gt=True, use_tsm=True):  # fmt: skip
    b = tsm(t, y, k, gamma, lam, correct_gt)[0] if use_tsm else t.double()
    tdl_rows = tdl(s, b, k, alpha, beta)
    return w_con * contrastive(s, b, tau) + w_tdl * sum(tdl_rows) / len(tdl_rows)


def standardize(z, eps=1e-7):
    out = []
    for row in z.double().tolist():
        m = sum(row) / len(row)
        sd = math.sqrt(sum((v - m) ** 2 for v in row) / (len(row) - 1))
        out.append([(v - m) / (sd + eps) for v in row])
    return torch.tensor(out, dtype=torch.float64)


# ---- mdistiller reference formulas (github.com/megvii-research/mdistiller) ----
def mdistiller_kd(logits_student, logits_teacher, temperature):
    log_pred_student = F.log_softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    loss_kd = F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1).mean()
    return loss_kd * temperature**2


def mdistiller_dkd(logits_student, logits_teacher, target, alpha, beta, temperature):
    gt_mask = torch.zeros_like(logits_student).scatter_(1, target.unsqueeze(1), 1).bool()
    other_mask = torch.ones_like(logits_student).scatter_(1, target.unsqueeze(1), 0).bool()
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)

    def cat_mask(t, mask1, mask2):
        t1 = (t * mask1).sum(dim=1, keepdims=True)
        t2 = (t * mask2).sum(1, keepdims=True)
        return torch.cat([t1, t2], dim=1)

    pred_student = cat_mask(pred_student, gt_mask, other_mask)
    pred_teacher = cat_mask(pred_teacher, gt_mask, other_mask)
    log_pred_student = torch.log(pred_student)
    tckd_loss = (
        F.kl_div(log_pred_student, pred_teacher, reduction="sum")
        * (temperature**2)
        / target.shape[0]
    )
    pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd_loss = (
        F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="sum")
        * (temperature**2)
        / target.shape[0]
    )
    return alpha * tckd_loss + beta * nckd_loss
