"""``topkd demo``: teacher -> six distillation methods on real Fashion-MNIST, in minutes on a CPU.

The demo is a thin orchestration over the engine (:class:`topkd.engine.Trainer`) and the
configs, so that what it shows is exactly what ``topkd train`` / ``topkd distill`` do:

1. the teacher is ``configs/teachers/fashion_mnist/fmnist_cnn_teacher.yaml`` (``topkd train``),
   run into ``CACHE_DIR/teacher-<hash of its resolved config>/`` and reused while that config is
   unchanged;
2. its checkpoint (best on the held-out validation split) fills a teacher-logit cache
   (:mod:`topkd.cache`, ``--views`` augmented views of the students' training images), so that
   no student epoch pays for a teacher forward (``train.teacher_cache``);
3. each method is ``configs/fashion_mnist/teacher_student/<method>.yaml`` (``topkd distill``;
   CE only is ``configs/students/fashion_mnist/fmnist_cnn_student.yaml`` with ``topkd train``),
   run per seed into ``OUTPUT_DIR/runs/<method>/seed_<s>/`` (ordinary engine run directories);
4. the table and plots are read back from those run directories' ``summary.json`` and
   ``metrics.csv``.

Only the schedule and data size differ from the configs, as ``key=value`` overrides (printed,
and saved in every run's ``config.yaml``): ``train.epochs``, ``data.train_subset``,
``data.val_fraction``, ``data.num_workers=0``, ``data.eval_batch_size``, ``data.root``, and
the speed switches when given (``--amp``, ``--channels-last``, ``--compile``, ``--loader``; by
default the configs' ``auto``, the engine's fast path, docs/training.md "Speed").
The loss hyper-parameters are the configs' own.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

METHODS = ("ce", "kd", "dkd", "kd_ls", "kd_tsm_tdl", "topkd")
LABELS = {"ce": "CE only", "kd": "KD", "dkd": "DKD", "kd_ls": "KD+LS",
          "kd_tsm_tdl": "KD+TSM+TDL", "topkd": "TopKD"}
FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                  "Sneaker", "Bag", "Ankle boot"]
TEACHER, STUDENT = "fmnist_cnn_teacher", "fmnist_cnn_student"
# Config files, relative to the configs directory.
TEACHER_CONFIG = "teachers/fashion_mnist/fmnist_cnn_teacher.yaml"
METHOD_CONFIGS = {m: f"fashion_mnist/teacher_student/{m}.yaml" for m in METHODS if m != "ce"}
METHOD_CONFIGS["ce"] = "students/fashion_mnist/fmnist_cnn_student.yaml"
DEFAULT_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
# The engine's speed switches (docs/training.md, "Speed"): demo option choices per config key.
SPEED_SWITCHES = {"train.amp": ("auto", "none", "bf16", "fp16"),
                  "train.channels_last": ("auto", "on", "off"),
                  "train.compile": ("auto", "on", "off"),
                  "data.loader": ("auto", "batched", "dataloader")}
_ON_OFF = {"on": "true", "off": "false"}
INSTALL_HINT = (
    "Fashion-MNIST is needed. Install it with `sudo apt-get install dataset-fashion-mnist` "
    "(Debian/Ubuntu; `bash scripts/bootstrap.sh` does this), or pass --data-root DIR containing "
    "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
    "t10k-labels-idx1-ubyte.gz."
)


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------
def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def common_overrides(args: argparse.Namespace) -> list[str]:
    """The demo's schedule/data-size overrides shared by the teacher and every student."""
    ov = [f"data.val_fraction={args.val_fraction}", "data.num_workers=0",
          f"data.eval_batch_size={args.eval_batch_size}"]
    if args.data_root:
        ov.append(f"data.root={args.data_root}")
    if args.lr is not None:
        ov.append(f"optim.lr={args.lr}")
    if args.batch_size is not None:
        ov.append(f"data.batch_size={args.batch_size}")
    if args.device:
        ov.append(f"train.device={args.device}")
    for key in SPEED_SWITCHES:
        v = getattr(args, key.split(".")[1], None)
        if v is not None:
            ov.append(f"{key}={_ON_OFF.get(v, v)}")
    return ov


def teacher_config(args: argparse.Namespace) -> Any:
    """The teacher's :class:`~topkd.config.Config` (``topkd train``)."""
    from topkd.config import load_config

    sub = args.teacher_subset or None
    return load_config(Path(args.configs_dir) / TEACHER_CONFIG, [
        *common_overrides(args), f"train.epochs={args.teacher_epochs}",
        f"data.train_subset={'null' if sub is None else sub}", "seed=0"])


def teacher_key(cfg: Any) -> str:
    """Hash of the teacher's resolved config (without where it is written)."""
    d = cfg.to_dict()
    d.pop("output_dir", None)
    d.pop("name", None)
    d["train"].pop("device", None)
    return _key(d)


def method_config(args: argparse.Namespace, method: str, seed: int,
                  teacher_ckpt: str | None = None, cache: str | None = None) -> Any:
    """The :class:`~topkd.config.Config` of one demo run (its loss is the config file's)."""
    from topkd.config import load_config

    sub = args.subset or None
    ov = [*common_overrides(args), f"train.epochs={args.epochs}", f"seed={seed}",
          f"data.train_subset={'null' if sub is None else sub}",
          f"output_dir={Path(args.output_dir) / 'runs'}", f"name={method}"]
    if method != "ce":
        if teacher_ckpt is not None:
            ov.append(f"teacher.checkpoint={teacher_ckpt}")
        if cache is not None:
            ov.append(f"train.teacher_cache={cache}")
    return load_config(Path(args.configs_dir) / METHOD_CONFIGS[method], ov)


# --------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------
def _duration(seconds: float) -> str:
    if seconds != seconds:  # NaN: nothing done yet
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class _Progress:
    """One bar over every image of every run on a terminal. Otherwise (a log file, a pipe, CI)
    plain lines: each stage, each epoch (the engine's line: epoch, loss, accuracies) and, every
    ``interval`` seconds, the overall share done with elapsed time and ETA, so a long stage
    never looks like a hang."""

    def __init__(self, total: int, enabled: bool, interval: float = 30.0) -> None:
        self.bar: Any = None
        self.enabled, self.total, self.interval = enabled, max(total, 1), interval
        self.done = 0
        self.t0 = self.last = time.perf_counter()
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", unit_scale=True, dynamic_ncols=True,
                            smoothing=0.05)

    @property
    def lines(self) -> bool:
        """Whether the engine should print its per-epoch lines (no bar to show progress)."""
        return self.bar is None and self.enabled

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)
            return
        self.done += n
        now = time.perf_counter()
        if self.enabled and now - self.last >= self.interval:
            self.last = now
            elapsed = now - self.t0
            frac = min(self.done / self.total, 1.0)
            eta = elapsed * (1 - frac) / frac if frac > 0 else float("nan")
            print(f"[demo] progress {100 * frac:.0f}% ({self.done}/{self.total} images), "
                  f"elapsed {_duration(elapsed)}, ETA {_duration(eta)}", flush=True)

    def stage(self, desc: str) -> None:
        if self.bar is not None:
            self.bar.set_description(desc)
        else:
            print(f"[demo] {desc} ...", flush=True)

    def log(self, s: str) -> None:
        if self.bar is not None:
            self.bar.write(s)
        else:
            print(s, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------------------------
# Teacher and teacher-logit cache
# --------------------------------------------------------------------------------------------
def _finished(run_dir: Path, cfg: Any) -> bool:
    """A finished run of exactly this config (summary.json + the same resolved config.yaml)."""
    c = run_dir / "config.yaml"
    return (run_dir / "summary.json").is_file() and c.is_file() and c.read_text() == cfg.to_yaml()


def run_engine(cfg: Any, mode: str, run_dir: Path, progress: Callable[[int], None],
               quiet: bool = True) -> dict:
    """One engine run into ``run_dir`` (from scratch), returning its summary.

    ``quiet=False`` lets the engine print its per-epoch line (used when there is no bar)."""
    from topkd.engine import Trainer

    if run_dir.exists():
        shutil.rmtree(run_dir)
    summary = Trainer(cfg, mode, run_dir, resume=None, progress=progress, quiet=quiet,
                      argv=["topkd", "demo"]).fit()
    return dict(summary or {})


def get_teacher(args: argparse.Namespace, cache_dir: Path, prog: _Progress
                ) -> tuple[Any, Path, dict[str, Any]]:
    """Train the teacher with the engine, or reuse the run cached under its config hash.

    Returns ``(config, checkpoint best.pt, summary)``.
    """
    cfg = teacher_config(args)
    run_dir = cache_dir / f"teacher-{teacher_key(cfg)}"
    ckpt = run_dir / "checkpoints" / "best.pt"
    if not args.retrain_teacher and (run_dir / "summary.json").is_file() and ckpt.is_file():
        prog.log(f"[demo] reusing cached teacher {run_dir}")
        prog.update(_teacher_images(cfg))
    else:
        prog.stage(f"teacher {TEACHER}")
        run_engine(cfg, "train", run_dir, prog.update, quiet=not prog.lines)
    return cfg, ckpt, json.loads((run_dir / "summary.json").read_text())


def _n_train(cfg: Any) -> int:
    from topkd.engine.data import build_datasets

    return len(build_datasets(cfg).train)  # type: ignore[arg-type]


def _teacher_images(cfg: Any) -> int:
    return _n_train(cfg) * cfg.train.epochs


def get_logit_cache(args: argparse.Namespace, student_cfg: Any, ckpt: Path, cache_dir: Path,
                    prog: _Progress) -> Path:
    """Build (or reuse) the teacher-logit cache of the students' training images."""
    from topkd.cache import build_cache
    from topkd.checkpoints import load_teacher, sha256_file
    from topkd.engine.data import build_datasets

    d = student_cfg.data
    key = _key({"teacher": sha256_file(ckpt), "root": d.root, "val_fraction": d.val_fraction,
                "val_seed": d.val_seed, "train_subset": d.train_subset, "views": args.views,
                "topk": args.topk})
    path = cache_dir / f"logits-{key}"
    if (path / "header.json").is_file():
        prog.log(f"[demo] reusing teacher-logit cache {path}")
        return path
    prog.stage("teacher-logit cache")
    train = build_datasets(student_cfg).train
    teacher = load_teacher(TEACHER, 10, ckpt, verbose=False).eval()
    build_cache(teacher, train, path, views=args.views, topk=args.topk, batch_size=1000,
                progress=False, seed=0, teacher_name=TEACHER, checkpoint=ckpt,
                dataset_name=d.name)
    prog.update(args.views * len(train))  # type: ignore[arg-type]
    return path


def teacher_test_logits(cfg: Any, ckpt: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's logits and labels on the test split (for the TSM picture)."""
    from torch.utils.data import DataLoader

    from topkd.checkpoints import load_teacher
    from topkd.engine.data import build_datasets

    teacher = load_teacher(TEACHER, 10, ckpt, verbose=False).eval()
    outs, ys = [], []
    with torch.inference_mode():
        for x, y in DataLoader(build_datasets(cfg).test, batch_size=1000):
            outs.append(teacher(x))
            ys.append(y)
    return torch.cat(outs), torch.cat(ys)


# --------------------------------------------------------------------------------------------
# Results (read back from the run directories)
# --------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    """One run directory as the plots want it: per-epoch history and its summary."""

    method: str
    seed: int
    run_dir: str
    history: list[dict[str, Any]]
    summary: dict[str, Any]


def read_result(method: str, seed: int, run_dir: Path) -> RunResult:
    from topkd.engine.summary import read_summary
    from topkd.report import read_metrics

    return RunResult(method, seed, str(run_dir), read_metrics(run_dir / "metrics.csv"),
                     read_summary(run_dir))


def summarise(results: list[RunResult]) -> list[dict[str, Any]]:
    """Per method: mean/std over seeds (``topkd.engine.summary.aggregate_runs``).

    ``epoch_time_s`` (mean wall time per epoch) is kept for ``results.json`` only: on a shared
    CPU it measures the machine's load as much as the method, so the table does not show it.
    """
    from topkd.engine.summary import aggregate_runs

    rows = []
    for m in dict.fromkeys(r.method for r in results):
        rs = [r for r in results if r.method == m]
        (agg,) = aggregate_runs([r.run_dir for r in rs])
        times = [float(h["epoch_time_s"]) for r in rs for h in r.history
                 if h.get("epoch_time_s") is not None]
        rows.append({"method": m, "label": LABELS.get(m, m), "seeds": agg["n"],
                     "test_at_best_val": agg["test_acc1_at_best_val_mean"],
                     "test_at_best_val_std": agg["test_acc1_at_best_val_std"],
                     "test_at_best_val_values": agg["test_acc1_at_best_val_values"],
                     "last_test": agg["last_test_acc1_mean"],
                     "last_test_std": agg["last_test_acc1_std"],
                     "best_val": agg["best_val_acc1_mean"],
                     "best_val_std": agg["best_val_acc1_std"],
                     "epoch_time_s": float(np.mean(times)) if times else float("nan")})
    return rows


def _cell(mean: float, std: float, n: int) -> str:
    """``mean ± std`` over seeds; one seed is shown as its value (no invented ``± 0.00``)."""
    return f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f}"


def format_table(rows: list[dict[str, Any]], teacher_acc: float | None = None) -> str:
    """Markdown table of :func:`summarise` rows (test top-1 in %, mean ± std over seeds)."""
    out = ["| method | seeds | test top-1 @ best val | test top-1 @ last | best val |",
           "| --- | --- | --- | --- | --- |"]
    for r in rows:
        n = r["seeds"]
        out.append(
            f"| {r['label']} | {n} | {_cell(r['test_at_best_val'], r['test_at_best_val_std'], n)}"
            f" | {_cell(r['last_test'], r['last_test_std'], n)}"
            f" | {_cell(r['best_val'], r['best_val_std'], n)} |")
    if teacher_acc is not None:
        out.append(f"| *teacher ({TEACHER})* | 1 | {teacher_acc:.2f} | - | - |")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def _int_list(s: str) -> list[int]:
    try:
        if "-" in s and "," not in s and not s.startswith("-"):
            a, b = s.split("-")
            return list(range(int(a), int(b) + 1))
        return [int(v) for v in s.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected integers like '0,1,2' or '0-2', got {s!r}") \
            from e


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``topkd demo``."""
    parser.description = (
        "Train a Fashion-MNIST teacher (cached), distil a small student with CE only, KD, DKD, "
        "KD+LS, KD+TSM+TDL and TopKD with the engine and the configs in configs/fashion_mnist/ "
        "(the same runs as `topkd train`/`topkd distill`), print a results table and write "
        "plots. Defaults fit in about 10 minutes on 2 CPU cores.")
    g = parser.add_argument_group("schedule (overrides of the configs)")
    g.add_argument("--epochs", type=int, default=5, help="student epochs per method (default 5)")
    g.add_argument("--teacher-epochs", type=int, default=3,
                   help="teacher epochs (default 3; the trained teacher is cached by config)")
    g.add_argument("--seeds", type=_int_list, default=[0],
                   help="student seeds, e.g. '0' or '0,1,2' (default 0)")
    g.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)} (default all)")
    g.add_argument("--lr", type=float, default=None,
                   help="optim.lr (default: the config's, 0.05 with a cosine schedule)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="data.batch_size (default: the config's, 128)")
    g.add_argument("--device", default=None, help="train.device (default: the config's, auto)")
    d = parser.add_argument_group("data")
    d.add_argument("--data-root", default=None,
                   help="folder with the Fashion-MNIST IDX files (data.root; default "
                        "/usr/share/datasets/fashion-mnist)")
    d.add_argument("--subset", type=int, default=20000,
                   help="student training images (data.train_subset, of the 54000 after the "
                        "val split; 0 = all; default 20000)")
    d.add_argument("--teacher-subset", type=int, default=30000,
                   help="teacher training images (0 = all 54000; default 30000)")
    d.add_argument("--val-fraction", type=float, default=0.1,
                   help="held-out validation share of the training set (best-epoch selection)")
    d.add_argument("--eval-batch-size", type=int, default=1000,
                   help="data.eval_batch_size (default 1000)")
    d.add_argument("--configs-dir", default=str(DEFAULT_CONFIG_DIR),
                   help="the repository's configs/ directory (default: next to the package)")
    sp = parser.add_argument_group(
        "speed (overrides of the configs' auto switches; all off: --amp none --channels-last "
        "off --compile off --loader dataloader)")
    for key, choices in SPEED_SWITCHES.items():
        sp.add_argument(f"--{key.split('.')[1].replace('_', '-')}", choices=choices,
                        default=None, help=f"{key} (default: the config's, auto)")
    c = parser.add_argument_group("teacher-logit cache")
    c.add_argument("--views", type=int, default=4,
                   help="augmented views per image stored in the teacher-logit cache (default 4)")
    c.add_argument("--topk", type=int, default=None,
                   help="store only the top-K teacher log-probs (default: full logits)")
    c.add_argument("--no-cache", action="store_true",
                   help="online teacher forward every batch instead of the logit cache")
    o = parser.add_argument_group("output")
    o.add_argument("--output-dir", default="demo_out",
                   help="runs (OUTPUT_DIR/runs/<method>/seed_<s>), results, plots "
                        "(default demo_out)")
    o.add_argument("--cache-dir", default=None,
                   help="teacher runs and logit caches (default OUTPUT_DIR/cache)")
    o.add_argument("--retrain-teacher", action="store_true", help="ignore a cached teacher")
    o.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    o.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns a process exit code."""
    from topkd.config import ConfigError
    from topkd.data import DatasetNotFoundError
    from topkd.engine.summary import write_seed_summary

    t_start = time.perf_counter()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"topkd demo: unknown method(s) {unknown}; choose from {list(METHODS)}",
              file=sys.stderr)
        return 2
    if not (Path(args.configs_dir) / TEACHER_CONFIG).is_file():
        print(f"topkd demo: configs not found under {args.configs_dir} (run from a checkout of "
              "the repository or pass --configs-dir)", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    cache_dir = Path(args.cache_dir) if args.cache_dir else out / "cache"
    from topkd.utils.io import writable_dir_problem

    for d in (out, cache_dir):
        if why := writable_dir_problem(d):
            print(f"topkd demo: cannot write {d}: {why} (choose another --output-dir / "
                  "--cache-dir)", file=sys.stderr)
            return 2
    distilling = [m for m in methods if m != "ce"]
    try:
        t_cfg = teacher_config(args)
        probe = method_config(args, methods[0], args.seeds[0])
        n_fit, n_teacher = _n_train(probe), _n_train(t_cfg)
    except DatasetNotFoundError as e:
        print(f"topkd demo: {e}\n\n{INSTALL_HINT}", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"topkd demo: {e}", file=sys.stderr)
        return 2

    total = n_fit * args.epochs * len(methods) * len(args.seeds)
    total += args.teacher_epochs * n_teacher
    if distilling and not args.no_cache:
        total += args.views * n_fit
    prog = _Progress(total, not args.no_progress)
    log = prog.log
    log(f"[demo] Fashion-MNIST: {n_fit} student / {n_teacher} teacher training images, "
        f"val fraction {args.val_fraction}; torch threads {torch.get_num_threads()}; "
        f"configs {args.configs_dir}; overrides {' '.join(common_overrides(args))}")

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    t_cfg, ckpt, t_sum = get_teacher(args, cache_dir, prog)
    teacher_acc = float(t_sum["test_acc1_at_best_val"] if t_sum.get("test_acc1_at_best_val")
                        is not None else t_sum["last_test_acc1"])
    timings["teacher_s"] = time.perf_counter() - t0
    log(f"[demo] teacher {TEACHER}: test top-1 {teacher_acc:.2f}% at best val "
        f"(epoch {t_sum.get('best_val_epoch')}; {timings['teacher_s']:.0f} s; {ckpt})")

    cache = None
    if distilling and not args.no_cache:
        t0 = time.perf_counter()
        cache = get_logit_cache(args, method_config(args, distilling[0], args.seeds[0],
                                                    str(ckpt)), ckpt, cache_dir, prog)
        timings["cache_s"] = time.perf_counter() - t0
        log(f"[demo] teacher-logit cache: {args.views} views x {n_fit} images "
            f"({timings['cache_s']:.0f} s; {cache})")

    results: list[RunResult] = []
    specs: dict[str, Any] = {}
    t0 = time.perf_counter()
    for m in methods:
        dirs = []
        for seed in args.seeds:
            cfg = method_config(args, m, seed, str(ckpt), None if cache is None else str(cache))
            specs[m] = {"config": str(Path(args.configs_dir) / METHOD_CONFIGS[m]),
                        "method": cfg.to_dict()["method"]}
            run_dir = out / "runs" / m / f"seed_{seed}"
            prog.stage(f"{LABELS[m]} seed {seed}")
            if _finished(run_dir, cfg):
                log(f"[demo] reusing finished run {run_dir}")
                prog.update(n_fit * args.epochs)
            else:
                run_engine(cfg, "train" if m == "ce" else "distill", run_dir, prog.update,
                           quiet=not prog.lines)
            r = read_result(m, seed, run_dir)
            results.append(r)
            dirs.append(run_dir)
            s = r.summary
            log(f"[demo] {LABELS[m]:<11} seed {seed}: test {s['test_acc1_at_best_val']:.2f}% at "
                f"best val (epoch {s['best_val_epoch']}), last {s['last_test_acc1']:.2f}% "
                f"({run_dir})")
        write_seed_summary(out / "runs" / m, dirs)
    timings["students_s"] = time.perf_counter() - t0
    prog.close()

    rows = summarise(results)
    table = format_table(rows, teacher_acc)
    print("\n" + table + "\n")
    plots: list[str] = []
    if not args.no_plots:
        from topkd import plots as P

        t_logits, t_y = teacher_test_logits(t_cfg, ckpt)
        tk = method_config(args, "topkd", 0).method  # TSM's settings: the TopKD config's
        plots = [
            P.accuracy_bars(rows, out / "accuracy.png", teacher_acc=teacher_acc),
            P.training_curves(results, out / "curves.png", labels=LABELS),
            P.tsm_effect(t_logits, t_y, out / "tsm.png", k=int(tk.k), gamma=float(tk.tsm.gamma),
                         lam=float(tk.tsm.lam), class_names=FMNIST_CLASSES),
        ]
    timings["total_s"] = time.perf_counter() - t_start
    payload = {"teacher": {"name": TEACHER, "checkpoint": str(ckpt), "test_acc1": teacher_acc,
                           "run_dir": str(ckpt.parents[1]), "config": TEACHER_CONFIG},
               "args": {k: v for k, v in vars(args).items() if not callable(v)},
               "overrides": common_overrides(args), "methods": specs, "summary": rows,
               "runs": [{"method": r.method, "seed": r.seed, "run_dir": r.run_dir,
                         "summary": r.summary} for r in results],
               "timings": timings}
    (out / "results.json").write_text(json.dumps(payload, indent=2, default=str))
    (out / "results.md").write_text(
        f"# topkd demo results\n\nFashion-MNIST, {TEACHER} -> {STUDENT}, {args.epochs} student "
        f"epochs on {n_fit} images, seeds {args.seeds}; runs in {out / 'runs'}.\n\n{table}\n")
    print(f"[demo] wrote {out / 'results.md'}, {out / 'results.json'}"
          + "".join(f", {p}" for p in plots))
    print(f"[demo] done in {timings['total_s']:.0f} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m topkd.demo``."""
    p = argparse.ArgumentParser(prog="topkd demo")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
