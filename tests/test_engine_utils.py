import io
import os
import random

import numpy as np
import pytest
import torch

from topkd.config import ConfigError
from topkd.engine.data import ShardSampler, per_rank_batch
from topkd.utils.io import atomic_torch_save, atomic_write_text
from topkd.utils.seed import get_rng_state, set_rng_state


def _draw():
    return (random.random(), np.random.rand(), torch.rand(()).item())  # noqa: NPY002


def test_rng_state_roundtrip_through_weights_only_load():
    state = get_rng_state()
    buf = io.BytesIO()
    torch.save(state, buf)
    expected = _draw()
    _draw()
    buf.seek(0)
    set_rng_state(torch.load(buf, weights_only=True))
    assert _draw() == expected


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "last.pt"
    atomic_torch_save({"epoch": 1}, target)
    assert torch.load(target, weights_only=True) == {"epoch": 1}

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"epoch": 2}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True) == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp file left
    atomic_write_text(tmp_path / "a" / "b.txt", "x")
    assert (tmp_path / "a" / "b.txt").read_text() == "x"


def test_shard_sampler_counts_every_sample_once():
    shards = [list(ShardSampler(11, r, 3)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(11))
    assert [len(ShardSampler(11, r, 3)) for r in range(3)] == [4, 4, 3]
    assert per_rank_batch(64, 4, "data.batch_size") == 16
    with pytest.raises(ConfigError, match="data.batch_size=64 is not divisible by the 3 DDP"):
        per_rank_batch(64, 3, "data.batch_size")


def test_writable_dir_problem(tmp_path, monkeypatch):
    import errno
    import tempfile

    from topkd.utils.io import writable_dir_problem

    assert writable_dir_problem(tmp_path / "a/b") is None and (tmp_path / "a/b").is_dir()
    assert list((tmp_path / "a/b").iterdir()) == []  # the probe file is gone
    (tmp_path / "f").write_text("x")
    assert writable_dir_problem(tmp_path / "f/sub") == f"{tmp_path / 'f'} exists and is not a " \
        "directory"

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)  # tests run as root: simulate chmod
    assert writable_dir_problem(tmp_path / "c") == "Permission denied"


def test_demo_checks_its_output_dir_first(tmp_path, capsys):
    from topkd import cli

    (tmp_path / "blocker").write_text("x")
    assert cli.main(["demo", "--output-dir", str(tmp_path / "blocker"), "--data-root",
                     str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "cannot write" in err and "exists and is not a directory" in err
    assert "Traceback" not in err


def test_gpu_index_under_ddp_is_an_error_not_silently_replaced(monkeypatch):
    from topkd.utils.dist import init_distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ValueError, match=r"train.device='cuda:1' under DDP \(2 processes\): each "
                                         r"process uses cuda:\$LOCAL_RANK; set train.device=cuda"):
        init_distributed("cuda:1")
