"""The testbed benchmark: every registered method on Fashion-MNIST and fashion_mnist_pairs,
through the engine (``topkd.engine.Trainer``, ordinary run directories), resumable.

Phases (``--phases``, in this order; each skips what is finished):

``teachers``   ``configs/teachers/<dataset>/<teacher>.yaml`` (``topkd train``) into
               ``OUT/teachers/<name>/``; the distillation runs use its ``best.pt`` (selected on
               the validation split).
``cache``      one teacher-logit cache per dataset (``OUT/cache/<dataset>/``, ``--views``
               crop/flip views of every student training image, float32), used through
               ``train.teacher_cache`` by every method that only needs teacher logits. Methods
               that need teacher features (or extra views) run the teacher online.
``tune``       for every method entry, the same number of trials (``--trials``) of
               ``--tune-epochs`` epochs, seed 0, scored by the best VALIDATION top-1 (the test
               set is not used to choose anything). Trial 0 is the method's reference
               configuration (``configs/methods/<entry>.yaml``, or the registry defaults); the
               others change one or two of its numeric parameters by x0.5 or x2 (``k`` by /2 or
               x2), drawn at random (seeded by dataset, entry and trial). CE has nothing to tune.
``final``      the chosen configuration of every entry, ``--seeds`` seeds, ``--epochs`` epochs;
               the number is test top-1 at the best-validation epoch.
``kablation``  TopKD (its chosen configuration) with k in ``--k-values``, every seed, on
               fashion_mnist_pairs (the 100-class set).
``controls``   KD and DKD on the ground-truth-corrected teacher (their chosen configurations with
               ``tsm: {gamma: 0, lam: 0, correct_gt: true}``, which is exactly the teacher with
               only TSM's ground-truth correction: tests/test_testbed.py) and TopKD without the
               correction (``tsm.correct_gt: false``), every seed, on both datasets.

Method entries are queried at run time: every method of the registry (``topkd.methods.METHODS``)
with its ``configs/methods/<name>.yaml`` (or its registry defaults), plus the variants of
``configs/methods/`` (``kd_ls``, ``kd_tsm_tdl``, ``dot``...). A method that cannot run a pair
(the engine refuses the config or the method refuses the models) is recorded with the reason
and reported as such; a run that fails while training is recorded as failed and retried on the
next invocation. Both leave ``outcome.json`` (status, reason, config) in the run directory, so
that ``--record`` reports them as they ended, not as not run yet. Everything is described in
``OUT/study.json``, which ``topkd report OUT`` renders (tables, paired differences, the
K-ablation plot) from the run directories.

Records outlive the machine: ``--archive FILE.tar.xz`` packs ``study.json``, the config, env,
summary and metrics of every finished run and the ``outcome.json`` of every failed or refused one
into it, and the teachers' ``best.pt`` into ``FILE.weights.tar`` (no other weights, caches or
TensorBoard files; deterministic bytes); ``tar -xJf FILE.tar.xz -C OUT && tar -xf FILE.weights.tar
-C OUT`` restores them where they were written (configs name their paths). ``topkd report OUT``
then renders from them alone, and a later invocation skips their runs. A teacher whose ``best.pt``
is missing is retrained; its students stay finished when the retrained weights are the ones they
recorded (``env.json``'s ``teacher_weights_sha256``), else they are trained again -- and a
retraining is bit-identical only on the same torch build and CPU kind, which is why the teachers
are kept. The project keeps its records in ``docs/results/records.tar.xz`` (+
``records.weights.tar``).

The solver is the dataset recipe's for every method (``configs/base/<dataset>.yaml``: SGD 0.05,
cosine, batch 128); method files keep only their ``method:`` section and the optimizer's name
(DOT). Distillation warm-ups (DKD/TopKD's 20 of 240 epochs) become ``--warmup`` epochs.

    python benchmarks/testbed.py --out runs/testbed             # full run (see docs/results.md)
    python benchmarks/testbed.py --out runs/testbed_quick --quick   # CI-sized smoke run
    topkd report runs/testbed --template docs/results.template.md --output docs/results.md \\
        --plots docs/results
    python benchmarks/testbed.py --out runs/testbed --archive docs/results/records.tar.xz
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import random
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
STUDY_FORMAT = "topkd-study/1"

# TopKD and the methods that carry its TSM + TDL: "ours" in the tables; everything else is a
# baseline (the best baseline is the one the paired differences are taken against).
OURS = ("topkd", "kd_tsm_tdl", "dkd_tsm_tdl")


# The study's runs take the engine's eager fp32 NCHW path with the DataLoader, whatever the
# engine's defaults: its runs (docs/results.md) were made that way, before the fast defaults
# (docs/training.md, "Speed") landed, and one study must not mix loaders (the batched loader
# draws other crops) or let finished runs go stale when a default changes.
PINNED = ("train.amp=none", "train.channels_last=false", "train.compile=false",
          "data.loader=dataloader")


# --------------------------------------------------------------------------------------------
# What is run
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Testbed:
    """A dataset with its teacher -> student pair (paths relative to configs/)."""

    key: str
    label: str
    base: str
    pair: str
    teacher: str
    student: str


TESTBEDS: dict[str, Testbed] = {
    "fashion_mnist": Testbed(
        "fashion_mnist", "Fashion-MNIST (10 classes)", "base/fashion_mnist.yaml",
        "pairs/fashion_mnist/teacher_student.yaml",
        "teachers/fashion_mnist/fmnist_cnn_teacher.yaml",
        "students/fashion_mnist/fmnist_cnn_student.yaml"),
    "fashion_mnist_pairs": Testbed(
        "fashion_mnist_pairs", "fashion_mnist_pairs (100 classes, derived)",
        "base/fashion_mnist_pairs.yaml", "pairs/fashion_mnist_pairs/teacher_student.yaml",
        "teachers/fashion_mnist_pairs/fmnist_pairs_cnn_teacher.yaml",
        "students/fashion_mnist_pairs/fmnist_pairs_cnn_student.yaml"),
}


@dataclass(frozen=True)
class Budget:
    """Sizes of every phase. The full defaults are sized for 2 shared CPU cores."""

    train_subset: int = 4000
    epochs: int = 8
    tune_epochs: int = 3
    trials: int = 3
    seeds: tuple[int, ...] = (0, 1, 2)
    views: int = 8
    warmup: float = 2.0
    k_values: tuple[int, ...] = (1, 2, 3, 5, 10, 20, 50)
    max_steps: int | None = None
    # extra config overrides: every run of a dataset / the teachers
    data: dict[str, tuple[str, ...]] = field(default_factory=dict)
    teacher: tuple[str, ...] = ()


FULL = Budget()
QUICK = Budget(
    train_subset=48, epochs=1, tune_epochs=1, trials=2, seeds=(0, 1), views=2, k_values=(1, 5),
    max_steps=2,
    data={"fashion_mnist_pairs": ("data.kwargs.train_size=200", "data.kwargs.test_size=100")},
    teacher=("train.epochs=1", "data.train_subset=48", "train.max_steps_per_epoch=2"),
)
QUICK_METHODS = ("ce", "kd", "topkd")

# The protocol and numbers of the removed in-memory loop (git history: _fmnist_loop.py), as recorded
# in docs/results.md: mean ± std over seeds 0-2 of test top-1 at the best-validation epoch.
LEGACY_SOURCE = ("the in-memory loop removed after this re-run (its numbers as recorded in "
                 "docs/results.md at commit 4259e1e: 20 epochs, 3 seeds)")
LEGACY_TEACHER = 87.57
_TSM_REC = {"gamma": 1.0, "lam": 0.5, "correct_gt": True, "schedule": "linear"}
LEGACY: dict[str, tuple[dict[str, Any], str]] = {
    "ce": ({"name": "ce", "ce": 1.0}, "84.74 ± 0.29"),
    "kd": ({"name": "kd", "ce": 0.1, "kd_weight": 0.9, "temperature": 4.0}, "84.61 ± 0.44"),
    "dkd": ({"name": "dkd", "ce": 1.0, "warmup": 2.0, "alpha": 1.0, "beta": 4.0,
             "temperature": 4.0}, "85.63 ± 0.19"),
    "kd_tsm_tdl": ({"name": "kd", "ce": 0.1, "kd_weight": 0.9, "temperature": 4.0, "k": 3,
                    "tsm": _TSM_REC, "tdl": {"weight": 1.0, "alpha": 1.0, "beta": 0.5}},
                   "86.64 ± 0.22"),
    "topkd": ({"name": "topkd", "ce": 1.0, "warmup": 2.0, "k": 2, "w_con": 1.0, "w_tdl": 1.0,
               "tau": 0.05, "alpha": 1.0, "beta": 0.5, "tsm": {**_TSM_REC, "gamma": 0.5}},
              "86.32 ± 0.06"),
}
LEGACY_SIZES = {"teacher_epochs": 3, "teacher_subset": 30000, "subset": 12000, "epochs": 20,
                "views": 4, "methods": ("ce", "kd", "dkd", "topkd"), "seeds": (0, 1)}
LEGACY_QUICK = {"teacher_epochs": 1, "teacher_subset": 48, "subset": 48, "epochs": 1,
                "views": 2, "methods": ("ce", "topkd"), "seeds": (0, 1)}


@dataclass(frozen=True)
class Entry:
    """A method entry: registry method ``method`` configured by ``configs/methods/<key>.yaml``."""

    key: str
    method: str
    file: Path | None

    @property
    def role(self) -> str:
        if self.key == "ce":
            return "student alone"
        return "ours" if self.key in OURS else "baseline"


def method_entries(selected: Sequence[str] | None = None) -> list[Entry]:
    """``ce``, every other registered method, then every variant file of configs/methods/."""
    from topkd.config import load_raw
    from topkd.methods import METHODS

    names = [n for n in METHODS.names() if n != "ce"]
    files = {p.stem: p for p in sorted((CONFIGS / "methods").glob("*.yaml"))}
    entries = [Entry("ce", "ce", files.get("ce"))]
    entries += [Entry(n, n, files.get(n)) for n in names]
    for stem, path in files.items():
        if stem in names or stem == "ce":
            continue
        method = (load_raw(path).get("method") or {}).get("name")
        if method in names:  # a variant of a registered method (fragments have no name)
            entries.append(Entry(stem, str(method), path))
    entries.sort(key=lambda e: (e.key != "ce", e.role == "ours", e.key))
    if selected is not None:
        known = {e.key for e in entries}
        unknown = [s for s in selected if s not in known]
        if unknown:
            raise SystemExit(f"unknown method entries {unknown}; known: {sorted(known)}")
        entries = [e for e in entries if e.key in selected]
    return entries


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------
# Keys of a method file that are its reference solver, not the method: the testbed trains every
# method with the dataset's recipe.
_SOLVER = {"optim": {"lr", "momentum", "nesterov", "weight_decay", "betas"},
           "train": {"epochs"}, "data": {"batch_size", "val_fraction", "train_subset"}}


def method_raw(entry: Entry) -> dict[str, Any]:
    """The method file's mapping without its reference solver (and without ``sched``)."""
    from topkd.config import load_raw

    raw = load_raw(entry.file) if entry.file else {"method": {"name": entry.method}}
    out: dict[str, Any] = {}
    for section, value in raw.items():
        if section == "sched" or not isinstance(value, dict):
            continue
        kept = {k: v for k, v in value.items() if k not in _SOLVER.get(section, set())}
        if kept:
            out[section] = kept
    return out


def canonical_method(section: dict[str, Any], warmup: float) -> dict[str, Any]:
    """Every effective parameter of a method section, with the testbed's warm-up."""
    from topkd.methods import params_from_dict, params_to_dict

    params = params_from_dict(section)
    d = params_to_dict(params)
    if "warmup" in d and d["warmup"] > 0:
        d["warmup"] = warmup
    return params_to_dict(params_from_dict(d))


def compose(tb: Testbed, budget: Budget, method: dict[str, Any], extra: dict[str, Any],
            overrides: Sequence[str]) -> Any:
    """The :class:`~topkd.config.Config` of one run: dataset recipe + pair + method + overrides."""
    from topkd.config import Config, apply_override, deep_merge, load_raw

    raw = deep_merge(load_raw(CONFIGS / tb.base), load_raw(CONFIGS / tb.pair))
    raw = deep_merge(raw, extra)
    raw["method"] = copy.deepcopy(method)
    for ov in (*budget.data.get(tb.key, ()), *overrides):
        apply_override(raw, ov)
    return Config.from_dict(raw)


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------
def _same(saved: Any, now: Any) -> bool:
    """Saved and current configs agree on every key both have (schema additions are ignored)."""
    if isinstance(saved, dict) and isinstance(now, dict):
        return all(_same(saved[k], now[k]) for k in saved.keys() & now.keys())
    if isinstance(saved, (list, tuple)) and isinstance(now, (list, tuple)):
        return len(saved) == len(now) and all(_same(a, b) for a, b in zip(saved, now))
    return saved == now


def _matches(run_dir: Path, cfg: Any) -> bool:
    p = run_dir / "config.yaml"
    return p.is_file() and _same(yaml.safe_load(p.read_text()), cfg.to_dict())


_SHA: dict[tuple[str, int, int], str] = {}


def _weights_sha256(cfg: Any) -> str:
    """``state_dict_sha256`` of the teacher that ``cfg`` loads, as the engine computes it for
    ``env.json``; once per (file, mtime, size): every run of a dataset asks."""
    from topkd.checkpoints import load_teacher, state_dict_sha256
    from topkd.data import dataset_info

    path = Path(cfg.teacher.checkpoint)
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if key not in _SHA:
        teacher = load_teacher(cfg.teacher.name, dataset_info(cfg.data.name).num_classes, path,
                               verbose=False, **cfg.teacher.kwargs)
        _SHA[key] = state_dict_sha256(teacher.state_dict())
    return _SHA[key]


def teacher_changed(run_dir: Path, cfg: Any) -> bool:
    """The run distilled from other weights than ``teacher.checkpoint`` holds now (a teacher
    retrained in place to other weights): its config still matches -- the path is the same --
    but its result is stale. Judged by ``env.json``'s ``teacher_weights_sha256`` (the weights,
    not the file: a bit-identical retraining keeps its students); runs that recorded none are
    not judged."""
    ckpt = cfg.teacher.checkpoint
    env = run_dir / "env.json"
    if not ckpt or not Path(ckpt).is_file() or not env.is_file():
        return False
    saved = json.loads(env.read_text()).get("teacher_weights_sha256")
    return saved is not None and saved != _weights_sha256(cfg)


def _current(run_dir: Path, cfg: Any) -> bool:
    return _matches(run_dir, cfg) and not teacher_changed(run_dir, cfg)


def finished(run_dir: Path, cfg: Any) -> bool:
    """A finished run of this config (``summary.json``, a matching ``config.yaml``) and of the
    teacher weights its checkpoint path holds now."""
    return (run_dir / "summary.json").is_file() and _current(run_dir, cfg)


def _aside(run_dir: Path) -> Path:
    """Rename ``run_dir`` to the first free ``<name>.stale-<n>`` next to it."""
    n = 1
    while (stale := run_dir.with_name(f"{run_dir.name}.stale-{n}")).exists():
        n += 1
    run_dir.rename(stale)
    return stale


#: What a run directory's record is: what ``topkd report`` and a resumed testbed read.
RECORD_FILES = ("config.yaml", "env.json", "summary.json", "metrics.csv")
#: A failed or refused run's record: how it ended and for which config (``--record`` reads it).
OUTCOME = "outcome.json"


def _dirs(node: Any, statuses: tuple[str, ...] = ("ok",)) -> list[str]:
    """The ``dir`` of every run record in (a part of) ``study.json`` with one of ``statuses``."""
    if isinstance(node, list):
        return [d for x in node for d in _dirs(x, statuses)]
    if not isinstance(node, dict):
        return []
    own = [node["dir"]] if node.get("status") in statuses and isinstance(node.get("dir"), str) \
        else []
    return own + [d for v in node.values() for d in _dirs(v, statuses)]


def _read_outcome(run_dir: Path, cfg: Any) -> dict[str, Any] | None:
    """The ``outcome.json`` of a run of this config (and teacher) that failed or was refused."""
    p = run_dir / OUTCOME
    if not p.is_file():
        return None
    rec = json.loads(p.read_text())
    if not _same(rec.get("config"), cfg.to_dict()) or teacher_changed(run_dir, cfg):
        return None
    return {"status": rec["status"], "reason": rec["reason"]}


def _teacher_weights(out: Path, runs: Sequence[Path]) -> set[Path]:
    """The existing checkpoints inside ``out`` that the configs of ``runs`` name as teacher
    (configs hold them relative to the working directory, as the testbed wrote them)."""
    found = set()
    for r in runs:
        ckpt = (yaml.safe_load((r / "config.yaml").read_text()) or {}).get("teacher") or {}
        path = Path(ckpt.get("checkpoint") or "")
        if ckpt.get("checkpoint") and path.is_file() and \
                path.resolve().is_relative_to(out.resolve()):
            found.add(out / path.resolve().relative_to(out.resolve()))
    return found


def weights_archive(dest: Path) -> Path:
    """Where ``--archive DEST`` (``*.tar.xz``) puts the teachers' weights: ``*.weights.tar``."""
    if not dest.name.endswith(".tar.xz"):
        raise SystemExit(f"--archive: {dest} must end in .tar.xz")
    return dest.with_name(dest.name[:-len(".tar.xz")] + ".weights.tar")


def _write_tar(files: Sequence[Path], root: Path, dest: Path, mode: str) -> None:
    """A deterministic tar of ``files`` named relative to ``root`` (zero times, one mode)."""
    import io
    import os
    import tarfile

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    with tarfile.open(tmp, mode, format=tarfile.PAX_FORMAT) as tar:
        for f in files:
            data = f.read_bytes()
            info = tarfile.TarInfo(f.relative_to(root).as_posix())
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, dest)


def archive_records(out: Path, dest: Path) -> int:
    """Write the records of ``out`` into ``dest`` (``.tar.xz``), the teachers' weights into
    :func:`weights_archive` ``(dest)``, and return the number of runs.

    The records are ``study.json``, of every run it lists as finished (``"status": "ok"``) its
    :data:`RECORD_FILES`, and of every run it lists as failed or unsupported its :data:`OUTCOME`
    and whichever of those it wrote (runs moved aside or pending are left out). The weights
    are the teacher checkpoints (``best.pt``) that those students name in
    ``teacher.checkpoint``: a few MB that spare the next machine the teacher's retraining,
    which is not bit-identical across CPUs and would make every archived student stale. They
    go in a tar of their own because they rarely change while the records grow every session:
    the same weights give the same bytes, stored once by git. No other weights, no
    teacher-logit caches or TensorBoard files. Both archives are deterministic (sorted names,
    zero times and owners). ``tar -xJf dest -C out`` and ``tar -xf <weights> -C out`` restore
    them: ``topkd report out`` then renders every table, and the testbed skips those runs
    while their configs and teacher weights match (it retrains a teacher whose ``best.pt`` is
    missing; its students stay finished if the retrained weights have the SHA-256 they
    recorded, and are trained again if not).
    """
    weights_dest = weights_archive(dest)
    if not (out / "study.json").is_file():
        raise SystemExit(f"--archive: {out} holds no study.json (nothing the testbed wrote)")
    manifest = json.loads((out / "study.json").read_text())
    runs = sorted({out / d for d in _dirs(manifest) if (out / d / "config.yaml").is_file()})
    ended = sorted({out / d for d in _dirs(manifest, ("failed", "unsupported"))
                    if (out / d / OUTCOME).is_file()})
    files = [out / "study.json"] + [r / n for r in runs for n in RECORD_FILES
                                    if (r / n).is_file()] + \
        [r / n for r in ended for n in (*RECORD_FILES, OUTCOME) if (r / n).is_file()]
    _write_tar(files, out, dest, "w:xz")
    weights = sorted(_teacher_weights(out, runs))
    if weights:
        _write_tar(weights, out, weights_dest, "w")
    return len(runs)


class Runner:
    """Runs (or skips) engine runs, one after another, and records what happened."""

    def __init__(self, out: Path, log: Any = print, record: bool = False) -> None:
        self.out, self.log, self.record = out, log, record
        self.n_run = self.n_skipped = 0

    def run(self, cfg: Any, mode: str, run_dir: Path, quiet: bool = True,
            weights: bool = False) -> dict[str, Any]:
        """``{"status": "ok"|"unsupported"|"failed", "dir": rel, ["reason"], ["summary"]}``.

        ``weights``: later runs load this run's ``best.pt`` (a teacher), so a finished run
        without it (records restored from an archive) is trained again.
        """
        from topkd.config import ConfigError
        from topkd.engine import NonFiniteLossError, Trainer

        rel = str(run_dir.relative_to(self.out))
        no_weights = weights and not (run_dir / "checkpoints" / "best.pt").is_file()
        if finished(run_dir, cfg) and not no_weights:
            self.n_skipped += 1
            return {"status": "ok", "dir": rel}
        ended = _read_outcome(run_dir, cfg)  # how an earlier run of it failed or was refused
        if self.record:  # --record: read what is there, train nothing
            if ended is not None:
                return {**ended, "dir": rel}
            return {"status": "pending", "dir": rel,
                    "reason": "not finished (the same command without --record trains or "
                              "resumes it)"}
        resume = "auto" if (run_dir / "checkpoints" / "last.pt").is_file() and \
            _current(run_dir, cfg) else None
        # a refused run's directory holds nothing but its outcome: asked again in place
        refused = ended is not None and ended["status"] == "unsupported" and \
            not (run_dir / "config.yaml").exists()
        if resume is None and run_dir.exists() and not refused:
            # another config's run (a changed default, an edited recipe) or another teacher's:
            # moved aside, never deleted -- it may be a teacher that took an hour, or results a
            # report cites
            if not _matches(run_dir, cfg):
                why = "config changed"
            elif teacher_changed(run_dir, cfg):
                why = "the teacher changed"
            elif ended is not None:
                why = "an earlier run failed"
            else:
                why = "its weights are missing (records without checkpoints, e.g. restored " \
                      "from an archive)"
            stale = _aside(run_dir)
            self.log(f"[testbed] {rel}: {why}; the old run moved to {stale.name}")
        try:
            trainer = Trainer(cfg, mode, run_dir, resume=resume, quiet=quiet,
                              argv=["benchmarks/testbed.py"])
        except (ConfigError, ValueError, TypeError, NotImplementedError) as e:
            # the engine or the method refuses this pair: reported, not an error of the run
            reason = " ".join(str(e).split())
            self.log(f"[testbed] {rel}: cannot run: {reason}")
            return self._write_outcome(cfg, run_dir, "unsupported", reason)
        t0 = time.perf_counter()
        try:
            summary = trainer.fit() or {}
        except NonFiniteLossError as e:
            self.log(f"[testbed] {rel}: FAILED (diverged): {e}")
            return self._write_outcome(cfg, run_dir, "failed", f"diverged: {e}")
        except Exception as e:  # noqa: BLE001 - recorded, reported, retried on the next call
            self.log(f"[testbed] {rel}: FAILED: {type(e).__name__}: {e}")
            traceback.print_exc()
            return self._write_outcome(cfg, run_dir, "failed", f"{type(e).__name__}: {e}")
        (run_dir / OUTCOME).unlink(missing_ok=True)  # an earlier failure of it, now stale
        self.n_run += 1
        acc = summary.get("test_acc1_at_best_val")
        self.log(f"[testbed] {rel}: val {summary.get('best_val_acc1')} test@best-val {acc} "
                 f"({time.perf_counter() - t0:.0f} s)")
        return {"status": "ok", "dir": rel}

    def _write_outcome(self, cfg: Any, run_dir: Path, status: str, reason: str) -> dict[str, Any]:
        """Write the run's :data:`OUTCOME` and return its record."""
        from topkd.utils.io import atomic_write_text

        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / OUTCOME, json.dumps(
            {"status": status, "reason": reason, "config": cfg.to_dict()}, indent=1) + "\n")
        return {"status": status, "dir": str(run_dir.relative_to(self.out)), "reason": reason}


def read_summary(out: Path, rec: dict[str, Any]) -> dict[str, Any] | None:
    p = out / rec["dir"] / "summary.json"
    return json.loads(p.read_text()) if rec["status"] == "ok" and p.is_file() else None


# --------------------------------------------------------------------------------------------
# Tuning: the trials of an entry
# --------------------------------------------------------------------------------------------
def knobs(section: dict[str, Any]) -> list[tuple[tuple[str, ...], Any]]:
    """``(path, value)`` of the tunable parameters of a method section: positive float weights,
    temperatures... (``check`` pos/nonneg) and the top-k size ``k``; not the warm-up, the
    numerical constants ``eps`` (RKD's distance clamp, PKT's norm guard, VID's variance floor:
    halving them spends a trial on nothing), probabilities/momenta (``unit`` checks), booleans,
    choices or other integers."""
    from topkd.methods import Params, params_from_dict

    out: list[tuple[tuple[str, ...], Any]] = []

    def walk(p: Params, path: tuple[str, ...]) -> None:
        for f in dataclasses.fields(p):  # type: ignore[arg-type]
            if f.name in ("warmup", "ignore_index", "eps") or not p.relevant(f.name):
                continue
            v = getattr(p, f.name)
            if isinstance(v, Params):
                walk(v, (*path, f.name))
            else:
                weight = isinstance(v, float) and f.metadata.get("check") in ("pos", "nonneg")
                top_k = f.name == "k" and isinstance(v, int) and not isinstance(v, bool)
                if (weight and v > 0) or top_k:
                    out.append(((*path, f.name), v))

    walk(params_from_dict(section), ())
    return out


def _set(d: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for p in path[:-1]:
        d = d[p]
    d[path[-1]] = value


def _get(d: dict[str, Any], path: tuple[str, ...]) -> Any:
    for p in path:
        d = d[p]
    return d


def draw_trials(default: dict[str, Any], n: int, seed: str) -> list[dict[str, Any]]:
    """Trial 0 = ``default``; then ``n - 1`` distinct valid sections, each with one or two
    parameters scaled by 0.5 or 2 (``k`` halved or doubled)."""
    from topkd.methods import ParamError, params_from_dict, params_to_dict

    trials = [default]
    ks = knobs(default)
    if not ks:
        return trials
    rng = random.Random(seed)
    seen = {json.dumps(default, sort_keys=True)}
    for _ in range(200 * n):
        if len(trials) >= n:
            break
        cand = copy.deepcopy(default)
        for path, v in rng.sample(ks, min(2, len(ks))):
            up = rng.random() < 0.5
            if isinstance(v, int):
                new: Any = v * 2 if up or v == 1 else v // 2
            else:
                new = v * 2.0 if up else v * 0.5
            _set(cand, path, new)
        try:
            cand = params_to_dict(params_from_dict(cand))
        except (ParamError, ValueError):
            continue
        key = json.dumps(cand, sort_keys=True)
        if key not in seen:
            seen.add(key)
            trials.append(cand)
    return trials


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"tsm.gamma": 0.5}`` -> ``{"tsm": {"gamma": 0.5}}``."""
    out: dict[str, Any] = {}
    for key, v in flat.items():
        *parents, last = key.split(".")
        d = out
        for p in parents:
            d = d.setdefault(p, {})
        d[last] = v
    return out


def diff(default: dict[str, Any], other: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flat ``{"tsm.gamma": 0.5}`` of what ``other`` changes in ``default``."""
    out: dict[str, Any] = {}
    for k, v in other.items():
        d = default.get(k)
        if isinstance(v, dict) and (isinstance(d, dict) or d is None):  # a section turned on
            out.update(diff(d or {}, v, f"{prefix}{k}."))
        elif d != v:
            out[f"{prefix}{k}"] = v
    return out


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------
class Testbench:
    """State of one invocation: budget, entries, runner and the study manifest."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.budget = QUICK if args.quick else FULL
        if args.seeds:
            self.budget = dataclasses.replace(
                self.budget, seeds=tuple(int(s) for s in args.seeds.split(",")))
        sizes = {k: getattr(args, k, None) for k in
                 ("epochs", "tune_epochs", "trials", "train_subset", "views", "warmup")}
        bad = [k for k, v in sizes.items() if v is not None and v < (0 if k == "warmup" else 1)]
        if bad:
            k = bad[0]
            raise SystemExit(f"--{k.replace('_', '-')} must be >= {0 if k == 'warmup' else 1}")
        self.budget = dataclasses.replace(
            self.budget, **{k: v for k, v in sizes.items() if v is not None})
        if getattr(args, "k_values", None):
            self.budget = dataclasses.replace(
                self.budget, k_values=tuple(int(k) for k in args.k_values.split(",")))
        sel = args.methods.split(",") if args.methods else (
            list(QUICK_METHODS) if args.quick else None)
        self.entries = method_entries(sel)
        self.testbeds = [TESTBEDS[k] for k in args.datasets.split(",")]
        self.runner = Runner(self.out, record=bool(getattr(args, "record", False)))
        self.path = self.out / "study.json"
        self.study: dict[str, Any] = json.loads(self.path.read_text()) \
            if self.path.is_file() else {}
        b = self.budget
        self.study.update(format=STUDY_FORMAT, title="topkd testbed",
                          quick=bool(args.quick), budget={
                              "train_subset": b.train_subset, "epochs": b.epochs,
                              "tune_epochs": b.tune_epochs, "trials": b.trials,
                              "seeds": list(b.seeds), "views": b.views, "warmup": b.warmup,
                              "k_values": list(b.k_values), "max_steps": b.max_steps},
                          ours=list(OURS))
        # every distinct invocation that wrote runs here, in order (phases may be run apart)
        cmd = " ".join(["python", "benchmarks/testbed.py", *(args.argv or [])])
        cmds = self.study.setdefault("commands", [])
        if cmd not in cmds:
            cmds.append(cmd)
        self.study.setdefault("datasets", {})
        # What this invocation wrote: (dataset, part) for a method entry ("methods", key),
        # "k_ablation", "controls", "teacher"; ("legacy",). The rest is another's (save()).
        self._touched: set[tuple[str, ...]] = set()

    # ---------------------------------------------------------------- helpers
    def save(self) -> None:
        """Write study.json, keeping what other invocations (``--datasets`` run in parallel)
        wrote there for the datasets this one does not run."""
        import fcntl

        from topkd.utils.io import atomic_write_text

        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / ".study.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.path.is_file():
                disk = json.loads(self.path.read_text())
                mine = {tb.key for tb in self.testbeds}
                for key, d in (disk.get("datasets") or {}).items():
                    if key not in mine:
                        self.study["datasets"][key] = d
                        continue
                    # the same dataset, other entries (--methods split over invocations)
                    own = self.study["datasets"].setdefault(key, {})
                    for m, rec in (d.get("methods") or {}).items():
                        if (key, "methods", m) not in self._touched:
                            own.setdefault("methods", {})[m] = rec
                    for part in ("k_ablation", "controls", "teacher"):
                        if part in d and (key, part) not in self._touched:
                            own[part] = d[part]
                # the legacy phase's record belongs to the invocation that ran it
                if "legacy" in disk and ("legacy",) not in self._touched:
                    self.study["legacy"] = disk["legacy"]
                cmds = self.study.setdefault("commands", [])
                for c in disk.get("commands") or []:
                    if c not in cmds:
                        cmds.append(c)
            atomic_write_text(self.path, json.dumps(self.study, indent=1) + "\n")

    def ds(self, tb: Testbed) -> dict[str, Any]:
        d = self.study["datasets"].setdefault(tb.key, {})
        d["label"] = tb.label
        d.setdefault("methods", {})
        return d

    def ds_runs(self, tb: Testbed) -> dict[str, Any]:
        """:meth:`ds` for a phase that trains students: the dataset records this invocation's
        budget (datasets may be run apart with different sizes)."""
        d = self.ds(tb)
        d["budget"] = self.study["budget"]
        return d

    def common(self, tb: Testbed, epochs: int, seed: int, run_dir: Path,
               train_subset: int | None = None) -> list[str]:
        # name: OUT/<dataset>/<phase>/<entry>[/<variant>]/seed_<s> -> "<dataset>-<phase>-..."
        # (the seeds of one configuration share it, as --seeds runs do)
        parts = run_dir.relative_to(self.out).parts
        name = "-".join(parts[:-1] if parts[-1].startswith("seed_") else parts)
        n = self.budget.train_subset if train_subset is None else train_subset
        ov = [f"data.train_subset={n}", f"train.epochs={epochs}", f"seed={seed}",
              "data.num_workers=0", "data.eval_batch_size=1000", f"output_dir={self.out}",
              f"name={name}", *PINNED]
        if self.args.data_root:
            ov.append(f"data.root={self.args.data_root}")
        if self.budget.max_steps:
            ov.append(f"train.max_steps_per_epoch={self.budget.max_steps}")
        return ov

    def teacher_cfg(self, tb: Testbed) -> Any:
        from topkd.config import load_config

        ov = ["data.num_workers=0", f"output_dir={self.out / 'teachers'}", *PINNED,
              *self.budget.data.get(tb.key, ()), *self.budget.teacher]
        if self.args.data_root:
            ov.append(f"data.root={self.args.data_root}")
        return load_config(CONFIGS / tb.teacher, ov)

    def teacher_ckpt(self, tb: Testbed) -> Path:
        cfg = self.teacher_cfg(tb)
        return Path(cfg.output_dir) / cfg.name / "checkpoints" / "best.pt"

    def student_run(self, tb: Testbed, entry: Entry, method: dict[str, Any], run_dir: Path,
                    epochs: int, seed: int, *, train_subset: int | None = None,
                    teacher: Path | None = None, cache: Path | None = None) -> dict[str, Any]:
        """One student run: online teacher or the cache, CE alone for ``ce`` (defaults: the
        testbed's teacher and cache of ``tb``)."""
        from topkd.config import ConfigError
        from topkd.methods import method_class, params_from_dict

        mcls = method_class(params_from_dict(method))
        extra = {k: v for k, v in method_raw(entry).items() if k != "method"}
        ov = self.common(tb, epochs, seed, run_dir, train_subset)
        if mcls.needs_teacher:
            ov.append(f"teacher.checkpoint={teacher or self.teacher_ckpt(tb)}")
            if not (mcls.teacher_taps or mcls.extra_views):
                ov.append(f"train.teacher_cache={cache or self.out / 'cache' / tb.key}")
        try:
            cfg = compose(tb, self.budget, method, extra, ov)
        except (ConfigError, ValueError) as e:
            reason = " ".join(str(e).split())
            return {"status": "unsupported", "dir": str(run_dir.relative_to(self.out)),
                    "reason": reason}
        return self.runner.run(cfg, "distill" if mcls.needs_teacher else "train", run_dir)

    def default_method(self, entry: Entry) -> dict[str, Any]:
        return canonical_method(method_raw(entry)["method"], self.budget.warmup)

    def chosen(self, tb: Testbed, entry: Entry) -> dict[str, Any] | None:
        """The method section of the best trial (validation), or the default if untuned."""
        rec = self.ds(tb)["methods"].get(entry.key, {})
        trials = rec.get("trials") or []
        best, best_val = None, None
        for t in trials:
            s = read_summary(self.out, t)
            v = None if s is None else s.get("best_val_acc1")
            if v is not None and (best_val is None or v > best_val):
                best, best_val = t, v
        if best is None:
            return None if trials else self.default_method(entry)
        return best["method"]

    # ---------------------------------------------------------------- phases
    def phase_teachers(self) -> None:
        for tb in self.testbeds:
            cfg = self.teacher_cfg(tb)
            run_dir = Path(cfg.output_dir) / cfg.name
            rec = self.runner.run(cfg, "train", run_dir, quiet=False, weights=True)
            self._touched.add((tb.key, "teacher"))
            self.ds(tb)["teacher"] = {**rec, "config": tb.teacher,
                                      "model": cfg.model.name}
            self.save()
            if rec["status"] != "ok":
                raise SystemExit(f"teacher of {tb.key} did not train: {rec.get('reason')}")

    def ensure_cache(self, tb: Testbed, tcfg: Any, ckpt: Path, path: Path,
                     train_subset: int, views: int) -> None:
        """Build the teacher-logit cache of the students' training images at ``path``, unless
        one for exactly this teacher checkpoint and these images is there."""
        from topkd.cache import CacheMismatchError, build_cache, wrap_dataset
        from topkd.checkpoints import load_teacher
        from topkd.data import dataset_info
        from topkd.engine.data import build_datasets

        probe = compose(tb, self.budget, {"name": "ce"}, {},
                        self.common(tb, 1, 0, path / "probe", train_subset))
        train = build_datasets(probe).train
        kw = {"teacher_name": tcfg.model.name, "checkpoint": ckpt, "dataset_name": tb.key}
        try:
            if wrap_dataset(train, path, **kw).cache.views == views:
                return
        except (FileNotFoundError, CacheMismatchError):
            pass
        if self.runner.record:
            print(f"[testbed] cache {path}: not there (--record builds nothing)", flush=True)
            return
        t0 = time.perf_counter()
        nc = dataset_info(probe.data.name, probe.data.root, **probe.data.kwargs).num_classes
        teacher = load_teacher(tcfg.model.name, int(nc or 0), ckpt, verbose=False)
        build_cache(teacher, train, path, views=views, batch_size=500, progress=False,
                    dtype="float32", seed=0, **kw)
        print(f"[testbed] cache {path}: {len(train)} images x {views} views "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)

    def phase_cache(self) -> None:
        for tb in self.testbeds:
            path = self.out / "cache" / tb.key
            self.ensure_cache(tb, self.teacher_cfg(tb), self.teacher_ckpt(tb), path,
                              self.budget.train_subset, self.budget.views)
            self.ds(tb)["cache"] = {"dir": str(path.relative_to(self.out)),
                                    "views": self.budget.views}
            self.save()

    def phase_tune(self) -> None:
        for tb in self.testbeds:
            for entry in self.entries:
                self._touched.add((tb.key, "methods", entry.key))
                rec = self.ds_runs(tb)["methods"].setdefault(entry.key, {})
                rec.update(role=entry.role, method=entry.method,
                           config=None if entry.file is None else
                           str(entry.file.relative_to(ROOT)))
                if entry.key == "ce" or self.budget.trials == 1:
                    rec["trials"] = []  # nothing to choose: the reference configuration runs
                    self.save()
                    continue
                default = self.default_method(entry)
                trials = draw_trials(default, self.budget.trials, f"{tb.key}-{entry.key}")
                recs = []
                for i, m in enumerate(trials):
                    run_dir = self.out / tb.key / "tune" / entry.key / f"trial_{i}"
                    r = self.student_run(tb, entry, m, run_dir, self.budget.tune_epochs, 0)
                    recs.append({**r, "method": m, "overrides": diff(default, m)})
                    if r["status"] == "unsupported":
                        break  # the method cannot run this pair at all
                rec["trials"] = recs
                self._status(rec, recs)
                self.save()

    def phase_final(self) -> None:
        for tb in self.testbeds:
            for entry in self.entries:
                self._touched.add((tb.key, "methods", entry.key))
                rec = self.ds_runs(tb)["methods"].setdefault(entry.key, {
                    "role": entry.role, "method": entry.method})
                if rec.get("status") == "unsupported":
                    continue
                m = self.chosen(tb, entry)
                if m is None:
                    rec["final"] = []
                    continue
                rec["chosen"] = m
                runs = []
                for s in self.budget.seeds:
                    run_dir = self.out / tb.key / "final" / entry.key / f"seed_{s}"
                    r = self.student_run(tb, entry, m, run_dir, self.budget.epochs, s)
                    runs.append(r)
                    if r["status"] == "unsupported":
                        rec.update(status="unsupported", reason=r["reason"])
                        break
                rec["final"] = runs
                self._status(rec, runs)
                self.save()

    @staticmethod
    def _status(rec: dict[str, Any], runs: list[dict[str, Any]]) -> None:
        """An entry is unsupported if its first run could not start, pending if none of its
        runs has finished yet (``--record``), failed if no run finished (the reason of the first
        failure), ok otherwise."""
        rec.pop("reason", None)
        if runs and runs[0]["status"] == "unsupported":
            rec.update(status="unsupported", reason=runs[0]["reason"])
        elif runs and all(r["status"] == "pending" for r in runs):
            rec.update(status="pending", reason=runs[0]["reason"])
        elif runs and not any(r["status"] == "ok" for r in runs):
            rec.update(status="failed", reason=runs[0].get("reason"))
        else:
            rec["status"] = "ok"

    def _entry(self, key: str) -> Entry | None:
        return next((e for e in self.entries if e.key == key), None)

    def phase_kablation(self) -> None:
        entry = self._entry("topkd")
        for tb in self.testbeds:
            if tb.key != "fashion_mnist_pairs" or entry is None:
                continue
            base = self.chosen(tb, entry) or self.default_method(entry)
            sweep = []
            final = self.ds_runs(tb)["methods"].get("topkd", {}).get("final") or []
            for k in self.budget.k_values:
                m = copy.deepcopy(base)
                m["k"] = k
                if m == base and len(final) == len(self.budget.seeds):
                    sweep.append({"k": k, "runs": final, "method": m})  # the final runs
                    continue
                runs = []
                for s in self.budget.seeds:
                    run_dir = self.out / tb.key / "kablation" / f"k_{k}" / f"seed_{s}"
                    runs.append(self.student_run(tb, entry, m, run_dir, self.budget.epochs, s))
                sweep.append({"k": k, "runs": runs, "method": m})
                self._touched.add((tb.key, "k_ablation"))
                self.ds_runs(tb)["k_ablation"] = {"entry": "topkd", "key": "method.k",
                                             "points": sweep}
                self.save()

    def phase_controls(self) -> None:
        gt_only = {"gamma": 0.0, "lam": 0.0, "correct_gt": True}
        variants = (
            ("kd_gt", "kd", "KD on the GT-corrected teacher", lambda m: {**m, "tsm": gt_only}),
            ("dkd_gt", "dkd", "DKD on the GT-corrected teacher",
             lambda m: {**m, "tsm": gt_only}),
            ("topkd_no_gt", "topkd", "TopKD without the GT correction",
             lambda m: {**m, "tsm": {**(m.get("tsm") or {}), "correct_gt": False}}),
        )
        for tb in self.testbeds:
            controls = []
            for key, of, label, change in variants:
                entry = self._entry(of)
                if entry is None:
                    continue
                base = self.chosen(tb, entry) or self.default_method(entry)
                m = change(copy.deepcopy(base))
                runs = [self.student_run(tb, entry, m, self.out / tb.key / "controls" / key /
                                         f"seed_{s}", self.budget.epochs, s)
                        for s in self.budget.seeds]
                controls.append({"key": key, "label": label, "of": of, "method": m,
                                 "changes": diff(base, m), "runs": runs})
                self._touched.add((tb.key, "controls"))
                self.ds_runs(tb)["controls"] = controls
                self.save()

    def phase_legacy(self) -> None:
        """The recorded Fashion-MNIST protocol of the removed in-memory loop, through the
        engine (docs/results.md compares the two): teacher 3 epochs on 30,000 images,
        students 20 epochs on 12,000, 4 cached views, the recorded settings of CE, KD, DKD and
        TopKD, seeds 0 and 1 (``--seeds`` overrides)."""
        from topkd.config import load_config

        tb = TESTBEDS["fashion_mnist"]
        sz = dict(LEGACY_QUICK if self.args.quick else LEGACY_SIZES)
        if self.args.seeds:  # e.g. one seed now, the next in a later invocation
            sz["seeds"] = self.budget.seeds
        root = self.out / "legacy"
        ov = [f"train.epochs={sz['teacher_epochs']}", f"data.train_subset={sz['teacher_subset']}",
              "data.num_workers=0", f"output_dir={root}", "name=legacy-teacher", *PINNED]
        if self.budget.max_steps:
            ov.append(f"train.max_steps_per_epoch={self.budget.max_steps}")
        if self.args.data_root:
            ov.append(f"data.root={self.args.data_root}")
        tcfg = load_config(CONFIGS / tb.teacher, ov)
        teacher = self.runner.run(tcfg, "train", root / "teacher", quiet=False, weights=True)
        ckpt = root / "teacher" / "checkpoints" / "best.pt"
        cache = root / "cache"
        self.ensure_cache(tb, tcfg, ckpt, cache, sz["subset"], sz["views"])
        runs = {}
        for key in sz["methods"]:
            spec, recorded = LEGACY[key]
            entry = Entry(key, spec["name"], None)
            recs = [self.student_run(tb, entry, spec, root / key / f"seed_{s}", sz["epochs"], s,
                                     train_subset=sz["subset"], teacher=ckpt, cache=cache)
                    for s in sz["seeds"]]
            runs[key] = {"runs": recs, "recorded": recorded, "method": spec}
        self._touched.add(("legacy",))
        self.study["legacy"] = {"teacher": teacher, "recorded_teacher": LEGACY_TEACHER,
                                "source": LEGACY_SOURCE, "sizes": sz, "methods": runs}
        self.save()

    def write_configs(self) -> list[Path]:
        """``configs/pair_overrides/<dataset>/<entry>.yaml``: what the tuning chose (on
        validation only) relative to the method file, the testbed's warm-up, the dataset recipe's
        solver where the method file has its reference's, or why the entry cannot run. Then
        ``python configs/generate.py`` writes the shipped leaves of these datasets."""
        from topkd.config import load_raw
        from topkd.methods import params_from_dict, params_to_dict

        written = []
        for tb in self.testbeds:
            base = load_raw(CONFIGS / tb.base)
            for entry in self.entries:
                rec = self.ds(tb)["methods"].get(entry.key)
                if entry.key == "ce" or rec is None:
                    continue
                path = Path(self.args.configs_out) / tb.key / f"{entry.key}.yaml"
                note = (f"# Written by benchmarks/testbed.py --write-configs from {self.out} "
                        "(docs/results.md).\n")
                if rec.get("status") == "unsupported":
                    body: dict[str, Any] = {"unsupported": {"teacher_student": rec["reason"]}}
                elif rec.get("status") != "ok":
                    continue
                else:
                    trials = rec.get("trials") or []
                    chosen = self.chosen(tb, entry)
                    if chosen is None:
                        continue
                    ref = params_to_dict(params_from_dict(method_raw(entry)["method"]))
                    over = _nested(diff(ref, chosen))
                    raw = load_raw(entry.file) if entry.file else {}
                    for section, keys in _SOLVER.items():  # back to the dataset recipe
                        for k in keys & set(raw.get(section) or {}):
                            if raw[section][k] != base.get(section, {}).get(k):
                                over.setdefault(section, {})[k] = base[section][k]
                    idx = next((i for i, t in enumerate(trials) if t.get("method") == chosen),
                               None)
                    note += (f"# Trial {idx} of {len(trials)} (validation top-1, seed 0)"
                             if idx is not None else
                             "# Not tuned: the method file's reference values")
                    note += (f"; warm-up {over['warmup']:g} epochs as the testbed.\n"
                             if "warmup" in over else ".\n")
                    body = {"teacher_student": over} if over else {}
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(note + (yaml.safe_dump(body, default_flow_style=None,
                                                       sort_keys=True) if body else ""))
                written.append(path)
        return written

    PHASES = ("teachers", "cache", "tune", "final", "kablation", "controls", "legacy")

    def run(self, phases: Sequence[str]) -> None:
        t0 = time.perf_counter()
        self.save()
        for ph in self.PHASES:
            if ph in phases:
                print(f"[testbed] phase {ph}", flush=True)
                getattr(self, f"phase_{ph}")()
        print(f"[testbed] done in {time.perf_counter() - t0:.0f} s: {self.runner.n_run} runs "
              f"trained, {self.runner.n_skipped} finished runs skipped; {self.path}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 1)[1])
    p.add_argument("--out", default="runs/testbed", help="output directory (default %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="CI-sized smoke run: 1 epoch of 2 steps, 2 trials, 2 seeds, 5 methods")
    p.add_argument("--phases", default=",".join(Testbench.PHASES))
    p.add_argument("--datasets", default=",".join(TESTBEDS))
    p.add_argument("--methods", default=None,
                   help="comma-separated method entries (default: every registered method and "
                        "every variant of configs/methods; --quick: a few)")
    p.add_argument("--seeds", default=None, help="override the seeds, e.g. 0,1,2")
    for flag, what in (("epochs", "epochs of every final / ablation / control run"),
                       ("tune-epochs", "epochs of every tuning trial"),
                       ("trials", "tuning trials per method entry (1: its reference config)"),
                       ("train-subset", "student training images"),
                       ("views", "cached crop/flip views per image")):
        p.add_argument(f"--{flag}", type=int, default=None, help=f"override: {what}")
    p.add_argument("--k-values", default=None,
                   help="override: the K ablation's k values, e.g. 1,3,5,10,50")
    p.add_argument("--warmup", type=float, default=None,
                   help="override: epochs of the distillation warm-up of methods that have one")
    p.add_argument("--data-root", default=None, help="Fashion-MNIST folder (data.root)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared, oversubscribed box two "
                        "threads spent 3x the CPU time per image, waiting for each other)")
    p.add_argument("--list", action="store_true", help="print the method entries and exit")
    p.add_argument("--record", action="store_true",
                   help="train nothing: write what the run directories hold into study.json "
                        "(finished runs; the others as pending), e.g. after invocations split "
                        "by --methods or stopped early")
    p.add_argument("--write-configs", action="store_true",
                   help="write configs/pair_overrides/<dataset>/<entry>.yaml from the tuning of "
                        "OUT (then run configs/generate.py) and exit")
    p.add_argument("--configs-out", default=str(CONFIGS / "pair_overrides"),
                   help="where --write-configs writes (default configs/pair_overrides)")
    p.add_argument("--archive", metavar="FILE", default=None,
                   help="write OUT's records (study.json; every finished run's config, env, "
                        "summary and metrics) into FILE (.tar.xz) and the teachers' best.pt into "
                        "FILE's .weights.tar, and exit; restore with tar -xJf FILE -C OUT and "
                        "tar -xf <weights> -C OUT")
    args = p.parse_args(argv)
    args.argv = argv
    if args.list:
        for e in method_entries(args.methods.split(",") if args.methods else None):
            print(f"{e.key:<16} {e.method:<10} {e.role:<14} {e.file or '(registry defaults)'}")
        return 0
    if args.archive:
        n = archive_records(Path(args.out), Path(args.archive))
        print(f"wrote {args.archive}: the records of {n} runs of {args.out}; "
              f"{weights_archive(Path(args.archive))}: the teachers' weights")
        return 0
    import torch

    torch.set_num_threads(args.threads)
    if args.write_configs:
        for path in Testbench(args).write_configs():
            print(f"wrote {path}")
        return 0
    phases = [ph for ph in args.phases.split(",") if ph]
    bad = [ph for ph in phases if ph not in Testbench.PHASES]
    if bad:
        p.error(f"unknown phases {bad}; choose from {','.join(Testbench.PHASES)}")
    Testbench(args).run(phases)
    return 0


if __name__ == "__main__":
    sys.exit(main())
