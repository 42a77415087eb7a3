"""Kill-and-resume gives bit-identical results to an uninterrupted run (CPU, deterministic)."""

import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from test_engine_common import (
    config_dict,
    make_cifar100,
    read_metrics,
    tiny_config,
    tinynet_registered,  # noqa: F401 (autouse fixture)
)
from topkd.engine import Trainer

TIMING = ("epoch_time_s", "images_per_s")
# Augmentation (random crop/flip draws from the global torch RNG), momentum, an LR drop after
# epoch 2 and a val split: everything whose state a resume has to restore.
SECTIONS = {"data": {"augment": True, "val_fraction": 0.25},
            "sched": {"milestones": [2, 3]}, "train": {"epochs": 4}}


def _assert_same_state(a: Path, b: Path) -> None:
    ca = torch.load(a, weights_only=True)
    cb = torch.load(b, weights_only=True)
    assert ca["epoch"] == cb["epoch"] and ca["global_step"] == cb["global_step"]
    assert ca["model"].keys() == cb["model"].keys()
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    for i, st in ca["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, cb["optimizer"]["state"][i][k]), (i, k)
    assert ca["best"] == cb["best"]


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_resume_in_process_is_bit_exact(tmp_path):
    ref = tiny_config(tmp_path, name="ref", **SECTIONS)
    ref_summary = Trainer(ref, "train").fit()

    cut = tiny_config(tmp_path, name="cut", **SECTIONS)
    assert Trainer(cut, "train").fit(max_epochs=2) is None
    assert not (cut.run_dir / "summary.json").exists()
    # A crash between writing the metrics row and the checkpoint leaves a stale row behind.
    with open(cut.run_dir / "metrics.csv", "a") as f:
        f.write("3,0.05,9,9,9,9,9,9,9,9,9\n")
    torch.manual_seed(1234)  # the resumed run must not depend on the process' RNG state
    random.seed(1)
    np.random.seed(1)  # noqa: NPY002
    resumed = Trainer(cut, "train", resume="auto")
    assert resumed.start_epoch == 3 and resumed.global_step == 4
    summary = resumed.fit()
    _assert_same_state(ref.run_dir / "checkpoints/last.pt", cut.run_dir / "checkpoints/last.pt")
    assert {k: v for k, v in summary.items() if k != "name"} == \
        {k: v for k, v in ref_summary.items() if k != "name"}
    rows = read_metrics(cut.run_dir)
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4"]  # no duplicate, stale row gone
    assert _strip(rows) == _strip(read_metrics(ref.run_dir))

    # Resuming a finished run trains nothing and re-writes the same summary.
    again = Trainer(cut, "train", resume="auto")
    assert again.start_epoch == 5
    assert again.fit() == summary


SCRIPT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import test_engine_common
test_engine_common.register_tinynet()
from topkd.engine.trainer import Trainer
from topkd import cli

real = Trainer._save_checkpoint

def save(self, epoch, improved, row):
    if epoch == 3 and os.environ.get("KILL_AT_EPOCH3"):
        os.kill(os.getpid(), signal.SIGKILL)  # after metrics.csv got row 3, before last.pt
    real(self, epoch, improved, row)

Trainer._save_checkpoint = save
sys.exit(cli.main(sys.argv[1:]))
"""


def test_killed_subprocess_resumes_bit_exact(tmp_path):
    make_cifar100(tmp_path / "data")
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(SCRIPT.format(tests=str(Path(__file__).parent))))
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(config_dict(tmp_path, **SECTIONS)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(*args: str, kill: bool = False) -> subprocess.CompletedProcess:
        e = {**env, "KILL_AT_EPOCH3": "1"} if kill else env
        return subprocess.run([sys.executable, str(script), "train", str(cfg_path), *args],
                              env=e, capture_output=True, text=True, timeout=300)

    # In-process (faster), with the subprocesses' single thread: CPU kernels may reduce in
    # another order with more threads, which is not what this test is about.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(tiny_config(tmp_path, name="ref", **SECTIONS), "train").fit()
    finally:
        torch.set_num_threads(threads)
    killed = run("name=cut", kill=True)
    assert killed.returncode == -9, killed.stderr
    cut_dir = tmp_path / "runs" / "cut"
    assert torch.load(cut_dir / "checkpoints/last.pt", weights_only=True)["epoch"] == 2
    assert [r["epoch"] for r in read_metrics(cut_dir)] == ["1", "2", "3"]
    res = run("name=cut", "--resume")
    assert res.returncode == 0, res.stderr
    assert "resumed from" in res.stdout
    _assert_same_state(tmp_path / "runs/ref/checkpoints/last.pt", cut_dir / "checkpoints/last.pt")
    rows = read_metrics(cut_dir)
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4"]
    assert _strip(rows) == _strip(read_metrics(tmp_path / "runs/ref"))


def test_resume_into_another_model_is_a_config_error(tmp_path):
    from topkd.config import ConfigError

    cfg = tiny_config(tmp_path, train={"epochs": 2})
    Trainer(cfg, "train").fit(max_epochs=1)
    other = tiny_config(tmp_path, model={"name": "test_tinynet", "kwargs": {"width": 4}})
    with pytest.raises(ConfigError, match="cannot resume from .*last.pt: it does not fit"):
        Trainer(other, "train", resume="auto")


def test_resume_from_another_teacher_is_a_config_error(tmp_path):
    """A distillation run resumes only from the teacher file it started with (its SHA-256)."""
    from feature_engine_common import feature_config
    from topkd.checkpoints import save_weights
    from topkd.config import ConfigError
    from topkd.models import create_model

    cfg = feature_config(tmp_path, {"name": "kd"}, teacher="resnet8", epochs=2)
    Trainer(cfg, "distill", quiet=True).fit(max_epochs=1)
    assert Trainer(cfg, "distill", resume="auto", quiet=True).start_epoch == 2  # same teacher
    torch.manual_seed(1)
    save_weights(create_model("resnet8", 100), cfg.teacher.checkpoint)  # retrained in place
    with pytest.raises(ConfigError, match="other teacher weights .* the teacher changed since "
                                          "the run started"):
        Trainer(cfg, "distill", resume="auto", quiet=True)


def test_resume_with_dataloader_workers_is_bit_exact(tmp_path):
    # Augmentation then runs in a worker whose seed comes from the per-epoch generator.
    sections = {"data": {"augment": True, "num_workers": 1}, "train": {"epochs": 2}}
    ref = tiny_config(tmp_path, name="ref", **sections)
    Trainer(ref, "train").fit()
    cut = tiny_config(tmp_path, name="cut", **sections)
    Trainer(cut, "train").fit(max_epochs=1)
    torch.manual_seed(99)
    Trainer(cut, "train", resume="auto").fit()
    _assert_same_state(ref.run_dir / "checkpoints/last.pt", cut.run_dir / "checkpoints/last.pt")


def test_torn_last_pt_falls_back_to_the_previous_epoch_bit_exact(tmp_path):
    """A damaged last.pt (partial copy/sync) resumes from last.prev.pt, the previous epoch's
    state, and still ends bit-identical to an uninterrupted run: never from scratch."""
    ref = tiny_config(tmp_path, name="ref", **SECTIONS)
    Trainer(ref, "train").fit()
    cut = tiny_config(tmp_path, name="cut", **SECTIONS)
    Trainer(cut, "train").fit(max_epochs=3)
    ckpts = cut.run_dir / "checkpoints"
    assert torch.load(ckpts / "last.prev.pt", weights_only=True)["epoch"] == 2
    data = (ckpts / "last.pt").read_bytes()
    (ckpts / "last.pt").write_bytes(data[: len(data) // 3])
    with pytest.warns(UserWarning, match=r"last\.pt is truncated or corrupt.*previous epoch's "
                                         r"checkpoint .*last\.prev\.pt"):
        tr = Trainer(cut, "train", resume="auto")
    assert tr.start_epoch == 3 and tr.resumed_from == ckpts / "last.prev.pt"
    tr.fit()
    _assert_same_state(ref.run_dir / "checkpoints/last.pt", ckpts / "last.pt")
    assert _strip(read_metrics(cut.run_dir)) == _strip(read_metrics(ref.run_dir))


@pytest.mark.parametrize("damage", ["empty", "truncated", "random"])
def test_torn_last_pt_without_previous_stops_with_one_line(tmp_path, capsys, damage):
    from topkd import cli

    make_cifar100(tmp_path / "data")
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(config_dict(tmp_path, name="t", train={"epochs": 2})))
    assert cli.main(["train", str(cfg_path), "train.epochs=1"]) == 0
    last = tmp_path / "runs/t/checkpoints/last.pt"
    assert not last.with_name("last.prev.pt").exists()  # one epoch: nothing to fall back to
    data = last.read_bytes()
    last.write_bytes({"empty": b"", "truncated": data[:-20], "random": os.urandom(500)}[damage])
    capsys.readouterr()
    assert cli.main(["train", str(cfg_path), "--resume"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("topkd: error: cannot resume: ") and "last.pt is truncated or corrupt" \
        in err, err
    assert "Traceback" not in err and err.count("\n") == 1
    assert "epoch 1/2" not in out  # nothing trained from scratch
    assert [r["epoch"] for r in read_metrics(tmp_path / "runs/t")] == ["1"]
