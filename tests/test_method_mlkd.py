"""MLKD (method ``mlkd``) against a line-by-line transcription of the official code on hand-made
weak/strong batches, the engine's multi-view step, and the configs against the reference
fixtures (official: tests/fixtures/reference/mlkd; LS code: .../logit_standardization)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import _reference as R
from topkd.methods import Batch, ModelOutput, ParamError, create_method, params_from_dict
from topkd.methods.mlkd import mlkd_loss

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
TOL = {"atol": 1e-6, "rtol": 1e-6}


# --- Jin-Ying/Multi-Level-Logit-Distillation @ 5ee473fcf193dfb00a0598b64d0acfe6ad58a482,
# mdistiller/distillers/KD_ours.py, transcribed line by line on logits (the four model calls
# of forward_train replaced by its inputs); `logit_stand` is the one addition of
# sunshangquan/logit-standardization-KD @ f6e5aa5 mdistiller/distillers/MLKD.py. -------------
def normalize(logit):
    mean = logit.mean(dim=-1, keepdims=True)
    stdv = logit.std(dim=-1, keepdims=True)
    return (logit - mean) / (1e-7 + stdv)


def kd_loss(logits_student_in, logits_teacher_in, temperature, reduce=True, logit_stand=False):
    logits_student = normalize(logits_student_in) if logit_stand else logits_student_in
    logits_teacher = normalize(logits_teacher_in) if logit_stand else logits_teacher_in

    log_pred_student = F.log_softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    if reduce:
        loss_kd = F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1).mean()
    else:
        loss_kd = F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1)
    loss_kd *= temperature**2
    return loss_kd


def cc_loss(logits_student, logits_teacher, temperature, reduce=True):
    batch_size, class_num = logits_teacher.shape
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    student_matrix = torch.mm(pred_student.transpose(1, 0), pred_student)
    teacher_matrix = torch.mm(pred_teacher.transpose(1, 0), pred_teacher)
    if reduce:
        consistency_loss = ((teacher_matrix - student_matrix) ** 2).sum() / class_num
    else:
        consistency_loss = ((teacher_matrix - student_matrix) ** 2) / class_num
    return consistency_loss


def bc_loss(logits_student, logits_teacher, temperature, reduce=True):
    batch_size, class_num = logits_teacher.shape
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    student_matrix = torch.mm(pred_student, pred_student.transpose(1, 0))
    teacher_matrix = torch.mm(pred_teacher, pred_teacher.transpose(1, 0))
    if reduce:
        consistency_loss = ((teacher_matrix - student_matrix) ** 2).sum() / batch_size
    else:
        consistency_loss = ((teacher_matrix - student_matrix) ** 2) / batch_size
    return consistency_loss


def ref_forward_train(logits_student_weak, logits_student_strong, logits_teacher_weak,
                      logits_teacher_strong, target, temperature=4.0, ce_loss_weight=0.1,
                      kd_loss_weight=0.9, logit_stand=False):
    self_temperature, ls = temperature, logit_stand
    batch_size, class_num = logits_student_strong.shape

    pred_teacher_weak = F.softmax(logits_teacher_weak.detach(), dim=1)
    confidence, pseudo_labels = pred_teacher_weak.max(dim=1)
    confidence = confidence.detach()
    conf_thresh = np.percentile(
        confidence.cpu().numpy().flatten(), 50
    )
    mask = confidence.le(conf_thresh).bool()

    class_confidence = torch.sum(pred_teacher_weak, dim=0)
    class_confidence = class_confidence.detach()
    class_confidence_thresh = np.percentile(
        class_confidence.cpu().numpy().flatten(), 50
    )
    class_conf_mask = class_confidence.le(class_confidence_thresh).bool()

    sw, tw, ss, ts = (logits_student_weak, logits_teacher_weak, logits_student_strong,
                      logits_teacher_strong)
    w = kd_loss_weight
    # losses
    loss_ce = ce_loss_weight * (F.cross_entropy(sw, target) + F.cross_entropy(ss, target))
    loss_kd_weak = w * ((kd_loss(sw, tw, self_temperature, logit_stand=ls) * mask).mean()) \
        + w * ((kd_loss(sw, tw, 3.0, logit_stand=ls) * mask).mean()) \
        + w * ((kd_loss(sw, tw, 5.0, logit_stand=ls) * mask).mean()) \
        + w * ((kd_loss(sw, tw, 2.0, logit_stand=ls) * mask).mean()) \
        + w * ((kd_loss(sw, tw, 6.0, logit_stand=ls) * mask).mean())
    loss_kd_strong = w * kd_loss(ss, ts, self_temperature, logit_stand=ls) \
        + w * kd_loss(ss, ts, 3.0, logit_stand=ls) \
        + w * kd_loss(ss, ts, 5.0, logit_stand=ls) \
        + w * kd_loss(sw, tw, 2.0, logit_stand=ls) \
        + w * kd_loss(sw, tw, 6.0, logit_stand=ls)
    loss_cc_weak = w * ((cc_loss(sw, tw, self_temperature) * class_conf_mask).mean()) \
        + w * ((cc_loss(sw, tw, 3.0) * class_conf_mask).mean()) \
        + w * ((cc_loss(sw, tw, 5.0) * class_conf_mask).mean()) \
        + w * ((cc_loss(sw, tw, 2.0) * class_conf_mask).mean()) \
        + w * ((cc_loss(sw, tw, 6.0) * class_conf_mask).mean())
    loss_cc_strong = w * cc_loss(ss, ts, self_temperature) + w * cc_loss(ss, ts, 3.0) \
        + w * cc_loss(ss, ts, 5.0) + w * cc_loss(sw, tw, 2.0) + w * cc_loss(sw, tw, 6.0)
    loss_bc_weak = w * ((bc_loss(sw, tw, self_temperature) * mask).mean()) \
        + w * ((bc_loss(sw, tw, 3.0) * mask).mean()) \
        + w * ((bc_loss(sw, tw, 5.0) * mask).mean()) \
        + w * ((bc_loss(sw, tw, 2.0) * mask).mean()) \
        + w * ((bc_loss(sw, tw, 6.0) * mask).mean())
    loss_bc_strong = w * ((bc_loss(ss, ts, self_temperature) * mask).mean()) \
        + w * ((bc_loss(ss, ts, 3.0) * mask).mean()) \
        + w * ((bc_loss(ss, ts, 5.0) * mask).mean()) \
        + w * ((bc_loss(ss, ts, 2.0) * mask).mean()) \
        + w * ((bc_loss(ss, ts, 6.0) * mask).mean())
    del loss_cc_strong, loss_bc_strong  # computed by the reference, never used
    losses_dict = {
        "loss_ce": loss_ce,
        "loss_kd": loss_kd_weak + loss_kd_strong,
        "loss_cc": loss_cc_weak,
        "loss_bc": loss_bc_weak
    }
    return logits_student_weak, losses_dict
# ----------------------------------------------------------------------------------------------


def ref_variants(sw, tw, ss, ts, temperature, select, strong):
    """The named corrections (not in the reference), from the same transcribed pieces:
    ``select``: `(loss(reduce=False) * mask)` normalised like the unmasked loss (mean over the
    batch for KD, sum for the Gram terms, which reduce=False already divided by C or B);
    ``strong``: the strong-view KD terms at T=2 and 6 on the strong logits. Returns kd, cc, bc."""
    pt1 = F.softmax(tw, dim=1)
    conf = pt1.max(dim=1)[0]
    mask = conf.le(float(np.percentile(conf.numpy(), 50)))
    cconf = pt1.sum(0)
    cmask = cconf.le(float(np.percentile(cconf.numpy(), 50)))
    temps = [temperature, 3.0, 5.0, 2.0, 6.0]
    if select:
        kd_w = sum((kd_loss(sw, tw, T, reduce=False) * mask).mean() for T in temps)
        cc = sum((cc_loss(sw, tw, T, reduce=False) * cmask).sum() for T in temps)
        bc = sum((bc_loss(sw, tw, T, reduce=False) * mask).sum() for T in temps)
    else:
        kd_w = sum((kd_loss(sw, tw, T) * mask).mean() for T in temps)
        cc = sum((cc_loss(sw, tw, T) * cmask).mean() for T in temps)
        bc = sum((bc_loss(sw, tw, T) * mask).mean() for T in temps)
    views = [(ss, ts)] * 5 if strong else [(ss, ts)] * 3 + [(sw, tw)] * 2
    kd_s = sum(kd_loss(a, b, T) for (a, b), T in zip(views, temps))
    return kd_w + kd_s, cc, bc


def make(B=8, C=20, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    sw, tw, ss, ts = (torch.randn(B, C, generator=g, dtype=torch.float64) * scale
                      for _ in range(4))
    tw = tw + torch.linspace(0, 4, C, dtype=torch.float64)  # classes of unequal confidence
    y = torch.randint(0, C, (B,), generator=g)
    return sw.requires_grad_(), tw, ss.requires_grad_(), ts, y


def batch_of(sw, tw, ss, ts, y, epoch=1.0):
    return Batch(ModelOutput(sw), ModelOutput(tw), y, epoch,
                 views={"strong": (ModelOutput(ss), ModelOutput(ts))})


def grads(loss, *xs):
    return torch.autograd.grad(loss, xs)


@pytest.mark.parametrize("B, C, ls, temperature", [
    (8, 20, False, 4.0), (7, 20, False, 4.0), (16, 100, False, 4.0), (8, 20, True, 2.0),
    (9, 30, True, 4.0), (6, 10, False, 1.0)])
def test_mlkd_equals_reference_forward_train(B, C, ls, temperature):
    """Every loss of the reference's dict, the total and its gradients w.r.t. both student views
    (even and odd batch: numpy's median interpolation vs torch.quantile)."""
    for seed in range(3):
        sw, tw, ss, ts, y = make(B, C, seed)
        m = create_method({"name": "mlkd", "temperature": temperature, "ls": ls,
                           "kd_weight": 0.7, "ce": 0.3})
        out = m(batch_of(sw, tw, ss, ts, y))
        preds, ref = ref_forward_train(sw, ss, tw, ts, y, temperature, 0.3, 0.7, ls)
        torch.testing.assert_close(out.task, ref["loss_ce"], **TOL)
        for key in ("kd", "cc", "bc"):
            torch.testing.assert_close(0.7 * out.terms[key], ref[f"loss_{key}"].detach(), **TOL)
        total = sum(ref.values())
        torch.testing.assert_close(out.total, total, **TOL)
        for a, b in zip(grads(out.total, sw, ss), grads(total, sw, ss)):
            torch.testing.assert_close(a, b, **TOL)
        assert set(out.terms) == {"ce", "ce_strong", "kd", "cc", "bc", "warmup"}
        torch.testing.assert_close(out.terms["ce"] + out.terms["ce_strong"],
                                   ref["loss_ce"].detach() / 0.3, **TOL)


def test_confidence_ties_follow_the_reference():
    """Duplicated teacher rows/classes put many confidences exactly at the median (`<=`)."""
    sw, tw, ss, ts, y = make(B=8, C=12)
    tw = tw.clone()
    tw[1::2] = tw[0::2]          # pairs of identical rows: ties in the sample confidences
    tw[:, 6:] = tw[:, :6]        # identical class columns: ties in the class confidences
    out = create_method("mlkd")(batch_of(sw, tw, ss, ts, y))
    _, ref = ref_forward_train(sw, ss, tw, ts, y)
    torch.testing.assert_close(out.total, sum(ref.values()), **TOL)


@pytest.mark.parametrize("masking, strong_kd", [("select", "mixed"), ("scale", "strong"),
                                                ("select", "strong"), ("scale", "mixed")])
def test_named_corrections(masking, strong_kd):
    for B, C in ((8, 20), (7, 15)):
        sw, tw, ss, ts, y = make(B, C, seed=B)
        got = mlkd_loss(sw, tw, ss, ts, 3.0, masking=masking, strong_kd=strong_kd)
        want = ref_variants(sw, tw, ss, ts, 3.0, masking == "select", strong_kd == "strong")
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, **TOL)
        for a, b in zip(grads(sum(got), sw, ss), grads(sum(want), sw, ss)):
            torch.testing.assert_close(a, b, **TOL)


def test_scale_is_the_masked_fraction_and_select_with_full_masks_is_unmasked():
    """The reference's masks only scale: with 'scale', kd_weak / cc / bc are the unmasked batch
    values times the masked fraction; 'select' with every entry masked is the unmasked value."""
    sw, tw, ss, ts, _ = make(B=8, C=20)
    scale = mlkd_loss(sw, tw, ss, ts)
    kd_strong = sum(kd_loss(a, b, T) for (a, b), T in zip(
        [(ss, ts)] * 3 + [(sw, tw)] * 2, [4.0, 3.0, 5.0, 2.0, 6.0]))
    temps = [4.0, 3.0, 5.0, 2.0, 6.0]
    conf = F.softmax(tw, 1).max(1)[0]
    frac = (conf <= conf.sort()[0][3:5].mean()).double().mean()  # numpy's median of 8 values
    torch.testing.assert_close(scale.kd - kd_strong, frac * sum(kd_loss(sw, tw, T) for T in temps),
                               **TOL)
    torch.testing.assert_close(scale.bc, frac * sum(bc_loss(sw, tw, T) for T in temps), **TOL)
    # a teacher with identical rows: every confidence equals the median, all masks are full
    flat = tw[:1].expand_as(tw)
    sel = mlkd_loss(sw, flat, ss, ts, masking="select")
    sca = mlkd_loss(sw, flat, ss, ts, masking="scale")
    cconf = F.softmax(flat, 1).sum(0)
    cfrac = (cconf <= cconf.quantile(0.5)).double().mean()
    torch.testing.assert_close(sel.kd, sca.kd, **TOL)
    torch.testing.assert_close(sel.bc, sca.bc, **TOL)
    assert cfrac < 1  # the class mask is not full: select and scale differ at the class level
    assert not torch.allclose(sel.cc, sca.cc)


def test_ignore_index_drops_rows_from_every_level():
    sw, tw, ss, ts, y = make(B=10, C=20)
    y[[2, 5]] = 0
    keep = y != 0
    out = create_method({"name": "mlkd", "ignore_index": 0})(batch_of(sw, tw, ss, ts, y))
    _, ref = ref_forward_train(sw[keep], ss[keep], tw[keep], ts[keep], y[keep])
    torch.testing.assert_close(out.total, sum(ref.values()), **TOL)
    y[:] = 0  # everything ignored: a zero loss, still attached to the graph
    out = create_method({"name": "mlkd", "ignore_index": 0})(batch_of(sw, tw, ss, ts, y))
    assert out.total.item() == 0.0 and out.total.requires_grad


def test_inputs_are_checked():
    sw, tw, ss, ts, y = make()
    m = create_method("mlkd")
    with pytest.raises(ValueError, match=r"needs the strong view of every image.*got views \[\]"):
        m(sw, tw, y, epoch=1)
    with pytest.raises(ValueError, match="teacher's outputs on the strong view"):
        m(Batch(ModelOutput(sw), ModelOutput(tw), y, 1.0,
                views={"strong": (ModelOutput(ss), None)}))
    with pytest.raises(ValueError, match="must have the main \\(weak\\) view's shape"):
        m(batch_of(sw, tw, ss[:4], ts[:4], y))
    with pytest.raises(ValueError, match="must be \\(B, C\\)"):
        mlkd_loss(sw[None], tw[None], ss[None], ts[None])
    with pytest.raises(ValueError, match="masking must be"):
        mlkd_loss(sw, tw, ss, ts, masking="mean")
    with pytest.raises(ParamError, match="'method.masking': 'mean'; expected one of 'scale'"):
        params_from_dict({"name": "mlkd", "masking": "mean"})
    with pytest.raises(ParamError, match="'method.temperature': 0.0; expected a number > 0"):
        params_from_dict({"name": "mlkd", "temperature": 0})


def test_half_inputs_run_in_float32():
    sw, tw, ss, ts, _ = make()
    got = mlkd_loss(*(x.detach().half() for x in (sw, tw, ss, ts)))
    assert all(v.dtype == torch.float32 for v in got)
    want = mlkd_loss(sw.detach(), tw, ss.detach(), ts)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=5e-2, rtol=2e-2)


# --------------------------------------------------------------------------- engine


def test_train_step_runs_student_and_teacher_on_the_strong_view():
    """TrainStep(views={"strong": x_s}) gives MLKD the outputs of both models on both views:
    its loss equals the method on hand-computed outputs, and the update uses its gradient."""
    from test_engine_common import TinyNet
    from topkd.engine.step import TrainStep

    torch.manual_seed(0)
    student, teacher = TinyNet(20), TinyNet(20)
    teacher.eval()
    method = create_method("mlkd")
    opt = torch.optim.SGD([*student.parameters(), *method.parameters()], lr=0.1)
    step = TrainStep(student, teacher, method, opt, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    xw, xs = torch.randn(8, 3, 16, 16, generator=g), torch.randn(8, 3, 16, 16, generator=g)
    y = torch.randint(0, 20, (8,), generator=g)
    w0 = [p.detach().clone() for p in student.parameters()]
    with torch.no_grad():
        tw, ts = teacher(xw), teacher(xs)
    sw, ss = student(xw), student(xs)
    want = method(batch_of(sw, tw, ss, ts, y))
    want_grads = torch.autograd.grad(want.total, list(student.parameters()))
    out, logits = step(xw, y, epoch=1, views={"strong": xs})
    torch.testing.assert_close(out.total, want.total.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, sw.detach())  # the main (weak) view's logits
    for p, p0, gr in zip(student.parameters(), w0, want_grads):
        torch.testing.assert_close(p.detach(), p0 - 0.1 * gr, atol=1e-5, rtol=1e-5)


def test_trainer_builds_the_strong_view_from_the_config(tmp_path):
    """configs/methods/mlkd.yaml defines data.views.strong (the reference's strong augmentation);
    without it the trainer says what to add."""
    from test_engine_common import make_cifar100
    from topkd.config import ConfigError, load_config
    from topkd.engine import Trainer

    make_cifar100(tmp_path / "data", n_train=8, n_test=4)
    ov = [f"data.root={tmp_path / 'data'}", "data.num_workers=0", "train.device=cpu",
          f"output_dir={tmp_path}", "teacher.checkpoint=null"]
    cfg = load_config(CONFIGS / "cifar100" / "res56_res20" / "mlkd.yaml", ov)
    assert cfg.data.views["strong"].auto_augment == "mlkd" and cfg.data.views["strong"].augment
    with pytest.raises(ConfigError, match="needs teacher.name and teacher.checkpoint"):
        Trainer(cfg, "distill", quiet=True)  # the views were accepted: the teacher is next
    cfg = load_config(CONFIGS / "cifar100" / "res56_res20" / "mlkd.yaml", [*ov, "data.views={}"])
    with pytest.raises(ConfigError, match="method 'mlkd' trains on the extra view\\(s\\) 'strong'.*"
                                          "data.views.strong.auto_augment=mlkd"):
        Trainer(cfg, "distill", quiet=True)


# --------------------------------------------------------------------------- configs

# Our pair keys -> the official repository's and the LS repository's config file names.
OFFICIAL = {"res56_res20": "res56_res20", "res110_res32": "res110_res32",
            "res32x4_res8x4": "res32x4_res8x4", "wrn40_2_wrn16_2": "wrn40_2_wrn_16_2",
            "wrn40_2_wrn40_1": "wrn40_2_wrn_40_1", "vgg13_vgg8": "vgg13_vgg8",
            "res32x4_shuv1": "res32x4_shuv1", "res32x4_shuv2": "res32x4_shuv2",
            "wrn40_2_shuv1": "wrn40_2_shuv1", "vgg13_mv2": "vgg13_mv2", "res50_mv2": "res50_mv2"}
LS = {"res56_res20": "resnet56_resnet20", "res110_res32": "resnet110_resnet32",
      "res32x4_res8x4": "resnet32x4_resnet8x4", "wrn40_2_wrn16_2": "wrn_40_2_wrn_16_2",
      "wrn40_2_wrn40_1": "wrn_40_2_wrn_40_1", "vgg13_vgg8": "vgg13_vgg8",
      "res32x4_shuv1": "resnet32x4_ShuffleV1", "res32x4_shuv2": "resnet32x4_ShuffleV2",
      "wrn40_2_shuv1": "wrn_40_2_ShuffleV1", "vgg13_mv2": "vgg13_MobileNetV2",
      "res50_mv2": "ResNet50_MobileNetV2"}


def _compose(path: Path):
    from test_configs import compose

    return compose(path)


def _check_solver(cfg, sol, where):
    o, s = cfg["optim"], cfg["sched"]
    assert sol["TYPE"] == "SGD" and o["name"] == "sgd", where
    assert o["lr"] == sol["LR"] and o["momentum"] == sol["MOMENTUM"], where
    assert o["weight_decay"] == sol["WEIGHT_DECAY"], where
    assert s["name"] == "multistep" and s["milestones"] == sol["LR_DECAY_STAGES"], where
    assert s["gamma"] == sol["LR_DECAY_RATE"] and s["warmup_epochs"] == 0, where
    assert cfg["train"]["epochs"] == sol["EPOCHS"], where
    assert cfg["data"]["batch_size"] == sol["BATCH_SIZE"], where
    # the reference's trainer "ours" feeds the weak and the strong view
    assert sol["TRAINER"] == "ours"


def test_official_fixture_names_every_pair():
    pairs = {p.name for p in (CONFIGS / "cifar100").iterdir() if p.is_dir()}
    assert set(OFFICIAL) == set(LS) == pairs


@pytest.mark.parametrize("pair", sorted(OFFICIAL))
def test_mlkd_leaves_equal_the_official_configs(pair):
    ref = R.resolved("mlkd", f"configs/cifar100/ours/{OFFICIAL[pair]}.yaml")
    assert ref["DISTILLER"]["TYPE"] == "KD_ours"
    cfg = _compose(CONFIGS / "cifar100" / pair / "mlkd.yaml")
    kd = ref["KD"]
    assert cfg["method"] == {"name": "mlkd", "ce": kd["LOSS"]["CE_WEIGHT"],
                             "kd_weight": kd["LOSS"]["KD_WEIGHT"],
                             "temperature": kd["TEMPERATURE"]}, pair
    _check_solver(cfg, ref["SOLVER"], pair)


@pytest.mark.parametrize("pair", sorted(LS))
def test_mlkd_ls_leaves_equal_the_ls_code_with_logit_stand(pair):
    ref = R.logit_standardization(f"configs/cifar100/mlkd/{LS[pair]}.yaml")
    assert ref["DISTILLER"]["TYPE"] == "MLKD"
    rule = R.logit_stand_rule()
    assert rule["MLKD"] == {"KD_WEIGHT": "= kd_weight", "TEMPERATURE": "= base_temp"}
    cfg = _compose(CONFIGS / "cifar100" / pair / "mlkd_ls.yaml")
    assert cfg["method"] == {"name": "mlkd", "ls": True,
                             "ce": ref["KD"]["LOSS"]["CE_WEIGHT"],
                             "kd_weight": rule["args"]["kd_weight"],
                             "temperature": rule["args"]["base_temp"]}, pair
    _check_solver(cfg, ref["SOLVER"], pair)


def test_imagenet_mlkd_equals_the_official_config():
    ref = R.resolved("mlkd", "configs/imagenet/r34_r18/kd_ours.yaml")
    cfg = _compose(CONFIGS / "imagenet" / "r34_r18" / "mlkd.yaml")
    kd = ref["KD"]
    assert cfg["method"] == {"name": "mlkd", "ce": kd["LOSS"]["CE_WEIGHT"],
                             "kd_weight": kd["LOSS"]["KD_WEIGHT"],
                             "temperature": kd["TEMPERATURE"]}
    assert (cfg["model"]["name"], cfg["teacher"]["name"]) == ("resnet18", "resnet34")
    assert (ref["DISTILLER"]["STUDENT"], ref["DISTILLER"]["TEACHER"]) == ("ResNet18", "ResNet34")
    _check_solver(cfg, ref["SOLVER"], "r34_r18")
    # the reference's other pair is ResNet50 -> MobileNetV2, not our ResNet50 -> MobileNetV1
    assert R.resolved("mlkd", "configs/imagenet/r50_mv2/kd_ours.yaml")["DISTILLER"][
        "STUDENT"] == "MobileNetV2"
    assert not (CONFIGS / "imagenet" / "r50_mv1" / "mlkd.yaml").exists()
