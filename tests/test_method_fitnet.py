"""FitNet against a transcription of mdistiller's ``mdistiller/distillers/FitNet.py`` and
``_common.py`` (``ConvReg``) (commit a08d46f10d6102bd6e3f258ca5ac880b020ea259), float64, values
and gradients (student features and regressor parameters) to 1e-6."""

from __future__ import annotations

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
)
from topkd.methods import create_method
from topkd.methods.fitnet import ConvReg, hint_loss


# ---- mdistiller/distillers/_common.py (ConvReg), line by line
class RefConvReg(nn.Module):
    """Convolutional regression"""

    def __init__(self, s_shape, t_shape, use_relu=True):
        super(RefConvReg, self).__init__()  # noqa: UP008
        self.use_relu = use_relu
        s_N, s_C, s_H, s_W = s_shape
        t_N, t_C, t_H, t_W = t_shape
        if s_H == 2 * t_H:
            self.conv = nn.Conv2d(s_C, t_C, kernel_size=3, stride=2, padding=1)
        elif s_H * 2 == t_H:
            self.conv = nn.ConvTranspose2d(s_C, t_C, kernel_size=4, stride=2, padding=1)
        elif s_H >= t_H:
            self.conv = nn.Conv2d(s_C, t_C, kernel_size=(1 + s_H - t_H, 1 + s_W - t_W))
        else:
            raise NotImplemented("student size {}, teacher size {}".format(s_H, t_H))  # noqa: F901, UP032
        self.bn = nn.BatchNorm2d(t_C)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.conv(x)
        if self.use_relu:
            return self.relu(self.bn(x))
        else:
            return self.bn(x)


# ---- mdistiller/distillers/FitNet.py (forward_train), line by line
def ref_forward_train(conv_reg, hint_layer, logits_student, target, feature_student,
                      feature_teacher, ce_loss_weight, feat_loss_weight):
    loss_ce = ce_loss_weight * F.cross_entropy(logits_student, target)
    f_s = conv_reg(feature_student["feats"][hint_layer])
    loss_feat = feat_loss_weight * F.mse_loss(
        f_s, feature_teacher["feats"][hint_layer]
    )
    return loss_ce + loss_feat
# ----


def _twins(s_shape, t_shape):
    torch.manual_seed(0)
    ours = ConvReg(s_shape, t_shape).double()
    ref = RefConvReg((1, *s_shape), (1, *t_shape)).double()
    ref.load_state_dict(ours.state_dict())  # same parameter names and shapes
    with torch.no_grad():  # non-trivial BN affine parameters
        for m in (ours, ref):
            m.bn.weight.copy_(torch.linspace(0.5, 1.5, t_shape[0]))
            m.bn.bias.copy_(torch.linspace(-0.2, 0.3, t_shape[0]))
    return ours, ref


@pytest.mark.parametrize("s_shape, t_shape, conv", [
    ((4, 8, 8), (6, 8, 8), "1x1"),
    ((4, 8, 8), (6, 4, 4), "stride-2 3x3"),
    ((4, 4, 4), (6, 8, 8), "transposed 4x4"),
    ((4, 7, 6), (6, 5, 4), "3x3 valid"),
])
def test_hint_loss_with_convreg_equals_mdistiller(s_shape, t_shape, conv):
    ours, ref = _twins(s_shape, t_shape)
    assert type(ours.conv) is type(ref.conv)
    assert ours.conv.weight.shape == ref.conv.weight.shape
    g = torch.Generator().manual_seed(1)
    f_s = torch.randn(5, *s_shape, generator=g, dtype=torch.float64, requires_grad=True)
    f_t = torch.randn(5, *t_shape, generator=g, dtype=torch.float64).relu()
    mine, theirs = hint_loss(f_s, f_t, ours), F.mse_loss(ref(f_s), f_t)
    assert_same_loss_and_grads(mine, theirs, [f_s])
    ga = torch.autograd.grad(mine, list(ours.parameters()))
    gb = torch.autograd.grad(theirs, list(ref.parameters()))
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    # BN running statistics move alike (train mode)
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(v, ref.state_dict()[k], rtol=1e-6, atol=1e-9, msg=k)


def test_convreg_unsupported_sizes():
    with pytest.raises(TypeError):  # the reference's `raise NotImplemented(...)`
        RefConvReg((1, 4, 4, 4), (1, 6, 6, 6))
    with pytest.raises(ValueError, match="cannot map a student map of size 4x4 to a teacher "
                                         "map of size 6x6"):
        ConvReg((4, 4, 4), (6, 6, 6))


@pytest.mark.parametrize("student, teacher, hint", [
    (STUDENT, TEACHER, 2), (SMALL_STUDENT, DEEP_TEACHER, 2), (SMALL_STUDENT, TEACHER, 3)])
def test_fitnet_method_total_equals_mdistiller_forward_train(student, teacher, hint):
    torch.manual_seed(0)
    m = create_method({"name": "fitnet", "hint_layer": hint}, context(student, teacher))
    ref = RefConvReg((1, *student["feats"][hint]), (1, *teacher["feats"][hint]))
    ref.load_state_dict(m.conv_reg.state_dict())
    m.double()
    ref.double()
    b = feature_batch(student, teacher, grad=True)
    out = m(b)
    theirs = ref_forward_train(ref, hint, b.student.logits, b.labels, b.student.feats,
                               b.teacher.feats, 1.0, 100.0)
    f_hint = b.student.feats["feats"][hint]
    assert_same_loss_and_grads(out.total, theirs, [f_hint, b.student.logits])
    ga = torch.autograd.grad(out.total, list(m.conv_reg.parameters()))
    gb = torch.autograd.grad(theirs, list(ref.parameters()))
    for a, b_ in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, b_, rtol=1e-6, atol=1e-9)
    assert set(out.terms) == {"ce", "hint", "warmup"}


def test_fitnet_build_errors():
    with pytest.raises(ValueError, match="MethodContext"):
        create_method("fitnet")
    with pytest.raises(ValueError, match="hint_layer=4 is out of range: the student has 4 and "
                                         "the teacher 4 feature stages"):
        create_method({"name": "fitnet", "hint_layer": 4}, context())
    big = {"feats": [(4, 8, 8), (4, 8, 8), (8, 8, 8), (16, 8, 8)], "pooled_feat": (16,)}
    small = {"feats": [(4, 8, 8), (4, 8, 8), (8, 3, 3), (16, 2, 2)], "pooled_feat": (16,)}
    with pytest.raises(ValueError, match="fitnet: hint_layer=2: ConvReg cannot map a student "
                                         "map of size 3x3 to a teacher map of size 8x8"):
        create_method("fitnet", context(small, big))
