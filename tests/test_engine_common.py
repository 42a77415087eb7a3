"""Shared helpers for the engine/CLI/resume/DDP tests (no tests here).

Import ``tinynet_registered`` (an autouse fixture) into a test module to get ``test_tinynet``.

Tiny CIFAR-100 data in the official pickle format, a tiny BN-free conv net registered as
``test_tinynet`` and a config factory. Kept tiny: the CI machine has 2 shared CPU cores.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from topkd.config import Config, deep_merge
from topkd.models import ClassifierModel, register_model
from topkd.models import _factory as factory

N_CLASSES_USED = 4  # labels drawn from the first 4 of the 100 classes: learnable in a few steps


class TinyNet(ClassifierModel):
    """conv(3->8, stride 4) + ReLU + global pool + linear: no BatchNorm (DDP-equivalence safe)."""

    def __init__(self, num_classes: int = 100, width: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, stride=4, padding=1)
        self.fc = nn.Linear(width, num_classes)
        self.feature_dim = width

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)).mean(dim=(2, 3))

    def get_classifier(self) -> nn.Linear:
        return self.fc


class TinyBNNet(TinyNet):
    """TinyNet with a BatchNorm after the conv: running statistics that differ per DDP rank."""

    def __init__(self, num_classes: int = 100, width: int = 8) -> None:
        super().__init__(num_classes, width)
        self.bn = nn.BatchNorm2d(width)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))


TEST_MODELS = {"test_tinynet": TinyNet, "test_bnnet": TinyBNNet}


def register_tinynet() -> None:
    """Register ``test_tinynet`` and ``test_bnnet`` (idempotent). Subprocess scripts call this
    explicitly."""
    for name, cls in TEST_MODELS.items():
        if name not in factory.MODELS:
            register_model(name)(lambda num_classes=100, cls=cls, **kw: cls(num_classes, **kw))


def unregister_tinynet() -> None:
    # Other test modules pin the exact list of registered models: leave no trace.
    for name in TEST_MODELS:
        factory.MODELS._items.pop(name, None)
        factory._INFO.pop(name, None)
        factory._CANONICAL.pop(name, None)


@pytest.fixture(scope="module", autouse=True)
def tinynet_registered():
    """Autouse in every module that imports it: ``test_tinynet`` exists during that module."""
    register_tinynet()
    yield
    unregister_tinynet()


def make_cifar100(root: Path, n_train: int = 32, n_test: int = 16, seed: int = 0) -> Path:
    """Write ``root/cifar-100-python/{train,test,meta}`` with class-dependent images."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = (np.arange(n) % N_CLASSES_USED).astype(np.int64)
        base = (labels[:, None] * 60 + 20).astype(np.float64)
        data = np.clip(base + rng.normal(0, 25, size=(n, 3072)), 0, 255).astype(np.uint8)
        with open(folder / split, "wb") as f:
            pickle.dump({b"data": data, b"fine_labels": labels.tolist()}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}, f)
    return Path(root)


def config_dict(tmp: Path, **sections: Any) -> dict[str, Any]:
    """A tiny-run config as a dict; ``sections`` are deep-merged on top."""
    base = {
        "name": "tiny",
        "output_dir": str(tmp / "runs"),
        "seed": 0,
        "deterministic": True,
        "data": {"name": "cifar100", "root": str(tmp / "data"), "batch_size": 16,
                 "eval_batch_size": 16, "num_workers": 0, "augment": False},
        "model": {"name": "test_tinynet"},
        "method": {"name": "ce"},  # plain CE
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
        "sched": {"name": "multistep", "milestones": [2], "gamma": 0.1},
        "train": {"epochs": 2, "device": "cpu", "log_every": 1},
    }
    return deep_merge(base, sections)


def tiny_config(tmp: Path, **sections: Any) -> Config:
    if not (tmp / "data" / "cifar-100-python").is_dir():
        make_cifar100(tmp / "data")
    return Config.from_dict(config_dict(tmp, **sections))


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    import csv

    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))
