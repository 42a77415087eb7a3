"""DOT, the Distillation-Oriented Trainer (Zhao et al., ICCV 2023), as a torch optimizer.

SGD with momentum whose momentum is split by the *source* of the gradient: the task loss (CE)
gradient accumulates in one buffer with momentum ``momentum - delta``, the distillation-loss
gradient in a second buffer with ``momentum + delta``, and both buffers are applied every step.
Reference: megvii-research/mdistiller ``mdistiller/engine/dot.py`` (``dot``,
``DistillationOrientedTrainer``) and ``mdistiller/engine/trainer.py`` (class ``DOT``), commit
a08d46f10d6102bd6e3f258ca5ac880b020ea259.

One step, per parameter ``p`` with task gradient ``g_t`` and distillation gradient ``g_d``
(``m_t = momentum - delta``, ``m_d = momentum + delta``, ``m = (m_d + m_t) / 2``,
``wd`` weight decay, ``dmp`` dampening; a buffer's first value is the gradient itself, as
:class:`torch.optim.SGD`)::

    p has both gradients:  b_t = m_t * b_t + (1 - dmp) * (g_t + wd * p)
                           b_d = m_d * b_d + (1 - dmp) * g_d
    only g_t:              b_t = m   * b_t + (1 - dmp) * (g_t + wd * p)
    only g_d:              b_d = m   * b_d + (1 - dmp) * (g_d + wd * p)
                           (first step: b_d = g_d, *without* weight decay: see quirk 2)
    p <- p - lr * b_t - lr * b_d          (each buffer the parameter has)

"Has a gradient" means ``p.grad is not None`` after that loss's backward pass (gradients are
reset with ``set_to_none=True`` in between, as the reference does): a parameter the
distillation loss does not reach (e.g. the classifier under a feature loss on an earlier layer)
gets only ``g_t``; a method's own connector gets only ``g_d``.

Reference behaviour reproduced here, documented because it is easy to miss:

1. Weight decay goes into the *task* buffer of parameters that have both gradients (momentum
   ``m_t``), never into the distillation buffer; a parameter with one gradient uses the mean
   momentum ``m`` (``== momentum`` up to rounding) for it.
2. A parameter that gets only the distillation gradient starts its buffer from ``g_d`` without
   weight decay, but adds weight decay on every later step. ``kd_only_init_wd=True`` (config
   ``optim.dot_kd_only_init_wd``) adds it on the first step too. It changes nothing unless a
   parameter receives only the distillation gradient and ``weight_decay > 0``: both are checked.
3. No Nesterov variant and one shared ``lr``; the reference asserts one parameter group (groups
   are supported here, each with its own hyper-parameters).

With ``delta = 0`` the two buffers sum to SGD's buffer and DOT is SGD with momentum
(``tests/test_dot.py``). Usage (what :class:`topkd.engine.step.TrainStep` does)::

    out = method(batch)                    # LossOutput: out.task, out.distill
    optimizer.backward_and_step(out)       # = the reference's sequence:
    # zero_grad(set_to_none=True); out.distill.backward(retain_graph=True); step_kd()
    # zero_grad(set_to_none=True); out.task.backward(); step()
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["DOT", "REFERENCE_DELTA"]

#: mdistiller/engine/cfg.py: ``CFG.SOLVER.DOT.DELTA`` (CIFAR-100 and Tiny-ImageNet configs).
REFERENCE_DELTA = 0.075


class DOT(torch.optim.Optimizer):
    """Distillation-Oriented Trainer: SGD with separate task and distillation momentum buffers.

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        momentum: the base momentum, in ``(0, 1)``.
        delta: task momentum ``momentum - delta``, distillation momentum ``momentum + delta``;
            both must lie in ``(0, 1)`` and ``delta >= 0``.
        weight_decay: L2 penalty added to the task gradient (quirk 1 of the module docstring).
        dampening: as :class:`torch.optim.SGD` (the reference supports it; configs leave it 0).
        kd_only_init_wd: corrected variant of quirk 2 (default: the reference behaviour).

    State per parameter: ``momentum_buffer`` (task) and ``momentum_kd_buffer`` (distillation),
    the reference's names; both are in :meth:`state_dict`, so a resumed run is exact.
    """

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.9,
                 delta: float = REFERENCE_DELTA, weight_decay: float = 0.0,
                 dampening: float = 0.0, kd_only_init_wd: bool = False) -> None:
        if not lr > 0:
            raise ValueError(f"DOT: lr must be > 0, got {lr}")
        if not 0 < momentum < 1:
            raise ValueError(f"DOT: momentum must be in (0, 1), got {momentum}")
        if not (0 <= delta < momentum and momentum + delta < 1):
            raise ValueError(f"DOT: delta must satisfy 0 <= delta < momentum and momentum + "
                             f"delta < 1 (both momenta in (0, 1)), got delta={delta} with "
                             f"momentum={momentum}")
        if weight_decay < 0:
            raise ValueError(f"DOT: weight_decay must be >= 0, got {weight_decay}")
        if not 0 <= dampening < 1:
            raise ValueError(f"DOT: dampening must be in [0, 1), got {dampening}")
        if kd_only_init_wd and weight_decay == 0:
            raise ValueError("DOT: kd_only_init_wd=True has no effect with weight_decay=0")
        defaults = dict(lr=lr, momentum=momentum, delta=delta, weight_decay=weight_decay,
                        dampening=dampening, kd_only_init_wd=kd_only_init_wd)
        super().__init__(params, defaults)
        # Distillation gradients between step_kd() and step(): {id(param): grad}. Not state:
        # they live within one training step.
        self._kd_grads: dict[int, Tensor] = {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch would take another optimizer's state silently (SGD's momentum_buffer as DOT's
        # task buffer, no distillation buffer): refuse anything that is not a DOT state.
        groups = state_dict.get("param_groups") or []
        if not all("delta" in g and "kd_only_init_wd" in g for g in groups):
            raise ValueError("this optimizer state is not DOT's (no 'delta' in its parameter "
                             "groups): it was saved by another optimizer")
        super().load_state_dict(state_dict)

    @torch.no_grad()
    def step_kd(self) -> None:
        """Record the current gradients as the distillation gradients of the next :meth:`step`
        (the reference's ``step_kd``); then reset them with ``zero_grad(set_to_none=True)``."""
        self._kd_grads = {id(p): p.grad for g in self.param_groups for p in g["params"]
                          if p.grad is not None}

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Update with the current gradients as task gradients and those of :meth:`step_kd`."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        kd, self._kd_grads = self._kd_grads, {}
        fresh = not self.state  # first step of this optimizer: buffers get created
        plans = []
        for group in self.param_groups:
            task = [p for p in group["params"] if p.grad is not None]
            in_task = {id(p) for p in task}
            dist = [(p, kd[id(p)]) for p in group["params"] if id(p) in kd]
            plans.append((group, task, in_task, dist))
            if fresh and group["kd_only_init_wd"] and not any(
                    id(p) not in in_task for p, _ in dist):
                from topkd.config import ConfigError  # a ValueError the CLI prints as one line

                raise ConfigError(
                    "DOT(kd_only_init_wd=True) (optim.dot_kd_only_init_wd) has no effect here: "
                    "no parameter receives only the distillation gradient (it only changes the "
                    "first step of such parameters, e.g. a method's connectors)")
        for group, task, in_task, dist in plans:
            self._update(group, task, in_task, dist)
        return loss

    def _update(self, group: dict[str, Any], task: list[Tensor], in_task: set[int],
                dist: list[tuple[Tensor, Tensor]]) -> None:
        lr, wd, damp = group["lr"], group["weight_decay"], group["dampening"]
        m_task = group["momentum"] - group["delta"]
        m_kd = group["momentum"] + group["delta"]
        m_one = (m_kd + m_task) / 2.0  # the reference's expression (rounding included)
        in_kd = {id(p) for p, _ in dist}
        # Task buffers first, then distillation buffers, as the reference. The weight decay of
        # a distillation-only parameter therefore uses its value before this step (the task
        # loop does not touch it).
        for p in task:
            d_p = p.grad if wd == 0 else p.grad.add(p, alpha=wd)
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                state["momentum_buffer"] = buf = torch.clone(d_p).detach()
            else:
                buf.mul_(m_task if id(p) in in_kd else m_one).add_(d_p, alpha=1 - damp)
            p.add_(buf, alpha=-lr)
        for p, d_p in dist:
            state = self.state[p]
            buf = state.get("momentum_kd_buffer")
            only_kd = id(p) not in in_task
            if buf is None:
                if only_kd and group["kd_only_init_wd"]:  # corrected variant of quirk 2
                    d_p = d_p.add(p, alpha=wd)
                state["momentum_kd_buffer"] = buf = torch.clone(d_p).detach()
            elif not only_kd:
                buf.mul_(m_kd).add_(d_p, alpha=1 - damp)
            else:
                if wd != 0:
                    d_p = d_p.add(p, alpha=wd)
                buf.mul_(m_one).add_(d_p, alpha=1 - damp)
            p.add_(buf, alpha=-lr)

    def backward_and_step(self, loss: Any,
                          grad_sync: Callable[[list[Tensor]], None] | None = None) -> None:
        """One DOT update from a :class:`topkd.methods.LossOutput` (``loss.task``,
        ``loss.distill`` of one forward pass): two backward passes, as the reference.

        ``grad_sync`` (DDP, forward run under ``no_sync()``) averages each pass's gradients
        across ranks in place before they are used.
        """
        if not (isinstance(loss.distill, Tensor) and loss.distill.requires_grad):
            raise ValueError("DOT separates the task and distillation gradients, but this loss "
                             "has no distillation term with a gradient (a method without a "
                             "teacher?): use optim.name=sgd")
        self.zero_grad(set_to_none=True)
        loss.distill.backward(retain_graph=True)
        self._sync(grad_sync)
        self.step_kd()
        self.zero_grad(set_to_none=True)
        loss.task.backward()
        self._sync(grad_sync)
        self.step()

    def _sync(self, grad_sync: Callable[[list[Tensor]], None] | None) -> None:
        if grad_sync is not None:
            grad_sync([p.grad for g in self.param_groups for p in g["params"]
                       if p.grad is not None])
