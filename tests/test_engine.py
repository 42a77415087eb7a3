import hashlib
import json
import math

import pytest
import torch
import yaml

from test_engine_common import (
    read_metrics,
    tiny_config,
    tinynet_registered,  # noqa: F401 (autouse fixture)
)
from topkd.checkpoints import load_weights
from topkd.config import ConfigError, SchedConfig
from topkd.engine import CKPT_FORMAT, LRSchedule, NonFiniteLossError, Trainer
from topkd.engine.summary import aggregate_runs, format_markdown
from topkd.models import create_model

FAMILIES = {  # method section -> loss terms that must appear in metrics.csv
    "kd": ({"name": "kd"}, ["kd"]),
    "dkd": ({"name": "dkd"}, ["dkd"]),
    "kd+ls": ({"name": "kd", "ls": True, "temperature": 2.0, "kd_weight": 9.0}, ["kd"]),
    "topkd": ({"name": "topkd"}, ["topkd", "topkd_con", "topkd_tdl"]),
    "kd+tsm+tdl": ({"name": "kd", "tsm": {}, "tdl": {}}, ["kd", "tdl", "tsm_corrected"]),
    "dkd+tsm+tdl": ({"name": "dkd", "tsm": {}, "tdl": {}}, ["dkd", "tdl", "tsm_corrected"]),
}


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teacher")
    cfg = tiny_config(tmp, name="teacher", model={"name": "test_tinynet", "kwargs": {"width": 16}},
                      data={"val_fraction": 0.25}, train={"epochs": 3})
    summary = Trainer(cfg, "train").fit()
    return tmp, cfg, summary


def test_train_run_writes_run_dir(teacher_run):
    tmp, cfg, summary = teacher_run
    run = cfg.run_dir
    for f in ("config.yaml", "env.json", "metrics.csv", "summary.json",
              "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run / f).is_file(), f
    assert any((run / "tb").iterdir())
    assert yaml.safe_load((run / "config.yaml").read_text()) == cfg.to_dict()
    env = json.loads((run / "env.json").read_text())
    assert env["seed"] == 0 and env["topkd_version"] and env["torch"] == torch.__version__
    assert env["mode"] == "train" and "hostname" in env and "git_hash" in env
    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert list(rows[0]) == ["epoch", "lr", "train_loss", "train_ce", "train_acc1", "val_acc1",
                             "test_acc1", "test_acc5", "test_loss", "epoch_time_s",
                             "images_per_s"]
    # 32 train images, val 25 % -> 24 train = 2 steps of 16 (last one 8); lr decays after ep 2
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.05, 0.05, 0.005])
    assert all(float(r["train_loss"]) == pytest.approx(float(r["train_ce"])) for r in rows)
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk == summary
    vals = [float(r["val_acc1"]) for r in rows]
    tests = [float(r["test_acc1"]) for r in rows]
    best = max(range(3), key=lambda i: (vals[i], -i))
    assert summary["best_val_acc1"] == pytest.approx(vals[best])
    assert summary["best_val_epoch"] == best + 1
    assert summary["test_acc1_at_best_val"] == pytest.approx(tests[best])
    assert summary["last_test_acc1"] == pytest.approx(tests[-1])
    assert summary["best_test_acc1"] == pytest.approx(max(tests))
    ck = torch.load(run / "checkpoints/last.pt", weights_only=True)
    assert ck["format"] == CKPT_FORMAT and ck["epoch"] == 3 and ck["global_step"] == 6
    # best.pt is in the checkpoints format and holds the best-val epoch's weights
    m = create_model("test_tinynet", 100, width=16)
    res = load_weights(m, run / "checkpoints/best.pt", verbose=False)
    assert res.meta["epoch"] == best + 1


def test_summary_aggregation(teacher_run):
    _, cfg, summary = teacher_run
    rows = aggregate_runs([cfg.run_dir])
    assert rows[0]["name"] == "teacher" and rows[0]["n"] == 1
    assert rows[0]["last_test_acc1_mean"] == pytest.approx(summary["last_test_acc1"])
    assert rows[0]["last_test_acc1_std"] == 0.0
    assert "oracle" in format_markdown(rows)


@pytest.mark.parametrize("preset", list(FAMILIES))
def test_distill_each_family(teacher_run, tmp_path, preset):
    tmp, tcfg, _ = teacher_run
    cfg = tiny_config(tmp_path, name=f"d_{preset}", method=FAMILIES[preset][0],
                      teacher={"name": "test_tinynet", "kwargs": {"width": 16},
                               "checkpoint": str(tcfg.run_dir / "checkpoints/best.pt")},
                      train={"epochs": 1, "log_every": 1})
    tr = Trainer(cfg, "distill")
    assert tr.teacher is not None and not tr.teacher.training
    assert all(not p.requires_grad for p in tr.teacher.parameters())
    before = {k: v.clone() for k, v in tr.teacher.state_dict().items()}
    w0 = tr.model.fc.weight.detach().clone()
    summary = tr.fit()
    assert summary["mode"] == "distill" and summary["epochs"] == 1
    assert all(torch.equal(before[k], v) for k, v in tr.teacher.state_dict().items())
    assert not torch.equal(w0, tr.model.fc.weight)
    (row,) = read_metrics(cfg.run_dir)
    for term in ["ce", *FAMILIES[preset][1]]:
        v = float(row[f"train_{term}"])
        assert math.isfinite(v), term
    for term in FAMILIES[preset][1]:
        if term != "tsm_corrected":
            assert float(row[f"train_{term}"]) > 0, term
    assert 0 <= float(row["test_acc1"]) <= 100 and float(row["images_per_s"]) > 0


def test_distill_from_last_pt_and_errors(teacher_run, tmp_path):
    tmp, tcfg, _ = teacher_run
    teacher = {"name": "test_tinynet", "kwargs": {"width": 16},
               "checkpoint": str(tcfg.run_dir / "checkpoints/last.pt")}
    cfg = tiny_config(tmp_path, method={"name": "kd"}, teacher=teacher,
                      train={"epochs": 1, "max_steps_per_epoch": 1})
    assert Trainer(cfg, "distill").fit()["epochs"] == 1  # full training state file works too
    with pytest.raises(ConfigError, match="'topkd train' trains the model alone"):
        Trainer(cfg, "train")
    bad = tiny_config(tmp_path, method={"name": "kd"}, teacher={"name": "test_tinynet"})
    with pytest.raises(ConfigError, match="needs teacher.name and teacher.checkpoint"):
        Trainer(bad, "distill")
    bad = tiny_config(tmp_path, method={"name": "kd"},
                      teacher={"name": "test_tinynet", "checkpoint": str(tmp_path / "x.pt")})
    with pytest.raises(ConfigError, match=r"teacher.checkpoint not found: .*x\.pt \(train the "
                                          r"teacher first, or .* teacher\.checkpoint=PATH\)"):
        Trainer(bad, "distill")
    with pytest.raises(ConfigError, match="model: unknown model 'nonet'"):
        Trainer(tiny_config(tmp_path, model={"name": "nonet"}), "train")


def _on_each_step(tr, fn) -> None:
    """Route the method's output of training step n (1-based) through ``fn(n, out)``."""
    real, calls = tr.method.forward, {"n": 0}

    def wrapped(batch):
        calls["n"] += 1
        return fn(calls["n"], real(batch))

    tr.method.forward = wrapped


def test_non_finite_loss_stops_and_keeps_last_pt(tmp_path):
    cfg = tiny_config(tmp_path, train={"epochs": 3, "log_every": 50})
    tr = Trainer(cfg, "train")

    def poisoned(n, out):
        if n == 3:  # global step 3 = epoch 2, first step
            out.total = out.total * float("nan")
        return out

    _on_each_step(tr, poisoned)
    with pytest.raises(NonFiniteLossError,
                       match=r"global step 3 \(epoch 2\): total=nan, ce=[0-9.]+.*last.pt"):
        tr.fit()
    ck = torch.load(cfg.run_dir / "checkpoints/last.pt", weights_only=True)
    assert ck["epoch"] == 1  # epoch 2 was never saved
    assert [r["epoch"] for r in read_metrics(cfg.run_dir)] == ["1"]
    assert not (cfg.run_dir / "summary.json").exists()


def test_diverged_logits_are_caught_on_device_without_per_step_sync(tmp_path):
    """NaN *logits* (diverged weights) are caught by the engine's on-device tracking, which is
    why the engine builds its method with validate=False (no host sync per step)."""
    cfg = tiny_config(tmp_path, train={"epochs": 3, "log_every": 50})
    tr = Trainer(cfg, "train")
    assert tr.method.validate is False
    calls = {"n": 0}

    def poison_logits(module, inputs, out):
        if not module.training:  # evaluation forwards do not count as steps
            return out
        calls["n"] += 1
        return out * float("nan") if calls["n"] == 3 else out  # global step 3 = epoch 2

    tr.model.register_forward_hook(poison_logits)
    with pytest.raises(NonFiniteLossError, match=r"global step 3 \(epoch 2\): total=nan"):
        tr.fit()
    ck = torch.load(cfg.run_dir / "checkpoints/last.pt", weights_only=True)
    assert ck["epoch"] == 1


def test_a_step_failing_on_weights_a_nan_gradient_wrote_is_reported_as_divergence(tmp_path):
    """A finite loss with a NaN gradient (kdsvd's SVD gradient at repeated singular values)
    poisons the weights; the next step fails in some downstream op (an SVD of NaN features).
    The engine names the cause instead of the downstream error."""
    cfg = tiny_config(tmp_path, train={"epochs": 2, "log_every": 50})
    tr = Trainer(cfg, "train")

    def nan_grad_then_fail(n, out):
        if n == 2:  # finite value, NaN gradient: sqrt at 0 times 0
            z = torch.zeros((), requires_grad=True) + 0.0 * out.total
            out.total = out.total + 0.0 * torch.sqrt(z)
        if n == 3:
            raise RuntimeError("linalg.svd: the input matrix contained non-finite values")
        return out

    _on_each_step(tr, nan_grad_then_fail)
    with pytest.raises(NonFiniteLossError, match=r"step 3 \(epoch 2\) failed \(RuntimeError: "
                       r"linalg.svd.*non-finite weights .* with a finite loss.*"
                       r"method.svd_grad=safe avoids") as info:
        tr.fit()
    assert isinstance(info.value.__cause__, RuntimeError)
    # an error on healthy weights is left as it is
    tr2 = Trainer(tiny_config(tmp_path / "b", train={"epochs": 1}), "train")

    def fail(batch):
        raise RuntimeError("unrelated")

    tr2.method.forward = fail
    with pytest.raises(RuntimeError, match="^unrelated$"):
        tr2.fit()


def test_lr_schedule():
    ms = LRSchedule(SchedConfig(name="multistep", milestones=[2, 3], gamma=0.1), 1.0, 4, 10)
    assert [ms(e, 5) for e in range(4)] == pytest.approx([1, 1, 0.1, 0.01])
    cos = LRSchedule(SchedConfig(name="cosine", warmup_epochs=1, min_lr=0.0), 1.0, 3, 4)
    assert [cos(0, s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert cos(1, 0) == pytest.approx(1.0) and cos(2, 0) == pytest.approx(0.5)
    assert cos(2, 3) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.875)))
    const = LRSchedule(SchedConfig(name="constant"), 0.3, 5, 2)
    assert const(4, 1) == 0.3


def test_teacher_cache_matches_online_distillation(teacher_run, tmp_path):
    from topkd.cache import build_cache
    from topkd.checkpoints import load_teacher
    from topkd.data import get_dataset

    tmp, tcfg, _ = teacher_run
    ckpt = str(tcfg.run_dir / "checkpoints/best.pt")
    teacher_sec = {"name": "test_tinynet", "kwargs": {"width": 16}, "checkpoint": ckpt}
    online = tiny_config(tmp_path, name="online", method={"name": "kd"}, teacher=teacher_sec)
    Trainer(online, "distill").fit()

    teacher = load_teacher("test_tinynet", 100, ckpt, verbose=False, width=16)
    train = get_dataset("cifar100", online.data.root, "train", augment=False)
    cache = build_cache(teacher, train, tmp_path / "cache", views=1, augment=None,
                        dtype="float32", progress=False, teacher_name="test_tinynet",
                        checkpoint=ckpt, dataset_name="cifar100")
    cached = tiny_config(tmp_path, name="cached", method={"name": "kd"}, teacher=teacher_sec,
                         train={"teacher_cache": str(cache)})
    tr = Trainer(cached, "distill")
    assert tr.teacher is None  # the teacher is never built
    tr.fit()
    a = torch.load(online.run_dir / "checkpoints/last.pt", weights_only=True)["model"]
    b = torch.load(cached.run_dir / "checkpoints/last.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
    ra, rb = read_metrics(online.run_dir), read_metrics(cached.run_dir)
    assert [float(r["train_kd"]) for r in ra] == \
        pytest.approx([float(r["train_kd"]) for r in rb], abs=1e-5)
    # both record which teacher weights they distilled from: the same ones (names and bytes)
    h = hashlib.sha256()
    for k, v in torch.load(ckpt, weights_only=True)["model"].items():
        h.update(k.encode() + v.contiguous().numpy().tobytes())
    want = h.hexdigest()
    for run in (online, cached):
        env = json.loads((run.run_dir / "env.json").read_text())
        assert env["teacher_weights_sha256"] == want
        last = torch.load(run.run_dir / "checkpoints/last.pt", weights_only=True)
        assert last["teacher_weights_sha256"] == want
    assert "teacher_weights_sha256" not in json.loads((tcfg.run_dir / "env.json").read_text())


def test_adamw_cosine_warmup_clip_and_step_cap(tmp_path):
    cfg = tiny_config(tmp_path, optim={"name": "adamw", "lr": 1e-3, "weight_decay": 0.05},
                      sched={"name": "cosine", "warmup_epochs": 1, "min_lr": 1e-5},
                      data={"batch_size": 8},
                      train={"epochs": 2, "grad_clip": 1.0, "max_steps_per_epoch": 2})
    tr = Trainer(cfg, "train")
    assert isinstance(tr.optimizer, torch.optim.AdamW) and tr.steps_per_epoch == 2
    tr.fit()
    rows = read_metrics(cfg.run_dir)
    assert [float(r["lr"]) for r in rows] == pytest.approx([5e-4, 1e-3])  # warm-up, then peak
    assert tr.global_step == 4
    with pytest.warns(UserWarning, match="already holds a run"):
        Trainer(cfg, "train").fit(max_epochs=1)


def test_bench_step_throughput():
    from topkd.engine.bench import step_throughput

    r = step_throughput("test_tinynet", "test_tinynet", "kd", batch=4, steps=1, warmup=0)
    assert r["images_per_s"] > 0 and math.isfinite(r["loss_value"])
    assert step_throughput("test_tinynet", "test_tinynet", "ce", batch=4, steps=1,
                           warmup=0)["loss"] == "ce"


def test_teacher_checkpoint_of_another_architecture_is_a_config_error(teacher_run, tmp_path):
    _, tcfg, _ = teacher_run
    cfg = tiny_config(tmp_path, method={"name": "kd"},
                      teacher={"name": "test_tinynet",  # width 8: the file has width 16
                               "checkpoint": str(tcfg.run_dir / "checkpoints/best.pt")})
    with pytest.raises(ConfigError, match="teacher: checkpoint .* does not match"):
        Trainer(cfg, "distill")


def test_train_subset_progress_callback_and_quiet(tmp_path, capsys):
    """data.train_subset: a fixed subset (same for every seed); progress= and quiet= hooks."""
    import dataclasses

    from topkd.engine.data import build_datasets

    cfg = tiny_config(tmp_path, name="sub", data={"val_fraction": 0.25, "train_subset": 10},
                      train={"epochs": 2})
    full = build_datasets(dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, train_subset=None))).train
    seen: list[int] = []
    tr = Trainer(cfg, "train", progress=seen.append, quiet=True)
    assert len(full) == 24 and len(tr.train_ds) == 10
    other = Trainer(dataclasses.replace(cfg, seed=1), "train", run_dir=tmp_path / "s1")
    assert tr.train_ds.indices == other.train_ds.indices  # fixed by data.val_seed, not seed
    assert sorted(tr.train_ds.indices) == tr.train_ds.indices
    capsys.readouterr()
    tr.fit()
    assert sum(seen) == 2 * 10  # images, every step
    assert "epoch 1/2" not in capsys.readouterr().out  # quiet: no per-epoch line
    assert len(read_metrics(cfg.run_dir)) == 2 and (cfg.run_dir / "summary.json").is_file()
    with pytest.raises(ConfigError, match="data.train_subset"):
        tiny_config(tmp_path, data={"train_subset": 0})


def test_engine_gives_methods_the_feature_taps_they_ask_for(tmp_path):
    """A method declaring taps gets exactly the tapped features of student and teacher (the
    teacher's without grad), and the student's features carry the gradient."""
    from dataclasses import dataclass

    from topkd.checkpoints import save_weights
    from topkd.methods import METHODS, Method, MethodParams, param, register_method
    from topkd.models import create_model
    from topkd.models.features import FeatureTaps

    seen = {}

    @dataclass(frozen=True)
    class _P(MethodParams):
        w: float = param(1.0, "weight", check="pos")

    @register_method("test_tapmse")
    class _TapMSE(Method):
        """Test method: MSE between the pooled features of student and teacher."""

        Params = _P
        paper = code = "test"
        student_taps = ("pooled_feat", "feats")
        teacher_taps = ("pooled_feat",)

        def distill(self, batch, terms):
            s, t = batch.student.feats["pooled_feat"], batch.teacher.feats["pooled_feat"]
            seen.update(s=s.detach().clone(), t=t, s_grad=s.requires_grad,
                        feats=len(batch.student.feats["feats"]),
                        tkeys=set(batch.teacher.feats))
            return self.params.w * (s - t).pow(2).mean()

    try:
        torch.manual_seed(0)
        teacher = create_model("resnet8", 100)
        ckpt = tmp_path / "t.pt"
        save_weights(teacher, ckpt)
        cfg = tiny_config(tmp_path, model={"name": "resnet8"}, method={"name": "test_tapmse"},
                          teacher={"name": "resnet8", "checkpoint": str(ckpt)},
                          train={"epochs": 1, "max_steps_per_epoch": 1})
        tr = Trainer(cfg, "distill", quiet=True)
        tr.train_loader.sampler.set_epoch(1)  # the first batch of epoch 1
        x = next(iter(tr.train_loader))[0]
        with FeatureTaps(tr.teacher, ("pooled_feat",)) as taps:
            want_t = taps(x)[1]["pooled_feat"]
        with FeatureTaps(tr.model, ("pooled_feat",)) as taps:
            want_s = taps(x)[1]["pooled_feat"]
        tr.fit()
        assert seen["s_grad"] and not seen["t"].requires_grad
        assert seen["feats"] == 4 and seen["tkeys"] == {"pooled_feat"}
        torch.testing.assert_close(seen["t"], want_t)
        torch.testing.assert_close(seen["s"], want_s)  # before the step: the same weights
        assert float(read_metrics(cfg.run_dir)[0]["train_loss"]) > 0
    finally:
        METHODS._items.pop("test_tapmse", None)

def test_best_pt_selection_val_test_or_none(tmp_path, capsys):
    """best.pt follows train.best_on: the best-val epoch (auto with a val split), the best-test
    epoch only when asked (labelled an oracle), and no best.pt at all without a val split."""
    sections = {"train": {"epochs": 3}, "optim": {"lr": 0.2}}
    runs = {}
    for name, extra in (("auto_val", {"data": {"val_fraction": 0.25}}),
                        ("oracle", {"data": {"val_fraction": 0.25},
                                    "train": {"best_on": "test"}}),
                        ("no_val", {})):
        cfg = tiny_config(tmp_path, name=name, **{k: {**sections.get(k, {}), **extra.get(k, {})}
                                                  for k in {*sections, *extra}})
        runs[name] = (cfg, Trainer(cfg, "train").fit())
    cfg, s = runs["auto_val"]
    meta = load_weights(create_model("test_tinynet", 100), cfg.run_dir / "checkpoints/best.pt",
                        verbose=False).meta
    assert s["best_on"] == "val" and meta["selected_on"] == "val"
    assert meta["epoch"] == s["best_val_epoch"]
    cfg, s = runs["oracle"]
    meta = load_weights(create_model("test_tinynet", 100), cfg.run_dir / "checkpoints/best.pt",
                        verbose=False).meta
    assert s["best_on"] == "test" and meta["selected_on"] == "test (oracle)"
    assert meta["epoch"] == s["best_test_epoch"]
    assert s["test_acc1_at_best_val"] is not None  # the honest number is still reported
    cfg, s = runs["no_val"]
    assert s["best_on"] is None and s["test_acc1_at_best_val"] is None
    assert not (cfg.run_dir / "checkpoints/best.pt").exists()
    assert "no validation split (data.val_fraction=0): no best.pt" in capsys.readouterr().out


def test_teacher_cache_refuses_data_options_it_would_ignore(teacher_run, tmp_path):
    """With train.teacher_cache the cache's replayed augmentation and normalisation feed the
    student: data.augment and the normalisation options must agree with it, or it is an error
    (they used to be ignored silently)."""
    from topkd.cache import ReplayableCropFlip, build_cache
    from topkd.checkpoints import load_teacher
    from topkd.data import get_dataset

    tmp, tcfg, _ = teacher_run
    ckpt = str(tcfg.run_dir / "checkpoints/best.pt")
    teacher_sec = {"name": "test_tinynet", "kwargs": {"width": 16}, "checkpoint": ckpt}
    teacher = load_teacher("test_tinynet", 100, ckpt, verbose=False, width=16)
    train = get_dataset("cifar100", tmp / "data", "train", augment=False)
    caches = {aug: build_cache(teacher, train, tmp_path / f"cache_{aug}", views=2 if aug else 1,
                               augment=ReplayableCropFlip(padding=4) if aug else None,
                               progress=False, teacher_name="test_tinynet", checkpoint=ckpt,
                               dataset_name="cifar100")
              for aug in (True, False)}

    def trainer(aug_cache: bool, **data):
        cfg = tiny_config(tmp_path, method={"name": "kd"}, teacher=teacher_sec, data=data,
                          train={"teacher_cache": str(caches[aug_cache]), "epochs": 1})
        return Trainer(cfg, "distill")

    assert trainer(True, augment=True).uses_cache  # crop(32, pad 4) + flip: what it replays
    assert trainer(False, augment=False).uses_cache
    with pytest.raises(ConfigError, match=r"data.augment=false, but the cache replays augmented"):
        trainer(True, augment=False)
    with pytest.raises(ConfigError, match=r"augmentation .*RandomCrop.* would not be applied"):
        trainer(False, augment=True)
    with pytest.raises(ConfigError, match=r"normalises with mean \[0.5, 0.5, 0.5\].*the cache "):
        trainer(False, augment=False, kwargs={"mean": [0.5] * 3, "std": [0.5] * 3})
    with pytest.raises(ConfigError, match=r"not normalised .*normalize=false"):
        trainer(False, augment=False, kwargs={"normalize": False})


def test_progress_lines_without_a_terminal(tmp_path, capsys, monkeypatch):
    """No TTY (a log file): a progress line within the epoch (step, loss, ETA), so that a long
    epoch does not look like a hang; none with quiet=True."""
    import topkd.engine.trainer as trainer_mod

    monkeypatch.setattr(trainer_mod, "PROGRESS_LINE_EVERY_S", 0.0)
    cfg = tiny_config(tmp_path, train={"epochs": 1, "log_every": 1})
    Trainer(cfg, "train").fit()
    out = capsys.readouterr().out
    assert "[tiny seed 0] epoch 1/1 step 1/2 loss " in out and "epoch ETA" in out
    Trainer(cfg, "train", run_dir=tmp_path / "q", quiet=True).fit()
    assert "step 1/2" not in capsys.readouterr().out


def test_out_of_range_training_labels_are_a_config_error(tmp_path):
    """The step has no per-step label check (no host sync): the engine checks labels once at
    start, so a -100 of a user's dataset is not silently dropped by cross-entropy. (The readers
    of the official formats already refuse such files.)"""
    from torch.utils.data import Subset

    from topkd.engine.data import check_labels

    class Labelled(torch.utils.data.Dataset):
        def __init__(self, targets):
            self.targets = targets

        def __len__(self):
            return len(self.targets)

    check_labels(Subset(Labelled([0, 5, 9]), [0, 2]), 10, "mine")
    with pytest.raises(ConfigError, match=r"mine: labels must be in \[0, 10\), found -100 "
                                          r"\(.*method.ignore_index"):
        check_labels(Subset(Labelled([0, -100, 9]), [1, 2]), 10, "mine")
    with pytest.raises(ConfigError, match=r"found 10$"):
        check_labels(Labelled([0, 10]), 10, "mine")
    check_labels(Subset(Labelled([0, -100, 9]), [0, 2]), 10, "mine")  # only the used samples


def test_chance_collapse_rule():
    """Two epochs or more with train, val and test accuracy all at most 1.5 x chance."""
    from topkd.engine.trainer import chance_collapse

    def rows(*accs, val=True):
        return [{"train_acc1": a, "test_acc1": a, "train_loss": 3.6e4,
                 **({"val_acc1": a} if val else {})} for a in accs]

    why = chance_collapse(rows(9.8, 10.4), 10)
    assert why.startswith("collapsed: every epoch at chance level (train_acc1 <= 10.40, "
                          "val_acc1 <= 10.40, test_acc1 <= 10.40; chance 10.00 on 10 classes)")
    assert "last 3.6e+04" in why and "train.grad_clip" in why
    assert chance_collapse(rows(10.0), 10) is None  # one epoch says nothing yet
    assert chance_collapse(rows(10.0, 15.1), 10) is None  # learned something
    assert chance_collapse(rows(1.0, 1.4, 1.5, val=False), 100) is not None
    assert chance_collapse(rows(1.0, 1.6, 1.0), 100) is None
    r = rows(1.0, 1.0)
    r[1]["val_acc1"] = 30.0  # any split above chance: not collapsed
    assert chance_collapse(r, 100) is None


def test_a_collapsed_run_warns_records_it_and_the_cli_says_so(tmp_path, monkeypatch, capsys):
    import topkd.engine.trainer as trainer_mod
    from topkd.cli import _result_line

    seen = []

    def fake(rows, num_classes):
        seen.append((len(rows), num_classes))
        return "collapsed: test" if len(rows) >= 2 else None

    monkeypatch.setattr(trainer_mod, "chance_collapse", fake)
    cfg = tiny_config(tmp_path, train={"epochs": 3})
    with pytest.warns(UserWarning, match="seed 0: collapsed: test"):
        summary = Trainer(cfg, "train").fit()
    assert summary["warnings"] == ["collapsed: test"]
    assert json.loads((cfg.run_dir / "summary.json").read_text())["warnings"] == \
        ["collapsed: test"]
    assert seen[-1] == (3, 100)  # the finished run's rows, the dataset's classes
    assert "COLLAPSED at chance level (seed 0: see 'warnings'" in _result_line([summary])
    assert "COLLAPSED" not in _result_line([{**summary, "warnings": []}])
