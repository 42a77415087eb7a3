"""Feature taps: bitwise equal to mdistiller's (logits, feats), one forward, autograd, errors.

The reference: megvii-research/mdistiller at commit a08d46f10d6102bd6e3f258ca5ac880b020ea259,
``mdistiller/models/cifar/{resnet,resnetv2,wrn,vgg,mobilenetv2,ShuffleNetv1,ShuffleNetv2,
mv2_tinyimagenet}.py`` and ``mdistiller/models/imagenet/{resnet,mobilenetv1}.py``. Each ``md_*``
function below transcribes, line by line, the ``forward`` of one of those files (and of its
blocks, whose ``is_last`` variant returns ``(out, preact)``), calling the submodules of OUR model
(same weights, same state_dict keys), so that it computes exactly what mdistiller's model
would return for our weights.
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from topkd.models import (
    TAP_KINDS,
    ClassifierModel,
    FeatureTaps,
    Tap,
    TapPoint,
    create_model,
    feature_shapes,
    list_models,
    model_info,
)
from topkd.models.features import unwrap_model
from topkd.models.shufflenet import ShuffleV2Block

# ----------------------------------------------------------------------------------------------
# mdistiller transcriptions (forward passes only), run on our module objects.


def md_layer(layer, x, block_fn):
    """``nn.Sequential`` of blocks built with ``is_last=(i == blocks - 1)``."""
    for b in layer[:-1]:
        x = block_fn(b, x, False)
    return block_fn(layer[-1], x, True)


def md_resnet_basicblock(b, x, is_last):  # cifar/resnet.py BasicBlock.forward
    residual = x

    out = b.conv1(x)
    out = b.bn1(out)
    out = b.relu(out)

    out = b.conv2(out)
    out = b.bn2(out)

    if b.downsample is not None:
        residual = b.downsample(x)

    out += residual
    preact = out
    out = F.relu(out)
    if is_last:
        return out, preact
    else:
        return out


def md_resnet(m, x):  # cifar/resnet.py ResNet.forward
    x = m.conv1(x)
    x = m.bn1(x)
    x = m.relu(x)  # 32x32
    f0 = x

    x, f1_pre = md_layer(m.layer1, x, md_resnet_basicblock)  # 32x32
    f1 = x
    x, f2_pre = md_layer(m.layer2, x, md_resnet_basicblock)  # 16x16
    f2 = x
    x, f3_pre = md_layer(m.layer3, x, md_resnet_basicblock)  # 8x8
    f3 = x

    x = nn.AvgPool2d(8)(x)  # self.avgpool
    avg = x.reshape(x.size(0), -1)
    out = m.fc(avg)

    feats = {}
    feats["feats"] = [f0, f1, f2, f3]
    feats["preact_feats"] = [f0, f1_pre, f2_pre, f3_pre]
    feats["pooled_feat"] = avg

    return out, feats


def md_resnetv2_basicblock(b, x, is_last):  # cifar/resnetv2.py BasicBlock.forward
    out = F.relu(b.bn1(b.conv1(x)))
    out = b.bn2(b.conv2(out))
    out += b.shortcut(x)
    preact = out
    out = F.relu(out)
    if is_last:
        return out, preact
    else:
        return out


def md_resnetv2_bottleneck(b, x, is_last):  # cifar/resnetv2.py Bottleneck.forward
    out = F.relu(b.bn1(b.conv1(x)))
    out = F.relu(b.bn2(b.conv2(out)))
    out = b.bn3(b.conv3(out))
    out += b.shortcut(x)
    preact = out
    out = F.relu(out)
    if is_last:
        return out, preact
    else:
        return out


def md_resnetv2(m, x):  # cifar/resnetv2.py ResNet.forward
    blk = md_resnetv2_bottleneck if hasattr(m.layer1[0], "conv3") else md_resnetv2_basicblock
    out = F.relu(m.bn1(m.conv1(x)))
    f0 = out
    out, f1_pre = md_layer(m.layer1, out, blk)
    f1 = out
    out, f2_pre = md_layer(m.layer2, out, blk)
    f2 = out
    out, f3_pre = md_layer(m.layer3, out, blk)
    f3 = out
    out, f4_pre = md_layer(m.layer4, out, blk)
    f4 = out
    out = nn.AdaptiveAvgPool2d((1, 1))(out)  # self.avgpool
    avg = out.reshape(out.size(0), -1)
    out = m.linear(avg)

    feats = {}
    feats["feats"] = [f0, f1, f2, f3, f4]
    feats["preact_feats"] = [f0, f1_pre, f2_pre, f3_pre, f4_pre]
    feats["pooled_feat"] = avg

    return out, feats


def md_wrn_basicblock(b, x):  # cifar/wrn.py BasicBlock.forward (equalInOut = our equal_in_out)
    if not b.equal_in_out:
        x = b.relu1(b.bn1(x))
    else:
        out = b.relu1(b.bn1(x))
    out = b.relu2(b.bn2(b.conv1(out if b.equal_in_out else x)))
    if b.drop_rate > 0:
        out = F.dropout(out, p=b.drop_rate, training=b.training)
    out = b.conv2(out)
    return torch.add(x if b.equal_in_out else b.convShortcut(x), out)


def md_wrn_networkblock(nb, x):  # cifar/wrn.py NetworkBlock.forward: self.layer(x)
    for b in nb.layer:
        x = md_wrn_basicblock(b, x)
    return x


def md_wrn(m, x):  # cifar/wrn.py WideResNet.forward
    out = m.conv1(x)
    f0 = out
    out = md_wrn_networkblock(m.block1, out)
    f1 = out
    out = md_wrn_networkblock(m.block2, out)
    f2 = out
    out = md_wrn_networkblock(m.block3, out)
    f3 = out
    out = m.relu(m.bn1(out))
    out = F.avg_pool2d(out, 8)
    out = out.reshape(-1, m.fc.in_features)  # self.nChannels
    f4 = out
    out = m.fc(out)

    f1_pre = m.block2.layer[0].bn1(f1)
    f2_pre = m.block3.layer[0].bn1(f2)
    f3_pre = m.bn1(f3)

    feats = {}
    feats["feats"] = [f0, f1, f2, f3]
    feats["preact_feats"] = [f0, f1_pre, f2_pre, f3_pre]
    feats["pooled_feat"] = f4

    return out, feats


def md_vgg(m, x):  # cifar/vgg.py VGG.forward
    h = x.shape[2]
    x = F.relu(m.block0(x))
    f0 = x
    x = m.pool0(x)
    x = m.block1(x)
    f1_pre = x
    x = F.relu(x)
    f1 = x
    x = m.pool1(x)
    x = m.block2(x)
    f2_pre = x
    x = F.relu(x)
    f2 = x
    x = m.pool2(x)
    x = m.block3(x)
    f3_pre = x
    x = F.relu(x)
    f3 = x
    if h == 64:
        x = m.pool3(x)
    x = m.block4(x)
    f4_pre = x
    x = F.relu(x)
    f4 = x
    x = nn.AdaptiveAvgPool2d((1, 1))(x)  # self.pool4
    x = x.reshape(x.size(0), -1)
    f5 = x
    x = m.classifier(x)

    feats = {}
    feats["feats"] = [f0, f1, f2, f3, f4]
    feats["preact_feats"] = [f0, f1_pre, f2_pre, f3_pre, f4_pre]
    feats["pooled_feat"] = f5

    return x, feats


def md_inverted_residual(b, x):  # cifar/mobilenetv2.py InvertedResidual.forward
    t = x
    if b.use_res_connect:
        return t + b.conv(x)
    else:
        return b.conv(x)


def md_mv2_blocks(seq, x):
    for b in seq:
        x = md_inverted_residual(b, x)
    return x


def md_mobilenetv2(m, x):  # cifar/mobilenetv2.py MobileNetV2.forward (input_size=32)
    out = m.conv1(x)
    f0 = out
    out = md_mv2_blocks(m.blocks[0], out)
    out = md_mv2_blocks(m.blocks[1], out)
    f1 = out
    out = md_mv2_blocks(m.blocks[2], out)
    f2 = out
    out = md_mv2_blocks(m.blocks[3], out)
    out = md_mv2_blocks(m.blocks[4], out)
    f3 = out
    out = md_mv2_blocks(m.blocks[5], out)
    out = md_mv2_blocks(m.blocks[6], out)
    f4 = out
    out = m.conv2(out)

    out = nn.AvgPool2d(32 // (32 // 2), ceil_mode=True)(out)  # self.avgpool, H = input_size // 16
    out = out.reshape(out.size(0), -1)
    avg = out
    out = m.classifier(out)

    feats = {}
    feats["feats"] = [f0, f1, f2, f3, f4]
    feats["pooled_feat"] = avg

    return out, feats


def md_shuffle(x, g):  # ShuffleNetv1.py / ShuffleNetv2.py ShuffleBlock.forward
    N, C, H, W = x.size()
    return x.reshape(N, g, C // g, H, W).permute(0, 2, 1, 3, 4).reshape(N, C, H, W)


def md_shufflev1_bottleneck(b, x, is_last):  # cifar/ShuffleNetv1.py Bottleneck.forward
    out = F.relu(b.bn1(b.conv1(x)))
    out = md_shuffle(out, b.shuffle1.groups)
    out = F.relu(b.bn2(b.conv2(out)))
    out = b.bn3(b.conv3(out))
    res = b.shortcut(x)
    preact = torch.cat([out, res], 1) if b.stride == 2 else out + res
    out = F.relu(preact)
    if is_last:
        return out, preact
    else:
        return out


def md_shufflev1(m, x):  # cifar/ShuffleNetv1.py ShuffleNet.forward
    out = F.relu(m.bn1(m.conv1(x)))
    f0 = out
    out, f1_pre = md_layer(m.layer1, out, md_shufflev1_bottleneck)
    f1 = out
    out, f2_pre = md_layer(m.layer2, out, md_shufflev1_bottleneck)
    f2 = out
    out, f3_pre = md_layer(m.layer3, out, md_shufflev1_bottleneck)
    f3 = out
    out = F.avg_pool2d(out, 4)
    out = out.reshape(out.size(0), -1)
    f4 = out
    out = m.linear(out)

    feats = {}
    feats["feats"] = [f0, f1, f2, f3]
    feats["preact_feats"] = [f0, f1_pre, f2_pre, f3_pre]
    feats["pooled_feat"] = f4

    return out, feats


def md_shufflev2_basicblock(b, x, is_last):  # cifar/ShuffleNetv2.py BasicBlock.forward
    c = int(x.size(1) * b.split_ratio)  # SplitBlock.forward
    x1, x2 = x[:, :c, :, :], x[:, c:, :, :]
    out = F.relu(b.bn1(b.conv1(x2)))
    out = b.bn2(b.conv2(out))
    preact = b.bn3(b.conv3(out))
    out = F.relu(preact)
    # out = F.relu(self.bn3(self.conv3(out)))
    preact = torch.cat([x1, preact], 1)
    out = torch.cat([x1, out], 1)
    out = md_shuffle(out, 2)
    if is_last:
        return out, preact
    else:
        return out


def md_shufflev2_downblock(b, x):  # cifar/ShuffleNetv2.py DownBlock.forward
    # left
    out1 = b.bn1(b.conv1(x))
    out1 = F.relu(b.bn2(b.conv2(out1)))
    # right
    out2 = F.relu(b.bn3(b.conv3(x)))
    out2 = b.bn4(b.conv4(out2))
    out2 = F.relu(b.bn5(b.conv5(out2)))
    # concat
    out = torch.cat([out1, out2], 1)
    out = md_shuffle(out, 2)
    return out


def md_shufflev2_layer(layer, x):  # [DownBlock] + [BasicBlock(is_last=(i == n - 1))]
    x = md_shufflev2_downblock(layer[0], x)
    return md_layer(layer[1:], x, md_shufflev2_basicblock)


def md_shufflev2(m, x):  # cifar/ShuffleNetv2.py ShuffleNetV2.forward
    out = F.relu(m.bn1(m.conv1(x)))
    # out = F.max_pool2d(out, 3, stride=2, padding=1)
    f0 = out
    out, f1_pre = md_shufflev2_layer(m.layer1, out)
    f1 = out
    out, f2_pre = md_shufflev2_layer(m.layer2, out)
    f2 = out
    out, f3_pre = md_shufflev2_layer(m.layer3, out)
    f3 = out
    out = F.relu(m.bn2(m.conv2(out)))
    out = F.avg_pool2d(out, 4)
    out = out.reshape(out.size(0), -1)
    f4 = out
    out = m.linear(out)

    feats = {}
    feats["feats"] = [f0, f1, f2, f3]
    feats["preact_feats"] = [f0, f1_pre, f2_pre, f3_pre]
    feats["pooled_feat"] = f4

    return out, feats


def md_linear_bottleneck(b, x):  # cifar/mv2_tinyimagenet.py LinearBottleNeck.forward
    residual = b.residual(x)
    stride = b.residual[3].stride[0]  # the reference's self.stride, in_channels, out_channels
    cin, cout = b.residual[0].in_channels, b.residual[6].out_channels
    if stride == 1 and cin == cout:
        residual += x
    return residual


def md_mv2_stage(stage, x):
    for b in stage:
        x = md_linear_bottleneck(b, x)
    return x


def md_mv2_tinyimagenet(m, x):  # cifar/mv2_tinyimagenet.py MobileNetV2.forward
    x = m.pre(x)
    f0 = x
    x = md_linear_bottleneck(m.stage1, x)
    x = md_mv2_stage(m.stage2, x)
    f1 = x
    x = md_mv2_stage(m.stage3, x)
    f2 = x
    x = md_mv2_stage(m.stage4, x)
    f3 = x
    x = md_mv2_stage(m.stage5, x)
    x = md_mv2_stage(m.stage6, x)
    x = md_linear_bottleneck(m.stage7, x)
    x = m.conv1(x)
    f4 = x
    x = F.adaptive_avg_pool2d(x, 1)
    avg = x
    x = F.conv2d(x, m.conv2.weight[:, :, None, None], m.conv2.bias)  # self.conv2: 1x1 conv
    x = x.view(x.size(0), -1)
    feats = {}
    feats["feats"] = [f0, f1, f2, f3, f4]
    feats["pooled_feat"] = avg.flatten(1)  # (B, 1280, 1, 1) there; ours is flat (same values)

    return x, feats


def md_imagenet_basicblock(b, x):  # imagenet/resnet.py BasicBlock.forward
    x = F.relu(x)
    residual = x

    out = b.conv1(x)
    out = b.bn1(out)
    out = b.relu(out)

    out = b.conv2(out)
    out = b.bn2(out)

    if b.downsample is not None:
        residual = b.downsample(x)

    out += residual

    return out


def md_imagenet_bottleneck(b, x):  # imagenet/resnet.py Bottleneck.forward
    x = F.relu(x)
    residual = x

    out = b.conv1(x)
    out = b.bn1(out)
    out = b.relu(out)

    out = b.conv2(out)
    out = b.bn2(out)
    out = b.relu(out)

    out = b.conv3(out)
    out = b.bn3(out)

    if b.downsample is not None:
        residual = b.downsample(x)

    out += residual

    return out


def md_imagenet_layer(layer, x):
    blk = md_imagenet_bottleneck if hasattr(layer[0], "conv3") else md_imagenet_basicblock
    for b in layer:
        x = blk(b, x)
    return x


def md_imagenet_resnet(m, x):  # imagenet/resnet.py ResNet.forward
    x = m.conv1(x)
    x = m.bn1(x)
    stem = x
    x = m.relu(x)  # in place: ``stem`` is overwritten with its ReLU (a reference quirk)
    x = m.maxpool(x)

    feat1 = md_imagenet_layer(m.layer1, x)
    feat2 = md_imagenet_layer(m.layer2, feat1)
    feat3 = md_imagenet_layer(m.layer3, feat2)
    feat4 = md_imagenet_layer(m.layer4, feat3)

    x = nn.AvgPool2d(7, stride=1)(F.relu(feat4))  # self.avgpool
    x = x.view(x.size(0), -1)
    avg = x
    out = m.fc(x)

    feats = {}
    feats["pooled_feat"] = avg
    feats["feats"] = [
        F.relu(stem),
        F.relu(feat1),
        F.relu(feat2),
        F.relu(feat3),
        F.relu(feat4),
    ]
    feats["preact_feats"] = [stem, feat1, feat2, feat3, feat4]

    return out, feats


def md_mobilenetv1(m, x):  # imagenet/mobilenetv1.py MobileNetV1.forward
    model = m.model
    feat1 = model[3][:-1](model[0:3](x))
    feat2 = model[5][:-1](model[4:5](F.relu(feat1)))
    feat3 = model[11][:-1](model[6:11](F.relu(feat2)))
    feat4 = model[13][:-1](model[12:13](F.relu(feat3)))
    feat5 = nn.AvgPool2d(7)(F.relu(feat4))  # self.model[14]
    avg = feat5.reshape(-1, 1024)
    out = m.fc(avg)

    feats = {}
    feats["pooled_feat"] = avg
    feats["feats"] = [F.relu(feat1), F.relu(feat2), F.relu(feat3), F.relu(feat4)]
    feats["preact_feats"] = [feat1, feat2, feat3, feat4]
    return out, feats


# name: (transcription, input side, outputs compared with a tolerance instead of bitwise)
# mdistiller's ImageNet ResNet pools with AvgPool2d(7, stride=1), torchvision (ours) with
# AdaptiveAvgPool2d(1): the same mean summed in another order (~1 ulp). mv2_tinyimagenet
# classifies with a 1x1 convolution there, a Linear here. Neither is a tap of the feature maps.
CASES = {
    "resnet8": (md_resnet, 32, ()),
    "resnet20": (md_resnet, 32, ()),
    "resnet8x4": (md_resnet, 32, ()),
    "resnet32x4": (md_resnet, 32, ()),
    "resnet18_cifar": (md_resnetv2, 32, ()),
    "resnet50_cifar": (md_resnetv2, 32, ()),
    "wrn_16_1": (md_wrn, 32, ()),
    "wrn_16_2": (md_wrn, 32, ()),
    "wrn_40_2": (md_wrn, 32, ()),
    "vgg8": (md_vgg, 32, ()),
    "vgg13": (md_vgg, 32, ()),
    "mobilenetv2": (md_mobilenetv2, 32, ()),
    "shufflev1": (md_shufflev1, 32, ()),
    "shufflev2": (md_shufflev2, 32, ()),
    "mobilenetv2_tinyimagenet": (md_mv2_tinyimagenet, 64, ("logits",)),
    "resnet18": (md_imagenet_resnet, 224, ("logits", "pooled_feat")),
    "resnet50": (md_imagenet_resnet, 224, ("logits", "pooled_feat")),
    "mobilenetv1": (md_mobilenetv1, 224, ()),
}


def _randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm affine parameters and running statistics (eval mode then matters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(1 + 0.2 * torch.randn(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))


def _model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model(name, model_info(name).default_num_classes)
    _randomize_bn(model, seed)
    return model


def _assert_same(ours, ref, tolerant=False, what=""):
    if tolerant:  # float rounding only: within 1e-6 of the tensor's scale
        assert ours.shape == ref.shape, what
        assert (ours - ref).abs().max() <= 1e-6 * ref.abs().max(), what
    else:
        assert ours.shape == ref.shape, what
        assert torch.equal(ours, ref), f"{what}: max |diff| {(ours - ref).abs().max():.3g}"


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_taps_equal_mdistiller_bitwise(name: str, mode: str):
    md_forward, side, tolerant = CASES[name]
    model = _model(name)
    ref_model = copy.deepcopy(model)  # same weights; the reference forward runs on this copy
    model.train(mode == "train")
    ref_model.train(mode == "train")
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))

    with torch.no_grad():
        ref_logits, ref = md_forward(ref_model, x.clone())
        kinds = tuple(ref)  # exactly the kinds mdistiller returns for this model
        with FeatureTaps(model, kinds) as taps:
            logits, ours = taps(x.clone())

    assert set(model.feature_taps()) == set(ref)  # declares what mdistiller has, nothing more
    assert set(ours) == set(ref)
    _assert_same(logits, ref_logits, "logits" in tolerant, "logits")
    _assert_same(ours["pooled_feat"], ref["pooled_feat"], "pooled_feat" in tolerant, "pooled")
    for kind in ("feats", "preact_feats"):
        if kind in ref:
            assert len(ours[kind]) == len(ref[kind]), kind
            for i, (a, b) in enumerate(zip(ours[kind], ref[kind])):
                _assert_same(a, b, what=f"{kind}[{i}]")


def test_imagenet_pooling_difference_is_rounding_only():
    # The one non-bitwise tap above: torchvision's adaptive pool vs mdistiller's AvgPool2d(7).
    x = torch.randn(2, 2048, 7, 7).relu()
    a = nn.AdaptiveAvgPool2d(1)(x).flatten(1)
    b = nn.AvgPool2d(7, stride=1)(x).flatten(1)
    assert (a - b).abs().max() <= 4 * torch.finfo(torch.float32).eps * a.abs().max()


def test_wrn_bn_updated_once_per_step_unlike_mdistiller():
    # mdistiller's WRN forward applies three BatchNorms a second time to build preact_feats; in
    # train mode that updates their running statistics twice per step. Our taps read the value
    # of the forward's own (single) BatchNorm call.
    model = _model("wrn_16_2").train()
    ref_model = copy.deepcopy(model)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad(), FeatureTaps(model, ["preact_feats"]) as taps:
        taps(x)
        md_wrn(ref_model, x)
    for mod in ("block2.layer.0.bn1", "block3.layer.0.bn1", "bn1"):
        assert model.get_submodule(mod).num_batches_tracked == 1
        assert ref_model.get_submodule(mod).num_batches_tracked == 2
    assert model.get_submodule("block1.layer.0.bn1").num_batches_tracked == 1


def test_torchvision_stem_preact_option():
    # mdistiller's preact_feats[0] is post-ReLU (aliasing, see md_imagenet_resnet); the option
    # stem_preact_after_relu=False gives the BatchNorm output before the ReLU instead.
    model = _model("resnet18").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _, f = FeatureTaps(model, ["feats", "preact_feats"])(x)
        assert torch.equal(f["preact_feats"][0], f["feats"][0])
        model.stem_preact_after_relu = False
        with FeatureTaps(model, ["feats", "preact_feats"]) as taps:
            _, g = taps(x)
        bn = model.bn1(model.conv1(x))
        assert torch.equal(g["preact_feats"][0], bn) and (bn < 0).any()
        assert torch.equal(g["feats"][0], F.relu(bn))
        for a, b in zip(f["preact_feats"][1:], g["preact_feats"][1:]):
            assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# Behaviour of FeatureTaps on the whole zoo.

SMALL = {"imagenet": 64, "tiny_imagenet": 32}


def _input(name: str, batch: int = 2) -> torch.Tensor:
    info = model_info(name)
    c, h, w = info.input_size
    s = SMALL.get(info.family)
    return torch.randn(batch, c, s or h, s or w, generator=torch.Generator().manual_seed(2))


ZOO = sorted(n for n in list_models() if not n.startswith("test_"))


class _OpCounter(TorchDispatchMode):
    """Counts the aten operators a forward dispatches."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ZOO)
def test_taps_add_no_forward_and_no_compute(name: str):
    # With every kind tapped, the same aten operators as the bare model plus only the declared
    # copies (clone=True taps) and ShuffleNetV2's preact concatenations; the same logits.
    model = _model(name).train()
    x = _input(name)
    declared = [k for k in TAP_KINDS if k in model.feature_taps()]
    torch.manual_seed(3)  # the same dropout masks in every run (fmnist_cnn_teacher)
    with _OpCounter() as bare_ops:
        bare = model(x)
    torch.manual_seed(3)
    with FeatureTaps(model, declared) as taps, _OpCounter() as all_ops:
        logits, f = taps(x)
        n_cat = sum(isinstance(m, ShuffleV2Block) and m.preact.active for m in model.modules())
    n_clone = sum(
        t.clone for k in declared for t in _taps_of(model.feature_taps()[k]) if isinstance(t, Tap)
    )
    assert all_ops.ops - bare_ops.ops == Counter({"clone": n_clone, "cat": n_cat})
    assert not bare_ops.ops - all_ops.ops
    assert torch.equal(logits, bare)
    assert list(f) == declared
    torch.manual_seed(3)
    with torch.no_grad():  # pooled_feat is the contract's features (train-mode BN: same batch)
        assert torch.equal(f["pooled_feat"], model.forward_features(x))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def _taps_of(entry):
    return [entry] if isinstance(entry, (Tap, str)) else list(entry)


def test_only_requested_taps_are_hooked():
    model = create_model("resnet8x4", 10)

    def hooked():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    x = torch.randn(2, 3, 32, 32)
    taps = FeatureTaps(model, ())
    assert hooked() == 0  # the bare model: nothing registered at all
    with _OpCounter() as none_ops:
        logits, f = taps(x)
    with _OpCounter() as bare_ops:
        bare = model(x)
    assert f == {} and torch.equal(logits, bare) and none_ops.ops == bare_ops.ops
    with FeatureTaps(model, ["pooled_feat"]):
        assert hooked() == 1
    with FeatureTaps(model, ["feats", "preact_feats"]):
        assert hooked() == 7  # relu (shared by feats[0] and preact[0]), 3 stages, 3 preacts
    assert hooked() == 0
    # ShuffleNetV2 builds its unshuffled preact concat only while it is tapped
    sv2 = create_model("shufflev2", 10)
    points = [m for m in sv2.modules() if isinstance(m, TapPoint)]
    assert points and not any(p.active for p in points)
    with FeatureTaps(sv2, ["preact_feats"]):
        assert sum(p.active for p in points) == 3


def test_result_structure_and_order():
    model = create_model("resnet8x4", 10).eval()
    x = torch.randn(2, 3, 32, 32)
    with FeatureTaps(model, ["pooled_feat", "feats", "feats"]) as taps:
        logits, f = taps(x)
    assert list(f) == ["pooled_feat", "feats"]  # duplicates dropped, order kept
    assert isinstance(f["feats"], list) and isinstance(f["pooled_feat"], torch.Tensor)
    assert [t.shape[1] for t in f["feats"]] == [32, 64, 128, 256]
    assert f["pooled_feat"].shape == (2, 256)
    # the same tap object is returned where mdistiller returns one tensor twice
    with FeatureTaps(model, ["feats", "preact_feats"]) as taps:
        _, f = taps(x)
    assert f["feats"][0] is f["preact_feats"][0]
    # a frozen teacher may run under inference_mode, copied taps included
    wrn = create_model("wrn_16_2", 10).eval()
    with FeatureTaps(wrn, ["preact_feats"]) as taps, torch.inference_mode():
        _, f = taps(x)
    with torch.no_grad():
        _, g = md_wrn(wrn, x)
    for a, b in zip(f["preact_feats"], g["preact_feats"]):
        assert torch.equal(a, b)


def test_calling_the_model_directly_records_nothing():
    model = create_model("resnet8", 10).eval()
    taps = FeatureTaps(model, ["feats"])
    model(torch.randn(2, 3, 32, 32))
    assert taps._values == {} and taps._counts == {}
    _, f = taps(torch.randn(2, 3, 32, 32))
    assert len(f["feats"]) == 4
    assert taps._values == {}  # the call returns its tensors and keeps no reference
    taps.remove()


@pytest.mark.parametrize("name", ["resnet8x4", "wrn_16_2", "shufflev2", "mobilenetv1", "resnet18"])
def test_gradients_flow_from_taps_like_the_reference(name: str):
    # A loss on every tap gives the same parameter gradients as the same loss on the
    # reference transcription's tensors (this covers the copied taps, clone=True, too).
    md_forward, side, _ = CASES[name]
    model = _model(name).train()
    ref_model = copy.deepcopy(model)
    x = torch.randn(2, 3, side, side)
    kinds = list(TAP_KINDS)

    def loss(f):
        return sum(t.square().mean() for t in [*f["feats"], *f["preact_feats"], f["pooled_feat"]])

    with FeatureTaps(model, kinds) as taps:
        loss(taps(x)[1]).backward()
    loss(md_forward(ref_model, x)[1]).backward()
    ref_grads = dict(ref_model.named_parameters())
    n_grads = 0
    for pname, p in model.named_parameters():
        g_ref = ref_grads[pname].grad
        if g_ref is None:  # the classifier: after every tap
            assert p.grad is None, pname
            continue
        n_grads += 1
        torch.testing.assert_close(p.grad, g_ref, rtol=1e-4, atol=1e-6, msg=pname)
    assert n_grads == len(list(model.parameters())) - 2  # all but the classifier's weight, bias
    assert model.get_classifier().weight.grad is None


def test_gradient_flows_from_one_stage_to_earlier_parameters_only():
    model = create_model("resnet8x4", 10).train()
    with FeatureTaps(model, ["feats"]) as taps:
        _, f = taps(torch.randn(2, 3, 32, 32))
    f["feats"][2].pow(2).mean().backward()
    assert model.conv1.weight.grad.abs().sum() > 0
    assert model.layer2[0].conv1.weight.grad.abs().sum() > 0
    assert model.layer3[0].conv1.weight.grad is None and model.fc.weight.grad is None


# ----------------------------------------------------------------------------------------------
# feature_shapes


def test_feature_shapes_resnet8x4_hand_known():
    model = create_model("resnet8x4", 100)
    shapes = feature_shapes(model, (3, 32, 32), ["feats", "preact_feats", "pooled_feat"])
    expected = [(32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8)]
    assert shapes == {"feats": expected, "preact_feats": expected, "pooled_feat": (256,)}


@pytest.mark.parametrize(
    "name, size, channels, sides, dim",
    [
        ("wrn_40_2", 32, [16, 32, 64, 128], [32, 32, 16, 8], 128),
        ("vgg13", 32, [64, 128, 256, 512, 512], [32, 16, 8, 4, 4], 512),
        ("vgg13", 64, [64, 128, 256, 512, 512], [64, 32, 16, 8, 4], 512),  # 4th max-pool at 64
        ("mobilenetv2", 32, [16, 12, 16, 48, 160], [16, 16, 8, 4, 2], 1280),
        ("shufflev1", 32, [24, 240, 480, 960], [32, 16, 8, 4], 960),
        ("shufflev2", 32, [24, 116, 232, 464], [32, 16, 8, 4], 1024),
        ("resnet32x4", 32, [32, 64, 128, 256], [32, 32, 16, 8], 256),
        ("resnet50_cifar", 32, [64, 256, 512, 1024, 2048], [32, 32, 16, 8, 4], 2048),
        ("resnet50", 224, [64, 256, 512, 1024, 2048], [112, 56, 28, 14, 7], 2048),
        ("mobilenetv1", 224, [128, 256, 512, 1024], [56, 28, 14, 7], 1024),
        ("fmnist_cnn_teacher", 28, [32, 64, 256], [28, 14, 7], 256),
    ],
)
def test_feature_shapes_known_architectures(name, size, channels, sides, dim):
    model = create_model(name, model_info(name).default_num_classes)
    cin = model_info(name).input_size[0]
    shapes = feature_shapes(model, (cin, size, size), ["feats", "pooled_feat"])
    assert shapes["feats"] == [(c, s, s) for c, s in zip(channels, sides)]
    assert shapes["pooled_feat"] == (dim,)


def test_feature_shapes_restores_modes_and_state():
    model = create_model("resnet8", 10).train()
    model.layer2.eval()  # a mixed state must come back as it was
    modes = {n: m.training for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    feature_shapes(model, (3, 32, 32), ["feats"])
    assert {n: m.training for n, m in model.named_modules()} == modes
    for k, v in model.state_dict().items():  # eval mode: BatchNorm statistics untouched
        assert torch.equal(v, state[k]), k
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert feature_shapes(model.double(), (3, 32, 32), ["pooled_feat"]) == {"pooled_feat": (64,)}


# ----------------------------------------------------------------------------------------------
# Errors


def test_bad_kinds():
    model = create_model("resnet8", 10)
    with pytest.raises(ValueError, match=r"unknown feature kind 'feat'.*feats, preact_feats, "
                                         r"pooled_feat.*Did you mean 'feats'"):
        FeatureTaps(model, ["feat"])
    with pytest.raises(TypeError, match=r"not the string 'feats'"):
        FeatureTaps(model, "feats")
    with pytest.raises(ValueError, match="unknown feature kind"):
        feature_shapes(model, (3, 32, 32), ["pooled"])


def test_kind_without_tap_points_is_a_clear_error():
    for name in ("mobilenetv2", "mobilenetv2_tinyimagenet"):
        with pytest.raises(ValueError, match=r"has no tap points for 'preact_feats' "
                                             r"\(it declares: feats, pooled_feat\)"):
            FeatureTaps(create_model(name, 10), ["feats", "preact_feats"])


def test_custom_models():
    class Bare(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(TypeError, match="declares no feature taps"):
        FeatureTaps(Bare(), ["feats"])
    FeatureTaps(Bare(), ())  # no kinds: nothing is required of the model

    class Mlp(ClassifierModel):  # the base class gives pooled_feat (the classifier's input)
        def __init__(self):
            super().__init__()
            self.body, self.head, self.feature_dim = nn.Linear(4, 3), nn.Linear(3, 2), 3

        def forward_features(self, x):
            return self.body(x)

        def get_classifier(self):
            return self.head

    mlp = Mlp()
    x = torch.randn(5, 4)
    with FeatureTaps(mlp, ["pooled_feat"]) as taps:
        _, f = taps(x)
    assert torch.equal(f["pooled_feat"], mlp.body(x))
    with pytest.raises(ValueError, match=r"Mlp has no tap points for 'feats' \(it declares: "
                                         r"pooled_feat\)"):
        FeatureTaps(mlp, ["feats"])


class _Toy(nn.Module):
    """A model whose taps are declared by the test: misdeclarations must be caught."""

    def __init__(self, spec):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.bn = nn.BatchNorm2d(2)
        self.relu = nn.ReLU(inplace=True)
        self.spec = spec

    def forward(self, x):
        x = self.relu(self.bn(self.conv(x)))
        return self.relu(x - 0.5).mean((2, 3))  # ``relu`` runs twice

    def feature_taps(self):
        return self.spec


def test_misdeclared_taps_are_caught():
    x = torch.randn(2, 1, 4, 4)
    with pytest.raises(ValueError, match=r"names 'nope', which is not a submodule"):
        FeatureTaps(_Toy({"feats": ["nope"]}), ["feats"])
    with pytest.raises(ValueError, match="must be one Tap"):
        FeatureTaps(_Toy({"pooled_feat": ["conv"]}), ["pooled_feat"])
    with pytest.raises(RuntimeError, match=r"single tap declared for 'feats' \('conv'\) gave a "
                                           r"Tensor; feats needs a list of tensors"):
        FeatureTaps(_Toy({"feats": "conv"}), ["feats"])(x)
    with pytest.raises(RuntimeError, match=r"'relu' is produced 2 times per forward; its Tap must "
                                           r"say which call"):
        FeatureTaps(_Toy({"feats": ["relu"]}), ["feats"])(x)
    with pytest.raises(RuntimeError, match=r"'conv' was not reached.*called 1 time\(s\), tap "
                                           r"reads call 1"):
        FeatureTaps(_Toy({"feats": [Tap("conv", call=1)]}), ["feats"])(x)
    # the BatchNorm output is then overwritten by the in-place ReLU: without clone it is caught
    with pytest.raises(RuntimeError, match=r"feats\[0\] \('bn'\) was modified in place.*"
                                           r"clone=True"):
        FeatureTaps(_Toy({"feats": ["bn"]}), ["feats"])(x)
    toy = _Toy({"feats": [Tap("bn", clone=True), Tap("relu", call=1)]})
    _, f = FeatureTaps(toy, ["feats"])(x)
    bn = toy.bn(toy.conv(x))
    assert torch.equal(f["feats"][0], bn) and (bn < 0).any()
    assert torch.equal(f["feats"][1], F.relu(F.relu(bn) - 0.5))


def test_remove_and_context_manager():
    model = create_model("resnet8", 10)
    taps = FeatureTaps(model, ["feats", "pooled_feat"])
    taps.remove()
    taps.remove()  # idempotent
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    with pytest.raises(RuntimeError, match="removed"):
        taps(torch.randn(2, 3, 32, 32))
    with FeatureTaps(model, ["feats"]) as t:
        assert t(torch.randn(2, 3, 32, 32))[1]["feats"][3].shape == (2, 64, 8, 8)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_data_parallel_is_refused():
    with pytest.raises(TypeError, match="DataParallel"):
        FeatureTaps(nn.DataParallel(create_model("resnet8", 10)), ["feats"])


# ----------------------------------------------------------------------------------------------
# Wrappers: DDP and torch.compile (hooks on the raw module, forward through the wrapper)


def test_ddp_wrapper(tmp_path):
    import torch.distributed as dist

    model = _model("resnet8x4").train()
    ref_model = copy.deepcopy(model)
    x = torch.randn(4, 3, 32, 32)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        taps = FeatureTaps(ddp, ["feats", "preact_feats"])
        assert taps.raw_model is model and unwrap_model(ddp) is model
        logits, f = taps(x)
        (logits.logsumexp(1).mean() + f["feats"][2].square().mean()).backward()
    finally:
        dist.destroy_process_group()
    ref_logits, ref = md_resnet(ref_model, x)
    (ref_logits.logsumexp(1).mean() + ref["feats"][2].square().mean()).backward()
    assert torch.equal(logits, ref_logits)
    for a, b in zip(f["feats"] + f["preact_feats"], ref["feats"] + ref["preact_feats"]):
        assert torch.equal(a, b)
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=n)


def _compile_works() -> str | None:
    try:
        torch.compile(nn.Linear(2, 2), backend="aot_eager")(torch.randn(1, 2))
    except Exception as e:  # pragma: no cover - depends on the platform
        return f"torch.compile unavailable here: {type(e).__name__}: {e}"
    return None


@pytest.mark.skipif(_compile_works() is not None, reason=str(_compile_works()))
@pytest.mark.parametrize(
    "name, backend", [("wrn_16_1", "aot_eager"), ("shufflev2", "eager")]
)
def test_torch_compile_wrapper(name: str, backend: str):
    # ``eager`` runs dynamo's graph capture (hooks traced into the graph, their dict writes
    # replayed; ShuffleNetV2's TapPoints and TapPoint.active branch), ``aot_eager`` also
    # AOTAutograd's functionalisation of the in-place ops (WRN's copied taps), both without a
    # C++ toolchain.
    import torch._dynamo
    import torch._dynamo.testing

    model = _model(name).train()
    ref_model = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    kinds = list(TAP_KINDS)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=counter)
    taps = FeatureTaps(compiled, kinds)  # before the first compiled call
    logits, f = taps(x)
    f["feats"][-1].square().mean().backward()
    assert counter.frame_count == 1  # one graph: no graph break in the hooks
    ref_logits, ref = CASES[name][0](ref_model, x)
    ref["feats"][-1].square().mean().backward()
    assert torch.equal(logits, ref_logits)
    for kind in ("feats", "preact_feats"):
        for a, b in zip(f[kind], ref[kind]):
            assert torch.equal(a, b)
    assert torch.equal(f["pooled_feat"], ref["pooled_feat"])
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=n)
    compiled(x)  # called directly: the compiled hooks record nothing
    assert taps._values == {}
    torch._dynamo.reset()


@pytest.mark.skipif(_compile_works() is not None, reason=str(_compile_works()))
def test_taps_created_after_the_first_compiled_call_are_a_clear_error():
    import torch._dynamo

    torch._dynamo.reset()
    late = torch.compile(create_model("resnet8", 10), backend="eager")
    x = torch.randn(2, 3, 32, 32)
    late(x)  # traced without hooks; dynamo does not guard on hook dicts, so it never retraces
    with pytest.raises(RuntimeError, match="must get its FeatureTaps before its first call"):
        FeatureTaps(late, ["feats"])(x)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------
# timm


@pytest.mark.parametrize(
    "name, kw, n_feats",
    [
        ("timm:deit_tiny_patch16_224", {"img_size": 32, "patch_size": 4}, 12),
        ("timm:resnet18", {}, 5),
    ],
)
def test_timm_taps_are_forward_intermediates(name, kw, n_feats):
    torch.manual_seed(0)
    model = create_model(name, 10, **kw).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        bare = model(x)
        final, inter = model.forward_intermediates(x)
        with FeatureTaps(model, ["feats", "pooled_feat"]) as taps:
            logits, f = taps(x)
        pooled = model.forward_features(x)
    assert torch.equal(logits, bare)
    assert torch.equal(f["pooled_feat"], pooled)
    assert len(f["feats"]) == len(inter) == n_feats
    for a, b in zip(f["feats"], inter):
        assert a.dim() == 4 and torch.equal(a, b)
    if "deit" in name:
        assert f["feats"][0].shape == (2, 192, 8, 8)  # tokens without the class token, NCHW
    with pytest.raises(ValueError, match="no tap points for 'preact_feats'"):
        FeatureTaps(model, ["preact_feats"])
    assert "topkd_intermediates" not in "".join(model.state_dict())


def test_fmnist_taps():
    # Our own demo CNNs: each stage's last conv-BN-ReLU (before the max-pool), its BatchNorm
    # output before the in-place ReLU, and the pooled features before dropout.
    model = _model("fmnist_cnn_teacher").train()  # dropout 0.2 active
    x = torch.randn(4, 1, 28, 28)
    with FeatureTaps(model, TAP_KINDS) as taps:
        _, f = taps(x)
    layers = list(model.features)
    expected, h = [], x  # (BatchNorm output, block output) at each stage end
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.MaxPool2d):
            h = layer(h)
            continue
        pre = layer[1](layer[0](h))
        h = F.relu(pre)
        if i + 1 == len(layers) or isinstance(layers[i + 1], nn.MaxPool2d):
            expected.append((pre, h))
    assert [t.shape[1:] for t in f["feats"]] == [(32, 28, 28), (64, 14, 14), (256, 7, 7)]
    for (pre, post), a, b in zip(expected, f["preact_feats"], f["feats"], strict=True):
        assert torch.equal(a, pre) and torch.equal(b, post)
    assert torch.equal(f["pooled_feat"], F.avg_pool2d(h, 7).flatten(1))  # before dropout
