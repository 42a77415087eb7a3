from examples._zoo import zoo_example
from method_examples import EXAMPLES

EXAMPLES["ofd"] = zoo_example
