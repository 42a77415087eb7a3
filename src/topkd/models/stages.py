"""Stage-wise execution of zoo models: run "stages i..end + head" on a feature map.

Methods that pass one network's features through the *other* network's later layers (FCFD) or
read the final feature map before global pooling (CAT-KD) need a model cut into stages. A
:class:`StageSplit` gives, for a zoo model, without rewriting it:

* ``boundary(feats, i)``: the tensor between stage ``i`` and stage ``i + 1``, taken from the
  feature taps of an ordinary forward (:mod:`topkd.models.features`; ``split.taps`` names the
  kinds it reads), for ``i = 1 .. n - 1``;
* ``run(x, start)``: stages ``start .. n - 1`` and the head on a boundary-``start - 1`` tensor,
  i.e. ``split.run(split.boundary(feats, i), i + 1)`` equals the model's logits;
* ``final_map(feats)``: the map the global pooling reads (``relu(boundary(n - 1))``); the head is
  ``classifier(global_avg_pool(relu(x)))`` for every family.

The cut points are FCFD's (LiuDongyang6/FCFD ``classification/models/*.py``: each model's
``stage_forward``/``forward_classifier``): per family the boundaries are the stage outputs
before or after their last ReLU (``after_relu``), and the last stage includes the layers that
follow the last residual stage (WRN's final BatchNorm, ShuffleNetV2's and MobileNetV2's 1x1
``conv2``). Where a boundary is not a tap (those last two), its few layers are re-run on the tap
with the BatchNorm running statistics left alone (:func:`frozen_bn_stats`; in train mode the
batch statistics, hence the values, equal the forward's).

>>> split = stage_split(teacher)
>>> logits, feats = FeatureTaps(teacher, split.taps)(x)
>>> torch.allclose(split.run(split.boundary(feats, 1), 2), logits)   # True
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["StageSplit", "frozen_bn_stats", "register_stage_split", "stage_split"]

Stage = Callable[[Tensor], Tensor]
Boundary = Callable[[Mapping[str, Any]], Tensor]


@contextlib.contextmanager
def frozen_bn_stats(*modules: nn.Module, batch_stats: bool = False) -> Iterator[None]:
    """BatchNorm layers of ``modules`` do not update their running statistics inside the block.

    In train mode they still normalise with the batch statistics (as FCFD's ``GhostForward``,
    whose per-path running statistics are never read); in eval mode they use the running
    statistics as usual, unless ``batch_stats`` (then they normalise with the batch statistics
    in either mode, as a network in train mode does).
    """
    bns = [m for mod in modules for m in mod.modules()
           if isinstance(m, _BatchNorm) and m.track_running_stats]
    modes = [m.training for m in bns]
    for m in bns:
        m.track_running_stats = False
        m.training = m.training or batch_stats
    try:
        yield
    finally:
        for m, mode in zip(bns, modes):
            m.track_running_stats, m.training = True, mode


@dataclass(frozen=True)
class StageSplit:
    """A model cut into ``n`` stages and a head (see the module docstring).

    Attributes:
        model: the model (its own modules run the stages; nothing is copied).
        stages: ``stages[i]`` maps boundary ``i - 1`` to boundary ``i`` (stage 0 takes the image).
        boundaries: ``boundaries[i](feats)`` reads boundary ``i`` from the taps (``None`` for 0).
        taps: the tap kinds the boundaries read.
        after_relu: boundaries are post-ReLU (FCFD's ``stage_input == "afterrelu"``).
        classifier: the final Linear.
        pool: the head's average-pool grid; ``(1, 1)`` (global) for every family but the
            fashion_mnist_pairs CNNs, which pool each half of the map, ``(1, 2)``.
    """

    model: nn.Module
    stages: tuple[Stage, ...]
    boundaries: tuple[Boundary | None, ...]
    taps: tuple[str, ...]
    after_relu: bool
    classifier: nn.Module
    pool: tuple[int, int] = (1, 1)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def _check_index(self, i: int, lo: int) -> None:
        if not lo <= i < self.num_stages:
            raise IndexError(f"{type(self.model).__name__}: stage index {i} outside "
                             f"[{lo}, {self.num_stages - 1}]")

    def boundary(self, feats: Mapping[str, Any], i: int) -> Tensor:
        """Boundary ``i`` (``1 <= i < n``) from the taps ``feats`` of an ordinary forward."""
        self._check_index(i, 1)
        missing = [k for k in self.taps if k not in feats]
        if missing:
            raise KeyError(f"{type(self.model).__name__}: the stage boundaries need the feature "
                           f"taps {list(self.taps)}; missing {missing}")
        fn = self.boundaries[i]
        assert fn is not None
        return fn(feats)

    def head(self, x: Tensor) -> Tensor:
        """``classifier(global_avg_pool(relu(x)))`` (FCFD's ``forward_classifier``; the pool
        is ``pool``'s grid, cells concatenated channel-major)."""
        size = 1 if self.pool == (1, 1) else self.pool
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(F.relu(x), size), 1))

    def run(self, x: Tensor, start: int) -> Tensor:
        """Logits of stages ``start .. n - 1`` and the head applied to ``x`` (boundary
        ``start - 1``); ``start == n`` applies the head only."""
        if not 1 <= start <= self.num_stages:
            raise IndexError(f"{type(self.model).__name__}: start stage {start} outside "
                             f"[1, {self.num_stages}]")
        for stage in self.stages[start:]:
            x = stage(x)
        return self.head(x)

    def final_map(self, feats: Mapping[str, Any]) -> Tensor:
        """The ``(B, D, H, W)`` map the global average pooling reads: the last boundary after
        ReLU (applied only where the boundary is before ReLU, so gradients reach the tap as
        they do in the forward)."""
        last = self.boundary(feats, self.num_stages - 1)
        return last if self.after_relu else F.relu(last)

    def shapes(self, input_size: Sequence[int]) -> list[tuple[int, int, int]]:
        """Per-sample shapes ``(C, H, W)`` of boundaries ``1 .. n - 1`` (index ``i - 1``) and a
        self-check: ``run(boundary(i), i + 1)`` must equal the model's logits for every ``i``.

        One dummy forward on a ``(2, *input_size)`` batch in eval mode, without gradients; every
        submodule's train/eval flag is restored.
        """
        from topkd.models.features import FeatureTaps

        ref = next(iter(self.model.parameters()))
        x = torch.randn(2, *input_size, device=ref.device, dtype=ref.dtype,
                        generator=torch.Generator(device=ref.device).manual_seed(0))
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            with torch.no_grad(), FeatureTaps(self.model, self.taps) as taps:
                logits, feats = taps(x)
                out = []
                for i in range(1, self.num_stages):
                    b = self.boundary(feats, i)
                    got = self.run(b.clone(), i + 1)
                    # the head pools in another order than the forward: float rounding relative
                    # to the logits' scale (large for untrained deep networks)
                    tol = 1e-4 * (1.0 + float(logits.abs().max()))
                    if not torch.allclose(got, logits, rtol=0.0, atol=tol):
                        raise ValueError(
                            f"{type(self.model).__name__}: running stages {i + 1}.. on boundary "
                            f"{i} does not reproduce the model's logits at input size "
                            f"{tuple(input_size)} (max |diff| {(got - logits).abs().max():.3g}); "
                            "this input size is not supported by its stage split")
                    out.append(tuple(b.shape[1:]))
        finally:
            for m, mode in modes:
                m.training = mode
        return out  # type: ignore[return-value]


# --------------------------------------------------------------------------- registry

_SPLITS: list[tuple[Callable[[nn.Module], bool], Callable[[nn.Module], StageSplit]]] = []


def register_stage_split(match: type | Callable[[nn.Module], bool]
                         ) -> Callable[[Callable[[nn.Module], StageSplit]],
                                       Callable[[nn.Module], StageSplit]]:
    """Register ``fn(model) -> StageSplit`` for models of a class (or matching a predicate)."""
    pred = (lambda m: isinstance(m, match)) if isinstance(match, type) else match

    def deco(fn: Callable[[nn.Module], StageSplit]) -> Callable[[nn.Module], StageSplit]:
        _SPLITS.append((pred, fn))
        return fn

    return deco


def stage_split(model: nn.Module) -> StageSplit:
    """The :class:`StageSplit` of a zoo model (``ValueError`` for families without one)."""
    from topkd.models.features import unwrap_model

    raw = unwrap_model(model)
    for pred, fn in _SPLITS:
        if pred(raw):
            return fn(raw)
    raise ValueError(
        f"{type(raw).__name__} has no stage split (topkd.models.stages): stage-wise methods "
        "support the CIFAR ResNets, WRNs, VGGs, ShuffleNetV1/V2, MobileNetV2 and ResNet18/34/50 "
        "(CIFAR and ImageNet), the ImageNet MobileNetV1 and the fmnist CNNs")


def _tap(kind: str, i: int) -> Boundary:
    return lambda feats: feats[kind][i]


def _rerun(first: Boundary, *layers: nn.Module, relu: bool = False) -> Boundary:
    """A boundary that is ``layers`` applied to a tap (BatchNorm statistics left alone)."""
    def fn(feats: Mapping[str, Any]) -> Tensor:
        x = first(feats)
        with frozen_bn_stats(*layers):
            for layer in layers:
                x = layer(x)
        return F.relu(x) if relu else x
    return fn


def _seq(*fns: Stage) -> Stage:
    def run(x: Tensor) -> Tensor:
        for f in fns:
            x = f(x)
        return x
    return run


def _split(model: nn.Module, stages: Sequence[Stage], boundaries: Sequence[Boundary | None],
           taps: Sequence[str], after_relu: bool, classifier: nn.Module,
           pool: tuple[int, int] = (1, 1)) -> StageSplit:
    return StageSplit(model, tuple(stages), tuple(boundaries), tuple(taps), after_relu,
                      classifier, pool)


# --------------------------------------------------------------------------- CIFAR families

def _register_cifar() -> None:
    from topkd.models.cifar_resnet import CifarResNet
    from topkd.models.cifar_resnetv2 import CifarResNetV2
    from topkd.models.mobilenetv2 import MobileNetV2
    from topkd.models.shufflenet import ShuffleNetV1, ShuffleNetV2
    from topkd.models.vgg import VGG
    from topkd.models.wrn import WideResNet

    @register_stage_split(CifarResNet)
    def _resnet(m: CifarResNet) -> StageSplit:
        """FCFD ``resnet.py``: stem, layer1..3; boundaries after ReLU (= feats)."""
        stem = _seq(m.conv1, m.bn1, F.relu)
        return _split(m, [stem, m.layer1, m.layer2, m.layer3],
                      [None, *(_tap("feats", i) for i in (1, 2, 3))], ["feats"], True, m.fc)

    @register_stage_split(CifarResNetV2)
    def _resnetv2(m: CifarResNetV2) -> StageSplit:
        """FCFD ``resnetv2.py`` (ResNet18/34/50 for CIFAR): boundaries after ReLU (= feats)."""
        stem = _seq(m.conv1, m.bn1, F.relu)
        return _split(m, [stem, m.layer1, m.layer2, m.layer3, m.layer4],
                      [None, *(_tap("feats", i) for i in (1, 2, 3, 4))], ["feats"], True,
                      m.linear)

    @register_stage_split(WideResNet)
    def _wrn(m: WideResNet) -> StageSplit:
        """FCFD ``wrn.py``: conv1, block1, block2, block3 + the final BatchNorm; boundaries
        before BatchNorm-ReLU (feats 1, 2; preact_feats 3 = the final BatchNorm's output)."""
        return _split(m, [m.conv1, m.block1, m.block2, _seq(m.block3, m.bn1)],
                      [None, _tap("feats", 1), _tap("feats", 2), _tap("preact_feats", 3)],
                      ["feats", "preact_feats"], False, m.fc)

    @register_stage_split(VGG)
    def _vgg(m: VGG) -> StageSplit:
        """FCFD ``vgg.py``: block0, then ReLU-maxpool-block for blocks 1..4 (no max-pool before
        block 4 at 32x32); boundaries before ReLU (= preact_feats)."""
        pools = (m.pool0, m.pool1, m.pool2)
        stages = [m.block0, *(_seq(F.relu, p, b) for p, b in zip(pools, (m.block1, m.block2,
                                                                        m.block3))),
                  _seq(F.relu, m.block4)]
        return _split(m, stages, [None, *(_tap("preact_feats", i) for i in (1, 2, 3, 4))],
                      ["preact_feats"], False, m.classifier)

    @register_stage_split(ShuffleNetV1)
    def _shufflev1(m: ShuffleNetV1) -> StageSplit:
        """FCFD ``ShuffleNetv1.py``: each block's ReLU moved to the next block's input, so the
        boundaries are the stage outputs before ReLU (= preact_feats)."""
        stem = _seq(m.conv1, m.bn1)
        stages = [stem, *(_seq(F.relu, layer) for layer in (m.layer1, m.layer2, m.layer3))]
        return _split(m, stages, [None, *(_tap("preact_feats", i) for i in (1, 2, 3))],
                      ["preact_feats"], False, m.linear)

    @register_stage_split(ShuffleNetV2)
    def _shufflev2(m: ShuffleNetV2) -> StageSplit:
        """FCFD ``ShuffleNetv2.py``: layer1, layer2, layer3 + conv2-bn2-ReLU; boundaries after
        ReLU (feats 1, 2; the last re-runs conv2-bn2-ReLU on feats 3)."""
        stem = _seq(m.conv1, m.bn1, F.relu)
        last = _seq(m.layer3, m.conv2, m.bn2, F.relu)
        return _split(m, [stem, m.layer1, m.layer2, last],
                      [None, _tap("feats", 1), _tap("feats", 2),
                       _rerun(_tap("feats", 3), m.conv2, m.bn2, relu=True)],
                      ["feats"], True, m.linear)

    @register_stage_split(MobileNetV2)
    def _mobilenetv2(m: MobileNetV2) -> StageSplit:
        """FCFD ``mobilenetv2.py``: block groups (0, 1), 2, (3, 4), (5, 6) + the 1x1 conv2 with
        its BatchNorm; boundaries before ReLU (block outputs are linear bottlenecks: feats 1..3;
        the last re-runs conv2's conv and BatchNorm on feats 4)."""
        b = m.blocks
        conv, bn = m.conv2[0], m.conv2[1]
        stages = [_seq(m.conv1[0], m.conv1[1]), _seq(F.relu, b[0], b[1]), b[2], _seq(b[3], b[4]),
                  _seq(b[5], b[6], conv, bn)]
        return _split(m, stages, [None, _tap("feats", 1), _tap("feats", 2), _tap("feats", 3),
                                  _rerun(_tap("feats", 4), conv, bn)],
                      ["feats"], False, m.classifier[0])


def _register_imagenet() -> None:
    from topkd.models.mobilenetv1 import MobileNetV1

    def is_tv_resnet(m: nn.Module) -> bool:
        return type(m).__name__ == "TorchvisionResNet"

    @register_stage_split(is_tv_resnet)
    def _tv_resnet(m: nn.Module) -> StageSplit:
        """FCFD ``IN/resnet.py``: stem + max-pool, layer1..4; boundaries after ReLU (= feats)."""
        stem = _seq(m.conv1, m.bn1, m.relu, m.maxpool)  # type: ignore[arg-type]
        layers = [getattr(m, f"layer{i}") for i in (1, 2, 3, 4)]
        return _split(m, [stem, *layers], [None, *(_tap("feats", i) for i in (1, 2, 3, 4))],
                      ["feats"], True, m.fc)  # type: ignore[arg-type]

    @register_stage_split(MobileNetV1)
    def _mobilenetv1(m: MobileNetV1) -> StageSplit:
        """FCFD ``IN/mobilenet.py``: model[0], [1:4], [4:6], [6:12], [12:14]; boundaries after
        ReLU (= feats 0..3: this model's feats start at block 3, without the stem)."""
        s = m.model
        stages = [s[0], s[1:4], s[4:6], s[6:12], s[12:14]]
        return _split(m, stages, [None, *(_tap("feats", i) for i in (0, 1, 2, 3))], ["feats"],
                      True, m.fc)


def _register_fmnist() -> None:
    from topkd.models.fmnist import SmallCNN

    @register_stage_split(SmallCNN)
    def _small_cnn(m: SmallCNN) -> StageSplit:
        """topkd's Fashion-MNIST CNNs (no reference): a stage is (the max-pool and) its
        conv-BN-ReLU blocks; boundaries after the stage's last ReLU (= feats). The head has no
        dropout (the teacher's 0.2 acts in train mode only)."""
        stages, start = [], 0
        for end in m._stage_ends:
            stages.append(m.features[start:end + 1])
            start = end + 1
        return _split(m, stages, [None, *(_tap("feats", i) for i in range(1, len(stages)))],
                      ["feats"], True, m.fc, m.pool)


_register_cifar()
_register_imagenet()
_register_fmnist()
