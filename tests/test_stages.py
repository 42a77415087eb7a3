"""topkd.models.stages: the zoo models cut into FCFD's stages.

Each family's expected stage outputs are a line-by-line transcription of FCFD's model
``forward`` (LiuDongyang6/FCFD @ 2aefb7bc74ed81185c13e3fee350d36a9db8d250,
``classification/models/*.py`` and ``classification/models/IN/*.py``) written on our modules
(the same layers under the same names); its ``forward_classifier`` is
``fc(adaptive_avg_pool2d(relu(f), 1))``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from topkd.models import create_model
from topkd.models.features import FeatureTaps
from topkd.models.stages import frozen_bn_stats, stage_split

torch.set_num_threads(1)


def _fcfd_shufflev1_block(blk, x):
    # FCFD ShuffleNetv1.Bottleneck.forward: the ReLU moved to the block's input, output preact.
    x = F.relu(x)
    out = F.relu(blk.bn1(blk.conv1(x)))
    out = blk.shuffle1(out)
    out = F.relu(blk.bn2(blk.conv2(out)))
    out = blk.bn3(blk.conv3(out))
    res = blk.shortcut(x)
    return torch.cat([out, res], 1) if blk.stride == 2 else out + res


def fcfd_forward(name, m, x):
    """FCFD's ``model(x)``: the list of stage outputs ``[f0, ..., f_{n-1}]``."""
    if name.startswith("resnet") and "cifar" not in name and name not in (
            "resnet18", "resnet34", "resnet50"):  # resnet.py
        f0 = F.relu(m.bn1(m.conv1(x)))
        f1 = m.layer1(f0)
        f2 = m.layer2(f1)
        return [f0, f1, f2, m.layer3(f2)]
    if name.startswith("wrn"):  # wrn.py
        f0 = m.conv1(x)
        f1 = m.block1(f0)
        f2 = m.block2(f1)
        return [f0, f1, f2, m.bn1(m.block3(f2))]
    if name.startswith("vgg"):  # vgg.py (h == 32: no pool3)
        f0 = m.block0(x)
        f1 = m.block1(m.pool0(F.relu(f0)))
        f2 = m.block2(m.pool1(F.relu(f1)))
        f3 = m.block3(m.pool2(F.relu(f2)))
        return [f0, f1, f2, f3, m.block4(F.relu(f3))]
    if name == "shufflev1":  # ShuffleNetv1.py
        out = m.bn1(m.conv1(x))
        fs = [out]
        for layer in (m.layer1, m.layer2, m.layer3):
            for blk in layer:
                out = _fcfd_shufflev1_block(blk, out)
            fs.append(out)
        return fs
    if name == "shufflev2":  # ShuffleNetv2.py
        f0 = F.relu(m.bn1(m.conv1(x)))
        f1 = m.layer1(f0)
        f2 = m.layer2(f1)
        out = m.layer3(f2)
        return [f0, f1, f2, F.relu(m.bn2(m.conv2(out)))]
    if name == "mobilenetv2":  # mobilenetv2.py (conv_bn without ReLU)
        f0 = m.conv1[1](m.conv1[0](x))
        out = m.blocks[1](m.blocks[0](F.relu(f0)))
        f1 = out
        f2 = m.blocks[2](f1)
        f3 = m.blocks[4](m.blocks[3](f2))
        f4 = m.conv2[1](m.conv2[0](m.blocks[6](m.blocks[5](f3))))
        return [f0, f1, f2, f3, f4]
    if name == "resnet50_cifar":  # resnetv2.py
        out = F.relu(m.bn1(m.conv1(x)))
        fs = [out]
        for layer in (m.layer1, m.layer2, m.layer3, m.layer4):
            out = layer(out)
            fs.append(out)
        return fs
    if name in ("resnet18", "resnet34", "resnet50"):  # IN/resnet.py: stage_forward
        out = m.maxpool(F.relu(m.bn1(m.conv1(x))))
        fs = [out]
        for layer in (m.layer1, m.layer2, m.layer3, m.layer4):
            out = F.relu(layer(out))
            fs.append(out)
        return fs
    if name == "mobilenetv1":  # IN/mobilenet.py: stage_forward
        s = m.model
        fs = [s[0](x)]
        for part in (s[1:4], s[4:6], s[6:12], s[12:14]):
            fs.append(part(fs[-1]))
        return fs
    raise AssertionError(name)


def fcfd_classifier(m, f):
    return m.get_classifier()(F.adaptive_avg_pool2d(F.relu(f), 1).view(f.shape[0], -1))


CIFAR = ["resnet8x4", "wrn_16_2", "vgg8", "shufflev1", "shufflev2", "mobilenetv2",
         "resnet50_cifar"]
IMAGENET = ["resnet18", "mobilenetv1"]
AFTER_RELU = {"resnet20": True, "resnet8x4": True, "wrn_16_2": False, "vgg8": False,
              "shufflev1": False, "shufflev2": True, "mobilenetv2": False,
              "resnet50_cifar": True, "resnet18": True, "resnet50": True, "mobilenetv1": True}


def _model(name):
    torch.manual_seed(0)
    nc = 10
    m = create_model(name, nc)
    with torch.no_grad():  # non-trivial BatchNorm statistics and affine parameters
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    return m


# (ResNet-50 at 16x16 to stay cheap: its pooling is global.)
SIZE = {"resnet50_cifar": 16}
CASES = [(n, False) for n in CIFAR + IMAGENET] + [
    (n, True) for n in ("resnet8x4", "wrn_16_2", "vgg8", "shufflev1", "shufflev2", "mobilenetv2",
                        "mobilenetv1")]


@pytest.mark.parametrize("name, train", CASES, ids=[f"{n}-{'train' if t else 'eval'}"
                                                    for n, t in CASES])
def test_boundaries_and_runs_equal_fcfd_stages(name, train):
    m = _model(name)
    m.train(train)
    s = SIZE.get(name, 32)
    x = torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(1))
    split = stage_split(m)
    stats = {k: v.clone() for k, v in m.state_dict().items()}
    with frozen_bn_stats(m):  # keep the statistics fixed for the reference forward
        ref = fcfd_forward(name, m, x)
        ref_logits = fcfd_classifier(m, ref[-1])
    assert len(ref) == split.num_stages and split.after_relu == AFTER_RELU[name]
    taps = FeatureTaps(m, split.taps)
    logits, feats = taps(x)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    after_forward = {k: v.clone() for k, v in m.state_dict().items()}
    for i in range(1, split.num_stages):
        b = split.boundary(feats, i)
        torch.testing.assert_close(b, ref[i], rtol=1e-5, atol=1e-5, msg=f"{name} boundary {i}")
        with frozen_bn_stats(m):
            out = split.run(ref[i].clone(), i + 1)
        torch.testing.assert_close(out, ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split.final_map(feats), F.relu(ref[-1]))
    torch.testing.assert_close(split.head(ref[-1]), ref_logits)
    # boundaries that re-run layers (ShuffleNetV2, MobileNetV2) leave BN statistics alone
    for k, v in m.state_dict().items():
        assert torch.equal(v, after_forward[k]), (name, k)
    if not train:
        for k, v in m.state_dict().items():
            assert torch.equal(v, stats[k]), (name, k)
    taps.remove()


def test_shapes_self_check_and_errors():
    m = create_model("resnet8x4", 10)
    split = stage_split(m)
    m.train()
    assert split.shapes((3, 32, 32)) == [(64, 32, 32), (128, 16, 16), (256, 8, 8)]
    assert m.training and all(mod.training for mod in m.modules())
    vgg = stage_split(create_model("vgg8", 10))
    with pytest.raises(ValueError, match="does not reproduce the model's logits at input size"):
        vgg.shapes((3, 64, 64))  # FCFD's VGG stages never max-pool before block 4
    with pytest.raises(ValueError, match="has no stage split"):
        stage_split(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3)))
    with pytest.raises(IndexError, match="stage index 0"):
        split.boundary({"feats": []}, 0)
    with pytest.raises(KeyError, match="need the feature taps"):
        split.boundary({}, 1)
    with pytest.raises(IndexError, match="start stage 0"):
        split.run(torch.zeros(1), 0)


def test_frozen_bn_stats_uses_batch_statistics_and_restores():
    bn = torch.nn.BatchNorm2d(3).train()
    x = torch.randn(4, 3, 2, 2)
    want = F.batch_norm(x, None, None, bn.weight, bn.bias, training=True)
    with frozen_bn_stats(bn):
        got = bn(x)
    torch.testing.assert_close(got, want)
    assert torch.equal(bn.running_mean, torch.zeros(3)) and int(bn.num_batches_tracked) == 0
    assert bn.track_running_stats
    bn(x)
    assert int(bn.num_batches_tracked) == 1


@pytest.mark.parametrize("name, size, train", [("fmnist_cnn_student", (28, 28), True),
                                               ("fmnist_cnn_teacher", (28, 28), False),
                                               ("fmnist_pairs_cnn_student", (28, 56), True),
                                               ("fmnist_pairs_cnn_teacher", (28, 56), False)])
def test_fmnist_cnn_stages(name, size, train):
    """Our CNNs (no reference): a stage is (max-pool +) its conv-BN-ReLU blocks, written out by
    hand here; the head pools the whole map, or each half for the pairs CNNs."""
    m = _model(name)
    m.train(train)
    if train:
        assert m.drop.p == 0.0  # students: the head without dropout is the model's own
    x = torch.randn(3, 1, *size, generator=torch.Generator().manual_seed(1))
    f = m.features
    idx = [i for i, mod in enumerate(f) if isinstance(mod, torch.nn.MaxPool2d)]
    with frozen_bn_stats(m):
        ref = [f[:idx[0]](x)]
        ref.append(f[idx[0]:idx[1]](ref[0]))
        ref.append(f[idx[1]:](ref[1]))
        cells = (1, 2) if "pairs" in name else (1, 1)
        ref_logits = m.fc(F.adaptive_avg_pool2d(ref[-1], cells).flatten(1))
    split = stage_split(m)
    assert split.num_stages == 3 and split.after_relu and split.pool == cells
    with frozen_bn_stats(m), FeatureTaps(m, split.taps) as taps:
        logits, feats = taps(x)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    for i in (1, 2):
        torch.testing.assert_close(split.boundary(feats, i), ref[i], rtol=0, atol=0)
        with frozen_bn_stats(m):
            torch.testing.assert_close(split.run(ref[i].clone(), i + 1), ref_logits,
                                       rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split.final_map(feats), ref[-1])
    assert split.shapes((1, *size))[-1] == (256 if "teacher" in name else 48, 7, size[1] // 4)
