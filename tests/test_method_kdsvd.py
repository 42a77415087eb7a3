"""KDSVD against a transcription of mdistiller's ``mdistiller/distillers/KDSVD.py`` (commit
a08d46f10d6102bd6e3f258ca5ac880b020ea259), float64, values and gradients to 1e-6.

The reference casts the features to float32 before its SVD (``.float()``); the float64
comparison replaces that cast by float64 (``CAST``), and a float32 test keeps it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from feature_examples import assert_same_loss_and_grads, context, feature_batch, leaves
from topkd.methods import create_method
from topkd.methods.kdsvd import kdsvd_loss

CAST = {"float": lambda x: x.float(), "double": lambda x: x.double()}
_cast = CAST["double"]


# ---- mdistiller/distillers/KDSVD.py, line by line (``.float()`` -> ``_cast``)
def ref_kdsvd_loss(g_s, g_t, k):
    v_sb = None
    v_tb = None
    losses = []
    for i, f_s, f_t in zip(range(len(g_s)), g_s, g_t):
        u_t, s_t, v_t = ref_svd(f_t, k)
        u_s, s_s, v_s = ref_svd(f_s, k + 3)
        v_s, v_t = ref_align_rsv(v_s, v_t)
        s_t = s_t.unsqueeze(1)
        v_t = v_t * s_t
        v_s = v_s * s_t

        if i > 0:
            s_rbf = torch.exp(-(v_s.unsqueeze(2) - v_sb.unsqueeze(1)).pow(2) / 8)
            t_rbf = torch.exp(-(v_t.unsqueeze(2) - v_tb.unsqueeze(1)).pow(2) / 8)

            l2loss = (s_rbf - t_rbf.detach()).pow(2)
            l2loss = torch.where(
                torch.isfinite(l2loss), l2loss, torch.zeros_like(l2loss)
            )
            losses.append(l2loss.sum())

        v_tb = v_t
        v_sb = v_s

    bsz = g_s[0].shape[0]
    losses = [l / bsz for l in losses]  # noqa: E741
    return sum(losses)


def ref_svd(feat, n=1):
    size = feat.shape
    assert len(size) == 4

    x = _cast(feat.view(size[0], size[1] * size[2], size[3]))
    u, s, v = torch.svd(x)

    u = ref_removenan(u)
    s = ref_removenan(s)
    v = ref_removenan(v)

    if n > 0:
        u = F.normalize(u[:, :, :n], dim=1)
        s = F.normalize(s[:, :n], dim=1)
        v = F.normalize(v[:, :, :n], dim=1)

    return u, s, v


def ref_removenan(x):
    x = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
    return x


def ref_align_rsv(a, b):
    cosine = torch.matmul(a.transpose(-2, -1), b)
    max_abs_cosine, _ = torch.max(torch.abs(cosine), 1, keepdim=True)
    mask = torch.where(
        torch.eq(max_abs_cosine, torch.abs(cosine)),
        torch.sign(cosine),
        torch.zeros_like(cosine),
    )
    a = torch.matmul(a, mask)
    return a, b
# ----


# Stage widths equal in student and teacher (8, 8, 4), channels and heights differ.
S = {"feats": [(4, 8, 8), (4, 8, 8), (8, 6, 8), (16, 4, 4)], "pooled_feat": (16,)}
T = {"feats": [(8, 8, 8), (8, 8, 8), (16, 8, 8), (32, 2, 4)], "pooled_feat": (32,)}
# Narrow last stage: fewer singular vectors (2) than k + 3.
S_NARROW = {"feats": [(4, 8, 8), (4, 8, 8), (8, 4, 4), (16, 2, 2)], "pooled_feat": (16,)}
T_NARROW = {"feats": [(8, 8, 8), (8, 8, 8), (16, 4, 4), (32, 2, 2)], "pooled_feat": (32,)}


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("shapes", [(S, T), (S_NARROW, T_NARROW)], ids=["wide", "narrow"])
def test_kdsvd_loss_equals_mdistiller(k, shapes):
    b = feature_batch(*shapes, grad=True, seed=3)
    g_s, g_t = b.student.feats["feats"][1:], b.teacher.feats["feats"][1:]
    ours = kdsvd_loss(g_s, g_t, k)
    assert ours.dtype == torch.float64 and ours.item() > 0
    assert_same_loss_and_grads(ours, ref_kdsvd_loss(g_s, g_t, k), leaves(b)[1:])


def test_kdsvd_float32_like_the_reference(monkeypatch):
    """float32 inputs: the reference's own ``.float()`` path; half precision is upcast too."""
    monkeypatch.setitem(globals(), "_cast", CAST["float"])
    b = feature_batch(S, T, dtype=torch.float32, seed=3)
    g_s, g_t = b.student.feats["feats"][1:], b.teacher.feats["feats"][1:]
    torch.testing.assert_close(kdsvd_loss(g_s, g_t), ref_kdsvd_loss(g_s, g_t, 1),
                               rtol=1e-4, atol=1e-6)
    half = kdsvd_loss([f.bfloat16() for f in g_s], [f.bfloat16() for f in g_t])
    ref = ref_kdsvd_loss([f.bfloat16() for f in g_s], [f.bfloat16() for f in g_t], 1)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, ref, rtol=1e-4, atol=1e-6)


# Equal channel counts (4, 8, 16) and widths, as the channel layout needs.
S_CH = {"feats": [(4, 8, 8), (4, 8, 8), (8, 6, 8), (16, 4, 4)], "pooled_feat": (16,)}
T_CH = {"feats": [(4, 8, 8), (4, 8, 8), (8, 8, 8), (16, 2, 4)], "pooled_feat": (32,)}


@pytest.mark.parametrize("k", [1, 2])
def test_kdsvd_channel_svd_equals_the_authors_layout(k):
    """``channel_svd``: SVD of ``(H*W, C)`` matrices, as the authors' TensorFlow code
    (sseung0703/SSKD_SVD: ``tf.reshape(x, [B, H*W, D])`` of an NHWC map). mdistiller's own code
    computes exactly that when given NHWC tensors: its ``view(B, size[1]*size[2], size[3])``
    is then the TensorFlow reshape."""
    b = feature_batch(S_CH, T_CH, grad=True, seed=3)
    g_s, g_t = b.student.feats["feats"][1:], b.teacher.feats["feats"][1:]
    nhwc = [f.permute(0, 2, 3, 1) for f in g_s], [f.permute(0, 2, 3, 1) for f in g_t]
    ours = kdsvd_loss(g_s, g_t, k, channel_svd=True)
    assert_same_loss_and_grads(ours, ref_kdsvd_loss([f.contiguous() for f in nhwc[0]],
                                                    [f.contiguous() for f in nhwc[1]], k),
                               leaves(b)[1:])
    assert not torch.allclose(ours, kdsvd_loss(g_s, g_t, k))  # another loss than mdistiller's
    with pytest.raises(ValueError, match="stage 0 has channels 4 in the student and 8 in the "
                                         "teacher.*over channels"):
        kdsvd_loss(g_s, [torch.cat([g_t[0]] * 2, 1), *g_t[1:]], k, channel_svd=True)


def test_kdsvd_method_total_equals_mdistiller_forward_train():
    b = feature_batch(S, T, grad=True, seed=3)
    m = create_method({"name": "kdsvd"}, context(S, T))
    ref = 1.0 * F.cross_entropy(b.student.logits, b.labels) + 1.0 * ref_kdsvd_loss(
        b.student.feats["feats"][1:], b.teacher.feats["feats"][1:], 1)
    assert_same_loss_and_grads(m(b).total, ref, [*leaves(b)[1:], b.student.logits])


def test_kdsvd_needs_equal_widths_and_two_stages():
    b = feature_batch(S, T, seed=3)
    g_s, g_t = b.student.feats["feats"][1:], b.teacher.feats["feats"][1:]
    with pytest.raises(ValueError, match="stage 1 has width 8 in the student and 4 in the "
                                         "teacher"):
        kdsvd_loss(g_s, [g_t[0], F.avg_pool2d(g_t[1], 2)])
    with pytest.raises(RuntimeError):  # the reference fails too (matrix sizes)
        ref_kdsvd_loss(g_s, [g_t[0], F.avg_pool2d(g_t[1], 2)], 1)
    with pytest.raises(ValueError, match="at least 2 stages"):
        kdsvd_loss(g_s[:1], g_t[:1])
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        kdsvd_loss(g_s, g_t, 0)


# ---- svd_grad="safe": the corrected SVD gradient
def _svd_grads(a, safe, ws, wv, n=2):
    from topkd.methods.kdsvd import _SafeSVD

    a = a.detach().clone().requires_grad_()
    if safe:
        s, v = _SafeSVD.apply(a)
    else:
        _, s, vh = torch.linalg.svd(a, full_matrices=False)
        v = vh.mH
    # |v|^2: independent of the SVD's sign convention, which can differ between two matrices
    ((s * ws).sum() + (v[..., :n] ** 2 * wv).sum()).backward()
    return a.grad


@pytest.mark.parametrize("shape", [(7, 4), (4, 4), (3, 6)], ids=["tall", "square", "wide"])
def test_safe_svd_gradient_is_torchs_where_that_is_defined(shape):
    """Distinct non-zero singular values: the same gradient as torch's autograd (and finite
    differences), through S and the leading right singular vectors."""
    from topkd.methods.kdsvd import _SafeSVD

    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, *shape, generator=g, dtype=torch.float64)
    p = min(shape)
    ws = torch.randn(2, p, generator=g, dtype=torch.float64)
    wv = torch.randn(2, shape[1], 2, generator=g, dtype=torch.float64)
    torch.testing.assert_close(_svd_grads(a, True, ws, wv), _svd_grads(a, False, ws, wv),
                               rtol=1e-9, atol=1e-10)
    assert torch.autograd.gradcheck(
        lambda x: ((_SafeSVD.apply(x)[1][..., :2] ** 2) * wv).sum()
        + (_SafeSVD.apply(x)[0] * ws).sum(), (a.clone().requires_grad_(),))


@pytest.mark.parametrize("shape", [(6, 4), (4, 6)], ids=["tall", "wide"])
def test_safe_svd_gradient_is_finite_at_repeated_unused_singular_values(shape):
    """Two zero columns (tall) / rows (wide): two exactly-zero singular values, which the loss
    does not use. torch's gradient is NaN (inf * 0); the safe one is finite and is the limit of
    torch's on the matrix perturbed away from the repetition."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, *shape, generator=g, dtype=torch.float64)
    if shape[0] > shape[1]:
        a[..., -2:] = 0
    else:
        a[..., -2:, :] = 0
    ws = torch.zeros(2, min(shape), dtype=torch.float64)
    wv = torch.randn(2, shape[1], 2, generator=g, dtype=torch.float64)
    assert not torch.isfinite(_svd_grads(a, False, ws, wv)).all()
    safe = _svd_grads(a, True, ws, wv)
    assert torch.isfinite(safe).all() and safe.abs().sum() > 0
    bump = torch.zeros_like(a)
    if shape[0] > shape[1]:
        bump[..., -2:] = torch.tensor([[1e-7, 0], [0, 3e-7]] + [[0, 0]] * (shape[0] - 2),
                                      dtype=torch.float64)
    else:
        bump[..., -2:, :2] = torch.tensor([[1e-7, 0], [0, 3e-7]], dtype=torch.float64)
    torch.testing.assert_close(safe, _svd_grads(a + bump, False, ws, wv), rtol=0, atol=1e-5)


def test_kdsvd_safe_gradient_on_feature_maps():
    """svd_grad: safe leaves the loss and (where torch's is finite) its gradients unchanged, and
    trains on maps with dead columns (ReLU zeros), where the reference's gradient is NaN."""
    b = feature_batch(S, T, grad=True, seed=3)
    g_s, g_t = b.student.feats["feats"][1:], b.teacher.feats["feats"][1:]
    safe = kdsvd_loss(g_s, g_t, 1, svd_grad="safe")
    assert_same_loss_and_grads(safe, ref_kdsvd_loss(g_s, g_t, 1), leaves(b)[1:])
    dead = [f.detach().clone() for f in g_s]
    for f in dead:
        f[..., -2:] = 0  # the last two width positions dead in every stage
    dead = [f.requires_grad_() for f in dead]
    grads = {}
    for how in ("torch", "safe"):
        grads[how] = torch.autograd.grad(kdsvd_loss(dead, g_t, 1, svd_grad=how), dead)
    assert not all(torch.isfinite(x).all() for x in grads["torch"])
    assert all(torch.isfinite(x).all() for x in grads["safe"])
    assert sum(x.abs().sum() for x in grads["safe"]) > 0
    m = create_method({"name": "kdsvd", "svd_grad": "safe"}, context(S, T))
    assert m.params.svd_grad == "safe"
    with pytest.raises(ValueError, match="svd_grad must be 'torch' or 'safe'"):
        kdsvd_loss(g_s, g_t, 1, svd_grad="authors")
