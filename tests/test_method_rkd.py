"""RKD against a transcription of mdistiller's ``mdistiller/distillers/RKD.py`` (commit
a08d46f10d6102bd6e3f258ca5ac880b020ea259), float64, values and gradients to 1e-6."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from feature_examples import (
    SMALL_STUDENT,
    TEACHER,
    assert_same_loss_and_grads,
    context,
    feature_batch,
)
from topkd.methods import ParamError, create_method, params_from_dict
from topkd.methods.rkd import rkd_loss


# ---- mdistiller/distillers/RKD.py, line by line
def ref_pdist(e, squared, eps):
    e_square = e.pow(2).sum(dim=1)
    prod = e @ e.t()
    res = (e_square.unsqueeze(1) + e_square.unsqueeze(0) - 2 * prod).clamp(min=eps)

    if not squared:
        res = res.sqrt()

    res = res.clone()
    res[range(len(e)), range(len(e))] = 0
    return res


def ref_rkd_loss(f_s, f_t, squared=False, eps=1e-12, distance_weight=25, angle_weight=50):
    stu = f_s.view(f_s.shape[0], -1)
    tea = f_t.view(f_t.shape[0], -1)

    # RKD distance loss
    with torch.no_grad():
        t_d = ref_pdist(tea, squared, eps)
        mean_td = t_d[t_d > 0].mean()
        t_d = t_d / mean_td

    d = ref_pdist(stu, squared, eps)
    mean_d = d[d > 0].mean()
    d = d / mean_d

    loss_d = F.smooth_l1_loss(d, t_d)

    # RKD Angle loss
    with torch.no_grad():
        td = tea.unsqueeze(0) - tea.unsqueeze(1)
        norm_td = F.normalize(td, p=2, dim=2)
        t_angle = torch.bmm(norm_td, norm_td.transpose(1, 2)).view(-1)

    sd = stu.unsqueeze(0) - stu.unsqueeze(1)
    norm_sd = F.normalize(sd, p=2, dim=2)
    s_angle = torch.bmm(norm_sd, norm_sd.transpose(1, 2)).view(-1)

    loss_a = F.smooth_l1_loss(s_angle, t_angle)

    loss = distance_weight * loss_d + angle_weight * loss_a
    return loss
# ----


def _embeddings(seed=0, b=7, d_s=12, d_t=20, close=True):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, d_s, generator=g, dtype=torch.float64)
    t = torch.randn(b, d_t, generator=g, dtype=torch.float64)
    if close:  # a near-duplicate pair: squared distances below a large eps get clamped
        s[1], t[1] = s[0] + 0.01, t[0] + 0.01
        t[2] *= 8  # a far teacher sample: distance differences above 1 (smooth L1's L1 part)
    return s.requires_grad_(), t


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("eps", [1e-12, 1e-3])
@pytest.mark.parametrize("weights", [(25.0, 50.0), (1.0, 0.0), (0.0, 2.0)])
def test_rkd_loss_equals_mdistiller(squared, eps, weights):
    s, t = _embeddings()
    assert_same_loss_and_grads(rkd_loss(s, t, squared, eps, *weights),
                               ref_rkd_loss(s, t, squared, eps, *weights), [s])


def test_rkd_loss_on_4d_features_flattens_them():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 4, 2, 2, generator=g, dtype=torch.float64)
    assert_same_loss_and_grads(rkd_loss(s, t), ref_rkd_loss(s, t), [s])


def test_rkd_method_total_equals_mdistiller_forward_train():
    b = feature_batch(SMALL_STUDENT, TEACHER, grad=True)
    m = create_method({"name": "rkd"}, context(SMALL_STUDENT, TEACHER))
    fs, ft = b.student.feats["pooled_feat"], b.teacher.feats["pooled_feat"]
    ref = 1.0 * F.cross_entropy(b.student.logits, b.labels) + 1.0 * ref_rkd_loss(
        fs, ft, False, 1e-12, 25, 50)
    assert_same_loss_and_grads(m(b).total, ref, [fs, b.student.logits])


def test_rkd_batch_of_one():
    s, t = _embeddings(b=1, close=False)
    with pytest.raises(ValueError, match="at least 2 samples"):
        rkd_loss(s, t)
    assert torch.isnan(ref_rkd_loss(s, t))  # the reference's mean over no pair
    # in a method, a batch without a pair contributes 0 (and keeps the graph)
    b = feature_batch(SMALL_STUDENT, TEACHER, b=1, grad=True)
    out = create_method("rkd")(b)
    assert out.distill.item() == 0.0 and out.total.requires_grad


def test_rkd_params():
    with pytest.raises(ParamError, match="distance_weight and method.angle_weight are both 0"):
        params_from_dict({"name": "rkd", "distance_weight": 0, "angle_weight": 0})
    with pytest.raises(ParamError, match=r"method.eps=0.1 has no effect here: it applies only "
                                         r"when distance_weight > 0"):
        params_from_dict({"name": "rkd", "distance_weight": 0, "eps": 0.1})
    with pytest.raises(ParamError, match="method.squared=True has no effect"):
        params_from_dict({"name": "rkd", "distance_weight": 0, "squared": True})
