"""A plain ``pip install topkd`` (no extras) gives a working ``topkd`` command.

Simulated by hiding every package of the ``train`` extra from the import system in a
subprocess (CI cannot install a second environment): ``--help`` must work and a command that
needs an extra must name it in one line, never show a ModuleNotFoundError traceback.
"""

from __future__ import annotations

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
import importlib.abc, sys
BLOCKED = set(sys.argv[1].split(","))

class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Hide())
from topkd.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _names(reqs: list[str]) -> set[str]:
    dists = {re.split(r"[<>=\[ ;]", r, maxsplit=1)[0].lower() for r in reqs}
    return {IMPORT_NAME.get(d, d) for d in dists}


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    blocked = _names(PYPROJECT["optional-dependencies"]["train"]) - _names(
        PYPROJECT["dependencies"])
    script = tmp_path / "plain.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(script), ",".join(sorted(blocked)), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_base_dependencies_hold_what_the_command_always_needs():
    base = _names(PYPROJECT["dependencies"])
    assert {"torch", "numpy", "yaml"} <= base
    assert PYPROJECT["scripts"]["topkd"] == "topkd.cli:main"


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["distill", "--help"]])
def test_help_works_without_extras(tmp_path, args):
    proc = _run(tmp_path, *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage: topkd" in proc.stdout


@pytest.mark.parametrize("args", [
    ["train", str(ROOT / "configs/students/fashion_mnist/fmnist_cnn_student.yaml")],
    ["eval", str(ROOT / "pyproject.toml"), "--model", "resnet8", "--dataset", "cifar100"],
    ["demo"],
    ["report", "runs"],
])
def test_commands_name_the_missing_extra_in_one_line(tmp_path, args):
    proc = _run(tmp_path, *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("topkd: error: ")
    assert "pip install 'topkd[train]'" in proc.stderr
