"""Model zoo: contract, pinned parameter counts, reference key names, save/load round trip."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from torch import nn

import topkd.models._factory as factory
from topkd.checkpoints import load_weights, save_weights
from topkd.models import (
    ClassifierModel,
    count_parameters,
    create_model,
    list_models,
    model_info,
    register_model,
)

# Exact parameter counts, 100 classes for CIFAR, 1000 for ImageNet, 10 for Fashion-MNIST.
# They agree with the figures published for the field's code (RepDistiller/CRD, mdistiller),
# e.g. resnet8x4 1.23M, resnet32x4 7.43M, wrn_40_2 2.26M, ResNet50 23.71M, MobileNetV1 4.23M.
PINNED: dict[str, int] = {
    "resnet8": 83_892,
    "resnet14": 181_108,
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet44": 667_188,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "wrn_16_1": 180_916,
    "wrn_16_2": 703_284,
    "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028,
    "vgg11": 9_277_284,
    "vgg13": 9_462_180,
    "vgg16": 14_774_436,
    "vgg19": 20_086_692,
    "mobilenetv2": 812_836,
    "shufflev1": 949_258,
    "shufflev2": 1_355_528,
    "resnet18_cifar": 11_220_132,
    "resnet34_cifar": 21_328_292,
    "resnet50_cifar": 23_705_252,
    # ImageNet (torchvision's published counts for resnet18/34/50)
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "mobilenetv1": 4_231_976,
    # Tiny-ImageNet (200 classes)
    "mobilenetv2_tinyimagenet": 2_497_480,
    # Fashion-MNIST demo
    "fmnist_cnn_teacher": 427_882,
    "fmnist_cnn_student": 13_726,
    # fashion_mnist_pairs (100 classes, 1x28x56): the same layers, classifier on 2 pooled cells
    "fmnist_pairs_cnn_teacher": 476_612,
    "fmnist_pairs_cnn_student": 22_936,
}

# sha256 (first 16 hex digits) of the ordered "key:shape" list of each state_dict. The CIFAR
# models and MobileNetV1 were checked once against a transcription of the reference code
# (mdistiller): same keys in the same order and bitwise-equal outputs in train and eval mode.
# A change here breaks loading the field's released checkpoints.
LAYOUT_DIGEST: dict[str, str] = {
    "fmnist_cnn_student": "07cd7892dd00bca2",
    "fmnist_cnn_teacher": "0e54af9cfc013c70",
    "fmnist_pairs_cnn_student": "57ea4f3d1bc89464",
    "fmnist_pairs_cnn_teacher": "b410820d10be5403",
    "mobilenetv1": "735401b430049768",
    "mobilenetv2": "dc5f751da70599bb",
    "mobilenetv2_tinyimagenet": "97e4cb1fe921ca99",
    "resnet110": "daa718d52ef69745",
    "resnet14": "b671d2c42cef460b",
    "resnet18": "9343d600debe782c",
    "resnet18_cifar": "58f6dc8bcc47401d",
    "resnet20": "e480ef445ab85de5",
    "resnet32": "716a10c3e306cb9b",
    "resnet32x4": "685f596181ef34e8",
    "resnet34": "e0fcac3e9a1e5aef",
    "resnet34_cifar": "be4ffda207a13d91",
    "resnet44": "0ea6f5caec17075f",
    "resnet50": "1d8fc517bd891ca1",
    "resnet50_cifar": "d995be9cd6ba6cf7",
    "resnet56": "d4fcbd5d057cb214",
    "resnet8": "eec123cffead889d",
    "resnet8x4": "8135fcd31bd66896",
    "shufflev1": "c21b32ee346e9700",
    "shufflev2": "4a894fed324fb11e",
    "vgg11": "c07b7303493cdd87",
    "vgg13": "eb9f56f5fa1be1b5",
    "vgg16": "701437b739103735",
    "vgg19": "384a4cdf0dfa75b6",
    "vgg8": "38970949c714781f",
    "wrn_16_1": "3a1556399e4031e9",
    "wrn_16_2": "5af6aa9e7ef23f35",
    "wrn_40_1": "878f52387f93459c",
    "wrn_40_2": "f074c18001055d3e",
}


# ImageNet models are checked at a reduced resolution (their pooling is global) to stay cheap.
TEST_SIZE = {"imagenet": 64, "tiny_imagenet": 32}


def _input(name: str, batch: int = 2) -> torch.Tensor:
    info = model_info(name)
    c, h, w = info.input_size
    s = TEST_SIZE.get(info.family)
    return torch.randn(batch, c, s or h, s or w)


def test_registry_lists_exactly_the_pinned_models():
    # (names starting with "test_" are registered temporarily by other test modules)
    assert {n for n in list_models() if not n.startswith("test_")} == set(PINNED)
    aliases = set(list_models(include_aliases=True))
    for a in ("vgg13_bn", "mobile_half", "ResNet50", "ResNet18", "shufflenetv1"):
        assert a in aliases


@pytest.mark.parametrize("name", sorted(PINNED))
def test_model_contract_params_and_roundtrip(name: str, tmp_path):
    torch.manual_seed(0)
    info = model_info(name)
    nc = info.default_num_classes
    model = create_model(name, nc).eval()
    assert count_parameters(model) == PINNED[name]
    layout = ";".join(f"{k}:{tuple(v.shape)}" for k, v in model.state_dict().items())
    assert hashlib.sha256(layout.encode()).hexdigest()[:16] == LAYOUT_DIGEST[name]
    x = _input(name)
    with torch.inference_mode():
        logits = model(x)
        feats = model.forward_features(x)
        clf = model.get_classifier()
        assert logits.shape == (2, nc)
        assert feats.shape == (2, model.feature_dim)
        assert isinstance(clf, nn.Linear)
        assert (clf.in_features, clf.out_features) == (model.feature_dim, nc)
        torch.testing.assert_close(clf(feats), logits, rtol=0, atol=0)

    path = tmp_path / f"{name}.pt"
    save_weights(model, path)
    other = create_model(name, nc).eval()
    with torch.inference_mode():
        assert not torch.equal(other(x), logits)  # a different random init
    load_weights(other, path, verbose=False)
    with torch.inference_mode():
        torch.testing.assert_close(other(x), logits, rtol=0, atol=0)


def test_global_pool_matches_field_fixed_avgpool():
    from topkd.models import adaptive_global_pool, global_pool

    for k in (8, 4, 2):
        x = torch.randn(3, 16, k, k) * 100
        assert torch.equal(global_pool(x), nn.AvgPool2d(k)(x).flatten(1))
        torch.testing.assert_close(adaptive_global_pool(x), global_pool(x))
    assert global_pool(torch.randn(2, 5, 7, 7)).shape == (2, 5)


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "shufflev2", "fmnist_cnn_student"])
def test_train_mode_backward(name: str):
    model = create_model(name, 10).train()
    model(_input(name, 4)).logsumexp(1).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


# Reference key names and shapes, from the field's model code (RepDistiller / mdistiller).
REFERENCE_KEYS: dict[str, dict[str, tuple[int, ...]]] = {
    "resnet32x4": {
        "conv1.weight": (32, 3, 3, 3),
        "bn1.running_mean": (32,),
        "layer1.0.conv1.weight": (64, 32, 3, 3),
        "layer1.0.downsample.0.weight": (64, 32, 1, 1),
        "layer1.0.downsample.1.weight": (64,),
        "layer3.4.bn2.num_batches_tracked": (),
        "fc.weight": (100, 256),
        "fc.bias": (100,),
    },
    "resnet56": {
        "layer2.0.downsample.0.weight": (32, 16, 1, 1),
        "layer3.8.conv2.weight": (64, 64, 3, 3),
        "fc.weight": (100, 64),
    },
    "wrn_40_2": {
        "conv1.weight": (16, 3, 3, 3),
        "block1.layer.0.bn1.weight": (16,),
        "block1.layer.0.conv1.weight": (32, 16, 3, 3),
        "block1.layer.0.convShortcut.weight": (32, 16, 1, 1),
        "block3.layer.5.conv2.weight": (128, 128, 3, 3),
        "bn1.running_var": (128,),
        "fc.weight": (100, 128),
    },
    "vgg13": {
        "block0.0.weight": (64, 3, 3, 3),
        "block0.0.bias": (64,),
        "block0.1.running_var": (64,),
        "block0.3.weight": (64, 64, 3, 3),
        "block4.4.weight": (512,),
        "classifier.weight": (100, 512),
    },
    "vgg8": {"block0.1.weight": (64,), "block4.0.weight": (512, 512, 3, 3)},
    "mobilenetv2": {
        "conv1.0.weight": (16, 3, 3, 3),
        "conv1.1.weight": (16,),
        "blocks.0.0.conv.0.weight": (16, 16, 1, 1),
        "blocks.1.0.conv.0.weight": (48, 8, 1, 1),
        "blocks.1.0.conv.3.weight": (48, 1, 3, 3),
        "blocks.6.0.conv.7.weight": (160,),
        "conv2.0.weight": (1280, 160, 1, 1),
        "classifier.0.weight": (100, 1280),
    },
    "shufflev1": {
        "conv1.weight": (24, 3, 1, 1),
        "layer1.0.conv1.weight": (54, 24, 1, 1),
        "layer1.0.conv3.weight": (216, 18, 1, 1),
        "layer2.1.conv1.weight": (120, 160, 1, 1),
        "linear.weight": (100, 960),
    },
    "shufflev2": {
        "layer1.0.conv1.weight": (24, 1, 3, 3),
        "layer1.0.conv5.weight": (58, 58, 1, 1),
        "layer1.1.conv1.weight": (58, 58, 1, 1),
        "layer3.3.bn3.weight": (232,),
        "conv2.weight": (1024, 464, 1, 1),
        "linear.weight": (100, 1024),
    },
    "resnet50_cifar": {
        "conv1.weight": (64, 3, 3, 3),
        "layer1.0.shortcut.0.weight": (256, 64, 1, 1),
        "layer4.2.bn3.weight": (2048,),
        "linear.weight": (100, 2048),
    },
    "mobilenetv1": {
        "model.0.0.weight": (32, 3, 3, 3),
        "model.1.0.weight": (32, 1, 3, 3),
        "model.13.3.weight": (1024, 1024, 1, 1),
        "model.13.4.running_mean": (1024,),
        "fc.weight": (1000, 1024),
    },
}
REFERENCE_KEYS["mobilenetv2_tinyimagenet"] = {
    "pre.0.weight": (32, 3, 1, 1),
    "pre.0.bias": (32,),
    "stage1.residual.0.weight": (32, 32, 1, 1),
    "stage2.1.residual.3.weight": (144, 1, 3, 3),
    "stage7.residual.6.weight": (320, 960, 1, 1),
    "conv1.0.weight": (1280, 320, 1, 1),
    "conv2.weight": (200, 1280),  # (200, 1280, 1, 1) in the reference; load_weights reshapes
}
ABSENT_KEYS = {
    "resnet32x4": ["layer4.0.conv1.weight", "linear.weight"],
    "resnet56": ["layer1.0.downsample.0.weight"],
    "wrn_40_2": ["block1.layer.1.convShortcut.weight"],
    "vgg8": ["block0.3.weight"],
    "mobilenetv1": ["model.14.weight"],
}


@pytest.mark.parametrize("name", sorted(REFERENCE_KEYS))
def test_reference_state_dict_names(name: str):
    info = model_info(name)
    sd = create_model(name, info.default_num_classes).state_dict()
    for key, shape in REFERENCE_KEYS[name].items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, key
    for key in ABSENT_KEYS.get(name, []):
        assert key not in sd


def test_conv1x1_classifier_weight_loads_into_linear(tmp_path):
    model = create_model("mobilenetv2_tinyimagenet", 200)
    sd = model.state_dict()
    sd["conv2.weight"] = sd["conv2.weight"][:, :, None, None].clone()  # reference layout
    torch.save({"model": sd}, tmp_path / "ti_mv2.pth")
    other = create_model("mobilenetv2_tinyimagenet", 200)
    load_weights(other, tmp_path / "ti_mv2.pth", verbose=False)
    torch.testing.assert_close(other.conv2.weight, model.conv2.weight, rtol=0, atol=0)


def test_mobilenetv1_module_layout():
    sd = create_model("mobilenetv1", 1000).state_dict()
    blocks = {k.split(".")[1] for k in sd if k.startswith("model.")}
    assert blocks == {str(i) for i in range(14)}


def test_torchvision_resnet_keys_and_weights_match_torchvision(tmp_path):
    import torchvision

    tv = torchvision.models.resnet18(weights=None).eval()
    ours = create_model("resnet18", 1000).eval()
    assert list(ours.state_dict()) == list(tv.state_dict())
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(tv.state_dict(), path)  # a torchvision weight file is a plain state_dict
    load_weights(ours, path, verbose=False)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(ours(x), tv(x), rtol=0, atol=0)
    assert isinstance(ours, torchvision.models.ResNet)


def test_field_aliases_resolve_case_sensitively():
    from topkd.models.cifar_resnetv2 import CifarResNetV2

    assert isinstance(create_model("ResNet50", 100), CifarResNetV2)
    assert isinstance(create_model("ResNet18", 100), CifarResNetV2)
    assert not isinstance(create_model("resnet18", 10), CifarResNetV2)  # torchvision
    assert count_parameters(create_model("MobileNetV2", 100)) == PINNED["mobilenetv2"]
    assert count_parameters(create_model("mobile_half", 100)) == PINNED["mobilenetv2"]
    assert count_parameters(create_model("ShuffleV1", 100)) == PINNED["shufflev1"]
    assert count_parameters(create_model("vgg13_bn", 100)) == PINNED["vgg13"]
    assert model_info("vgg13_bn").name == "vgg13"
    with pytest.raises(ValueError, match="Did you mean"):
        create_model("resnet33", 10)


@pytest.mark.parametrize(
    "name",
    ["resnet8x4", "resnet20", "wrn_16_2", "vgg8", "mobilenetv2", "shufflev1", "resnet18_cifar"],
)
def test_in_channels_and_28px_inputs(name: str):
    model = create_model(name, 10, in_channels=1).eval()
    with torch.inference_mode():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_fmnist_models_info():
    for name in ("fmnist_cnn_teacher", "fmnist_cnn_student"):
        info = model_info(name)
        assert info.family == "fmnist" and info.input_size == (1, 28, 28)
        assert info.default_num_classes == 10
    assert model_info("resnet8x4").num_params() == PINNED["resnet8x4"]
    assert model_info("resnet8x4").num_params(num_classes=10) == PINNED["resnet8x4"] - 90 * 257
    for name in ("fmnist_pairs_cnn_teacher", "fmnist_pairs_cnn_student"):
        info = model_info(name)
        assert info.input_size == (1, 28, 56) and info.default_num_classes == 100


@pytest.mark.parametrize("name", ["fmnist_pairs_cnn_student", "fmnist_pairs_cnn_teacher"])
def test_pairs_models_pool_each_half_and_tell_the_order(name: str):
    torch.manual_seed(0)
    model = create_model(name, 100).eval()
    x = torch.randn(3, 1, 28, 56)
    swapped = torch.cat([x[..., 28:], x[..., :28]], -1)
    with torch.inference_mode():
        fmap = model.features(x)  # (B, C, 7, 14): left / right halves are columns 0-6 / 7-13
        c = fmap.shape[1]
        cells = torch.stack([fmap[..., :7].mean((-2, -1)), fmap[..., 7:].mean((-2, -1))], -1)
        torch.testing.assert_close(model.forward_features(x), cells.flatten(1))
        assert model.feature_dim == 2 * c
        # (a, b) and (b, a) are different classes: the model is not symmetric in the halves
        assert not torch.allclose(model(x), model(swapped))
        # the same layers with a global pool cannot tell them apart (up to padding effects)
        square = create_model(name.replace("pairs_", ""), 100).eval()
        assert square.feature_dim == c


@pytest.mark.parametrize("name", ["fmnist_cnn_teacher", "fmnist_pairs_cnn_student"])
def test_fmnist_bn_before_relu_shapes_preact_feats(name):
    """OFD's margins: the BatchNorms whose outputs are preact_feats[1:] (before the ReLU)."""
    from topkd.models.bn_before_relu import bn_before_relu
    from topkd.models.features import FeatureTaps

    torch.manual_seed(0)
    model = create_model(name, model_info(name).default_num_classes).eval()
    bns = bn_before_relu(model)
    outs: list[torch.Tensor] = []
    handles = [bn.register_forward_hook(lambda m, i, o: outs.append(o.clone())) for bn in bns]
    with torch.no_grad(), FeatureTaps(model, ["preact_feats"]) as taps:
        _, f = taps(_input(name))
    for h in handles:
        h.remove()
    assert len(bns) == len(f["preact_feats"]) - 1 == 2
    for o, p in zip(outs, f["preact_feats"][1:]):
        assert torch.equal(o, p)


def test_pairs_teacher_feature_taps_on_28x56():
    from topkd.models.features import feature_shapes

    model = create_model("fmnist_pairs_cnn_teacher", 100)
    shapes = feature_shapes(model, (1, 28, 56), ["feats", "preact_feats", "pooled_feat"])
    assert shapes["feats"] == [(32, 28, 56), (64, 14, 28), (256, 7, 14)]
    assert shapes["preact_feats"] == shapes["feats"]
    assert shapes["pooled_feat"] == (512,)  # two cells of 256 channels: the classifier's input


def test_timm_deit_tiny_cifar():
    model = create_model("timm:deit_tiny_patch16_224", 100, img_size=32, patch_size=4).eval()
    assert model.feature_dim == 192
    assert count_parameters(model) == 5_380_132
    assert "patch_embed.proj.weight" in model.state_dict()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        logits, feats = model(x), model.forward_features(x)
        assert logits.shape == (2, 100) and feats.shape == (2, 192)
        torch.testing.assert_close(model.get_classifier()(feats), logits)
        assert model.forward_tokens(x).shape == (2, 65, 192)  # cls + 8x8 patches
    with pytest.raises(ValueError, match="never downloads"):
        create_model("timm:deit_tiny_patch16_224", 10, pretrained=True)
    assert model_info("timm:anything").family == "timm"


def test_import_is_lazy():
    import subprocess
    import sys

    code = "import sys, topkd.models; print('timm' in sys.modules, 'torchvision' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_register_custom_model(monkeypatch):
    monkeypatch.setattr(factory, "MODELS", factory.Registry("model"))
    monkeypatch.setattr(factory, "_INFO", {})
    monkeypatch.setattr(factory, "_CANONICAL", {})

    class TinyMLP(ClassifierModel):
        def __init__(self, num_classes: int) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU())
            self.feature_dim = 32
            self.head = nn.Linear(32, num_classes)

        def forward_features(self, x):
            return self.body(x)

        def get_classifier(self):
            return self.head

    @register_model("tiny_mlp", family="fmnist", input_size=(1, 28, 28), aliases=("mlp",))
    def tiny_mlp(num_classes: int = 10):
        return TinyMLP(num_classes)

    @register_model("broken")
    def broken(num_classes: int = 10):
        return nn.Linear(4, num_classes)

    assert create_model("MLP", 10)(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert list_models() == ["broken", "tiny_mlp"]
    with pytest.raises(TypeError, match="model contract"):
        create_model("broken", 10)


def _mdistiller_vgg_logits(m, x: torch.Tensor) -> torch.Tensor:
    """mdistiller/models/cifar/vgg.py ``VGG.forward`` transcribed line by line (commit
    e8c5bb331e78c9d79a8894ca233caae78531cf7f), on our module names (identical to its own)."""
    import torch.nn.functional as F

    h = x.shape[2]
    x = F.relu(m.block0(x))
    x = m.pool0(x)
    x = F.relu(m.block1(x))
    x = m.pool1(x)
    x = F.relu(m.block2(x))
    x = m.pool2(x)
    x = F.relu(m.block3(x))
    if h == 64:
        x = m.pool3(x)
    x = F.relu(m.block4(x))
    x = nn.AdaptiveAvgPool2d((1, 1))(x)
    return m.classifier(x.reshape(x.size(0), -1))


@pytest.mark.parametrize("side", [28, 32, 64, 96])
def test_vgg_fourth_pool_only_at_64px_as_mdistiller(side: int):
    """The fourth max-pool runs only at exactly 64 px (mdistiller): at 96 px (STL-10) the last
    block stays 12x12 and the logits equal the reference's, not a pooled-again variant."""
    torch.manual_seed(0)
    m = create_model("vgg8", 10).eval()
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        torch.testing.assert_close(m(x), _mdistiller_vgg_logits(m, x), rtol=0, atol=0)


def test_wrn_updates_each_batchnorm_once_per_step():
    """Documented difference (docs/models.md): mdistiller's WRN forward runs three BatchNorms a
    second time for its feature dict, so their running stats get two EMA updates per step; ours
    get one, like every other BatchNorm."""
    torch.manual_seed(0)
    m = create_model("wrn_16_1", 10).train()
    bn = m.block2.layer[0].bn1
    seen = []
    bn.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach()))
    m(torch.randn(4, 3, 32, 32))
    counts = {n: int(b.num_batches_tracked) for n, b in m.named_modules()
              if isinstance(b, nn.BatchNorm2d)}
    assert set(counts.values()) == {1}, counts
    (inp,) = seen
    # one momentum-0.1 update from the initial running mean 0 (mdistiller: two updates)
    torch.testing.assert_close(bn.running_mean, 0.1 * inp.mean(dim=(0, 2, 3)))
    assert "twice per step" in (Path(__file__).parents[1] / "docs/models.md").read_text()
