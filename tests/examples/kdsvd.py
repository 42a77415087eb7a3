"""Example inputs of ``kdsvd`` for the generic method tests (hand-made float64 features).

Student and teacher stages share widths (8, 8, 4) and channel counts (4, 8, 16), as both
layouts (``channel_svd`` off and on) need; heights differ. The student's k + 3 singular vectors
exist for k = 1 and k = 2.
"""

from feature_examples import example_builder
from method_examples import EXAMPLES

STUDENT = {"feats": [(4, 8, 8), (4, 8, 8), (8, 8, 8), (16, 4, 4)], "pooled_feat": (16,)}
TEACHER = {"feats": [(4, 8, 8), (4, 6, 8), (8, 8, 8), (16, 2, 4)], "pooled_feat": (32,)}

EXAMPLES["kdsvd"] = example_builder("kdsvd", STUDENT, TEACHER)
