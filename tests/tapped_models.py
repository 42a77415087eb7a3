"""Real zoo models and their taps on a random input, for the stage-wise methods' tests
(SimKD, CAT-KD, FCFD need the models themselves: classifiers, stages)."""

from __future__ import annotations

import torch

from topkd.methods import Batch, ModelOutput
from topkd.models import create_model
from topkd.models.features import FeatureTaps


def models(student: str = "resnet8", teacher: str = "resnet8", num_classes: int = 10):
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(0)
        return (create_model(student, num_classes).double(),
                create_model(teacher, num_classes).double())


def tapped_batch(method, student, teacher, num_classes: int = 10, b: int = 4, seed: int = 0,
                 grad: bool = False) -> Batch:
    """The models' outputs on a random input (in the models' dtype), through the taps the
    method asked for."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, 32, 32, generator=g, dtype=next(student.parameters()).dtype)
    with FeatureTaps(student, method.student_taps) as taps:
        ls, fs = taps(x)
    with torch.no_grad(), FeatureTaps(teacher, method.teacher_taps) as taps:
        lt, ft = taps(x)
    if not grad:
        ls, fs = ls.detach(), {k: [t.detach() for t in v] if isinstance(v, list) else v.detach()
                               for k, v in fs.items()}
    y = torch.randint(0, num_classes, (b,), generator=g)
    y[0] = 0
    return Batch(ModelOutput(ls, fs), ModelOutput(lt, ft), y, epoch=1.0)
