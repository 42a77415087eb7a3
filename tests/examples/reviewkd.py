from examples._zoo import zoo_example
from method_examples import EXAMPLES

EXAMPLES["reviewkd"] = zoo_example
