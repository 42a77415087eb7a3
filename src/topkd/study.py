"""Studies: method comparisons described by ``study.json``, rendered by ``topkd report``.

A study directory holds ordinary engine run directories and a manifest, ``study.json``
(written by ``benchmarks/testbed.py``), that says which runs form which table: per dataset the
teacher run, every method entry (its tuning trials, its final seeds, or why it cannot run),
a sweep of one parameter (the K ablation) and control variants. The manifest holds no result:
every number :func:`render` prints is read from the runs' ``summary.json`` (and, for the
teacher and the setup, their ``config.yaml``), so a report can always be regenerated from the
run directories.

Numbers: test top-1 at the epoch of best validation top-1 (``test_acc1_at_best_val``), mean ±
sample std (ddof 1) over seeds. Paired differences are per seed (``a(s) - b(s)`` over the seeds
both have), reported as mean ± std with the number of seeds where ``a`` is ahead. The best
baseline of a dataset is the entry with the highest mean among those whose role is not ``ours``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from topkd.engine.summary import is_collapsed

STUDY_FILE = "study.json"
STUDY_FORMAT = "topkd-study/1"
METRIC = "test_acc1_at_best_val"


@dataclass
class Result:
    """The finished runs of one configuration: per-seed values of a metric."""

    values: dict[int, float]  # seed -> metric

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        v = list(self.values.values())
        return sum(v) / len(v) if v else None

    @property
    def std(self) -> float | None:
        return _std(list(self.values.values()))

    def cell(self) -> str:
        return mean_std(list(self.values.values()))


def _std(v: Sequence[float]) -> float | None:
    if not v:
        return None
    if len(v) == 1:
        return 0.0
    m = sum(v) / len(v)
    return math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))


def mean_std(v: Sequence[float]) -> str:
    """``"m ± s"`` (a single value alone, ``"n/a"`` for none), two decimals."""
    if not v:
        return "n/a"
    m = sum(v) / len(v)
    return f"{m:.2f}" if len(v) == 1 else f"{m:.2f} ± {_std(v):.2f}"


def paired(a: Result, b: Result) -> tuple[list[float], int]:
    """Per-seed differences ``a - b`` over the common seeds (sorted), and how many are > 0."""
    seeds = sorted(a.values.keys() & b.values.keys())
    d = [a.values[s] - b.values[s] for s in seeds]
    return d, sum(x > 0 for x in d)


def paired_cell(a: Result, b: Result) -> str:
    d, wins = paired(a, b)
    if not d:
        return "n/a"
    m, s = sum(d) / len(d), _std(d)
    body = f"{m:+.2f}" if len(d) == 1 else f"{m:+.2f} ± {s:.2f}"
    return f"{body} ({wins}/{len(d)})"


def is_study(path: str | Path) -> bool:
    return (Path(path) / STUDY_FILE).is_file()


class Study:
    """A study directory: the manifest and its run directories (read-only)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        p = self.root / STUDY_FILE
        self.manifest = json.loads(p.read_text())
        if self.manifest.get("format") != STUDY_FORMAT:
            raise ValueError(f"{p}: format {self.manifest.get('format')!r}, expected "
                             f"{STUDY_FORMAT!r}")

    def summary(self, rec: dict[str, Any]) -> dict[str, Any] | None:
        if rec.get("status") != "ok":
            return None
        p = self.root / rec["dir"] / "summary.json"
        return json.loads(p.read_text()) if p.is_file() else None

    def config(self, rec: dict[str, Any]) -> dict[str, Any]:
        p = self.root / rec["dir"] / "config.yaml"
        return (yaml.safe_load(p.read_text()) or {}) if p.is_file() else {}

    def result(self, recs: Sequence[dict[str, Any]], metric: str = METRIC) -> Result:
        out: dict[int, float] = {}
        for rec in recs:
            s = self.summary(rec)
            if s is not None and s.get(metric) is not None:
                out[int(s.get("seed", len(out)))] = float(s[metric])
        return Result(out)

    def collapsed_seeds(self, recs: Sequence[dict[str, Any]]) -> list[int]:
        """Seeds of the runs the engine flagged as collapsed (``warnings`` in summary.json)."""
        out = []
        for rec in recs:
            s = self.summary(rec) or {}
            if is_collapsed(s):
                out.append(int(s.get("seed", -1)))
        return sorted(out)

    def chosen_trial(self, trials: Sequence[dict[str, Any]]) -> int | None:
        """Index of the trial with the best validation top-1 (ties: the earlier trial)."""
        best, best_val = None, None
        for i, t in enumerate(trials):
            s = self.summary(t)
            v = None if s is None else s.get("best_val_acc1")
            if v is not None and (best_val is None or v > best_val):
                best, best_val = i, v
        return best


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
def _fmt_changes(changes: dict[str, Any]) -> str:
    if not changes:
        return "reference"
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in sorted(changes.items()))


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    esc = [[str(c).replace("|", "\\|") for c in r] for r in rows]
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(r) + " |" for r in esc)]


def _entry_results(study: Study, ds: dict[str, Any]) -> dict[str, Result]:
    return {k: study.result(rec.get("final") or []) for k, rec in ds["methods"].items()}


def best_baseline(ds: dict[str, Any], results: dict[str, Result],
                  ours: Sequence[str]) -> str | None:
    """The non-``ours`` entry with the highest mean (ties: the first by name)."""
    cands = [(r.mean, k) for k, r in results.items()
             if k not in ours and r.mean is not None and
             ds["methods"][k].get("status", "ok") == "ok"]
    return min(cands, key=lambda t: (-t[0], t[1]))[1] if cands else None


def _setup(study: Study, dss: dict[str, Any]) -> list[str]:
    m = study.manifest
    b = m.get("budget", {})
    lines = ["## Setup", ""]
    rows = []
    for key, ds in dss.items():
        t = ds.get("teacher") or {}
        ts = study.summary(t) if t else None
        tc = study.config(t) if t else {}
        final = next((r for rec in ds["methods"].values() for r in rec.get("final") or []
                      if r.get("status") == "ok"), None)
        sc = study.config(final) if final else {}
        n_train = (sc.get("data") or {}).get("train_subset")
        rows.append([
            ds.get("label", key),
            f"`{(tc.get('model') or {}).get('name', '?')}`",
            "n/a" if not ts or ts.get(METRIC) is None else f"{ts[METRIC]:.2f}",
            f"{(tc.get('train') or {}).get('epochs', '?')} epochs, "
            f"{(tc.get('data') or {}).get('train_subset') or 'all'} images",
            f"`{(sc.get('model') or {}).get('name', '?')}`",
            f"{n_train} images, {(sc.get('train') or {}).get('epochs', '?')} epochs",
        ])
    lines += _table(["dataset", "teacher", "teacher test top-1 @ best val", "teacher training",
                     "student", "student training"], rows)
    texts = {key: _budget_line(ds.get("budget") or b, _tuning_text(study, ds))
             for key, ds in dss.items()}
    one = len(set(texts.values())) == 1
    for key, text in texts.items():
        lines += ["", ("" if one else f"{dss[key].get('label', key)}: ") + text]
        if one:
            break
    lines += [""]
    return lines


def _not_run(run: dict[str, Any]) -> bool:
    """A run not run yet (``pending`` in a ``--record`` study): it has no run directory and says
    nothing about the tuning."""
    return run.get("status", "ok") == "pending"


def _tuning_text(study: Study, ds: dict[str, Any]) -> str:
    """What tuning each entry of a dataset had, read from its trials (their number and their
    run directories' epochs): entries tuned in different invocations may differ."""
    groups: dict[tuple[int, Any], list[str]] = {}
    for k, rec in ds["methods"].items():
        if k == "ce" or rec.get("status", "ok") == "unsupported":
            continue
        trials = [t for t in rec.get("trials") or [] if not _not_run(t)]
        if rec.get("trials") and not trials:
            continue
        epochs = (study.config(trials[0]).get("train") or {}).get("epochs") if trials else None
        groups.setdefault((len(trials), epochs), []).append(k)
    texts = []
    for (n, epochs), keys in sorted(groups.items(), key=lambda g: -g[0][0]):
        if n <= 1:
            what = "none (the reference configuration, nothing to choose)"
        else:
            what = (f"{n} trials (the reference configuration and {n - 1} random "
                    f"change{'s' if n > 2 else ''} of one or two parameters by x0.5 / x2) "
                    f"of {epochs} epochs, seed 0, chosen on validation top-1 only")
        texts.append(what if len(groups) == 1 else
                     f"{what} for {', '.join(f'`{k}`' for k in sorted(keys))}")
    if len(groups) == 1 and next(iter(groups))[0] <= 1:
        return "none: every method runs its reference configuration (one trial, nothing to " \
               "choose)"
    if len(groups) == 1:
        return texts[0].replace(" trials (", " trials per method (", 1)
    return "; ".join(texts)


def _budget_line(b: dict[str, Any], tuning: str) -> str:
    return (
        f"Every student run: the dataset recipe (SGD, cosine, batch 128), "
        f"{b.get('epochs')} epochs on a fixed subset of {b.get('train_subset')} training "
        f"images, seeds {', '.join(str(s) for s in b.get('seeds', []))}; the number is test "
        f"top-1 at the epoch of best validation top-1. Tuning: {tuning}. "
        f"Distillation warm-ups: {b.get('warmup'):g} epoch{'' if b.get('warmup') == 1 else 's'}. "
        "Teacher logits: a "
        f"teacher-logit cache of {b.get('views')} crop/flip views per image for the methods "
        "that need only logits; the teacher runs online for the others.")


def _dataset_section(study: Study, key: str, ds: dict[str, Any], ours: Sequence[str]
                     ) -> tuple[list[str], list[str]]:
    """The main table of a dataset and its findings (markdown lines each)."""
    results = _entry_results(study, ds)
    base = best_baseline(ds, results, ours)
    ce = results.get("ce")
    lines = [f"## {ds.get('label', key)}", ""]
    ok = [k for k, rec in ds["methods"].items() if rec.get("status", "ok") == "ok"
          and results[k].mean is not None]
    ok.sort(key=lambda k: -(results[k].mean or 0.0))
    rows = []
    for rank, k in enumerate(ok, 1):
        rec, r = ds["methods"][k], results[k]
        trial = study.chosen_trial(rec.get("trials") or [])
        changes = (rec.get("trials") or [{}])[trial].get("overrides", {}) \
            if trial is not None else {}
        vals = " ".join(f"{r.values[s]:.2f}" for s in sorted(r.values))
        planned = len(rec.get("final") or [])
        cell = r.cell() + (f" ({r.n} of {planned} seeds)" if r.n < planned else "")
        rows.append([
            str(rank), f"**{k}**" if k in ours else k, rec.get("role", ""),
            "-" if k == "ce" else
            (_fmt_changes(changes) if rec.get("trials") else "not tuned"), cell, vals,
            "(best baseline)" if k == base else
            (paired_cell(r, results[base]) if base else "n/a"),
            "n/a" if ce is None or ce.mean is None or k == "ce" else paired_cell(r, ce),
            mean_std(list(study.result(rec.get("final") or [], "best_val_acc1")
                          .values.values())),
        ])
    lines += _table(["#", "method", "role", "tuned (vs reference)", "test top-1 @ best val",
                     "per seed", "Δ vs best baseline (wins)", "Δ vs CE (wins)",
                     "best val"], rows)
    collapsed = {k: seeds for k in ok
                 if (seeds := study.collapsed_seeds(ds["methods"][k].get("final") or []))}
    if collapsed:
        lines += ["", "Collapsed (every epoch at chance level with a finite loss: the run "
                  "learned nothing; `warnings` in its summary.json): " + "; ".join(
                      f"`{k}` seed{'s' if len(v) > 1 else ''} {', '.join(map(str, v))}"
                      for k, v in sorted(collapsed.items())) + "."]
    bad = [(k, rec) for k, rec in ds["methods"].items() if rec.get("status", "ok") != "ok"]
    # an entry the study lists but none of whose runs has finished (or started)
    bad += [(k, {"status": "pending", "reason": "no finished run in this study"})
            for k, rec in ds["methods"].items()
            if rec.get("status", "ok") == "ok" and k not in ok]
    if bad:
        lines += ["", "Not in the table:", ""]
        what = {"unsupported": "cannot run this pair", "pending": "not run yet"}
        for k, rec in sorted(bad):
            lines.append(f"* `{k}` {what.get(rec['status'], 'failed')}: {rec.get('reason')}")
    findings = []
    if ok and base:
        top = ok[0]
        findings.append(
            f"{ds.get('label', key)}: best **{top}** ({results[top].cell()}); best baseline "
            f"**{base}** ({results[base].cell()}).")
        for k in (k for k in ours if k in results and results[k].mean is not None):
            findings.append(
                f"{ds.get('label', key)}: `{k}` is #{ok.index(k) + 1} of {len(ok)}, "
                f"{paired_cell(results[k], results[base])} vs {base} (paired per seed; wins "
                "in parentheses).")
    return lines + [""], findings


def _tuning_section(study: Study, key: str, ds: dict[str, Any]) -> list[str]:
    rows = []
    for k, rec in ds["methods"].items():
        trials = rec.get("trials") or []
        chosen = study.chosen_trial(trials)
        for i, t in enumerate(trials):
            if _not_run(t):  # no row, the others keep their trial numbers
                continue
            s = study.summary(t)
            val = "n/a" if s is None or s.get("best_val_acc1") is None \
                else f"{s['best_val_acc1']:.2f}"
            rows.append([k, str(i), _fmt_changes(t.get("overrides", {})), val,
                         "**yes**" if i == chosen else ""])
    if not rows:
        return []
    return [f"### Tuning record: {ds.get('label', key)}", "",
            *_table(["method", "trial", "changes", "best val top-1", "chosen"], rows), ""]


def _sweep_section(study: Study, key: str, ds: dict[str, Any], ours: Sequence[str],
                   plots: Path | None, md_dir: Path | None) -> tuple[list[str], list[str]]:
    sw = ds.get("k_ablation")
    if not sw:
        return [], []
    points = [(p["k"], study.result(p["runs"])) for p in sw["points"]]
    points = [(k, r) for k, r in points if r.mean is not None]
    if not points:
        return [], []
    results = _entry_results(study, ds)
    base = best_baseline(ds, results, ours)
    best_k, best_r = max(points, key=lambda t: t[1].mean or 0.0)
    rows = [[str(k), r.cell(), " ".join(f"{r.values[s]:.2f}" for s in sorted(r.values)),
             "-" if k == best_k else paired_cell(r, best_r),
             paired_cell(r, results[base]) if base else "n/a"] for k, r in points]
    lines = [f"## K ablation: {ds.get('label', key)}", "",
             f"`{sw.get('entry', 'topkd')}` with its chosen configuration, only k changed.", "",
             *_table(["k", "test top-1 @ best val", "per seed", f"Δ vs k={best_k} (wins)",
                      f"Δ vs {base} (wins)"], rows), ""]
    if plots is not None:
        path = plot_sweep(points, plots / f"k_ablation_{key}.png", key=sw.get("key", "k"),
                          title=f"{sw.get('entry', 'topkd')}: K ablation on {ds.get('label')}",
                          refs={n: results[n] for n in (base, "ce") if n and n in results})
        rel = os.path.relpath(path, md_dir) if md_dir is not None else str(path)
        lines += [f"![K ablation]({Path(rel).as_posix()})", ""]
    findings = [f"{ds.get('label', key)}: best k = {best_k} ({best_r.cell()}); "
                + ", ".join(f"k={k}: {r.mean:.2f}" for k, r in points) + "."]
    return lines, findings


def _controls_section(study: Study, key: str, ds: dict[str, Any], ours: Sequence[str]
                      ) -> tuple[list[str], list[str]]:
    ctl = ds.get("controls") or []
    if not ctl:
        return [], []
    results = _entry_results(study, ds)
    base = best_baseline(ds, results, ours)
    rows, findings = [], []
    for c in ctl:
        r = study.result(c["runs"])
        orig = results.get(c["of"])
        if r.mean is None:
            continue
        rows.append([c["label"], _fmt_changes(c.get("changes", {})), r.cell(),
                     orig.cell() if orig else "n/a",
                     paired_cell(r, orig) if orig and orig.mean is not None else "n/a",
                     paired_cell(r, results[base]) if base else "n/a"])
        if orig and orig.mean is not None:
            findings.append(f"{ds.get('label', key)}: {c['label']}: "
                            f"{paired_cell(r, orig)} vs `{c['of']}` as in its table row.")
    if not rows:
        return [], []
    wrong = _corrected_share(study, ds.get("methods", {}).get("topkd", {}).get("final") or [])
    note = [] if wrong is None else [
        f"The teacher's top-1 is wrong on {100 * wrong:.1f}% of the training views the students "
        "see (mean of `train_tsm_corrected` over the final TopKD runs' epochs): the share of "
        "targets the correction changes.", ""]
    return [f"### Ground-truth correction controls: {ds.get('label', key)}", "", *note,
            *_table(["variant", "change", "test top-1 @ best val", "original",
                     "Δ vs original (wins)", f"Δ vs {base} (wins)"], rows), ""], findings


def _legacy_section(study: Study) -> list[str]:
    leg = study.manifest.get("legacy")
    if not leg:
        return []
    sz = leg.get("sizes", {})
    t = study.summary(leg.get("teacher") or {})
    rows = [["teacher", f"{leg.get('recorded_teacher')}",
             "n/a" if not t or t.get(METRIC) is None else f"{t[METRIC]:.2f}", "", ""]]
    for k, m in leg.get("methods", {}).items():
        r = study.result(m["runs"])
        rec = str(m.get("recorded", "n/a"))
        try:
            delta = f"{r.mean - float(rec.split()[0]):+.2f}" if r.mean is not None else "n/a"
        except ValueError:
            delta = "n/a"
        rows.append([k, rec, r.cell(), " ".join(f"{r.values[s]:.2f}" for s in sorted(r.values)),
                     delta])
    return [
        "## The engine on the removed loop's protocol", "",
        f"The recorded Fashion-MNIST protocol of {leg.get('source')}: teacher "
        f"{sz.get('teacher_epochs')} epochs on {sz.get('teacher_subset')} images, students "
        f"{sz.get('epochs')} epochs on {sz.get('subset')} images, {sz.get('views')} cached views, "
        "the recorded method settings; now run by the engine (`topkd.engine.Trainer`).", "",
        *_table(["method", "recorded (in-memory loop)", "engine", "engine per seed",
                 "engine - recorded (means)"], rows), ""]


def _corrected_share(study: Study, recs: Sequence[dict[str, Any]]) -> float | None:
    """Mean of the logged ``train_tsm_corrected`` (share of rows whose teacher top-1 is not the
    label) over the epochs of ``recs``' runs."""
    from topkd.report import read_metrics

    vals = [row["train_tsm_corrected"] for rec in recs if study.summary(rec) is not None
            for row in read_metrics(study.root / rec["dir"] / "metrics.csv")
            if row.get("train_tsm_corrected") is not None]
    return sum(vals) / len(vals) if vals else None  # type: ignore[arg-type]


def plot_sweep(points: Sequence[tuple[float, Result]], path: Path, key: str = "k",
               title: str = "", refs: dict[str, Result] | None = None) -> Path:
    """Mean ± std of the metric against the swept value (log x), with reference lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(6, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = [float(k) for k, _ in points]
    ax.errorbar(xs, [r.mean for _, r in points], yerr=[r.std or 0.0 for _, r in points],
                marker="o", capsize=3, label=key.split(".")[-1] + " sweep")
    for (name, r), style in zip((refs or {}).items(), ("--", ":", "-.")):
        if r.mean is not None:
            ax.axhline(r.mean, linestyle=style, color="grey", linewidth=1,
                       label=f"{name} ({r.mean:.2f})")
    ax.set_xscale("log")
    ax.set_xticks(xs, [f"{k:g}" for k in xs])
    ax.set(xlabel=key, ylabel="test top-1 @ best val (%)", title=title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=100)
    return path


def render(root: str | Path, plots: Path | None = None, md_dir: Path | None = None,
           command: str | None = None) -> str:
    """The markdown body of a study: setup, one table per dataset, tuning, sweeps, controls,
    and a list of findings computed from the same numbers."""
    study = Study(root)
    m = study.manifest
    ours = m.get("ours", [])
    dss = m.get("datasets", {})
    out = _setup(study, dss)
    cmds = list(m.get("commands") or [])
    if command:
        cmds.append(command)
    out += ["Commands (every number below is read from the run directories they write):", "",
            "```bash", *cmds, "```", ""]
    if m.get("quick"):
        out += ["**This is a --quick smoke run: its numbers mean nothing.**", ""]
    findings: list[str] = []
    tail: list[str] = []
    for key, ds in dss.items():
        lines, f = _dataset_section(study, key, ds, ours)
        out += lines
        findings += f
        lines, f = _sweep_section(study, key, ds, ours, plots, md_dir)
        out += lines
        findings += f
        lines, f = _controls_section(study, key, ds, ours)
        out += lines
        findings += f
        tail += _tuning_section(study, key, ds)
    out += _legacy_section(study)
    head = ["## Findings (computed from the tables below)", "",
            *(f"* {x}" for x in findings), ""] if findings else []
    notes = [
        "Δ columns are paired per seed (the same seed: same initialisation, data order and "
        "cached views), mean ± std over seeds, with the number of seeds where the row is ahead "
        "in parentheses. The best baseline is the best entry that is not TopKD or one of its "
        f"TSM + TDL variants ({', '.join(ours)}).", ""]
    return "\n".join(head + out + notes + (["## Tuning", "", *tail] if tail else []))
