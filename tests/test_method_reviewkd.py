"""ReviewKD against a line-by-line transcription of mdistiller's ReviewKD (float64: loss, warm-up,
gradients for the student features and every ABF parameter), its ABF channels and sizes read
from the models against mdistiller's configured values, and its configs.

Reference: megvii-research/mdistiller @ a08d46f10d6102bd6e3f258ca5ac880b020ea259,
``mdistiller/distillers/ReviewKD.py``, ``configs/cifar100/reviewkd.yaml``,
``configs/imagenet/{r34_r18,r50_mv1}/reviewkd.yaml``, ``mdistiller/engine/cfg.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

import _reference as R
from topkd.methods import Batch, MethodContext, ModelOutput, create_method
from topkd.methods.reviewkd import hcl_loss
from topkd.models import create_model
from topkd.models.features import feature_shapes

torch.set_num_threads(1)
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# ----------------------------------------------------------------- transcription
def ref_hcl_loss(fstudent, fteacher):
    loss_all = 0.0
    for fs, ft in zip(fstudent, fteacher):
        n, c, h, w = fs.shape
        loss = F.mse_loss(fs, ft, reduction="mean")
        cnt = 1.0
        tot = 1.0
        for l in [4, 2, 1]:  # noqa: E741
            if l >= h:
                continue
            tmpfs = F.adaptive_avg_pool2d(fs, (l, l))
            tmpft = F.adaptive_avg_pool2d(ft, (l, l))
            cnt /= 2.0
            loss += F.mse_loss(tmpfs, tmpft, reduction="mean") * cnt
            tot += cnt
        loss = loss / tot
        loss_all = loss_all + loss
    return loss_all


class RefABF(nn.Module):
    def __init__(self, in_channel, mid_channel, out_channel, fuse):
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channel, mid_channel, kernel_size=1, bias=False),
            nn.BatchNorm2d(mid_channel),
        )
        self.conv2 = nn.Sequential(
            nn.Conv2d(mid_channel, out_channel, kernel_size=3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(out_channel),
        )
        if fuse:
            self.att_conv = nn.Sequential(
                nn.Conv2d(mid_channel * 2, 2, kernel_size=1),
                nn.Sigmoid(),
            )
        else:
            self.att_conv = None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x, y=None, shape=None, out_shape=None):
        n, _, h, w = x.shape
        x = self.conv1(x)
        if self.att_conv is not None:
            y = F.interpolate(y, (shape, shape), mode="nearest")
            z = torch.cat([x, y], dim=1)
            z = self.att_conv(z)
            x = x * z[:, 0].view(n, 1, h, w) + y * z[:, 1].view(n, 1, h, w)
        if x.shape[-1] != out_shape:
            x = F.interpolate(x, (out_shape, out_shape), mode="nearest")
        y = self.conv2(x)
        return y, x


class RefReviewKD(nn.Module):
    """ReviewKD.__init__ (the ABFs) and forward_train (losses) on given outputs."""

    def __init__(self, cfg):
        super().__init__()
        c = cfg["REVIEWKD"]
        self.shapes, self.out_shapes = c["SHAPES"], c["OUT_SHAPES"]
        in_channels, out_channels = c["IN_CHANNELS"], c["OUT_CHANNELS"]
        self.ce_loss_weight = c["CE_WEIGHT"]
        self.reviewkd_loss_weight = c["REVIEWKD_WEIGHT"]
        self.warmup_epochs = c["WARMUP_EPOCHS"]
        self.stu_preact = c["STU_PREACT"]
        abfs = nn.ModuleList()
        mid_channel = min(512, in_channels[-1])
        for idx, in_channel in enumerate(in_channels):
            abfs.append(RefABF(in_channel, mid_channel, out_channels[idx],
                               idx < len(in_channels) - 1))
        self.abfs = abfs[::-1]

    def forward_train(self, logits_student, features_student, features_teacher, target, epoch):
        if self.stu_preact:
            x = features_student["preact_feats"] + [
                features_student["pooled_feat"].unsqueeze(-1).unsqueeze(-1)]
        else:
            x = features_student["feats"] + [
                features_student["pooled_feat"].unsqueeze(-1).unsqueeze(-1)]
        x = x[::-1]
        results = []
        out_features, res_features = self.abfs[0](x[0], out_shape=self.out_shapes[0])
        results.append(out_features)
        for features, abf, shape, out_shape in zip(
            x[1:], self.abfs[1:], self.shapes[1:], self.out_shapes[1:]
        ):
            out_features, res_features = abf(features, res_features, shape, out_shape)
            results.insert(0, out_features)
        features_teacher = features_teacher["preact_feats"][1:] + [
            features_teacher["pooled_feat"].unsqueeze(-1).unsqueeze(-1)]
        loss_ce = self.ce_loss_weight * F.cross_entropy(logits_student, target)
        loss_reviewkd = (self.reviewkd_loss_weight * min(epoch / self.warmup_epochs, 1.0)
                         * ref_hcl_loss(results, features_teacher))
        return loss_ce + loss_reviewkd


# ----------------------------------------------------------------- tests
def test_hcl_loss_equals_reference_with_gradients():
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4, 8, 8), (3, 5, 4, 4), (3, 6, 2, 2), (3, 7, 1, 1), (3, 2, 5, 5)]
    s = [torch.randn(*sh, generator=g, dtype=torch.float64, requires_grad=True)
         for sh in shapes]
    t = [torch.randn(*sh, generator=g, dtype=torch.float64) for sh in shapes]
    got, ref = hcl_loss(s, t), ref_hcl_loss(s, t)
    assert torch.allclose(got, ref, rtol=1e-6, atol=0)
    for a, b in zip(torch.autograd.grad(got, s), torch.autograd.grad(ref, s)):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-12)
    with pytest.raises(ValueError, match="differ"):
        hcl_loss([s[0]], [t[1]])


def _pair_ctx(teacher, student, size, nc=100):
    return MethodContext(nc, create_model(student, nc), create_model(teacher, nc), size)


def _derived(method):
    return {"SHAPES": [h for h, _ in method.shapes], "OUT_SHAPES": [h for h, _ in
                                                                     method.out_shapes],
            "IN_CHANNELS": method.in_channels, "OUT_CHANNELS": method.out_channels}


@pytest.mark.parametrize("stu_preact", [False, True])
def test_method_equals_reference_forward_train_float64(stu_preact):
    cfg = R.mdistiller("configs/cifar100/reviewkd.yaml")
    cfg["REVIEWKD"]["STU_PREACT"] = stu_preact
    ctx = _pair_ctx("resnet32x4", "resnet8x4", (3, 32, 32))
    torch.manual_seed(7)
    method = create_method({"name": "reviewkd", "reviewkd_weight": 5.0,
                            "stu_preact": stu_preact}, ctx).double()
    torch.manual_seed(7)
    ref = RefReviewKD(cfg).double()
    for (n1, a), (n2, b) in zip(method.abfs.named_parameters(), ref.abfs.named_parameters(),
                                strict=True):
        assert n1 == n2 and torch.equal(a, b), n1  # same construction, same RNG order
    ss = feature_shapes(ctx.student, (3, 32, 32), ["feats", "preact_feats", "pooled_feat"])
    ts = feature_shapes(ctx.teacher, (3, 32, 32), ["preact_feats", "pooled_feat"])
    g = torch.Generator().manual_seed(1)

    def rnd(shape, grad=False):
        return torch.randn(2, *shape, generator=g, dtype=torch.float64, requires_grad=grad)

    fs = {"feats": [rnd(s, True) for s in ss["feats"]],
          "preact_feats": [rnd(s, True) for s in ss["preact_feats"]],
          "pooled_feat": rnd(ss["pooled_feat"], True)}
    ft = {"preact_feats": [rnd(s) for s in ts["preact_feats"]],
          "pooled_feat": rnd(ts["pooled_feat"])}
    logits = rnd((100,), True)
    y = torch.tensor([1, 99])
    kind = "preact_feats" if stu_preact else "feats"
    assert method.student_taps == (kind, "pooled_feat")
    inputs = [*fs[kind][1:], fs["pooled_feat"], logits]
    for epoch in (3, 25):  # warm-up 3/20, then 1
        batch = Batch(ModelOutput(logits, fs), ModelOutput(torch.zeros(2, 100), ft), y,
                      epoch=epoch)
        got = method(batch).total
        want = ref.forward_train(logits, fs, ft, y, epoch)
        assert torch.allclose(got, want, rtol=1e-6, atol=0), (epoch, got, want)
        ga = torch.autograd.grad(got, [*inputs, *method.abfs.parameters()])
        gb = torch.autograd.grad(want, [*inputs, *ref.abfs.parameters()])
        for a, b in zip(ga, gb, strict=True):
            assert (a - b).abs().max() <= 1e-6 * b.abs().max() + 1e-15, epoch


def test_derived_sizes_equal_mdistiller_cifar100():
    method = create_method("reviewkd", _pair_ctx("resnet32x4", "resnet8x4", (3, 32, 32)))
    ref = R.mdistiller("configs/cifar100/reviewkd.yaml")["REVIEWKD"]
    assert _derived(method) == {k: ref[k] for k in _derived(method)}
    assert method.abfs[0].conv1[0].out_channels == min(512, ref["IN_CHANNELS"][-1])


@pytest.mark.parametrize("pair, teacher, student", [
    ("r34_r18", "resnet34", "resnet18"), ("r50_mv1", "resnet50", "mobilenetv1")])
def test_derived_sizes_equal_mdistiller_imagenet(pair, teacher, student):
    ref = R.mdistiller(f"configs/imagenet/{pair}/reviewkd.yaml")["REVIEWKD"]
    method = create_method({"name": "reviewkd", "stu_preact": ref["STU_PREACT"]},
                           _pair_ctx(teacher, student, (3, 224, 224), 1000))
    assert _derived(method) == {k: ref[k] for k in _derived(method)}
    # mid channels: min(512, student pooled dim); REVIEWKD.MAX_MID_CHANNEL (256 for r50_mv1)
    # is read by mdistiller but never used
    assert method.abfs[0].conv1[0].out_channels == min(512, ref["IN_CHANNELS"][-1])


@pytest.mark.parametrize("teacher, student", [
    ("resnet32x4", "shufflev1"), ("wrn_40_2", "shufflev1"), ("vgg13", "mobilenetv2"),
    ("resnet50_cifar", "mobilenetv2"), ("vgg13", "vgg8"), ("wrn_40_2", "wrn_16_2")])
def test_every_cifar_pair_builds_and_matches_the_teacher(teacher, student):
    """Sizes from the models: each level's ABF output has the teacher's shape."""
    torch.manual_seed(0)
    ctx = _pair_ctx(teacher, student, (3, 32, 32))
    method = create_method("reviewkd", ctx)
    from topkd.models.features import FeatureTaps

    x = torch.randn(2, 3, 32, 32)
    with FeatureTaps(ctx.student, method.student_taps) as st, \
            FeatureTaps(ctx.teacher, method.teacher_taps) as tt:
        ls, fs = st(x)
        with torch.no_grad():
            lt, ft = tt(x)
    out = method(Batch(ModelOutput(ls, fs), ModelOutput(lt, ft), torch.tensor([0, 1]), epoch=1))
    assert torch.isfinite(out.total)
    assert len(method.out_channels) == len(ft["preact_feats"])  # stages after the stem + pool


def test_errors_and_rejected_keys():
    from topkd.methods import ParamError, params_from_dict

    with pytest.raises(ParamError, match="MAX_MID_CHANNEL but never uses it"):
        params_from_dict({"name": "reviewkd", "max_mid_channel": 256})
    with pytest.raises(ParamError, match="derived from the models"):
        params_from_dict({"name": "reviewkd", "shapes": [1, 8, 16, 32]})
    with pytest.raises(ValueError, match="no tap points for 'preact_feats'"):
        create_method({"name": "reviewkd", "stu_preact": True},
                      _pair_ctx("vgg13", "mobilenetv2", (3, 32, 32)))
    with pytest.raises(ValueError, match="MethodContext"):
        create_method("reviewkd")


def test_configs_equal_mdistiller():
    ref = R.mdistiller("configs/cifar100/reviewkd.yaml")["REVIEWKD"]
    m = yaml.safe_load((CONFIGS / "methods" / "reviewkd.yaml").read_text())["method"]
    assert (m["ce"], m["reviewkd_weight"], m["warmup"], m["stu_preact"]) == (
        ref["CE_WEIGHT"], ref["REVIEWKD_WEIGHT"], ref["WARMUP_EPOCHS"], ref["STU_PREACT"])
    from topkd.methods.reviewkd import ReviewKDParams

    d = R.mdistiller("configs/cifar100/kd.yaml")["REVIEWKD"]  # cfg.py defaults
    p = ReviewKDParams()
    assert (p.ce, p.reviewkd_weight, p.warmup, p.stu_preact) == (
        d["CE_WEIGHT"], d["REVIEWKD_WEIGHT"], d["WARMUP_EPOCHS"], d["STU_PREACT"])
    from topkd.config import load_config

    for pair in ("r34_r18", "r50_mv1"):
        cfg = load_config(CONFIGS / "imagenet" / pair / "reviewkd.yaml")
        iref = R.mdistiller(f"configs/imagenet/{pair}/reviewkd.yaml")
        r = iref["REVIEWKD"]
        assert (cfg.method.ce, cfg.method.reviewkd_weight, cfg.method.warmup,
                cfg.method.stu_preact) == (r["CE_WEIGHT"], r["REVIEWKD_WEIGHT"],
                                           r["WARMUP_EPOCHS"], r["STU_PREACT"])
        assert cfg.data.batch_size == iref["SOLVER"]["BATCH_SIZE"]
        assert cfg.optim.lr == iref["SOLVER"]["LR"]
