"""benchmarks/testbed.py: the GT-correction control, the tuning draws, and a --quick smoke run
through the engine (every phase, resume, unsupported methods, ``topkd report`` of the study)."""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from test_demo import _write_idx
from topkd.losses import functional as F
from topkd.methods import (
    Method,
    MethodParams,
    create_method,
    params_from_dict,
    params_to_dict,
    registry,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tb():
    spec = importlib.util.spec_from_file_location("testbed", ROOT / "benchmarks" / "testbed.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["testbed"] = mod  # dataclasses look their module up
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop("testbed", None)


# --------------------------------------------------------------------------------------------
# The control: tsm {gamma 0, lam 0, correct_gt true} is the teacher with only the GT correction
# --------------------------------------------------------------------------------------------
def _gt_corrected(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The teacher with its ground-truth logit raised just above its maximum where it is wrong
    (TSM's correction, margin 1e-3), and nothing else."""
    out = t.clone()
    wrong = t.argmax(-1) != y
    top = t.max(-1).values
    out[wrong, y[wrong]] = top[wrong] + 1e-3
    return out


@pytest.mark.parametrize("k", [1, 3, 10])
def test_gt_only_tsm_is_the_teacher_with_only_the_gt_correction(k):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(64, 10, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 10, (64,), generator=g)
    assert (t.argmax(-1) != y).sum() > 20  # many rows get corrected
    b = F.tsm(t, y, k, gamma=0.0, lam=0.0, correct_gt=True)
    ref = _gt_corrected(t, y)
    # up to the per-row shift of TSM (it centres the teacher's logits), which softmaxes ignore
    torch.testing.assert_close(b, ref - t.mean(-1, keepdim=True), rtol=0, atol=1e-6)
    s = torch.randn(64, 10, generator=g, dtype=torch.float64)
    gt = {"gamma": 0.0, "lam": 0.0, "correct_gt": True}
    kd = create_method({"name": "kd", "tsm": gt, "k": k})
    kd_ref = F.kd_loss(s, ref, temperature=4.0)
    torch.testing.assert_close(kd(s, t, y).terms["kd"], kd_ref, rtol=1e-5, atol=1e-6)
    dkd = create_method({"name": "dkd", "tsm": gt, "k": k, "warmup": 0})
    dkd_ref = F.dkd_loss(s, ref, y, alpha=1.0, beta=8.0, temperature=4.0)
    torch.testing.assert_close(dkd(s, t, y, epoch=1).terms["dkd"], dkd_ref, rtol=1e-5,
                               atol=1e-6)
    # and where the teacher is right, the target is the teacher itself
    right = t.argmax(-1) == y
    torch.testing.assert_close(b[right] - b[right].mean(-1, keepdim=True),
                               t[right] - t[right].mean(-1, keepdim=True), rtol=0, atol=1e-6)


def test_topkd_without_correction_keeps_the_wrong_teacher_top1():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(32, 10, generator=g) * 3
    y = torch.randint(0, 10, (32,), generator=g)
    b = F.tsm(t, y, 2, gamma=1.0, lam=0.5, correct_gt=False)
    assert torch.equal(b.argmax(-1), t.argmax(-1))


# --------------------------------------------------------------------------------------------
# Tuning draws
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("entry", ["kd", "dkd", "topkd", "kd_tsm_tdl", "ttm"])
def test_trials_equal_budget_valid_and_deterministic(tb, entry):
    e = next(x for x in tb.method_entries() if x.key == entry)
    default = tb.canonical_method(tb.method_raw(e)["method"], 2.0)
    trials = tb.draw_trials(default, 4, f"fashion_mnist-{entry}")
    assert len(trials) == 4 and trials[0] == default
    assert len({json.dumps(t, sort_keys=True) for t in trials}) == 4
    assert trials == tb.draw_trials(default, 4, f"fashion_mnist-{entry}")
    knobs = dict(tb.knobs(default))
    for t in trials[1:]:
        params_from_dict(t)  # valid
        changes = tb.diff(default, t)
        assert 1 <= len(changes) <= 2
        for key, v in changes.items():
            old = knobs[tuple(key.split("."))]
            assert v in (old * 2, old * 0.5, old // 2), (key, old, v)
    # reference warm-ups (DKD, TopKD: 20 of 240 epochs) become the testbed's, never tuned
    assert default["warmup"] == (2.0 if entry in ("dkd", "topkd") else 0.0)
    assert "warmup" not in {k for t in trials for k in tb.diff(default, t)}


def test_knobs_are_weights_temperatures_and_k(tb):
    e = next(x for x in tb.method_entries() if x.key == "topkd")
    names = {".".join(p) for p, _ in tb.knobs(tb.canonical_method(tb.method_raw(e)["method"],
                                                                  2.0))}
    assert {"k", "tau", "w_con", "w_tdl", "ce", "tsm.gamma", "tsm.lam"} <= names
    assert not names & {"warmup", "tsm.correct_gt", "tsm.schedule", "ignore_index"}


@pytest.mark.parametrize("key", ["rkd", "pkt"])
def test_numerical_epsilons_are_not_tuned(tb, key):
    e = next(x for x in tb.method_entries() if x.key == key)
    section = tb.canonical_method(tb.method_raw(e)["method"], 2.0)
    assert "eps" in section  # the method has one...
    names = {".".join(p) for p, _ in tb.knobs(section)}
    assert names and "eps" not in names  # ...and the tuner leaves it alone


def test_finished_runs_ignore_keys_added_to_the_schema(tb):
    saved = {"a": 1, "b": {"c": [1, 2]}, "gone": 3}
    assert tb._same(saved, {"a": 1, "b": {"c": [1, 2], "new": 0}})
    assert not tb._same(saved, {"a": 2, "b": {"c": [1, 2]}})
    assert not tb._same(saved, {"a": 1, "b": {"c": [1]}})


def test_entries_come_from_the_registry(tb):
    keys = [e.key for e in tb.method_entries()]
    assert keys[0] == "ce" and set(registry.METHODS.names()) <= set(keys)
    assert {"kd_ls", "kd_tsm_tdl", "dot"} <= set(keys) and "tsm_tdl" not in keys  # no fragments
    roles = {e.key: e.role for e in tb.method_entries()}
    assert roles["topkd"] == "ours" and roles["kd"] == "baseline"


# --------------------------------------------------------------------------------------------
# --quick through the engine
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fake_fmnist(tmp_path_factory) -> Path:
    """Class-dependent blobs: 40 / 20 images per class (200 / 100 disjoint composites)."""
    root = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 400), ("t10k", 200)):
        y = np.arange(n) % 10
        x = rng.integers(0, 40, size=(n, 28, 28))
        for i, c in enumerate(y):
            x[i, 2 * c:2 * c + 8, 4:24] += 200
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", np.clip(x, 0, 255), 2051)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", y, 2049)
    return root


@dataclass(frozen=True)
class _RefusesParams(MethodParams):
    pass


class _Refuses(Method):
    """A method that cannot run any pair (as a feature method refuses mismatched models)."""

    Params = _RefusesParams

    def __init__(self, params=None, ctx=None):
        super().__init__(params, ctx)
        raise ValueError("needs a student with a 'widget' stage (this pair has none)")


def test_quick_run_every_phase_resume_and_report(tb, fake_fmnist, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(registry.METHODS._items, "test_refuses", _Refuses)
    monkeypatch.setitem(registry._BY_PARAMS, _RefusesParams, "test_refuses")
    monkeypatch.setattr(_Refuses, "name", "test_refuses", raising=False)
    threads = torch.get_num_threads()
    out = tmp_path / "quick"
    argv = ["--quick", "--out", str(out), "--data-root", str(fake_fmnist), "--threads", "1",
            "--datasets", "fashion_mnist_pairs", "--methods", "ce,kd,topkd,test_refuses"]
    try:
        assert tb.main(argv) == 0
        first = capsys.readouterr().out
        assert tb.main(argv) == 0  # resumable: everything is finished, nothing runs again
        again = capsys.readouterr().out
        # --record reads the same: the refused entry stays refused, not "not run yet"
        assert tb.main([*argv, "--record"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert "0 runs trained" in again and "0 runs trained" not in first
    study = json.loads((out / "study.json").read_text())
    ds = study["datasets"]["fashion_mnist_pairs"]
    assert ds["methods"]["test_refuses"]["status"] == "unsupported"
    assert "widget" in ds["methods"]["test_refuses"]["reason"]
    refused = out / ds["methods"]["test_refuses"]["trials"][0]["dir"]
    assert json.loads((refused / "outcome.json").read_text())["status"] == "unsupported"
    assert not list(refused.parent.glob("*.stale-*"))  # asked again in place, not moved aside
    for key in ("ce", "kd", "topkd"):
        rec = ds["methods"][key]
        assert rec["status"] == "ok" and len(rec["final"]) == 2
        for r in rec["final"]:
            run = out / r["dir"]
            assert (run / "summary.json").is_file() and (run / "metrics.csv").is_file()
        assert len(rec["trials"]) == (0 if key == "ce" else 2)
    kd_final = tb.read_summary(out, ds["methods"]["kd"]["final"][0])
    assert kd_final["seed"] == 0 and kd_final["epochs"] == 1
    # teacher logits from the cache for KD; the chosen trial's method section is what ran
    from topkd.config import load_config

    cfg = load_config(out / ds["methods"]["kd"]["final"][1]["dir"] / "config.yaml")
    assert cfg.train.teacher_cache == str(out / "cache" / "fashion_mnist_pairs")
    assert cfg.seed == 1 and cfg.data.train_subset == 48 and cfg.data.val_fraction == 0.1
    # the study pins the eager fp32 NCHW DataLoader path, whatever the engine's defaults
    assert (cfg.train.amp, cfg.train.channels_last, cfg.train.compile, cfg.data.loader) == \
        ("none", False, False, "dataloader")
    teacher_dir = study["datasets"]["fashion_mnist_pairs"]["teacher"]["dir"]
    tcfg = load_config(out / teacher_dir / "config.yaml")
    assert (tcfg.train.compile, tcfg.data.loader) == (False, "dataloader")
    assert params_to_dict(cfg.method) == ds["methods"]["kd"]["chosen"]
    assert [p["k"] for p in ds["k_ablation"]["points"]] == [1, 5]
    ctl = {c["key"]: c for c in ds["controls"]}
    assert set(ctl) == {"kd_gt", "topkd_no_gt"}  # dkd is not among --methods
    assert ctl["kd_gt"]["changes"] == {"tsm.gamma": 0.0, "tsm.lam": 0.0, "tsm.correct_gt": True}
    assert ctl["topkd_no_gt"]["changes"] == {"tsm.correct_gt": False}
    leg = study["legacy"]["methods"]
    assert set(leg) == {"ce", "topkd"} and leg["topkd"]["recorded"] == "86.32 ± 0.06"

    from topkd.cli import main as cli

    md = tmp_path / "docs" / "results.md"
    template = tmp_path / "results.template.md"
    template.write_text("# Results\n\nProse.\n\n{{report}}\n")
    assert cli(["report", str(out), "--output", str(md), "--template", str(template),
                "--plots", str(tmp_path / "docs" / "results")]) == 0
    text = md.read_text()
    assert text.startswith("# Results\n\nProse.")
    for needle in ("## fashion_mnist_pairs", "## K ablation", "Ground-truth correction controls",
                   "`test_refuses` cannot run this pair", "Tuning record", "--quick",
                   "The engine on the removed loop's protocol", "(best baseline)"):
        assert needle in text, needle
    assert "![K ablation](results/k_ablation_fashion_mnist_pairs.png)" in text
    png = tmp_path / "docs" / "results" / "k_ablation_fashion_mnist_pairs.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --archive: the records and the teachers' weights (deterministic bytes) render the same
    # report, and a testbed run on them (restored where they were written: configs name paths)
    # trains nothing; a teacher whose weights are missing is retrained, and its students' records
    # stay finished because the retrained teacher has the weights they recorded
    import shutil
    import tarfile

    arch = tmp_path / "records.tar.xz"
    warch = tmp_path / "records.weights.tar"
    assert tb.weights_archive(arch) == warch
    assert tb.main(["--out", str(out), "--archive", str(arch)]) == 0
    data = arch.read_bytes(), warch.read_bytes()
    assert tb.main(["--out", str(out), "--archive", str(arch)]) == 0
    assert (arch.read_bytes(), warch.read_bytes()) == data
    shutil.move(out, tmp_path / "original")
    with tarfile.open(arch) as tar, tarfile.open(warch) as wtar:
        names, weights = tar.getnames(), wtar.getnames()
        tar.extractall(out, filter="data")
        wtar.extractall(out, filter="data")
    assert "study.json" in names and all(n.rsplit("/", 1)[-1] in (
        "study.json", *tb.RECORD_FILES, tb.OUTCOME) for n in names)
    assert f"{refused.relative_to(out)}/outcome.json" in names
    assert sorted(weights) == sorted(f"{d}/checkpoints/best.pt" for d in (
        ds["teacher"]["dir"], "legacy/teacher")), weights  # the study's and the legacy teacher
    assert f"{ds['methods']['kd']['final'][0]['dir']}/summary.json" in names
    md2 = tmp_path / "docs" / "results2.md"
    assert cli(["report", str(out), "--output", str(md2), "--template", str(template),
                "--plots", str(tmp_path / "docs" / "results")]) == 0
    assert md2.read_text().replace("results2.md", "results.md") == md.read_text()
    capsys.readouterr()
    try:
        assert tb.main(argv) == 0
        restored = capsys.readouterr().out
        (out / ds["teacher"]["dir"] / "checkpoints" / "best.pt").unlink()
        assert tb.main(argv) == 0
        log = capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)
    assert "0 runs trained" in restored and "its weights are missing" not in restored, restored
    assert log.count("its weights are missing") == 1, log
    assert "1 runs trained" in log, log
    shutil.rmtree(out)
    shutil.move(tmp_path / "original", out)

    # --write-configs: the shipped override of an entry, applied to its method file, is exactly
    # the section its final runs used (the chosen trial); an unsupported entry says why
    po = tmp_path / "po"
    assert tb.main(["--out", str(out), "--write-configs", "--configs-out", str(po),
                    "--datasets", "fashion_mnist_pairs",
                    "--methods", "ce,kd,topkd,test_refuses"]) == 0
    written = po / "fashion_mnist_pairs"
    assert sorted(p.name for p in written.iterdir()) == \
        ["kd.yaml", "test_refuses.yaml", "topkd.yaml"]  # CE has nothing to choose
    assert yaml.safe_load((written / "test_refuses.yaml").read_text()) == \
        {"unsupported": {"teacher_student": ds["methods"]["test_refuses"]["reason"]}}
    for key in ("kd", "topkd"):
        vals = [tb.read_summary(out, t)["best_val_acc1"] for t in ds["methods"][key]["trials"]]
        text = (written / f"{key}.yaml").read_text()
        assert f"# Trial {vals.index(max(vals))} of 2 (validation top-1, seed 0)" in text
        over = (yaml.safe_load(text) or {}).get("teacher_student", {})
        ref = yaml.safe_load((ROOT / "configs" / "methods" / f"{key}.yaml").read_text())
        shipped = _deep_merge(ref["method"], {k: v for k, v in over.items()
                                              if k not in ("data", "optim", "sched", "train")})
        assert params_to_dict(params_from_dict(shipped)) == ds["methods"][key]["chosen"]


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) \
            else v
    return out


def test_budget_flags_override_the_sizes_and_are_recorded(tb, tmp_path):
    out = tmp_path / "b"
    threads = torch.get_num_threads()
    try:
        assert tb.main(["--out", str(out), "--phases", "tune", "--epochs", "5", "--trials", "1",
                        "--datasets", "fashion_mnist", "--methods", "ce,kd,topkd",
                        "--tune-epochs", "2", "--train-subset", "300", "--views", "3",
                        "--seeds", "4,5", "--warmup", "0.5", "--k-values", "1,7"]) == 0
    finally:
        torch.set_num_threads(threads)
    b = json.loads((out / "study.json").read_text())["budget"]
    assert (b["epochs"], b["trials"], b["tune_epochs"], b["train_subset"], b["views"],
            b["seeds"]) == (5, 1, 2, 300, 3, [4, 5])
    assert b["warmup"] == 0.5 and b["k_values"] == [1, 7]
    assert b["max_steps"] is None  # what was not given keeps its default
    # one trial: nothing to choose, no tuning run; the final phase uses the reference config
    methods = json.loads((out / "study.json").read_text())["datasets"]["fashion_mnist"]["methods"]
    assert {k: m["trials"] for k, m in methods.items()} == {"ce": [], "kd": [], "topkd": []}
    ds_budget = json.loads((out / "study.json").read_text())["datasets"]["fashion_mnist"]["budget"]
    assert ds_budget == b  # the dataset keeps the sizes its runs were made with
    assert not (out / "fashion_mnist").exists()
    with pytest.raises(SystemExit, match="--trials must be >= 1"):
        tb.main(["--out", str(out), "--phases", "", "--trials", "0"])


def test_parallel_invocations_keep_each_others_datasets(tb, tmp_path):
    """Two invocations with different --datasets share one study.json (run in parallel)."""
    out = tmp_path / "p"
    threads = torch.get_num_threads()
    try:
        a = tb.Testbench(_args(tb, out, "fashion_mnist"))
        b = tb.Testbench(_args(tb, out, "fashion_mnist_pairs"))
        a.ds(tb.TESTBEDS["fashion_mnist"])["methods"]["kd"] = {"status": "ok"}
        a.save()
        b.ds(tb.TESTBEDS["fashion_mnist_pairs"])["methods"]["dkd"] = {"status": "ok"}
        b.save()  # b was loaded before a saved: a's dataset must survive
    finally:
        torch.set_num_threads(threads)
    study = json.loads((out / "study.json").read_text())
    assert study["datasets"]["fashion_mnist"]["methods"] == {"kd": {"status": "ok"}}
    assert study["datasets"]["fashion_mnist_pairs"]["methods"] == {"dkd": {"status": "ok"}}
    assert len(study["commands"]) == 2


def test_an_invocation_without_the_legacy_phase_keeps_its_record(tb, tmp_path):
    """The legacy phase ran in its own invocation next to a long one: the long one's later
    saves must not drop the legacy record it never saw (nor may a re-run of legacy lose it)."""
    out = tmp_path / "p"
    threads = torch.get_num_threads()
    try:
        long = tb.Testbench(_args(tb, out, "fashion_mnist_pairs"))
        long.save()
        leg = tb.Testbench(_args(tb, out, "fashion_mnist"))
        leg._touched.add(("legacy",))
        leg.study["legacy"] = {"methods": {"ce": {"runs": []}}}
        leg.save()
        long.ds(tb.TESTBEDS["fashion_mnist_pairs"])["methods"]["dkd"] = {"status": "ok"}
        long.save()
    finally:
        torch.set_num_threads(threads)
    study = json.loads((out / "study.json").read_text())
    assert study["legacy"] == {"methods": {"ce": {"runs": []}}}
    assert study["datasets"]["fashion_mnist_pairs"]["methods"] == {"dkd": {"status": "ok"}}


def test_invocations_split_by_methods_keep_each_others_entries(tb, tmp_path):
    """The same dataset run by two invocations with different --methods (in parallel): each
    save keeps the other's entries, and the K ablation / controls it did not write."""
    out = tmp_path / "p"
    threads = torch.get_num_threads()
    try:
        a = tb.Testbench(_args(tb, out, "fashion_mnist_pairs"))
        b = tb.Testbench(_args(tb, out, "fashion_mnist_pairs"))
        key = "fashion_mnist_pairs"
        a._touched.add((key, "methods", "kd"))
        a.ds(tb.TESTBEDS[key])["methods"]["kd"] = {"status": "ok", "final": ["a"]}
        a._touched.add((key, "k_ablation"))
        a.ds(tb.TESTBEDS[key])["k_ablation"] = {"points": [1]}
        a.save()
        b._touched.add((key, "methods", "dkd"))
        b.ds(tb.TESTBEDS[key])["methods"]["dkd"] = {"status": "ok", "final": ["b"]}
        b.save()  # b never saw a's kd entry nor its ablation
        a.ds(tb.TESTBEDS[key])["methods"]["kd"]["final"].append("a2")
        a.save()  # and a keeps b's dkd
    finally:
        torch.set_num_threads(threads)
    ds = json.loads((out / "study.json").read_text())["datasets"]["fashion_mnist_pairs"]
    assert ds["methods"] == {"kd": {"status": "ok", "final": ["a", "a2"]},
                             "dkd": {"status": "ok", "final": ["b"]}}
    assert ds["k_ablation"] == {"points": [1]}


def test_record_mode_trains_nothing_and_marks_unfinished_runs_pending(tb, tmp_path):
    from topkd.config import Config

    cfg = Config.from_dict({"method": {"name": "kd"}, "data": {"name": "fashion_mnist"},
                            "teacher": {"name": "fmnist_cnn_teacher"}})
    run_dir = tmp_path / "final" / "kd" / "seed_0"
    rec = tb.Runner(tmp_path, record=True).run(cfg, "distill", run_dir)
    assert rec["status"] == "pending" and "without --record" in rec["reason"]
    assert not run_dir.exists()  # nothing created, nothing moved aside
    run_dir.mkdir(parents=True)  # a finished run of this config is recorded as ok
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    (run_dir / "summary.json").write_text("{}")
    assert tb.Runner(tmp_path, record=True).run(cfg, "distill", run_dir)["status"] == "ok"
    entry: dict = {}
    tb.Testbench._status(entry, [{"status": "pending", "reason": "r"}] * 2)
    assert entry == {"status": "pending", "reason": "r"}
    tb.Testbench._status(entry, [{"status": "ok"}, {"status": "pending", "reason": "r"}])
    assert entry == {"status": "ok"}


def test_record_mode_reports_failed_and_refused_runs_as_they_ended(tb, tmp_path, monkeypatch):
    """A run that failed or was refused leaves outcome.json: ``--record`` reports it so (not as
    "not run yet") while the config is the same; a success or another config ends that."""
    import topkd.engine
    from topkd.config import Config

    cfg = Config.from_dict({"method": {"name": "kd"}, "data": {"name": "fashion_mnist"},
                            "teacher": {"name": "fmnist_cnn_teacher"}})
    run_dir = tmp_path / "final" / "kd" / "seed_0"

    class Fails:
        def __init__(self, cfg, mode, run_dir, **kw):
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))

        def fit(self):
            raise RuntimeError("boom")

    monkeypatch.setattr(topkd.engine, "Trainer", Fails)
    rec = tb.Runner(tmp_path, log=lambda m: None).run(cfg, "distill", run_dir)
    assert rec == {"status": "failed", "dir": "final/kd/seed_0", "reason": "RuntimeError: boom"}
    assert tb.Runner(tmp_path, record=True).run(cfg, "distill", run_dir) == rec
    other = Config.from_dict({**cfg.to_dict(), "seed": 1})
    assert tb.Runner(tmp_path, record=True).run(other, "distill", run_dir)["status"] == "pending"

    class Works(Fails):
        def fit(self):
            return {}

    logs: list[str] = []
    monkeypatch.setattr(topkd.engine, "Trainer", Works)
    assert tb.Runner(tmp_path, log=logs.append).run(cfg, "distill", run_dir)["status"] == "ok"
    assert any("an earlier run failed" in m for m in logs), logs  # the failed one moved aside
    assert (run_dir.parent / "seed_0.stale-1" / "outcome.json").is_file()
    assert not (run_dir / "outcome.json").exists()

    # refused (the engine refuses distill without a teacher term): asked again in place
    ce = Config.from_dict({"method": {"name": "ce"}, "data": {"name": "fashion_mnist"}})
    monkeypatch.undo()
    refused_dir = tmp_path / "tune" / "ce" / "trial_0"
    first = tb.Runner(tmp_path, log=lambda m: None).run(ce, "distill", refused_dir)
    assert first["status"] == "unsupported"
    assert tb.Runner(tmp_path, record=True).run(ce, "distill", refused_dir) == first
    assert tb.Runner(tmp_path, log=lambda m: None).run(ce, "distill", refused_dir) == first
    assert [p.name for p in refused_dir.parent.iterdir()] == ["trial_0"]


def _args(tb, out, datasets):
    import argparse

    argv = ["--out", str(out), "--datasets", datasets]
    ns = argparse.Namespace(out=str(out), quick=False, seeds=None, methods="kd,dkd",
                            datasets=datasets, data_root=None, argv=argv)
    return ns


def test_a_changed_config_moves_the_old_run_aside_never_deletes_it(tb, tmp_path):
    """A run directory of another config (a changed default) is renamed, not removed: it may
    be a teacher that took an hour."""
    from topkd.config import Config

    run_dir = tmp_path / "teachers" / "t"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("train: {epochs: 99}\n")
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "best.pt").write_bytes(b"weights")
    cfg = Config.from_dict({"method": {"name": "ce"}, "data": {"name": "fashion_mnist"}})
    logs: list[str] = []
    rec = tb.Runner(tmp_path, log=logs.append).run(cfg, "distill", run_dir)
    assert rec["status"] == "unsupported"  # distill without a teacher term: refused
    assert (tmp_path / "teachers" / "t.stale-1" / "checkpoints" / "best.pt").read_bytes() == \
        b"weights"
    assert any("moved to t.stale-1" in m for m in logs)
    run_dir.mkdir(exist_ok=True)
    (run_dir / "config.yaml").write_text("train: {epochs: 98}\n")
    tb.Runner(tmp_path, log=logs.append).run(cfg, "distill", run_dir)
    assert (tmp_path / "teachers" / "t.stale-2" / "config.yaml").is_file()


def test_a_teacher_retrained_in_place_makes_its_students_stale(tb, tmp_path):
    """Distillation runs name their teacher by path: a teacher retrained at the same path leaves
    their configs matching, so the teacher's weights (env.json's SHA-256 of them) decide: other
    weights move the old run aside to be trained again; the same weights in a new file (a
    bit-identical retraining, whose checkpoint records other epoch times) keep it."""
    from topkd.checkpoints import save_weights, state_dict_sha256
    from topkd.config import Config
    from topkd.data.errors import DatasetNotFoundError
    from topkd.models import create_model

    ckpt = tmp_path / "best.pt"
    torch.manual_seed(0)
    first = create_model("fmnist_cnn_teacher", 10)
    save_weights(first, ckpt, meta={"epoch_time_s": 1.0})
    cfg = Config.from_dict({"method": {"name": "kd"},
                            "data": {"name": "fashion_mnist", "root": str(tmp_path / "no_data")},
                            "teacher": {"name": "fmnist_cnn_teacher", "checkpoint": str(ckpt)}})
    run_dir = tmp_path / "final" / "kd" / "seed_0"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    (run_dir / "summary.json").write_text("{}")
    (run_dir / "env.json").write_text(json.dumps(
        {"teacher_weights_sha256": state_dict_sha256(first.state_dict())}))
    assert tb.finished(run_dir, cfg) and not tb.teacher_changed(run_dir, cfg)
    save_weights(first, ckpt, meta={"epoch_time_s": 2.0})  # same weights, another file
    assert tb.finished(run_dir, cfg)
    torch.manual_seed(1)
    save_weights(create_model("fmnist_cnn_teacher", 10), ckpt)  # other weights
    assert tb.teacher_changed(run_dir, cfg) and not tb.finished(run_dir, cfg)
    assert tb.Runner(tmp_path, record=True).run(cfg, "distill", run_dir)["status"] == "pending"
    logs: list[str] = []
    with pytest.raises(DatasetNotFoundError):  # moved aside first, then trained again
        tb.Runner(tmp_path, log=logs.append).run(cfg, "distill", run_dir)
    assert any("kd/seed_0: the teacher changed; the old run moved to seed_0.stale-1" in m
               for m in logs), logs
    assert (run_dir.parent / "seed_0.stale-1" / "summary.json").is_file()
    # a run that recorded no teacher (before the field existed) is not judged
    (run_dir.parent / "seed_0.stale-1" / "env.json").write_text("{}")
    assert not tb.teacher_changed(run_dir.parent / "seed_0.stale-1", cfg)


def test_the_archive_holds_finished_runs_and_the_weights_they_name(tb, tmp_path, monkeypatch):
    """Runs that study.json does not list as finished (pending after their teacher changed,
    moved aside) stay out, a failed one adds its outcome.json; the teacher checkpoint a
    finished student names goes in, one outside the study's folder does not."""
    import tarfile

    monkeypatch.chdir(tmp_path)
    out = Path("runs")
    for d in ("teachers/t", "s/ok", "s/pending", "s/ok.stale-1", "s/outside", "s/failed"):
        (out / d).mkdir(parents=True)
        (out / d / "summary.json").write_text("{}")
        (out / d / "config.yaml").write_text("{}\n")
    (out / "teachers/t/checkpoints").mkdir()
    (out / "teachers/t/checkpoints/best.pt").write_bytes(b"w")
    (out / "teachers/t/checkpoints/last.pt").write_bytes(b"w")
    Path("elsewhere.pt").write_bytes(b"x")
    (out / "s/ok/config.yaml").write_text(
        "teacher: {checkpoint: runs/teachers/t/checkpoints/best.pt}\n")
    (out / "s/outside/config.yaml").write_text("teacher: {checkpoint: elsewhere.pt}\n")
    (out / "s/failed/outcome.json").write_text("{}")
    (out / "study.json").write_text(json.dumps({"datasets": {"d": {
        "teacher": {"status": "ok", "dir": "teachers/t"},
        "methods": {"m": {"status": "ok", "final": [
            {"status": "ok", "dir": "s/ok"}, {"status": "pending", "dir": "s/pending"},
            {"status": "ok", "dir": "s/outside"},
            {"status": "failed", "dir": "s/failed", "reason": "r"}]}}}}}))
    assert tb.archive_records(out, tmp_path / "a.tar.xz") == 3
    with tarfile.open(tmp_path / "a.tar.xz") as tar:
        names = set(tar.getnames())
    assert names == {"study.json", "s/failed/outcome.json"} | {
        f"{d}/{n}" for d in ("teachers/t", "s/ok", "s/outside", "s/failed")
        for n in ("config.yaml", "summary.json")}
    with tarfile.open(tmp_path / "a.weights.tar") as tar:
        assert tar.getnames() == ["teachers/t/checkpoints/best.pt"]
    with pytest.raises(SystemExit, match="must end in .tar.xz"):
        tb.archive_records(out, tmp_path / "a.zip")


RECORDS = ROOT / "docs" / "results" / "records.tar.xz"
WEIGHTS = ROOT / "docs" / "results" / "records.weights.tar"


def test_the_committed_records_are_whole_and_render(tmp_path):
    """docs/results/records.tar.xz (``--archive``): every run study.json lists as finished has
    its record, each dataset's students distilled from one teacher whose weights are in
    records.weights.tar (the SHA-256 in their env.json is that of the archived ``best.pt``:
    restored, the testbed trains none of them again), and ``topkd report`` renders them."""
    import tarfile

    from topkd import study
    from topkd.checkpoints import load_teacher, state_dict_sha256
    from topkd.data import dataset_info

    for arch in (RECORDS, WEIGHTS):
        with tarfile.open(arch) as tar:
            tar.extractall(tmp_path, filter="data")
    manifest = json.loads((tmp_path / "study.json").read_text())
    for key, ds in manifest["datasets"].items():
        recs = [r for m in ds["methods"].values()
                for r in (m.get("trials") or []) + (m.get("final") or [])]
        recs += [r for c in ds.get("controls", []) for r in c.get("runs", [])]
        recs += [r for p in (ds.get("k_ablation") or {}).get("points", [])
                 for r in p.get("runs", [])]
        done = [tmp_path / r["dir"] for r in recs if r.get("status") == "ok"]
        assert done, key
        teachers, shas = set(), set()
        for d in done:
            assert all((d / n).is_file() for n in ("summary.json", "config.yaml", "env.json",
                                                   "metrics.csv")), d
            env = json.loads((d / "env.json").read_text())
            if env.get("mode") == "distill":
                shas.add(env.get("teacher_weights_sha256"))
                teachers.add(yaml.safe_load((d / "config.yaml").read_text())["teacher"]["name"])
        assert len(shas) == 1 and None not in shas and len(teachers) == 1, (key, shas, teachers)
        ckpt = tmp_path / ds["teacher"]["dir"] / "checkpoints" / "best.pt"
        teacher = load_teacher(teachers.pop(), dataset_info(key).num_classes, ckpt,
                               verbose=False)
        assert {state_dict_sha256(teacher.state_dict())} == shas, key
    text = study.render(tmp_path, md_dir=tmp_path, plots=tmp_path / "plots")
    assert "test top-1 @ best val" in text


def test_docs_results_is_the_report_of_the_committed_records(tmp_path, monkeypatch):
    """docs/results.md is exactly what ``topkd report`` writes from the committed records and
    docs/results.template.md, run as its "Setup" says: no number on the page that the archive
    does not hold, none edited by hand."""
    import shutil
    import tarfile

    from topkd.cli import main as cli

    with tarfile.open(RECORDS) as tar:
        tar.extractall(tmp_path / "runs" / "testbed", filter="data")
    (tmp_path / "docs").mkdir()
    shutil.copy(ROOT / "docs" / "results.template.md", tmp_path / "docs")
    monkeypatch.chdir(tmp_path)  # the command the page lists, with its relative paths
    assert cli(["report", "runs/testbed", "--template", "docs/results.template.md", "--output",
                "docs/results.md", "--plots", "docs/results"]) == 0
    assert (tmp_path / "docs" / "results.md").read_text() == \
        (ROOT / "docs" / "results.md").read_text()
