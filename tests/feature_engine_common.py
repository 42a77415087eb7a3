"""Engine runs of feature methods on real zoo pairs (tiny data, CPU, deterministic).

``feature_config(tmp, method, student=..., teacher=...)`` is a tiny CIFAR-100 distillation
config with a randomly initialised teacher saved to disk; ``assert_resume_bit_exact`` trains
2 epochs straight and 1 + resume 1, and compares the student, the method's modules and buffers
and the optimizer state bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from test_engine_common import config_dict, make_cifar100
from topkd.config import Config, deep_merge


def teacher_checkpoint(tmp: Path, name: str, num_classes: int = 100, seed: int = 0) -> Path:
    from topkd.checkpoints import save_weights
    from topkd.models import create_model

    path = tmp / f"teacher_{name}_{seed}.pt"
    if not path.is_file():
        torch.manual_seed(seed)
        save_weights(create_model(name, num_classes), path)
    return path


def feature_config(tmp: Path, method: dict[str, Any], *, student: str = "resnet8",
                   teacher: str = "resnet8", ckpt: Path | None = None, epochs: int = 2,
                   name: str = "run", **sections: Any) -> Config:
    if not (tmp / "data" / "cifar-100-python").is_dir():
        make_cifar100(tmp / "data")
    ckpt = ckpt or teacher_checkpoint(tmp, teacher)
    d = config_dict(tmp, name=name, model={"name": student}, method=method,
                    teacher={"name": teacher, "checkpoint": str(ckpt)},
                    train={"epochs": epochs, "device": "cpu", "log_every": 1})
    return Config.from_dict(deep_merge(d, sections))


def _equal_states(a: dict[str, Any], b: dict[str, Any], what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k}"


def assert_resume_bit_exact(tmp: Path, method: dict[str, Any], **kw: Any) -> dict[str, Any]:
    """2 epochs straight == 1 epoch + resume 1 (student, method state, optimizer)."""
    from topkd.engine import Trainer

    sections = {"sched": {"milestones": [1]}, "data": {"augment": True}}
    ref = feature_config(tmp, method, name="ref", **sections, **kw)
    Trainer(ref, "distill", quiet=True).fit()
    cut = feature_config(tmp, method, name="cut", **sections, **kw)
    assert Trainer(cut, "distill", quiet=True).fit(max_epochs=1) is None
    torch.manual_seed(1234)  # the resumed run must not depend on the process' RNG state
    resumed = Trainer(cut, "distill", resume="auto", quiet=True)
    assert resumed.start_epoch == 2
    resumed.fit()
    ca = torch.load(ref.run_dir / "checkpoints/last.pt", weights_only=True)
    cb = torch.load(cut.run_dir / "checkpoints/last.pt", weights_only=True)
    _equal_states(ca["model"], cb["model"], "student")
    assert ca["method"], "the method has no state to compare"
    _equal_states(ca["method"], cb["method"], "method")
    for i, st in ca["optimizer"]["state"].items():
        _equal_states(st, cb["optimizer"]["state"][i], f"optimizer state {i}")
    assert ca["best"] == cb["best"]
    return ca
