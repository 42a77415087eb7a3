"""``topkd demo`` end to end on tiny synthetic Fashion-MNIST IDX files (seconds, no real data)."""

from __future__ import annotations

import argparse
import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from topkd import demo

ROOT = Path(__file__).resolve().parents[1]


def _write_idx(path: Path, arr: np.ndarray, magic: int) -> None:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def fake_fmnist(tmp_path_factory) -> Path:
    """Class-dependent blobs, so that a 1-epoch teacher learns something."""
    root = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 400), ("t10k", 120)):
        y = np.arange(n) % 10
        x = rng.integers(0, 40, size=(n, 28, 28))
        for i, c in enumerate(y):
            x[i, 2 * c:2 * c + 8, 4:24] += 200
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", np.clip(x, 0, 255), 2051)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", y, 2049)
    return root


def _args(tmp: Path, data_root: Path, **kw) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    demo.add_arguments(p)
    argv = ["--data-root", str(data_root), "--output-dir", str(tmp / "out"), "--epochs", "1",
            "--teacher-epochs", "1", "--subset", "300", "--teacher-subset", "300",
            "--views", "2", "--no-progress", "--threads", "1", "--device", "cpu",
            "--eval-batch-size", "64"]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return p.parse_args(argv)


def test_tiny_demo_writes_table_and_plots(tmp_path, fake_fmnist, capsys):
    assert demo.run(_args(tmp_path, fake_fmnist)) == 0
    out = capsys.readouterr().out
    for label in demo.LABELS.values():
        assert f"| {label} |" in out
    d = tmp_path / "out"
    for png in ("accuracy.png", "curves.png", "tsm.png"):
        assert (d / png).stat().st_size > 5000
    res = json.loads((d / "results.json").read_text())
    assert [r["method"] for r in res["summary"]] == list(demo.METHODS)
    assert "test top-1 @ best val" in (d / "results.md").read_text()
    # every run is an ordinary engine run directory, and the table is read from them
    from topkd.config import load_config

    for r in res["runs"]:
        run_dir = Path(r["run_dir"])
        assert run_dir == d / "runs" / r["method"] / f"seed_{r['seed']}"
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary == r["summary"] and summary["epochs"] == 1
        assert (run_dir / "metrics.csv").is_file() and (run_dir / "checkpoints/last.pt").is_file()
        cfg = load_config(run_dir / "config.yaml")
        assert cfg.data.train_subset == 300 and cfg.data.num_workers == 0
        if r["method"] != "ce":
            assert cfg.train.teacher_cache is not None  # offline distillation
        # the fast path by default: what the auto switches resolved to on this CPU
        env = json.loads((run_dir / "env.json").read_text())
        assert env["speed"] == {"amp": "fp32", "channels_last": True, "compiled": [],
                                "loader": "batched"}, r["method"]
        assert (d / "runs" / r["method"] / "summary.md").is_file()
    row = res["summary"][0]
    assert row["test_at_best_val"] == res["runs"][0]["summary"]["test_acc1_at_best_val"]
    teacher_dir = Path(res["teacher"]["run_dir"])
    assert (teacher_dir / "summary.json").is_file() and teacher_dir.parent == d / "cache"
    # a second run reuses the cached teacher, the teacher-logit cache and finished runs
    assert demo.run(_args(tmp_path, fake_fmnist, methods="ce,topkd")) == 0
    out = capsys.readouterr().out
    assert "reusing cached teacher" in out and "reusing teacher-logit cache" in out
    assert "reusing finished run" in out


def test_online_teacher_path(tmp_path, fake_fmnist, capsys):
    args = _args(tmp_path, fake_fmnist, methods="kd")
    args.no_cache, args.no_plots = True, True
    assert demo.run(args) == 0
    assert "| KD |" in capsys.readouterr().out
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    from topkd.config import load_config

    cfg = load_config(Path(res["runs"][0]["run_dir"]) / "config.yaml")
    assert cfg.train.teacher_cache is None
    assert cfg.teacher.checkpoint == res["teacher"]["checkpoint"]


def test_missing_data_says_what_to_install(tmp_path, capsys):
    assert demo.run(_args(tmp_path, tmp_path / "nothing")) == 2
    err = capsys.readouterr().err
    assert "dataset-fashion-mnist" in err and "--data-root" in err


def test_bad_method_is_rejected(tmp_path, fake_fmnist, capsys):
    assert demo.run(_args(tmp_path, fake_fmnist, methods="kd,nope")) == 2
    assert "nope" in capsys.readouterr().err


def test_demo_specs_are_the_configs(tmp_path):
    """Each demo run is its config file + schedule/data-size overrides only."""
    from topkd.config import load_config

    args = _args(tmp_path, tmp_path / "data")
    configs = Path(args.configs_dir)
    assert configs == ROOT / "configs"
    for m in demo.METHODS:
        ref = load_config(configs / demo.METHOD_CONFIGS[m])
        cfg = demo.method_config(args, m, 3, "t.pt", "cache_dir")
        assert cfg.method == ref.method, m
        assert (cfg.model, cfg.optim, cfg.sched) == (ref.model, ref.optim, ref.sched), m
        assert cfg.teacher.name == ref.teacher.name and cfg.data.name == ref.data.name
        assert cfg.seed == 3 and cfg.train.epochs == 1 and cfg.data.train_subset == 300
    ref = load_config(configs / demo.TEACHER_CONFIG)
    t = demo.teacher_config(args)
    assert (t.model, t.method, t.optim, t.sched) == (ref.model, ref.method, ref.optim, ref.sched)
    # what the testbed's tuning chose for Fashion-MNIST (configs/pair_overrides) the demo runs
    import yaml

    for m in ("topkd", "dkd", "kd"):
        chosen = yaml.safe_load(
            (configs / "pair_overrides/fashion_mnist" / f"{m}.yaml").read_text())
        method = demo.method_config(args, m, 0).method
        for key, value in chosen["teacher_student"].items():
            assert getattr(method, key) == value, (m, key)


def test_demo_speed_switches_default_to_auto_and_turn_off(tmp_path):
    """The demo runs the configs' auto switches unless told; each option overrides its key in
    the teacher's and every student's config."""
    args = _args(tmp_path, tmp_path / "data")
    for cfg in (demo.teacher_config(args), demo.method_config(args, "kd", 0)):
        t = cfg.train
        assert (t.amp, t.channels_last, t.compile, cfg.data.loader) == ("auto",) * 4
    off = _args(tmp_path, tmp_path / "data", amp="none", channels_last="off", compile="off",
                loader="dataloader")
    for cfg in (demo.teacher_config(off), demo.method_config(off, "topkd", 0)):
        t = cfg.train
        assert (t.amp, t.channels_last, t.compile, cfg.data.loader) == \
            ("none", False, False, "dataloader")
    on = _args(tmp_path, tmp_path / "data", compile="on")
    assert demo.method_config(on, "kd", 0).train.compile is True


def test_demo_help_lists_the_knobs():
    p = argparse.ArgumentParser()
    demo.add_arguments(p)
    text = p.format_help()
    for opt in ("--epochs", "--teacher-epochs", "--seeds", "--methods", "--output-dir",
                "--data-root", "--subset", "--views", "--topk", "--no-cache"):
        assert opt in text
    assert demo._int_list("0-2") == [0, 1, 2] and demo._int_list("3,5") == [3, 5]


def _rows(n_seeds: int) -> list[dict]:
    vals = {"ce": [84.0, 84.5], "topkd": [86.0, 86.6]}
    rows = []
    for m, v in vals.items():
        v = v[:n_seeds]
        mean = float(np.mean(v))
        std = float(np.std(v, ddof=1)) if n_seeds > 1 else 0.0
        rows.append({"method": m, "label": demo.LABELS[m], "seeds": n_seeds,
                     "test_at_best_val": mean, "test_at_best_val_std": std,
                     "test_at_best_val_values": v, "last_test": mean, "last_test_std": std,
                     "best_val": mean, "best_val_std": std, "epoch_time_s": 1.0})
    return rows


def test_table_shows_one_seed_as_a_value_and_no_timing():
    one = demo.format_table(_rows(1), teacher_acc=90.0)
    assert "±" not in one and "| CE only | 1 | 84.00 | 84.00 | 84.00 |" in one
    assert "s / epoch" not in one and "epoch_time" not in one  # timing measured machine load
    two = demo.format_table(_rows(2))
    assert "| TopKD | 2 | 86.30 ± 0.42 |" in two


@pytest.mark.parametrize("n_seeds", [1, 2])
def test_accuracy_plot_is_a_dot_plot_with_error_bars_over_seeds(tmp_path, monkeypatch, n_seeds):
    from matplotlib.figure import Figure

    from topkd import plots

    figs: list[Figure] = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda f, *a, **k: (figs.append(f), real(f, *a, **k)))
    plots.accuracy_bars(_rows(n_seeds), tmp_path / "acc.png", teacher_acc=90.0)
    (ax,) = figs[0].axes
    assert not ax.patches  # no bars: a zoomed axis must not suggest length ratios
    caps = [c for c in ax.containers if type(c).__name__ == "ErrorbarContainer"]
    assert len(caps) == 2
    assert all(bool(c.has_yerr) == (n_seeds > 1) for c in caps)
    assert ("one seed" in ax.get_title()) == (n_seeds == 1)


def test_progress_without_a_terminal_prints_periodic_lines_with_eta(capsys):
    """Output to a log file or pipe (as under pytest): no bar, so periodic lines with the share
    done, elapsed time and ETA, and the engine's per-epoch lines (lines=True)."""
    prog = demo._Progress(total=200, enabled=True, interval=0.0)
    assert prog.bar is None and prog.lines
    prog.update(50)
    prog.update(50)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].startswith("[demo] progress 25% (50/200 images), elapsed ")
    assert out[1].startswith("[demo] progress 50% (100/200 images)") and ", ETA " in out[1]
    assert [demo._duration(t) for t in (5, 65, 3 * 3600 + 125, float("nan"))] == \
        ["5s", "1m05s", "3h02m", "?"]
    quiet = demo._Progress(total=200, enabled=False, interval=0.0)  # --no-progress
    quiet.update(100)
    assert not quiet.lines and capsys.readouterr().out == ""
