"""The YAML configs under ``configs/``: composition, the paper's numbers, registry names.

The recipe/weight checks compose files with a small reference implementation of the documented
``defaults:`` rule (deep-merge in order, then the file itself) so they run without
``topkd.config``; ``test_every_config_loads_through_load_config`` then checks that the real loader
agrees with it on every file.
"""

from __future__ import annotations

import importlib.util
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

import _reference as R

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
ALL_YAML = sorted(CONFIGS.rglob("*.yaml"))
GRID = sorted((CONFIGS / "cifar100").glob("*/*.yaml"))
LEAVES = sorted(
    p for d in ("cifar100", "imagenet", "tiny_imagenet", "cifar100_vit", "fashion_mnist",
                "fashion_mnist_pairs", "teachers", "students")
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
    """Every method config for every CIFAR-100 pair, except pairs a method declares unsupported
    (``configs/pair_overrides/cifar100/<m>.yaml``, with the reason)."""
    from topkd.methods import METHODS

    def unsupported(m: str) -> dict[str, str]:
        return GEN._pair_overrides(m).get("unsupported") or {}

    pairs = {p.key for p in GEN.CIFAR_PAIRS}
    assert len(GRID) == sum(len(pairs - set(unsupported(m))) for m in GEN.CIFAR_METHODS)
    assert {p.parent.name for p in GRID} == pairs and len(pairs) == 11
    for pair in pairs:
        leaves = sorted((CONFIGS / "cifar100" / pair).glob("*.yaml"))
        want = {m for m in GEN.CIFAR_METHODS if pair not in unsupported(m)}
        assert {p.stem for p in leaves} == want, pair
        # every registered distillation method is shipped for every pair it supports
        used = {compose(p)["method"]["name"] for p in leaves}
        skipped = {compose(CONFIGS / "methods" / f"{m}.yaml")["method"]["name"]
                   for m in GEN.CIFAR_METHODS if pair in unsupported(m)}
        assert used | skipped == set(METHODS.names()) - {"ce"}, pair
    for m in GEN.CIFAR_METHODS:
        for pair, reason in unsupported(m).items():
            assert pair in pairs and isinstance(reason, str) and reason, (m, pair)
    for p in GRID:  # tiny leaf files: defaults + name (+ a pair override)
        assert len(p.read_text().splitlines()) <= 5, rel(p)
        assert compose(p)["name"] == f"cifar100_{p.parent.name}_{p.stem}"


def test_a_variant_inherits_the_unsupported_pairs_of_its_method_file():
    """kdsvd_safe (defaults: [kdsvd.yaml]) has no table of its own: KDSVD's width rule is its
    rule too, so it ships for exactly KDSVD's pairs."""
    assert not (CONFIGS / "pair_overrides" / "cifar100" / "kdsvd_safe.yaml").exists()
    assert GEN._pair_overrides("kdsvd_safe") == GEN._pair_overrides("kdsvd") != {}
    assert GEN._pair_overrides("kd_ls") == {}  # KD has no table: nothing to inherit
    kdsvd = {p.parent.name for p in GRID if p.stem == "kdsvd"}
    assert {p.parent.name for p in GRID if p.stem == "kdsvd_safe"} == kdsvd
    assert len(kdsvd) == 6


def test_leaf_names_are_unique():
    names = [compose(p)["name"] for p in LEAVES]
    assert len(names) == len(set(names))


# --------------------------------------------------------------------------- recipes


def own_recipe(method_dir: Path, stem: str) -> bool:
    """Whether a method file sets solver values of its own reference (e.g. MLKD's lr 0.025 and
    epochs); such leaves are checked against that reference in tests/test_method_<name>.py."""
    return bool({"optim", "sched", "train"} & set(compose(method_dir / f"{stem}.yaml")))


@pytest.mark.parametrize("path", GRID, ids=rel)
def test_cifar100_recipe(path):
    cfg = compose(path)
    assert cfg["data"]["name"] == "cifar100" and cfg["data"]["batch_size"] == 64
    o, s = cfg["optim"], cfg["sched"]
    # DOT (configs/methods/dot.yaml) is an optimizer: KD trained with optim.name=dot.
    assert o["name"] == ("dot" if path.stem == "dot" else "sgd")
    assert o["momentum"] == 0.9 and o["weight_decay"] == 5e-4
    assert s["name"] == "multistep" and s["milestones"] == [150, 180, 210] and s["gamma"] == 0.1
    if own_recipe(CONFIGS / "methods", path.stem):
        return
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


# Our pair keys -> mdistiller's file names under configs/cifar100/dkd/.
MDISTILLER_PAIR = {p.key: p.key for p in GEN.CIFAR_PAIRS} | {
    "wrn40_2_wrn16_2": "wrn40_2_wrn_16_2", "wrn40_2_wrn40_1": "wrn40_2_wrn_40_1"}


def _method(path: Path) -> dict[str, Any]:
    return compose(path)["method"]


@pytest.mark.parametrize("pair", sorted(MDISTILLER_PAIR))
def test_cifar_dkd_leaves_equal_mdistiller(pair):
    """Every DKD leaf against mdistiller's configs/cifar100/dkd/<pair>.yaml (resolved with its
    cfg.py defaults): ce, alpha, beta, T, warm-up and the solver."""
    ref = R.mdistiller(f"configs/cifar100/dkd/{MDISTILLER_PAIR[pair]}.yaml")
    dkd = ref["DKD"]
    for method in ("dkd", "dkd_tsm_tdl"):
        cfg = compose(CONFIGS / "cifar100" / pair / f"{method}.yaml")
        m = cfg["method"]
        assert m["name"] == "dkd"
        assert (m["ce"], m["alpha"], m["beta"], m["temperature"], m["warmup"]) == (
            dkd["CE_WEIGHT"], dkd["ALPHA"], dkd["BETA"], dkd["T"], dkd["WARMUP"]), (pair, method)
        sol = ref["SOLVER"]
        assert cfg["optim"]["lr"] == sol["LR"] and cfg["optim"]["momentum"] == sol["MOMENTUM"]
        assert cfg["optim"]["weight_decay"] == sol["WEIGHT_DECAY"]
        assert cfg["sched"]["milestones"] == sol["LR_DECAY_STAGES"]
        assert cfg["sched"]["gamma"] == sol["LR_DECAY_RATE"]
        assert cfg["train"]["epochs"] == sol["EPOCHS"]
        assert cfg["data"]["batch_size"] == sol["BATCH_SIZE"]
    # DKD+LS: the LS code's --logit-stand rule applied to the same reference config
    rule = R.logit_stand_rule()
    w, T = rule["args"]["kd_weight"], rule["args"]["base_temp"]
    assert rule["DKD"] == {"ALPHA": "*= kd_weight", "BETA": "*= kd_weight", "T": "= base_temp"}
    m = _method(CONFIGS / "cifar100" / pair / "dkd_ls.yaml")
    assert m["ls"] is True and (m["alpha"], m["beta"], m["temperature"]) == (
        dkd["ALPHA"] * w, dkd["BETA"] * w, T)
    assert (m["ce"], m["warmup"]) == (dkd["CE_WEIGHT"], dkd["WARMUP"])


def test_cifar_kd_leaves_equal_mdistiller_and_ls():
    ref = R.mdistiller("configs/cifar100/kd.yaml")
    rule = R.logit_stand_rule()
    assert rule["KD"] == {"KD_WEIGHT": "= kd_weight", "TEMPERATURE": "= base_temp"}
    for pair in MDISTILLER_PAIR:
        kd = _method(CONFIGS / "cifar100" / pair / "kd.yaml")
        assert kd == {"name": "kd", "ce": ref["KD"]["LOSS"]["CE_WEIGHT"],
                      "kd_weight": ref["KD"]["LOSS"]["KD_WEIGHT"],
                      "temperature": ref["KD"]["TEMPERATURE"]}, pair
        kd_ls = _method(CONFIGS / "cifar100" / pair / "kd_ls.yaml")
        assert kd_ls == {**kd, "ls": True, "kd_weight": rule["args"]["kd_weight"],
                         "temperature": rule["args"]["base_temp"]}, pair
        # the LS repository's own KD config of the pair agrees once --logit-stand is applied
        ls_ref = R.logit_standardization("configs/cifar100/kd/resnet32x4_resnet8x4.yaml")
        assert ls_ref["KD"]["LOSS"]["CE_WEIGHT"] == kd_ls["ce"]


def test_topkd_and_plugin_leaves():
    def method(name: str) -> dict[str, Any]:
        return _method(CONFIGS / "cifar100" / "res32x4_res8x4" / f"{name}.yaml")

    top = method("topkd")
    tsm = {"gamma": 1.0, "lam": 0.5, "correct_gt": True, "schedule": "linear"}
    # TopKD's defaults of the method spec (docs/spec.md): the paper leaves them open.
    assert top == {"name": "topkd", "ce": 1.0, "k": 5, "w_con": 1.0, "w_tdl": 1.0, "tau": 0.1,
                   "alpha": 1.0, "beta": 0.5, "tsm": tsm, "warmup": 20}
    for name, base in (("kd_tsm_tdl", method("kd")), ("dkd_tsm_tdl", method("dkd"))):
        spec = method(name)
        assert spec == {**base, "k": 5, "tsm": tsm,
                        "tdl": {"weight": 1.0, "alpha": 1.0, "beta": 0.5}}, name
    assert compose(CONFIGS / "methods" / "ce.yaml")["method"] == {"name": "ce", "ce": 1.0}
    assert not (CONFIGS / "methods" / "topkd_ls.yaml").exists()  # LS is a no-op under TopKD


@pytest.mark.parametrize("pair, teacher", [("r34_r18", "ResNet34"), ("r50_mv1", "ResNet50")])
def test_imagenet_leaves_equal_mdistiller(pair, teacher):
    leaves = sorted((CONFIGS / "imagenet" / pair).glob("*.yaml"))
    assert {p.stem for p in leaves} == {
        m for m in GEN.IMAGENET_METHODS
        if pair not in (GEN._pair_overrides(m, "imagenet").get("unsupported") or {})}
    dkd_ref = R.mdistiller(f"configs/imagenet/{pair}/dkd.yaml")
    kd_ref = R.mdistiller(f"configs/imagenet/{pair}/kd.yaml")
    assert dkd_ref["DISTILLER"]["TEACHER"] == teacher
    for p in leaves:
        cfg = compose(p)
        if own_recipe(CONFIGS / "methods" / "imagenet", p.stem) or \
                GEN._pair_overrides(p.stem, "imagenet").get(pair):
            continue  # a method with its own reference solver (tests/test_method_<name>.py)
        sol = dkd_ref["SOLVER"]
        assert cfg["data"]["name"] == "imagenet" and cfg["data"]["batch_size"] == sol["BATCH_SIZE"]
        assert cfg["optim"]["lr"] == sol["LR"]
        assert cfg["optim"]["weight_decay"] == sol["WEIGHT_DECAY"]
        assert cfg["sched"]["milestones"] == sol["LR_DECAY_STAGES"]
        assert cfg["train"]["epochs"] == sol["EPOCHS"]
    kd = _method(CONFIGS / "imagenet" / pair / "kd.yaml")
    k = kd_ref["KD"]
    assert (kd["ce"], kd["kd_weight"], kd["temperature"]) == (
        k["LOSS"]["CE_WEIGHT"], k["LOSS"]["KD_WEIGHT"], k["TEMPERATURE"])
    d = dkd_ref["DKD"]
    for name in ("dkd", "dkd_tsm_tdl"):
        m = _method(CONFIGS / "imagenet" / pair / f"{name}.yaml")
        assert (m["ce"], m["alpha"], m["beta"], m["temperature"], m["warmup"]) == (
            d["CE_WEIGHT"], d["ALPHA"], d["BETA"], d["T"], d["WARMUP"]), name
    assert _method(CONFIGS / "imagenet" / pair / "topkd.yaml")["warmup"] == 1
    kd_t = _method(CONFIGS / "imagenet" / pair / "kd_tsm_tdl.yaml")
    assert kd_t["temperature"] == k["TEMPERATURE"] and kd_t["tsm"] and kd_t["tdl"]["weight"] == 1


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


@pytest.mark.parametrize("dataset", ["fashion_mnist", "fashion_mnist_pairs"])
def test_testbed_leaves_are_the_method_file_plus_what_the_tuning_chose(dataset):
    """``<dataset>/teacher_student/<m>.yaml`` = ``methods/<m>.yaml`` + the testbed's choice
    (``pair_overrides/<dataset>/<m>.yaml``, written by ``benchmarks/testbed.py
    --write-configs``; tests/test_testbed.py checks that writer), one leaf per written entry,
    none for an entry the testbed found unsupported; the demo's five methods are there."""
    files = sorted((CONFIGS / "pair_overrides" / dataset).glob("*.yaml"))
    assert {"kd", "dkd", "kd_ls", "kd_tsm_tdl", "topkd"} <= {p.stem for p in files}
    leaves = {p.stem for p in (CONFIGS / dataset / "teacher_student").glob("*.yaml")}
    for p in files:
        table = yaml.safe_load(p.read_text()) or {}
        if "teacher_student" in (table.get("unsupported") or {}):
            assert p.stem not in leaves, p.stem
            continue
        over = table.get("teacher_student") or {}
        leaf = compose(CONFIGS / dataset / "teacher_student" / f"{p.stem}.yaml")
        method = compose(CONFIGS / "methods" / f"{p.stem}.yaml")["method"]
        assert leaf["method"] == _merge(method, {k: v for k, v in over.items()
                                                 if k not in GEN.SECTIONS}), p.stem
        for section in set(over) & set(GEN.SECTIONS):
            assert _merge(leaf[section], over[section]) == leaf[section], (p.stem, section)
    assert leaves <= {p.stem for p in files}


@pytest.mark.parametrize("dataset", ["fashion_mnist", "fashion_mnist_pairs"])
def test_testbed_datasets_teachers_and_validation_split(dataset):
    """The testbed's strong teachers (10 epochs on every training image but the validation
    split) and the validation split of every Fashion-MNIST-based config."""
    (teacher_path,) = (CONFIGS / "teachers" / dataset).glob("*.yaml")
    teacher = compose(teacher_path)
    assert teacher["train"]["epochs"] == 10 and "train_subset" not in teacher["data"]
    leaves = sorted((CONFIGS / dataset / "teacher_student").glob("*.yaml"))
    assert leaves
    for leaf in [*leaves, teacher_path, *(CONFIGS / "students" / dataset).glob("*.yaml")]:
        cfg = compose(leaf)
        assert cfg["data"]["name"] == dataset and cfg["data"]["val_fraction"] == 0.1, rel(leaf)
        if "teacher" in cfg:
            assert cfg["teacher"]["checkpoint"] == (
                f"{teacher['output_dir']}/{teacher['name']}/checkpoints/best.pt")
            assert cfg["teacher"]["name"] == teacher["model"]["name"]
    if dataset == "fashion_mnist_pairs":
        assert teacher["data"]["kwargs"] == {"train_size": 30000, "test_size": 5000,
                                             "pair_seed": 0}


# --------------------------------------------------------------------------- registries


def _distill_leaves() -> list[Path]:
    return [p for p in LEAVES if "teacher" in compose(p)]


def test_model_and_dataset_names_are_registered():
    import topkd.data as data
    import topkd.models as models

    registered = set(models.list_models(include_aliases=True))
    datasets = set(data.list_datasets())
    for p in LEAVES:
        cfg = compose(p)
        assert cfg["data"]["name"] in datasets, rel(p)
        names = [cfg["model"]["name"]] + ([cfg["teacher"]["name"]] if "teacher" in cfg else [])
        for name in names:
            if name.startswith("timm:"):
                import timm

                assert timm.list_models(name[len("timm:") :]), (rel(p), name)
            else:
                assert name in registered, (rel(p), name)


def test_every_model_builds_with_its_config_kwargs():
    """One instance per distinct (name, kwargs, dataset): the config's kwargs are accepted."""
    import topkd.data as data
    import topkd.models as models

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


def test_every_method_section_is_valid():
    from topkd.methods import params_from_dict

    for p in LEAVES:
        params_from_dict(compose(p)["method"])


def _restrict(got, ref):
    """``got`` limited to the keys of ``ref`` (recursively, for mappings)."""
    if not isinstance(ref, dict) or not isinstance(got, dict):
        return got
    return {k: _restrict(got.get(k), v) for k, v in ref.items()}


def test_every_config_loads_through_load_config():
    from topkd.config import load_config

    for p in LEAVES + [CONFIGS / "base" / f for f in ("cifar100.yaml", "fashion_mnist.yaml")]:
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
                if isinstance(value, dict):  # data.views.<name>: the file's keys, resolved
                    got = _restrict(got, value)
                assert got == value, (rel(p), section, key)
        if "name" in ref:
            assert cfg.name == ref["name"]
        for key, value in (ref.get("method") or {}).items():
            got = plain["method"][key]
            assert got == value or (isinstance(value, dict) and got == {**got, **value}), (
                rel(p), "method", key)


def test_every_method_computes_a_finite_value_for_its_dataset():
    """Each leaf's logit method runs on logits of its dataset's class count (e.g. 2k <= C for
    TDL). Feature methods need models: test_method_configs_smoke trains their leaves."""
    import torch

    from topkd.data import dataset_info
    from topkd.methods import Batch, ModelOutput, create_method, method_class, params_from_dict

    gen = torch.Generator().manual_seed(0)
    done: set[tuple[str, int]] = set()
    for p in LEAVES:
        cfg = compose(p)
        cls = method_class(params_from_dict(cfg["method"]))
        if cls.student_taps or cls.teacher_taps or cls.needs_index:
            continue  # feature methods need the models: test_method_configs_smoke trains them
        c = dataset_info(cfg["data"]["name"]).num_classes
        key = (repr(cfg["method"]), c)
        if key in done:
            continue
        done.add(key)
        method = create_method(cfg["method"], num_classes=c)
        s = torch.randn(6, c, generator=gen, requires_grad=True)
        t = torch.randn(6, c, generator=gen) if "teacher" in cfg else None
        assert (t is not None) == method.needs_teacher, rel(p)
        y = torch.randint(0, c, (6,), generator=gen)
        views = {v: (ModelOutput(torch.randn(6, c, generator=gen)),  # e.g. MLKD's strong view
                     ModelOutput(torch.randn(6, c, generator=gen))) for v in method.extra_views}
        teacher = None if t is None else ModelOutput(t)
        out = method(Batch(ModelOutput(s), teacher, y, 1.0, views=views))
        assert torch.isfinite(out.total), rel(p)
        out.total.backward()
        assert s.grad is not None and torch.isfinite(s.grad).all()
