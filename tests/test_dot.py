"""DOT (Distillation-Oriented Trainer, Zhao et al., ICCV 2023): topkd.engine.dot.DOT.

The oracle is a line-by-line transcription of the reference optimizer and of the trainer code that
calls it (megvii-research/mdistiller @ a08d46f10d6102bd6e3f258ca5ac880b020ea259,
``mdistiller/engine/dot.py`` and ``mdistiller/engine/trainer.py`` class ``DOT``), run on float64
toy models whose parameters get both gradients, only the task gradient (a classifier after a
feature loss) and only the distillation gradient (a connector).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import _reference as R
from test_engine_common import (
    config_dict,
    make_cifar100,
    read_metrics,
    tiny_config,
    tinynet_registered,  # noqa: F401 (autouse fixture)
)
from topkd.config import ConfigError, load_config
from topkd.engine.dot import DOT, REFERENCE_DELTA
from topkd.methods import LossOutput

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


# --------------------------------------------------------------------------- the reference
# Transcribed from mdistiller/engine/dot.py (a08d46f), line by line; the closure argument dropped.


def ref_check_in(t, lst):
    for i in lst:  # noqa: SIM110 - verbatim
        if t is i:
            return True
    return False


def ref_dot(params, d_p_list, momentum_buffer_list, kd_grad_buffer, kd_momentum_buffer,
            kd_params, *, weight_decay, momentum, momentum_kd, lr, dampening):
    for i, param in enumerate(params):
        d_p = d_p_list[i]
        if weight_decay != 0:
            d_p = d_p.add(param, alpha=weight_decay)
        if momentum != 0:
            buf = momentum_buffer_list[i]
            if buf is None:
                buf = torch.clone(d_p).detach()
                momentum_buffer_list[i] = buf
            elif ref_check_in(param, kd_params):
                buf.mul_(momentum).add_(d_p, alpha=1 - dampening)
            else:
                buf.mul_((momentum_kd + momentum) / 2.).add_(d_p, alpha=1 - dampening)
            d_p = buf
        param.add_(d_p, alpha=-lr)

    for i, (d_p, buf, p) in enumerate(zip(kd_grad_buffer, kd_momentum_buffer, kd_params)):
        if buf is None:
            buf = torch.clone(d_p).detach()
            kd_momentum_buffer[i] = buf
        elif ref_check_in(p, params):
            buf.mul_(momentum_kd).add_(d_p, alpha=1 - dampening)
        else:
            if weight_decay != 0:
                d_p = d_p.add(p, alpha=weight_decay)
            buf.mul_((momentum_kd + momentum) / 2.).add_(d_p, alpha=1 - dampening)
        p.add_(buf, alpha=-lr)


class RefDOT(torch.optim.Optimizer):
    """mdistiller's ``DistillationOrientedTrainer`` (transcribed)."""

    def __init__(self, params, lr, momentum=0, momentum_kd=0, dampening=0, weight_decay=0):
        defaults = dict(lr=lr, momentum=momentum, momentum_kd=momentum_kd, dampening=dampening,
                        weight_decay=weight_decay)
        self.kd_grad_buffer = []
        self.kd_grad_params = []
        self.kd_momentum_buffer = []
        super().__init__(params, defaults)

    @torch.no_grad()
    def step_kd(self):
        assert len(self.param_groups) == 1, "Only implement for one-group params."
        for group in self.param_groups:
            params_with_grad = []
            d_p_list = []
            momentum_kd_buffer_list = []
            for p in group['params']:
                if p.grad is not None:
                    params_with_grad.append(p)
                    d_p_list.append(p.grad)
                    state = self.state[p]
                    if 'momentum_kd_buffer' not in state:
                        momentum_kd_buffer_list.append(None)
                    else:
                        momentum_kd_buffer_list.append(state['momentum_kd_buffer'])
        self.kd_momentum_buffer = momentum_kd_buffer_list
        self.kd_grad_buffer = d_p_list
        self.kd_grad_params = params_with_grad

    @torch.no_grad()
    def step(self):
        assert len(self.param_groups) == 1, "Only implement for one-group params."
        for group in self.param_groups:
            params_with_grad = []
            d_p_list = []
            momentum_buffer_list = []
            for p in group['params']:
                if p.grad is not None:
                    params_with_grad.append(p)
                    d_p_list.append(p.grad)
                    state = self.state[p]
                    if 'momentum_buffer' not in state:
                        momentum_buffer_list.append(None)
                    else:
                        momentum_buffer_list.append(state['momentum_buffer'])
            ref_dot(params_with_grad, d_p_list, momentum_buffer_list, self.kd_grad_buffer,
                    self.kd_momentum_buffer, self.kd_grad_params,
                    weight_decay=group['weight_decay'], momentum=group['momentum'],
                    momentum_kd=group['momentum_kd'], lr=group['lr'],
                    dampening=group['dampening'])
            for p, momentum_buffer in zip(params_with_grad, momentum_buffer_list):
                self.state[p]['momentum_buffer'] = momentum_buffer
            for p, momentum_kd_buffer in zip(self.kd_grad_params, self.kd_momentum_buffer):
                self.state[p]['momentum_kd_buffer'] = momentum_kd_buffer
            self.kd_grad_buffer = []
            self.kd_grad_params = []
            self.kd_momentum_buffer = []


def ref_optimizer(params, *, lr, momentum, delta, weight_decay, dampening=0.0):
    """mdistiller/engine/trainer.py ``DOT.init_optimizer`` (+ dampening, which it leaves 0)."""
    m_task = momentum - delta
    m_kd = momentum + delta
    return RefDOT(params, lr=lr, momentum=m_task, momentum_kd=m_kd, weight_decay=weight_decay,
                  dampening=dampening)


def ref_train_iter(optimizer, loss_ce, loss_kd):
    """mdistiller/engine/trainer.py ``DOT.train_iter``: the two backward passes."""
    optimizer.zero_grad(set_to_none=True)
    loss_kd.backward(retain_graph=True)
    optimizer.step_kd()
    optimizer.zero_grad(set_to_none=True)
    loss_ce.backward()
    optimizer.step()


# --------------------------------------------------------------------------- toy model


class Toy(nn.Module):
    """trunk -> head (CE); distillation: a feature loss through ``conn`` on the trunk's output
    (trunk both gradients, head only the task one, conn only the distillation one) and/or KD
    on the logits (head gets both)."""

    def __init__(self, feature_kd: bool = True, logit_kd: bool = False) -> None:
        super().__init__()
        self.trunk = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)
        self.conn = nn.Linear(6, 5)
        self.feature_kd, self.logit_kd = feature_kd, logit_kd

    def losses(self, x, y, t_feat, t_logits):
        h = torch.tanh(self.trunk(x))
        logits = self.head(h)
        task = 0.7 * F.cross_entropy(logits, y)
        distill = logits.new_zeros(())
        if self.feature_kd:
            distill = distill + 1.3 * ((self.conn(h) - t_feat) ** 2).mean()
        if self.logit_kd:
            distill = distill + 0.9 * 16 * F.kl_div(F.log_softmax(logits / 4, 1),
                                                    F.softmax(t_logits / 4, 1),
                                                    reduction="batchmean")
        return task, distill


def batches(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 4, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (8,), generator=g),
             torch.randn(8, 5, generator=g, dtype=torch.float64),
             torch.randn(8, 3, generator=g, dtype=torch.float64)) for _ in range(n)]


def toy(feature_kd=True, logit_kd=False, seed=0) -> Toy:
    torch.manual_seed(seed)
    return Toy(feature_kd, logit_kd).double()


def set_lr(opt, lr):
    for g in opt.param_groups:
        g["lr"] = lr


def max_diff(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def state_diff(ours: torch.optim.Optimizer, ref: torch.optim.Optimizer, a: nn.Module,
               b: nn.Module) -> float:
    worst = 0.0
    for p, q in zip(a.parameters(), b.parameters()):
        assert set(ours.state[p]) == set(ref.state[q])  # the same buffers exist
        for k, v in ours.state[p].items():
            worst = max(worst, (v - ref.state[q][k]).abs().max().item())
    return worst


HP = dict(lr=0.1, momentum=0.9, delta=0.075, weight_decay=5e-3)


@pytest.mark.parametrize("dampening", [0.0, 0.1])
@pytest.mark.parametrize("logit_kd", [False, True], ids=["feature_kd", "feature_and_logit_kd"])
def test_dot_matches_reference_update(logit_kd, dampening):
    ours_m, ref_m = toy(logit_kd=logit_kd), toy(logit_kd=logit_kd)
    ours = DOT(ours_m.parameters(), **HP, dampening=dampening)
    ref = ref_optimizer(ref_m.parameters(), **HP, dampening=dampening)
    for i, (x, y, tf, tl) in enumerate(batches(5)):
        if i == 3:  # an LR drop: both buffers keep their history
            set_lr(ours, 0.01)
            set_lr(ref, 0.01)
        task, distill = ours_m.losses(x, y, tf, tl)
        ours.backward_and_step(LossOutput(task + distill, task, distill, {}))
        ref_train_iter(ref, *ref_m.losses(x, y, tf, tl))
        assert max_diff(ours_m, ref_m) <= 1e-6, i
        assert state_diff(ours, ref, ours_m, ref_m) <= 1e-6, i
    # the cases the reference distinguishes did occur
    st = ours.state
    assert set(st[ours_m.trunk.weight]) == {"momentum_buffer", "momentum_kd_buffer"}
    assert set(st[ours_m.conn.weight]) == {"momentum_kd_buffer"}
    assert set(st[ours_m.head.weight]) == (
        {"momentum_buffer", "momentum_kd_buffer"} if logit_kd else {"momentum_buffer"})
    # and the two momenta matter: plain SGD with the base momentum ends elsewhere
    sgd_m = toy(logit_kd=logit_kd)
    sgd = torch.optim.SGD(sgd_m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-3,
                          dampening=dampening)
    for i, (x, y, tf, tl) in enumerate(batches(5)):
        if i == 3:
            set_lr(sgd, 0.01)
        sgd.zero_grad()
        sum(sgd_m.losses(x, y, tf, tl)).backward()
        sgd.step()
    assert max_diff(ours_m, sgd_m) > 1e-4


def test_step_kd_then_step_is_the_reference_api():
    """``step_kd`` / ``step`` used by hand, as mdistiller's trainer does."""
    ours_m, ref_m = toy(), toy()
    ours, ref = DOT(ours_m.parameters(), **HP), ref_optimizer(ref_m.parameters(), **HP)
    for x, y, tf, tl in batches(3):
        ref_train_iter(ours, *ours_m.losses(x, y, tf, tl))
        ref_train_iter(ref, *ref_m.losses(x, y, tf, tl))
    assert max_diff(ours_m, ref_m) <= 1e-6


def test_delta_zero_is_sgd_and_buffers_add_up():
    """delta=0: both buffers have SGD's momentum; by linearity they sum to SGD's buffer."""
    dot_m, sgd_m = toy(feature_kd=False, logit_kd=True), toy(feature_kd=False, logit_kd=True)
    dot = DOT(dot_m.parameters(), lr=0.1, momentum=0.9, delta=0.0, weight_decay=5e-3)
    sgd = torch.optim.SGD(sgd_m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-3)
    for x, y, tf, tl in batches(5):
        task, distill = dot_m.losses(x, y, tf, tl)
        dot.backward_and_step(LossOutput(task + distill, task, distill, {}))
        sgd.zero_grad()
        sum(sgd_m.losses(x, y, tf, tl)).backward()
        sgd.step()
        assert max_diff(dot_m, sgd_m) <= 1e-12
    for p, q in zip(dot_m.parameters(), sgd_m.parameters()):
        if p.grad is None:  # conn: unused here, untouched by both
            assert not dot.state[p] and not sgd.state[q]
            continue
        s = dot.state[p]
        torch.testing.assert_close(s["momentum_buffer"] + s["momentum_kd_buffer"],
                                   sgd.state[q]["momentum_buffer"], rtol=0, atol=1e-12)


def test_reference_quirk_kd_only_first_step_skips_weight_decay_and_the_corrected_variant():
    """A parameter with only the distillation gradient starts its buffer without weight decay
    (reference); ``kd_only_init_wd=True`` adds it, which makes delta=0 exactly SGD."""
    (x, y, tf, tl), *rest = batches(4)
    runs = {}
    for name, kw in (("ref", {}), ("fixed", {"kd_only_init_wd": True})):
        m = toy()
        opt = DOT(m.parameters(), lr=0.1, momentum=0.9, delta=0.0, weight_decay=5e-3, **kw)
        runs[name] = (m, opt)
    sgd_m = toy()
    sgd = torch.optim.SGD(sgd_m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-3)
    w0 = sgd_m.conn.weight.detach().clone()
    for m, opt in runs.values():
        task, distill = m.losses(x, y, tf, tl)
        opt.backward_and_step(LossOutput(task + distill, task, distill, {}))
    sgd.zero_grad()
    sum(sgd_m.losses(x, y, tf, tl)).backward()
    sgd.step()
    ref_conn = runs["ref"][0].conn.weight
    # reference: exactly SGD's step without the lr * wd * w term on the connector
    torch.testing.assert_close(ref_conn, sgd_m.conn.weight + 0.1 * 5e-3 * w0, rtol=0, atol=1e-12)
    torch.testing.assert_close(runs["ref"][0].trunk.weight, sgd_m.trunk.weight, rtol=0, atol=1e-12)
    for x_, y_, tf_, tl_ in rest:
        for m, opt in runs.values():
            task, distill = m.losses(x_, y_, tf_, tl_)
            opt.backward_and_step(LossOutput(task + distill, task, distill, {}))
        sgd.zero_grad()
        sum(sgd_m.losses(x_, y_, tf_, tl_)).backward()
        sgd.step()
    assert max_diff(runs["fixed"][0], sgd_m) <= 1e-12
    assert max_diff(runs["ref"][0], sgd_m) > 1e-6


def test_corrected_variant_against_transcription_with_the_fix():
    """delta > 0: the corrected variant differs from the reference only in that first buffer."""
    ours_m, ref_m = toy(), toy()
    ours = DOT(ours_m.parameters(), **HP, kd_only_init_wd=True)
    ref = ref_optimizer(ref_m.parameters(), **HP)
    for i, (x, y, tf, tl) in enumerate(batches(4)):
        task, distill = ours_m.losses(x, y, tf, tl)
        ours.backward_and_step(LossOutput(task + distill, task, distill, {}))
        if i == 0:  # the fix, applied to the reference's stashed gradients of its first step
            lc, lk = ref_m.losses(x, y, tf, tl)
            ref.zero_grad(set_to_none=True)
            lk.backward(retain_graph=True)
            ref.step_kd()
            kd_only = (ref_m.conn.weight, ref_m.conn.bias)
            for j, p in enumerate(ref.kd_grad_params):
                if any(p is q for q in kd_only):
                    ref.kd_grad_buffer[j] = ref.kd_grad_buffer[j].add(p, alpha=5e-3)
            ref.zero_grad(set_to_none=True)
            lc.backward()
            ref.step()
        else:
            ref_train_iter(ref, *ref_m.losses(x, y, tf, tl))
        assert max_diff(ours_m, ref_m) <= 1e-6, i


def test_kd_only_init_wd_without_kd_only_parameters_is_an_error():
    m = toy(feature_kd=False, logit_kd=True)  # every used parameter gets both gradients
    opt = DOT(m.parameters(), **HP, kd_only_init_wd=True)
    before = copy.deepcopy(m)
    task, distill = m.losses(*batches(1)[0])
    with pytest.raises(ConfigError, match="no parameter receives only the distillation"):
        opt.backward_and_step(LossOutput(task + distill, task, distill, {}))
    assert max_diff(m, before) == 0  # nothing was updated


def test_loss_without_distillation_term_and_bad_hyperparameters():
    m = toy()
    opt = DOT(m.parameters(), **HP)
    x, y, tf, tl = batches(1)[0]
    task, _ = m.losses(x, y, tf, tl)
    with pytest.raises(ValueError, match="no distillation term"):
        opt.backward_and_step(LossOutput(task, task, task.new_zeros(()), {}))
    for kw, match in (({"momentum": 0.0}, "momentum"), ({"delta": 0.9}, "delta"),
                      ({"delta": 0.15}, "delta"), ({"delta": -0.01}, "delta"),
                      ({"weight_decay": -1.0}, "weight_decay"), ({"lr": 0.0}, "lr"),
                      ({"weight_decay": 0.0, "kd_only_init_wd": True}, "no effect")):
        with pytest.raises(ValueError, match=match):
            DOT(m.parameters(), **{**HP, **kw})


def test_param_groups_each_use_their_own_hyperparameters():
    """Two groups (the reference asserts one) equal two single-group reference optimizers."""
    ours_m, ref_m = toy(), toy()
    trunk_ids = {id(p) for p in ours_m.trunk.parameters()}
    ours = DOT([{"params": list(ours_m.trunk.parameters()), "lr": 0.05},
                {"params": [p for p in ours_m.parameters() if id(p) not in trunk_ids]}], **HP)
    ref_a = ref_optimizer(ref_m.trunk.parameters(), **{**HP, "lr": 0.05})
    rest = [*ref_m.head.parameters(), *ref_m.conn.parameters()]
    ref_b = ref_optimizer(rest, **HP)
    for x, y, tf, tl in batches(3):
        task, distill = ours_m.losses(x, y, tf, tl)
        ours.backward_and_step(LossOutput(task + distill, task, distill, {}))
        lc, lk = ref_m.losses(x, y, tf, tl)
        for o in (ref_a, ref_b):
            o.zero_grad(set_to_none=True)
        lk.backward(retain_graph=True)
        ref_a.step_kd()
        ref_b.step_kd()
        for o in (ref_a, ref_b):
            o.zero_grad(set_to_none=True)
        lc.backward()
        ref_a.step()
        ref_b.step()
    assert max_diff(ours_m, ref_m) <= 1e-6


def test_state_dict_round_trip_keeps_both_buffers():
    m = toy()
    opt = DOT(m.parameters(), **HP)
    data = batches(4)
    for x, y, tf, tl in data[:2]:
        task, distill = m.losses(x, y, tf, tl)
        opt.backward_and_step(LossOutput(task + distill, task, distill, {}))
    m2 = copy.deepcopy(m)
    opt2 = DOT(m2.parameters(), **HP)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for mm, oo in ((m, opt), (m2, opt2)):
        for x, y, tf, tl in data[2:]:
            task, distill = mm.losses(x, y, tf, tl)
            oo.backward_and_step(LossOutput(task + distill, task, distill, {}))
    assert max_diff(m, m2) == 0
    assert state_diff(opt, opt2, m, m2) == 0
    sgd = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="not DOT's"):
        opt2.load_state_dict(sgd.state_dict())


def test_resuming_an_sgd_checkpoint_with_dot_is_a_config_error(tmp_path, teacher_ckpt):
    from topkd.engine import Trainer

    sgd = tiny_config(tmp_path, name="run", **{**dot_sections(teacher_ckpt),
                                                "optim": {"name": "sgd"}, "train": {"epochs": 1}})
    Trainer(sgd, "distill", quiet=True).fit()
    dot = tiny_config(tmp_path, name="run", **dot_sections(teacher_ckpt))
    with pytest.raises(ConfigError, match="not DOT.s"):
        Trainer(dot, "distill", quiet=True, resume="auto")


# --------------------------------------------------------------------------- engine


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    from topkd.checkpoints import save_weights
    from topkd.models import create_model

    tmp = tmp_path_factory.mktemp("dot_teacher")
    torch.manual_seed(1)
    path = tmp / "teacher.pt"
    save_weights(create_model("test_tinynet", 100, width=16), path)
    return path


def dot_sections(ckpt: Path, **optim) -> dict:
    return {"method": {"name": "kd"},
            "teacher": {"name": "test_tinynet", "kwargs": {"width": 16}, "checkpoint": str(ckpt)},
            "optim": {"name": "dot", **optim}}


def test_train_step_dispatches_to_dot_as_the_reference_trainer(teacher_ckpt):
    """TrainStep (the engine's step) == mdistiller's DOT.train_iter on the same KD losses."""
    from topkd.checkpoints import load_teacher
    from topkd.engine.step import TrainStep
    from topkd.methods import Batch, ModelOutput, create_method
    from topkd.models import create_model

    torch.manual_seed(0)
    student = create_model("test_tinynet", 100)
    ref_student = copy.deepcopy(student)
    teacher = load_teacher("test_tinynet", 100, teacher_ckpt, verbose=False, width=16).eval()
    method = create_method({"name": "kd"})
    step = TrainStep(student, teacher, method, DOT(student.parameters(), **HP),
                     device=torch.device("cpu"))
    ref = ref_optimizer(ref_student.parameters(), **HP)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = torch.randn(6, 3, 32, 32, generator=g), torch.randint(0, 4, (6,), generator=g)
        out, _ = step(x, y, epoch=1)
        with torch.no_grad():
            t = teacher(x)
        ref_out = method(Batch(ModelOutput(ref_student(x)), ModelOutput(t), y, 1))
        ref_train_iter(ref, ref_out.task, ref_out.distill)  # loss_ce, loss_kd
        assert torch.equal(out.total.detach(), ref_out.total.detach())
        assert max_diff(student, ref_student) <= 1e-6


def test_ddp_forward_runs_under_no_sync_and_dot_averages(monkeypatch, tmp_path):
    """Under DDP the reducer is not armed for DOT's forward (its two backward passes would
    otherwise be all-reduced once by DDP and again by DOT); DOT averages each pass itself."""
    import torch.distributed as tdist

    from topkd.engine import step as step_mod
    from topkd.engine.step import TrainStep
    from topkd.methods import create_method

    synced: list[int] = []
    real = step_mod.all_reduce_mean_
    monkeypatch.setattr(step_mod, "all_reduce_mean_",
                        lambda ts: (synced.append(len(ts)), real(ts)))
    tdist.init_process_group("gloo", store=tdist.FileStore(str(tmp_path / "store"), 1),
                             rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        student, teacher = nn.Linear(4, 3), nn.Linear(4, 3).requires_grad_(False)
        step = TrainStep(student, teacher, create_method({"name": "kd"}),
                         DOT(student.parameters(), **HP), device=torch.device("cpu"), ddp=True)
        armed = []
        step.distiller.register_forward_hook(
            lambda *_: armed.append(step.train_module.require_backward_grad_sync))
        step(torch.randn(5, 4), torch.randint(0, 3, (5,)), epoch=1)
        assert armed == [False] and step.train_module.require_backward_grad_sync
        assert synced == [2, 2]  # weight + bias, once per backward pass
    finally:
        tdist.destroy_process_group()


def test_train_step_rejects_grad_clip():
    from topkd.engine.step import TrainStep
    from topkd.methods import create_method

    m = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="gradient clipping"):
        TrainStep(m, None, create_method({"name": "kd"}), DOT(m.parameters(), **HP),
                  device=torch.device("cpu"), grad_clip=1.0)


def _final(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints/last.pt", weights_only=True)


def test_engine_dot_delta_zero_equals_sgd_and_delta_changes_it(tmp_path, teacher_ckpt):
    from topkd.engine import Trainer

    sec = dot_sections(teacher_ckpt)
    runs = {}
    for name, optim in (("sgd", {"name": "sgd"}), ("dot0", {"dot_delta": 0.0}), ("dot", {})):
        cfg = tiny_config(tmp_path, name=name, **{**sec, "optim": {**sec["optim"], **optim}})
        tr = Trainer(cfg, "distill", quiet=True)
        assert isinstance(tr.optimizer, DOT) == (name != "sgd")
        tr.fit()
        runs[name] = _final(cfg.run_dir)
    assert runs["dot"]["config"]["optim"]["dot_delta"] == REFERENCE_DELTA  # resolved, saved

    def diff(a, b):
        return max((runs[a]["model"][k] - runs[b]["model"][k]).abs().max().item()
                   for k in runs[a]["model"])

    assert diff("dot0", "sgd") <= 1e-6  # float32: two buffers vs one, rounding only
    assert diff("dot", "sgd") > 1e-4
    for st in runs["dot"]["optimizer"]["state"].values():  # KD reaches every parameter
        assert set(st) == {"momentum_buffer", "momentum_kd_buffer"}


def test_engine_resume_is_bit_exact_with_both_buffers(tmp_path, teacher_ckpt):
    from topkd.engine import Trainer

    sec = {**dot_sections(teacher_ckpt), "data": {"augment": True}, "train": {"epochs": 2}}
    ref = tiny_config(tmp_path, name="ref", **sec)
    Trainer(ref, "distill", quiet=True).fit()
    cut = tiny_config(tmp_path, name="cut", **sec)
    assert Trainer(cut, "distill", quiet=True).fit(max_epochs=1) is None
    torch.manual_seed(99)  # the resumed run must not depend on the process' RNG
    resumed = Trainer(cut, "distill", quiet=True, resume="auto")
    assert resumed.start_epoch == 2
    resumed.fit()
    a, b = _final(ref.run_dir), _final(cut.run_dir)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for i, st in a["optimizer"]["state"].items():
        assert set(st) == {"momentum_buffer", "momentum_kd_buffer"}
        for k, v in st.items():
            assert torch.equal(v, b["optimizer"]["state"][i][k]), (i, k)
    drop = ("epoch_time_s", "images_per_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in read_metrics(ref.run_dir)] == \
        [{k: v for k, v in r.items() if k not in drop} for r in read_metrics(cut.run_dir)]


def test_cli_train_with_dot_is_a_one_line_error(tmp_path, capsys):
    from topkd import cli

    make_cifar100(tmp_path / "data")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config_dict(tmp_path, optim={"name": "dot"})))
    assert cli.main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "optim.name=dot" in err and "method 'ce' has no distillation term" in err


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("sections, match", [
    ({"optim": {"dot_delta": 0.1}}, r"optim.dot_delta is a setting of the DOT optimizer .* "
                                    r"optim.name=sgd"),
    ({"optim": {"name": "adamw", "dot_kd_only_init_wd": False}}, r"optim.dot_kd_only_init_wd"),
    ({"optim": {"name": "dot", "momentum": 0.0}}, r"'optim.momentum'.*\(0, 1\)"),
    ({"optim": {"name": "dot", "dot_delta": 0.9}}, r"'optim.dot_delta': 0.9"),
    ({"optim": {"name": "dot", "dot_delta": 0.15}}, r"momentum \+ dot_delta < 1"),
    ({"optim": {"name": "dot", "dot_delta": -0.1}}, r"'optim.dot_delta'"),
    ({"optim": {"name": "dot", "nesterov": True}}, r"optim.nesterov=true: DOT has no Nesterov"),
    ({"optim": {"name": "dot", "weight_decay": 0.0, "dot_kd_only_init_wd": True}},
     r"dot_kd_only_init_wd=true has no effect with optim.weight_decay=0"),
    ({"optim": {"name": "dot"}, "train": {"grad_clip": 1.0}}, r"train.grad_clip .* optim.name=dot"),
    ({"optim": {"name": "dot"}, "train": {"amp": "fp16"}},
     r"train.amp=fp16 is not supported with optim.name=dot.*amp=bf16"),
    ({"optim": {"name": "dot"}, "method": {"name": "ce"}}, r"method 'ce' has no distillation"),
])
def test_config_errors_name_the_key(tmp_path, sections, match):
    with pytest.raises(ConfigError, match=match):
        tiny_config(tmp_path, **{"method": {"name": "kd"}, **sections})


def test_config_defaults_are_the_reference_and_bf16_is_accepted(tmp_path):
    cfg = tiny_config(tmp_path, method={"name": "kd"}, optim={"name": "dot"},
                      train={"amp": "bf16"})
    assert cfg.optim.dot_delta == REFERENCE_DELTA and cfg.optim.dot_kd_only_init_wd is False
    assert R.mdistiller("cfg_defaults.yaml")["SOLVER"]["DOT"]["DELTA"] == REFERENCE_DELTA
    sgd = tiny_config(tmp_path, method={"name": "kd"})
    assert sgd.optim.dot_delta is None and sgd.optim.dot_kd_only_init_wd is None


# --------------------------------------------------------------------------- shipped configs

# mdistiller model names -> ours, per dataset (mdistiller's "ResNet18" is a CIFAR-style ResNet18
# on Tiny-ImageNet and torchvision's on ImageNet).
MODELS = {
    "cifar100": {"resnet32x4": "resnet32x4", "resnet8x4": "resnet8x4", "ShuffleV2": "shufflev2",
                 "vgg13": "vgg13", "vgg8": "vgg8"},
    "tiny_imagenet": {"ResNet18": "resnet18_cifar", "MobileNetV2": "mobilenetv2_tinyimagenet",
                      "ShuffleV2": "shufflev2"},
    "imagenet": {"ResNet34": "resnet34", "ResNet18": "resnet18", "ResNet50": "resnet50",
                 "MobileNetV1": "mobilenetv1"},
}


def _check_against(ref: dict, leaf: Path, dataset: str) -> None:
    cfg = load_config(leaf).to_dict()
    sol, kd = ref["SOLVER"], ref["KD"]
    assert ref["DISTILLER"]["TYPE"] == "KD" and sol["TRAINER"] == "dot" and sol["TYPE"] == "SGD"
    assert ref["DATASET"]["TYPE"] == dataset == cfg["data"]["name"]
    assert MODELS[dataset][ref["DISTILLER"]["TEACHER"]] == cfg["teacher"]["name"]
    assert MODELS[dataset][ref["DISTILLER"]["STUDENT"]] == cfg["model"]["name"]
    o = cfg["optim"]
    assert o["name"] == "dot" and o["nesterov"] is False and o["dot_kd_only_init_wd"] is False
    assert (o["lr"], o["momentum"], o["weight_decay"], o["dot_delta"]) == (
        sol["LR"], sol["MOMENTUM"], sol["WEIGHT_DECAY"], sol["DOT"]["DELTA"])
    assert cfg["sched"]["name"] == "multistep" and cfg["sched"]["warmup_epochs"] == 0
    assert cfg["sched"]["milestones"] == sol["LR_DECAY_STAGES"]
    assert cfg["sched"]["gamma"] == sol["LR_DECAY_RATE"]
    assert cfg["train"]["epochs"] == sol["EPOCHS"]
    assert cfg["data"]["batch_size"] == sol["BATCH_SIZE"]
    assert cfg["train"]["grad_clip"] is None and cfg["train"]["amp"] != "fp16"
    m = cfg["method"]
    assert m["name"] == "kd" and m.get("tsm") is None and m.get("tdl") is None and not m["ls"]
    assert (m["ce"], m["kd_weight"], m["temperature"], m["warmup"]) == (
        kd["LOSS"]["CE_WEIGHT"], kd["LOSS"]["KD_WEIGHT"], kd["TEMPERATURE"], 0)


@pytest.mark.parametrize("pair", ["res32x4_res8x4", "res32x4_shuv2", "vgg13_vgg8"])
def test_cifar_dot_leaves_equal_mdistiller(pair):
    ref = R.mdistiller(f"configs/cifar100/dot/{pair}.yaml")
    _check_against(ref, CONFIGS / "cifar100" / pair / "dot.yaml", "cifar100")


def test_unpublished_cifar_pairs_are_the_pairs_kd_leaf_with_the_reference_dot_defaults():
    defaults = R.mdistiller("cfg_defaults.yaml")
    published = {p.stem for p in (R.REF / "mdistiller/configs/cifar100/dot").glob("*.yaml")}
    leaves = sorted((CONFIGS / "cifar100").glob("*/dot.yaml"))
    assert len(leaves) == 11 and published < {p.parent.name for p in leaves}
    for leaf in leaves:
        dot = load_config(leaf).to_dict()
        kd = load_config(leaf.with_name("kd.yaml")).to_dict()
        assert dot["optim"].pop("name") == "dot" and kd["optim"].pop("name") == "sgd"
        assert dot["optim"].pop("dot_delta") == defaults["SOLVER"]["DOT"]["DELTA"]
        assert dot["optim"].pop("dot_kd_only_init_wd") is False
        kd["optim"].pop("dot_delta"), kd["optim"].pop("dot_kd_only_init_wd")
        assert {**dot, "name": ""} == {**kd, "name": ""}, leaf
        assert kd["optim"]["momentum"] == defaults["SOLVER"]["MOMENTUM"]


@pytest.mark.parametrize("pair", ["r18_mv2", "r18_shuv2"])
def test_tiny_imagenet_dot_leaves_equal_mdistiller(pair):
    ref = R.mdistiller(f"configs/tiny_imagenet/dot/{pair}.yaml")
    _check_against(ref, CONFIGS / "tiny_imagenet" / pair / "dot.yaml", "tiny_imagenet")


@pytest.mark.parametrize("pair", ["r34_r18", "r50_mv1"])
def test_imagenet_dot_leaves_equal_mdistiller(pair):
    ref = R.mdistiller(f"configs/imagenet/{pair}/dot.yaml")
    _check_against(ref, CONFIGS / "imagenet" / pair / "dot.yaml", "imagenet")


def test_topkd_methods_mentions_dot():
    from topkd.methods.table import methods_table

    text = methods_table()
    assert "optim.name=dot" in text and "DOT" in text
    assert "dot" in methods_table(markdown=True).split("| `kd` |")[1].split("\n")[0]


# --------------------------------------------------------------------------- DDP

SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import test_engine_common
test_engine_common.register_tinynet()  # BN-free test model
from topkd import cli
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_two_process_ddp_dot_matches_single_process(tmp_path, teacher_ckpt):
    """Forward under no_sync(), each backward pass's gradients averaged by DOT: equal to one
    process with the same global batch (BN-free model, no augmentation; see test_ddp.py)."""
    make_cifar100(tmp_path / "data", n_train=32, n_test=15)
    sec = {**dot_sections(teacher_ckpt), "data": {"val_fraction": 0.25}, "train": {"epochs": 2}}
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(SCRIPT.format(tests=str(Path(__file__).parent))))
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(config_dict(tmp_path, **sec)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), "distill", str(cfg_path), "name=ddp"],
        env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    from topkd.engine import Trainer

    single = tiny_config(tmp_path, name="single", **sec)
    Trainer(single, "distill", quiet=True).fit()
    a, b = _final(tmp_path / "runs" / "ddp"), _final(single.run_dir)
    assert a["world_size"] == 2 and a["global_step"] == b["global_step"] == 4
    diff = max((a["model"][k] - b["model"][k]).abs().max().item() for k in b["model"])
    assert diff <= 1e-5, diff
    for i, st in b["optimizer"]["state"].items():
        for k, v in st.items():
            assert (v - a["optimizer"]["state"][i][k]).abs().max().item() <= 1e-5, (i, k)
