"""The training loop shared by ``topkd train`` (model alone) and ``topkd distill``.

One :class:`Trainer` is one run (one seed) writing one run directory (docs/architecture.md).
The per-step work is kept on the device: loss terms and accuracy are summed there and read
back only every ``train.log_every`` steps and at the end of an epoch.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn
from tqdm import tqdm

from topkd.config import Config, ConfigError
from topkd.data.augment import build_batch_mix
from topkd.engine.augment import check_augmentation, unpack_images
from topkd.engine.batched import BatchedLoader
from topkd.engine.data import build_datasets, eval_loader, train_loader
from topkd.engine.evaluate import evaluate
from topkd.engine.optim import LRSchedule, set_lr
from topkd.engine.step import build_train_step
from topkd.utils.dist import DistInfo, all_reduce_sum, init_distributed
from topkd.utils.env import collect_env
from topkd.utils.io import atomic_torch_save, atomic_write_text, writable_dir_problem
from topkd.utils.seed import get_rng_state, seed_everything, set_rng_state

CKPT_FORMAT = "topkd.trainstate/v1"
#: Without a terminal (no progress bar) a progress line is printed at the first log point
#: after this many seconds within an epoch, so long epochs never look like a hang.
PROGRESS_LINE_EVERY_S = 60.0
PREV_CKPT = "last.prev.pt"  # the previous epoch's last.pt (resume falls back to it)
MODES = ("train", "distill")


def chance_collapse(rows: list[dict[str, Any]], num_classes: int) -> str | None:
    """Why the run learned nothing, or ``None``.

    A run whose training and evaluation accuracies stayed at chance level (at most 1.5 x
    ``100 / num_classes``) for two epochs or more has collapsed, with a finite loss that the
    non-finite check cannot see (e.g. logits blown up by too large a distillation gradient).
    ``rows`` are ``metrics.csv``'s rows.
    """
    if len(rows) < 2 or num_classes < 2:
        return None
    limit = 1.5 * 100.0 / num_classes
    keys = [k for k in ("train_acc1", "val_acc1", "test_acc1") if k in rows[0]]
    best = {k: max(float(r[k]) for r in rows) for k in keys}
    if not keys or any(v > limit for v in best.values()):
        return None
    seen = ", ".join(f"{k} <= {v:.2f}" for k, v in best.items())
    loss = float(rows[-1]["train_loss"])
    return (f"collapsed: every epoch at chance level ({seen}; chance {100.0 / num_classes:.2f} "
            f"on {num_classes} classes) with a finite loss (last {loss:.4g}): the run learned "
            "nothing. Look at the loss terms in metrics.csv; a lower optim.lr, smaller "
            "distillation weights or train.grad_clip may help")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; raised before anything of that epoch is saved."""


class Trainer:
    """Builds everything from a :class:`Config` and runs epochs; ``fit()`` returns the summary.

    Args:
        mode: ``"train"`` (criterion must not need a teacher) or ``"distill"``.
        run_dir: where to write (default ``cfg.output_dir / cfg.name``).
        resume: ``None``, ``"auto"`` (``run_dir/checkpoints/last.pt`` if present) or a path;
            default ``cfg.train.resume``.
        progress: called with the number of images after every training step (e.g. to drive
            an outer progress bar over several runs, as ``topkd demo`` does).
        quiet: no per-epoch progress bar and no per-epoch log line (files are written as usual).
    """

    def __init__(self, cfg: Config, mode: str = "distill", run_dir: str | Path | None = None,
                 *, resume: str | None = None, dist: DistInfo | None = None,
                 argv: list[str] | None = None,
                 progress: Callable[[int], None] | None = None, quiet: bool = False) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.cfg, self.mode, self.argv = cfg, mode, argv
        self.progress, self.quiet = progress, quiet
        self.dist = dist or init_distributed(cfg.train.device)
        self.device = self.dist.device
        self.is_main = self.dist.is_main
        self.run_dir = Path(run_dir) if run_dir is not None else cfg.run_dir
        self.ckpt_dir = self.run_dir / "checkpoints"
        if self.is_main and (why := writable_dir_problem(self.ckpt_dir)):  # before data/models
            raise ConfigError(f"cannot write the run directory {self.run_dir}: {why} "
                              "(choose another output_dir= / --output-dir, or name=)")
        t = cfg.train
        from topkd.methods import method_class

        self.method_cls = mcls = method_class(cfg.method)
        self.uses_teacher = mcls.needs_teacher
        if mode == "train" and self.uses_teacher:
            raise ConfigError(
                f"'topkd train' trains the model alone, but method {mcls.name!r} distils from a "
                "teacher: use 'topkd distill', or method.name=ce to train without one")
        if mode == "distill" and not self.uses_teacher:
            raise ConfigError(
                f"'topkd distill' distils from a teacher, but method {mcls.name!r} has no "
                "distillation term: use 'topkd train' to train the model alone, or pick a "
                "distillation method (method.name=kd, dkd, topkd, ...; 'topkd methods' lists "
                "them)")
        self.uses_cache = self.uses_teacher and t.teacher_cache is not None
        if self.uses_cache and (mcls.teacher_taps or mcls.extra_views):
            what = "teacher features" if mcls.teacher_taps else "the teacher on extra views"
            raise ConfigError(
                f"train.teacher_cache: method {mcls.name!r} needs {what}, but the cache stores "
                "the teacher's logits on its own views only; remove train.teacher_cache to run "
                "the teacher online")
        seed_everything(cfg.seed, cfg.deterministic)

        #: SHA-256 of the teacher's weights this run distils from (directly or through the
        #: cache built from them; ``checkpoints.state_dict_sha256``): recorded in env.json and
        #: last.pt, checked on resume.
        self.teacher_weights_sha256: str | None = None
        # Data.
        self.data = build_datasets(cfg)
        check_augmentation(cfg, mcls, uses_cache=self.uses_cache,
                           world_size=self.dist.world_size, image_size=self.data.input_size[1])
        train_ds = self.data.train
        if self.uses_cache:
            from topkd.cache import wrap_dataset

            try:
                train_ds = wrap_dataset(train_ds, t.teacher_cache, seed=cfg.seed,
                                        teacher_name=cfg.teacher.name,
                                        checkpoint=cfg.teacher.checkpoint,
                                        dataset_name=cfg.data.name, match_transform=True)
            except (ValueError, FileNotFoundError) as e:  # incl. CacheMismatchError
                raise ConfigError(f"train.teacher_cache={t.teacher_cache}: {e}") from None
            self.teacher_weights_sha256 = train_ds.cache.header.get("weights_sha256")
        if mcls.needs_index:
            from topkd.engine.data import WithIndex

            train_ds = WithIndex(train_ds)
        self.train_ds = train_ds
        self.train_loader, self._loader_gen = train_loader(train_ds, cfg, self.dist)
        self.val_loader = eval_loader(self.data.val, cfg, self.dist) if self.data.val else None
        self.test_loader = eval_loader(self.data.test, cfg, self.dist)
        n_batches = len(self.train_loader)
        self.steps_per_epoch = min(n_batches, t.max_steps_per_epoch or n_batches)

        # Models, method, optimisation.
        self.model = self._build_model()
        self.teacher = self._build_teacher() if self.uses_teacher and not self.uses_cache else None
        if self.teacher is not None:
            from topkd.checkpoints import state_dict_sha256

            self.teacher_weights_sha256 = state_dict_sha256(self.teacher.state_dict())
        self.method = self._build_method()
        _export_meta(self.method.eval_model(self.model), self.model)  # fail early, not at save
        self.step = build_train_step(cfg, self.model, self.teacher, self.method, self.device,
                                     ddp=self.dist.distributed)
        self.step.mix = build_batch_mix(cfg.data, self.data.num_classes)
        self.optimizer, self.scaler = self.step.optimizer, self.step.scaler
        self.amp_dtype = self.step.amp_dtype
        self.schedule = LRSchedule(cfg.sched, cfg.optim.lr, t.epochs, self.steps_per_epoch)

        # State (overwritten by resume).
        self.start_epoch, self.global_step = 1, 0
        self.best: dict[str, Any] = {
            "best_val_acc1": None, "best_val_epoch": None, "test_acc1_at_best_val": None,
            "best_test_acc1": None, "best_test_epoch": None,
            "last_test_acc1": None, "last_test_acc5": None, "last_test_loss": None,
        }
        self.rows: list[dict[str, Any]] = []
        self._rng_state: dict[str, Any] | None = None
        self.resumed_from = self._resume_path(resume if resume is not None else t.resume)
        if self.resumed_from is not None:
            self._load_checkpoint(self.resumed_from)
        self._tb: Any = None

    # ------------------------------------------------------------------ building

    def _build_model(self) -> nn.Module:
        from topkd.models import create_model

        c = self.cfg
        try:
            model = create_model(c.model.name, self.data.num_classes, **c.model.kwargs)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model: {e}") from None
        if c.train.sync_bn and self.dist.distributed:
            if self.device.type == "cuda":
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            else:
                warnings.warn("train.sync_bn needs CUDA; ignored on CPU", stacklevel=2)
        return model.to(self.device)  # channels_last: build_train_step

    def _build_teacher(self) -> nn.Module:
        from topkd.checkpoints import (
            STRICT_HINT,
            CheckpointMismatchError,
            UnsafeCheckpointError,
            load_teacher,
        )

        tc = self.cfg.teacher
        if not tc.name or not tc.checkpoint:
            raise ConfigError("distillation needs teacher.name and teacher.checkpoint (path to "
                              "the teacher's weights) or train.teacher_cache")
        if not Path(tc.checkpoint).expanduser().is_file():
            raise ConfigError(f"teacher.checkpoint not found: {tc.checkpoint} (train the teacher "
                              "first, or point to its weights on the command line: "
                              "teacher.checkpoint=PATH)")
        try:
            teacher = load_teacher(tc.name, self.data.num_classes,
                                   Path(tc.checkpoint).expanduser(), verbose=self.is_main,
                                   **tc.kwargs)
        except CheckpointMismatchError as e:
            raise ConfigError(f"teacher: {str(e).replace(STRICT_HINT, '')}  (do teacher.name and "
                              "teacher.kwargs give the architecture this file was saved from?)"
                              ) from None
        except (ValueError, TypeError, UnsafeCheckpointError) as e:
            raise ConfigError(f"teacher: {e}") from None  # incl. CorruptCheckpointError
        # channels_last: build_train_step
        return teacher.to(self.device).eval().requires_grad_(False)

    def _build_method(self) -> nn.Module:
        from topkd.methods import MethodContext, ParamError, create_method

        labels = None
        if self.method_cls.needs_index:
            from topkd.engine.data import dataset_labels

            labels = dataset_labels(self.train_ds)
        ctx = MethodContext(num_classes=self.data.num_classes, student=self.model,
                            teacher=self.teacher, input_size=self.data.input_size,
                            num_samples=len(self.train_ds),  # type: ignore[arg-type]
                            train_labels=labels)
        try:
            method = create_method(self.cfg.method, ctx)
        except (ValueError, ParamError) as e:
            raise ConfigError(f"method: {e}") from None
        # No per-step validation sync: non-finite losses are tracked on the device below and
        # checked at log points and before any checkpoint; labels are checked by the datasets.
        method.validate = False
        return method.to(self.device)

    def autocast(self) -> contextlib.AbstractContextManager:
        return self.step.autocast()

    # ------------------------------------------------------------------ checkpoints

    def _resume_path(self, resume: str | None) -> Path | None:
        if not resume:
            return None
        if resume == "auto":
            p = self.ckpt_dir / "last.pt"
            return p if p.is_file() else None
        p = Path(resume).expanduser()
        if not p.is_file():
            raise ConfigError(f"resume checkpoint not found: {p}")
        return p

    def _load_checkpoint(self, path: Path) -> None:
        from topkd.checkpoints import CorruptCheckpointError, UnsafeCheckpointError, read_torch_file

        try:
            ck = read_torch_file(path)
        except (CorruptCheckpointError, UnsafeCheckpointError) as e:
            prev = self.ckpt_dir / PREV_CKPT
            if path.resolve() == (self.ckpt_dir / "last.pt").resolve() and prev.is_file():
                # A damaged last.pt (copied/synced partially: our own writes are atomic): the
                # previous epoch's state is the last good one; never restart from scratch.
                warnings.warn(f"cannot resume from {path}: {e} Resuming from the previous "
                              f"epoch's checkpoint {prev} instead.", stacklevel=2)
                self.resumed_from = prev
                return self._load_checkpoint(prev)
            raise ConfigError(f"cannot resume: {e}") from None
        if not isinstance(ck, dict) or ck.get("format") != CKPT_FORMAT:
            raise ConfigError(f"{path} is not a topkd training checkpoint (no {CKPT_FORMAT!r}); "
                              "to start from weights only, use teacher.checkpoint / load_weights")
        try:
            self.model.load_state_dict(ck["model"])
            self.method.load_state_dict(ck.get("method") or {})
            self.optimizer.load_state_dict(ck["optimizer"])
        except (RuntimeError, ValueError) as e:  # another model / optimizer than this config's
            raise ConfigError(f"cannot resume from {path}: it does not fit this config "
                              f"(model {self.cfg.model.name}, optim {self.cfg.optim.name}): "
                              f"{str(e).splitlines()[0]}") from None
        if ck.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(ck["scaler"])
        saved, now = ck.get("teacher_weights_sha256"), self.teacher_weights_sha256
        if saved and now and saved != now:
            raise ConfigError(
                f"cannot resume from {path}: the run distils from other teacher weights (sha256 "
                f"{saved[:16]}...) than teacher.checkpoint={self.cfg.teacher.checkpoint} holds "
                f"now ({now[:16]}...): the teacher changed since the run started. Start a new "
                "run (another name or output_dir), or restore that teacher file.")
        self.start_epoch = int(ck["epoch"]) + 1
        self.global_step = int(ck["global_step"])
        self.best.update(ck["best"])
        self._rng_state = ck["rng"]
        if ck.get("world_size", 1) != self.dist.world_size:
            warnings.warn(f"resuming a {ck.get('world_size')}-rank run on "
                          f"{self.dist.world_size} ranks: data order will differ", stacklevel=2)
        if self.is_main:
            self.rows = [r for r in _read_csv(self.run_dir / "metrics.csv")
                         if int(r["epoch"]) <= int(ck["epoch"])]
            print(f"resumed from {path} (epoch {ck['epoch']} done, global step "
                  f"{self.global_step})", flush=True)

    def _save_checkpoint(self, epoch: int, improved: bool, row: dict[str, Any]) -> None:
        state = {
            "format": CKPT_FORMAT,
            "model": self.model.state_dict(),
            # Trainable modules and buffers of the method (connectors, memory banks...).
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            # The LR schedule is a pure function of (epoch, step): nothing else to restore.
            "scheduler": {"name": self.cfg.sched.name, "epoch": epoch},
            "epoch": epoch,
            "global_step": self.global_step,
            "best": dict(self.best),
            "rng": get_rng_state(),
            "world_size": self.dist.world_size,
            "teacher_weights_sha256": self.teacher_weights_sha256,
            "config": self.cfg.to_dict(),
        }
        last = self.ckpt_dir / "last.pt"
        if last.is_file():  # keep the previous good state: the fallback for a damaged last.pt
            _keep_previous(last, self.ckpt_dir / PREV_CKPT)
        atomic_torch_save(state, last)
        if improved:
            from topkd.checkpoints import save_weights

            net = self.method.eval_model(self.model)
            meta = {"epoch": epoch, "metrics": row, "model": self.cfg.model.name,
                    "selected_on": "val" if self.best_on == "val" else "test (oracle)",
                    "config": self.cfg.to_dict(), **_export_meta(net, self.model)}
            save_weights(net, self.ckpt_dir / "best.pt", meta=meta)

    # ------------------------------------------------------------------ run

    def fit(self, max_epochs: int | None = None) -> dict[str, Any] | None:
        """Train until ``train.epochs`` (or ``max_epochs`` more epochs; then returns ``None``)."""
        cfg = self.cfg
        if self.is_main:
            self._prepare_run_dir()
        if self._rng_state is not None:
            set_rng_state(self._rng_state)  # after every build step that may draw numbers
        end = cfg.train.epochs
        if max_epochs is not None:
            end = min(end, self.start_epoch - 1 + max_epochs)
        try:
            for epoch in range(self.start_epoch, end + 1):
                stats = self.train_one_epoch(epoch)
                self._end_epoch(epoch, stats)
        finally:
            if self._tb is not None:
                self._tb.close()
        if end < cfg.train.epochs:
            return None
        return self._finish()

    def _prepare_run_dir(self) -> None:
        if self.resumed_from is None and (self.ckpt_dir / "last.pt").is_file():
            warnings.warn(f"{self.run_dir} already holds a run: starting from scratch overwrites "
                          "it (use --resume to continue it)", stacklevel=3)
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        if not self.quiet and self.best_on != "val":
            print("note: " + ("best.pt is picked on the TEST split (train.best_on=test): an "
                              "oracle, labelled so in summary.json" if self.best_on == "test" else
                              "no validation split (data.val_fraction=0): no best.pt is written "
                              "and the run's number is its last-epoch test accuracy"), flush=True)
        self.cfg.save(self.run_dir / "config.yaml")
        env = collect_env(self.cfg.seed, self.argv, self.dist.world_size, self.device)
        env["mode"] = self.mode
        if self.uses_teacher:
            env["teacher_weights_sha256"] = self.teacher_weights_sha256
        env["speed"] = self.step.speed_settings()  # what the auto switches resolved to
        env["speed"]["loader"] = ("batched" if isinstance(self.train_loader, BatchedLoader)
                                  else "dataloader")
        env_path = self.run_dir / "env.json"
        if self.resumed_from is not None and env_path.is_file():
            # Keep the original environment; record each resume (host, versions may differ).
            first = json.loads(env_path.read_text())
            env["resumed_from"] = str(self.resumed_from)
            env["start_epoch"] = self.start_epoch
            first.setdefault("resumes", []).append(env)
            env = first
        atomic_write_text(env_path, json.dumps(env, indent=2) + "\n")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=self.start_epoch)
        except ImportError:  # tensorboard is optional
            self._tb = None

    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        cfg, dev = self.cfg, self.device
        self.step.train_module.train()
        self.train_loader.sampler.set_epoch(epoch)  # type: ignore[union-attr]
        # Worker seeds come from this generator: a function of (seed, epoch, rank) only.
        self._loader_gen.manual_seed((cfg.seed * 1_000_003 + epoch) * 1009 + self.dist.rank)
        if self.uses_cache:
            self.train_ds.set_epoch(epoch)  # type: ignore[attr-defined]
        steps, log_every = self.steps_per_epoch, cfg.train.log_every
        show = self.is_main and not self.quiet and sys.stderr.isatty()
        lines = self.is_main and not self.quiet and not show  # a log file: periodic lines
        bar = tqdm(total=steps, desc=f"epoch {epoch}/{cfg.train.epochs}", disable=not show,
                   leave=False, dynamic_ncols=True)
        keys: list[str] = []  # tensor-valued loss terms, fixed at the first step
        host_keys: list[str] = []  # python-number terms (e.g. the warm-up factor)
        sums = torch.zeros(1, device=dev)
        host_sums: dict[str, float] = {}
        correct = torch.zeros((), dtype=torch.long, device=dev)
        step_t = torch.full((), self.global_step, dtype=torch.long, device=dev)
        bad_step = torch.full((), -1, dtype=torch.long, device=dev)
        bad_vals = sums
        n_seen, lr0 = 0, self.schedule(epoch - 1, 0)
        t0 = tlog = tline = time.perf_counter()
        for step, batch in enumerate(self.train_loader):
            if step >= steps:
                break
            set_lr(self.optimizer, self.schedule(epoch - 1, step))
            x, views = unpack_images(batch[0], dev)  # views: extra views the method asked for
            y = batch[1].to(dev, non_blocking=True)
            cached = batch[2] if self.uses_cache else None
            index = batch[-1].to(dev, non_blocking=True) if self.method_cls.needs_index else None
            try:
                out, logits = self.step(x, y, epoch=epoch, cached=cached, index=index,
                                        views=views)
            except Exception as e:
                self._explain_failed_step(e, epoch, bad_step, bad_vals, keys)
                raise
            total, terms = out.total, out.terms
            if step == 0:
                keys = [k for k, v in terms.items()
                        if isinstance(v, torch.Tensor) and v.device == total.device]
                host_keys = [k for k in terms if k not in keys]
                sums = torch.zeros(1 + len(keys), device=dev)
                bad_vals = torch.full_like(sums, math.nan)
            n = y.size(0)
            vals = torch.stack([total.detach().float(), *(terms[k].float() for k in keys)])
            sums.add_(vals, alpha=n)
            for k in host_keys:
                host_sums[k] = host_sums.get(k, 0.0) + float(terms[k]) * n
            correct += (logits.detach().argmax(1) == y).sum()
            # Remember the first non-finite step on the device; checked at log points.
            step_t += 1
            newly = ~torch.isfinite(vals[0]) & (bad_step < 0)
            bad_step = torch.where(newly, step_t, bad_step)
            bad_vals = torch.where(newly, vals, bad_vals)
            n_seen += n
            self.global_step += 1
            bar.update(1)
            if self.progress is not None:
                self.progress(n)
            if self.global_step % log_every == 0 or step == steps - 1:
                self._check_finite(bad_step, bad_vals, keys, epoch)
                if show:
                    now = time.perf_counter()
                    avg = (sums / n_seen).tolist()
                    post = {"loss": f"{avg[0]:.4f}"}
                    post.update({k: f"{v:.4f}" for k, v in zip(keys, avg[1:])})
                    post["img/s"] = f"{n * log_every / max(now - tlog, 1e-9):.0f}"
                    bar.set_postfix(post, refresh=False)
                    tlog = now
                elif (lines and step < steps - 1  # the epoch's own line follows the last step
                      and (now := time.perf_counter()) - tline >= PROGRESS_LINE_EVERY_S):
                    tline, done = now, step + 1
                    eta = (now - t0) / done * (steps - done)
                    print(f"[{cfg.name} seed {cfg.seed}] epoch {epoch}/{cfg.train.epochs} step "
                          f"{done}/{steps} loss {float(sums[0]) / n_seen:.4f} "
                          f"({n_seen / (now - t0):.0f} img/s, epoch ETA {eta:.0f}s)", flush=True)
        bar.close()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)  # honest epoch time
        elapsed = time.perf_counter() - t0
        self._check_finite(bad_step, bad_vals, keys, epoch)
        tot = torch.cat([sums, correct.float()[None],
                         torch.tensor([float(n_seen)], device=dev),
                         torch.tensor([host_sums[k] for k in host_keys], device=dev)])
        tot = all_reduce_sum(tot).tolist()
        total_n = max(tot[1 + len(keys) + 1], 1.0)
        out = {"lr": lr0, "train_loss": tot[0] / total_n}
        out.update({f"train_{k}": v / total_n for k, v in zip(keys, tot[1:])})
        out.update({f"train_{k}": v / total_n for k, v in zip(host_keys, tot[len(keys) + 3:])})
        out["train_acc1"] = 100.0 * tot[1 + len(keys)] / total_n
        out["epoch_time_s"] = elapsed
        out["images_per_s"] = total_n / max(elapsed, 1e-9)
        return out

    def _check_finite(self, bad_step: torch.Tensor, bad_vals: torch.Tensor, keys: list[str],
                      epoch: int) -> None:
        flag = (bad_step >= 0).long().reshape(1)
        if self.dist.distributed:  # every rank must stop together, or the others hang
            flag = all_reduce_sum(flag.clone())
        if int(flag.item()) == 0:
            return
        g = int(bad_step.item())
        if g < 0:
            raise NonFiniteLossError(f"non-finite loss on another rank in epoch {epoch}; "
                                     f"last good checkpoint: {self.ckpt_dir / 'last.pt'}")
        vals = bad_vals.tolist()
        terms = ", ".join(f"{k}={v:.6g}" for k, v in zip(["total", *keys], vals))
        raise NonFiniteLossError(
            f"non-finite loss at global step {g} (epoch {epoch}): {terms}. Nothing of this "
            f"epoch was saved; last good checkpoint: {self.ckpt_dir / 'last.pt'}. Try a lower "
            "optim.lr, train.grad_clip, or amp=bf16 instead of fp16.")

    def _explain_failed_step(self, exc: Exception, epoch: int, bad_step: torch.Tensor,
                             bad_vals: torch.Tensor, keys: list[str]) -> None:
        """A step that raises on weights an earlier step made non-finite (e.g. an SVD of NaN
        features) is that divergence: say so instead of the downstream error. Only on this
        failure path, so the healthy loop keeps its single check per log point."""
        bad = [n for n, p in self.step.train_module.named_parameters()
               if not bool(torch.isfinite(p.detach()).all())]
        if not bad:
            return
        if int(bad_step.item()) >= 0 and not self.dist.distributed:
            self._check_finite(bad_step, bad_vals, keys, epoch)  # a non-finite loss: that one
        raise NonFiniteLossError(
            f"step {self.global_step + 1} (epoch {epoch}) failed ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:200]}) because an earlier step wrote non-finite "
            f"weights ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}) with a finite "
            "loss: a gradient was non-finite (e.g. kdsvd's SVD gradient at repeated singular "
            "values, which method.svd_grad=safe avoids). Last checkpoint: "
            f"{self.ckpt_dir / 'last.pt'} (non-finite too if it was saved after that "
            "step).") from exc

    def _sync_buffers(self) -> None:
        """Rank 0's BN statistics everywhere, so every shard is evaluated with one model."""
        if self.dist.distributed:
            for b in [*self.model.buffers(), *self.method.buffers()]:
                tdist.broadcast(b, src=0)

    def _end_epoch(self, epoch: int, stats: dict[str, float]) -> None:
        self._sync_buffers()
        ev = {"autocast": self.autocast, "channels_last": self.step.channels_last}
        net = self.method.eval_model(self.model)
        val = evaluate(net, self.val_loader, self.device, **ev) if self.val_loader else None
        test = evaluate(net, self.test_loader, self.device, **ev)
        row: dict[str, Any] = {"epoch": epoch, **stats}
        if val is not None:
            row["val_acc1"] = val["acc1"]
        row.update(test_acc1=test["acc1"], test_acc5=test["acc5"], test_loss=test["loss"])
        # Reorder: time/throughput last, as in the documented column order.
        row = {k: row[k] for k in row if k not in ("epoch_time_s", "images_per_s")} | {
            "epoch_time_s": stats["epoch_time_s"], "images_per_s": stats["images_per_s"]}
        b = self.best
        improved = False  # best.pt is rewritten only on the split train.best_on selects
        if val is not None and (b["best_val_acc1"] is None or val["acc1"] > b["best_val_acc1"]):
            b.update(best_val_acc1=val["acc1"], best_val_epoch=epoch,
                     test_acc1_at_best_val=test["acc1"])
            improved = self.best_on == "val"
        if b["best_test_acc1"] is None or test["acc1"] > b["best_test_acc1"]:
            b.update(best_test_acc1=test["acc1"], best_test_epoch=epoch)
            improved = improved or self.best_on == "test"
        b.update(last_test_acc1=test["acc1"], last_test_acc5=test["acc5"],
                 last_test_loss=test["loss"])
        if not self.is_main:
            return
        self.rows.append(row)
        _write_csv(self.run_dir / "metrics.csv", self.rows)
        if len(self.rows) == 2 and (why := chance_collapse(self.rows, self.data.num_classes)):
            warnings.warn(f"{self.cfg.name} seed {self.cfg.seed}: {why}", stacklevel=2)
        if self._tb is not None:
            for k, v in row.items():
                if k != "epoch":
                    split = k.startswith(("train_", "val_", "test_"))
                    tag = k.replace("_", "/", 1) if split else f"misc/{k}"
                    self._tb.add_scalar(tag, float(v), epoch)
            self._tb.flush()
        self._save_checkpoint(epoch, improved, row)
        if self.quiet:
            return
        vtxt = f" val@1 {val['acc1']:.2f}" if val is not None else ""
        print(f"[{self.cfg.name} seed {self.cfg.seed}] epoch {epoch}/{self.cfg.train.epochs} "
              f"lr {stats['lr']:.4g} loss {stats['train_loss']:.4f} train@1 "
              f"{stats['train_acc1']:.2f}{vtxt} test@1 {test['acc1']:.2f} "
              f"({stats['images_per_s']:.0f} img/s, {stats['epoch_time_s']:.1f}s)", flush=True)

    @property
    def best_on(self) -> str | None:
        """The split that picks ``best.pt``: ``"val"``, ``"test"`` (oracle) or ``None``."""
        choice = self.cfg.train.best_on
        if choice == "auto":
            return "val" if self.val_loader is not None else None
        return choice

    def _finish(self) -> dict[str, Any]:
        summary = {"name": self.cfg.name, "seed": self.cfg.seed, "epochs": self.cfg.train.epochs,
                   "mode": self.mode, "best_on": self.best_on,
                   **{k: self.best[k] for k in (
                       "best_val_acc1", "best_val_epoch", "test_acc1_at_best_val",
                       "last_test_acc1", "last_test_acc5", "last_test_loss",
                       "best_test_acc1", "best_test_epoch")}}
        if self.is_main and (why := chance_collapse(self.rows, self.data.num_classes)):
            summary["warnings"] = [why]  # reports flag the run
        if self.is_main:
            atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary


def _export_meta(net: nn.Module, model: nn.Module) -> dict[str, Any]:
    """``{"wrapper": spec}`` when the method evaluates a network around the student (so that
    ``topkd eval best.pt`` rebuilds it, :mod:`topkd.models.wrappers`), else ``{}``."""
    if net is model:
        return {}
    spec = getattr(net, "wrapper_spec", None)
    if spec is None:
        raise ConfigError(f"the method's evaluation network {type(net).__name__} cannot be "
                          "exported: it has no wrapper_spec (see topkd.models.wrappers)")
    return {"wrapper": spec}


def _keep_previous(last: Path, prev: Path) -> None:
    """Make ``prev`` the current ``last`` (a hard link, so no copy), replacing it atomically."""
    tmp = prev.with_name(f".{prev.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(last, tmp)
    except OSError:  # file system without hard links
        shutil.copyfile(last, tmp)
    os.replace(tmp, prev)


def _read_csv(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())
