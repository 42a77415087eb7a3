"""Example inputs of ``rkd`` for the generic method tests (hand-made float64 features).

Two samples get nearly equal embeddings (squared distance ~1e-2), so that a larger ``eps``
(the clamp of squared distances) changes the loss.
"""

from feature_examples import example_builder
from method_examples import EXAMPLES


def _close_pair(batch):
    for out in (batch.student, batch.teacher):
        f = out.feats["pooled_feat"]
        f[1] = f[0] + 0.02


EXAMPLES["rkd"] = example_builder("rkd", tweak=_close_pair)
