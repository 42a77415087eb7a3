"""DistillationLoss / LossSpec / presets and the nn.Module front-ends."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import topkd.losses as L
from topkd.losses import METHODS, DistillationLoss, LossSpec

torch.set_num_threads(1)


def make(B=8, C=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, C, generator=g, dtype=torch.float64) * 3
    t = torch.randn(B, C, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, C, (B,), generator=g)
    return s, t, y


def close(a, b, tol=1e-9):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    assert torch.allclose(a, b, atol=tol, rtol=tol), (a, b)


def hand_composed(name, s, t, y, epoch):
    """Each preset written out with the functional API, from the formulas of docs/spec.md."""
    ce = F.cross_entropy(s, y)
    ls = lambda z: L.standardize(z)  # noqa: E731
    w20 = min(epoch / 20, 1)
    if name == "ce":
        return ce
    if name == "kd":
        return 0.1 * ce + 0.9 * L.kd_loss(s, t, 4.0)
    if name == "kd+ls":
        return 0.1 * ce + 9.0 * L.kd_loss(ls(s), ls(t), 2.0)
    if name == "dkd":
        return ce + w20 * L.dkd_loss(s, t, y, 1.0, 8.0, 4.0)
    if name == "dkd+ls":
        return ce + w20 * 9.0 * L.dkd_loss(ls(s), ls(t), y, 1.0, 8.0, 2.0)
    if name == "topkd":
        return ce + w20 * L.topkd_loss(s, t, y, k=5)
    if name == "topkd+ls":
        return ce + w20 * L.topkd_loss(ls(s), ls(t), y, k=5)
    b = L.tsm(t, y, 5)
    if name == "kd+tsm+tdl":
        return 0.1 * ce + 0.9 * L.kd_loss(s, b, 4.0) + L.tdl_loss(s, b, 5)
    if name == "dkd+tsm+tdl":
        return ce + w20 * (L.dkd_loss(s, b, y, 1.0, 8.0, 4.0) + L.tdl_loss(s, b, 5))
    raise AssertionError(name)


@pytest.mark.parametrize("name", METHODS.names())
def test_preset_equals_hand_composed(name):
    s, t, y = make(seed=len(name))
    for epoch in (1, 7, 40):
        total, terms = DistillationLoss(name)(s, t, y, epoch=epoch)
        close(total, hand_composed(name, s, t, y, epoch))
        assert all(v.dim() == 0 and not v.requires_grad for v in terms.values())
        assert total.requires_grad is False  # s does not require grad here


def test_presets_defaults_and_names():
    assert set(METHODS.names()) == {
        "ce", "kd", "dkd", "kd+ls", "dkd+ls", "topkd", "topkd+ls", "kd+tsm+tdl", "dkd+tsm+tdl",
    }  # fmt: skip
    kd = LossSpec.preset("KD")
    assert (kd.ce, kd.base_weight, kd.temperature, kd.warmup) == (0.1, 0.9, 4.0, 0)
    dkd = LossSpec.preset("dkd")
    assert (dkd.dkd_alpha, dkd.dkd_beta, dkd.temperature, dkd.warmup, dkd.ce) == (1, 8, 4, 20, 1)
    kls = LossSpec.preset("kd_ls")
    assert (kls.ls, kls.temperature, kls.base_weight, kls.ce) == (True, 2.0, 9.0, 0.1)
    tk = LossSpec.preset("topkd")
    assert (tk.ce, tk.w_con, tk.w_tdl, tk.tau, tk.k, tk.warmup, tk.tsm) == (
        1,
        1,
        1,
        0.1,
        5,
        20,
        True,
    )
    assert LossSpec.preset("dkd", dkd_beta=2.0).dkd_beta == 2.0
    assert LossSpec.from_dict({"preset": "kd+tsm+tdl", "k": 3}) == LossSpec.preset(
        "kd+tsm+tdl", k=3
    )
    with pytest.raises(ValueError, match=r"unknown loss method 'kd\+tmp'"):
        LossSpec.preset("kd+tmp")


def test_terms_keys():
    s, t, y = make()
    keys = {
        "ce": {"ce"},
        "kd": {"ce", "kd", "warmup"},
        "dkd+ls": {"ce", "dkd", "warmup"},
        "topkd": {"ce", "topkd", "topkd_con", "topkd_tdl", "warmup", "tsm_corrected"},
        "kd+tsm+tdl": {"ce", "kd", "tdl", "warmup", "tsm_corrected"},
    }
    for name, expect in keys.items():
        _, terms = DistillationLoss(name)(s, t, y, epoch=5)
        assert set(terms) == expect, name
    _, terms = DistillationLoss("topkd")(s, t, y, epoch=5)
    close(terms["warmup"], 0.25)
    close(terms["tsm_corrected"], (t.argmax(-1) != y).double().mean())
    close(terms["topkd"], terms["topkd_con"] + terms["topkd_tdl"])


def test_teacher_none_only_without_distillation():
    s, _, y = make()
    total, terms = DistillationLoss("ce")(s, None, y)
    close(total, F.cross_entropy(s, y))
    assert set(terms) == {"ce"}
    with pytest.raises(ValueError, match=r"teacher_logits is None.*base='kd'"):
        DistillationLoss("kd")(s, None, y)
    with pytest.raises(ValueError, match=r"teacher_logits is None.*tdl_weight=0.5"):
        DistillationLoss(LossSpec(tdl_weight=0.5))(s, None, y)


def test_warmup_rules():
    spec = LossSpec.preset("dkd")
    assert (
        spec.warmup_factor(1) == 0.05
        and spec.warmup_factor(20) == 1
        and spec.warmup_factor(99) == 1
    )
    assert LossSpec.preset("kd").warmup_factor(None) == 1.0
    s, t, y = make()
    with pytest.raises(ValueError, match="epoch is required when warmup=20"):
        DistillationLoss(spec)(s, t, y)
    # warm-up scales every term except CE
    tot1, terms = DistillationLoss(spec)(s, t, y, epoch=1)
    close(tot1, terms["ce"] + 0.05 * terms["dkd"])


def test_every_spec_field_matters():
    s, t, y = make(seed=3)
    y[0] = t[0].argmax()
    base = LossSpec(ce=1.0, base="topkd", tsm=True, k=4, tdl_weight=0.5, con_weight=0.5, warmup=10)
    changes = {
        "ce": 0.5, "base": "kd", "base_weight": 2.0, "temperature": 2.0, "ls": True,
        "tsm": False, "k": 3, "gamma": 0.2, "lam": 0.1, "correct_gt": False,
        "schedule": "constant", "w_con": 0.3, "w_tdl": 0.3, "tdl_weight": 1.0, "tdl_alpha": 2.0,
        "tdl_beta": 1.0, "con_weight": 1.0, "tau": 0.3, "warmup": 5,
    }  # fmt: skip
    ref, _ = DistillationLoss(base)(s, t, y, epoch=2)
    for key, value in changes.items():
        spec = base.replace(**{key: value})
        if key in ("temperature", "ls"):  # KD-side fields (LS ~ no-op for TopKD, see docs)
            spec = spec.replace(base="kd")
            ref_k, _ = DistillationLoss(base.replace(base="kd"))(s, t, y, epoch=2)
        else:
            ref_k = ref
        got, _ = DistillationLoss(spec)(s, t, y, epoch=2)
        assert not torch.allclose(got, ref_k), key
    # DKD-only fields
    dkd = LossSpec.preset("dkd")
    ref, _ = DistillationLoss(dkd)(s, t, y, epoch=2)
    for key, value in {"dkd_alpha": 2.0, "dkd_beta": 2.0, "ls": True, "temperature": 2.0}.items():
        got, _ = DistillationLoss(dkd.replace(**{key: value}))(s, t, y, epoch=2)
        assert not torch.allclose(got, ref), key
    # ignore_index
    y2 = y.clone()
    y2[1] = -100
    a, _ = DistillationLoss(dkd.replace(ignore_index=-100))(s, t, y2, epoch=2)
    b, _ = DistillationLoss(dkd)(
        s[torch.arange(8) != 1], t[torch.arange(8) != 1], y[torch.arange(8) != 1], epoch=2
    )
    close(a, b)
    assert {f.name for f in dataclasses.fields(LossSpec)} == set(changes) | {
        "dkd_alpha", "dkd_beta", "ignore_index",
    }  # fmt: skip


def test_from_dict_rejects_bad_keys_and_values():
    with pytest.raises(
        ValueError, match=r"unknown key 'temprature' \(did you mean 'temperature'\?\)"
    ):
        LossSpec.from_dict({"temprature": 4})
    with pytest.raises(
        ValueError, match=r"LossSpec.base: expected one of none, kd, dkd, topkd, got 'kdd'"
    ):
        LossSpec.from_dict({"base": "kdd"})
    with pytest.raises(ValueError, match=r"LossSpec.schedule: expected one of linear, constant"):
        LossSpec.from_dict({"schedule": "cos"})
    with pytest.raises(ValueError, match=r"LossSpec.temperature: expected a number > 0, got 0"):
        LossSpec.from_dict({"temperature": 0})
    with pytest.raises(ValueError, match=r"LossSpec.tau: expected a number > 0, got -1"):
        LossSpec.from_dict({"tau": -1})
    with pytest.raises(ValueError, match=r"LossSpec.ce: expected a number, got '1'"):
        LossSpec.from_dict({"ce": "1"})
    with pytest.raises(ValueError, match=r"LossSpec.ls: expected true or false, got 1"):
        LossSpec.from_dict({"ls": 1})
    with pytest.raises(ValueError, match=r"LossSpec.k: expected an int >= 1, got 0"):
        LossSpec.from_dict({"k": 0})
    with pytest.raises(ValueError, match=r"LossSpec.warmup: expected a number >= 0, got -2"):
        LossSpec.from_dict({"warmup": -2})
    spec = LossSpec.from_dict({"ce": 1, "base": "topkd", "tsm": True, "k": 5, "warmup": 20})
    assert spec.base == "topkd" and LossSpec.from_dict(spec.to_dict()) == spec
    s, t, y = make(C=6)
    with pytest.raises(ValueError, match=r"DistillationLoss: k must satisfy.*C=6\), got k=5"):
        DistillationLoss(spec)(s, t, y, epoch=1)


def test_criterion_leading_dims_ignore_and_soft_labels():
    g = torch.Generator().manual_seed(4)
    s = torch.randn(2, 6, 12, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 6, 12, generator=g, dtype=torch.float64)
    y = torch.randint(0, 12, (2, 6), generator=g)
    y[0, 2] = y[1, 5] = -100
    keep = (y != -100).reshape(-1)
    for name in ("kd+tsm+tdl", "topkd", "dkd+ls"):
        spec = LossSpec.preset(name, ignore_index=-100, k=3)
        a, ta = DistillationLoss(spec)(s, t, y, epoch=4)
        sf, tf, yf = s.reshape(-1, 12)[keep], t.reshape(-1, 12)[keep], y.reshape(-1)[keep]
        b, tb = DistillationLoss(spec.replace(ignore_index=None))(sf, tf, yf, epoch=4)
        close(a, b)
        assert ta.keys() == tb.keys()
        a.backward()
        assert torch.isfinite(s.grad).all()
    # probability labels: soft CE, argmax for the distillation parts
    s2, t2, y2 = make(seed=5)
    p = F.one_hot(y2, 20).double()
    for name in ("dkd", "topkd"):
        a, _ = DistillationLoss(name)(s2, t2, p, epoch=3)
        b, _ = DistillationLoss(name)(s2, t2, y2, epoch=3)
        close(a, b)


def test_criterion_validates_inputs():
    s, t, y = make()
    with pytest.raises(ValueError, match=r"labels must be in \[0, 20\)"):
        DistillationLoss("kd")(s, t, y + 20)
    with pytest.raises(ValueError, match="non-finite"):
        DistillationLoss("ce")(s * float("nan"), None, y)
    with pytest.raises(ValueError, match="expected a LossSpec"):
        DistillationLoss(3)


def test_modules_equal_functional():
    s, t, y = make(seed=6)
    close(L.KDLoss(2.0)(s, t), L.kd_loss(s, t, 2.0))
    close(L.DKDLoss(1.0, 2.0, 3.0)(s, t, y), L.dkd_loss(s, t, y, 1.0, 2.0, 3.0))
    close(L.TSM(3, gamma=0.5)(t, y), L.tsm(t, y, 3, gamma=0.5))
    close(L.TDLLoss(3, beta=1.0)(s, t), L.tdl_loss(s, t, 3, beta=1.0))
    close(L.ContrastiveLoss(0.3)(s, t), L.contrastive_loss(s, t, 0.3))
    close(L.TopKDLoss(4, w_con=0.5)(s, t, y), L.topkd_loss(s, t, y, k=4, w_con=0.5))
    assert "k=4" in repr(L.TopKDLoss(4)) and "temperature=2.0" in repr(L.KDLoss(2.0))
    with pytest.raises(ValueError, match=r"TSM: k must be an int >= 1, got 0"):
        L.TSM(0)
    with pytest.raises(ValueError, match=r"KDLoss: temperature must be a number > 0"):
        L.KDLoss(-1.0)


def test_criterion_half_inputs_and_autocast():
    s, t, y = make(seed=7)
    sh = s.to(torch.bfloat16).requires_grad_(True)
    for name in ("kd+ls", "dkd+tsm+tdl", "topkd"):
        total, terms = DistillationLoss(name)(sh, t.to(torch.bfloat16), y, epoch=30)
        ref_total, _ = DistillationLoss(name)(
            sh.detach().double(), t.to(torch.bfloat16).double(), y, epoch=30
        )
        assert total.dtype == torch.float32 and torch.isfinite(total)
        close(total, ref_total, 1e-4)
        total.backward()
        assert torch.isfinite(sh.grad.float()).all()
        sh.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, _ = DistillationLoss("topkd")(s.float(), t.float(), y, epoch=30)
    b, _ = DistillationLoss("topkd")(s.float(), t.float(), y, epoch=30)
    close(a, b, 1e-6)


def test_criterion_validate_flag_skips_value_checks_only():
    s = torch.randn(4, 10)
    s[1, 2] = float("nan")
    t, y = torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="non-finite"):
        DistillationLoss("kd")(s, t, y)
    total, _ = DistillationLoss("kd", validate=False)(s, t, y)
    assert torch.isnan(total)
    with pytest.raises(ValueError, match="same shape"):  # shapes are still checked
        DistillationLoss("kd", validate=False)(s, t[:, :9], y)
