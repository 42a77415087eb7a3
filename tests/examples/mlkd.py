"""MLKD needs the strong view: logits of student and teacher on a second view of the batch."""

from __future__ import annotations

import torch

from method_examples import EXAMPLES, logits
from topkd.methods import Batch, Method, MethodParams, ModelOutput, method_class


def mlkd_example(params: MethodParams) -> tuple[Method, Batch]:
    s, t, y = logits(0)
    s2, t2, _ = logits(1)
    t = t + torch.linspace(0, 3, t.shape[-1], dtype=t.dtype)  # classes of unequal confidence
    views = {"strong": (ModelOutput(s2), ModelOutput(t2))}
    return method_class(params)(params), Batch(ModelOutput(s), ModelOutput(t), y, 1.0,
                                               views=views)


EXAMPLES["mlkd"] = mlkd_example
