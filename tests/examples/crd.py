import torch

from examples._zoo import zoo_example
from method_examples import EXAMPLES, RICH


def _warm(method, make):
    # One earlier step on the same samples: sets Z and moves their bank rows with the momentum,
    # so that every parameter (nce_momentum included) changes the next step's loss.
    with torch.no_grad():
        method(make(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))))


def crd_example(params):
    return zoo_example(params, warm=_warm)


EXAMPLES["crd"] = crd_example
RICH["crd"] = {"nce_k": 8}  # 8 of the 15 other-class samples: sampling without replacement
