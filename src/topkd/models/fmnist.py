"""Compact CNNs for Fashion-MNIST (1x28x28) and its derived 100-class pairs (1x28x56).

* ``fmnist_cnn_teacher``: five conv-BN-ReLU blocks (32 | 64-64 | 128-256), 427,882 parameters.
* ``fmnist_cnn_student``: three conv-BN-ReLU blocks (12 | 24 | 48), 13,726 parameters,
  built to train quickly on a couple of CPU cores.
* ``fmnist_pairs_cnn_teacher`` / ``fmnist_pairs_cnn_student``: the same networks for
  ``fashion_mnist_pairs`` (two images side by side, label ``10 * left + right``), pooling the
  left and right halves of the final map separately (``pool=(1, 2)``). A global average pool
  would be symmetric in the two halves and could not tell ``(a, b)`` from ``(b, a)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from topkd.models._base import ClassifierModel, global_pool, init_weights_
from topkd.models._factory import register_model
from topkd.models.features import Tap, TapSpec


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """3x3 conv (no bias) - BatchNorm - ReLU."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class SmallCNN(ClassifierModel):
    """Stages of conv-BN-ReLU blocks, 2x2 max-pool after every stage but the last, global
    average pool, optional dropout, linear classifier.

    Args:
        stages: per stage, the widths of its conv blocks.
        in_channels: 1 for Fashion-MNIST.
        drop_rate: dropout before the classifier.
        pool: ``(rows, cols)`` grid of the final average pool; ``(1, 1)`` is the global pool,
            ``(1, 2)`` pools the left and right halves separately (``feature_dim`` is the last
            width times ``rows * cols``, cells concatenated channel-major).
    """

    def __init__(
        self,
        stages: Sequence[Sequence[int]],
        num_classes: int = 10,
        in_channels: int = 1,
        drop_rate: float = 0.0,
        pool: tuple[int, int] = (1, 1),
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        self._stage_ends: list[int] = []  # index in ``features`` of each stage's last block
        for i, widths in enumerate(stages):
            for w in widths:
                layers.append(conv_bn_relu(cin, w))
                cin = w
            self._stage_ends.append(len(layers) - 1)
            if i < len(stages) - 1:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.drop = nn.Dropout(drop_rate)
        self.pool = (int(pool[0]), int(pool[1]))
        self.feature_dim = cin * self.pool[0] * self.pool[1]
        self.fc = nn.Linear(self.feature_dim, num_classes)
        init_weights_(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool == (1, 1):
            return global_pool(self.features(x))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), self.pool), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.forward_features(x)))

    def get_classifier(self) -> nn.Linear:
        return self.fc

    def feature_taps(self) -> dict[str, TapSpec]:
        """feats = each stage's output (after its last ReLU, before the max-pool); preact_feats =
        the same blocks' BatchNorm output before that ReLU; pooled_feat = the pooled features
        before dropout (= ``forward_features``)."""
        return {
            "feats": [f"features.{i}" for i in self._stage_ends],
            "preact_feats": [Tap(f"features.{i}.1", clone=True) for i in self._stage_ends],
            "pooled_feat": Tap("drop", input=True),
        }


TEACHER_STAGES = ((32,), (64, 64), (128, 256))
STUDENT_STAGES = ((12,), (24,), (48,))


@register_model("fmnist_cnn_teacher", family="fmnist", input_size=(1, 28, 28))
def fmnist_cnn_teacher(num_classes: int = 10, **kw: object) -> SmallCNN:
    """Fashion-MNIST teacher CNN (32 | 64-64 | 128-256, dropout 0.2)."""
    kw.setdefault("drop_rate", 0.2)
    return SmallCNN(TEACHER_STAGES, num_classes=num_classes, **kw)  # type: ignore[arg-type]


@register_model("fmnist_cnn_student", family="fmnist", input_size=(1, 28, 28))
def fmnist_cnn_student(num_classes: int = 10, **kw: object) -> SmallCNN:
    """Fashion-MNIST student CNN (12 | 24 | 48), fast on CPU."""
    return SmallCNN(STUDENT_STAGES, num_classes=num_classes, **kw)  # type: ignore[arg-type]


@register_model("fmnist_pairs_cnn_teacher", family="fmnist_pairs", input_size=(1, 28, 56))
def fmnist_pairs_cnn_teacher(num_classes: int = 100, **kw: object) -> SmallCNN:
    """fashion_mnist_pairs teacher: fmnist_cnn_teacher's layers, halves pooled separately."""
    kw.setdefault("drop_rate", 0.2)
    kw.setdefault("pool", (1, 2))
    return SmallCNN(TEACHER_STAGES, num_classes=num_classes, **kw)  # type: ignore[arg-type]


@register_model("fmnist_pairs_cnn_student", family="fmnist_pairs", input_size=(1, 28, 56))
def fmnist_pairs_cnn_student(num_classes: int = 100, **kw: object) -> SmallCNN:
    """fashion_mnist_pairs student: fmnist_cnn_student's layers, halves pooled separately."""
    kw.setdefault("pool", (1, 2))
    return SmallCNN(STUDENT_STAGES, num_classes=num_classes, **kw)  # type: ignore[arg-type]
