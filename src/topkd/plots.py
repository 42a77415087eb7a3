"""Plots for the demo and benchmarks (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def accuracy_bars(rows: Sequence[Mapping[str, Any]], path: str | Path,
                  teacher_acc: float | None = None) -> str:
    """Dot plot: test top-1 at the best-validation epoch per method.

    One dot per seed, the mean as a bar-free marker with a ± std error bar when there are
    several seeds. Dots (not bars) because the axis is zoomed on the accuracies: a bar's length
    would suggest ratios that a zoomed axis does not have.
    """
    plt = _plt()
    labels = [r["label"] for r in rows]
    vals = np.array([r["test_at_best_val"] for r in rows], dtype=float)
    n = [int(r.get("seeds", 1)) for r in rows]
    fig, ax = plt.subplots(figsize=(7.5, 4))
    x = np.arange(len(rows))
    lo, hi = [], []
    for i, r in enumerate(rows):
        color = "#999999" if r["method"] == "ce" else "#d62728" if r["method"] == "topkd" \
            else "#1f77b4"
        seeds = [float(v) for v in r.get("test_at_best_val_values") or [vals[i]]]
        ax.plot([i] * len(seeds), seeds, "o", color=color, alpha=0.35, ms=4)
        std = float(r.get("test_at_best_val_std") or 0.0) if n[i] > 1 else 0.0
        ax.errorbar([i], [vals[i]], yerr=[std] if n[i] > 1 else None, fmt="D", color=color,
                    ms=7, capsize=5)
        ax.annotate(f"{vals[i]:.2f}" + (f" ± {std:.2f}" if n[i] > 1 else ""), (i, vals[i]),
                    textcoords="offset points", xytext=(9, -3), fontsize=8)
        lo.append(min(seeds + [vals[i] - std]))
        hi.append(max(seeds + [vals[i] + std]))
    if teacher_acc is not None:
        ax.axhline(teacher_acc, ls="--", color="k", lw=1, label=f"teacher {teacher_acc:.2f}%")
        ax.legend(loc="lower right")
        lo.append(teacher_acc)
        hi.append(teacher_acc)
    pad = max(0.5, 0.15 * (max(hi) - min(lo)))
    ax.set_ylim(max(0.0, min(lo) - pad), min(100.0, max(hi) + pad))
    ax.set_xticks(x)
    ax.set_xticklabels(labels)
    ax.set_xlim(-0.5, len(rows) - 0.3)
    seeds_txt = f"mean ± std over {n[0]} seeds" if min(n) > 1 else "one seed"
    ax.set_ylabel("test top-1 (%) at best-val epoch")
    ax.set_title(f"Fashion-MNIST student accuracy per method ({seeds_txt}; axis zoomed)")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def training_curves(results: Sequence[Any], path: str | Path,
                    labels: Mapping[str, str] | None = None) -> str:
    """Validation accuracy and training loss per epoch, mean over seeds, one line per method."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for m in dict.fromkeys(r.method for r in results):
        hs = [r.history for r in results if r.method == m]
        n = min(len(h) for h in hs)
        ep = np.arange(1, n + 1)
        val = np.mean([[row["val_acc1"] for row in h[:n]] for h in hs], axis=0)
        loss = np.mean([[row["train_loss"] for row in h[:n]] for h in hs], axis=0)
        name = (labels or {}).get(m, m)
        a1.plot(ep, val, marker="o", label=name)
        a2.plot(ep, loss, marker="o", label=name)
    from matplotlib.ticker import MaxNLocator

    for ax in (a1, a2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    a1.set_xlabel("epoch")
    a1.set_ylabel("validation top-1 (%)")
    a1.legend(fontsize=8)
    a2.set_xlabel("epoch")
    a2.set_ylabel("training loss (method's own objective)")
    a2.set_yscale("log")
    fig.suptitle("Training curves")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def tsm_effect(teacher_logits: torch.Tensor, labels: torch.Tensor, path: str | Path, *, k: int = 3,
               gamma: float = 1.0, lam: float = 0.5, n: int = 4,
               class_names: Sequence[str] | None = None) -> str:
    """What TSM does to a few teacher logit vectors: centered logits before vs after TSM.

    Picks samples where the teacher is WRONG (so the ground-truth correction shows), falling
    back to correct ones if there are too few. Top-k entries are hatched, the ground truth is
    starred, the teacher's (wrong) argmax is marked with a red caret.
    """
    from topkd.losses import tsm

    plt = _plt()
    t = teacher_logits.float()
    y = labels.long()
    wrong = torch.nonzero(t.argmax(1) != y).flatten()
    pick = torch.cat([wrong, torch.nonzero(t.argmax(1) == y).flatten()])[:n]
    tt, yy = t[pick], y[pick]
    after = tsm(tt, yy, k, gamma=gamma, lam=lam, correct_gt=True)
    before = tt - tt.mean(1, keepdim=True)
    c = t.shape[1]
    names = list(class_names) if class_names else [str(i) for i in range(c)]
    cols = 2
    rows = (len(pick) + 1) // 2
    fig, axes = plt.subplots(rows, cols, figsize=(12, 3.4 * rows), squeeze=False)
    x = np.arange(c)
    for ax, b, a, yi in zip(axes.flat, before, after, yy):
        top = set(torch.topk(b, k).indices.tolist())
        hatch = ["//" if i in top else "" for i in range(c)]
        ax.bar(x - 0.2, b.numpy(), 0.4, color="#9ecae1", label="teacher (centered)",
               hatch=None)
        bars = ax.bar(x + 0.2, a.numpy(), 0.4, color="#fd8d3c", label="after TSM")
        for bar, h in zip(bars, hatch):
            bar.set_hatch(h)
        gt, am = int(yi), int(b.argmax())
        ax.plot([gt + 0.2], [float(a[gt])], marker="*", ms=14, color="green", ls="",
                label="ground truth")
        if am != gt:
            ax.plot([am - 0.2], [float(b[am])], marker="v", ms=9, color="red", ls="",
                    label="teacher argmax (wrong)")
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=40, ha="right", fontsize=7)
        status = "teacher wrong -> GT raised to top" if am != gt else "teacher right"
        ax.set_title(f"true: {names[gt]} ({status}); hatched = top-{k}", fontsize=9)
        ax.legend(fontsize=7, loc="best")
    for ax in list(axes.flat)[len(pick):]:
        ax.axis("off")
    fig.suptitle(f"Top-K Scaling Module (k={k}, gamma={gamma}, lam={lam}) on teacher logits")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
