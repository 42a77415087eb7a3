"""Example inputs of ``sp`` for the generic method tests (hand-made float64 features)."""

from feature_examples import example_builder
from method_examples import EXAMPLES

EXAMPLES["sp"] = example_builder("sp")
