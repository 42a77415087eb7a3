"""topkd.checkpoints: formats, wrappers, prefixes, mismatch errors, weights_only, SHA-256."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

from topkd.checkpoints import (
    FORMAT,
    CheckpointMismatchError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
    extract_state_dict,
    load_teacher,
    load_weights,
    read_torch_file,
    save_weights,
    sha256_file,
)
from topkd.models import create_model

X = torch.randn(2, 3, 32, 32)
UNPICKLED: list[str] = []


def _record(msg: str) -> str:
    UNPICKLED.append(msg)
    return msg


class Payload:
    """An object whose unpickling runs code: the reason for weights_only=True."""

    def __reduce__(self):
        return (_record, ("code ran while unpickling",))


def _out(model: torch.nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model.eval()(X)


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(1)
    model = create_model("resnet8x4", 100)
    # non-trivial BN statistics, so buffers are part of the check
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32) * 2 + 0.5)
    return model.eval()


def test_field_checkpoint_formats_load_strict(teacher, tmp_path):
    sd = teacher.state_dict()
    ref = _out(teacher)
    field_ckpt = {  # as saved by RepDistiller/mdistiller: ckpt_epoch_240.pth
        "epoch": 240,
        "model": sd,
        "best_acc": torch.tensor(73.09),
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.0005, "params": [0, 1]}]},
    }
    variants = {
        "field.pth": field_ckpt,
        "plain.pth": sd,
        "state_dict.pth": {"state_dict": sd, "epoch": 3},
        "net.pth": {"net": sd, "acc": 95.1},
        "ddp.pth": {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
        "compiled.pth": {f"_orig_mod.{k}": v for k, v in sd.items()},
    }
    for fname, obj in variants.items():
        path = tmp_path / fname
        torch.save(obj, path)
        model = create_model("resnet8x4", 100)
        res = load_weights(model, path, verbose=False)
        torch.testing.assert_close(_out(model), ref, rtol=0, atol=0)
        assert res.sha256 == sha256_file(path)
        assert not (res.missing_keys or res.unexpected_keys or res.shape_mismatch)
    assert (
        load_weights(
            create_model("resnet8x4", 100), tmp_path / "ddp.pth", verbose=False
        ).stripped_prefix
        == "module."
    )
    assert (
        load_weights(create_model("resnet8x4", 100), tmp_path / "field.pth", verbose=False).source
        == "model"
    )


def test_mismatch_error_lists_missing_unexpected_and_shapes(tmp_path):
    sd = create_model("resnet8x4", 10).state_dict()
    del sd["fc.bias"]
    sd["extra.weight"] = torch.zeros(3)
    path = tmp_path / "bad.pth"
    torch.save({"model": sd}, path)
    model = create_model("resnet8x4", 100)
    with pytest.raises(CheckpointMismatchError) as ei:
        load_weights(model, path, verbose=False)
    msg = str(ei.value)
    assert "missing keys (1): fc.bias" in msg
    assert "unexpected keys (1): extra.weight" in msg
    assert "fc.weight checkpoint (10, 256) vs model (100, 256)" in msg
    assert ei.value.missing == ["fc.bias"] and ei.value.unexpected == ["extra.weight"]
    assert ei.value.shape_mismatch == [("fc.weight", (10, 256), (100, 256))]

    # strict=False loads everything that fits and reports the rest
    before = model.fc.weight.clone()
    res = load_weights(model, path, strict=False, verbose=False)
    assert res.missing_keys == ["fc.bias"] and res.unexpected_keys == ["extra.weight"]
    torch.testing.assert_close(model.conv1.weight, sd["conv1.weight"])
    torch.testing.assert_close(model.fc.weight, before)


def test_wrong_architecture_is_refused(tmp_path):
    path = tmp_path / "r8x4.pth"
    torch.save({"model": create_model("resnet8x4", 100).state_dict()}, path)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys .*downsample"):
        load_weights(create_model("resnet8", 100), path, verbose=False)


def test_unsafe_pickle_is_refused_without_running_code(teacher, tmp_path):
    path = tmp_path / "unsafe.pth"
    torch.save({"model": teacher.state_dict(), "args": Payload()}, path)
    UNPICKLED.clear()
    with pytest.raises(UnsafeCheckpointError, match="weights_only=True"):
        load_weights(create_model("resnet8x4", 100), path, verbose=False)
    assert UNPICKLED == []

    whole = tmp_path / "whole_module.pth"
    torch.save({"model": teacher}, whole)  # a pickled nn.Module, not a state_dict
    with pytest.raises(UnsafeCheckpointError, match="arbitrary code"):
        load_weights(create_model("resnet8x4", 100), whole, verbose=False)


def test_old_files_without_num_batches_tracked_load_strict(teacher, tmp_path):
    sd = {k: v for k, v in teacher.state_dict().items() if "num_batches_tracked" not in k}
    path = tmp_path / "old.pth"
    torch.save(sd, path)
    model = create_model("resnet8x4", 100)
    load_weights(model, path, verbose=False)
    torch.testing.assert_close(_out(model), _out(teacher), rtol=0, atol=0)


def test_sha256_printed_and_returned(teacher, tmp_path, capsys):
    path = tmp_path / "t.pt"
    digest = save_weights(teacher, path)
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == expected == sha256_file(path)
    res = load_weights(create_model("resnet8x4", 100), path)
    assert res.sha256 == expected and res.source == "topkd"
    assert expected in capsys.readouterr().out


def test_save_weights_format_atomic_and_meta(teacher, tmp_path):
    path = tmp_path / "sub" / "best.pt"
    import numpy as np

    meta = {"epoch": 3, "acc": np.float64(71.5), "t": torch.tensor(2.0), "path": tmp_path}
    save_weights(teacher, path, meta=meta)
    save_weights(teacher, path, meta={"epoch": 4})  # overwrite in place
    assert os.listdir(path.parent) == ["best.pt"]  # no temp files left behind
    obj = torch.load(path, weights_only=True)
    assert obj["format"] == FORMAT and obj["meta"] == {"epoch": 4}
    assert set(obj["model"]) == set(teacher.state_dict())
    save_weights(teacher, path, meta=meta)
    res = load_weights(create_model("resnet8x4", 100), path, verbose=False)
    assert res.meta == {"epoch": 3, "acc": 71.5, "t": 2.0, "path": str(tmp_path)}
    with pytest.raises(TypeError, match="JSON"):
        save_weights(teacher, path, meta={"bad": object()})


def test_save_weights_unwraps_ddp_like_and_compiled(teacher, tmp_path):
    wrapped = torch.nn.DataParallel(teacher)
    path = tmp_path / "dp.pt"
    save_weights(wrapped, path)
    assert not any(k.startswith("module.") for k in torch.load(path, weights_only=True)["model"])


def test_safetensors_roundtrip(teacher, tmp_path):
    path = tmp_path / "t.safetensors"
    save_weights(teacher, path, meta={"epoch": 240})
    model = create_model("resnet8x4", 100)
    res = load_weights(model, path, verbose=False)
    assert res.source == "safetensors" and res.meta == {"epoch": 240}
    torch.testing.assert_close(_out(model), _out(teacher), rtol=0, atol=0)


def test_load_teacher_freezes(teacher, tmp_path):
    path = tmp_path / "teacher.pth"
    torch.save({"model": teacher.state_dict()}, path)
    t = load_teacher("resnet8x4", 100, path, verbose=False)
    assert not t.training
    assert all(not p.requires_grad for p in t.parameters())
    assert t.weights_sha256 == sha256_file(path)
    torch.testing.assert_close(_out(t), _out(teacher), rtol=0, atol=0)


def test_errors_for_missing_file_and_unknown_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_weights(create_model("resnet8", 10), tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="could not find a state_dict"):
        extract_state_dict({"weights": {"a": 1}})


def _damaged(kind: str, good: bytes, legacy: bytes) -> bytes:
    return {"empty": b"", "truncated": good[: len(good) // 2], "head_only": good[:100],
            "random": os.urandom(2000), "text": b"not a checkpoint\n",
            "legacy_truncated": legacy[:-5]}[kind]


@pytest.mark.parametrize("kind", ["empty", "truncated", "head_only", "random", "text",
                                  "legacy_truncated"])
def test_damaged_files_are_named_as_truncated_or_corrupt(tmp_path, kind):
    """torch gives a bare EOFError, an internal zip error, KeyError/IndexError or a false
    'contains pickled Python objects' message for these; we name the file and the problem."""
    m = torch.nn.Linear(3, 2)
    save_weights(m, tmp_path / "good.pt")
    torch.save(m.state_dict(), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    bad = tmp_path / f"{kind}.pt"
    bad.write_bytes(_damaged(kind, (tmp_path / "good.pt").read_bytes(),
                             (tmp_path / "legacy.pt").read_bytes()))
    with pytest.raises(CorruptCheckpointError, match=rf"{kind}\.pt is truncated or corrupt"):
        load_weights(m, bad, verbose=False)
    with pytest.raises(CorruptCheckpointError, match=rf"{kind}\.pt is truncated or corrupt"):
        read_torch_file(bad)


def test_damaged_safetensors_is_named(tmp_path):
    m = torch.nn.Linear(3, 2)
    save_weights(m, tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "w.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match=r"w\.safetensors is truncated or corrupt"):
        load_weights(m, tmp_path / "w.safetensors", verbose=False)
