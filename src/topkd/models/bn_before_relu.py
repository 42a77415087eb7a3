"""The BatchNorm layer whose affine parameters shape each stage's pre-activation feature.

OFD (Heo et al., ICCV 2019) derives its margin from the teacher's BatchNorm ``(weight, bias)``
right before each stage's ReLU; mdistiller's models expose them as ``get_bn_before_relu()``.
:func:`bn_before_relu` gives the same layers for topkd's zoo without touching the models: one
BatchNorm per entry of ``preact_feats[1:]`` (see :mod:`topkd.models.features`), in that order.

=====================  =============================================================
family                 BatchNorm per ``preact_feats[1:]`` entry (mdistiller's choice)
=====================  =============================================================
CIFAR ResNet           ``layer{1,2,3}[-1].bn2`` (the residual branch's last BN)
CIFAR ResNetV2         ``layer{1..4}[-1].bn3`` (Bottleneck) / ``.bn2`` (BasicBlock)
WideResNet             ``block2.layer[0].bn1``, ``block3.layer[0].bn1``, ``bn1``
VGG (with BN)          ``block{1..4}[-1]``
ImageNet ResNet        ``layer{1..4}[-1].bn3`` / ``.bn2`` (mdistiller lists layers 2-4 only)
MobileNetV1            ``model[{5,11,13}][4]`` (mdistiller lists ``model[3]`` too: it is
                       ``preact_feats[0]``, which OFD drops)
fmnist CNNs (ours)     the BatchNorm of each later stage's last conv-BN-ReLU block
=====================  =============================================================

ShuffleNets and MobileNetV2 have none (mdistiller raises ``NotImplementedError`` / declares no
``preact_feats``).
"""

from __future__ import annotations

from torch import nn

__all__ = ["bn_before_relu"]


def _last_bn(block: nn.Module) -> nn.Module:
    return block.bn3 if hasattr(block, "bn3") else block.bn2


def bn_before_relu(model: nn.Module) -> list[nn.BatchNorm2d]:
    """One ``BatchNorm2d`` per ``preact_feats[1:]`` entry of a zoo model (see module docstring).

    Raises:
        ValueError: a model family without such layers (the message lists the supported ones).
    """
    from topkd.models.cifar_resnet import CifarResNet
    from topkd.models.cifar_resnetv2 import CifarResNetV2
    from topkd.models.features import unwrap_model
    from topkd.models.fmnist import SmallCNN
    from topkd.models.imagenet_resnet import _resnet_class
    from topkd.models.mobilenetv1 import MobileNetV1
    from topkd.models.vgg import VGG
    from topkd.models.wrn import WideResNet

    m = unwrap_model(model)  # DistributedDataParallel / torch.compile wrappers
    if isinstance(m, CifarResNet):
        bns = [getattr(m, f"layer{i}")[-1].bn2 for i in (1, 2, 3)]
    elif isinstance(m, (CifarResNetV2, _resnet_class())):
        bns = [_last_bn(getattr(m, f"layer{i}")[-1]) for i in (1, 2, 3, 4)]
    elif isinstance(m, WideResNet):
        bns = [m.block2.layer[0].bn1, m.block3.layer[0].bn1, m.bn1]
    elif isinstance(m, VGG):
        bns = [getattr(m, f"block{i}")[-1] for i in (1, 2, 3, 4)]
    elif isinstance(m, MobileNetV1):
        bns = [m.model[i][4] for i in (5, 11, 13)]
    elif isinstance(m, SmallCNN):  # conv-BN-ReLU blocks: the BN of the stage's last block
        bns = [m.features[i][1] for i in m._stage_ends[1:]]
    else:
        raise ValueError(
            f"{type(m).__name__} has no known BatchNorm before each stage's ReLU; supported: "
            "CIFAR ResNet/ResNetV2, WideResNet, VGG (with BN), ImageNet ResNet, MobileNetV1, "
            "the fmnist CNNs")
    if not all(isinstance(b, nn.BatchNorm2d) for b in bns):
        raise ValueError(f"{type(m).__name__} was built without BatchNorm before its stages' ReLU")
    return bns
