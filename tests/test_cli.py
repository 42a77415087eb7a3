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
                 "one of {auto, none, bf16, fp16}", "method.name", "data.val_fraction"]),
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


def test_the_usage_summary_shows_every_command(capsys):
    """``topkd --help``'s synopsis has a line for each subcommand, not only the first four."""
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    synopsis = out.split("positional arguments")[0]
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    for name in sub.choices:
        assert f"    topkd {name} " in synopsis, name


@pytest.mark.parametrize("cmd", [[], ["train"], ["distill"], ["eval"], ["transfer"],
                                 ["report"], ["demo"], ["methods"]])
def test_help_is_plain_text(capsys, cmd):
    """No reST markup (``x``, :func:) and no pointer to commands that do not exist."""
    with pytest.raises(SystemExit):
        cli.main([*cmd, "--help"])
    out = capsys.readouterr().out
    for markup in ("``", ":func:", ":class:", ":data:", ":mod:", "topkd models"):
        assert markup not in out, (cmd, markup)


def test_eval_workers_follow_the_config_and_the_cores(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(cli.os, "cpu_count", lambda: 2)
    cfg = SimpleNamespace(data=SimpleNamespace(num_workers=0))
    assert cli.eval_workers(None, cfg) == 0  # the checkpoint's config says 0
    assert cli.eval_workers(None, None) == 2  # default 4, but only 2 cores
    assert cli.eval_workers(8, None) == 2 and cli.eval_workers(1, cfg) == 1


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
    (["train.amp=fp8"], "invalid value for 'train.amp': 'fp8'; expected one of {auto, none, bf16"),
    (["train.ampp=1"], "unknown config key 'train.ampp'; allowed keys under 'train'"),
    (["--seeds", "0,x"], "--seeds expects comma-separated integers"),
    (["method.name=kd"], "'topkd train' trains the model alone, but method 'kd' distils"),
    (["method.name=kd", "method.temprature=3"],
     "unknown key method.temprature (did you mean 'temperature'?)"),
    (["method.temperature=3"], "method.temperature is not a parameter of method 'ce' (it is one "
                               "of dkd, "),
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
    # No val split here: best.pt only with the explicit, labelled oracle option.
    assert cli.main(["train", str(cfg_file), "optim.lr=0.2", "--device", "cpu",
                     "train.best_on=test"]) == 0
    run = tmp_path / "runs" / "cli"
    summary = json.loads((run / "summary.json").read_text())
    out = capsys.readouterr().out
    assert "note: best.pt is picked on the TEST split (train.best_on=test): an oracle" in out
    assert f"done: {run}: last-epoch test acc@1 {summary['last_test_acc1']:.2f} (no validation " \
        f"split); best.pt picked on TEST (train.best_on=test, an oracle): " \
        f"{summary['best_test_acc1']:.2f}" in out
    assert summary["best_on"] == "test"
    # Embedded config: no other argument needed.
    assert cli.main(["eval", str(run / "checkpoints/last.pt"), "--json", "--num-workers", "0"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n"] == 16 and res["model"] == "test_tinynet"
    assert res["acc1"] == pytest.approx(summary["last_test_acc1"])
    assert res["acc5"] == pytest.approx(summary["last_test_acc5"])
    assert res["loss"] == pytest.approx(summary["last_test_loss"], rel=1e-6)
    # Explicit model/dataset on best.pt: the best-on-test epoch (train.best_on=test).
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


@pytest.mark.parametrize("damage", ["empty", "truncated", "random"])
def test_eval_of_damaged_checkpoint_is_one_line(capsys, cfg_file, tmp_path, damage):
    import os

    assert cli.main(["train", str(cfg_file), "train.epochs=1"]) == 0
    good = (tmp_path / "runs/cli/checkpoints/last.pt").read_bytes()
    bad = tmp_path / "bad.pt"
    bad.write_bytes({"empty": b"", "truncated": good[: len(good) // 2],
                     "random": os.urandom(1000)}[damage])
    for extra in ([], ["--model", "test_tinynet", "--dataset", "cifar100"]):
        capsys.readouterr()
        assert cli.main(["eval", str(bad), "--num-workers", "0", *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("topkd: error: ") and f"{bad} is truncated or corrupt" in err
        assert "Traceback" not in err and err.count("\n") == 1


@pytest.mark.parametrize("blocked", ["output_dir", "checkpoints"])
def test_unwritable_output_dir_is_checked_first(capsys, cfg_file, tmp_path, blocked):
    """A file where the run directory (or its checkpoints/) must go: one line, before the data
    is even looked at (data.root points nowhere here, and that is not what is reported)."""
    (tmp_path / "blocker").write_text("x")
    if blocked == "output_dir":
        args = [f"output_dir={tmp_path / 'blocker'}"]
        blocker = tmp_path / "blocker"
    else:
        (tmp_path / "out/cli").mkdir(parents=True)
        (tmp_path / "out/cli/checkpoints").write_text("x")
        args = ["--output-dir", str(tmp_path / "out")]
        blocker = tmp_path / "out/cli/checkpoints"
    assert cli.main(["train", str(cfg_file), *args, f"data.root={tmp_path / 'nowhere'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("topkd: error: cannot write the run directory") and \
        f"{blocker} exists and is not a directory" in err, err
    assert "Traceback" not in err and err.count("\n") == 1


def test_eval_set_applies_to_the_embedded_config_or_is_an_error(capsys, cfg_file, tmp_path):
    import torch

    assert cli.main(["train", str(cfg_file), "train.epochs=1"]) == 0
    last = tmp_path / "runs/cli/checkpoints/last.pt"
    capsys.readouterr()
    # applied: the embedded config's data.root is overridden (and then not found)
    assert cli.main(["eval", str(last), "--num-workers", "0", "--set",
                     f"data.root={tmp_path / 'nowhere'}"]) == 2
    assert str(tmp_path / "nowhere") in capsys.readouterr().err
    plain = tmp_path / "plain.pt"  # a bare state_dict embeds no config
    torch.save(torch.load(last, weights_only=True)["model"], plain)
    assert cli.main(["eval", str(plain), "--model", "test_tinynet", "--dataset", "cifar100",
                     "--set", "data.batch_size=8"]) == 2
    err = capsys.readouterr().err
    assert "--set data.batch_size=8: there is no config to override" in err
    assert "Traceback" not in err and err.count("\n") == 1


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_one_line(capsys, cfg_file):
    assert cli.main(["train", str(cfg_file), "train.device=cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("topkd: error: train.device='cuda' but CUDA is not available")
    assert "Traceback" not in err and err.count("\n") == 1


def test_interrupted_training_points_to_resume(capsys, cfg_file, monkeypatch):
    import topkd.engine.run

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(topkd.engine.run, "run_training", interrupted)
    assert cli.main(["train", str(cfg_file)]) == 130
    err = capsys.readouterr().err
    assert err == ("topkd: error: interrupted; checkpoints/last.pt holds the last finished epoch: "
                   "run the same command with --resume to continue\n")


def test_eval_strict_mismatch_suggests_the_cli_flag(capsys, cfg_file, tmp_path):
    assert cli.main(["train", str(cfg_file), "train.epochs=1"]) == 0
    last = str(tmp_path / "runs/cli/checkpoints/last.pt")
    capsys.readouterr()
    other = ["--model", "test_tinynet", "--model-kwargs", "{width: 4}", "--dataset", "cifar100",
             "--data-root", str(tmp_path / "data"), "--num-workers", "0"]
    assert cli.main(["eval", last, *other]) == 2
    err = capsys.readouterr().err
    assert "shape mismatch" in err and "--no-strict loads the matching tensors only" in err
    assert "strict=False" not in err and "Traceback" not in err
    assert cli.main(["eval", last, *other, "--no-strict"]) == 0
    assert "skipped: 0 missing, 0 unexpected, 3 shape-mismatched" in capsys.readouterr().out
