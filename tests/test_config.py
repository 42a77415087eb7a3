from pathlib import Path

import pytest
import yaml

from topkd.config import Config, ConfigError, load_config
from topkd.methods import MethodParams, method_name


def _write(p: Path, data) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return p


@pytest.fixture
def tree(tmp_path):
    """base/cifar.yaml <- pairs/p.yaml ; methods/kd.yaml ; exp/run.yaml composes all three."""
    _write(tmp_path / "base/common.yaml", {"seed": 7, "train": {"epochs": 240, "log_every": 10}})
    _write(tmp_path / "base/cifar.yaml", {
        "defaults": ["common.yaml"],
        "data": {"name": "cifar100", "batch_size": 64, "kwargs": {"a": 1}},
        "sched": {"milestones": [150, 180, 210]}})
    _write(tmp_path / "pairs/p.yaml", {"model": {"name": "resnet8x4"},
                                       "teacher": {"name": "resnet32x4", "checkpoint": "t.pt"}})
    _write(tmp_path / "methods/kd.yaml", {"method": {"name": "kd", "ce": 0.1,
                                                           "kd_weight": 0.9}})
    return _write(tmp_path / "exp/run.yaml", {
        "defaults": ["../base/cifar.yaml", "../pairs/p.yaml", "../methods/kd.yaml"],
        "name": "exp", "data": {"kwargs": {"b": 2}}, "train": {"epochs": 5}})


def test_defaults_composition_deep_merge(tree):
    cfg = load_config(tree)
    assert cfg.name == "exp" and cfg.seed == 7  # from a default of a default
    assert cfg.train.epochs == 5 and cfg.train.log_every == 10  # file beats its defaults
    assert cfg.data.kwargs == {"a": 1, "b": 2}  # mappings merge recursively
    assert cfg.teacher.checkpoint == "t.pt" and cfg.model.name == "resnet8x4"
    assert isinstance(cfg.method, MethodParams) and method_name(cfg.method) == "kd"
    assert cfg.method.ce == 0.1
    assert cfg.sched.milestones == [150, 180, 210] and cfg.optim.betas == (0.9, 0.999)


def test_overrides_are_typed(tree):
    cfg = load_config(tree, ["optim.lr=0.1", "train.amp=bf16", "sched.milestones=[30,60]",
                             "method.temperature=2", "data.kwargs.resize=32", "teacher.checkpoint=",
                             "optim.weight_decay=5e-4", "train.grad_clip=null", "seed=3",
                             "optim.betas=[0.8,0.9]", "name=123"])
    assert cfg.optim.lr == 0.1 and isinstance(cfg.optim.lr, float)
    assert cfg.train.amp == "bf16" and cfg.sched.milestones == [30, 60]
    assert cfg.data.kwargs["resize"] == 32 and cfg.teacher.checkpoint is None
    assert cfg.optim.weight_decay == 5e-4  # YAML 1.1 reads "5e-4" as a string: coerced
    assert cfg.seed == 3 and cfg.optim.betas == (0.8, 0.9) and cfg.name == "123"
    assert method_name(cfg.method) == "kd" and cfg.method.temperature == 2.0


def test_method_name_override_starts_from_that_methods_defaults(tree):
    # The file's kd parameters (kd_weight...) do not belong to dkd: switching the method on the
    # command line starts afresh from dkd's reference defaults, whatever the override order.
    for ovs in (["method.name=dkd", "method.temperature=2"],
                ["method.temperature=2", "method.name=dkd"]):
        cfg = load_config(tree, ovs)
        assert method_name(cfg.method) == "dkd"
        assert (cfg.method.beta, cfg.method.ce, cfg.method.warmup) == (8.0, 1.0, 20.0)
        assert cfg.method.temperature == 2.0
    # the same name keeps the file's parameters
    cfg = load_config(tree, ["method.name=kd"])
    assert cfg.method.ce == 0.1 and cfg.method.kd_weight == 0.9
    # a config without a method section (plain CE) switched to a distillation method
    p = _write(tree.parent / "c.yaml", {"name": "x"})
    assert method_name(load_config(p, ["method.name=kd"]).method) == "kd"
    assert method_name(load_config(p).method) == "ce"


@pytest.mark.parametrize("override, match", [
    ("train.ampp=bf16", r"unknown config key 'train.ampp'; allowed keys under 'train': "
                        r"epochs, amp, .*sync_bn"),
    ("foo=1", r"unknown config key 'foo'; allowed keys: name, output_dir, seed"),
    ("train.amp=fp8",
     r"invalid value for 'train.amp': 'fp8'; expected one of \{auto, none, bf16, fp16\}"),
    ("train.epochs=abc", r"invalid value for 'train.epochs': 'abc'; expected int"),
    ("train.epochs=1.5", r"'train.epochs': 1.5; expected int"),
    ("train.channels_last=maybe", r"'train.channels_last': 'maybe'; expected bool"),
    ("optim.name=adam", r"expected one of \{sgd, adamw, dot\}"),
    ("sched.milestones=5", r"'sched.milestones': 5; expected list\[int\]"),
    ("sched.milestones=[a]", r"'sched.milestones\[0\]': 'a'; expected int"),
    ("optim.betas=[0.9]", r"'optim.betas'.*expected tuple\[float, float\]"),
    ("train.grad_clip=x", r"'train.grad_clip': 'x'; expected float or null"),
    ("train.epochs.x=1", r"'train.epochs' is a value, not a section"),
    ("train.epochs", r"must look like key.sub=value"),
    ("method.xyz=3", r"unknown key method.xyz; allowed keys: ce, warmup, ignore_index, kd_weight"),
    ("method.temprature=3", r"unknown key method.temprature \(did you mean 'temperature'\?\)"),
    ("method.gamma=3", r"method.gamma.*section method.tsm: set method.tsm.gamma"),
    ("method.name=foo", r"method.name: unknown method 'foo'"),
    ("method.temperature=0", r"'method.temperature': 0.0; expected a number > 0"),
    ("method.k=3", r"method.k=3 has no effect here: it applies only when tsm or tdl is set"),
    ("method.tsm.gama=1", r"unknown key method.tsm.gama \(did you mean 'gamma'\?\)"),
    ("loss.ce=1", r"unknown config key 'loss'; allowed keys: name, .*method"),
    ("data.val_fraction=1.5", r"'data.val_fraction': 1.5; expected a float in \[0, 1\)"),
    ("train.device=gpu", r"'train.device': 'gpu'; expected auto, cpu, cuda, cuda:N or mps"),
    ("train.epochs=0", r"'train.epochs': 0; expected an integer >= 1"),
])
def test_override_errors_name_key_and_allowed(tree, override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(tree, [override])


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    _write(tmp_path / "a.yaml", {"defaults": ["b.yaml"]})
    _write(tmp_path / "b.yaml", {"defaults": ["a.yaml"]})
    with pytest.raises(ConfigError, match="cyclic 'defaults:'"):
        load_config(tmp_path / "a.yaml")
    _write(tmp_path / "c.yaml", {"defaults": ["missing.yaml"]})
    with pytest.raises(ConfigError, match=r"missing.yaml \(listed in 'defaults:' of .*c.yaml\)"):
        load_config(tmp_path / "c.yaml")
    _write(tmp_path / "d.yaml", {"data": {"batchsize": 3}})
    with pytest.raises(ConfigError, match="unknown config key 'data.batchsize'"):
        load_config(tmp_path / "d.yaml")


def test_roundtrip_and_save(tree, tmp_path):
    cfg = load_config(tree, ["train.amp=fp16"])
    d = cfg.to_dict()
    assert set(d) == {"name", "output_dir", "seed", "deterministic", "data", "model", "teacher",
                      "method", "optim", "sched", "train"}
    assert Config.from_dict(d) == cfg
    out = tmp_path / "resolved.yaml"
    cfg.save(out)
    assert load_config(out) == cfg
    text = out.read_text()
    assert "milestones: [150, 180, 210]" in text and "amp: fp16" in text
    assert cfg.run_dir == Path("runs") / "exp"


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _shipped_run_configs() -> list[Path]:
    """Every shipped YAML that defines a dataset (base recipes and runnable leaves); method
    files and per-pair overrides are fragments (they may set a few data keys, never a dataset)."""
    from topkd.config import load_raw

    fragments = ("methods", "pair_overrides")
    return [p for p in sorted(CONFIGS.rglob("*.yaml"))
            if p.relative_to(CONFIGS).parts[0] not in fragments and "data" in load_raw(p)]


def test_every_shipped_config_holds_out_a_validation_split():
    """best.pt and the summary's headline number are picked on held-out data, never on test."""
    paths = _shipped_run_configs()
    assert len(paths) > 100  # the leaves are there
    for p in paths:
        cfg = load_config(p)
        rel = p.relative_to(CONFIGS)
        assert cfg.data.val_fraction > 0, rel
        assert cfg.train.best_on in ("auto", "val"), rel


def test_best_on_is_validated():
    with pytest.raises(ConfigError, match="train.best_on=val needs a validation split"):
        Config.from_dict({"train": {"best_on": "val"}})
    with pytest.raises(ConfigError, match=r"'train.best_on': 'best'; expected one of \{auto, "):
        Config.from_dict({"train": {"best_on": "best"}})
    assert Config.from_dict({"train": {"best_on": "test"}}).train.best_on == "test"
    assert Config.from_dict({"data": {"val_fraction": 0.1},
                             "train": {"best_on": "val"}}).train.best_on == "val"
