"""The logit methods (ce, kd, dkd, topkd; LS/TSM/TDL as their parameters) against hand-composed
formulas of the functional API, their terms, warm-up, inputs and the loss modules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import topkd.losses as L
from topkd.methods import Batch, ModelOutput, create_method

torch.set_num_threads(1)

TSM = {"gamma": 1.0, "lam": 0.5, "correct_gt": True, "schedule": "linear"}
TDL = {"weight": 1.0, "alpha": 1.0, "beta": 0.5}
# The shipped CIFAR-100 method configs (configs/methods/*.yaml), as sections.
SECTIONS = {
    "ce": {"name": "ce"},
    "kd": {"name": "kd", "ce": 0.1, "kd_weight": 0.9, "temperature": 4.0},
    "kd+ls": {"name": "kd", "ce": 0.1, "kd_weight": 9.0, "temperature": 2.0, "ls": True},
    "dkd": {"name": "dkd", "ce": 1.0, "alpha": 1.0, "beta": 8.0, "temperature": 4.0,
            "warmup": 20},
    "dkd+ls": {"name": "dkd", "alpha": 9.0, "beta": 72.0, "temperature": 2.0, "ls": True},
    "topkd": {"name": "topkd"},
    "kd+tsm+tdl": {"name": "kd", "k": 5, "tsm": TSM, "tdl": TDL},
    "dkd+tsm+tdl": {"name": "dkd", "k": 5, "tsm": TSM, "tdl": TDL},
}


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
    """Each method written out with the functional API, from the spec's formulas."""
    ce = F.cross_entropy(s, y)
    ls = L.standardize
    w20 = min(epoch / 20, 1)
    if name == "ce":
        return ce
    if name == "kd":
        return 0.1 * ce + 0.9 * L.kd_loss(s, t, 4.0)
    if name == "kd+ls":
        return 0.1 * ce + 9.0 * L.kd_loss(ls(s), ls(t), 2.0)
    if name == "dkd":
        return ce + w20 * L.dkd_loss(s, t, y, 1.0, 8.0, 4.0)
    if name == "dkd+ls":  # the LS code: alpha and beta times its kd weight 9, T 2
        return ce + w20 * L.dkd_loss(ls(s), ls(t), y, 9.0, 72.0, 2.0)
    if name == "topkd":
        return ce + w20 * L.topkd_loss(s, t, y, k=5)
    b = L.tsm(t, y, 5)
    if name == "kd+tsm+tdl":
        return 0.1 * ce + 0.9 * L.kd_loss(s, b, 4.0) + L.tdl_loss(s, b, 5)
    if name == "dkd+tsm+tdl":
        return ce + w20 * (L.dkd_loss(s, b, y, 1.0, 8.0, 4.0) + L.tdl_loss(s, b, 5))
    raise AssertionError(name)


@pytest.mark.parametrize("name", sorted(SECTIONS))
def test_method_equals_hand_composed(name):
    s, t, y = make(seed=len(name))
    m = create_method(SECTIONS[name])
    for epoch in (1, 7, 40):
        out = m(s, t if m.needs_teacher else None, y, epoch=epoch)
        close(out.total, hand_composed(name, s, t, y, epoch))
        close(out.total, out.task + out.distill)
        assert all(v.dim() == 0 and not v.requires_grad for v in out.terms.values())
        total, terms = out  # unpacks like the old criterion
        assert total is out.total and terms is out.terms


def test_method_configs_equal_these_sections():
    """configs/methods/*.yaml are the sections above (the hand-composed tests cover them)."""
    from pathlib import Path

    from topkd.config import load_config
    from topkd.methods import params_from_dict

    root = Path(__file__).resolve().parents[1] / "configs" / "methods"
    files = {"ce": "ce", "kd": "kd", "kd+ls": "kd_ls", "dkd": "dkd", "dkd+ls": "dkd_ls",
             "topkd": "topkd", "kd+tsm+tdl": "kd_tsm_tdl", "dkd+tsm+tdl": "dkd_tsm_tdl"}
    for name, f in files.items():
        assert load_config(root / f"{f}.yaml").method == params_from_dict(SECTIONS[name]), name


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
        m = create_method(SECTIONS[name])
        terms = m(s, t if m.needs_teacher else None, y, epoch=5).terms
        assert set(terms) == expect, name
    terms = create_method("topkd")(s, t, y, epoch=5).terms
    close(terms["warmup"], 0.25)
    close(terms["tsm_corrected"], (t.argmax(-1) != y).double().mean())
    close(terms["topkd"], terms["topkd_con"] + terms["topkd_tdl"])


def test_task_and_distill_parts():
    s, t, y = make()
    out = create_method("dkd")(s, t, y, epoch=2)
    close(out.task, F.cross_entropy(s, y))
    close(out.distill, 0.1 * L.dkd_loss(s, t, y))
    ce = create_method("ce")(s, None, y)
    close(ce.total, F.cross_entropy(s, y)) and close(ce.distill, 0.0)
    assert set(ce.terms) == {"ce"}


def test_teacher_required_and_batch_form():
    s, t, y = make()
    with pytest.raises(ValueError, match="method 'kd' distils from a teacher, but no teacher"):
        create_method("kd")(s, None, y)
    with pytest.raises(ValueError, match="labels are required"):
        create_method("kd")(s, t)
    m = create_method("kd")
    batch = Batch(ModelOutput(s), ModelOutput(t), y, epoch=1)
    close(m(batch).total, m(s, t, y, epoch=1).total)


def test_warmup_rules():
    p = create_method("dkd").params
    assert (p.warmup_factor(1), p.warmup_factor(20), p.warmup_factor(99)) == (0.05, 1, 1)
    assert create_method("kd").params.warmup_factor(None) == 1.0
    s, t, y = make()
    with pytest.raises(ValueError, match="epoch is required when warmup=20"):
        create_method("dkd")(s, t, y)
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        create_method("dkd")(s, t, y, epoch=-1)
    out = create_method("dkd")(s, t, y, epoch=1)  # warm-up scales every term except CE
    close(out.total, out.terms["ce"] + 0.05 * out.terms["dkd"])


def test_ignore_index_equals_dropping_rows():
    s, t, y = make()
    y2 = y.clone()
    y2[1] = -100
    keep = torch.arange(8) != 1
    for name in ("kd", "dkd", "topkd", "kd+tsm+tdl"):
        m = create_method({**SECTIONS[name], "ignore_index": -100})
        a = m(s, t, y2, epoch=2).total
        b = create_method(SECTIONS[name])(s[keep], t[keep], y[keep], epoch=2).total
        close(a, b)


def test_leading_dims_ignore_and_soft_labels():
    g = torch.Generator().manual_seed(4)
    s = torch.randn(2, 6, 12, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 6, 12, generator=g, dtype=torch.float64)
    y = torch.randint(0, 12, (2, 6), generator=g)
    y[0, 2] = y[1, 5] = -100
    keep = (y != -100).reshape(-1)
    for name in ("kd+tsm+tdl", "topkd", "dkd+ls"):
        sec = {**SECTIONS[name], "ignore_index": -100}
        if name != "dkd+ls":
            sec["k"] = 3
        a = create_method(sec)(s, t, y, epoch=4)
        sf, tf, yf = s.reshape(-1, 12)[keep], t.reshape(-1, 12)[keep], y.reshape(-1)[keep]
        b = create_method({k: v for k, v in sec.items() if k != "ignore_index"})(sf, tf, yf,
                                                                                  epoch=4)
        close(a.total, b.total)
        assert a.terms.keys() == b.terms.keys()
        a.total.backward()
        assert torch.isfinite(s.grad).all()
    # probability labels: soft CE, argmax for the distillation parts
    s2, t2, y2 = make(seed=5)
    p = F.one_hot(y2, 20).double()
    for name in ("dkd", "topkd", "kd+tsm+tdl"):
        a = create_method(SECTIONS[name])(s2, t2, p, epoch=3).total
        b = create_method(SECTIONS[name])(s2, t2, y2, epoch=3).total
        close(a, b)


def test_methods_validate_inputs():
    s, t, y = make()
    with pytest.raises(ValueError, match=r"labels must be in \[0, 20\)"):
        create_method("kd")(s, t, y + 20)
    with pytest.raises(ValueError, match="non-finite"):
        create_method("ce")(s * float("nan"), None, y)
    with pytest.raises(ValueError, match=r"kd: k must satisfy 1 <= k and k <= C \(C=6\), got k=7"):
        create_method(SECTIONS["kd+tsm+tdl"] | {"k": 7})(*make(C=6))
    with pytest.raises(ValueError, match=r"k must satisfy.*C=6\), got k=5"):
        create_method("topkd")(*make(C=6), epoch=1)
    with pytest.raises(TypeError, match="needs KDParams"):
        type(create_method("kd"))(create_method("dkd").params)


def test_validate_flag_skips_value_checks_only():
    s = torch.randn(4, 10)
    s[1, 2] = float("nan")
    t, y = torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="non-finite"):
        create_method("kd")(s, t, y)
    m = create_method("kd")
    m.validate = False
    assert torch.isnan(m(s, t, y).total)
    with pytest.raises(ValueError, match="same shape"):  # shapes are still checked
        m(s, t[:, :9], y)


def test_half_inputs_and_autocast():
    s, t, y = make(seed=7)
    sh = s.to(torch.bfloat16).requires_grad_(True)
    for name in ("kd+ls", "dkd+tsm+tdl", "topkd"):
        m = create_method(SECTIONS[name])
        total = m(sh, t.to(torch.bfloat16), y, epoch=30).total
        ref = m(sh.detach().double(), t.to(torch.bfloat16).double(), y, epoch=30).total
        assert total.dtype == torch.float32 and torch.isfinite(total)
        close(total, ref, 1e-4)
        total.backward()
        assert torch.isfinite(sh.grad.float()).all()
        sh.grad = None
    m = create_method("topkd")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = m(s.float(), t.float(), y, epoch=30).total
    close(a, m(s.float(), t.float(), y, epoch=30).total, 1e-6)


def test_ls_is_a_no_op_under_topkd_which_is_why_it_is_rejected():
    """The reason given when `ls` is set under TopKD, checked numerically."""
    s, t, y = make(seed=9)
    m = create_method("topkd")
    a = m(s, t, y, epoch=30).distill
    b = m(L.standardize(s), L.standardize(t), y, epoch=30).distill
    close(a, b, 1e-5)


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
