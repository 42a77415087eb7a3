"""The YAML configs under ``configs/``: composition, the paper's numbers, registry names.

The recipe/weight checks compose files with a small reference implementation of the documented
``defaults:`` rule (deep-merge in order, then the file itself), independent of
``topkd.config``; ``test_every_config_loads_through_load_config`` then checks that the real loader
agrees with it on every file. The project's own modules are imported at the top: if one fails to
import, these tests fail (they never skip).
"""

from __future__ import annotations

import importlib.util
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

import topkd.data as data
import topkd.losses as losses
import topkd.models as models
from topkd.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
ALL_YAML = sorted(CONFIGS.rglob("*.yaml"))
GRID = sorted((CONFIGS / "cifar100").glob("*/*.yaml"))
LEAVES = sorted(
    p for d in ("cifar100", "imagenet", "tiny_imagenet", "cifar100_vit", "fashion_mnist",
                "teachers", "students")
    for p in (CONFIGS / d).rglob("*.yaml")
)  # fmt: skip
LIGHT = {"shufflev1", "shufflev2", "mobilenetv2"}


def _load_generate():
    spec = importlib.util.spec_from_file_location("topkd_configs_generate", CONFIGS / "generate.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while being created
    spec.loader.exec_module(mod)
    return mod


GEN = _load_generate()


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@cache
def _compose_cached(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text()) or {}
    merged: dict[str, Any] = {}
    for d in data.pop("defaults", []) or []:
        merged = _merge(merged, _compose_cached((path.parent / d).resolve()))
    return _merge(merged, data)


def compose(path: Path) -> dict[str, Any]:
    """Reference composition of ``path`` (a deep copy, safe to mutate)."""
    return yaml.safe_load(yaml.safe_dump(_compose_cached(path.resolve())))


def rel(p: Path) -> str:
    return p.relative_to(CONFIGS).as_posix()


# --------------------------------------------------------------------------- generator


def test_generated_files_are_up_to_date():
    assert GEN.check() == [], "run `python configs/generate.py` and commit the result"


def test_generator_write_is_idempotent_and_removes_stale(tmp_path):
    assert GEN.write(tmp_path) == len(GEN.generate())
    assert GEN.check(tmp_path) == [] and GEN.write(tmp_path) == 0
    stale = tmp_path / "cifar100" / "res32x4_res8x4" / "old.yaml"
    stale.write_text(GEN.HEADER + "name: old\n")
    keep = tmp_path / "cifar100" / "mine.yaml"
    keep.write_text("name: hand-written\n")
    assert "stale: cifar100/res32x4_res8x4/old.yaml" in GEN.check(tmp_path)
    GEN.write(tmp_path)
    assert not stale.exists() and keep.exists()  # only generated files are ever removed


def test_cifar_grid_is_complete():
    assert len(GRID) == 77
    pairs = {p.parent.name for p in GRID}
    assert pairs == {p.key for p in GEN.CIFAR_PAIRS} and len(pairs) == 11
    for pair in pairs:
        methods = {p.stem for p in (CONFIGS / "cifar100" / pair).glob("*.yaml")}
        assert methods == {"kd", "dkd", "kd_ls", "dkd_ls", "topkd", "kd_tsm_tdl", "dkd_tsm_tdl"}
    for p in GRID:  # tiny leaf files: defaults + name (+ a pair override)
        assert len(p.read_text().splitlines()) <= 5, rel(p)
        assert compose(p)["name"] == f"cifar100_{p.parent.name}_{p.stem}"


def test_leaf_names_are_unique():
    names = [compose(p)["name"] for p in LEAVES]
    assert len(names) == len(set(names))


# --------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("path", GRID, ids=rel)
def test_cifar100_recipe(path):
    cfg = compose(path)
    assert cfg["data"]["name"] == "cifar100" and cfg["data"]["batch_size"] == 64
    o, s = cfg["optim"], cfg["sched"]
    assert o["name"] == "sgd" and o["momentum"] == 0.9 and o["weight_decay"] == 5e-4
    assert s["name"] == "multistep" and s["milestones"] == [150, 180, 210] and s["gamma"] == 0.1
    assert cfg["train"]["epochs"] == 240
    light = cfg["model"]["name"] in LIGHT
    assert o["lr"] == (0.01 if light else 0.05)
    assert cfg["teacher"]["checkpoint"].startswith("checkpoints/cifar_teachers/")
    assert cfg["teacher"]["checkpoint"].endswith("_vanilla/ckpt_epoch_240.pth")


def test_light_students_and_cross_arch_pairs():
    light_pairs = {p.key for p in GEN.CIFAR_PAIRS if p.student in LIGHT}
    assert light_pairs == {
        "res32x4_shuv1",
        "res32x4_shuv2",
        "wrn40_2_shuv1",
        "vgg13_mv2",
        "res50_mv2",
    }
    for m in ("shufflev1", "shufflev2", "mobilenetv2"):
        assert compose(CONFIGS / "students" / "cifar100" / f"{m}.yaml")["optim"]["lr"] == 0.01
    assert compose(CONFIGS / "students" / "cifar100" / "resnet8x4.yaml")["optim"]["lr"] == 0.05


@pytest.mark.parametrize("method", ["dkd", "dkd_ls", "dkd_tsm_tdl"])
def test_dkd_beta_exceptions(method):
    expected = {"res56_res20": 2.0, "wrn40_2_wrn16_2": 6.0, "vgg13_vgg8": 6.0}
    for pair in {p.parent.name for p in GRID}:
        loss = compose(CONFIGS / "cifar100" / pair / f"{method}.yaml")["loss"]
        assert loss["dkd_beta"] == expected.get(pair, 8.0), pair
        assert loss["dkd_alpha"] == 1.0
    # non-DKD methods never get a beta override
    assert "dkd_beta" not in compose(CONFIGS / "cifar100" / "res56_res20" / "kd.yaml")["loss"]


def test_cifar_method_weights():
    def loss(method: str) -> dict[str, Any]:
        return compose(CONFIGS / "cifar100" / "res32x4_res8x4" / f"{method}.yaml")["loss"]

    kd = loss("kd")
    assert (kd["base"], kd["ce"], kd["base_weight"], kd["temperature"]) == ("kd", 0.1, 0.9, 4.0)
    assert kd["warmup"] == 0 and not kd["tsm"] and not kd["ls"]
    dkd = loss("dkd")
    assert (dkd["base"], dkd["ce"], dkd["dkd_alpha"], dkd["dkd_beta"]) == ("dkd", 1.0, 1.0, 8.0)
    assert dkd["temperature"] == 4.0 and dkd["warmup"] == 20 and dkd["base_weight"] == 1.0
    kd_ls = loss("kd_ls")
    assert kd_ls["ls"] and (kd_ls["temperature"], kd_ls["base_weight"], kd_ls["ce"]) == (2, 9, 0.1)
    dkd_ls = loss("dkd_ls")
    assert dkd_ls["ls"] and (dkd_ls["temperature"], dkd_ls["base_weight"]) == (2.0, 9.0)
    assert dkd_ls["warmup"] == 20 and dkd_ls["ce"] == 1.0
    top = loss("topkd")
    assert top["base"] == "topkd" and top["tsm"] is True
    assert (top["ce"], top["w_con"], top["w_tdl"], top["tau"], top["k"], top["warmup"]) == (
        1.0,
        1.0,
        1.0,
        0.1,
        5,
        20,
    )
    assert "tdl_weight" not in top  # TopKD's TDL is its own w_tdl, not the extra term
    for method, base in (("kd_tsm_tdl", kd), ("dkd_tsm_tdl", dkd)):
        spec = loss(method)
        assert spec["tsm"] is True and spec["tdl_weight"] == 1.0 and spec["k"] == 5
        for key in ("base", "ce", "base_weight", "temperature", "warmup", "ls"):
            assert spec[key] == base[key], (method, key)
    topkd_ls = compose(CONFIGS / "methods" / "topkd_ls.yaml")["loss"]
    assert topkd_ls["ls"] is True and topkd_ls["base"] == "topkd"
    assert compose(CONFIGS / "methods" / "ce.yaml")["loss"] == {"ce": 1.0, "base": "none"}


def test_imagenet_recipe_and_weights():
    leaves = sorted((CONFIGS / "imagenet").glob("*/*.yaml"))
    assert {p.parent.name for p in leaves} == {"r34_r18", "r50_mv1"}
    for p in leaves:
        cfg = compose(p)
        assert cfg["data"]["name"] == "imagenet" and cfg["data"]["batch_size"] == 512
        assert cfg["optim"]["lr"] == 0.2 and cfg["optim"]["weight_decay"] == 1e-4
        assert cfg["sched"]["milestones"] == [30, 60, 90] and cfg["train"]["epochs"] == 100
    r34 = CONFIGS / "imagenet" / "r34_r18"
    kd = compose(r34 / "kd.yaml")["loss"]
    assert (kd["temperature"], kd["ce"], kd["base_weight"]) == (1.0, 0.5, 0.5)
    dkd = compose(r34 / "dkd.yaml")["loss"]
    assert (dkd["ce"], dkd["dkd_alpha"], dkd["dkd_beta"], dkd["temperature"], dkd["warmup"]) == (
        1.0,
        1.0,
        0.5,
        1.0,
        1,
    )
    assert compose(CONFIGS / "imagenet" / "r50_mv1" / "dkd.yaml")["loss"]["dkd_beta"] == 2.0
    assert compose(CONFIGS / "imagenet" / "r50_mv1" / "dkd_tsm_tdl.yaml")["loss"]["dkd_beta"] == 2
    assert compose(r34 / "topkd.yaml")["loss"]["warmup"] == 1
    kd_t = compose(r34 / "kd_tsm_tdl.yaml")["loss"]
    assert kd_t["temperature"] == 1.0 and kd_t["tsm"] and kd_t["tdl_weight"] == 1.0
    r50 = compose(CONFIGS / "imagenet" / "r50_mv1" / "kd.yaml")
    assert (r50["teacher"]["name"], r50["model"]["name"]) == ("resnet50", "mobilenetv1")


def test_other_recipes():
    tiny = compose(CONFIGS / "tiny_imagenet" / "r18_shuv2" / "kd.yaml")
    assert tiny["data"]["name"] == "tiny_imagenet" and tiny["optim"]["lr"] == 0.2
    assert tiny["sched"]["milestones"] == [60, 120, 160] and tiny["train"]["epochs"] == 200
    vit = compose(CONFIGS / "cifar100_vit" / "res32x4_deit_ti" / "topkd.yaml")
    assert vit["optim"]["name"] == "adamw" and vit["sched"]["name"] == "cosine"
    assert vit["sched"]["warmup_epochs"] > 0 and vit["model"]["kwargs"]["img_size"] == 32
    assert vit["model"]["name"].startswith("timm:deit_tiny")
    fm = compose(CONFIGS / "fashion_mnist" / "teacher_student" / "topkd.yaml")
    teacher_run = compose(CONFIGS / "teachers" / "fashion_mnist" / "fmnist_cnn_teacher.yaml")
    # the distillation leaf loads the checkpoint the teacher config's run directory will hold
    assert fm["teacher"]["checkpoint"].startswith(
        f"{teacher_run['output_dir']}/{teacher_run['name']}/"
    )
    # validation-only tuning (benchmarks/fmnist.py, docs/results.md): k 2, DKD beta 4
    assert fm["loss"]["k"] == 2
    leaves = {m: compose(CONFIGS / "fashion_mnist" / "teacher_student" / f"{m}.yaml")["loss"]
              for m in ("kd_tsm_tdl", "dkd_tsm_tdl", "dkd")}
    assert leaves["kd_tsm_tdl"]["k"] == leaves["dkd_tsm_tdl"]["k"] == 2
    assert leaves["dkd"]["dkd_beta"] == leaves["dkd_tsm_tdl"]["dkd_beta"] == 4.0


# --------------------------------------------------------------------------- registries


def _distill_leaves() -> list[Path]:
    return [p for p in LEAVES if "teacher" in compose(p)]


def test_model_and_dataset_names_are_registered():
    registered = set(models.list_models(include_aliases=True))
    datasets = set(data.list_datasets())
    for p in LEAVES:
        cfg = compose(p)
        assert cfg["data"]["name"] in datasets, rel(p)
        names = [cfg["model"]["name"]] + ([cfg["teacher"]["name"]] if "teacher" in cfg else [])
        for name in names:
            if name.startswith("timm:"):
                timm = pytest.importorskip("timm")
                assert timm.list_models(name[len("timm:") :]), (rel(p), name)
            else:
                assert name in registered, (rel(p), name)


def test_every_model_builds_with_its_config_kwargs():
    """One instance per distinct (name, kwargs, dataset): the config's kwargs are accepted."""
    seen: set[tuple[str, str, str]] = set()
    for p in LEAVES:
        cfg = compose(p)
        entries = [cfg["model"]] + ([cfg["teacher"]] if "teacher" in cfg else [])
        for m in entries:
            key = (m["name"], repr(sorted((m.get("kwargs") or {}).items())), cfg["data"]["name"])
            if key in seen:
                continue
            seen.add(key)
            info = data.dataset_info(cfg["data"]["name"])
            model = models.create_model(m["name"], info.num_classes, **(m.get("kwargs") or {}))
            assert model.get_classifier().out_features == info.num_classes


def test_every_loss_section_is_a_valid_loss_spec():
    for p in ALL_YAML:
        cfg = compose(p)
        if "loss" in cfg:
            losses.LossSpec.from_dict(cfg["loss"])


@pytest.mark.parametrize(
    "method", ["ce", "kd", "dkd", "kd_ls", "dkd_ls", "topkd", "topkd_ls", "kd_tsm_tdl",
               "dkd_tsm_tdl"])
def test_method_files_equal_the_loss_presets(method):
    """methods/<m>.yaml and ``LossSpec.preset(m)`` (topkd.losses) are the same loss."""
    spec = losses.LossSpec.from_dict(compose(CONFIGS / "methods" / f"{method}.yaml")["loss"])
    assert spec == losses.LossSpec.preset(method)


def test_every_config_loads_through_load_config():
    for p in ALL_YAML:
        cfg = load_config(p)
        ref = compose(p)
        plain = cfg.to_dict() if hasattr(cfg, "to_dict") else None
        for section in ("data", "model", "teacher", "optim", "sched", "train"):
            for key, value in (ref.get(section) or {}).items():
                got = (
                    plain[section][key]
                    if plain is not None
                    else getattr(getattr(cfg, section), key)
                )
                if isinstance(value, list):
                    got = list(got)
                assert got == value, (rel(p), section, key)
        if "name" in ref:
            assert cfg.name == ref["name"]
        for key, value in (ref.get("loss") or {}).items():
            assert getattr(cfg.loss, key) == value, (rel(p), "loss", key)


def test_every_loss_computes_a_finite_value_for_its_dataset():
    """Each leaf's loss runs on logits of its dataset's class count (e.g. 2k <= C for TDL)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    done: set[tuple[str, int]] = set()
    for p in LEAVES:
        cfg = compose(p)
        spec = losses.LossSpec.from_dict(cfg["loss"])
        c = data.dataset_info(cfg["data"]["name"]).num_classes
        if (repr(spec), c) in done:
            continue
        done.add((repr(spec), c))
        s = torch.randn(6, c, generator=gen, requires_grad=True)
        t = torch.randn(6, c, generator=gen) if "teacher" in cfg else None
        assert (t is not None) == spec.has_distillation, rel(p)
        y = torch.randint(0, c, (6,), generator=gen)
        total, _ = losses.DistillationLoss(spec)(s, t, y, epoch=1)
        assert torch.isfinite(total), rel(p)
        total.backward()
        assert s.grad is not None and torch.isfinite(s.grad).all()
