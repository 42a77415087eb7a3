"""Aggregation of run summaries over seeds (used by multi-seed runs and ``topkd report``).

>>> rows = aggregate_runs(["runs/x/seed_0", "runs/x/seed_1"])   # doctest: +SKIP
>>> print(format_markdown(rows))                                 # doctest: +SKIP

Each row aggregates the runs sharing a ``name`` (from their ``summary.json``): ``mean`` and
sample standard deviation (``ddof=1``; 0 for a single run) of every metric in :data:`METRICS`.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# summary.json key -> column label. "best test" is an oracle number (picked on the test set):
# it is reported for comparison with papers that do so, and labelled as such.
METRICS: dict[str, str] = {
    "best_val_acc1": "best val acc@1",
    "test_acc1_at_best_val": "test acc@1 at best val",
    "last_test_acc1": "last test acc@1",
    "best_test_acc1": "best test acc@1 (oracle, picked on test)",
}


def is_collapsed(summary: dict[str, Any]) -> bool:
    """The engine flagged the run as collapsed at chance level (``warnings`` in summary.json,
    written by :func:`topkd.engine.trainer.chance_collapse`)."""
    return any(str(w).startswith("collapsed") for w in summary.get("warnings", []))


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (is the run finished?)")
    return json.loads(path.read_text())


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    m = sum(values) / len(values)
    if len(values) == 1:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def aggregate_runs(run_dirs: Iterable[str | Path]) -> list[dict[str, Any]]:
    """One row per run name: ``name, n, seeds, <metric>_mean, <metric>_std, <metric>_values``.

    Metrics that are ``null`` in a summary (e.g. ``best_val_acc1`` without a val split) are
    skipped for that run; a metric missing in every run has mean/std ``None``.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for d in run_dirs:
        s = read_summary(d)
        groups.setdefault(str(s.get("name", Path(d).name)), []).append(s)
    rows = []
    for name, runs in groups.items():
        row: dict[str, Any] = {"name": name, "n": len(runs),
                               "seeds": [r.get("seed") for r in runs]}
        for key in METRICS:
            vals = [float(r[key]) for r in runs if r.get(key) is not None]
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_std(vals)
            row[f"{key}_values"] = vals
        rows.append(row)
    return rows


def _fmt(mean: float | None, std: float | None, n: int = 2) -> str:
    """``mean ± std``; a single run is shown as its value (a std of one seed means nothing)."""
    if mean is None:
        return "n/a"
    return f"{mean:.2f}" if n == 1 else f"{mean:.2f} ± {std:.2f}"


def format_mean_std(values: list[float]) -> str:
    """``"m ± s"`` (sample std) over several values, the value itself for one."""
    m, sd = _mean_std(values)
    return _fmt(m, sd, len(values))


def format_markdown(rows: list[dict[str, Any]]) -> str:
    """A Markdown table: one line per row, ``mean ± std`` cells."""
    head = ["run", "seeds", *METRICS.values()]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["name"]), str(r["n"]),
                 *(_fmt(r[f"{k}_mean"], r[f"{k}_std"], len(r[f"{k}_values"]))
                   for k in METRICS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def format_csv(rows: list[dict[str, Any]]) -> str:
    cols = ["name", "n", "seeds"] + [f"{k}_{s}" for k in METRICS for s in ("mean", "std")]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({**r, "seeds": " ".join(str(s) for s in r["seeds"])})
    return buf.getvalue()


def write_seed_summary(out_dir: str | Path, run_dirs: list[str | Path]) -> list[dict[str, Any]]:
    """Write ``OUT/summary.md`` (aggregate + per-seed tables) and ``OUT/summary.csv``."""
    from topkd.utils.io import atomic_write_text

    out = Path(out_dir)
    rows = aggregate_runs(run_dirs)
    per_seed = ["| seed | " + " | ".join(METRICS.values()) + " |",
                "|" + "---|" * (len(METRICS) + 1)]
    for d in run_dirs:
        s = read_summary(d)
        cells = ["n/a" if s.get(k) is None else f"{float(s[k]):.2f}" for k in METRICS]
        per_seed.append(f"| {s.get('seed')} | " + " | ".join(cells) + " |")
    md = (f"# {', '.join(r['name'] for r in rows)}: {len(run_dirs)} seeds\n\n"
          "Mean ± sample std (ddof=1) over seeds. Model selection on the held-out val split "
          "(when there is one) is the honest number; best-on-test is an oracle.\n\n"
          + format_markdown(rows) + "\n## Per seed\n\n" + "\n".join(per_seed) + "\n")
    atomic_write_text(out / "summary.md", md)
    atomic_write_text(out / "summary.csv", format_csv(rows))
    return rows
