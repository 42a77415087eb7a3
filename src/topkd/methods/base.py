"""The method interface: :class:`Method`, what it receives (:class:`Batch`) and returns.

A method computes the loss of one training step from the outputs of the student and (frozen)
teacher. It declares what it needs and the engine provides exactly that, knowing nothing else
about the method:

========================  ==================================================================
``needs_teacher``         teacher outputs (logits; the teacher-logit cache can supply them)
``student_taps``          intermediate student features, kinds of
``teacher_taps``          :data:`topkd.models.features.TAP_KINDS` (``feats``, ``preact_feats``,
                          ``pooled_feat``); teacher features rule out the logit cache
``needs_index``           each sample's index in the training set (``batch.index``)
``extra_views``           other augmented views of each image (e.g. MLKD's ``"strong"``)
trainable submodules      optimised with the student, checkpointed, restored on resume,
                          gradients averaged under DDP; not part of the exported student
:meth:`eval_model`        the network evaluated and exported (default: the student)
========================  ==================================================================

The total is ``ce * CE(student, y) + warm(epoch) * distill`` (:class:`MethodParams`);
:meth:`Method.distill` is the only method-specific part of most methods.

From a plain training loop (logit methods)::

    method = create_method({"name": "dkd", "beta": 8.0}, num_classes=100)
    out = method(student_logits, teacher_logits, labels, epoch=epoch)
    out.total.backward()          # out.terms: detached values for logging
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from topkd.losses._validate import as_compute, prepare, reduce_rows
from topkd.losses.functional import autocast_off

from .params import MethodParams

__all__ = ["Batch", "LossOutput", "Method", "MethodContext", "ModelOutput"]


@dataclass
class ModelOutput:
    """One model's outputs for a batch: ``logits (B, C)`` and the requested feature taps."""

    logits: Tensor
    feats: dict[str, Any] = field(default_factory=dict)


@dataclass
class Batch:
    """Everything a method may read in one training step.

    ``student``/``teacher`` are outputs on the main view; ``views`` holds the extra views a
    method asked for (``{"strong": (student_out, teacher_out)}``); ``labels`` are ``(B,)`` int
    class indices or ``(B, C)`` probabilities (mixup); ``index`` the samples' dataset indices
    when ``needs_index``; ``epoch`` counts from 1 (fractional values are allowed).
    """

    student: ModelOutput
    teacher: ModelOutput | None
    labels: Tensor
    epoch: float | None = None
    index: Tensor | None = None
    views: dict[str, tuple[ModelOutput, ModelOutput | None]] = field(default_factory=dict)
    eval_logits: Tensor | None = None

    @classmethod
    def of_logits(cls, student_logits: Tensor, teacher_logits: Tensor | None, labels: Tensor,
                  epoch: float | None = None) -> Batch:
        t = None if teacher_logits is None else ModelOutput(teacher_logits)
        return cls(ModelOutput(student_logits), t, labels, epoch)


@dataclass
class LossOutput:
    """``total = task + distill``; ``terms`` are detached 0-d tensors for logging.

    ``task`` is the CE part (``ce * CE``), ``distill`` the warmed-up distillation part: an
    optimizer such as DOT treats their gradients separately. ``logits``: the evaluated
    network's main-view logits (detached) when a method set ``Batch.eval_logits``, else ``None``
    (the student's own logits are the evaluated ones).
    """

    total: Tensor
    task: Tensor
    distill: Tensor
    terms: dict[str, Tensor]
    logits: Tensor | None = None

    def __iter__(self):  # ``total, terms = method(...)``
        return iter((self.total, self.terms))


@dataclass
class MethodContext:
    """What a method may look at when it is built (to size connectors, memory banks...).

    ``student``/``teacher`` are the raw models (not wrapped); ``teacher`` is ``None`` when the
    logits come from a cache. ``input_size`` is ``(C, H, W)`` of the training images and
    ``num_samples`` the size of the training set (indices are in ``[0, num_samples)``);
    ``train_labels`` ``(num_samples,)`` its labels in index order (given to methods with
    ``needs_index``, e.g. CRD's negatives of other classes).
    """

    num_classes: int
    student: nn.Module | None = None
    teacher: nn.Module | None = None
    input_size: tuple[int, int, int] | None = None
    num_samples: int | None = None
    train_labels: Tensor | None = None

    def feature_shapes(self, which: str, kinds: tuple[str, ...]) -> dict[str, Any]:
        """Shapes of the taps of ``"student"`` or ``"teacher"`` (one dummy forward, no grad)."""
        from topkd.models.features import feature_shapes

        model = self.student if which == "student" else self.teacher
        if model is None:
            raise ValueError(f"the {which} model is not available to size this method's modules "
                             "(a teacher-logit cache has no teacher features)")
        if self.input_size is None:
            raise ValueError("MethodContext.input_size is required to size this method's modules")
        return feature_shapes(model, self.input_size, kinds)


class Method(nn.Module):
    """Base class of every distillation method (``topkd.methods``); see the module docstring.

    Subclasses set ``Params`` (a frozen :class:`MethodParams` dataclass), the class-level
    requirements, ``paper``/``code`` (for ``topkd methods`` and ``docs/methods.md``), and
    implement :meth:`distill`. They are registered with :func:`topkd.methods.register_method`.
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type[MethodParams]] = MethodParams
    paper: ClassVar[str] = ""
    code: ClassVar[str] = ""
    needs_teacher: ClassVar[bool] = True
    student_taps: ClassVar[tuple[str, ...]] = ()
    teacher_taps: ClassVar[tuple[str, ...]] = ()
    needs_index: ClassVar[bool] = False
    extra_views: ClassVar[tuple[str, ...]] = ()
    #: Whether instances own trainable parameters (connectors...): documentation and a test.
    trainable_modules: ClassVar[bool] = False
    #: Some of the method's parameters may get no gradient in a step (e.g. modules of randomly
    #: drawn paths): DDP then looks for unused parameters every step.
    ddp_find_unused_parameters: ClassVar[bool] = False
    #: The engine runs the teacher's BatchNorm layers on the batch's statistics (their running
    #: statistics untouched) instead of eval mode; an instance may set it (OFD's reference runs
    #: its teacher in train mode).
    teacher_bn_batch_stats: bool = False
    #: Buffers the method keeps identical across DDP ranks itself (e.g. CRD's memory banks,
    #: updated from all-gathered embeddings): DDP does not re-broadcast them every step.
    ddp_synced_buffers: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: MethodParams | Mapping[str, Any] | None = None,
                 ctx: MethodContext | None = None) -> None:
        super().__init__()
        if params is None:
            params = self.Params()
        elif isinstance(params, Mapping):
            params = self.Params.from_dict({k: v for k, v in params.items() if k != "name"})
        if not isinstance(params, self.Params):
            raise TypeError(f"{type(self).__name__} needs {self.Params.__name__}, "
                            f"got {type(params).__name__}")
        self.params = params
        self.ctx = ctx
        #: Check logits for NaN/inf and labels for range on every call (one host sync). The
        #: engine turns it off and watches the loss itself.
        self.validate = True

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.params.to_dict().items())

    # ------------------------------------------------------------------ the loss
    @autocast_off
    def forward(self, batch: Batch | Tensor, teacher_logits: Tensor | None = None,
                labels: Tensor | None = None, *, epoch: float | None = None) -> LossOutput:
        """``method(batch)`` or, for logit methods, ``method(s, t, y, epoch=e)``."""
        if not isinstance(batch, Batch):
            if labels is None:
                raise ValueError(f"{self.name}: labels are required")
            batch = Batch.of_logits(batch, teacher_logits, labels, epoch)
        if self.needs_teacher and batch.teacher is None:
            raise ValueError(f"method {self.name!r} distils from a teacher, but no teacher "
                             "outputs were given")
        terms: dict[str, Tensor] = {}
        task = self.task_loss(batch, terms)
        if not self.needs_teacher:
            zero = task.new_zeros(())
            return LossOutput(task, task, zero, _detached(terms), batch.eval_logits)
        warm = self.params.warmup_factor(batch.epoch)
        dist = self.distill(batch, terms)
        distill = dist * warm if warm != 1.0 else dist
        terms["warmup"] = torch.tensor(warm, dtype=distill.dtype, device=distill.device)
        return LossOutput(task + distill, task, distill, _detached(terms), batch.eval_logits)

    def task_loss(self, batch: Batch, terms: dict[str, Tensor]) -> Tensor:
        """``ce * CE(student logits, labels)``; records ``terms["ce"]`` (unweighted)."""
        ce = cross_entropy(batch.student.logits, batch.labels, self.params.ignore_index,
                           validate=self.validate, fn=self.name)
        terms["ce"] = ce
        return self.params.ce * ce

    def distill(self, batch: Batch, terms: dict[str, Tensor]) -> Tensor:
        """The distillation part before warm-up (scalar); record unweighted parts in ``terms``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ engine hooks
    def eval_model(self, student: nn.Module) -> nn.Module:
        """The network that is evaluated and exported for this student (default: itself).

        A network other than the student must have a ``wrapper_spec`` (a registered wrapper of
        :mod:`topkd.models.wrappers`): the exported ``best.pt`` records it so that
        ``topkd eval`` rebuilds the same network.
        """
        return student


def _detached(terms: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in terms.items()}


def cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int | None = None, *,
                  validate: bool = True, fn: str = "cross_entropy") -> Tensor:
    """Mean CE over kept rows; ``(..., C)`` logits; int labels or ``(..., C)`` probabilities."""
    rows = prepare(fn, logits, None, labels, ignore_index=ignore_index, need_labels=True,
                   validate=validate)
    s = as_compute(rows.s)
    if labels.is_floating_point():
        soft = as_compute(labels.detach()).reshape(-1, s.shape[-1])
        ce_rows = -(soft * TF.log_softmax(s, -1)).sum(-1)
    else:
        ce_rows = TF.cross_entropy(s, rows.y, reduction="none")
    return reduce_rows(ce_rows, rows.keep, rows.lead, "mean")
