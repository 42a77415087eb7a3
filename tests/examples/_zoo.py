"""Example inputs from a real zoo pair run through the engine's own feature taps (no registration).

``zoo_example(params)`` builds the method with a :class:`MethodContext` of two tiny CIFAR models
and returns it with a :class:`Batch` whose features come from
:class:`topkd.engine.step.TrainStep` (so engine-side settings such as the teacher's BatchNorm
mode take effect), as in training.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from topkd.engine.step import TrainStep
from topkd.methods import Batch, Method, MethodContext, MethodParams, method_class
from topkd.models import create_model

C, B, N = 10, 4, 20  # classes, batch, training-set size


def train_labels(n: int = N) -> torch.Tensor:
    return torch.arange(n) % 4  # 4 classes of 5 samples: same-class and other-class samples


def zoo_example(params: MethodParams, teacher: str = "resnet8", student: str = "resnet8",
                warm: Callable[[Method, Callable[[torch.Tensor], Batch]], None] | None = None,
                ) -> tuple[Method, Batch]:
    t = create_model(teacher, C).eval().requires_grad_(False)
    s = create_model(student, C)
    with torch.no_grad():  # non-trivial teacher BatchNorm affines (OFD's margins)
        for m in t.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.3, 1.5)
                m.bias.normal_(0.0, 0.7)
    ctx = MethodContext(C, s, t, (3, 32, 32), num_samples=N, train_labels=train_labels())
    method = method_class(params)(params, ctx)
    step = TrainStep(s, t, method, torch.optim.SGD([*s.parameters(), *method.parameters()], 0.1),
                     device=torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    index = torch.tensor([0, 5, 6, 11])
    y = train_labels()[index]
    assert int(y[0]) == 0  # label 0 present (ignore_index=0 has rows to drop)

    def make(x: torch.Tensor) -> Batch:
        return Batch(step.distiller._run(x), step.teacher_outputs(x, None), y, epoch=1.0,
                     index=index)

    if warm is not None:
        warm(method, make)
    return method, make(torch.randn(B, 3, 32, 32, generator=g))
