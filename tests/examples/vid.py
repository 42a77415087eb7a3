"""Example inputs of ``vid`` for the generic method tests (hand-made float64 features).

The rich configuration trains the variances; its example moves them away from their initial
value (as after some training), where ``eps`` has an effect.
"""

import torch

from feature_examples import example_builder
from method_examples import EXAMPLES, RICH


def _trained(method, params):
    if params.train_variance:
        g = torch.Generator().manual_seed(5)
        for alpha in method.log_scales:
            alpha.add_(torch.randn(alpha.shape, generator=g, dtype=alpha.dtype))


EXAMPLES["vid"] = example_builder("vid", perturb=_trained)
RICH["vid"] = {"train_variance": True}
