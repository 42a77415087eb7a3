"""Smoke test of benchmarks/throughput.py (the engine step vs a plain-PyTorch KD loop)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load_throughput(monkeypatch):
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
        out = tp.benchmark(["--batch-size", "8", "--steps", "2", "--rounds", "1", "--data",
                            "--json", str(tmp_path / "tp.json")])
    except DatasetNotFoundError:
        pytest.skip("Fashion-MNIST not available")
    finally:
        torch.set_num_threads(threads)
    res = out["step"]["fmnist"]
    engine_rows = ("topkd KD, defaults", "topkd TopKD, defaults", "topkd KD, switches off")
    assert set(res) == {f"{m} ({tag})" for m in ("plain KD", *engine_rows)
                        for tag in ("online", "cache")}
    data = out["step"]["fmnist_data"]
    assert set(data) == {f"{m} ({tag})" for m in ("plain KD + DataLoader",
                                                  "topkd KD, defaults + engine loader")
                         for tag in ("online", "cache")}
    for v in [*res.values(), *data.values()]:
        assert v["wall_img_s"] > 0 and v["cpu_img_s"] > 0
        assert math.isfinite(v["ratio_cpu"]) and v["ratio_cpu"] > 0
    assert res[tp.REF]["ratio_cpu"] == 1.0 and res[tp.REF]["ratio_wall"] == 1.0
    assert data[tp.DATA_REF]["ratio_cpu"] == 1.0
    # "topkd" rows are the engine's TrainStep: 3 engine rows x 2 steps x 2 rounds (warm-up + 1)
    # per tag, online with cached=None and cached with the cache's logits; then the data loops
    # (1 engine loop per tag).
    assert calls.count(0) == 12 + 4 and calls.count(1) == 12 + 4
    assert (tmp_path / "tp.json").exists()


def test_throughput_epoch_times_the_engine_online_and_cached(monkeypatch, tmp_path):
    from fixtures_data import write_fashion_mnist
    from topkd.config import load_config
    from topkd.models import create_model

    tp = _load_throughput(monkeypatch)
    write_fashion_mnist(tmp_path / "fm", n_train=200, n_test=40)
    threads = torch.get_num_threads()
    try:
        ep = tp.engine_epoch(create_model("fmnist_cnn_teacher", 10), str(tmp_path / "fm"), 64,
                             32, tmp_path)
    finally:
        torch.set_num_threads(threads)
    assert set(ep) == {"online", "cache"}
    for name, v in ep.items():
        assert v["train_wall_s"] > 0 and v["total_cpu_s"] > 0
        cfg = load_config(tmp_path / f"epoch_{name}" / "config.yaml")  # engine run directories
        assert cfg.data.train_subset == 64 and cfg.data.batch_size == 32
        assert (cfg.train.teacher_cache is not None) == (name == "cache")
        assert (tmp_path / f"epoch_{name}" / "summary.json").is_file()


def test_recipe_time_runs_the_recipe_online_and_cached(monkeypatch, tmp_path):
    """benchmarks/recipe_time.py (the GPU wall-time command of docs/benchmarks.md), tiny."""
    import json

    from test_engine_common import register_tinynet, unregister_tinynet

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("recipe_time",
                                                  ROOT / "benchmarks" / "recipe_time.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    register_tinynet()
    try:
        mod.main(["--device", "cpu", "--epochs", "2", "--images", "128", "--test-images", "64",
                  "--views", "2", "--out", str(tmp_path / "w"), "--json", str(tmp_path / "r.json"),
                  "--override", "model.name=test_tinynet", "--override",
                  "teacher.name=test_tinynet"])
    finally:
        unregister_tinynet()
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["recipe_epochs"] == 240 and r["epochs_run"] == 2
    for mode in ("online", "cache"):
        m = r[mode]
        assert len(m["epoch_wall_s"]) == 2 and m["speed"]["loader"] == "BatchedLoader"
        est = m["build_s"] + m["epoch_wall_s"][0] + 239 * m["epoch_wall_s"][1]
        assert m["estimated_240_epochs_s"] == pytest.approx(est)
    assert r["cache"]["estimated_240_epochs_s_incl_cache"] == pytest.approx(
        r["cache"]["estimated_240_epochs_s"] + r["cache"]["cache_build_s"])
    # both runs went through the engine (two epochs each, metrics written)
    assert (tmp_path / "w/runs/online/metrics.csv").read_text().count("\n") == 3
    assert (tmp_path / "w/runs/cache/metrics.csv").read_text().count("\n") == 3
