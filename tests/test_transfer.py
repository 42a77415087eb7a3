"""``topkd transfer`` (linear probe) on tiny, format-exact STL-10 binaries."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from topkd import cli, transfer

# Ten well-separated colours: class c's images are this colour plus a little noise, so the
# classes are linearly separable in the features of any reasonable (even random) network.
COLOURS = np.array([
    [230, 25, 25], [25, 230, 25], [25, 25, 230], [230, 230, 25], [230, 25, 230],
    [25, 230, 230], [128, 128, 128], [250, 250, 250], [10, 10, 10], [240, 130, 40],
], dtype=np.float64)  # fmt: skip


def write_stl10(root: Path, split: str, per_class: int, seed: int) -> None:
    """``stl10_binary/<split>_{X,y}.bin`` in the official layout (column-major channel planes)."""
    rng = np.random.default_rng(seed)
    folder = root / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.repeat(np.arange(10), per_class)
    rng.shuffle(labels)
    imgs = COLOURS[labels][:, None, None, :] + rng.normal(0, 8, (len(labels), 96, 96, 3))
    imgs = np.clip(imgs, 0, 255).astype(np.uint8)  # (N, y, x, C)
    planes = imgs.transpose(0, 3, 2, 1)  # (N, C, x, y): column-major within each channel
    (folder / f"{split}_X.bin").write_bytes(np.ascontiguousarray(planes).tobytes())
    (folder / f"{split}_y.bin").write_bytes((labels + 1).astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def stl_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stl")
    write_stl10(root, "train", per_class=8, seed=0)
    write_stl10(root, "test", per_class=4, seed=1)
    return root


@pytest.fixture(scope="module")
def student_ckpt(tmp_path_factory) -> Path:
    from topkd.checkpoints import save_weights
    from topkd.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet8", 100)
    path = tmp_path_factory.mktemp("ckpt") / "student.pt"
    save_weights(model, path, meta={"note": "random init, test only"})
    return path


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    transfer.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_linear_probe_freezes_backbone_and_separates_classes(stl_root):
    from topkd.data import dataset_info, get_dataset
    from topkd.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet8", 100)
    model.train()  # the probe must switch it to eval (else BN running stats would move)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    src = dataset_info("cifar100")
    kw = dict(resize=32, augment=False, mean=src.mean, std=src.std)
    train = get_dataset("stl10", stl_root, "train", **kw)
    test = get_dataset("stl10", stl_root, "test", **kw)
    assert train[0][0].shape == (3, 32, 32)
    res = transfer.linear_probe(model, train, test, 10,
                                transfer.ProbeConfig(epochs=60, batch_size=16))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN buffers included
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert res["feature_dim"] == model.feature_dim == 64
    assert (res["train_samples"], res["test_samples"]) == (80, 40)
    assert res["train_acc1"] == 100.0 and res["test_acc1"] >= 97.5
    assert res["linear"].weight.shape == (10, 64)


def test_cached_features_equal_a_frozen_forward():
    """Training on cached features is the same problem: features are a fixed function."""
    from topkd.models import create_model

    torch.manual_seed(1)
    model = create_model("resnet8", 10)
    x = torch.randn(12, 3, 32, 32)
    ds = TensorDataset(x, torch.arange(12) % 10)
    f1, y = transfer.extract_features(model, ds, batch_size=5)
    f2, _ = transfer.extract_features(model, ds, batch_size=12)
    torch.testing.assert_close(f1, f2)
    with torch.no_grad():
        torch.testing.assert_close(model.get_classifier()(f1), model(x))
    assert y.tolist() == [i % 10 for i in range(12)]


def test_resize_path_and_lbfgs_solver():
    """Non-STL datasets are resized per batch (e.g. Tiny-ImageNet 64 -> 32); L-BFGS solves too."""
    from topkd.models import create_model

    torch.manual_seed(2)
    model = create_model("resnet8", 100)
    y = torch.arange(40) % 4
    x = torch.tensor(COLOURS[:4], dtype=torch.float32)[y][:, :, None, None] / 255.0
    x = (x - 0.5) / 0.25 + 0.05 * torch.randn(40, 3, 64, 64)
    ds = TensorDataset(x, y)
    feats, _ = transfer.extract_features(model, ds, resize_to=32)
    assert feats.shape == (40, 64)
    res = transfer.linear_probe(model, ds, ds, 4, transfer.ProbeConfig(solver="lbfgs", epochs=5),
                                resize_to=32)
    assert res["train_acc1"] == 100.0


def test_cli_writes_json(stl_root, student_ckpt, tmp_path, capsys):
    out = tmp_path / "res" / "transfer.json"
    args = _args("--model", "resnet8", "--checkpoint", str(student_ckpt), "--dataset", "stl10",
                 "--data-root", str(stl_root), "--epochs", "60", "--batch-size", "16",
                 "--num-workers", "0", "--device", "cpu", "--output", str(out))
    assert transfer.run(args) == 0
    res = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == res
    for key in ("model", "checkpoint", "checkpoint_sha256", "dataset", "num_classes",
                "input_size", "feature_dim", "train_acc1", "test_acc1", "test_acc5", "probe",
                "train_samples", "test_samples", "normalize", "mean", "std"):
        assert key in res, key
    from topkd.checkpoints import sha256_file
    from topkd.data import dataset_info

    assert res["checkpoint_sha256"] == sha256_file(student_ckpt)
    assert (res["dataset"], res["num_classes"], res["input_size"]) == ("stl10", 10, 32)
    assert res["mean"] == pytest.approx(list(dataset_info("cifar100").mean))
    assert res["probe"]["solver"] == "sgd" and res["probe"]["epochs"] == 60
    assert res["test_acc1"] >= 97.5 and res["test_acc5"] == 100.0


def test_cli_errors_are_clean(tmp_path, student_ckpt, capsys):
    assert transfer.run(_args("--model", "resnet8", "--dataset", "stl10")) == 2
    assert "--checkpoint is required" in capsys.readouterr().err
    args = _args("--model", "resnet8", "--checkpoint", str(student_ckpt), "--dataset", "stl10",
                 "--data-root", str(tmp_path / "nowhere"), "--num-workers", "0")
    assert transfer.run(args) == 2
    err = capsys.readouterr().err
    assert "STL-10" in err and "never downloads" in err
    wrong = _args("--model", "resnet20", "--checkpoint", str(student_ckpt), "--dataset", "stl10")
    assert transfer.run(wrong) == 2
    assert "does not match" in capsys.readouterr().err


def test_topkd_cli_dispatches_to_transfer(stl_root, capsys):
    argv = ["transfer", "--model", "resnet8", "--random-init", "--dataset", "stl10",
            "--data-root", str(stl_root), "--epochs", "2", "--num-workers", "0",
            "--device", "cpu"]
    assert cli.main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["checkpoint"] is None and res["test_samples"] == 40


def test_cli_tiny_imagenet_is_resized_per_batch(tmp_path, student_ckpt, capsys, monkeypatch):
    """Tiny-ImageNet's official tree (64x64 JPEGs) -> per-batch 64 -> 32 resize -> probe."""
    from PIL import Image

    shapes = []
    real_resize = transfer._resize

    def spy(x, size):
        out = real_resize(x, size)
        shapes.append((tuple(x.shape[-2:]), tuple(out.shape[-2:])))
        return out

    monkeypatch.setattr(transfer, "_resize", spy)

    rng = np.random.default_rng(0)
    root = tmp_path / "tiny-imagenet-200"
    wnids = [f"n0000000{i}" for i in range(4)]
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    ann = []
    for c, wnid in enumerate(wnids):
        (root / "train" / wnid / "images").mkdir(parents=True)
        for i in range(9):
            img = np.clip(COLOURS[c] + rng.normal(0, 8, (64, 64, 3)), 0, 255).astype(np.uint8)
            if i < 6:
                Image.fromarray(img).save(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG")
            else:
                Image.fromarray(img).save(root / "val" / "images" / f"val_{c}_{i}.JPEG")
                ann.append(f"val_{c}_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(ann) + "\n")
    args = _args("--model", "resnet8", "--checkpoint", str(student_ckpt), "--dataset",
                 "tiny_imagenet", "--data-root", str(tmp_path), "--epochs", "60",
                 "--batch-size", "8", "--num-workers", "0", "--device", "cpu")
    assert transfer.run(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert (res["num_classes"], res["input_size"]) == (200, 32)
    assert (res["train_samples"], res["test_samples"]) == (24, 12)
    assert res["train_acc1"] == 100.0 and res["test_acc1"] == 100.0
    assert shapes and set(shapes) == {((64, 64), (32, 32))}
