"""Per-method example builders (one module per method: ``tests/examples/<method>.py``).

Each module registers into :data:`method_examples.EXAMPLES` / ``RICH``; ``method_examples``
imports every module of this package, so adding a method never edits a shared test file.
"""
