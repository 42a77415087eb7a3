"""Rules for the test suite itself.

A test that *skips* when one of the project's own modules fails to import ("not landed yet")
hides breakage: a syntax error in ``topkd.cli`` then shows up as a skip, not a failure. Our own
modules are imported plainly; only genuinely optional third-party modules and data may skip.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
OWN = re.compile(r"importorskip\(\s*['\"](topkd|_naive_losses|fixtures_data|test_)")
EXCUSES = re.compile(r"not landed|not importable yet|not there yet", re.IGNORECASE)


def _skips_on_import_error(tree: ast.AST) -> list[int]:
    """Lines of ``except ImportError/ModuleNotFoundError:`` handlers that call a skip."""
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ExceptHandler) or node.type is None:
            continue
        names = {n.id if isinstance(n, ast.Name) else getattr(n, "attr", "")
                 for n in ast.walk(node.type)}
        if not names & {"ImportError", "ModuleNotFoundError"}:
            continue
        for call in ast.walk(node):
            if isinstance(call, ast.Call) and getattr(call.func, "attr", "") in ("skip", "xfail"):
                lines.append(node.lineno)
    return lines


def test_no_test_skips_when_the_projects_own_code_fails_to_import():
    offenders = []
    for path in sorted(TESTS.glob("*.py")):
        if path.name == Path(__file__).name:
            continue
        text = path.read_text()
        for i, line in enumerate(text.splitlines(), 1):
            if OWN.search(line) or EXCUSES.search(line):
                offenders.append(f"{path.name}:{i}: {line.strip()}")
        offenders += [f"{path.name}:{i}: skip in an ImportError handler"
                      for i in _skips_on_import_error(ast.parse(text))]
    assert not offenders, "import the project's modules plainly:\n" + "\n".join(offenders)


def test_the_rule_catches_the_patterns_it_forbids():
    src = ("try:\n    import topkd.cli\nexcept ImportError:\n    pytest.skip('no cli')\n"
           "cli = pytest.importorskip('topkd.cli')\n")
    assert _skips_on_import_error(ast.parse(src)) == [3]
    assert OWN.search(src.splitlines()[-1])
    assert EXCUSES.search('pytest.skip("LossSpec has not landed yet")')


def test_the_code_passes_the_projects_linter():
    """``ruff check`` with pyproject's rules (a [test] dependency): CI runs only pytest, so lint
    is enforced here, not left to whoever remembers to run it."""
    import shutil
    import subprocess
    import sys

    ruff = Path(sys.executable).with_name("ruff")
    exe = str(ruff) if ruff.exists() else shutil.which("ruff")
    assert exe, "ruff is a [test] dependency (pip install -e '.[test]')"
    root = TESTS.parent
    proc = subprocess.run([exe, "check", "--no-cache", "src", "tests", "benchmarks", "configs"],
                          cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
