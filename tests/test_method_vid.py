"""VID against a transcription of mdistiller's ``mdistiller/distillers/VID.py`` (commit
a08d46f10d6102bd6e3f258ca5ac880b020ea259), float64, values and gradients to 1e-6, and its
variance quirk (never optimised in the reference; ``train_variance`` optimises it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
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
from topkd.methods import ParamError, create_method, params_from_dict
from topkd.methods.vid import vid_loss


# ---- mdistiller/distillers/VID.py, line by line
def ref_conv1x1(in_channels, out_channels, stride=1):
    return nn.Conv2d(
        in_channels, out_channels, kernel_size=1, padding=0, bias=False, stride=stride
    )


def ref_vid_loss(regressor, log_scale, f_s, f_t, eps=1e-5):
    # pool for dimentsion match
    s_H, t_H = f_s.shape[2], f_t.shape[2]
    if s_H > t_H:
        f_s = F.adaptive_avg_pool2d(f_s, (t_H, t_H))
    elif s_H < t_H:
        f_t = F.adaptive_avg_pool2d(f_t, (s_H, s_H))
    else:
        pass
    pred_mean = regressor(f_s)
    pred_var = torch.log(1.0 + torch.exp(log_scale)) + eps
    pred_var = pred_var.view(1, -1, 1, 1).to(pred_mean)
    neg_log_prob = 0.5 * ((pred_mean - f_t) ** 2 / pred_var + torch.log(pred_var))
    loss = torch.mean(neg_log_prob)
    return loss


class RefVIDModules:
    """``VID.__init__`` / ``init_vid_modules`` (the regressors and the unregistered list)."""

    def __init__(self, feat_s_channels, feat_t_channels, init_pred_var, eps):
        self.init_pred_var, self.eps = init_pred_var, eps
        self.regressors = nn.ModuleList()
        self.log_scales = []
        for s, t in zip(feat_s_channels, feat_t_channels):
            regressor = nn.Sequential(
                ref_conv1x1(s, t), nn.ReLU(), ref_conv1x1(t, t), nn.ReLU(), ref_conv1x1(t, t)
            )
            self.regressors.append(regressor)
            log_scale = torch.nn.Parameter(
                np.log(np.exp(self.init_pred_var - self.eps) - 1.0) * torch.ones(t)
            )
            self.log_scales.append(log_scale)


def ref_forward_train(mods, logits_student, target, feature_student, feature_teacher,
                      ce_weight, feat_weight):
    loss_ce = ce_weight * F.cross_entropy(logits_student, target)
    loss_vid = 0
    for i in range(len(feature_student["feats"][1:])):
        loss_vid += ref_vid_loss(
            mods.regressors[i],
            mods.log_scales[i],
            feature_student["feats"][1:][i],
            feature_teacher["feats"][1:][i],
            mods.eps,
        )
    loss_vid = feat_weight * loss_vid
    return loss_ce + loss_vid
# ----


def _pair(student, teacher, **params):
    """Our VID (float64) and the reference modules holding the same regressor weights."""
    torch.manual_seed(0)
    m = create_method({"name": "vid", **params}, context(student, teacher))
    p = m.params
    ref = RefVIDModules([s[0] for s in student["feats"][1:]],
                        [t[0] for t in teacher["feats"][1:]], p.init_pred_var, p.eps)
    for ours, theirs in zip(m.log_scales, ref.log_scales):
        assert ours.dtype == theirs.dtype == torch.float32 and torch.equal(ours, theirs)
    ref.regressors.load_state_dict(m.regressors.state_dict())
    m.double()
    ref.regressors.double()
    ref.log_scales = [a.detach().double().requires_grad_() for a in ref.log_scales]
    return m, ref


# Student maps larger than the teacher's (pooled before the regressor): DEEP_TEACHER's first
# three stages as the student of SMALL_STUDENT.
LARGE_STUDENT = {"feats": DEEP_TEACHER["feats"][:4], "pooled_feat": (32,)}


@pytest.mark.parametrize("student, teacher", [
    (STUDENT, TEACHER), (SMALL_STUDENT, DEEP_TEACHER), (LARGE_STUDENT, SMALL_STUDENT)],
    ids=["same", "small_student", "small_teacher"])
def test_vid_loss_equals_mdistiller(student, teacher):
    m, ref = _pair(student, teacher)
    b = feature_batch(student, teacher, grad=True)
    g_s, g_t = b.student.feats["feats"][1:], b.teacher.feats["feats"][1:]
    alpha = m.log_scales[1].detach().clone().requires_grad_()
    alpha_ref = alpha.detach().clone().requires_grad_()
    ours = vid_loss(g_s[1], g_t[1], m.regressors[1], alpha, 1e-5)
    theirs = ref_vid_loss(ref.regressors[1], alpha_ref, g_s[1], g_t[1], 1e-5)
    assert_same_loss_and_grads(ours, theirs, [g_s[1]])
    # gradients for the regressor weights and the log-variances
    ga = torch.autograd.grad(ours, [*m.regressors[1].parameters(), alpha])
    gb = torch.autograd.grad(theirs, [*ref.regressors[1].parameters(), alpha_ref])
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("train_variance", [False, True])
def test_vid_method_total_equals_mdistiller_forward_train(train_variance):
    m, ref = _pair(SMALL_STUDENT, TEACHER, train_variance=train_variance)
    with torch.no_grad():  # as after some training (the reference's stay at init, ours too)
        for a, r in zip(m.log_scales, ref.log_scales):
            a.add_(0.3)
            r.add_(0.3)
    b = feature_batch(SMALL_STUDENT, TEACHER, grad=True)
    out = m(b)
    theirs = ref_forward_train(ref, b.student.logits, b.labels, b.student.feats,
                               b.teacher.feats, 1.0, 1.0)
    assert_same_loss_and_grads(out.total, theirs, [*leaves(b), b.student.logits])
    regs = [p for r in m.regressors for p in r.parameters()]
    ga = torch.autograd.grad(out.total, regs, retain_graph=True)
    gb = torch.autograd.grad(theirs, [p for r in ref.regressors for p in r.parameters()],
                             retain_graph=True)
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-9)
    if train_variance:
        ga = torch.autograd.grad(out.total, list(m.log_scales))
        gb = torch.autograd.grad(theirs, ref.log_scales)
        for x, y in zip(ga, gb, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-9)


def test_vid_variance_is_fixed_like_the_reference_unless_trained():
    """mdistiller's log-scales live in a plain list: not in ``get_learnable_parameters``, so the
    optimiser never moves them. Ours are frozen by default, trained with ``train_variance``."""
    from topkd.config import OptimConfig
    from topkd.engine.optim import build_optimizer

    for train in (False, True):
        torch.manual_seed(0)
        m = create_method({"name": "vid", "train_variance": train}, context())
        before = [a.detach().clone() for a in m.log_scales]
        assert all(a.requires_grad == train for a in m.log_scales)
        assert any(k.startswith("log_scales.") for k in m.state_dict())  # checkpointed
        opt = build_optimizer(OptimConfig(name="sgd", lr=0.1), m.parameters())
        b = feature_batch(dtype=torch.float32)
        m(b).total.backward()
        opt.step()
        moved = [not torch.equal(a, x) for a, x in zip(m.log_scales, before)]
        assert all(moved) if train else not any(moved)
        regs = [p for r in m.regressors for p in r.parameters()]
        assert all(p.grad is not None for p in regs)  # the regressors train in both cases


def test_vid_modules_and_errors():
    m = create_method("vid", context(SMALL_STUDENT, DEEP_TEACHER))
    # one regressor per student stage after the stem: C_s -> C_t -> C_t -> C_t, 1x1, no bias
    assert len(m.regressors) == 3
    assert [tuple(c.weight.shape) for c in m.regressors[2] if isinstance(c, nn.Conv2d)] == \
        [(32, 12, 1, 1), (32, 32, 1, 1), (32, 32, 1, 1)]
    assert [tuple(a.shape) for a in m.log_scales] == [(8,), (16,), (32,)]
    with pytest.raises(ValueError, match="teacher needs at least as many"):
        create_method("vid", context(DEEP_TEACHER, SMALL_STUDENT))
    with pytest.raises(ValueError, match="MethodContext"):
        create_method("vid")
    with pytest.raises(ParamError, match="method.eps=0.001 has no effect here: it applies only "
                                         "when train_variance is true"):
        params_from_dict({"name": "vid", "eps": 1e-3})
    with pytest.raises(ParamError, match="init_pred_var=0.1 must exceed method.eps=0.5"):
        params_from_dict({"name": "vid", "train_variance": True, "eps": 0.5,
                          "init_pred_var": 0.1})
