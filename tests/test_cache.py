"""Teacher-logit cache: replay exactness, equality with the online teacher, headers, determinism."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Subset

import topkd.losses as losses
from topkd.cache import (
    CacheMismatchError,
    ReplayableCropFlip,
    TeacherLogitCache,
    build_cache,
    bytes_per_sample,
    wrap_dataset,
)

MEAN, STD = (0.2860,), (0.3530,)


class ArrayDataset(torch.utils.data.Dataset):
    """Minimal array-backed dataset like topkd.data's (uint8 ``.data``, ``.targets``)."""

    def __init__(self, n: int = 48, seed: int = 0, channels: int = 1) -> None:
        g = np.random.default_rng(seed)
        shape = (n, 28, 28) if channels == 1 else (n, 28, 28, channels)
        self.data = g.integers(0, 256, size=shape, dtype=np.uint8)
        self.targets = g.integers(0, 10, size=n).tolist()
        self.mean, self.std = MEAN * channels, STD * channels

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):  # pragma: no cover - not used by the cache
        return torch.as_tensor(self.data[i]), self.targets[i]


def _teacher(seed: int = 0, channels: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(64, 10),
    ).eval()


def _online(teacher: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return teacher(x)


@pytest.fixture(scope="module")
def ds() -> ArrayDataset:
    return ArrayDataset()


@pytest.fixture(scope="module")
def full_cache(ds, tmp_path_factory):
    path = tmp_path_factory.mktemp("c") / "full"
    build_cache(
        _teacher(),
        ds,
        path,
        views=3,
        batch_size=16,
        progress=False,
        dtype="float32",
        teacher_name="t",
        dataset_name="toy",
    )
    return path


def test_replay_matches_torchvision_pixel_exact():
    tvf = pytest.importorskip("torchvision.transforms.functional")
    aug = ReplayableCropFlip(padding=4, flip=True)
    g = np.random.default_rng(1)
    imgs = torch.as_tensor(g.integers(0, 256, size=(20, 3, 28, 28), dtype=np.uint8))
    params = aug.sample(20, g)
    out = aug.apply(imgs, params)
    assert out.dtype == torch.uint8 and out.shape == imgs.shape
    for i in range(20):
        dy, dx, fl = (int(v) for v in params[i])
        ref = tvf.crop(tvf.pad(imgs[i], [4], fill=0), dy, dx, 28, 28)
        if fl:
            ref = tvf.hflip(ref)
        assert torch.equal(out[i], ref)
    assert torch.equal(aug.apply(imgs, params), out)  # replay is deterministic
    assert torch.equal(aug.apply(imgs, aug.identity(20)), imgs)


def test_full_cache_equals_online_teacher_losses(ds, full_cache):
    teacher = _teacher()
    wrapped = wrap_dataset(ds, full_cache, seed=3, teacher_name="t", dataset_name="toy")
    assert len(wrapped) == len(ds)
    wrapped.set_epoch(2)
    x, y, t = wrapped.batch(np.arange(len(ds)))
    assert t.dtype == torch.float32 and t.shape == (len(ds), 10)
    online = _online(teacher, x)  # the teacher on exactly the replayed view the student sees
    torch.testing.assert_close(t, online, rtol=1e-5, atol=1e-5)
    s = torch.randn_like(t)
    for fn in (
        lambda a, b: losses.kd_loss(a, b, temperature=4.0),
        lambda a, b: losses.dkd_loss(a, b, y, temperature=4.0),
        lambda a, b: losses.topkd_loss(a, b, y, k=3),
    ):
        torch.testing.assert_close(fn(s, t), fn(s, online), rtol=1e-5, atol=1e-5)
    # __getitem__ agrees with the vectorised path
    xi, yi, ti = wrapped[5]
    assert torch.equal(xi, x[5]) and yi == int(y[5]) and torch.equal(ti, t[5])


def test_float16_cache_close_to_online(ds, tmp_path):
    build_cache(_teacher(), ds, tmp_path / "h", views=2, progress=False, dtype="float16")
    w = wrap_dataset(ds, tmp_path / "h")
    x, _, t = w.batch(np.arange(len(ds)))
    torch.testing.assert_close(t, _online(_teacher(), x), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("k", [3, 9])
def test_topk_cache_exact_topk_and_bounded_rest(ds, tmp_path, k):
    build_cache(_teacher(), ds, tmp_path / "k", views=2, topk=k, progress=False, dtype="float32")
    w = wrap_dataset(ds, tmp_path / "k")
    x, y, t = w.batch(np.arange(len(ds)))
    online = _online(_teacher(), x)
    lp, lq = torch.log_softmax(online, 1), torch.log_softmax(t, 1)
    top = lp.topk(k, 1).indices
    # top-K log-probabilities are exact, and they stay the top-K
    torch.testing.assert_close(lq.gather(1, top), lp.gather(1, top), rtol=1e-5, atol=1e-5)
    assert torch.equal(lq.topk(k, 1).indices.sort(1).values, top.sort(1).values)
    # the rest share the remaining mass uniformly: ||p - p~||_1 <= 2 * rest_mass
    rest = 1 - lp.gather(1, top).exp().sum(1)
    l1 = (lp.exp() - lq.exp()).abs().sum(1)
    assert (l1 <= 2 * rest + 1e-6).all()
    s = torch.randn_like(t)
    kd_exact = losses.kd_loss(s, online, temperature=1.0)
    kd_cached = losses.kd_loss(s, t, temperature=1.0)
    if k == 9:  # K = C - 1: the single remaining class is uniform by definition -> exact
        for fn in (
            lambda a, b: losses.kd_loss(a, b, temperature=4.0),
            lambda a, b: losses.dkd_loss(a, b, y, temperature=4.0),
            lambda a, b: losses.topkd_loss(a, b, y, k=3),
        ):
            torch.testing.assert_close(fn(s, t), fn(s, online), rtol=1e-4, atol=1e-4)
    else:
        # documented bound for KD at T=1: |KL(p||q) - KL(p~||q)| is at most the tail's
        # contribution, <= rest_mass * (log(C-K) + max_j |log q_j| over the tail) per sample
        lqs = torch.log_softmax(s, 1)
        bound = (rest * (math.log(10 - k) + lqs.abs().max(1).values)).mean()
        assert (kd_exact - kd_cached).abs() <= bound + 1e-6


def test_header_mismatch_is_a_clear_error(ds, full_cache, tmp_path):
    with pytest.raises(CacheMismatchError, match="teacher_name"):
        wrap_dataset(ds, full_cache, teacher_name="other")
    with pytest.raises(CacheMismatchError, match="dataset"):
        wrap_dataset(ds, full_cache, dataset_name="cifar10")
    ck = tmp_path / "w.pt"
    ck.write_bytes(b"not the teacher")
    with pytest.raises(CacheMismatchError, match="checkpoint_sha256"):
        wrap_dataset(ds, full_cache, checkpoint=ck)
    other = ArrayDataset(seed=1)  # same shapes, different pixels
    with pytest.raises(CacheMismatchError, match="data_sha256"):
        wrap_dataset(other, full_cache)
    with pytest.raises(FileNotFoundError, match="header.json"):
        TeacherLogitCache.open(tmp_path / "nowhere")
    hdr = json.loads((full_cache / "header.json").read_text())
    assert hdr["views"] == 3 and hdr["topk"] is None and hdr["augment"]["name"] == "crop_flip"


def test_views_deterministic_per_epoch_and_subsets(ds, full_cache):
    a = wrap_dataset(ds, full_cache, seed=7)
    b = wrap_dataset(ds, full_cache, seed=7)
    pos = np.arange(len(ds))
    a.set_epoch(4)
    b.set_epoch(4)
    assert np.array_equal(a.views_for(pos), b.views_for(pos))
    xa, _, ta = a.batch(pos[::-1])
    xb, _, tb = b.batch(pos[::-1])
    assert torch.equal(xa, xb) and torch.equal(ta, tb)
    b.set_epoch(5)
    assert not np.array_equal(a.views_for(pos), b.views_for(pos))
    # a Subset (e.g. a train/val split) of the cached dataset maps onto the right rows
    sub = Subset(ds, [5, 2, 40])
    s = wrap_dataset(sub, full_cache, seed=7)
    s.set_epoch(4)
    _, ys, ts = s.batch([0, 1, 2])
    rows = np.array([5, 2, 40])
    assert ys.tolist() == [ds.targets[i] for i in rows]
    torch.testing.assert_close(ts, a.cache.dense_logits(rows, s.views_for([0, 1, 2])))


def test_cache_on_subset_does_not_cover_others(ds, tmp_path):
    build_cache(
        _teacher(), Subset(ds, list(range(10))), tmp_path / "s", progress=False, augment=None
    )
    with pytest.raises(CacheMismatchError, match="does not cover"):
        wrap_dataset(Subset(ds, list(range(5, 15))), tmp_path / "s")
    w = wrap_dataset(Subset(ds, [3, 1]), tmp_path / "s")
    x, _, t = w.batch([0, 1])
    torch.testing.assert_close(t, _online(_teacher(), x), rtol=2e-3, atol=2e-3)


def test_bytes_per_sample_and_disk(ds, full_cache):
    assert bytes_per_sample(10, views=1, topk=None, dtype="float16", aug_params=0) == 20
    assert bytes_per_sample(10, views=1, topk=3, dtype="float16", aug_params=0) == 11
    assert bytes_per_sample(1000, views=1, topk=10, dtype="float16", aug_params=0) == 42
    c = TeacherLogitCache.open(full_cache)
    assert c.disk_bytes() > len(ds) * bytes_per_sample(10, 3, None, "float32")


def test_transform_mismatch_names_what_the_cache_cannot_replay():
    from types import SimpleNamespace

    from topkd.cache import ReplayableCropFlip, transform_mismatch
    from topkd.data.transforms import build_transform, crop_flip, rotate_flip

    norm = {"mean": [0.5] * 3, "std": [0.25] * 3}
    cache = SimpleNamespace(augment=ReplayableCropFlip(padding=4), header=norm)
    assert transform_mismatch(cache, build_transform(crop_flip(32, 4), **norm)) is None
    # Tiny-ImageNet's rotation (mdistiller's pipeline) is not a crop: refused, not replaced
    why = transform_mismatch(cache, build_transform(rotate_flip(20), **norm))
    assert "PILRandomRotation" in why and "RandomCrop(padding 4) + HFlip" in why
    assert "RandomCrop(size=(32, 32), padding=2)" in transform_mismatch(
        cache, build_transform(crop_flip(32, 2), **norm))
    assert transform_mismatch(cache, lambda x: x) is None  # foreign transforms are not checked
