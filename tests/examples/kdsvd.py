"""Example inputs of ``kdsvd`` for the generic method tests (hand-made float64 features).

Stages of width 8, 8 and 4 (equal in student and teacher, as KDSVD needs), so that the student's
k + 3 singular vectors exist for k = 1 and k = 2.
"""

from feature_examples import example_builder
from method_examples import EXAMPLES

STUDENT = {"feats": [(4, 8, 8), (4, 8, 8), (8, 8, 8), (16, 4, 4)], "pooled_feat": (16,)}
TEACHER = {"feats": [(8, 8, 8), (8, 8, 8), (16, 8, 8), (32, 4, 4)], "pooled_feat": (32,)}

EXAMPLES["kdsvd"] = example_builder("kdsvd", STUDENT, TEACHER)
