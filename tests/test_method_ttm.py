"""TTM and WTTM (methods ``ttm``, ``wttm``) against a transcription of zkxufo/TTM, and their
CIFAR-100 configs against the repository's published values (tests/fixtures/reference/ttm)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import topkd.losses as L
from topkd.methods import Batch, ModelOutput, ParamError, create_method, params_from_dict
from topkd.methods.ttm import ttm_loss

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
FIX = Path(__file__).resolve().parent / "fixtures" / "reference" / "ttm"
LIGHT = {"shufflev1", "shufflev2", "mobilenetv2"}
TOL = {"atol": 1e-6, "rtol": 1e-6}


# --- zkxufo/TTM @ fe457b33a71ba27536ec04fe3d32c5b04963522f, transcribed line by line ----------
def ref_ttm(y_s, y_t, l):  # distiller_zoo/ttm.py, TTM.forward
    p_s = F.log_softmax(y_s, dim=1)
    p_t = torch.pow(torch.softmax(y_t, dim=1), l)
    norm = torch.sum(p_t, dim=1)
    p_t = p_t / norm.unsqueeze(1)
    KL = torch.sum(F.kl_div(p_s, p_t, reduction='none'), dim=1)
    loss = torch.mean(KL)
    return loss


def ref_wttm(y_s, y_t, l):  # distiller_zoo/wttm.py, WTTM.forward
    p_s = F.log_softmax(y_s, dim=1)
    p_t = torch.pow(torch.softmax(y_t, dim=1), l)
    norm = torch.sum(p_t, dim=1)
    p_t = p_t / norm.unsqueeze(1)
    KL = torch.sum(F.kl_div(p_s, p_t, reduction='none'), dim=1)
    loss = torch.mean(norm*KL)
    return loss


def ref_total(logit_s, logit_t, target, distill, ttm_l, gamma, beta):
    """helper/loops.py train_distill with ``-a 0`` (the added KD term weighted 0)."""
    criterion_cls = torch.nn.CrossEntropyLoss()
    criterion_kd = {"ttm": ref_ttm, "wttm": ref_wttm}[distill]
    loss_cls = criterion_cls(logit_s, target)
    loss_kd = criterion_kd(logit_s, logit_t, ttm_l)
    loss = gamma * loss_cls + beta * loss_kd
    return loss
# ----------------------------------------------------------------------------------------------


def make(B=8, C=20, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(B, C, generator=g, dtype=torch.float64) * scale).requires_grad_()
    t = torch.randn(B, C, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, C, (B,), generator=g)
    return s, t, y


def grad(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


@pytest.mark.parametrize("gamma", [0.1, 0.2, 0.5, 1.0, 2.5])
@pytest.mark.parametrize("weighted", [False, True])
def test_ttm_loss_equals_reference_with_gradients(gamma, weighted):
    ref = ref_wttm if weighted else ref_ttm
    for seed in range(3):
        s, t, _ = make(seed=seed, scale=1.0 + 3 * seed)
        got, want = ttm_loss(s, t, gamma, weighted), ref(s, t, gamma)
        torch.testing.assert_close(got, want, **TOL)
        torch.testing.assert_close(grad(got, s), grad(want, s), **TOL)


@pytest.mark.parametrize("name", ["ttm", "wttm"])
def test_method_equals_reference_training_loss(name):
    """The shipped config's method against helper/loops.py's total with the same values."""
    from topkd.config import load_config

    params = load_config(ROOT / "configs" / "methods" / f"{name}.yaml").method
    method = create_method(params)
    for seed in range(3):
        s, t, y = make(B=16, C=100, seed=seed)
        out = method(s, t, y, epoch=1)
        want = ref_total(s, t, y, name, params.gamma, params.ce, params.beta)
        torch.testing.assert_close(out.total, want, **TOL)
        torch.testing.assert_close(grad(out.total, s), grad(want, s), **TOL)
        term = (ref_wttm if name == "wttm" else ref_ttm)(s.detach(), t, params.gamma)
        torch.testing.assert_close(out.terms[name], term, **TOL)
        assert set(out.terms) == {"ce", name, "warmup"}


def test_identities():
    """TTM is KD at T=1 against the teacher tempered by 1/gamma; WTTM's weight is the power sum
    exp((1 - gamma) H_gamma) (Rényi entropy); gamma = 1 makes both plain KL at T=1."""
    s, t, _ = make(C=50)
    for gamma in (0.1, 0.25, 1.0):
        torch.testing.assert_close(ttm_loss(s, t, gamma), L.kd_loss(s, gamma * t, 1.0), **TOL)
        pt = torch.softmax(t, -1)
        renyi = torch.log((pt ** gamma).sum(-1)) / (1 - gamma) if gamma != 1 else \
            -(pt * pt.log()).sum(-1)
        w = torch.exp((1 - gamma) * renyi)
        rows = ttm_loss(s, t, gamma, reduction="none")
        torch.testing.assert_close(ttm_loss(s, t, gamma, True, "none"), w * rows, **TOL)
    torch.testing.assert_close(ttm_loss(s, t, 1.0, True), ttm_loss(s, t, 1.0), **TOL)


def test_saturated_teacher_is_finite_and_matches_reference_in_float32():
    """A teacher probability that underflows: the reference's softmax(t) ** gamma is exactly 0
    where ours keeps exp(gamma * log p); both finite and equal to float32 precision."""
    s, t, _ = make(C=100)
    t = t.float() * 40
    s = s.detach().float().requires_grad_()
    for weighted, ref in ((False, ref_ttm), (True, ref_wttm)):
        got, want = ttm_loss(s, t, 0.1, weighted), ref(s, t, 0.1)
        assert torch.isfinite(got) and torch.isfinite(grad(got, s)).all()
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_ignore_index_drops_rows_and_leading_dims():
    s, t, y = make(B=12)
    y[[1, 4, 5]] = 0
    keep = y != 0
    m = create_method({"name": "wttm", "ignore_index": 0})
    out = m(s, t, y, epoch=1)
    want = ref_total(s[keep], t[keep], y[keep], "wttm", 0.2, 1.0, 4.0)
    torch.testing.assert_close(out.total, want, **TOL)
    # (..., C) logits: the same rows
    m = create_method("ttm")
    torch.testing.assert_close(m(s.view(3, 4, -1), t.view(3, 4, -1), y.view(3, 4), epoch=1).total,
                               m(s, t, y, epoch=1).total, **TOL)


def test_beta_scales_the_term_and_warmup_applies():
    s, t, y = make()
    a = create_method({"name": "ttm", "beta": 1.0})(s, t, y, epoch=1)
    b = create_method({"name": "ttm", "beta": 3.0, "warmup": 4})(s, t, y, epoch=2)
    torch.testing.assert_close(b.distill, 3.0 * 0.5 * a.distill, **TOL)
    torch.testing.assert_close(b.task, a.task, **TOL)


def test_errors():
    s, t, _ = make()
    with pytest.raises(ValueError, match="gamma must be a number > 0"):
        ttm_loss(s, t, 0.0)
    with pytest.raises(ValueError, match="same shape"):
        ttm_loss(s, t[:, :5])
    with pytest.raises(ParamError, match=r"'method.gamma': -1.0; expected a number > 0"):
        params_from_dict({"name": "ttm", "gamma": -1})
    with pytest.raises(ParamError, match="method.temperature is not a parameter of method 'ttm'"):
        params_from_dict({"name": "ttm", "temperature": 4})
    with pytest.raises(ValueError, match="no teacher"):
        create_method("wttm")(Batch(ModelOutput(s), None, torch.zeros(8, dtype=torch.long)))


def test_half_inputs_run_in_float32():
    s, t, _ = make()
    got = ttm_loss(s.detach().half(), t.half(), 0.2, True)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref_wttm(s.detach(), t, 0.2), atol=2e-2, rtol=2e-2)


# --------------------------------------------------------------------------- configs


def _readme_args(key: str) -> dict[str, str]:
    argv = shlex.split(yaml.safe_load((FIX / "readme_commands.yaml").read_text())[key])
    out, i = {}, 2  # python3 train_student.py ...
    while i < len(argv):
        out[argv[i]] = argv[i + 1]
        i += 2
    return out


def _compose(path: Path):
    from test_configs import compose

    return compose(path)


@pytest.mark.parametrize("name", ["ttm", "wttm"])
def test_cifar_leaves_equal_the_reference(name):
    """Every ttm/wttm leaf: the README's command (method values; -r defaulting to train_student.py's
    1) and train_student.py's solver defaults with its light-student lr."""
    defaults = yaml.safe_load((FIX / "train_student.yaml").read_text())
    d, light = defaults["argparse"], defaults["light_students"]
    if name == "ttm":
        args = _readme_args("ttm")
        assert args["--distill"] == "ttm" and args["-a"] == "0"
        want = {"name": "ttm", "ce": float(args.get("-r", d["gamma"])),
                "beta": float(args["-b"]), "gamma": float(args["--ttm_l"])}
    else:  # WTTM as the added term: weight -a
        args = _readme_args("crd_plus_wttm")
        assert args["--add"] == "wttm"
        want = {"name": "wttm", "ce": float(args.get("-r", d["gamma"])),
                "beta": float(args["-a"]), "gamma": float(args["--ttm_l"])}
    leaves = sorted((ROOT / "configs" / "cifar100").glob(f"*/{name}.yaml"))
    assert len(leaves) == 11
    for p in leaves:
        cfg = _compose(p)
        assert cfg["method"] == want, p
        o, s = cfg["optim"], cfg["sched"]
        lr = light["learning_rate"] if cfg["model"]["name"] in LIGHT else d["learning_rate"]
        assert {m.lower() for m in light["models"]} == LIGHT
        assert o["lr"] == lr and o["momentum"] == d["momentum"]
        assert o["weight_decay"] == d["weight_decay"]
        assert s["milestones"] == [int(e) for e in d["lr_decay_epochs"].split(",")]
        assert s["gamma"] == d["lr_decay_rate"] and cfg["train"]["epochs"] == d["epochs"]
        assert cfg["data"]["batch_size"] == d["batch_size"]
