"""NST against a transcription of mdistiller's ``mdistiller/distillers/NST.py`` (commit
a08d46f10d6102bd6e3f258ca5ac880b020ea259), float64, values and gradients to 1e-6."""

from __future__ import annotations

import pytest
import torch.nn.functional as F

from feature_examples import (
    DEEP_TEACHER,
    SMALL_STUDENT,
    STUDENT,
    TEACHER,
    assert_same_loss_and_grads,
    context,
    feature_batch,
    leaves,
)
from topkd.methods import create_method
from topkd.methods.nst import nst_loss


# ---- mdistiller/distillers/NST.py, line by line
def ref_nst_loss(g_s, g_t):
    return sum([ref_single_stage_nst_loss(f_s, f_t) for f_s, f_t in zip(g_s, g_t)])


def ref_single_stage_nst_loss(f_s, f_t):
    s_H, t_H = f_s.shape[2], f_t.shape[2]
    if s_H > t_H:
        f_s = F.adaptive_avg_pool2d(f_s, (t_H, t_H))
    elif s_H < t_H:
        f_t = F.adaptive_avg_pool2d(f_t, (s_H, s_H))

    f_s = f_s.view(f_s.shape[0], f_s.shape[1], -1)
    f_s = F.normalize(f_s, dim=2)
    f_t = f_t.view(f_t.shape[0], f_t.shape[1], -1)
    f_t = F.normalize(f_t, dim=2)

    return (
        ref_poly_kernel(f_t, f_t).mean().detach()
        + ref_poly_kernel(f_s, f_s).mean()
        - 2 * ref_poly_kernel(f_s, f_t).mean()
    )


def ref_poly_kernel(a, b):
    a = a.unsqueeze(1)
    b = b.unsqueeze(2)
    res = (a * b).sum(-1).pow(2)
    return res
# ----


@pytest.mark.parametrize("student, teacher", [
    (STUDENT, TEACHER), (SMALL_STUDENT, DEEP_TEACHER), (DEEP_TEACHER, SMALL_STUDENT)],
    ids=["same", "small_student", "small_teacher"])
def test_nst_loss_equals_mdistiller(student, teacher):
    b = feature_batch(student, teacher, grad=True)
    g_s, g_t = b.student.feats["feats"][1:], b.teacher.feats["feats"][1:]
    assert_same_loss_and_grads(nst_loss(g_s, g_t), ref_nst_loss(g_s, g_t), leaves(b))


def test_nst_method_total_equals_mdistiller_forward_train():
    b = feature_batch(SMALL_STUDENT, TEACHER, grad=True)
    m = create_method({"name": "nst"}, context(SMALL_STUDENT, TEACHER))
    ref = 1.0 * F.cross_entropy(b.student.logits, b.labels) + 50.0 * ref_nst_loss(
        b.student.feats["feats"][1:], b.teacher.feats["feats"][1:])
    assert_same_loss_and_grads(m(b).total, ref, [*leaves(b), b.student.logits])
