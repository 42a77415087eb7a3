"""PKT against a transcription of mdistiller's ``mdistiller/distillers/PKT.py`` (commit
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
from topkd.methods import create_method
from topkd.methods.pkt import pkt_loss


# ---- mdistiller/distillers/PKT.py, line by line
def ref_pkt_loss(f_s, f_t, eps=1e-7):
    # Normalize each vector by its norm
    output_net_norm = torch.sqrt(torch.sum(f_s**2, dim=1, keepdim=True))
    f_s = f_s / (output_net_norm + eps)
    f_s[f_s != f_s] = 0
    target_net_norm = torch.sqrt(torch.sum(f_t**2, dim=1, keepdim=True))
    f_t = f_t / (target_net_norm + eps)
    f_t[f_t != f_t] = 0

    # Calculate the cosine similarity
    model_similarity = torch.mm(f_s, f_s.transpose(0, 1))
    target_similarity = torch.mm(f_t, f_t.transpose(0, 1))
    # Scale cosine similarity to 0..1
    model_similarity = (model_similarity + 1.0) / 2.0
    target_similarity = (target_similarity + 1.0) / 2.0
    # Transform them into probabilities
    model_similarity = model_similarity / torch.sum(
        model_similarity, dim=1, keepdim=True
    )
    target_similarity = target_similarity / torch.sum(
        target_similarity, dim=1, keepdim=True
    )
    # Calculate the KL-divergence
    loss = torch.mean(
        target_similarity
        * torch.log((target_similarity + eps) / (model_similarity + eps))
    )
    return loss
# ----


@pytest.mark.parametrize("eps", [1e-7, 1e-2])
def test_pkt_loss_equals_mdistiller(eps):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(7, 12, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(7, 20, generator=g, dtype=torch.float64)
    assert_same_loss_and_grads(pkt_loss(s, t, eps), ref_pkt_loss(s, t, eps), [s])


def test_pkt_zero_embedding_like_the_reference():
    """A zero student embedding: finite loss (norm + eps), NaN gradient for that row from the
    square root at 0 -- the reference's behaviour, kept (docs/methods.md)."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(7, 12, generator=g, dtype=torch.float64)
    s[3] = 0.0
    s.requires_grad_()
    t = torch.randn(7, 20, generator=g, dtype=torch.float64)
    ours, ref = pkt_loss(s, t), ref_pkt_loss(s, t)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    (ga,), (gb,) = torch.autograd.grad(ours, [s]), torch.autograd.grad(ref, [s])
    torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-9, equal_nan=True)
    assert torch.isnan(ga[3]).all() and torch.isfinite(ga[[0, 1, 2, 4, 5, 6]]).all()


def test_pkt_nan_features_become_zero_like_the_reference():
    s = torch.randn(5, 4, dtype=torch.float64)
    t = torch.randn(5, 6, dtype=torch.float64)
    s[2, 1] = float("nan")
    torch.testing.assert_close(pkt_loss(s, t), ref_pkt_loss(s.clone(), t.clone()))


def test_pkt_method_total_equals_mdistiller_forward_train():
    b = feature_batch(SMALL_STUDENT, TEACHER, grad=True)
    m = create_method({"name": "pkt"}, context(SMALL_STUDENT, TEACHER))
    fs, ft = b.student.feats["pooled_feat"], b.teacher.feats["pooled_feat"]
    ref = 1.0 * F.cross_entropy(b.student.logits, b.labels) + 30000.0 * ref_pkt_loss(fs, ft)
    assert_same_loss_and_grads(m(b).total, ref, [fs, b.student.logits])
