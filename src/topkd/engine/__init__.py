"""Training engine: :class:`Trainer`, evaluation, LR schedules, multi-seed summaries."""

from topkd.engine.evaluate import evaluate
from topkd.engine.optim import LRSchedule, build_optimizer
from topkd.engine.run import run_training
from topkd.engine.summary import aggregate_runs, format_markdown, write_seed_summary
from topkd.engine.trainer import CKPT_FORMAT, NonFiniteLossError, Trainer

__all__ = [
    "CKPT_FORMAT",
    "LRSchedule",
    "NonFiniteLossError",
    "Trainer",
    "aggregate_runs",
    "build_optimizer",
    "evaluate",
    "format_markdown",
    "run_training",
    "write_seed_summary",
]
