"""FitNet, AT, RKD, PKT, SP, NST, KDSVD and VID on the engine and the model zoo: every CIFAR-100
pair each method ships for builds and computes a loss from the zoo's feature shapes (and the
declared unsupported pairs fail for the stated reason); runs with trainable method modules resume
bit-exactly; a 2-process gloo DDP run of FitNet equals one process computing what two ranks do.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from functools import cache
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from feature_examples import ShapesContext, feature_batch
from test_engine_common import config_dict, make_cifar100, read_metrics
from topkd.engine import Trainer
from topkd.methods import LossOutput, ModelOutput, create_method
from topkd.models import ClassifierModel, create_model, register_model
from topkd.models import _factory as factory

ROOT = Path(__file__).resolve().parents[1]
FEATURE_METHODS = ["at", "fitnet", "kdsvd", "nst", "pkt", "rkd", "sp", "vid"]


# --------------------------------------------------------------------------- every pair


def _generator():
    import importlib.util

    spec = importlib.util.spec_from_file_location("topkd_gen_feat", ROOT / "configs/generate.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


GEN = _generator()


@cache
def _shapes(model: str) -> dict:
    from topkd.models.features import feature_shapes

    torch.manual_seed(0)
    return feature_shapes(create_model(model, 100), (3, 32, 32), ("feats", "pooled_feat"))


@pytest.mark.parametrize("method", FEATURE_METHODS)
def test_every_cifar_pair_runs_or_is_declared_unsupported(method):
    """From the zoo's real feature shapes: each shipped leaf's method builds and gives a finite
    loss with gradients; each pair listed as unsupported fails with the documented reason."""
    from test_configs import compose

    unsupported = GEN._pair_overrides(method).get("unsupported") or {}
    for pair in GEN.CIFAR_PAIRS:
        s, t = _shapes(pair.student), _shapes(pair.teacher)
        ctx = ShapesContext(num_classes=100, input_size=(3, 32, 32),
                            shapes={"student": s, "teacher": t})
        leaf = ROOT / "configs" / "cifar100" / pair.key / f"{method}.yaml"
        spec = compose(leaf)["method"] if leaf.is_file() else {"name": method}
        batch = feature_batch(s, t, b=3, num_classes=100, dtype=torch.float32, grad=True)
        if pair.key in unsupported:
            assert not leaf.exists()
            with pytest.raises(ValueError, match="width"):
                create_method(spec, ctx)(batch)
            continue
        assert leaf.is_file(), (method, pair.key)
        out = create_method(spec, ctx)(batch)
        assert torch.isfinite(out.total), (method, pair.key)
        grads = torch.autograd.grad(out.distill, [f for f in batch.student.feats["feats"]] +
                                    [batch.student.feats["pooled_feat"]], allow_unused=True)
        assert any(g is not None and g.abs().sum() > 0 for g in grads), (method, pair.key)


# --------------------------------------------------------------------------- a BN-free tapped net


class TapNet(ClassifierModel):
    """A BatchNorm-free net with mdistiller-style ``feats`` (stem, two stages) for the DDP test:
    per-rank batch statistics would make two ranks differ from one process by design."""

    def __init__(self, num_classes: int = 100, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), nn.ReLU())
        self.stage1 = nn.Sequential(nn.Conv2d(width, width, 3, 1, 1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, 2, 1), nn.ReLU())
        self.fc = nn.Linear(2 * width, num_classes)
        self.feature_dim = 2 * width

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage2(self.stage1(self.stem(x))).mean((2, 3))

    def get_classifier(self) -> nn.Linear:
        return self.fc

    def feature_taps(self):
        return {**super().feature_taps(), "feats": ["stem", "stage1", "stage2"]}


def register_tapnet() -> None:
    if "test_tapnet" not in factory.MODELS:
        register_model("test_tapnet")(lambda num_classes=100, **kw: TapNet(num_classes, **kw))


@pytest.fixture(scope="module", autouse=True)
def tapnet_registered():
    register_tapnet()
    yield
    factory.MODELS._items.pop("test_tapnet", None)
    factory._INFO.pop("test_tapnet", None)
    factory._CANONICAL.pop("test_tapnet", None)


def _teacher(tmp: Path, name: str, **kwargs) -> Path:
    from topkd.checkpoints import save_weights

    torch.manual_seed(123)
    path = tmp / f"{name}_teacher.pt"
    save_weights(create_model(name, 100, **kwargs), path)
    return path


# --------------------------------------------------------------------------- resume


def _state_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("method", [
    {"name": "fitnet"},
    {"name": "vid", "train_variance": True},
], ids=["fitnet", "vid_trained_variance"])
def test_resume_with_trainable_method_modules_is_bit_exact(tmp_path, method):
    make_cifar100(tmp_path / "data", n_train=16, n_test=8)
    sections = {
        "model": {"name": "resnet8"},
        "teacher": {"name": "resnet8", "checkpoint": str(_teacher(tmp_path, "resnet8"))},
        "method": method,
        "data": {"batch_size": 8, "eval_batch_size": 8, "augment": True},
        "train": {"epochs": 2},
    }
    ref = Trainer(_config(tmp_path, "ref", sections), "distill")
    init = {k: v.clone() for k, v in ref.method.state_dict().items()}
    ref.fit()
    cut_cfg = _config(tmp_path, "cut", sections)
    assert Trainer(cut_cfg, "distill").fit(max_epochs=1) is None
    torch.manual_seed(999)  # the resumed run must not depend on the process' RNG
    resumed = Trainer(cut_cfg, "distill", resume="auto")
    assert resumed.start_epoch == 2
    resumed.fit()
    a = torch.load(ref.ckpt_dir / "last.pt", weights_only=True)
    b = torch.load(resumed.ckpt_dir / "last.pt", weights_only=True)
    assert a["method"], "the method's modules are checkpointed"
    _state_equal(a["model"], b["model"])
    _state_equal(a["method"], b["method"])
    for i, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b["optimizer"]["state"][i][k]), (i, k)
    # the method's parameters are optimised: they moved from their initial values
    moved = [k for k in init if not torch.equal(init[k], a["method"][k])]
    assert any(k.startswith(("conv_reg.conv", "regressors.")) for k in moved), moved
    if method["name"] == "vid":
        assert any(k.startswith("log_scales.") for k in moved)


def _config(tmp: Path, name: str, sections: dict):
    from topkd.config import Config

    return Config.from_dict(config_dict(tmp, name=name, **sections))


# --------------------------------------------------------------------------- DDP


class TwoRanks(nn.Module):
    """In one process, what two DDP ranks compute from one global batch.

    Rank ``r`` of a 2-rank run gets the rows ``r::2`` of the single-process global batch (the
    engine's ``DistributedSampler`` permutation does not depend on the world size). Each rank
    computes its loss on its half (BatchNorm statistics of the half: FitNet's regressor has a
    BN), DDP averages the gradients, i.e. the gradient of the mean of the two losses; buffers
    (running statistics) are rank 0's, broadcast at every forward.
    """

    def __init__(self, distiller: nn.Module) -> None:
        super().__init__()
        self.d = distiller

    def forward(self, x, labels, teacher, epoch, index=None, views=None):
        # Buffers are swapped as objects, not copied in place: BatchNorm saves its running
        # statistics for backward, so an in-place change would invalidate rank 0's graph.
        slots = [(m._buffers, k) for m in self.d.modules() for k, b in m._buffers.items()
                 if b is not None]
        rank0 = [bufs[k] for bufs, k in slots]
        start = [b.detach().clone() for b in rank0]
        outs, logits = [], []
        for r in (0, 1):
            if r == 1:  # rank 1 starts from the same (broadcast) buffers as rank 0
                for (bufs, k), v in zip(slots, start):
                    bufs[k] = v
            sl = slice(r, None, 2)
            feats = {k: [f[sl] for f in v] if isinstance(v, list) else v[sl]
                     for k, v in teacher.feats.items()}
            out, lg = self.d(x[sl], labels[sl], ModelOutput(teacher.logits[sl], feats), epoch)
            outs.append(out)
            logits.append(lg)
        for (bufs, k), v in zip(slots, rank0):  # rank 0's buffers are the ones that persist
            bufs[k] = v
        mean = LossOutput(*((a + b) / 2 for a, b in zip(
            (outs[0].total, outs[0].task, outs[0].distill),
            (outs[1].total, outs[1].task, outs[1].distill))),
            {k: (outs[0].terms[k] + outs[1].terms[k]) / 2 for k in outs[0].terms})
        both = torch.stack(logits, 1).reshape(x.shape[0], -1)  # rows back in batch order
        return mean, both


SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import test_method_feature_engine
test_method_feature_engine.register_tapnet()
from topkd import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def _ddp_sections(tmp: Path) -> dict:
    return {
        "model": {"name": "test_tapnet"},
        "teacher": {"name": "test_tapnet", "kwargs": {"width": 16},
                    "checkpoint": str(_teacher(tmp, "test_tapnet", width=16))},
        "method": {"name": "fitnet"},
        "data": {"val_fraction": 0.25},
        "train": {"epochs": 2},
    }


@pytest.mark.slow
def test_two_process_ddp_fitnet_matches_one_process(tmp_path):
    """FitNet (a connector with a BatchNorm) under 2-process gloo DDP equals :class:`TwoRanks`
    in one process: student, regressor and its BN statistics within rtol = atol = 1e-4, the
    logged losses to 1e-5 relative.

    Not bit-exact: the ranks' gradients are all-reduced (summed in another order than one
    backward of the mean), and FitNet's large hint loss (x100) with lr 0.05 and momentum
    amplifies the float32 rounding over the 4 steps: measured differences are <= 4e-5 on weights
    of magnitude ~1 (4e-4 on running variances ~26). A plain single process on the whole batch
    (BN statistics of 16 rows instead of 2 x 8) differs by 0.01-1: 3-4 orders of magnitude more.
    """
    make_cifar100(tmp_path / "data", n_train=32, n_test=15)
    sections = _ddp_sections(tmp_path)
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(SCRIPT.format(tests=str(Path(__file__).parent))))
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(config_dict(tmp_path, **sections)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), "distill", str(cfg_path), "name=ddp"],
        env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    two = Trainer(_config(tmp_path, "two", sections), "distill")
    two.step.train_module = TwoRanks(two.step.distiller)
    w0 = two.method.conv_reg.conv.weight.detach().clone()
    two.fit()
    plain = Trainer(_config(tmp_path, "plain", sections), "distill")
    plain.fit()

    ddp = torch.load(tmp_path / "runs/ddp/checkpoints/last.pt", weights_only=True)
    b = torch.load(two.ckpt_dir / "last.pt", weights_only=True)
    c = torch.load(plain.ckpt_dir / "last.pt", weights_only=True)
    assert ddp["world_size"] == 2 and ddp["global_step"] == b["global_step"] == 4
    assert set(ddp["method"]) == set(b["method"]) and "conv_reg.bn.running_mean" in b["method"]
    for part in ("model", "method"):
        for k, v in b[part].items():
            torch.testing.assert_close(ddp[part][k], v, rtol=1e-4, atol=1e-4,
                                       msg=lambda m, k=f"{part}.{k}": f"{k}: {m}")
    far = max((ddp["model"][k] - c["model"][k]).abs().max().item() for k in c["model"])
    assert far > 1e-2, far  # the emulation is what makes them agree
    assert not torch.allclose(w0, b["method"]["conv_reg.conv.weight"])  # the regressor trains
    for x, y in zip(read_metrics(tmp_path / "runs/ddp"), read_metrics(two.run_dir),
                    strict=True):
        for col in ("train_loss", "train_hint", "train_ce"):
            assert math.isclose(float(x[col]), float(y[col]), rel_tol=1e-5, abs_tol=1e-6), col


# --------------------------------------------------------------------------- bench


def test_method_costs_compares_feature_methods():
    from topkd.engine.bench import method_costs

    rows = method_costs(["kd", "fitnet", "vid"], teacher="test_tapnet", student="test_tapnet",
                        batch=4, steps=1, warmup=1, repeats=2, device="cpu")
    assert [r["method"] for r in rows] == ["kd", "fitnet", "vid"]
    assert rows[0]["ratio"] == 1.0 and all(len(r["runs_s_per_step"]) == 2 for r in rows)
    assert all(r["s_per_step"] > 0 and math.isfinite(r["ratio"]) for r in rows)
    assert rows[0]["method_params"] == 0 and rows[1]["method_params"] > 0
    assert all(r["loss_ms"] > 0 and r["loss_saved_mib"] > 0 for r in rows)


def test_kdsvd_channel_svd_runs_on_the_pairs_with_equal_channels():
    """docs/methods.md: the corrected layout runs on the five pairs whose paired stages have the
    same channel counts."""
    runs = set()
    for pair in GEN.CIFAR_PAIRS:
        s, t = _shapes(pair.student), _shapes(pair.teacher)
        batch = feature_batch(s, t, b=2, num_classes=100, dtype=torch.float32)
        try:
            create_method({"name": "kdsvd", "channel_svd": True})(batch)
        except ValueError as e:
            assert "channels" in str(e), e
        else:
            runs.add(pair.key)
    assert runs == {"res56_res20", "res110_res32", "res32x4_res8x4", "wrn40_2_wrn16_2",
                    "vgg13_vgg8"}
