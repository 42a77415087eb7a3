"""A plain ``pip install topkd`` (no extras) gives a working ``topkd`` command.

Simulated by hiding every package of the ``train`` extra from the import system in a
subprocess (CI cannot install a second environment): ``--help`` must work and a command that
needs an extra must name it in one line, never show a ModuleNotFoundError traceback.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11 (standard library)

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
IMPORT_NAME = {"pyyaml": "yaml"}  # distribution -> import name where they differ

SCRIPT = """
import contextlib, importlib.abc, io, json, sys, traceback
BLOCKED = set(sys.argv[1].split(","))

class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Hide())
import torch  # noqa: F401  (imported once: the slow part)

results = []
for argv in json.loads(sys.argv[2]):  # several commands, one interpreter
    for name in [m for m in sys.modules if m == "topkd" or m.startswith("topkd.")]:
        del sys.modules[name]  # each command imports topkd afresh, as a new process would
    from topkd.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
        except BaseException:
            rc, _ = 99, traceback.print_exc()
    results.append({"rc": rc, "out": out.getvalue(), "err": err.getvalue()})
print(json.dumps(results))
"""


def _names(reqs: list[str]) -> set[str]:
    dists = {re.split(r"[<>=\[ ;]", r, maxsplit=1)[0].lower() for r in reqs}
    return {IMPORT_NAME.get(d, d) for d in dists}


def _run(tmp_path: Path, cases: list[list[str]]) -> list[dict]:
    """Run ``topkd <case>`` for each case in one interpreter with the extras hidden."""
    blocked = _names(PYPROJECT["optional-dependencies"]["train"]) - _names(
        PYPROJECT["dependencies"])
    script = tmp_path / "plain.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), ",".join(sorted(blocked)),
                           json.dumps(cases)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_base_dependencies_hold_what_the_command_always_needs():
    base = _names(PYPROJECT["dependencies"])
    assert {"torch", "numpy", "yaml"} <= base
    assert PYPROJECT["scripts"]["topkd"] == "topkd.cli:main"


def test_help_works_without_extras(tmp_path):
    cases = [["--help"], ["train", "--help"], ["distill", "--help"]]
    for case, res in zip(cases, _run(tmp_path, cases), strict=True):
        assert res["rc"] == 0, (case, res["err"][-2000:])
        assert "usage: topkd" in res["out"], case


def test_commands_name_the_missing_extra_in_one_line(tmp_path):
    cases = [
        ["train", str(ROOT / "configs/students/fashion_mnist/fmnist_cnn_student.yaml")],
        ["eval", str(ROOT / "pyproject.toml"), "--model", "resnet8", "--dataset", "cifar100"],
        ["demo"],
        ["report", "runs"],
    ]
    for case, res in zip(cases, _run(tmp_path, cases), strict=True):
        err = res["err"]
        assert res["rc"] == 2, (case, err[-2000:])
        assert "Traceback" not in err and err.count("\n") == 1, (case, err)
        assert err.startswith("topkd: error: "), case
        assert "pip install 'topkd[train]'" in err, case
