"""Engine paths that a change could break silently, each with a test that fails when it goes.

* the epoch handed to the method counts from 1 (the warm-up factor depends on it);
* ``sampler.set_epoch``: each epoch is the ``DistributedSampler`` permutation of ``seed + epoch``;
* the teacher-logit cache's ``set_epoch``: each epoch draws its own cached views;
* gradient clipping (``train.grad_clip``) bounds the update;
* ``_sync_buffers``: under DDP every rank evaluates with rank 0's BatchNorm statistics;
* resume and DDP in ``distill`` mode (online teacher, teacher-logit cache, inside the warm-up);
* the fp16 ``GradScaler`` path of the training step (on CPU where torch supports fp16 autocast).

Every config of this file is built by :func:`_config_dict` (``method:`` sections).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from test_engine_common import (
    TinyNet,
    config_dict,
    make_cifar100,
    read_metrics,
    tinynet_registered,  # noqa: F401 (autouse fixture)
)
from test_resume import _assert_same_state, _strip
from topkd.config import Config
from topkd.engine import Trainer

TEACHER = {"name": "test_tinynet", "kwargs": {"width": 16}}


def _config_dict(tmp: Path, name: str, *, method: dict[str, Any] | None = None,
                 teacher: Path | None = None, cache: Path | None = None,
                 **sections: Any) -> dict[str, Any]:
    """The one place these tests build configs: a tiny CIFAR-100 run with a ``method:``
    section, optionally a teacher checkpoint and a teacher-logit cache."""
    extra: dict[str, Any] = {"name": name, "method": method or {"name": "ce"}}
    if teacher is not None:
        extra["teacher"] = {**TEACHER, "checkpoint": str(teacher)}
    if cache is not None:
        extra["train"] = {"teacher_cache": str(cache)}
    cfg = config_dict(tmp, **extra)
    for key, value in sections.items():  # merged one level deep (data, train, optim, ...)
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


def _config(tmp: Path, name: str, **kw: Any) -> Config:
    if not (tmp / "data" / "cifar-100-python").is_dir():
        make_cifar100(tmp / "data")
    return Config.from_dict(_config_dict(tmp, name, **kw))


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("teacher")
    cfg = _config(tmp, "teacher", model=TEACHER, train={"epochs": 2})
    Trainer(cfg, "train", quiet=True).fit()
    return cfg.run_dir / "checkpoints" / "last.pt"


def _cache(tmp: Path, ckpt: Path, views: int = 2) -> Path:
    """A crop(32, pad 4)+flip cache over the whole tiny training split (data.augment: true)."""
    from topkd.cache import ReplayableCropFlip, build_cache
    from topkd.checkpoints import load_teacher
    from topkd.data import get_dataset

    teacher = load_teacher("test_tinynet", 100, ckpt, verbose=False, width=16)
    train = get_dataset("cifar100", tmp / "data", "train", augment=False)
    return build_cache(teacher, train, tmp / "cache", views=views,
                       augment=ReplayableCropFlip(padding=4), dtype="float32", progress=False,
                       teacher_name="test_tinynet", checkpoint=ckpt, dataset_name="cifar100")


class _Spy:
    """Wraps ``Trainer.step`` to record what every training step receives."""

    def __init__(self, tr: Trainer) -> None:
        self.tr, self.real = tr, tr.step
        self.calls: list[dict[str, Any]] = []
        tr.step = self

    def __getattr__(self, name: str) -> Any:  # everything else is the real step's
        return getattr(self.real, name)

    def __call__(self, x, y, **kw):
        ds_epoch = getattr(self.tr.train_ds, "epoch", None)
        self.calls.append({"x": x.clone(), "epoch": kw["epoch"], "ds_epoch": ds_epoch,
                           "cached": None if kw.get("cached") is None else kw["cached"].clone()})
        return self.real(x, y, **kw)


# ------------------------------------------------------------------ epoch, sampler, cache, clip


def test_method_receives_epochs_counting_from_1(teacher_ckpt, tmp_path):
    """DKD with a 4-epoch warm-up: the factor is 1/4 in epoch 1 and 2/4 in epoch 2 (an
    off-by-one in the epoch passed on would make it 0 or 2/4 in epoch 1)."""
    cfg = _config(tmp_path, "warm", method={"name": "dkd", "warmup": 4}, teacher=teacher_ckpt,
                  train={"epochs": 2})
    tr = Trainer(cfg, "distill", quiet=True)
    seen: list[float] = []
    tr.method.register_forward_pre_hook(lambda mod, args: seen.append(args[0].epoch))
    tr.fit()
    assert seen == [1, 1, 2, 2]  # 32 images, batch 16: two steps per epoch
    rows = read_metrics(cfg.run_dir)
    assert [float(r["train_warmup"]) for r in rows] == pytest.approx([0.25, 0.5])


def test_each_epoch_is_the_samplers_permutation_of_seed_plus_epoch(tmp_path):
    """The training order of epoch e is torch's DistributedSampler rule (transcribed):
    ``randperm(n, generator seeded with seed + epoch)``; without ``sampler.set_epoch`` every
    epoch would repeat epoch 0's order."""
    cfg = _config(tmp_path, "order", seed=3, train={"epochs": 3})
    tr = Trainer(cfg, "train", quiet=True)
    spy = _Spy(tr)
    tr.fit()
    n = len(tr.train_ds)
    xs = torch.stack([tr.train_ds[i][0] for i in range(n)])
    for epoch in (1, 2, 3):
        g = torch.Generator()
        g.manual_seed(cfg.seed + epoch)
        order = torch.randperm(n, generator=g)
        got = torch.cat([c["x"] for c in spy.calls if c["epoch"] == epoch])
        assert torch.equal(got, xs[order]), epoch


def test_teacher_cache_draws_each_epochs_views(teacher_ckpt, tmp_path):
    """With a multi-view cache each epoch draws its own view per image (``set_epoch``): the
    cached logits handed to the step are those of that epoch's views."""
    make_cifar100(tmp_path / "data")
    cache = _cache(tmp_path, teacher_ckpt, views=4)
    cfg = _config(tmp_path, "views", method={"name": "kd"}, teacher=teacher_ckpt, cache=cache,
                  data={"augment": True}, train={"epochs": 2})
    tr = Trainer(cfg, "distill", quiet=True)
    spy = _Spy(tr)
    tr.fit()
    assert [c["ds_epoch"] for c in spy.calls] == [1, 1, 2, 2]
    ds = tr.train_ds
    for epoch in (1, 2):
        ds.set_epoch(epoch)
        g = torch.Generator()
        g.manual_seed(cfg.seed + epoch)
        order = torch.randperm(len(ds), generator=g).numpy()
        want = ds.cache.dense_logits(ds.rows[order], ds.views_for(order))
        got = torch.cat([c["cached"] for c in spy.calls if c["epoch"] == epoch])
        assert torch.equal(got, want), epoch
    ds.set_epoch(1)
    v1 = ds.views_for(range(len(ds))).copy()
    ds.set_epoch(2)
    assert (v1 != ds.views_for(range(len(ds)))).any()  # the check above can tell epochs apart


def test_grad_clip_bounds_the_update(tmp_path):
    """Plain SGD (lr 1, no momentum/decay), one step: the weights move by exactly the clip
    norm; without clipping the same step moves them far more."""
    def one_step(name: str, clip: float | None) -> float:
        cfg = _config(tmp_path, name, optim={"lr": 1.0, "momentum": 0.0, "weight_decay": 0.0},
                      sched={"name": "constant"},
                      train={"epochs": 1, "max_steps_per_epoch": 1, "grad_clip": clip})
        tr = Trainer(cfg, "train", quiet=True)
        before = [p.detach().clone() for p in tr.model.parameters()]
        tr.fit()
        moved = [(p.detach() - b).flatten() for p, b in zip(tr.model.parameters(), before)]
        return float(torch.cat(moved).norm())

    clip = 1e-3
    assert one_step("clipped", clip) == pytest.approx(clip, rel=1e-4)
    assert one_step("free", None) > 50 * clip


# ------------------------------------------------------------------ resume in distill mode


@pytest.mark.parametrize("with_cache", [False, True])
def test_distill_resume_inside_the_warm_up_is_bit_exact(teacher_ckpt, tmp_path, with_cache):
    """Killed after epoch 1 of a 4-epoch warm-up (online teacher, or the cache with augmented
    views), resumed: weights, optimizer, best metrics and metrics.csv equal an uninterrupted
    run's."""
    make_cifar100(tmp_path / "data")
    cache = _cache(tmp_path, teacher_ckpt) if with_cache else None
    kw = dict(method={"name": "dkd", "warmup": 4}, teacher=teacher_ckpt, cache=cache,
              data={"augment": True, "val_fraction": 0.25})
    ref = _config(tmp_path, "ref", train={"epochs": 3}, **kw)
    Trainer(ref, "distill", quiet=True).fit()
    cut = _config(tmp_path, "cut", train={"epochs": 3}, **kw)
    Trainer(cut, "distill", quiet=True).fit(max_epochs=1)
    torch.manual_seed(999)  # the resumed run must not depend on the process' RNG state
    resumed = Trainer(cut, "distill", resume="auto", quiet=True)
    assert resumed.start_epoch == 2
    resumed.fit()
    _assert_same_state(ref.run_dir / "checkpoints/last.pt", cut.run_dir / "checkpoints/last.pt")
    rows = read_metrics(cut.run_dir)
    assert [float(r["train_warmup"]) for r in rows] == pytest.approx([0.25, 0.5, 0.75])
    assert _strip(rows) == _strip(read_metrics(ref.run_dir))


# ------------------------------------------------------------------ DDP (2 processes, gloo)

DDP_SCRIPT = """
import os, sys
sys.path.insert(0, {tests!r})
import torch
import test_engine_common
test_engine_common.register_tinynet()
import topkd.engine.trainer as T
from topkd.config import load_config
from topkd.engine.run import run_training
from topkd.utils.dist import cleanup_distributed

RANK = int(os.environ["RANK"])
OUT = {out!r}
calls = {{"n": 0}}
real_sync = T.Trainer._sync_buffers


def sync(self):  # record every rank's buffers before and after the sync
    name, i = self.cfg.name, calls["n"]
    calls["n"] += 1
    bufs = lambda: {{k: v.clone() for k, v in self.model.named_buffers()}}
    torch.save(bufs(), f"{{OUT}}/{{name}}_pre_{{i}}_rank{{RANK}}.pt")
    real_sync(self)
    torch.save(bufs(), f"{{OUT}}/{{name}}_post_{{i}}_rank{{RANK}}.pt")


T.Trainer._sync_buffers = sync
for path in sys.argv[1:]:
    cfg = load_config(path)
    calls["n"] = 0
    run_training(cfg, "train" if cfg.to_dict()["method"]["name"] == "ce" else "distill")
cleanup_distributed()
"""


@pytest.mark.slow
def test_ddp_distill_and_batchnorm_sync(teacher_ckpt, tmp_path):
    """One torchrun launch (2 processes, gloo, CPU) of three runs:

    * a BatchNorm model: before ``_sync_buffers`` the ranks' running stats differ (their own
      half-batches), after it both equal rank 0's, so evaluation uses one model;
    * distillation from the online teacher inside a DKD warm-up, and from the teacher-logit
      cache with augmented views: the same weights (atol 1e-5) and metrics as one process with
      the same global batch (no BatchNorm; the cache's replayed views do not depend on ranks).
    """
    make_cifar100(tmp_path / "data", n_train=32, n_test=15)
    cache = _cache(tmp_path, teacher_ckpt)
    specs = {
        "bn": dict(model={"name": "test_bnnet"}),
        "online": dict(method={"name": "dkd", "warmup": 4}, teacher=teacher_ckpt),
        "cached": dict(method={"name": "kd"}, teacher=teacher_ckpt, cache=cache,
                       data={"augment": True}),
    }
    paths = []
    for name, kw in specs.items():
        d = _config_dict(tmp_path, name, output_dir=str(tmp_path / "ddp"),
                         **{"train": {"epochs": 2}, **kw})
        p = tmp_path / f"{name}.yaml"
        p.write_text(yaml.safe_dump(d))
        paths.append(str(p))
    out = tmp_path / "dump"
    out.mkdir()
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(tests=str(Path(__file__).parent),
                                                        out=str(out))))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(script), *paths],
                          env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    for i in (0, 1):  # one sync per epoch
        pre = [torch.load(out / f"bn_pre_{i}_rank{r}.pt") for r in (0, 1)]
        post = [torch.load(out / f"bn_post_{i}_rank{r}.pt") for r in (0, 1)]
        assert not torch.equal(pre[0]["bn.running_mean"], pre[1]["bn.running_mean"])
        for k in post[0]:
            assert torch.equal(post[0][k], post[1][k]), k
            assert torch.equal(post[1][k], pre[0][k]), k  # rank 0's statistics

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name in ("online", "cached"):
            single = _config(tmp_path, name, output_dir=str(tmp_path / "single"),
                             **{"train": {"epochs": 2}, **specs[name]})
            Trainer(single, "distill", quiet=True).fit()
            a = torch.load(tmp_path / "ddp" / name / "checkpoints/last.pt", weights_only=True)
            b = torch.load(single.run_dir / "checkpoints/last.pt", weights_only=True)
            assert a["world_size"] == 2 and b["world_size"] == 1
            diff = max((a["model"][k] - b["model"][k]).abs().max().item() for k in b["model"])
            assert diff <= 1e-5, (name, diff)
            ra, rb = read_metrics(tmp_path / "ddp" / name), read_metrics(single.run_dir)
            for x, y in zip(ra, rb, strict=True):
                for col in ("train_loss", "train_ce", "test_loss"):
                    assert float(x[col]) == pytest.approx(float(y[col]), abs=1e-5), (name, col)
                for col in ("train_warmup", "train_acc1", "test_acc1", "test_acc5"):
                    if col in y:
                        assert float(x[col]) == pytest.approx(float(y[col])), (name, col)
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------ fp16 GradScaler


def _cpu_fp16_autocast() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            return (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float16
    except (RuntimeError, ValueError):
        return False


def fp16_gradscaler_checks(device: torch.device) -> None:
    """The fp16 path of :class:`topkd.engine.step.TrainStep`: the loss is scaled, gradients are
    unscaled before clipping and the optimizer step (the update matches fp32 to fp16 precision,
    not 2^16 times larger), and a step with an inf gradient is skipped with the scale backed
    off. Also run on a GPU by a session that has one (see the module docstring)."""
    from topkd.engine.step import TrainStep
    from topkd.methods import create_method

    torch.manual_seed(0)
    student, teacher = TinyNet(10).to(device), TinyNet(10, width=16).to(device).eval()
    x = torch.randn(8, 3, 32, 32, device=device)
    y = torch.arange(8, device=device) % 10

    def step_of(model: torch.nn.Module, amp: torch.dtype | None) -> TrainStep:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        return TrainStep(model, teacher, create_method({"name": "kd"}, num_classes=10), opt,
                         device=device, amp_dtype=amp, grad_clip=5.0)

    twin = TinyNet(10).to(device)
    twin.load_state_dict(student.state_dict())
    fp16, fp32 = step_of(student, torch.float16), step_of(twin, None)
    assert fp16.scaler.is_enabled() and not fp32.scaler.is_enabled()
    scale0 = fp16.scaler.get_scale()
    assert scale0 == 2.0 ** 16
    w0 = [p.detach().clone() for p in student.parameters()]
    fp16(x, y, epoch=1)
    fp32(x, y, epoch=1)
    for p16, p32, p0 in zip(student.parameters(), twin.parameters(), w0):
        d16, d32 = p16.detach() - p0, p32.detach() - p0
        assert d32.abs().max() > 0
        torch.testing.assert_close(d16, d32, rtol=0.05, atol=0.02 * d32.abs().max().item())
    assert fp16.scaler.get_scale() == scale0  # a finite step does not back off

    poison = student.fc.weight.register_hook(lambda g: g * float("inf"))
    w1 = [p.detach().clone() for p in student.parameters()]
    fp16(x, y, epoch=1)
    poison.remove()
    assert all(torch.equal(p.detach(), w) for p, w in zip(student.parameters(), w1))
    assert fp16.scaler.get_scale() == scale0 * 0.5  # skipped, scale halved


@pytest.mark.skipif(not _cpu_fp16_autocast(), reason="this torch has no fp16 autocast on CPU")
def test_fp16_gradscaler_step_on_cpu():
    fp16_gradscaler_checks(torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp16_gradscaler_step_on_cuda():
    fp16_gradscaler_checks(torch.device("cuda"))
