"""Augmentation in the engine: Mixup reaches teacher and student alike, extra views requested by
a method, refused combinations, exact resume with the new RNG streams, the ViT recipe smoke."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from test_engine_common import (
    TinyNet,
    make_cifar100,
    read_metrics,
    tiny_config,
    tinynet_registered,  # noqa: F401 (autouse fixture)
)
from test_resume import _assert_same_state
from topkd.config import Config, ConfigError
from topkd.data.augment import BatchMix
from topkd.engine import Trainer
from topkd.engine.step import build_train_step
from topkd.losses import functional as F
from topkd.methods import Method, MethodParams, create_method, register_method
from topkd.methods.registry import _BY_PARAMS, METHODS

ROOT = Path(__file__).resolve().parents[1]


class _Inputs:
    """Forward pre-hook recording the inputs a module receives."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.seen: list[torch.Tensor] = []
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.seen.append(args[0].detach().clone())


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    from topkd.checkpoints import save_weights

    path = tmp_path_factory.mktemp("teacher") / "tinynet16.pt"
    torch.manual_seed(0)
    save_weights(TinyNet(100, width=16), path)
    return path


def _distill(tmp: Path, ckpt: Path, **sections) -> Config:
    teacher = {"name": "test_tinynet", "kwargs": {"width": 16}, "checkpoint": str(ckpt)}
    sections.setdefault("method", {"name": "kd"})
    return tiny_config(tmp, teacher=teacher, **sections)


# --------------------------------------------------------------------------- Mixup in the step


def test_teacher_and_student_see_the_same_mixed_batch():
    torch.manual_seed(0)
    student, teacher = TinyNet(10), TinyNet(10, width=16).eval().requires_grad_(False)
    method = create_method({"name": "kd"}, num_classes=10)
    step = build_train_step(Config(), student, teacher, method, torch.device("cpu"))
    opts = {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "label_smoothing": 0.1}
    step.mix = BatchMix(10, **opts)
    t_in, s_in = _Inputs(teacher), _Inputs(student)
    labels: list[torch.Tensor] = []
    method.register_forward_pre_hook(lambda m, a: labels.append(a[0].labels.clone()))
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8)
    kinds = set()
    for s in range(6):
        np.random.seed(s)  # noqa: NPY002
        step(x.clone(), y, epoch=1)
        np.random.seed(s)  # noqa: NPY002
        xe, ye = BatchMix(10, **opts)(x.clone(), y)
        assert torch.equal(t_in.seen[-1], xe) and torch.equal(s_in.seen[-1], xe)
        assert torch.equal(labels[-1], ye) and labels[-1].shape == (8, 10)
        kinds.add("cutmix" if (xe == x).any() else "mixup")
    assert kinds == {"mixup", "cutmix"}


def test_trainer_mixes_before_teacher_and_student(tmp_path, teacher_ckpt):
    cfg = _distill(tmp_path, teacher_ckpt, data={"mixup_alpha": 0.8, "cutmix_alpha": 1.0,
                                                 "label_smoothing": 0.1, "batch_size": 8},
                   train={"epochs": 1, "max_steps_per_epoch": 3})
    tr = Trainer(cfg, "distill", quiet=True)
    assert tr.train_loader.drop_last
    t_in, s_in = _Inputs(tr.teacher), _Inputs(tr.model)
    labels: list[torch.Tensor] = []
    tr.method.register_forward_pre_hook(lambda m, a: labels.append(a[0].labels.clone()))
    tr.fit()
    s_train = s_in.seen[: len(t_in.seen)]  # the student is also evaluated afterwards
    assert len(t_in.seen) == 3 and all(torch.equal(a, b) for a, b in zip(t_in.seen, s_train))
    for soft in labels:
        assert soft.shape == (8, 100) and torch.allclose(soft.sum(1), torch.ones(8))
        assert (soft > 0).all()  # smoothing: every class keeps 0.1 / 100
    (row,) = read_metrics(cfg.run_dir)
    assert math.isfinite(float(row["train_loss"]))


# --------------------------------------------------------------------------- extra views


@dataclasses.dataclass(frozen=True)
class _ViewsParams(MethodParams):
    pass


class _ViewsMethod(Method):
    """KD on the extra view 'strong' only (a stand-in for MLKD in these tests)."""

    Params = _ViewsParams
    extra_views = ("strong",)

    def distill(self, batch, terms):
        s, t = batch.views["strong"]
        self.seen = (batch.student.logits.shape, s.logits.shape, t.logits.shape)
        terms["kd_strong"] = F.kd_loss(s.logits, t.logits, 4.0)
        return terms["kd_strong"]


@pytest.fixture
def views_method():
    register_method("test_views")(_ViewsMethod)
    yield "test_views"
    METHODS._items.pop("test_views", None)
    _BY_PARAMS.pop(_ViewsParams, None)


@pytest.mark.parametrize("workers", [0, 1])
def test_method_gets_the_views_it_asks_for(tmp_path, teacher_ckpt, views_method, workers):
    cfg = _distill(tmp_path, teacher_ckpt, method={"name": views_method},
                   data={"augment": True, "num_workers": workers,
                         "views": {"strong": {"auto_augment": "mlkd"}}},
                   train={"epochs": 1, "max_steps_per_epoch": 2})
    tr = Trainer(cfg, "distill", quiet=True)
    t_in, s_in = _Inputs(tr.teacher), _Inputs(tr.model)
    tr.fit()
    assert len(t_in.seen) == 4  # main view then strong view, per step
    for main, strong, s_main, s_strong in zip(t_in.seen[::2], t_in.seen[1::2],
                                              s_in.seen[0:4:2], s_in.seen[1:4:2]):
        assert main.shape == strong.shape == (16, 3, 32, 32) and not torch.equal(main, strong)
        assert torch.equal(main, s_main) and torch.equal(strong, s_strong)
    assert tr.method.seen == ((16, 100),) * 3
    (row,) = read_metrics(cfg.run_dir)
    assert float(row["train_kd_strong"]) > 0


def test_missing_and_unused_views_are_config_errors(tmp_path, teacher_ckpt, views_method):
    cfg = _distill(tmp_path, teacher_ckpt, method={"name": views_method})
    with pytest.raises(ConfigError, match="'strong' of each image, which data.views does not "
                                          "define: add e.g. data.views.strong.auto_augment=mlkd"):
        Trainer(cfg, "distill")
    cfg = _distill(tmp_path, teacher_ckpt, data={"views": {"strong": {"auto_augment": "mlkd"}}})
    with pytest.raises(ConfigError, match="data.views.strong: method 'kd' does not use an extra "
                                          r"view 'strong' \(its extra views: none\)"):
        Trainer(cfg, "distill")


# --------------------------------------------------------------------------- refused combinations


REFUSED = [
    ({"data": {"auto_augment": "original"}, "train": {"teacher_cache": "c"}},
     "train.teacher_cache with data.auto_augment: the cache holds"),
    ({"data": {"re_prob": 0.2, "mixup_alpha": 1.0}, "train": {"teacher_cache": "c"}},
     "train.teacher_cache with data.re_prob, data.mixup_alpha"),
    ({"data": {"cutmix_alpha": 1.0, "batch_size": 6 + 1}}, "must be even per rank"),
    ({"data": {"cutmix_alpha": 1.0, "batch_size": 64}}, "make no full batch"),
    ({"data": {"cutmix_alpha": 1.0, "cutmix_minmax": [0.01, 0.02]}}, "gives no CutMix box"),
    ({"data": {"label_smoothing": 0.1}, "method": {"name": "kd", "ce": 0.0}},
     "data.label_smoothing=0.1 has no effect: method.ce is 0"),
    ({"data": {"mixup_alpha": 0.2}, "method": {"name": "kd", "ignore_index": 3}},
     "method.ignore_index=3 has no effect"),
]


@pytest.mark.parametrize(("sections", "match"), REFUSED, ids=[m for _, m in REFUSED])
def test_refused_combinations(tmp_path, teacher_ckpt, sections, match):
    with pytest.raises(ConfigError, match=match):
        Trainer(_distill(tmp_path, teacher_ckpt, **sections), "distill")


def test_cache_with_label_smoothing_is_allowed(tmp_path, teacher_ckpt):
    """Smoothing changes labels only: the cache is opened (and here not found)."""
    cfg = _distill(tmp_path, teacher_ckpt, data={"label_smoothing": 0.1},
                   train={"teacher_cache": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match=r"train.teacher_cache=.*nope"):
        Trainer(cfg, "distill")


# --------------------------------------------------------------------------- exact resume


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_with_policies_is_bit_exact(tmp_path, workers):
    """RandAugment/erasing in the dataset (main process or worker) and Mixup/CutMix in the
    step draw from random/numpy/torch: a resumed run continues every stream exactly."""
    sections = {"data": {"augment": True, "num_workers": workers, "batch_size": 8,
                         "auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.5,
                         "mixup_alpha": 0.8, "cutmix_alpha": 1.0, "label_smoothing": 0.1},
                "train": {"epochs": 3, "max_steps_per_epoch": 2}}
    ref = tiny_config(tmp_path, name="ref", **sections)
    Trainer(ref, "train").fit()
    plain = tiny_config(tmp_path, name="plain", data={"augment": True, "num_workers": workers,
                                                      "batch_size": 8},
                        train=sections["train"])
    Trainer(plain, "train").fit()
    a = torch.load(ref.run_dir / "checkpoints/last.pt", weights_only=True)["model"]
    b = torch.load(plain.run_dir / "checkpoints/last.pt", weights_only=True)["model"]
    assert not torch.equal(a["fc.weight"], b["fc.weight"])  # the policies did something

    cut = tiny_config(tmp_path, name="cut", **sections)
    Trainer(cut, "train").fit(max_epochs=1)
    torch.manual_seed(123)
    np.random.seed(7)  # noqa: NPY002
    Trainer(cut, "train", resume="auto").fit()
    _assert_same_state(ref.run_dir / "checkpoints/last.pt", cut.run_dir / "checkpoints/last.pt")


# --------------------------------------------------------------------------- ViT recipe smoke


def test_vit_config_trains_with_the_deit_recipe(tmp_path, monkeypatch):
    """`topkd distill configs/cifar100_vit/res32x4_deit_ti/topkd.yaml` with RandAugment, random
    erasing, Mixup/CutMix and label smoothing on (synthetic data, random teacher, 2 steps)."""
    from topkd import cli
    from topkd.checkpoints import save_weights
    from topkd.data import augment
    from topkd.models import create_model

    # 10 images: the recipe's 10% validation split leaves 9, two full Mixup batches of 4
    make_cifar100(tmp_path / "data", n_train=10, n_test=4)
    torch.manual_seed(0)
    ckpt = tmp_path / "resnet32x4.pt"
    save_weights(create_model("resnet32x4", 100), ckpt)
    mixed = []
    real = augment.BatchMix.__call__

    def spy(self, x, y):
        x2, y2 = real(self, x, y)
        mixed.append((self.mixup is not None, y2.shape))
        return x2, y2

    monkeypatch.setattr(augment.BatchMix, "__call__", spy)
    leaf = ROOT / "configs" / "cifar100_vit" / "res32x4_deit_ti" / "topkd.yaml"
    rc = cli.main(["distill", str(leaf), f"data.root={tmp_path / 'data'}", "data.num_workers=0",
                   "data.batch_size=4", "data.eval_batch_size=4", f"teacher.checkpoint={ckpt}",
                   f"output_dir={tmp_path / 'runs'}", "name=vit", "train.epochs=1",
                   "train.max_steps_per_epoch=2", "train.device=cpu"])
    assert rc == 0
    assert mixed == [(True, (4, 100))] * 2
    run = tmp_path / "runs" / "vit"
    saved = yaml.safe_load((run / "config.yaml").read_text())["data"]
    assert saved["auto_augment"] == "rand-m9-mstd0.5-inc1" and saved["re_prob"] == 0.25
    (row,) = read_metrics(run)
    assert math.isfinite(float(row["train_loss"]))
