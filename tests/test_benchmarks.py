"""Smoke test of benchmarks/throughput.py (the engine step vs a plain-PyTorch KD loop)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load_throughput(monkeypatch):
    # the script imports its sibling ``_fmnist_loop`` as ``python benchmarks/throughput.py`` would
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_throughput",
                                                  ROOT / "benchmarks" / "throughput.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_throughput_benchmark_runs_engine_step(monkeypatch, tmp_path):
    from topkd.data import DatasetNotFoundError

    tp = _load_throughput(monkeypatch)
    calls: list[int] = []
    from topkd.engine.step import TrainStep

    real_step = TrainStep.__call__

    def counting_step(self, x, y, *, epoch, cached=None, **kw):
        calls.append(0 if cached is None else 1)
        return real_step(self, x, y, epoch=epoch, cached=cached, **kw)

    monkeypatch.setattr(TrainStep, "__call__", counting_step)
    threads = torch.get_num_threads()
    try:
        out = tp.benchmark(["--batch-size", "8", "--steps", "2", "--rounds", "1",
                            "--json", str(tmp_path / "tp.json")])
    except DatasetNotFoundError:
        pytest.skip("Fashion-MNIST not available")
    finally:
        torch.set_num_threads(threads)
    res = out["step"]["fmnist"]
    assert set(res) == {f"{m} ({tag})" for m in ("plain KD", "topkd KD", "topkd TopKD")
                        for tag in ("online", "cache")}
    for v in res.values():
        assert v["wall_img_s"] > 0 and v["cpu_img_s"] > 0
        assert math.isfinite(v["ratio_cpu"]) and v["ratio_cpu"] > 0
    assert res[tp.REF]["ratio_cpu"] == 1.0 and res[tp.REF]["ratio_wall"] == 1.0
    # "topkd" rows are the engine's TrainStep: 2 losses x 2 steps x 2 rounds (warm-up + 1), online
    # with cached=None and cached with the cache's logits.
    assert calls.count(0) == 8 and calls.count(1) == 8
    assert (tmp_path / "tp.json").exists()
