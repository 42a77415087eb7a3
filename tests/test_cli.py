import json
from pathlib import Path

import pytest
import yaml

from test_engine_common import (
    config_dict,
    make_cifar100,
    tinynet_registered,  # noqa: F401 (autouse fixture)
)
from topkd import __version__, cli


@pytest.fixture
def cfg_file(tmp_path) -> Path:
    make_cifar100(tmp_path / "data")
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(config_dict(tmp_path, name="cli", train={"epochs": 2})))
    return p


@pytest.mark.parametrize("cmd, expect", [
    ([], ["train", "distill", "eval", "methods", "transfer", "report", "demo"]),
    (["train"], ["--resume", "--seeds", "--output-dir", "--device", "optim.lr", "train.amp",
                 "one of {none, bf16, fp16}", "method.name", "data.val_fraction"]),
    (["distill"], ["--resume", "teacher.checkpoint", "train.teacher_cache", "method.name",
                   "topkd methods NAME"]),
    (["methods"], ["--markdown", "NAME"]),
    (["eval"], ["--json", "--model", "--dataset", "--config", "--split"]),
    (["transfer"], ["usage: topkd transfer"]),
    (["report"], ["usage: topkd report"]),
    (["demo"], ["usage: topkd demo"]),
])
def test_help_of_every_command(capsys, cmd, expect):
    with pytest.raises(SystemExit) as e:
        cli.main([*cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for s in expect:
        assert s in out, s


def test_distill_without_a_distillation_term_is_an_error(capsys, cfg_file):
    # the config's method is plain CE: 'topkd distill' would silently train CE for the schedule
    assert cli.main(["distill", str(cfg_file)]) == 2
    err = capsys.readouterr().err
    assert "'topkd distill' distils from a teacher, but method 'ce' has no distillation term" \
        in err and "Traceback" not in err


def test_version(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out.strip() == f"topkd {__version__}"


@pytest.mark.parametrize("args, match", [
    (["train.amp=fp8"], "invalid value for 'train.amp': 'fp8'; expected one of {none, bf16"),
    (["train.ampp=1"], "unknown config key 'train.ampp'; allowed keys under 'train'"),
    (["--seeds", "0,x"], "--seeds expects comma-separated integers"),
    (["method.name=kd"], "'topkd train' trains the model alone, but method 'kd' distils"),
    (["method.name=kd", "method.temprature=3"],
     "unknown key method.temprature (did you mean 'temperature'?)"),
    (["method.temperature=3"], "method.temperature is not a parameter of method 'ce' (it is one "
                               "of dkd, kd"),
    (["method.name=topkd", "method.ls=true"], "method.ls is not accepted here"),
])
def test_config_errors_are_one_clean_line(capsys, cfg_file, args, match):
    assert cli.main(["train", str(cfg_file), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("topkd: error: ") and match in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_missing_lazy_module_is_a_clean_error(capsys, monkeypatch):
    monkeypatch.setitem(cli.LAZY, "transfer", ("topkd._no_such_module", "x"))
    assert cli.main(["transfer", "a", "b"]) == 2
    assert "'topkd transfer' is unavailable: cannot import topkd._no_such_module" in \
        capsys.readouterr().err


def test_train_then_eval_matches_engine(capsys, cfg_file, tmp_path):
    assert cli.main(["train", str(cfg_file), "optim.lr=0.2", "--device", "cpu"]) == 0
    run = tmp_path / "runs" / "cli"
    summary = json.loads((run / "summary.json").read_text())
    assert "done: " in capsys.readouterr().out
    # Embedded config: no other argument needed.
    assert cli.main(["eval", str(run / "checkpoints/last.pt"), "--json", "--num-workers", "0"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n"] == 16 and res["model"] == "test_tinynet"
    assert res["acc1"] == pytest.approx(summary["last_test_acc1"])
    assert res["acc5"] == pytest.approx(summary["last_test_acc5"])
    assert res["loss"] == pytest.approx(summary["last_test_loss"], rel=1e-6)
    # Explicit model/dataset on best.pt: the best-on-test epoch (no val split here).
    assert cli.main(["eval", str(run / "checkpoints/best.pt"), "--model", "test_tinynet",
                     "--dataset", "cifar100", "--data-root", str(tmp_path / "data"),
                     "--num-workers", "0"]) == 0
    out = capsys.readouterr().out
    assert f"top-1 {summary['best_test_acc1']:.2f}" in out
    assert cli.main(["eval", str(run / "nope.pt")]) == 2


def test_multi_seed_summary(capsys, cfg_file, tmp_path):
    assert cli.main(["train", str(cfg_file), "--seeds", "0,1", "name=ms", "train.epochs=1",
                     "data.val_fraction=0.25"]) == 0
    out_dir = tmp_path / "runs" / "ms"
    s = [json.loads((out_dir / f"seed_{i}/summary.json").read_text()) for i in (0, 1)]
    assert [x["seed"] for x in s] == [0, 1]
    assert yaml.safe_load((out_dir / "seed_1/config.yaml").read_text())["seed"] == 1
    md = (out_dir / "summary.md").read_text()
    csv_text = (out_dir / "summary.csv").read_text().splitlines()
    assert csv_text[0].startswith("name,n,seeds,best_val_acc1_mean,best_val_acc1_std")
    row = dict(zip(csv_text[0].split(","), csv_text[1].split(","), strict=True))
    mean = (s[0]["test_acc1_at_best_val"] + s[1]["test_acc1_at_best_val"]) / 2
    assert float(row["test_acc1_at_best_val_mean"]) == pytest.approx(mean)
    assert row["n"] == "2" and "best test acc@1 (oracle, picked on test)" in md
    assert "## Per seed" in md and f"{mean:.2f} ±" in md
    # Resuming a finished multi-seed run trains nothing and rewrites the same summary.
    capsys.readouterr()
    assert cli.main(["train", str(cfg_file), "--seeds", "0,1", "name=ms", "train.epochs=1",
                     "data.val_fraction=0.25", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "epoch 1/1" not in out and out.count("resumed from") == 2
    assert (out_dir / "summary.md").read_text() == md


def test_resume_explicit_path(capsys, cfg_file, tmp_path):
    assert cli.main(["train", str(cfg_file), "name=a", "train.epochs=1"]) == 0
    last = tmp_path / "runs/a/checkpoints/last.pt"
    capsys.readouterr()
    assert cli.main(["train", str(cfg_file), "name=a", "train.epochs=2", f"--resume={last}"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "epoch 2/2" in out and "epoch 1/2" not in out
    assert json.loads((tmp_path / "runs/a/summary.json").read_text())["epochs"] == 2
    assert cli.main(["train", str(cfg_file), "--resume", str(tmp_path / "x.pt")]) == 2
    assert "resume checkpoint not found" in capsys.readouterr().err
