"""CAT-KD against a transcription of the reference, on the real models' taps.

Reference: GzyAftermath/CAT-KD @ 4467073ca31b9929e7c45f5a6761e5e1b7c9442f,
``mdistiller/distillers/CAT_KD.py`` (``forward_train``, ``CAT_loss``, ``_Normalize``) with the
networks converted by ``tools/train.py`` (``if_test``): each model's classifier becomes a
bias-free 1x1 ``conv_test`` before the global pooling (weight ``fc.weight.view(C, D, 1, 1)``),
whose output ``feats[-1]`` is the CAM; the student's logits are ``avg_pool(conv_test(f))``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tapped_models import models, tapped_batch
from topkd.methods import MethodContext, create_method

torch.set_num_threads(1)


def _Normalize(feat, IF_NORMALIZE):  # noqa: N802, N803 - reference names
    if IF_NORMALIZE:
        feat = F.normalize(feat, dim=(2, 3))
    return feat


def CAT_loss(CAM_Student, CAM_Teacher, CAM_RESOLUTION, IF_NORMALIZE):  # noqa: N802, N803
    CAM_Student = F.adaptive_avg_pool2d(CAM_Student, (CAM_RESOLUTION, CAM_RESOLUTION))
    CAM_Teacher = F.adaptive_avg_pool2d(CAM_Teacher, (CAM_RESOLUTION, CAM_RESOLUTION))
    loss = F.mse_loss(_Normalize(CAM_Student, IF_NORMALIZE), _Normalize(CAM_Teacher, IF_NORMALIZE))
    return loss


def ref_forward_train(f_s, w_s, f_t, w_t, target, ce_w, cat_w, res, normalize, binarize):
    """CAT_KD.forward_train (onlyCAT False, IF_OnlyTransferPartialCAMs False) on the CAM models."""
    stu = F.conv2d(f_s, w_s.view(*w_s.shape, 1, 1))  # the student's conv_test
    logits_student = F.avg_pool2d(stu, stu.shape[-1]).reshape(stu.size(0), -1)
    tea = F.conv2d(f_t, w_t.view(*w_t.shape, 1, 1))  # the converted teacher's conv_test
    if binarize:
        n, c, h, w = tea.shape
        threshold = torch.norm(tea, dim=(2, 3), keepdim=True, p=1) / (h * w)
        tea = tea - threshold
        tea = F.relu(tea).bool() * torch.ones_like(tea)
    loss_feat = cat_w * CAT_loss(stu, tea, res, normalize)
    loss_ce = ce_w * F.cross_entropy(logits_student, target)
    return loss_ce + loss_feat


def _final_map(feats, name):
    """``(tap, map)``: the map the reference's conv_test reads (its ``*_test`` models) and the
    tap it is made of (WRN's is a copy of the BatchNorm output: gradients are compared on the
    student's parameters)."""
    if name.startswith(("wrn", "vgg")):  # wrn: relu(bn1(block3)), vgg: relu(block4), where
        tap = feats["preact_feats"][-1]  # our preact_feats[-1] is bn1's / block4's output
        return tap, F.relu(tap)
    return feats["feats"][-1], feats["feats"][-1]


CASES = [  # student, teacher, params
    ("resnet8", "resnet8x4", {"cat_weight": 15.0, "resolution": 2, "normalize": False}),
    ("resnet8", "resnet8", {"cat_weight": 600.0, "resolution": 4, "normalize": True}),
    ("wrn_16_1", "wrn_16_1", {"cat_weight": 12.0, "resolution": 2, "normalize": False,
                              "binarize": True}),
    ("vgg8", "resnet8", {"ce": 0.5, "cat_weight": 4.5, "resolution": 2, "normalize": True,
                         "binarize": True}),
]


@pytest.mark.parametrize("student, teacher, params", CASES)
def test_loss_and_grads_match_reference(student, teacher, params):
    s, t = models(student, teacher)
    ctx = MethodContext(num_classes=10, student=s, teacher=t, input_size=(3, 32, 32))
    m = create_method({"name": "catkd", **params}, ctx)
    assert s.get_classifier().bias.abs().sum() == 0 and not s.get_classifier().bias.requires_grad
    b = tapped_batch(m, s.train(), t.eval(), grad=True)
    _, f_s = _final_map(b.student.feats, student)
    _, f_t = _final_map(b.teacher.feats, teacher)
    w_s, w_t = s.get_classifier().weight, t.get_classifier().weight
    p = m.params
    want = ref_forward_train(f_s, w_s, f_t, w_t, b.labels, p.ce, p.cat_weight, p.resolution,
                             p.normalize, p.binarize)
    got = m(b).total
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-10)
    params_s = [q for q in s.parameters() if q.requires_grad]  # every path into the student
    for a, w in zip(torch.autograd.grad(got, params_s, retain_graph=True),
                    torch.autograd.grad(want, params_s)):
        torch.testing.assert_close(a, w, rtol=1e-6, atol=1e-10)


def test_student_classifier_bias_is_frozen_at_zero_unless_asked():
    s, t = models()
    bias0 = s.get_classifier().bias.detach().clone()
    ctx = MethodContext(num_classes=10, student=s, teacher=t, input_size=(3, 32, 32))
    create_method({"name": "catkd", "student_fc_bias": True}, ctx)
    assert torch.equal(s.get_classifier().bias, bias0) and s.get_classifier().bias.requires_grad
    m = create_method("catkd", ctx)
    assert m.student_taps == ("feats",) and m.teacher_taps == ("feats",)  # resnets: feats only
    from topkd.config import OptimConfig
    from topkd.engine.optim import build_optimizer

    opt = build_optimizer(OptimConfig(), [*s.parameters(), *m.parameters()])
    params = {id(q) for g in opt.param_groups for q in g["params"]}
    assert id(s.get_classifier().bias) not in params and id(s.get_classifier().weight) in params


def test_pure_functions():
    from topkd.methods.catkd import binarize_cams, cat_loss, class_activation_maps

    g = torch.Generator().manual_seed(0)
    f = torch.randn(2, 5, 6, 6, generator=g, dtype=torch.float64)
    w = torch.randn(3, 5, generator=g, dtype=torch.float64)
    full = class_activation_maps(f, w)
    torch.testing.assert_close(class_activation_maps(f, w, 2),
                               F.adaptive_avg_pool2d(full, 2))  # pooling commutes
    assert torch.equal(binarize_cams(torch.tensor([[[[1.0, -3.0], [0.5, 2.0]]]])),
                       torch.tensor([[[[0.0, 0.0], [0.0, 1.0]]]]))  # mean |CAM| = 1.625
    with pytest.raises(ValueError, match="differ in batch size or number of classes"):
        cat_loss(full, full[:, :2], 2, True)
    with pytest.raises(ValueError, match=r"\(C, D\) classifier"):
        class_activation_maps(f, w[:, :4])


def test_errors():
    with pytest.raises(ValueError, match="catkd needs the student and the teacher"):
        create_method("catkd")
    s, _ = models()
    t = models(num_classes=7)[1]
    with pytest.raises(ValueError, match="the student has 10 classes, the teacher 7"):
        create_method("catkd", MethodContext(num_classes=10, student=s, teacher=t,
                                             input_size=(3, 32, 32)))
    from topkd.models import create_model

    pairs = MethodContext(num_classes=100, student=create_model("fmnist_pairs_cnn_student", 100),
                          teacher=create_model("fmnist_pairs_cnn_teacher", 100),
                          input_size=(1, 28, 56))
    with pytest.raises(ValueError, match=r"the student pools a \(1, 2\) grid"):
        create_method("catkd", pairs)


def test_engine_run_with_recomputed_and_preact_final_maps(tmp_path):
    """A WRN teacher (final map from preact_feats) and a MobileNetV2 student (final map re-runs
    conv2) through the engine: the student's classifier bias stays zero, BN statistics move once
    per step."""
    from feature_engine_common import feature_config
    from topkd.engine import Trainer

    cfg = feature_config(tmp_path, {"name": "catkd", "cat_weight": 15.0}, student="mobilenetv2",
                         teacher="wrn_16_1", epochs=1, train={"max_steps_per_epoch": 2})
    tr = Trainer(cfg, "distill", quiet=True)
    assert tr.method.teacher_taps == ("feats", "preact_feats")
    tr.fit()
    clf = tr.model.get_classifier()
    assert torch.equal(clf.bias, torch.zeros_like(clf.bias))
    assert int(tr.model.conv2[1].num_batches_tracked) == 2


# --------------------------------------------------------------------------- configs

# Our pair keys -> CAT-KD's file names under configs/cifar100/CAT_KD/; model names.
CATKD_FILE = {"wrn40_2_wrn16_2": "wrn_40_2_wrn_16_2", "wrn40_2_wrn40_1": "wrn_40_2_wrn_40_1"}
CATKD_MODEL = {"ShuffleV1": "shufflev1", "ShuffleV2": "shufflev2", "MobileNetV2": "mobilenetv2",
               "ResNet50": "resnet50_cifar", "ResNet34": "resnet34", "ResNet18": "resnet18"}


def _expected(ref):
    c = ref["CAT_KD"]
    assert not c["onlyCAT"] and not c["IF_BINARIZE"] and not c["IF_OnlyTransferPartialCAMs"]
    return {"name": "catkd", "ce": c["LOSS"]["CE_WEIGHT"],
            "cat_weight": c["LOSS"]["CAT_loss_weight"],
            "resolution": c["LOSS"]["CAM_RESOLUTION"], "normalize": c["IF_NORMALIZE"]}


def test_configs_equal_the_reference():
    """Every CIFAR-100 leaf equals its CAT_KD/<pair>.yaml merged into cfg.py's defaults (method
    values, models, solver); the ImageNet leaf has the r34_r18.yaml method values."""
    import _reference as R
    from test_configs import CONFIGS, GEN, compose

    for pair in GEN.CIFAR_PAIRS:
        ref = R.resolved("catkd", f"configs/cifar100/CAT_KD/{CATKD_FILE.get(pair.key, pair.key)}"
                                  ".yaml")
        assert ref["DISTILLER"]["TYPE"] == "CAT_KD" and ref["if_test"]
        cfg = compose(CONFIGS / "cifar100" / pair.key / "catkd.yaml")
        assert cfg["method"] == _expected(ref), pair.key
        dist = ref["DISTILLER"]
        assert (cfg["model"]["name"], cfg["teacher"]["name"]) == tuple(
            CATKD_MODEL.get(n, n) for n in (dist["STUDENT"], dist["TEACHER"])), pair.key
        sol, o = ref["SOLVER"], cfg["optim"]
        assert (o["name"], o["lr"], o["momentum"], o["weight_decay"], o["nesterov"]) == (
            sol["TYPE"].lower(), sol["LR"], sol["MOMENTUM"], sol["WEIGHT_DECAY"], False)
        assert cfg["sched"]["milestones"] == sol["LR_DECAY_STAGES"]
        assert cfg["sched"]["gamma"] == sol["LR_DECAY_RATE"]
        assert (cfg["train"]["epochs"], cfg["data"]["batch_size"]) == (
            sol["EPOCHS"], sol["BATCH_SIZE"])
    ref = R.resolved("catkd", "configs/imagenet/CAT-KD/r34_r18.yaml")
    cfg = compose(CONFIGS / "imagenet" / "r34_r18" / "catkd.yaml")
    assert cfg["method"] == _expected(ref)
    assert (cfg["model"]["name"], cfg["teacher"]["name"]) == ("resnet18", "resnet34")
    # the file's solver except its leftover BATCH_SIZE 2 (configs/methods/imagenet/catkd.yaml)
    sol, o = ref["SOLVER"], cfg["optim"]
    assert (o["lr"], o["momentum"], o["weight_decay"]) == (
        sol["LR"], sol["MOMENTUM"], sol["WEIGHT_DECAY"])
    assert (cfg["sched"]["milestones"], cfg["train"]["epochs"]) == (
        sol["LR_DECAY_STAGES"], sol["EPOCHS"])
    assert sol["BATCH_SIZE"] == 2 and cfg["data"]["batch_size"] == 512
    assert ref["DISTILLER"]["TYPE"] == "CAT-KD"  # not a key of its distiller_dict ("CAT_KD")
    assert not (CONFIGS / "imagenet" / "r50_mv1" / "catkd.yaml").exists()
