"""SP against a transcription of mdistiller's ``mdistiller/distillers/SP.py`` (commit
a08d46f10d6102bd6e3f258ca5ac880b020ea259), float64, values and gradients to 1e-6."""

from __future__ import annotations

import pytest
import torch
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
from topkd.methods.sp import sp_loss


# ---- mdistiller/distillers/SP.py, line by line
def ref_sp_loss(g_s, g_t):
    return sum([ref_similarity_loss(f_s, f_t) for f_s, f_t in zip(g_s, g_t)])


def ref_similarity_loss(f_s, f_t):
    bsz = f_s.shape[0]
    f_s = f_s.view(bsz, -1)
    f_t = f_t.view(bsz, -1)

    G_s = torch.mm(f_s, torch.t(f_s))
    G_s = torch.nn.functional.normalize(G_s)
    G_t = torch.mm(f_t, torch.t(f_t))
    G_t = torch.nn.functional.normalize(G_t)

    G_diff = G_t - G_s
    loss = (G_diff * G_diff).view(-1, 1).sum(0) / (bsz * bsz)
    return loss
# ----


@pytest.mark.parametrize("student, teacher", [(STUDENT, TEACHER), (SMALL_STUDENT, DEEP_TEACHER)])
def test_sp_loss_equals_mdistiller(student, teacher):
    b = feature_batch(student, teacher, grad=True)
    f_s, f_t = b.student.feats["feats"][-1], b.teacher.feats["feats"][-1]
    ours = sp_loss(f_s, f_t)
    assert ours.dim() == 0  # the reference returns a 1-element tensor
    assert_same_loss_and_grads(ours, ref_sp_loss([f_s], [f_t]), [f_s])


def test_sp_method_total_equals_mdistiller_forward_train():
    b = feature_batch(SMALL_STUDENT, DEEP_TEACHER, grad=True)
    m = create_method({"name": "sp"}, context(SMALL_STUDENT, DEEP_TEACHER))
    fs, ft = b.student.feats, b.teacher.feats
    ref = 1.0 * F.cross_entropy(b.student.logits, b.labels) + 3000.0 * ref_sp_loss(
        [fs["feats"][-1]], [ft["feats"][-1]])
    out = m(b)
    assert_same_loss_and_grads(out.total, ref, [*leaves(b), b.student.logits])
    # only the last stage is distilled
    grads = torch.autograd.grad(out.distill, fs["feats"], allow_unused=True)
    assert [g is not None for g in grads] == [False, False, False, True]
