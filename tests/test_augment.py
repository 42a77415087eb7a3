"""Augmentation policies (topkd.data.augment): timm components, MLKD's strong view, Mixup/CutMix
labels, config validation. Engine-level behaviour is in test_augment_engine.py."""

from __future__ import annotations

import importlib.util
import random
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from fixtures_data import (
    write_cifar,
    write_fashion_mnist,
    write_imagefolder,
    write_stl10,
    write_tiny_imagenet,
)
from topkd.config import Config, ConfigError, DataConfig, ViewConfig, load_config
from topkd.data import get_dataset
from topkd.data.augment import (
    MAIN,
    BatchMix,
    ImagePolicy,
    apply_policies,
    auto_augment_transform,
    build_batch_mix,
)

ROOT = Path(__file__).resolve().parents[1]
REF = Path(__file__).resolve().parent / "fixtures" / "reference"


def _seed(s: int) -> None:
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s)  # noqa: NPY002


def _data(**kw) -> DataConfig:
    views = {k: ViewConfig(**v) for k, v in kw.pop("views", {}).items()}
    return DataConfig(views=views, **kw)


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar(root, "cifar100", n_per_file=24)
    return root


# --------------------------------------------------------------------------- MLKD's strong view


@pytest.mark.parametrize("policy", ["mlkd", "mlkd_fixed"])
def test_mlkd_views_are_the_reference_transforms_bit_exact(cifar, policy):
    """data.views.strong.auto_augment=mlkd gives, with the same RNG states, exactly the
    (weak, strong) pair of get_cifar100_train_transform_strong() in LSKD's dataset code;
    mlkd_fixed is the same with the Cutout centre drawn as uniform(0, W)."""
    import _lskd_strong_view as ref

    real = np.random.uniform
    # The fix of the Cutout centre: np.random.uniform(w) (= uniform(w, 1)) -> uniform(0, w).
    centre = (lambda w: real(0, w)) if policy == "mlkd_fixed" else real
    reference = ref.weak_strong(centre)
    ds = get_dataset("cifar100", cifar, "train")
    ours = apply_policies(ds, _data(views={"strong": {"auto_augment": policy}}))
    same_as_weak = 0
    for i in range(len(ds)):
        for s in (i, 1000 + i):
            _seed(s)
            weak, strong = reference(Image.fromarray(ds.data[i]))
            _seed(s)
            item, y = ours[i]
            assert y == ds.targets[i]
            assert torch.equal(item[MAIN], weak), (i, s)
            assert torch.equal(item["strong"], strong), (i, s)
            same_as_weak += torch.equal(item["strong"], item[MAIN])
    assert same_as_weak == 0


def test_mlkd_cutout_centre_quirk_and_fix():
    """The reference draws the Cutout centre in (1, W] (np.random.uniform(W) = uniform(W, 1));
    mlkd_fixed in [0, W): only the fix can blank the top-left pixel with a small box."""
    img = Image.new("RGB", (32, 32))
    hits = {}
    for name in ("mlkd", "mlkd_fixed"):
        aug = auto_augment_transform(name, image_size=32, mean=(0.5,) * 3)
        np.random.seed(0)  # noqa: NPY002
        hits[name] = sum(np.asarray(aug._cutout(img, 0.03))[0, 0].any() for _ in range(2000))
    assert hits["mlkd"] == 0 and hits["mlkd_fixed"] > 0


# --------------------------------------------------------------------------- timm per-image


def _deit_timm_transform(mean, std):
    """DeiT's 32x32 training transform: timm create_transform with DeiT's defaults, its first
    op (RandomResizedCrop) replaced by RandomCrop(32, padding=4) (deit/datasets.py)."""
    from timm.data import create_transform

    from topkd.data.augment import _patch_posterize

    t = create_transform(32, is_training=True, color_jitter=0.4,
                         auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic",
                         re_prob=0.25, re_mode="pixel", re_count=1,
                         mean=mean, std=std)
    t.transforms[0] = T.RandomCrop(32, padding=4)
    for op in t.transforms:  # recent Pillow refuses posterize(0): same shim as ours
        _patch_posterize(op)
    return t


def test_deit_policy_is_timms_create_transform_bit_exact(cifar):
    ds = get_dataset("cifar100", cifar, "train")
    d = _data(auto_augment="rand-m9-mstd0.5-inc1", aa_interpolation="bicubic", re_prob=0.25)
    ours = apply_policies(ds, d)
    timm_t = _deit_timm_transform(ds.info.mean, ds.info.std)
    for i in range(len(ds)):
        for s in range(3):
            _seed(100 * s + i)
            expected = timm_t(Image.fromarray(ds.data[i]))
            _seed(100 * s + i)
            assert torch.equal(ours[i][0], expected), (i, s)


def test_posterize_to_zero_bits_is_black_not_an_error():
    """timm's rand-*-inc1 asks for 0 bits at magnitude 10; Pillow >= 10 raises there."""
    from timm.data.auto_augment import AugmentOp

    t = auto_augment_transform("rand-m10-n1-p1.0-inc1", image_size=32, mean=(0.5,) * 3)
    t.ops = [op for op in t.ops if op.name == "PosterizeIncreasing"]  # magnitude 10 -> 0 bits
    assert len(t.ops) == 1 and isinstance(t.ops[0], AugmentOp)
    img = Image.fromarray(np.full((8, 8, 3), 200, np.uint8))
    assert not np.asarray(t(img)).any()
    with pytest.raises(ValueError, match="bits"):  # what timm's own op does with this Pillow
        AugmentOp("PosterizeIncreasing", 1.0, 10, {"interpolation": 2})(img)


POLICIES = {
    "rand": {"auto_augment": "rand-m9-mstd0.5-inc1"},
    "original": {"auto_augment": "original"},
    "augmix": {"auto_augment": "augmix-m5-w4-d2"},
    "mlkd": {"auto_augment": "mlkd"},
    "erase_pixel": {"re_prob": 1.0},
    "erase_const": {"re_prob": 1.0, "re_mode": "const", "re_count": 2},
}


def _datasets(root: Path) -> dict[str, tuple[str, Path, dict]]:
    write_cifar(root / "c10", "cifar10", n_per_file=2)
    write_stl10(root / "stl", n_train=4)
    write_tiny_imagenet(root / "tiny")
    write_imagefolder(root / "folder")
    write_fashion_mnist(root / "fm", n_train=6)
    return {
        "cifar10": ("cifar10", root / "c10", {}),
        "stl10_32": ("stl10", root / "stl", {"resize": 32}),
        "tiny_imagenet": ("tiny_imagenet", root / "tiny", {}),
        "imagefolder": ("imagefolder", root / "folder", {"image_size": 32}),
        "fashion_mnist": ("fashion_mnist", root / "fm", {}),
    }


@pytest.fixture(scope="module")
def all_sets(tmp_path_factory):
    return _datasets(tmp_path_factory.mktemp("sets"))


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("dataset", ["cifar10", "stl10_32", "tiny_imagenet", "imagefolder",
                                     "fashion_mnist"])
def test_policy_on_every_dataset_is_seeded_and_changes_images(all_sets, dataset, policy):
    name, root, kw = all_sets[dataset]
    ds = get_dataset(name, root, "train", **kw)
    aug = apply_policies(ds, _data(name=name, **POLICIES[policy]))
    c, size = ds.info.in_channels, ds.info.image_size
    changed, trials = 0, 0
    for i in range(min(len(ds), 4)):
        for s in range(3):
            _seed(10 * i + s)
            a = aug[i][0]
            _seed(10 * i + s)
            b = aug[i][0]
            _seed(10 * i + s)
            plain = ds[i][0]  # same crop/flip draws: the policy is the only difference
            assert a.shape == plain.shape == (c, size, size) and a.dtype == torch.float32
            assert torch.equal(a, b) and torch.isfinite(a).all()
            changed += not torch.equal(a, plain)
            trials += 1
    # RandAugment/AutoAugment leave an image alone with some probability (p=0.5 per op).
    assert changed >= trials // 2, (dataset, policy, changed, trials)
    _seed(0)
    assert not torch.equal(aug[0][0], _seeded(aug, 1)[0])  # another seed, another image


def _seeded(ds, s):
    _seed(s)
    return ds[0]


def test_view_without_augment_uses_the_test_geometry(all_sets):
    name, root, kw = all_sets["imagefolder"]
    ds = get_dataset(name, root, "train", **kw)
    aug = apply_policies(ds, _data(name=name, augment=False, views={"clean": {"augment": False}}))
    item, _ = aug[0]
    assert torch.equal(item[MAIN], ds.eval_view()[0][0])
    assert torch.equal(item["clean"], item[MAIN])


def test_no_policy_leaves_the_dataset_alone(cifar):
    ds = get_dataset("cifar100", cifar, "train")
    assert apply_policies(ds, _data()) is ds


def test_dataset_with_own_transforms_is_refused(cifar):
    ds = get_dataset("cifar100", cifar, "train").with_transform(T.Compose([]))
    with pytest.raises(ValueError, match="builds its own transforms"):
        apply_policies(ds, _data(re_prob=0.5))


def test_policy_defaults_match_the_config_defaults():
    for section in (DataConfig(), ViewConfig()):
        assert ImagePolicy.of(section) == ImagePolicy()
    assert {f.name for f in fields(ImagePolicy)} == {f.name for f in fields(ViewConfig)}


# --------------------------------------------------------------------------- Mixup / CutMix


def _onehot(y, c, s=0.0):
    return torch.nn.functional.one_hot(y, c).double() * (1 - s) + s / c


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_mixup_labels_match_the_mixed_pixels(smoothing):
    C, B = 10, 8
    y = torch.arange(B)
    x = torch.rand(B, 3, 8, 8, dtype=torch.float64)
    mix = BatchMix(C, mixup_alpha=0.8, label_smoothing=smoothing)
    for s in range(5):
        np.random.seed(s)  # noqa: NPY002
        xm, ym = mix(x.clone(), y)
        # pixels: xm = lam * x + (1 - lam) * x.flip(0); recover lam by least squares
        d, e = (x - x.flip(0)).flatten(), (xm - x.flip(0)).flatten()
        lam = float(d @ e / (d @ d))
        torch.testing.assert_close(xm, lam * x + (1 - lam) * x.flip(0))
        expected = lam * _onehot(y, C, smoothing) + (1 - lam) * _onehot(y.flip(0), C, smoothing)
        torch.testing.assert_close(ym.double(), expected, atol=1e-6, rtol=0)
        assert (ym >= 0).all() and torch.allclose(ym.sum(1), torch.ones(B))


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_cutmix_labels_are_the_pasted_area(mode):
    C, B, S = 10, 6, 16
    y = torch.arange(B)
    x = y.double().view(B, 1, 1, 1).expand(B, 3, S, S).clone()  # image i is constant i
    mix = BatchMix(C, cutmix_alpha=1.0, mode=mode)
    pasted = 0.0
    for s in range(5):
        np.random.seed(s)  # noqa: NPY002
        xm, ym = mix(x.clone(), y)
        own = (xm == y.double().view(B, 1, 1, 1)).double().mean(dim=(1, 2, 3))
        partner = (xm == y.flip(0).double().view(B, 1, 1, 1)).double().mean(dim=(1, 2, 3))
        torch.testing.assert_close(own + partner, torch.ones(B, dtype=torch.float64))
        expected = own[:, None] * _onehot(y, C) + partner[:, None] * _onehot(y.flip(0), C)
        torch.testing.assert_close(ym.double(), expected, atol=1e-6, rtol=0)
        pasted += float(partner.sum())
    assert pasted > 0


def test_label_smoothing_alone_is_timms_label_smoothing_ce():
    from timm.loss import LabelSmoothingCrossEntropy

    from topkd.methods import cross_entropy

    C = 7
    mix = build_batch_mix(_data(label_smoothing=0.1), C)
    logits, y = torch.randn(5, C, dtype=torch.float64), torch.tensor([0, 3, 6, 2, 2])
    x = torch.randn(5, 3, 4, 4)
    x2, soft = mix(x.clone(), y)
    assert torch.equal(x2, x) and soft.shape == (5, C)
    ours = cross_entropy(logits, soft.double())
    ref = LabelSmoothingCrossEntropy(0.1)(logits, y)
    torch.testing.assert_close(ours, ref.to(ours.dtype), atol=1e-6, rtol=0)
    assert build_batch_mix(_data(), C) is None


def test_mixup_rejects_an_odd_batch():
    with pytest.raises(ValueError, match="odd batch"):
        BatchMix(10, mixup_alpha=1.0)(torch.zeros(3, 3, 4, 4), torch.zeros(3, dtype=torch.long))


# --------------------------------------------------------------------------- config keys


def _cfg(**data) -> Config:
    return Config.from_dict({"data": data})


BAD = [
    ({"re_prob": 1.5}, "data.re_prob"),
    ({"re_prob": -0.1}, "data.re_prob"),
    ({"re_mode": "const"}, "data.re_mode=.* has no effect"),
    ({"re_count": 3}, "data.re_count=3 has no effect"),
    ({"re_prob": 0.5, "re_count": 0}, "data.re_count"),
    ({"re_mode": "noise"}, "data.re_mode"),
    ({"aa_interpolation": "bicubic"}, "data.aa_interpolation=.* has no effect: no auto_augment"),
    ({"auto_augment": "mlkd", "aa_interpolation": "bicubic"}, "nearest"),
    ({"auto_augment": "bogus"}, "data.auto_augment.*timm policy string"),
    ({"auto_augment": "rand-x9"}, "data.auto_augment"),
    ({"mixup_alpha": -1.0}, "data.mixup_alpha"),
    ({"mixup_prob": 0.5}, "data.mixup_prob=0.5 has no effect: Mixup and CutMix are off"),
    ({"mixup_mode": "elem"}, "data.mixup_mode=.* has no effect"),
    ({"mixup_alpha": 0.8, "mixup_prob": 0.0}, "data.mixup_prob"),
    ({"mixup_alpha": 0.8, "mixup_switch_prob": 0.3}, "mixup_switch_prob=0.3 has no effect"),
    ({"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "mixup_switch_prob": 1.0}, "mixup_switch_prob"),
    ({"cutmix_minmax": [0.2, 0.8]}, "data.cutmix_alpha.*1.0 with cutmix_minmax"),
    ({"cutmix_alpha": 1.0, "cutmix_minmax": [0.8, 0.2]}, "data.cutmix_minmax"),
    ({"label_smoothing": 1.0}, "data.label_smoothing"),
    ({"mixup_alpha": 0.8, "views": {"strong": {"auto_augment": "mlkd"}}}, "views with Mixup"),
    ({"views": {"main": {}}}, "data.views"),
    ({"views": {"strong": {"re_mode": "rand"}}}, "data.views.strong.re_mode=.* has no effect"),
    ({"views": {"strong": {"auto_augment": "nope"}}}, "data.views.strong.auto_augment"),
    ({"views": {"strong": {"colour": 1}}}, "unknown config key 'data.views.strong.colour'"),
]


@pytest.mark.parametrize(("data", "match"), BAD, ids=[str(b[0]) for b in BAD])
def test_bad_augmentation_keys_are_config_errors(data, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(**data)


def test_view_keys_work_as_overrides_and_round_trip(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data: {name: cifar100}\n")
    cfg = load_config(p, ["data.views.strong.auto_augment=mlkd", "data.re_prob=0.25"])
    assert cfg.data.views == {"strong": ViewConfig(auto_augment="mlkd")}
    assert Config.from_dict(cfg.to_dict()) == cfg
    cut = load_config(p, ["data.cutmix_alpha=1.0", "data.cutmix_minmax=[0.2, 0.8]"])
    assert cut.data.cutmix_minmax == (0.2, 0.8) and Config.from_dict(cut.to_dict()) == cut
    with pytest.raises(ConfigError, match="unknown config key 'data.views.strong.nope'"):
        load_config(p, ["data.views.strong.nope=1"])


def test_vit_recipe_is_deits():
    """configs/base/cifar100_vit.yaml: DeiT's augmentation defaults (deit main.py, fixture)."""
    import yaml

    ref = yaml.safe_load((REF / "deit" / "main_args.yaml").read_text())["args"]
    cfg = load_config(ROOT / "configs" / "cifar100_vit" / "res32x4_deit_ti" / "topkd.yaml")
    d = cfg.data
    assert (d.auto_augment, d.aa_interpolation) == (ref["aa"], ref["train_interpolation"])
    assert (d.re_prob, d.re_mode, d.re_count) == (ref["reprob"], ref["remode"], ref["recount"])
    assert (d.mixup_alpha, d.cutmix_alpha, d.cutmix_minmax) == (
        ref["mixup"], ref["cutmix"], ref["cutmix_minmax"])
    assert (d.mixup_prob, d.mixup_switch_prob, d.mixup_mode) == (
        ref["mixup_prob"], ref["mixup_switch_prob"], ref["mixup_mode"])
    assert d.label_smoothing == ref["smoothing"] and d.augment
    assert cfg.model.kwargs["drop_path_rate"] == ref["drop_path"]


def test_policy_benchmark_runs(cifar, monkeypatch):
    """benchmarks/data_speed.py --policies (docs/benchmarks.md), on a tiny set."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("data_speed", ROOT / "benchmarks" /
                                                  "data_speed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.policy_rows({"c": get_dataset("cifar100", cifar, "train")}, batch=4, images=8,
                           repeats=1)
    assert [r[1] for r in rows] == list(mod.POLICIES) and rows[0][3] == rows[0][5] == 1.0
    assert all(r[2] > 0 and r[4] > 0 for r in rows)
    assert set(mod.mix_speed(4, 8, repeats=1, steps=2)) == {
        "label smoothing 0.1 alone", "Mixup 0.8 / CutMix 1.0 + smoothing 0.1 (DeiT)"}
