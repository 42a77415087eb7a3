"""Entry point used by the CLI: one run, or several seeds one after another (+ summary)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from topkd.config import Config, ConfigError
from topkd.engine.summary import write_seed_summary
from topkd.engine.trainer import Trainer
from topkd.utils.dist import barrier, init_distributed


def run_training(cfg: Config, mode: str, *, seeds: list[int] | None = None,
                 resume: str | None = None, argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Train one run into ``cfg.run_dir`` or, with ``seeds``, each seed into ``run_dir/seed_<s>``.

    Multi-seed runs then write ``run_dir/summary.md`` and ``summary.csv``. ``resume="auto"``
    resumes every seed from its own ``last.pt`` (finished seeds are only re-summarised).
    """
    try:
        dist = init_distributed(cfg.train.device)
    except ValueError as e:  # e.g. CUDA requested but absent, a GPU index under DDP
        raise ConfigError(str(e)) from None
    resume = resume if resume is not None else cfg.train.resume
    if not seeds:
        summary = Trainer(cfg, mode, cfg.run_dir, resume=resume, dist=dist, argv=argv).fit()
        barrier()  # rank 0 may still be writing when the others finish
        return [summary or {}]
    if resume not in (None, "auto"):
        raise ConfigError("with --seeds, resume must be 'auto' (each seed resumes its own "
                          "RUN_DIR/seed_<s>/checkpoints/last.pt)")
    out, summaries, dirs = cfg.run_dir, [], []
    for s in seeds:
        run_dir = out / f"seed_{s}"
        seed_cfg = dataclasses.replace(cfg, seed=s)
        summaries.append(Trainer(seed_cfg, mode, run_dir, resume=resume, dist=dist,
                                 argv=argv).fit() or {})
        dirs.append(run_dir)
    barrier()
    if dist.is_main:
        write_seed_summary(out, dirs)
        print(f"wrote {Path(out) / 'summary.md'}", flush=True)
    return summaries
