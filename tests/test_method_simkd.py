"""SimKD: loss and evaluation network against a transcription of the reference, export/eval,
resume.

Reference: DefangChen/SimKD @ 2b389c31ed7779aea31e7aaf0bb0f2d8b6ac2f01 (``models/util.py``
class ``SimKD``; ``helper/loops.py`` ``train_distill``/``validate_distill``; the loss
``opt.cls * loss_cls + opt.div * loss_div + opt.beta * loss_kd`` with ``-c 0 -d 0 -b 1``).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from examples.simkd import context
from feature_engine_common import feature_config, teacher_checkpoint
from tapped_models import tapped_batch
from test_engine_common import make_cifar100, read_metrics
from topkd.methods import create_method
from topkd.models import create_model
from topkd.models.wrappers import SimKDNet, wrap_model

torch.set_num_threads(1)


class RefSimKD(nn.Module):
    """Transcription of the reference ``SimKD`` module (models/util.py)."""

    def __init__(self, *, s_n, t_n, factor=2):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d((1, 1))

        def conv1x1(in_channels, out_channels, stride=1):
            return nn.Conv2d(in_channels, out_channels, kernel_size=1, padding=0, stride=stride,
                             bias=False)

        def conv3x3(in_channels, out_channels, stride=1, groups=1):
            return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, stride=stride,
                             bias=False, groups=groups)

        self.transfer = nn.Sequential(
            conv1x1(s_n, t_n // factor),
            nn.BatchNorm2d(t_n // factor),
            nn.ReLU(inplace=True),
            conv3x3(t_n // factor, t_n // factor),
            nn.BatchNorm2d(t_n // factor),
            nn.ReLU(inplace=True),
            conv1x1(t_n // factor, t_n),
            nn.BatchNorm2d(t_n),
            nn.ReLU(inplace=True),
        )

    def forward(self, feat_s, feat_t, cls_t):
        s_H, t_H = feat_s.shape[2], feat_t.shape[2]
        if s_H > t_H:
            source = F.adaptive_avg_pool2d(feat_s, (t_H, t_H))
            target = feat_t
        else:
            source = feat_s
            target = F.adaptive_avg_pool2d(feat_t, (s_H, s_H))
        trans_feat_t = target
        trans_feat_s = self.transfer(source)
        temp_feat = self.avg_pool(trans_feat_s)
        temp_feat = temp_feat.view(temp_feat.size(0), -1)
        pred_feat_s = cls_t(temp_feat)
        return trans_feat_s, trans_feat_t, pred_feat_s


def ref_loss(ref, feat_s, feat_t, cls_t, logit_s, logit_t, labels, cls=0.0, div=0.0, beta=1.0,
             kd_T=4.0):
    """helper/loops.py train_distill for opt.distill == 'simkd'."""
    loss_cls = nn.CrossEntropyLoss()(logit_s, labels)
    p_s = F.log_softmax(logit_s / kd_T, dim=1)  # DistillKL
    p_t = F.softmax(logit_t / kd_T, dim=1)
    loss_div = F.kl_div(p_s, p_t, reduction="sum") * (kd_T ** 2) / logit_s.shape[0]
    trans_feat_s, trans_feat_t, pred_feat_s = ref(feat_s, feat_t, cls_t)
    loss_kd = nn.MSELoss()(trans_feat_s, trans_feat_t)
    return cls * loss_cls + div * loss_div + beta * loss_kd, pred_feat_s


# (student, teacher): equal sizes, student larger (pooled), teacher larger (pooled), a WRN
# teacher (its final map is after the last BatchNorm-ReLU: relu(preact_feats[-1])).
PAIRS = [("resnet8", "resnet8x4"), ("resnet8", "vgg8"), ("mobilenetv2", "resnet8"),
         ("resnet8", "wrn_16_1")]


@pytest.mark.parametrize("student, teacher", PAIRS)
@pytest.mark.parametrize("cls, beta", [(0.0, 1.0), (0.5, 2.0)])
def test_loss_and_grads_match_reference(student, teacher, cls, beta):
    ctx = context(student, teacher)
    torch.manual_seed(0)
    m = create_method({"name": "simkd", "ce": cls, "feat_weight": beta}, ctx).double().train()
    b = tapped_batch(m, ctx.student.train(), ctx.teacher.eval(), grad=True)
    fs = b.student.feats["feats"][-1]
    # the reference's teacher feat[-2]: the map its classifier pools (WRN: after bn1-ReLU;
    # VGG: relu(block4); both read from preact_feats)
    ft = (F.relu(b.teacher.feats["preact_feats"][-1]) if teacher.startswith(("wrn", "vgg"))
          else b.teacher.feats["feats"][-1])
    ref = RefSimKD(s_n=fs.shape[1], t_n=ft.shape[1]).double().train()
    ref.transfer.load_state_dict(m.projector.state_dict())  # same layout, same weights
    cls_t = ctx.teacher.get_classifier()
    want, _ = ref_loss(ref, fs, ft, cls_t, b.student.logits, b.teacher.logits, b.labels,
                       cls=cls, beta=beta)
    out = m(b)
    got = out.total
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-10)
    params_s = [q for q in ctx.student.parameters() if q.requires_grad]
    g_got = torch.autograd.grad(got, [*params_s, *m.projector.parameters()], retain_graph=True)
    g_want = torch.autograd.grad(want, [*params_s, *ref.transfer.parameters()])
    for a, w in zip(g_got, g_want):
        torch.testing.assert_close(a, w, rtol=1e-6, atol=1e-10)
    # BatchNorm statistics move the same way
    for (k, a), w in zip(m.projector.state_dict().items(), ref.transfer.state_dict().values()):
        torch.testing.assert_close(a, w, msg=k)
    # the logits of the training accuracy: the reference's logit_s = pred_feat_s
    _, _, pred_feat_s = ref(fs, ft, cls_t)
    torch.testing.assert_close(out.logits, pred_feat_s.detach(), rtol=1e-6, atol=1e-10)
    assert not out.logits.requires_grad


def test_evaluation_uses_the_projector_and_the_teacher_head():
    """SimKD evaluation uses the teacher head: the evaluated network equals the reference's
    ``validate_distill`` output ``cls_t(avg_pool(transfer(align(f_s))))``, not the student's."""
    ctx = context("resnet8", "vgg8")
    ctx.student.float(), ctx.teacher.float()
    torch.manual_seed(0)
    m = create_method("simkd", ctx)
    net = m.eval_model(ctx.student)
    assert isinstance(net, SimKDNet) and m.eval_model(ctx.student) is net  # built once
    assert net.head is m.head and not any(p.requires_grad for p in m.head.parameters())
    assert torch.equal(m.head.weight, ctx.teacher.get_classifier().weight)
    with torch.no_grad():  # train the projector's BN statistics a little
        net.train()
        net(torch.randn(8, 3, 32, 32))
    net.eval()
    x = torch.randn(4, 3, 32, 32)
    ref = RefSimKD(s_n=64, t_n=512)
    ref.transfer.load_state_dict(m.projector.state_dict())
    ref.eval()
    with torch.no_grad():
        _, feats = _feats(ctx.student, x)
        _, feats_t = _feats(ctx.teacher, x)
        _, _, want = ref(feats[-1], feats_t[-1], ctx.teacher.get_classifier())
        got = net(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, ctx.student(x), atol=1e-3)
    assert set(net.state_dict()) == {f"student.{k}" for k in ctx.student.state_dict()} | {
        f"projector.{k}" for k in m.projector.state_dict()} | {"head.weight", "head.bias"}
    rebuilt = wrap_model(net.wrapper_spec, create_model("resnet8", 10), 10).eval()
    rebuilt.load_state_dict(net.state_dict())
    torch.testing.assert_close(rebuilt(x), got)


def test_engine_step_reports_the_evaluated_networks_logits():
    """The engine's training accuracy reads the SimKD network's logits (projector + teacher
    head), the student's own logits for a method that does not set them."""
    from topkd.engine.step import Distiller
    from topkd.methods.base import ModelOutput

    ctx = context("resnet8", "vgg8")
    ctx.student.float().train(), ctx.teacher.float().eval()
    m = create_method("simkd", ctx)
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    with torch.no_grad():
        t_logits, t_feats = _taps(ctx.teacher, x, m.teacher_taps)
        _, got = Distiller(ctx.student, m)(x, y, ModelOutput(t_logits, t_feats), 1.0)
        want = m.eval_model(ctx.student)(x)  # train mode: the same batch statistics
        own = ctx.student(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, own, atol=1e-3)
    kd = create_method("kd")
    with torch.no_grad():
        _, got = Distiller(ctx.student, kd)(x, y, ModelOutput(t_logits), 1.0)
    torch.testing.assert_close(got, own)


def _taps(model, x, taps):
    from topkd.models.features import FeatureTaps

    with FeatureTaps(model, taps) as t:
        return t(x)


def _feats(model, x):
    from topkd.models.features import FeatureTaps

    with FeatureTaps(model, ("feats",)) as taps:
        logits, f = taps(x)
    return logits, f["feats"]


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="simkd needs the teacher model"):
        create_method("simkd")
    with pytest.raises(ValueError, match="leaves no channel"):
        create_method({"name": "simkd", "factor": 128}, context("resnet8", "resnet8"))
    with pytest.raises(ValueError, match="wrapper 'simkd'"):
        wrap_model({"name": "simkd", "kwargs": {"teacher_dim": 8}}, create_model("resnet8", 10),
                   10)


def test_run_exports_the_evaluated_network_and_topkd_eval_agrees(tmp_path, capsys):
    """best.pt holds the SimKD network; ``topkd eval best.pt`` gives the engine's accuracy."""
    from topkd.cli import main
    from topkd.engine import Trainer

    make_cifar100(tmp_path / "data", n_train=32, n_test=24)
    cfg = feature_config(tmp_path, {"name": "simkd"}, teacher="vgg8",  # best.pt: picked on val
                         ckpt=teacher_checkpoint(tmp_path, "vgg8"), epochs=1,
                         data={"val_fraction": 0.25})
    summary = Trainer(cfg, "distill", quiet=True).fit()
    (row,) = read_metrics(cfg.run_dir)
    best = cfg.run_dir / "checkpoints" / "best.pt"
    meta = torch.load(best, weights_only=True)["meta"]
    assert meta["wrapper"] == {"name": "simkd", "kwargs": {
        "in_channels": 64, "teacher_dim": 512, "factor": 2, "pool_to": 4}}
    assert main(["eval", str(best), "--json", "--batch-size", "7", "--num-workers", "0"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["wrapper"] == "simkd" and out["n"] == 24
    assert out["acc1"] == pytest.approx(summary["test_acc1_at_best_val"], abs=1e-9)
    assert out["loss"] == pytest.approx(float(row["test_loss"]), rel=1e-4)


def test_resume_is_bit_exact(tmp_path):
    from feature_engine_common import assert_resume_bit_exact

    assert_resume_bit_exact(tmp_path, {"name": "simkd"})


# --------------------------------------------------------------------------- configs

FIX = Path(__file__).resolve().parent / "fixtures" / "reference" / "simkd"


def _simkd_commands() -> list[dict[str, str]]:
    """The ``--distill simkd`` lines of run_distill.sh as {flag: value}."""
    out = []
    for line in (FIX / "run_distill.sh").read_text().splitlines():
        argv = shlex.split(line)
        if "--distill" not in argv or argv[argv.index("--distill") + 1] != "simkd":
            continue
        args, i = {}, 2  # python train_student.py ...
        while i < len(argv):  # a flag takes the next token unless that is a flag too
            has_value = i + 1 < len(argv) and not argv[i + 1].startswith("-")
            args[argv[i]] = argv[i + 1] if has_value else ""
            i += 2 if has_value else 1
        out.append(args)
    return out


def test_configs_equal_the_reference():
    """CIFAR-100 leaves: the CIFAR command's -c/-d/-b and train_student.py's -f and solver
    defaults (light students lr 0.01); ImageNet leaves: the ImageNet command's solver."""
    from test_configs import CONFIGS, GEN, LIGHT, compose

    fix = yaml.safe_load((FIX / "train_student.yaml").read_text())
    d, light = fix["argparse"], fix["light_students"]
    cifar, imagenet = _simkd_commands()
    assert "--dataset" not in cifar and imagenet["--dataset"] == "imagenet"
    for cmd in (cifar, imagenet):  # the logit terms are off: the MSE alone
        assert float(cmd["-d"]) == 0.0 and float(cmd.get("-f", d["factor"])) == 2
    want = {"name": "simkd", "ce": float(cifar["-c"]), "feat_weight": float(cifar["-b"]),
            "factor": int(cifar.get("-f", d["factor"]))}
    leaves = sorted((CONFIGS / "cifar100").glob("*/simkd.yaml"))
    assert {p.parent.name for p in leaves} == {p.key for p in GEN.CIFAR_PAIRS}
    for p in leaves:
        cfg = compose(p)
        assert cfg["method"] == want, p
        o, s = cfg["optim"], cfg["sched"]
        assert {m.lower() for m in light["models"]} >= LIGHT
        assert o["lr"] == (light["learning_rate"] if cfg["model"]["name"] in LIGHT
                           else d["learning_rate"])
        assert (o["momentum"], o["weight_decay"], o["nesterov"]) == (
            d["momentum"], d["weight_decay"], False)
        assert s["milestones"] == [int(e) for e in d["lr_decay_epochs"].split(",")]
        assert s["gamma"] == d["lr_decay_rate"] and cfg["train"]["epochs"] == d["epochs"]
        assert cfg["data"]["batch_size"] == d["batch_size"]
    assert {float(imagenet["-c"]), float(imagenet["-b"])} == {want["ce"], want["feat_weight"]}
    for pair in ("r34_r18", "r50_mv1"):
        cfg = compose(CONFIGS / "imagenet" / pair / "simkd.yaml")
        assert cfg["method"] == want
        assert cfg["data"]["batch_size"] == int(imagenet["--batch_size"])
        assert cfg["train"]["epochs"] == int(imagenet["--epochs"])
        assert cfg["optim"]["lr"] == float(imagenet["--learning_rate"])
        assert cfg["optim"]["weight_decay"] == float(imagenet["--weight_decay"])
        assert cfg["optim"]["momentum"] == d["momentum"] and not cfg["optim"]["nesterov"]
        assert cfg["sched"]["milestones"] == [
            int(e) for e in imagenet["--lr_decay_epochs"].split(",")]
