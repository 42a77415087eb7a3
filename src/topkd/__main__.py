"""``python -m topkd`` (also what ``torchrun -m topkd`` runs)."""

import sys

from topkd.cli import main

sys.exit(main())
