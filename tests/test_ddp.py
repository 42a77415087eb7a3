"""A 2-process DDP run (gloo, CPU, via torchrun) equals a single process with the same global batch.

Not bit-exact: DDP all-reduces (sums) the two ranks' gradients of their half-batch means and
divides by 2, while one process averages over the whole batch in one reduction; the float
summation order differs, so weights agree to ~1e-7 relative, checked with atol 1e-5.
Preconditions for equality (documented in docs/training.md): no BatchNorm (per-rank batch
statistics), no augmentation (per-rank RNG streams), equal per-rank batch sizes.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

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

SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import test_engine_common
test_engine_common.register_tinynet()  # BN-free test model
from topkd import cli
sys.exit(cli.main(sys.argv[1:]))
"""
SECTIONS = {"data": {"val_fraction": 0.25}, "train": {"epochs": 2}}


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(tmp_path):
    make_cifar100(tmp_path / "data", n_train=32, n_test=15)  # 15: uneven test shards (8 + 7)
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(SCRIPT.format(tests=str(Path(__file__).parent))))
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(config_dict(tmp_path, **SECTIONS)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), "train", str(cfg_path), "name=ddp"],
        env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("epoch 1/2") == 1  # only rank 0 prints

    single = tiny_config(tmp_path, name="single", **SECTIONS)
    Trainer(single, "train").fit()

    ddp_dir = tmp_path / "runs" / "ddp"
    a = torch.load(ddp_dir / "checkpoints/last.pt", weights_only=True)
    b = torch.load(single.run_dir / "checkpoints/last.pt", weights_only=True)
    assert a["world_size"] == 2 and b["world_size"] == 1
    assert a["global_step"] == b["global_step"] == 4  # 24 train samples / global batch 16
    diff = max((a["model"][k] - b["model"][k]).abs().max().item() for k in b["model"])
    print(f"max |w_ddp - w_single| = {diff:.3g}")  # shown with pytest -s
    assert diff <= 1e-5, diff
    ra, rb = read_metrics(ddp_dir), read_metrics(single.run_dir)
    for x, y in zip(ra, rb, strict=True):
        assert float(x["train_loss"]) == pytest.approx(float(y["train_loss"]), abs=1e-5)
        assert float(x["train_acc1"]) == pytest.approx(float(y["train_acc1"]))
        for col in ("val_acc1", "test_acc1", "test_acc5"):  # sharded eval counts every sample once
            assert float(x[col]) == pytest.approx(float(y[col])), col
        assert float(x["test_loss"]) == pytest.approx(float(y["test_loss"]), abs=1e-5)
    # Each accuracy is a multiple of 100/15 only if all 15 test samples were counted once.
    for r in ra:
        assert round(float(r["test_acc1"]) * 15 / 100, 4) % 1 == 0
