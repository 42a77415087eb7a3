"""``python -m topkd.cache``: build a cache from a teacher checkpoint, use it via wrap_dataset."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from topkd.cache import CacheMismatchError, TeacherLogitCache, main, wrap_dataset


def _idx(path, arr: np.ndarray, magic: int) -> None:
    head = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(head + arr.astype(np.uint8).tobytes())


def test_cli_builds_a_cache_the_engine_contract_accepts(tmp_path, capsys):
    from topkd.data import get_dataset, train_val_split
    from topkd.models import create_model

    rng = np.random.default_rng(0)
    for prefix, n in (("train", 60), ("t10k", 20)):
        _idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)), 2051)
        _idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10, 2049)
    torch.manual_seed(0)
    teacher = create_model("fmnist_cnn_teacher", 10).eval()
    ck = tmp_path / "t.pt"
    torch.save(teacher.state_dict(), ck)
    out = tmp_path / "cache"
    assert main(["--teacher", "fmnist_cnn_teacher", "--checkpoint", str(ck), "--dataset",
                 "fashion_mnist", "--root", str(tmp_path), "--out", str(out), "--views", "2",
                 "--dtype", "float32"]) == 0
    assert "60 images x 2 views" in capsys.readouterr().out
    assert TeacherLogitCache.open(out).augment.padding == 2  # FMNIST recipe: crop_flip(28, 2)
    # what the engine does: a train/val split of the training set, header fields from the config
    train = get_dataset("fashion_mnist", tmp_path, "train")
    fit, _ = train_val_split(train, 0.25, seed=0)
    ds = wrap_dataset(fit, out, seed=0, teacher_name="fmnist_cnn_teacher", checkpoint=ck,
                      dataset_name="fashion_mnist")
    ds.set_epoch(1)
    x, y, t = next(iter(torch.utils.data.DataLoader(ds, batch_size=45)))
    with torch.no_grad():
        torch.testing.assert_close(t, teacher(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(CacheMismatchError, match="teacher_name"):
        wrap_dataset(fit, out, teacher_name="fmnist_cnn_student")
