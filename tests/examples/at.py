"""Example inputs of ``at`` for the generic method tests (hand-made float64 features)."""

from feature_examples import example_builder
from method_examples import EXAMPLES

EXAMPLES["at"] = example_builder("at")
