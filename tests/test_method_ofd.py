"""OFD against a line-by-line transcription of mdistiller's OFD (float64), its BatchNorm margins
per zoo family, the teacher's batch statistics in the engine, and its configs.

Reference: megvii-research/mdistiller @ a08d46f10d6102bd6e3f258ca5ac880b020ea259,
``mdistiller/distillers/OFD.py`` and ``mdistiller/models/{cifar,imagenet}/*.py``
(``get_bn_before_relu``). scipy's ``norm.cdf`` is ``statistics.NormalDist().cdf`` here.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from statistics import NormalDist

import pytest
import torch
import torch.nn.functional as F
import yaml

import _reference as R
from topkd.engine.step import TrainStep
from topkd.methods import Batch, MethodContext, ModelOutput, create_method
from topkd.methods.ofd import ofd_loss, ofd_margin, partial_l2
from topkd.models import create_model
from topkd.models.bn_before_relu import bn_before_relu
from topkd.models.features import feature_shapes, module_name

torch.set_num_threads(1)
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
norm_cdf = NormalDist().cdf


# ----------------------------------------------------------------- transcription of OFD.py
def ref_feat_loss(source, target, margin):
    margin = margin.to(source)
    loss = (
        (source - margin) ** 2 * ((source > margin) & (target <= margin)).float()
        + (source - target) ** 2
        * ((source > target) & (target > margin) & (target <= 0)).float()
        + (source - target) ** 2 * (target > 0).float()
    )
    return torch.abs(loss).mean(dim=0).sum()


def ref_margins(bn_before_relu_list):
    """``OFD.init_ofd_modules``' margin loop (FloatTensor, as the reference)."""
    margins = []
    for idx, bn in enumerate(bn_before_relu_list):  # noqa: B007 (verbatim)
        margin = []
        std = bn.weight.data
        mean = bn.bias.data
        for (s, m) in zip(std, mean):
            s = abs(s.item())
            m = m.item()
            if norm_cdf(-m / s) > 0.001:
                margin.append(
                    -s
                    * math.exp(-((m / s) ** 2) / 2)
                    / math.sqrt(2 * math.pi)
                    / norm_cdf(-m / s)
                    + m
                )
            else:
                margin.append(-3 * s)
        margin = torch.FloatTensor(margin).to(std.device)
        margins.append(margin.unsqueeze(1).unsqueeze(2).unsqueeze(0).detach())
    return margins


def _align_list(*input_list):
    min_len = min([len(l) for l in input_list])  # noqa: E741
    return [l[-min_len:] for l in input_list]  # noqa: E741


def ref_ofd_loss(connectors, margins, feature_student, feature_teacher):
    feature_student, feature_teacher = _align_list(feature_student, feature_teacher)
    feature_student = [connectors[idx](feat) for idx, feat in enumerate(feature_student)]
    loss_distill = 0
    feat_num = len(feature_student)
    for i in range(feat_num):
        loss_distill = loss_distill + ref_feat_loss(
            feature_student[i],
            F.adaptive_avg_pool2d(feature_teacher[i], feature_student[i].shape[-2:]).detach(),
            margins[i],
        ) / 2 ** (feat_num - i - 1)
    return loss_distill


def ref_forward_train(connectors, margins, cfg, logits_student, target, feature_student,
                      feature_teacher):
    loss_ce = cfg["CE_WEIGHT"] * F.cross_entropy(logits_student, target)
    loss_feat = cfg["FEAT_WEIGHT"] * ref_ofd_loss(
        connectors, margins, feature_student["preact_feats"][1:],
        feature_teacher["preact_feats"][1:])
    return loss_ce + loss_feat


# ----------------------------------------------------------------- pure functions
def test_margin_equals_reference_in_both_branches():
    w = torch.tensor([1.0, -0.7, 0.3, 2.0, 0.5, 1e-3, 0.8], dtype=torch.float64)
    b = torch.tensor([0.0, 0.4, -1.2, 5.0, 1.545, 0.0, 3.2], dtype=torch.float64)
    # 5.0/2.0 -> cdf(-2.5) = 6e-3 (formula); 3.2/0.8 -> cdf(-4) < 1e-3 (the -3s branch);
    # 1.545/0.5 sits just above the 1e-3 threshold
    bn = torch.nn.BatchNorm2d(7).double()
    bn.weight.data.copy_(w)
    bn.bias.data.copy_(b)
    (ref,) = ref_margins([bn])
    got = ofd_margin(w, b)
    assert torch.allclose(got, ref.flatten().double(), rtol=1e-6, atol=1e-7)
    assert got[-1] == pytest.approx(-3 * 0.8)
    # a zero weight (the reference divides by zero): the limit min(bias, 0)
    z = ofd_margin(torch.zeros(3), torch.tensor([-0.5, 0.0, 0.5]))
    assert z.tolist() == [-0.5, 0.0, 0.0]
    close = ofd_margin(torch.full((3,), 1e-6), torch.tensor([-0.5, 0.0, 0.5]))
    assert torch.allclose(close, z, atol=1e-5)


def test_partial_l2_and_ofd_loss_equal_reference_with_gradients():
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(3, c, h, h, generator=g, dtype=torch.float64, requires_grad=True)
         for c, h in ((4, 8), (6, 4), (5, 2))]
    t = [torch.randn(3, c, 2 * h, 2 * h, generator=g, dtype=torch.float64)
         for c, h in ((4, 8), (6, 4), (5, 2))]
    m = [-torch.rand(c, generator=g, dtype=torch.float64) for c in (4, 6, 5)]
    ident = [torch.nn.Identity()] * 3
    ref = ref_ofd_loss(ident, [x.view(1, -1, 1, 1) for x in m], s, t)
    got = ofd_loss(s, t, m)
    assert torch.allclose(got, ref, rtol=1e-6, atol=0)
    for a, b in zip(torch.autograd.grad(got, s), torch.autograd.grad(ref, s)):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-12)
    one = partial_l2(s[0], F.adaptive_avg_pool2d(t[0], (8, 8)), m[0])
    assert torch.allclose(one, ref_feat_loss(s[0], F.adaptive_avg_pool2d(t[0], (8, 8)),
                                             m[0].view(1, -1, 1, 1)))
    # every case of the piecewise distance occurs in this data
    tt = F.adaptive_avg_pool2d(t[0], (8, 8))
    mm = m[0].view(1, -1, 1, 1)
    assert ((s[0] > mm) & (tt <= mm)).any() and ((s[0] > tt) & (tt > mm) & (tt <= 0)).any()
    assert (tt > 0).any() and ((s[0] <= mm) & (tt <= mm)).any()


def test_input_errors():
    with pytest.raises(ValueError, match="equal"):
        partial_l2(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 2, 2), torch.zeros(3))
    with pytest.raises(ValueError, match="as many"):
        ofd_loss([torch.zeros(2, 3, 4, 4)], [], [])
    with pytest.raises(ValueError, match=r"\(C,\)"):
        ofd_margin(torch.zeros(3), torch.zeros(4))


# ----------------------------------------------------------------- the method
def _ctx(teacher="resnet32x4", student="resnet8x4", size=(3, 32, 32), seed=0):
    torch.manual_seed(seed)
    t = create_model(teacher, 100).eval()
    s = create_model(student, 100)
    with torch.no_grad():
        for bn in bn_before_relu(t):
            bn.weight.uniform_(-1.5, 1.5)
            bn.bias.normal_(0.0, 1.0)
            bn.bias[:3] = 4 * bn.weight[:3].abs()  # the -3s branch
    return MethodContext(100, s, t, size)


def test_method_equals_reference_forward_train_float64():
    ctx = _ctx()
    method = create_method("ofd", ctx).double()
    ref_cfg = R.mdistiller("configs/cifar100/ofd.yaml")["OFD"]["LOSS"]
    s_shapes = feature_shapes(ctx.student, (3, 32, 32), ["preact_feats"])["preact_feats"]
    t_shapes = feature_shapes(ctx.teacher, (3, 32, 32), ["preact_feats"])["preact_feats"]
    g = torch.Generator().manual_seed(1)
    fs = [torch.randn(4, *sh, generator=g, dtype=torch.float64, requires_grad=True)
          for sh in s_shapes]
    ft = [torch.randn(4, *sh, generator=g, dtype=torch.float64) for sh in t_shapes]
    logits = torch.randn(4, 100, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 100, (4,), generator=g)
    batch = Batch(ModelOutput(logits, {"preact_feats": fs}),
                  ModelOutput(torch.zeros(4, 100), {"preact_feats": ft}), y, epoch=1)
    params = list(method.parameters())
    got = method(batch).total
    margins = [m.double() for m in ref_margins(bn_before_relu(ctx.teacher))]
    ref = ref_forward_train(method.connectors, margins, ref_cfg, logits, y,
                            {"preact_feats": fs}, {"preact_feats": ft})
    assert torch.allclose(got, ref, rtol=1e-6, atol=0), (got, ref)
    inputs = [*fs[1:], logits, *params]
    for a, b in zip(torch.autograd.grad(got, inputs), torch.autograd.grad(ref, inputs)):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-10)
    for i, m in enumerate(margins):
        assert torch.allclose(getattr(method, f"margin{i}").double(), m.flatten(), rtol=1e-6)


def test_connectors_as_reference():
    torch.manual_seed(3)
    method = create_method({"name": "ofd", "kernel_size": 3}, _ctx())
    assert method.num_stages == 3 and len(method.connectors) == 3
    for conn, (cin, cout) in zip(method.connectors, [(64, 64), (128, 128), (256, 256)]):
        conv, bn = conn
        assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.padding) == \
            (cin, cout, (3, 3), (1, 1)) and conv.bias is None
        std = math.sqrt(2.0 / (9 * cout))  # normal_(0, sqrt(2 / (k*k*out)))
        assert abs(conv.weight.std().item() / std - 1) < 0.05
        assert torch.equal(bn.weight, torch.ones(cout)) and torch.equal(bn.bias, torch.zeros(cout))


def test_stages_align_from_the_deepest_and_margins_follow():
    """ResNet50 (ImageNet, 4 stages) -> MobileNetV1 (3 stages after the first): mdistiller's
    configuration; the margins are those of the teacher's last three stages (its bn2..bn4)."""
    ctx = _ctx("resnet50", "mobilenetv1", size=(3, 64, 64))
    method = create_method("ofd", ctx)
    bns = bn_before_relu(ctx.teacher)
    assert method.num_stages == 3
    assert [c[0].out_channels for c in method.connectors] == [512, 1024, 2048]  # stage_channels[1:]
    assert [c[0].in_channels for c in method.connectors] == [256, 512, 1024]
    for i, m in enumerate(ref_margins(bns[1:])):  # mdistiller: [bn2, bn3, bn4]
        assert torch.allclose(getattr(method, f"margin{i}"), m.flatten(), rtol=1e-6)


# mdistiller's get_bn_before_relu, as module names of our zoo (cifar/resnet.py, resnetv2.py,
# wrn.py, vgg.py, imagenet/resnet.py, imagenet/mobilenetv1.py).
def _md_resnet(m):
    return [f"layer{i}.{len(getattr(m, f'layer{i}')) - 1}.bn2" for i in (1, 2, 3)]


MDISTILLER_BNS = {
    "resnet8": _md_resnet,
    "resnet8x4": _md_resnet,
    "resnet20": _md_resnet,
    "wrn_16_2": lambda m: ["block2.layer.0.bn1", "block3.layer.0.bn1", "bn1"],
    "vgg8": lambda m: [f"block{i}.{len(getattr(m, f'block{i}')) - 1}" for i in (1, 2, 3, 4)],
    "resnet18_cifar": lambda m: [f"layer{i}.1.bn2" for i in (1, 2, 3, 4)],
    "resnet50_cifar": lambda m: [f"layer{i}.{n - 1}.bn3" for i, n in zip((1, 2, 3, 4),
                                                                        (3, 4, 6, 3))],
    # mdistiller lists layers 2-4 (OFD aligns to the 3 stages of its MobileNetV1 student)
    "resnet18": lambda m: [f"layer{i}.1.bn2" for i in (2, 3, 4)],
    "resnet50": lambda m: [f"layer{i}.{n - 1}.bn3" for i, n in zip((2, 3, 4), (4, 6, 3))],
    # mdistiller lists model[3] too: it belongs to preact_feats[0], which OFD drops
    "mobilenetv1": lambda m: [f"model.{i}.4" for i in (5, 11, 13)],
}


@pytest.mark.parametrize("name", sorted(MDISTILLER_BNS))
def test_bn_before_relu_per_family_equals_mdistiller(name):
    model = create_model(name, 10)
    bns = bn_before_relu(model)
    ref = MDISTILLER_BNS[name](model)
    assert [module_name(model, b) for b in bns][-len(ref):] == ref
    size = (3, 64, 64) if name in ("resnet18", "resnet50", "mobilenetv1") else (3, 32, 32)
    pre = feature_shapes(model, size, ["preact_feats"])["preact_feats"][1:]
    assert [b.num_features for b in bns] == [c for c, _, _ in pre]


@pytest.mark.parametrize("name", ["shufflev1", "shufflev2", "mobilenetv2"])
def test_families_without_bn_before_relu_are_errors(name):
    with pytest.raises(ValueError, match="no known BatchNorm before each stage's ReLU"):
        bn_before_relu(create_model(name, 10))


def test_unsupported_students_and_missing_teacher():
    with pytest.raises(ValueError, match="no tap points for 'preact_feats'"):
        create_method("ofd", _ctx("vgg13", "mobilenetv2"))
    with pytest.raises(ValueError, match="needs the teacher model"):
        create_method("ofd", MethodContext(100, create_model("resnet8", 100), None, (3, 32, 32)))


@pytest.mark.parametrize("mode", ["batch", "running"])
def test_engine_runs_the_teacher_on_batch_statistics(mode):
    """teacher_bn: batch gives the teacher features of train-mode BatchNorm (as mdistiller's OFD,
    whose train() leaves the teacher in train mode), without changing its running statistics
    or its eval flag; running gives the eval-mode features."""
    ctx = _ctx("resnet8", "resnet8")
    with torch.no_grad():  # running statistics far from any batch's
        for m in ctx.teacher.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.fill_(0.3)
                m.running_var.fill_(2.0)
    method = create_method({"name": "ofd", "teacher_bn": mode}, ctx)
    before = copy.deepcopy(ctx.teacher.state_dict())
    step = TrainStep(ctx.student, ctx.teacher, method, torch.optim.SGD(method.parameters(), 0.1),
                     device=torch.device("cpu"))
    x = torch.randn(6, 3, 32, 32)
    got = step.teacher_outputs(x, None)
    ref_model = copy.deepcopy(ctx.teacher).train(mode == "batch")
    with torch.no_grad():
        ref = ref_model(x)
    assert torch.allclose(got.logits, ref, atol=1e-5)
    assert not ctx.teacher.training
    after = ctx.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # incl. num_batches_tracked


# ----------------------------------------------------------------- configs
def test_configs_equal_mdistiller():
    ref = R.mdistiller("configs/cifar100/ofd.yaml")
    assert ref["DISTILLER"]["TYPE"] == "OFD"
    m = yaml.safe_load((CONFIGS / "methods" / "ofd.yaml").read_text())["method"]
    assert (m["ce"], m["feat_weight"], m["kernel_size"]) == (
        ref["OFD"]["LOSS"]["CE_WEIGHT"], ref["OFD"]["LOSS"]["FEAT_WEIGHT"],
        ref["OFD"]["CONNECTOR"]["KERNEL_SIZE"])
    p = create_method("ofd", _ctx()).params  # the dataclass defaults are the reference's too
    assert (p.ce, p.feat_weight, p.kernel_size, p.warmup) == (1.0, 1e-3, 1, 0.0)
    from topkd.config import load_config

    inet = load_config(CONFIGS / "imagenet" / "r50_mv1" / "ofd.yaml")
    iref = R.mdistiller("configs/imagenet/r50_mv1/ofd.yaml")
    assert inet.method.feat_weight == iref["OFD"]["LOSS"]["FEAT_WEIGHT"] == 1e-4
    assert inet.data.batch_size == iref["SOLVER"]["BATCH_SIZE"] == 128
    assert inet.optim.lr == iref["SOLVER"]["LR"] == 0.05
    assert not (CONFIGS / "imagenet" / "r34_r18" / "ofd.yaml").exists()  # not published
    from topkd.methods import params_to_dict

    cifar = load_config(CONFIGS / "cifar100" / "res32x4_res8x4" / "ofd.yaml")
    assert params_to_dict(cifar.method) == {**m, "warmup": 0.0}
