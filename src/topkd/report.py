"""``topkd report``: tables and curves from finished run directories.

>>> topkd report runs/cifar100_res32x4_res8x4_kd runs/cifar100_res32x4_res8x4_topkd \\
...     --output results.md --plots plots/                                   # doctest: +SKIP

Inputs are run directories as written by the engine (``docs/architecture.md``): a directory with a
``summary.json`` is one run; a directory with ``seed_<s>/summary.json`` sub-directories is a
multi-seed group; any other directory is searched (up to :data:`MAX_DEPTH` levels) for those, so
``topkd report runs/`` reports everything under ``runs/``.

Runs are grouped by their ``name`` (``summary.json``; all seeds of one config share it) with
:func:`topkd.engine.summary.aggregate_runs`: each cell is the mean ± sample standard deviation
(ddof=1, 0 for one seed) over seeds. Columns: the honest model-selection number (test accuracy at
the epoch of best held-out validation accuracy; ``n/a`` for runs trained without a val split),
the last-epoch test accuracy, and the best test accuracy over epochs, which is labelled as an
oracle because it is picked on the test set (what many KD papers report). Dataset, teacher ->
student and a method label are read from each run's ``config.yaml``.

``--pivot METRIC`` adds a paper-style table of one metric (a row per method, a column per
dataset/pair), the layout of the KD papers' CIFAR-100 tables.

Plots (matplotlib, Agg, no display needed) go to ``--plots DIR``: ``test_acc1.png`` and
``train_loss.png`` (one curve per group, the mean over seeds with a ± std band) and
``<name>.png`` per group (test/val accuracy and train loss of each seed).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from topkd.engine.summary import METRICS, aggregate_runs, is_collapsed

MAX_DEPTH = 3


@dataclass
class Run:
    """One run directory: its summary, resolved config and per-epoch metrics."""

    path: Path
    summary: dict[str, Any]
    config: dict[str, Any]
    metrics: list[dict[str, float | None]] = field(default_factory=list)

    @property
    def name(self) -> str:
        # the rule of topkd.engine.summary.aggregate_runs, so both group runs identically
        return str(self.summary.get("name", self.path.name))


# --------------------------------------------------------------------------- discovery/reading


def find_run_dirs(paths: Iterable[str | Path], max_depth: int = MAX_DEPTH) -> list[Path]:
    """Run directories (those holding ``summary.json``) given runs, seed groups or parents.

    Raises ``FileNotFoundError`` naming a path that does not exist or contains no finished run.
    """
    found: list[Path] = []

    def walk(d: Path, depth: int) -> None:
        if (d / "summary.json").is_file():
            found.append(d)
            return
        if depth >= max_depth:
            return
        for sub in sorted(p for p in d.iterdir() if p.is_dir()):
            walk(sub, depth + 1)

    for p in paths:
        p = Path(p)
        if not p.is_dir():
            raise FileNotFoundError(f"{p}: not a directory")
        before = len(found)
        walk(p, 0)
        if len(found) == before:
            raise FileNotFoundError(
                f"{p}: no finished run found (no summary.json in it, in seed_*/ or in "
                f"sub-directories up to depth {max_depth})"
            )
    return list(dict.fromkeys(found))  # keep order, drop duplicates


def _num(text: str | None) -> float | None:
    if text is None or text.strip() == "" or text.strip().lower() in ("nan", "none", "null"):
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def read_metrics(path: str | Path) -> list[dict[str, float | None]]:
    """``metrics.csv`` as a list of rows (numbers, ``None`` for empty cells); [] if missing."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [{k: _num(v) for k, v in row.items() if k} for row in csv.DictReader(f)]


def read_run(run_dir: str | Path) -> Run:
    """Read ``summary.json``, ``config.yaml`` (optional) and ``metrics.csv`` (optional)."""
    from topkd.engine.summary import read_summary

    d = Path(run_dir)
    cfg_path = d / "config.yaml"
    config = (yaml.safe_load(cfg_path.read_text()) or {}) if cfg_path.is_file() else {}
    return Run(d, read_summary(d), config, read_metrics(d / "metrics.csv"))


def method_label(method: dict[str, Any] | None) -> str:
    """A short method name from a resolved ``method`` section, e.g. ``dkd+ls``, ``kd+tsm+tdl``."""
    if not method:
        return "?"
    name = str(method.get("name", "?"))
    parts = [name]

    def on(key: str) -> bool:  # a section is on unless absent, null or false
        return method.get(key) not in (None, False)

    if method.get("ls"):
        parts.append("ls")
    if name == "topkd" and "tsm" in method and not on("tsm"):
        parts.append("no-tsm")
    elif name != "topkd" and on("tsm"):
        parts.append("tsm")
    if on("tdl"):
        parts.append("tdl")
    return "+".join(parts)


def _pair_label(config: dict[str, Any]) -> str:
    student = (config.get("model") or {}).get("name") or "?"
    teacher = (config.get("teacher") or {}).get("name")
    return f"{teacher} -> {student}" if teacher else str(student)


def _distinct(values: Iterable[Any]) -> str:
    vals = list(dict.fromkeys(str(v) for v in values if v is not None))
    return "/".join(vals) if vals else "?"


# --------------------------------------------------------------------------- tables


def build_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Aggregate rows (one per run name), sorted by name, with descriptive columns added.

    Each row is :func:`topkd.engine.summary.aggregate_runs`'s (``name, n, seeds,
    <metric>_mean/_std/_values``) plus ``dataset, pair, method, epochs, run_dirs``.
    """
    by_name: dict[str, list[Run]] = {}
    for r in runs:
        by_name.setdefault(r.name, []).append(r)
    rows = []
    for row in aggregate_runs([r.path for r in runs]):
        group = by_name.get(str(row["name"]), [])
        epochs = sorted({int(r.summary["epochs"]) for r in group
                         if r.summary.get("epochs") is not None})
        row.update(
            dataset=_distinct((r.config.get("data") or {}).get("name") for r in group),
            pair=_distinct(_pair_label(r.config) for r in group),
            method=_distinct(method_label(r.config.get("method")) for r in group),
            epochs="?" if not epochs else (
                str(epochs[0]) if len(epochs) == 1 else f"{epochs[0]}-{epochs[-1]}"),
            run_dirs=[str(r.path) for r in group],
            collapsed=sorted(int(r.summary.get("seed", -1)) for r in group
                             if is_collapsed(r.summary)),
        )
        rows.append(row)
    return sorted(rows, key=lambda r: str(r["name"]))


def _cell(mean: float | None, std: float | None, n: int) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f}"


TABLE_NOTE = (
    "Mean ± sample std (ddof=1) over seeds (a single seed shows its value). "
    "\"test acc@1 at best val\" selects the epoch on a held-out validation split carved from "
    "the training set (n/a when a run had none); \"best test acc@1\" is an oracle picked on "
    "the test set, reported only for comparison with papers that report it."
)


def format_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The report table in Markdown, followed by a note on what the columns mean."""
    head = ["run", "dataset", "teacher -> student", "method", "seeds", "epochs",
            *METRICS.values()]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        n = int(r.get("n", 0))
        metrics = (_cell(r.get(f"{k}_mean"), r.get(f"{k}_std"), len(r.get(f"{k}_values", [])))
                   for k in METRICS)
        cells = [str(r["name"]), str(r.get("dataset", "?")), str(r.get("pair", "?")),
                 str(r.get("method", "?")), str(n), str(r.get("epochs", "?")), *metrics]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    collapsed = [f"{r['name']} (seed{'s' if len(r['collapsed']) > 1 else ''} "
                 f"{', '.join(map(str, r['collapsed']))})" for r in rows if r.get("collapsed")]
    note = ("" if not collapsed else "\n\nCollapsed at chance level (every epoch; `warnings` in "
            "summary.json): " + "; ".join(collapsed) + ".")
    return "\n".join(lines) + note + "\n\n" + TABLE_NOTE + "\n"


def format_pivot(rows: Sequence[dict[str, Any]], metric: str = "test_acc1_at_best_val") -> str:
    """A paper-style Markdown table of one metric: a row per method, a column per pair.

    Columns are ``dataset: teacher -> student``; a cell with several runs of the same method and
    pair (different names) lists them separated by `` / ``.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    cols = list(dict.fromkeys(f"{r.get('dataset', '?')}: {r.get('pair', '?')}" for r in rows))
    methods = list(dict.fromkeys(str(r.get("method", "?")) for r in rows))
    cells: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        col = f"{r.get('dataset', '?')}: {r.get('pair', '?')}"
        cells.setdefault((str(r.get("method", "?")), col), []).append(
            _cell(r.get(f"{metric}_mean"), r.get(f"{metric}_std"),
                  len(r.get(f"{metric}_values", []))))
    lines = [f"{METRICS[metric]}, mean ± std over seeds:", "",
             "| method | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for m in methods:
        row = [" / ".join(cells.get((m, c), ["-"])) for c in cols]
        lines.append("| " + " | ".join([m, *row]) + " |")
    return "\n".join(lines) + "\n"


CSV_COLUMNS = ["name", "dataset", "pair", "method", "n", "seeds", "epochs"] + [
    f"{k}_{s}" for k in METRICS for s in ("mean", "std", "values")
]


def format_csv(rows: Sequence[dict[str, Any]]) -> str:
    """The report table as CSV (per-seed values space-separated in ``<metric>_values``)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        out = dict(r)
        out["seeds"] = " ".join(str(s) for s in r.get("seeds", []))
        for k in METRICS:
            out[f"{k}_values"] = " ".join(f"{v:g}" for v in r.get(f"{k}_values", []))
            for s in ("mean", "std"):
                v = r.get(f"{k}_{s}")
                out[f"{k}_{s}"] = "" if v is None else repr(float(v))
        w.writerow(out)
    return buf.getvalue()


# --------------------------------------------------------------------------- plots


def _series(run: Run, key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, row in enumerate(run.metrics):
        y = row.get(key)
        if y is None:
            continue
        x = row.get("epoch")
        xs.append(float(x) if x is not None else float(i + 1))
        ys.append(float(y))
    return xs, ys


def _mean_band(runs: Sequence[Run], key: str) -> tuple[list[float], list[float], list[float]]:
    """Per-epoch mean and sample std of ``key`` over ``runs`` (epochs any run has)."""
    per_epoch: dict[float, list[float]] = {}
    for r in runs:
        for x, y in zip(*_series(r, key)):
            per_epoch.setdefault(x, []).append(y)
    xs = sorted(per_epoch)
    means, stds = [], []
    for x in xs:
        v = per_epoch[x]
        m = sum(v) / len(v)
        means.append(m)
        stds.append(math.sqrt(sum((a - m) ** 2 for a in v) / (len(v) - 1)) if len(v) > 1 else 0.0)
    return xs, means, stds


def _safe_filename(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "run"


def write_plots(runs: Sequence[Run], out_dir: str | Path) -> list[Path]:
    """Write the curve plots (PNG) into ``out_dir``; return the files written.

    Uses matplotlib's object API with the Agg canvas, so no display and no global backend change.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.name, []).append(r)
    written: list[Path] = []

    def save(fig: Figure, name: str) -> None:
        for ax in fig.axes:  # epochs are integers (no 0.5 ticks on short runs)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        FigureCanvasAgg(fig)
        path = out / name
        fig.savefig(path, dpi=100)
        written.append(path)

    for key, ylabel, fname in (("test_acc1", "test acc@1 (%)", "test_acc1.png"),
                               ("train_loss", "train loss", "train_loss.png")):
        fig = Figure(figsize=(7, 4.5), layout="constrained")
        ax = fig.add_subplot()
        for name, group in sorted(groups.items()):
            xs, means, stds = _mean_band(group, key)
            if not xs:
                continue
            label = f"{name} (n={len(group)})" if len(group) > 1 else name
            (line,) = ax.plot(xs, means, label=label, linewidth=1.2, marker="o", markersize=3)
            if len(group) > 1:
                ax.fill_between(xs, [m - s for m, s in zip(means, stds)],
                                [m + s for m, s in zip(means, stds)],
                                color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize="small")
        save(fig, fname)

    for name, group in sorted(groups.items()):
        fig = Figure(figsize=(10, 4), layout="constrained")
        acc, loss = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        for r in group:
            seed = r.summary.get("seed", r.path.name)
            color = None  # val (dashed) shares its seed's test colour
            for key, style in (("test_acc1", "-"), ("val_acc1", "--")):
                xs, ys = _series(r, key)
                if xs:
                    (line,) = acc.plot(xs, ys, style, color=color, linewidth=1.0, marker="o",
                                       markersize=3, label=f"{key.split('_')[0]} seed {seed}")
                    color = line.get_color()
            xs, ys = _series(r, "train_loss")
            if xs:
                loss.plot(xs, ys, label=f"seed {seed}", linewidth=1.0, marker="o", markersize=3)
        acc.set(title=f"{name}: accuracy", xlabel="epoch", ylabel="acc@1 (%)")
        loss.set(title=f"{name}: train loss", xlabel="epoch", ylabel="loss")
        for ax in (acc, loss):
            ax.grid(True, alpha=0.3)
            if ax.get_lines():
                ax.legend(fontsize="small")
        save(fig, f"{_safe_filename(name)}.png")
    return written


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``topkd report``."""
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run directories, multi-seed directories (seed_*/) or parents of them")
    parser.add_argument("--output", "-o", type=Path, default=None,
                        help="write the table here (default: stdout); with --format md the CSV "
                             "is also written next to it with a .csv suffix")
    parser.add_argument("--format", choices=("md", "csv"), default=None,
                        help="table format (default: from the --output suffix, else md)")
    parser.add_argument("--pivot", choices=tuple(METRICS), default=None, metavar="METRIC",
                        help="(md) also print a paper-style table of METRIC: a row per method, "
                             f"a column per dataset/pair; one of {', '.join(METRICS)}")
    parser.add_argument("--plots", type=Path, default=None, metavar="DIR",
                        help="also write PNG curves (test acc@1, train loss) into DIR; for a "
                             "study, its sweep plots (the K ablation)")
    parser.add_argument("--template", type=Path, default=None, metavar="FILE",
                        help="(study) markdown whose line '{{report}}' is replaced by the "
                             "generated report (prose around generated tables)")


def run_study(args: argparse.Namespace) -> int:
    """``topkd report STUDY_DIR``: the study's report (:mod:`topkd.study`) as markdown."""
    from topkd import study

    if len(args.run_dirs) != 1:
        print("topkd report: a study directory (with study.json) is reported alone",
              file=sys.stderr)
        return 2
    cmd = "topkd report " + " ".join(getattr(args, "argv", [])[1:]) \
        if getattr(args, "argv", None) else None
    md_dir = args.output.parent if args.output is not None else None
    try:
        body = study.render(args.run_dirs[0], plots=args.plots, md_dir=md_dir, command=cmd)
        if args.template is not None:
            template = args.template.read_text()
            if "{{report}}" not in template:
                raise ValueError(f"{args.template}: no '{{{{report}}}}' line to replace")
            text = template.replace("{{report}}", body)
        else:
            text = f"# {study.Study(args.run_dirs[0]).manifest.get('title', 'Study')}\n\n{body}"
    except (OSError, ValueError, KeyError) as e:
        print(f"topkd report: {e}", file=sys.stderr)
        return 2
    if not text.endswith("\n"):
        text += "\n"
    if args.output is None:
        sys.stdout.write(text)
    else:
        from topkd.utils.io import atomic_write_text

        atomic_write_text(args.output, text)
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    """Run ``topkd report``; return the exit status (2 for missing/broken inputs)."""
    from topkd import study

    if any(study.is_study(d) for d in args.run_dirs):
        return run_study(args)
    if getattr(args, "template", None) is not None:
        print("topkd report: --template is for study directories (with study.json)",
              file=sys.stderr)
        return 2
    try:
        runs = [read_run(d) for d in find_run_dirs(args.run_dirs)]
    except (FileNotFoundError, ValueError, yaml.YAMLError) as e:
        print(f"topkd report: {e}", file=sys.stderr)
        return 2
    rows = build_rows(runs)
    fmt = args.format or ("csv" if args.output and args.output.suffix == ".csv" else "md")
    text = format_csv(rows) if fmt == "csv" else format_markdown(rows)
    if fmt == "md" and getattr(args, "pivot", None):
        text += "\n" + format_pivot(rows, args.pivot)
    if args.output is None:
        sys.stdout.write(text)
    else:
        from topkd.utils.io import atomic_write_text

        atomic_write_text(args.output, text)
        written = [args.output]
        if fmt == "md":
            csv_path = args.output.with_suffix(".csv")
            if csv_path != args.output:
                atomic_write_text(csv_path, format_csv(rows))
                written.append(csv_path)
        print(f"wrote {', '.join(map(str, written))} ({len(rows)} rows, {len(runs)} runs)",
              file=sys.stderr)
    if args.plots is not None:
        files = write_plots(runs, args.plots)
        print(f"wrote {len(files)} plots to {args.plots}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m topkd.report RUN_DIR...``."""
    parser = argparse.ArgumentParser(prog="topkd report", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
