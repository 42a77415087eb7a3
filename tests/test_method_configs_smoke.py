"""Every shipped CIFAR-100 method config of the resnet32x4 -> resnet8x4 pair builds and trains
through the engine (tiny: synthetic CIFAR-100 files, random teacher weights, 2 steps)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from test_engine_common import make_cifar100, read_metrics
from topkd.config import load_config
from topkd.engine import Trainer
from topkd.methods import method_class

ROOT = Path(__file__).resolve().parents[1]
LEAVES = sorted((ROOT / "configs" / "cifar100" / "res32x4_res8x4").glob("*.yaml"))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from topkd.checkpoints import save_weights
    from topkd.models import create_model

    tmp = tmp_path_factory.mktemp("smoke")
    make_cifar100(tmp / "data", n_train=16, n_test=8)
    torch.manual_seed(0)
    ckpt = tmp / "resnet32x4.pt"
    save_weights(create_model("resnet32x4", 100), ckpt)
    return tmp, ckpt


@pytest.mark.parametrize("leaf", LEAVES, ids=lambda p: p.stem)
def test_method_config_trains(env, leaf, tmp_path):
    tmp, ckpt = env
    cfg = load_config(leaf, [
        f"data.root={tmp / 'data'}", "data.num_workers=0", "data.batch_size=4",
        "data.eval_batch_size=8", f"teacher.checkpoint={ckpt}", f"output_dir={tmp_path}",
        "train.epochs=1", "train.max_steps_per_epoch=2", "train.device=cpu",
    ])
    tr = Trainer(cfg, "distill", quiet=True)
    views = method_class(cfg.method).extra_views  # e.g. MLKD's strong view, from data.views
    image = tr.train_ds[0][0]
    assert set(image) == {"main", *views} if views else torch.is_tensor(image)
    w0 = tr.model.get_classifier().weight.detach().clone()
    summary = tr.fit()
    assert summary["epochs"] == 1 and not torch.equal(w0, tr.model.get_classifier().weight)
    (row,) = read_metrics(cfg.run_dir)
    assert math.isfinite(float(row["train_loss"])), leaf.stem
