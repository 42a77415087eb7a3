"""Behaviour shared by the feature methods FitNet, AT, RKD, PKT, SP, NST, KDSVD and VID:
ignored rows, half-precision features, missing taps, no gradient into the teacher."""

from __future__ import annotations

import pytest
import torch

from method_examples import example
from topkd.methods import Batch, ModelOutput, method_class, params_from_dict

FEATURE_METHODS = ["at", "fitnet", "kdsvd", "nst", "pkt", "rkd", "sp", "vid"]


def _build(name: str, **params):
    torch.manual_seed(0)
    return example(params_from_dict({"name": name, **params}))


def _take(out: ModelOutput, keep: torch.Tensor) -> ModelOutput:
    feats = {k: [f[keep] for f in v] if isinstance(v, list) else v[keep]
             for k, v in out.feats.items()}
    return ModelOutput(out.logits[keep], feats)


@pytest.mark.parametrize("name", FEATURE_METHODS)
def test_ignored_rows_are_dropped_from_the_feature_term(name):
    m, b = _build(name, ignore_index=0)
    keep = b.labels != 0
    assert 0 < int(keep.sum()) < len(keep)
    ref, rb = _build(name)
    kept = Batch(_take(rb.student, keep), _take(rb.teacher, keep), rb.labels[keep], epoch=1.0)
    torch.testing.assert_close(m(b).distill, ref(kept).distill, rtol=1e-12, atol=0)
    # every row ignored: a zero that keeps the graph
    b.labels.zero_()
    b.student.logits.requires_grad_()
    out = m(b)
    assert out.distill.item() == 0.0 and out.distill.requires_grad


@pytest.mark.parametrize("name", FEATURE_METHODS)
def test_half_precision_features_are_upcast(name):
    m, b = _build(name)
    m.float()  # the engine's modules stay float32 under AMP; features arrive in bf16/fp16

    def cast(dtype):
        for out in (b.student, b.teacher):
            out.logits = out.logits.to(dtype)
            out.feats = {k: [f.to(dtype) for f in v] if isinstance(v, list) else v.to(dtype)
                         for k, v in out.feats.items()}

    cast(torch.bfloat16)
    got = m(b).distill
    cast(torch.float32)  # the same (bf16-rounded) values
    ref = m(b).distill
    assert got.dtype == torch.float32 and torch.isfinite(got)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", FEATURE_METHODS)
def test_teacher_features_get_no_gradient(name):
    m, b = _build(name)
    t_feats = [f for v in b.teacher.feats.values() for f in (v if isinstance(v, list) else [v])]
    for f in t_feats:
        f.requires_grad_()
    s_feats = [f for v in b.student.feats.values() for f in (v if isinstance(v, list) else [v])]
    for f in s_feats:
        f.requires_grad_()
    grads = torch.autograd.grad(m(b).distill, s_feats + t_feats, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads[:len(s_feats)])
    assert all(g is None or not g.any() for g in grads[len(s_feats):])


@pytest.mark.parametrize("name", FEATURE_METHODS)
def test_missing_taps_are_named(name):
    m, b = _build(name)
    cls = method_class(m.params)
    kind = cls.student_taps[0]
    assert cls.needs_teacher and cls.student_taps == cls.teacher_taps
    b.teacher.feats.pop(kind)
    with pytest.raises(ValueError, match=f"{name}: the teacher's '{kind}' features are missing"):
        m(b)
