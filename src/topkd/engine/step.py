"""One training step, shared by the :class:`~topkd.engine.trainer.Trainer` and the benchmark.

:class:`TrainStep` runs the teacher (or takes cached logits), the student with the feature taps
the method asked for, the method's loss, backward and the optimizer step. It knows nothing
method-specific: everything comes from the method's declared requirements
(:class:`topkd.methods.Method`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from topkd.methods import Batch, LossOutput, Method, ModelOutput
from topkd.utils.dist import all_reduce_mean_

__all__ = ["Distiller", "TrainStep", "batchnorm_batch_stats", "build_train_step"]


class _Runner:
    """Calls a model and returns :class:`ModelOutput` with the requested feature taps.

    ``call`` is what runs the forward (the model, or its ``torch.compile`` wrapper); the taps'
    hooks sit on the raw module inside it (:class:`topkd.models.features.FeatureTaps`), and only
    for the kinds the method asked for.
    """

    def __init__(self, model: nn.Module, kinds: tuple[str, ...],
                 call: Callable[[Tensor], Tensor] | None = None) -> None:
        self.kinds = kinds
        self.call = call if call is not None else model
        self.taps = None
        if kinds:
            from topkd.models.features import FeatureTaps

            self.taps = FeatureTaps(self.call, kinds)  # type: ignore[arg-type]

    def __call__(self, x: Tensor) -> ModelOutput:
        if self.taps is None:
            return ModelOutput(self.call(x))
        logits, feats = self.taps(x)
        return ModelOutput(logits, dict(feats))


class Distiller(nn.Module):
    """Student + method as one module, so that DDP synchronises the gradients of both.

    ``forward`` runs the student on the main view (and extra views) and returns the method's
    :class:`LossOutput` and the main-view logits of the evaluated network (the student's, or
    those the method gives in ``LossOutput.logits``) for the training accuracy.
    """

    def __init__(self, student: nn.Module, method: Method,
                 student_call: Callable[[Tensor], Tensor] | None = None) -> None:
        super().__init__()
        self.student = student
        self.method = method
        self._run = _Runner(student, tuple(method.student_taps), student_call)
        #: Context manager of the student forward (set by TrainStep for AMP).
        self.autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext

    def forward(self, x: Tensor, labels: Tensor, teacher: ModelOutput | None, epoch: float,
                index: Tensor | None = None,
                views: dict[str, tuple[Tensor, ModelOutput | None]] | None = None,
                ) -> tuple[LossOutput, Tensor]:
        with self.autocast():
            s_out = self._run(x)
            extra = {name: (self._run(xv), t) for name, (xv, t) in (views or {}).items()}
        batch = Batch(s_out, teacher, labels, epoch, index, extra)
        out = self.method(batch)
        return out, s_out.logits if out.logits is None else out.logits


@contextlib.contextmanager
def batchnorm_batch_stats(model: nn.Module) -> Iterator[None]:
    """Within the block, ``model``'s BatchNorm layers normalise with the batch's statistics and
    leave their running statistics (and ``num_batches_tracked``) untouched."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.training, m.track_running_stats) for m in bns]
    for m in bns:
        m.training, m.track_running_stats = True, False
    try:
        yield
    finally:
        for m, (training, track) in zip(bns, saved):
            m.training, m.track_running_stats = training, track


class TrainStep:
    """A callable ``step(x, y, epoch=..., cached=..., index=..., views=...)`` doing one update.

    Args:
        student: the raw student (its parameters are optimised; not wrapped).
        teacher: the frozen teacher, or ``None`` (method without teacher, or cached logits).
        method: the distillation method (its parameters are optimised too).
        optimizer: over the student's and the method's parameters.
        device, amp_dtype, channels_last, compile, grad_clip: engine settings, resolved
            (:mod:`topkd.engine.speed`). ``compile``: the student, the teacher and the method's
            loss run through :class:`~topkd.engine.speed.CompiledOrEager` (each falls back to
            eager on its own); the modules themselves are not wrapped, so their state_dicts keep
            their keys.
        ddp: wrap student + method in ``DistributedDataParallel``.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None, method: Method,
                 optimizer: torch.optim.Optimizer, *, device: torch.device,
                 amp_dtype: torch.dtype | None = None, channels_last: bool = False,
                 compile: bool = False, grad_clip: float | None = None,
                 ddp: bool = False) -> None:
        self.student, self.teacher, self.method = student, teacher, method
        self.optimizer, self.device = optimizer, device
        self.amp_dtype, self.channels_last, self.grad_clip = amp_dtype, channels_last, grad_clip
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
        from topkd.engine.speed import CompiledOrEager, compile_method

        self.compiled: list[CompiledOrEager] = []
        student_call = None
        if compile:
            student_call = CompiledOrEager(student, "the student")
            self.compiled = [student_call, *compile_method(method)]
        self.distiller = Distiller(student, method, student_call)
        self.distiller.autocast = self.autocast
        self.train_module: nn.Module = self.distiller
        if ddp:
            ids = [device.index] if device.type == "cuda" else None
            own = [f"method.{n}" for n in method.ddp_synced_buffers]
            if own:  # kept in sync by the method: no broadcast from rank 0 each forward
                nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                    self.distiller, own)
            self.train_module = nn.parallel.DistributedDataParallel(
                self.distiller, device_ids=ids,
                find_unused_parameters=method.ddp_find_unused_parameters)
        self._teacher_run = None
        if teacher is not None:
            t_call = CompiledOrEager(teacher, "the teacher") if compile else None
            if t_call is not None:
                self.compiled.append(t_call)
            self._teacher_run = _Runner(teacher, tuple(method.teacher_taps), t_call)
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        # An optimizer that needs the task and distillation parts of the loss (DOT) runs its own
        # backward passes; under DDP it averages their gradients itself (forward in no_sync()).
        self._own_step = getattr(optimizer, "backward_and_step", None)
        self._grad_sync = all_reduce_mean_ if ddp else None
        if self._own_step is not None and (self.scaler.is_enabled() or grad_clip is not None):
            raise ValueError(f"{type(optimizer).__name__} runs its own backward passes: fp16 "
                             "loss scaling and gradient clipping are not supported with it")
        #: ``x, y = mix(x, y)`` before the teacher and the student see the batch (Mixup/CutMix,
        #: label smoothing: :class:`topkd.data.augment.BatchMix`); set by the trainer.
        self.mix: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def teacher_outputs(self, x: Tensor, cached: Tensor | None) -> ModelOutput | None:
        if cached is not None:
            return ModelOutput(cached.to(self.device, non_blocking=True).float())
        if self._teacher_run is None:
            return None
        bn = batchnorm_batch_stats(self.teacher) if self.method.teacher_bn_batch_stats else \
            contextlib.nullcontext()
        if self._teacher_run.taps is None:
            with torch.inference_mode(), self.autocast(), bn:
                out = self._teacher_run(x)
            # Inference tensors cannot be saved for backward: take a normal fp32 copy.
            return ModelOutput(out.logits.to(torch.float32, copy=True))
        # Features may be saved for backward by the method: plain no_grad, not inference mode.
        with torch.no_grad(), self.autocast(), bn:
            out = self._teacher_run(x)
        return ModelOutput(out.logits.float(), out.feats)

    def __call__(self, x: Tensor, y: Tensor, *, epoch: float, cached: Tensor | None = None,
                 index: Tensor | None = None, views: dict[str, Tensor] | None = None,
                 ) -> tuple[LossOutput, Tensor]:
        if self.mix is not None:  # the teacher sees the same mixed images as the student
            x, y = self.mix(x, y)
        mf = torch.channels_last if self.channels_last else torch.contiguous_format
        x = x.contiguous(memory_format=mf)
        teacher = self.teacher_outputs(x, cached)
        vouts = {}
        for name, xv in (views or {}).items():
            xv = xv.contiguous(memory_format=mf)
            vouts[name] = (xv, self.teacher_outputs(xv, None))
        with self._ddp_sync():
            out, logits = self.train_module(x, y, teacher, epoch, index, vouts or None)
        if self._own_step is not None:
            self._own_step(out, self._grad_sync)
            return out, logits
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out.total).backward()
        if self.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return out, logits

    def _ddp_sync(self) -> contextlib.AbstractContextManager:
        """DDP's gradient all-reduce during backward, unless the optimizer does its own."""
        if self._own_step is not None and self._grad_sync is not None:
            return self.train_module.no_sync()  # type: ignore[operator]
        return contextlib.nullcontext()

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None}

    def speed_settings(self) -> dict[str, Any]:
        """What ``train.amp/channels_last/compile`` resolved to (``compiled``: the components
        running compiled now, i.e. without those that fell back to eager)."""
        return {"amp": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "fp32",
                "channels_last": self.channels_last,
                "compiled": [c.name for c in self.compiled if c.is_compiled]}


def build_train_step(cfg: Any, student: nn.Module, teacher: nn.Module | None, method: Method,
                     device: torch.device, *, ddp: bool = False) -> TrainStep:
    """The optimizer and :class:`TrainStep` of a config (``cfg.optim``, ``cfg.train``), as the
    trainer and the benchmark (``topkd.engine.bench``) build them.

    Resolves the speed switches (:mod:`topkd.engine.speed`) and, with channels_last, converts
    the student, the teacher and the method's modules in place."""
    import warnings

    from topkd.engine.optim import build_optimizer
    from topkd.engine.speed import resolve_amp, resolve_channels_last, resolve_compile

    t = cfg.train
    amp_dtype = resolve_amp(t.amp, device)
    if t.amp not in ("none", "auto") and amp_dtype is None:
        warnings.warn(f"train.amp={t.amp} ignored on {device} (fp16 autocast is CUDA-only here; "
                      "bf16 runs on CUDA and the CPU)", stacklevel=3)
    channels_last = resolve_channels_last(t.channels_last, student, teacher)
    if channels_last:
        for m in (student, teacher, method):
            if m is not None:
                m.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg.optim, [*student.parameters(), *method.parameters()])
    return TrainStep(student, teacher, method, optimizer, device=device, amp_dtype=amp_dtype,
                     channels_last=channels_last, compile=resolve_compile(t.compile, device),
                     grad_clip=t.grad_clip, ddp=ddp)
