"""Batched augmentation of in-memory datasets (topkd.data.batched, topkd.engine.batched).

The per-image path (torchvision RandomCrop + RandomHorizontalFlip + ToFloat + Normalize, one
image at a time) is the reference: for the crop offsets and flips it drew, the batched path must
give bit-identical images; the teacher-logit cache's replay must stay exact; the loader must see
the DataLoader's order and draw its parameters as a function of (seed, epoch, sample).
"""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from torch.utils.data import DataLoader, DistributedSampler, Subset

from fixtures_data import write_cifar, write_fashion_mnist, write_stl10
from test_engine_common import make_cifar100, tiny_config, tinynet_registered  # noqa: F401
from topkd.config import ConfigError
from topkd.data import get_dataset
from topkd.data.batched import CropFlipSpec, crop_flip, normalize_u8, why_not_batched
from topkd.engine.batched import BatchedLoader, batched_loader, why_not

CPU = torch.device("cpu")


def _per_image_with_draws(ds, idx):
    """Run the dataset's own per-image transform on ``idx`` and record what it drew:
    ``(images, params (B, 3))`` with params = (i, j, flipped) of RandomCrop/RandomHorizontalFlip."""
    crops, flips = [], []
    real_params, real_hflip = T.RandomCrop.get_params, TF.hflip

    def get_params(img, size):
        out = real_params(img, size)
        crops.append(out[:2])
        flips.append(0)
        return out

    def hflip(img):
        flips[-1] = 1
        return real_hflip(img)

    with mock.patch.object(T.RandomCrop, "get_params", staticmethod(get_params)), \
            mock.patch.object(TF, "hflip", hflip):
        xs = [ds[i][0] for i in idx]
    params = torch.tensor([[i, j, f] for (i, j), f in zip(crops, flips)])
    return torch.stack(xs), params


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bdata")
    write_cifar(root, "cifar100", n_per_file=24, seed=1)
    write_fashion_mnist(root / "fmnist", n_train=24, n_test=8)
    write_stl10(root, n_train=6, n_test=3)
    return root


@pytest.mark.parametrize("name,kw", [("cifar100", {}), ("fashion_mnist", {}),
                                      ("stl10", {"resize": 32})])
def test_batched_crop_flip_equals_the_per_image_transform(data_root, name, kw):
    root = data_root / "fmnist" if name == "fashion_mnist" else data_root
    ds = get_dataset(name, root, "train", **kw)
    hw = tuple(ds.data.shape[1:3])
    spec = CropFlipSpec.of_transform(ds.transform, hw)
    assert spec is not None and spec.padding == {"cifar100": 4, "fashion_mnist": 2,
                                                 "stl10": 4}[name] and spec.flip_p == 0.5
    torch.manual_seed(3)
    idx = list(range(min(len(ds), 24)))
    ref, params = _per_image_with_draws(ds, idx)
    assert params[:, 2].min() == 0 and params[:, 2].max() == 1  # both flip states covered
    u8 = torch.stack([ds.raw_tensor(i) for i in idx])
    mean, std = ds.transform.mean, ds.transform.std
    out = normalize_u8(spec.apply(u8, params), mean, std)
    assert out.dtype == torch.float32 and torch.equal(out, ref)  # bit-identical


def test_crop_flip_values_by_hand():
    img = torch.arange(2 * 3 * 4, dtype=torch.uint8).reshape(1, 2, 3, 4).repeat(2, 1, 1, 1)
    p = torch.tensor([[0, 0, 0], [2, 1, 1]])
    out = crop_flip(img, p, 1)
    pad = torch.nn.functional.pad(img, (1, 1, 1, 1))
    assert torch.equal(out[0], pad[0, :, 0:3, 0:4])
    assert torch.equal(out[1], pad[1, :, 2:5, 1:5].flip(-1))
    with pytest.raises(ValueError, match=r"params must be \(B, 3 \* tiles\)"):
        crop_flip(img, p[:, :2], 1)


def test_crop_flip_tiles_cut_strips_independently():
    img = torch.randint(0, 255, (3, 1, 6, 8), dtype=torch.uint8)
    p = torch.tensor([[1, 2, 1, 0, 0, 0], [2, 2, 0, 1, 3, 1], [0, 4, 1, 4, 1, 0]])
    out = crop_flip(img, p, 2, tiles=2)
    for t in range(2):
        ref = crop_flip(img[..., 4 * t:4 * (t + 1)], p[:, 3 * t:3 * t + 3], 2)
        assert torch.equal(out[..., 4 * t:4 * (t + 1)], ref)


def test_normalize_u8_is_tofloat_then_normalize():
    from topkd.data.transforms import ToFloat

    u8 = torch.randint(0, 256, (5, 3, 7, 7), dtype=torch.uint8)
    mean, std = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
    ref = torch.stack([T.Normalize(mean, std)(ToFloat()(x)) for x in u8])
    assert torch.equal(normalize_u8(u8, mean, std), ref)


def test_sample_draws_within_range():
    spec = CropFlipSpec(padding=4, flip_p=0.5, tiles=2)
    p = spec.sample(4000, torch.Generator().manual_seed(0))
    assert p.shape == (4000, 6)
    assert set(p[:, [0, 1, 3, 4]].unique().tolist()) == set(range(9))
    assert set(p[:, [2, 5]].unique().tolist()) == {0, 1}
    assert 0.45 < p[:, 2].float().mean() < 0.55


def test_what_is_not_batched(data_root):
    ds = get_dataset("cifar100", data_root, "train")
    assert why_not_batched(ds.transform, (32, 32)) is None
    assert why_not_batched(T.Compose([ds.transform, T.RandomErasing()]), (32, 32)) is not None
    crop = ds.with_transform(T.Compose([T.RandomResizedCrop(32)]))
    assert "not the dataset's own crop/flip" in why_not(crop)
    from topkd.data.transforms import build_transform

    odd = ds.with_transform(build_transform([T.RandomCrop(32, padding=4, padding_mode="reflect")],
                                            mean=(0.5,) * 3, std=(0.5,) * 3))
    assert "equal zero padding" in why_not(odd)
    rot = ds.with_transform(build_transform([T.RandomRotation(10)], mean=(0.5,) * 3,
                                            std=(0.5,) * 3))
    assert "no batched form" in why_not(rot)


def test_loader_follows_the_dataloader_order_and_pixels_without_augmentation(data_root):
    ds = get_dataset("cifar100", data_root, "train", augment=False)
    sub = Subset(Subset(ds, list(range(3, 20))), [0, 2, 4, 5, 6, 9, 11, 12, 13, 15])
    sampler = DistributedSampler(sub, num_replicas=1, rank=0, shuffle=True, seed=5)
    sampler.set_epoch(2)
    ref = list(DataLoader(sub, batch_size=4, sampler=sampler))
    loader = batched_loader(sub, sampler, 4, CPU, seed=5)
    assert isinstance(loader, BatchedLoader) and len(loader) == len(ref) == 3
    for (x, y), (rx, ry) in zip(loader, ref):
        assert torch.equal(y, ry) and torch.equal(x, rx)


def _images_by_sample(loader: BatchedLoader, epoch: int) -> dict[int, torch.Tensor]:
    loader.sampler.set_epoch(epoch)
    out = {}
    order = list(iter(loader.sampler))
    k = 0
    for x, _ in loader:
        for img in x:
            out[order[k]] = img
            k += 1
    return out


def test_draws_are_a_function_of_seed_epoch_and_sample(data_root):
    ds = get_dataset("cifar100", data_root, "train")
    n = len(ds)

    def loader(bs, rank=0, world=1, seed=0):
        s = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        return batched_loader(ds, s, bs, CPU, seed=seed)

    a = _images_by_sample(loader(4), 1)
    b = _images_by_sample(loader(7), 1)  # another batch size
    two = {**_images_by_sample(loader(3, 0, 2), 1), **_images_by_sample(loader(3, 1, 2), 1)}
    assert len(a) == n and all(torch.equal(a[i], b[i]) and torch.equal(a[i], two[i])
                               for i in range(n))
    again = _images_by_sample(loader(4), 1)
    assert all(torch.equal(a[i], again[i]) for i in range(n))
    c = _images_by_sample(loader(4), 2)  # another epoch: other crops
    d = _images_by_sample(loader(4, seed=1), 1)  # another seed
    assert sum(not torch.equal(a[i], c[i]) for i in range(n)) > n // 2
    assert sum(not torch.equal(a[i], d[i]) for i in range(n)) > n // 2
    # and each image is a crop/flip of its source with the drawn parameters
    p = loader(4).epoch_params(1)
    u8 = torch.stack([ds.raw_tensor(i) for i in range(n)])
    ref = normalize_u8(crop_flip(u8, p, 4), ds.transform.mean, ds.transform.std)
    assert all(torch.equal(a[i], ref[i]) for i in range(n))


def test_cache_replay_is_exact_through_the_batched_loader(data_root, tmp_path):
    from topkd.cache import build_cache, wrap_dataset
    from topkd.engine.data import WithIndex
    from topkd.models import create_model

    ds = get_dataset("cifar100", data_root, "train")
    sub = Subset(ds, list(range(1, 22)))
    teacher = create_model("resnet8", 100).eval()
    build_cache(teacher, sub, tmp_path / "c", views=3, progress=False, seed=2,
                dataset_name="cifar100", dtype="float32")
    cached = WithIndex(wrap_dataset(sub, tmp_path / "c", seed=4))
    cached.set_epoch(3)
    sampler = DistributedSampler(cached, num_replicas=1, rank=0, shuffle=True, seed=4)
    sampler.set_epoch(3)
    loader = batched_loader(cached, sampler, 8, CPU, seed=4)
    ref = list(DataLoader(cached, batch_size=8, sampler=sampler))
    assert len(ref) == len(loader) == 3
    for got, want in zip(loader, ref):
        assert len(got) == len(want) == 4  # x, y, teacher logits, index
        for g, w in zip(got, want):
            assert torch.equal(g, w)
    # the replayed view is the one the teacher saw: its logits come back exactly
    x, _, t, _ = next(iter(loader))
    with torch.no_grad():
        assert torch.allclose(teacher(x), t, rtol=0, atol=1e-5)


def test_trainer_uses_the_batched_loader_and_resumes_bit_exactly(tmp_path):
    from topkd.engine import Trainer

    sec = {"data": {"augment": True}, "train": {"epochs": 2}}
    cfg = tiny_config(tmp_path, **sec)
    full = Trainer(cfg, "train", tmp_path / "full", quiet=True)
    assert isinstance(full.train_loader, BatchedLoader)
    assert isinstance(full.test_loader, BatchedLoader)
    full.fit()
    env = json.loads((tmp_path / "full" / "env.json").read_text())
    assert env["speed"] == {"amp": "fp32", "channels_last": True, "compiled": [],
                            "loader": "batched"}  # what the auto switches resolved to here
    half = Trainer(cfg, "train", tmp_path / "cut", quiet=True)
    half.fit(max_epochs=1)
    resumed = Trainer(cfg, "train", tmp_path / "cut", resume="auto", quiet=True)
    resumed.fit()
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the DataLoader path is still there
    dl = Trainer(tiny_config(tmp_path, data={"loader": "dataloader", "augment": True}),
                 "train", tmp_path / "dl", quiet=True)
    assert isinstance(dl.train_loader, DataLoader)


def test_batched_loader_choice_is_a_config_switch(tmp_path):
    from topkd.engine import Trainer

    cfg = tiny_config(tmp_path, data={"loader": "batched", "auto_augment": "rand-m9-n1"})
    with pytest.raises(ConfigError, match=r"data.loader=batched: the training set of "
                       r"'cifar100' cannot be batched: .*per-image policies"):
        Trainer(cfg, "train", tmp_path / "r", quiet=True)
    auto = Trainer(tiny_config(tmp_path, data={"auto_augment": "rand-m9-n1"}), "train",
                   tmp_path / "a", quiet=True)
    assert isinstance(auto.train_loader, DataLoader)  # auto: the per-image path
    assert isinstance(auto.test_loader, BatchedLoader)  # evaluation has no policy
    with pytest.raises(ConfigError, match="data.loader"):
        tiny_config(tmp_path, data={"loader": "gpu"})


@pytest.mark.parametrize("name", ["imagefolder", "tiny_imagenet"])
def test_folder_datasets_keep_the_dataloader(tmp_path, name):
    """Image files (decoded and resized one by one, tiny_imagenet's rotation through PIL): the
    DataLoader path with data.loader=auto, and an error naming why with data.loader=batched."""
    from fixtures_data import write_imagefolder, write_tiny_imagenet
    from topkd.config import Config
    from topkd.engine.data import eval_loader, train_loader
    from topkd.utils.dist import DistInfo

    if name == "imagefolder":
        write_imagefolder(tmp_path)
    else:
        write_tiny_imagenet(tmp_path)
    ds = get_dataset(name, tmp_path, "train")
    assert "not an in-memory (array-backed) dataset" in why_not(ds)
    dist = DistInfo(device=CPU)

    def cfg(loader):
        return Config.from_dict({"data": {"name": name, "root": str(tmp_path), "batch_size": 2,
                                          "num_workers": 0, "loader": loader}})

    loader, _ = train_loader(ds, cfg("auto"), dist)
    assert isinstance(loader, DataLoader) and isinstance(eval_loader(ds, cfg("auto"), dist),
                                                         DataLoader)
    with pytest.raises(ConfigError, match=f"data.loader=batched: the training set of {name!r} "
                       "cannot be batched: .*folder datasets"):
        train_loader(ds, cfg("batched"), dist)
