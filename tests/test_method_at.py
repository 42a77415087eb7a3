"""AT against a transcription of mdistiller's ``mdistiller/distillers/AT.py`` (commit
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
from topkd.methods.at import at_loss


# ---- mdistiller/distillers/AT.py, line by line
def ref_single_stage_at_loss(f_s, f_t, p):
    def _at(feat, p):
        return F.normalize(feat.pow(p).mean(1).reshape(feat.size(0), -1))

    s_H, t_H = f_s.shape[2], f_t.shape[2]
    if s_H > t_H:
        f_s = F.adaptive_avg_pool2d(f_s, (t_H, t_H))
    elif s_H < t_H:
        f_t = F.adaptive_avg_pool2d(f_t, (s_H, s_H))
    return (_at(f_s, p) - _at(f_t, p)).pow(2).mean()


def ref_at_loss(g_s, g_t, p):
    return sum([ref_single_stage_at_loss(f_s, f_t, p) for f_s, f_t in zip(g_s, g_t)])


def ref_forward_train(logits_student, target, feature_student, feature_teacher, ce_weight,
                      feat_weight, p):
    loss_ce = ce_weight * F.cross_entropy(logits_student, target)
    loss_feat = feat_weight * ref_at_loss(feature_student["feats"][1:],
                                          feature_teacher["feats"][1:], p)
    return loss_ce + loss_feat
# ----


@pytest.mark.parametrize("student, teacher", [
    (STUDENT, TEACHER),            # equal sizes
    (SMALL_STUDENT, DEEP_TEACHER),  # teacher maps pooled; its extra stage unused (zip)
    (DEEP_TEACHER, SMALL_STUDENT),  # student maps pooled
], ids=["same", "small_student", "small_teacher"])
@pytest.mark.parametrize("p", [2.0, 3.0])
def test_at_loss_equals_mdistiller(student, teacher, p):
    b = feature_batch(student, teacher, grad=True)
    g_s, g_t = b.student.feats["feats"][1:], b.teacher.feats["feats"][1:]
    assert_same_loss_and_grads(at_loss(g_s, g_t, p), ref_at_loss(g_s, g_t, p), leaves(b))


def test_at_method_total_equals_mdistiller_forward_train():
    b = feature_batch(SMALL_STUDENT, TEACHER, grad=True)
    m = create_method({"name": "at"}, context(SMALL_STUDENT, TEACHER))
    ref = ref_forward_train(b.student.logits, b.labels, b.student.feats, b.teacher.feats,
                            1.0, 1000.0, 2)
    out = m(b)
    assert_same_loss_and_grads(out.total, ref, [*leaves(b), b.student.logits])
    # the stem (feats[0]) is not distilled
    assert torch.autograd.grad(out.total, b.student.feats["feats"][0], allow_unused=True)[0] \
        is None
    assert set(out.terms) == {"ce", "at", "warmup"}


def test_at_errors():
    b = feature_batch()
    g_s = b.student.feats["feats"]
    with pytest.raises(ValueError, match=r"at_loss: student features of stage 0 must have "
                                         r"shape \(B, C, H, W\)"):
        at_loss([g_s[1].flatten(1)], [g_s[1]])
    with pytest.raises(ValueError, match="different batch sizes 5 and 6"):
        at_loss([g_s[1][:5]], [g_s[1]])
    with pytest.raises(ValueError, match="at least one stage"):
        at_loss([], [])
