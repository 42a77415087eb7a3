"""topkd.study: the report of a study (study.json + run directories) with known numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from topkd import study

# method -> per-seed test top-1 at best val (seeds 0, 1, 2)
FINAL = {
    "ce": [80.0, 81.0, 82.0],
    "kd": [83.0, 82.0, 84.0],       # the best baseline: mean 83
    "dkd": [82.0, 83.0, 82.5],      # mean 82.5
    "topkd": [84.0, 82.5, 85.0],    # ours: paired vs kd +1, +0.5, +1
}


def _run(root: Path, rel: str, seed: int, acc: float | None, val: float | None = None,
         method: str = "kd", epochs: int = 8) -> dict:
    d = root / rel
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({
        "name": rel, "seed": seed, "epochs": 8, "best_val_acc1": val if val is not None else acc,
        "test_acc1_at_best_val": acc, "last_test_acc1": acc, "best_test_acc1": acc}))
    (d / "metrics.csv").write_text("epoch,train_tsm_corrected,test_acc1\n1,0.1,50\n2,0.2,60\n")
    (d / "config.yaml").write_text(yaml.safe_dump({
        "model": {"name": "fmnist_cnn_student"}, "data": {"train_subset": 4000},
        "train": {"epochs": epochs}, "method": {"name": method}}))
    return {"status": "ok", "dir": rel}


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "study"
    ds: dict = {"label": "Toy (10 classes)", "methods": {}}
    for m, vals in FINAL.items():
        rec = {"role": "ours" if m == "topkd" else ("student alone" if m == "ce" else "baseline"),
               "status": "ok",
               "final": [_run(r, f"toy/final/{m}/seed_{s}", s, v) for s, v in enumerate(vals)]}
        if m != "ce":  # trial 1 wins on validation for dkd only
            vals_t = {"kd": (70.0, 69.0), "dkd": (70.0, 71.0), "topkd": (72.0, 72.0)}[m]
            rec["trials"] = [{**_run(r, f"toy/tune/{m}/trial_{i}", 0, 60.0, v, epochs=3),
                              "overrides": {} if i == 0 else {"temperature": 2.0}}
                             for i, v in enumerate(vals_t)]
        ds["methods"][m] = rec
    ds["methods"]["fitnet"] = {"role": "baseline", "status": "unsupported",
                               "reason": "needs a hint layer"}
    ds["teacher"] = _run(r, "teachers/t", 0, 93.1)
    ds["k_ablation"] = {"entry": "topkd", "key": "method.k", "points": [
        {"k": 1, "runs": [_run(r, f"toy/k/1/seed_{s}", s, 83.0 + s) for s in range(3)]},
        {"k": 5, "runs": ds["methods"]["topkd"]["final"]}]}
    ds["controls"] = [{"key": "kd_gt", "label": "KD on the GT-corrected teacher", "of": "kd",
                       "changes": {"tsm.gamma": 0.0},
                       "runs": [_run(r, f"toy/ctl/kd_gt/seed_{s}", s, 83.5 + s)
                                for s in range(3)]}]
    (r / "study.json").write_text(json.dumps({
        "format": study.STUDY_FORMAT, "title": "toy", "ours": ["topkd"],
        "budget": {"epochs": 8, "train_subset": 4000, "seeds": [0, 1, 2], "trials": 2,
                   "tune_epochs": 3, "warmup": 2.0, "views": 8},
        "commands": ["python benchmarks/testbed.py --out X"], "datasets": {"toy": ds}}))
    return r


def test_paired_differences_and_cells():
    a = study.Result({0: 84.0, 1: 82.5, 2: 85.0})
    b = study.Result({0: 83.0, 1: 82.0, 2: 84.0, 3: 90.0})  # seed 3 has no partner
    d, wins = study.paired(a, b)
    assert d == [1.0, 0.5, 1.0] and wins == 3
    sd = math.sqrt(((1 - 2.5 / 3) ** 2 * 2 + (0.5 - 2.5 / 3) ** 2) / 2)
    assert study.paired_cell(a, b) == f"+{2.5 / 3:.2f} ± {sd:.2f} (3/3)"
    assert study.mean_std([1.0]) == "1.00" and study.mean_std([]) == "n/a"
    assert study.mean_std([1.0, 3.0]) == f"2.00 ± {math.sqrt(2):.2f}"


def test_render_tables_best_baseline_sweep_and_controls(root, tmp_path):
    text = study.render(root, plots=tmp_path / "plots", md_dir=tmp_path)
    rows = {line.split(" | ")[1].strip("* "): line for line in text.splitlines()
            if line.startswith("| ") and " | " in line and line.split(" | ")[0][2:].isdigit()}
    # sorted by mean, ranks 1..4: topkd 83.83, kd 83, dkd 82.5, ce 81
    assert [rows[m].split(" | ")[0] for m in ("topkd", "kd", "dkd", "ce")] == \
        ["| 1", "| 2", "| 3", "| 4"]
    assert "(best baseline)" in rows["kd"]  # the best non-ours entry, CE included
    assert "83.83 ± 1.26" in rows["topkd"] and "+0.83 ± 0.29 (3/3)" in rows["topkd"]
    assert "-0.50 ± 1.32 (1/3)" in rows["dkd"]
    assert "temperature 2" in rows["dkd"] and "reference" in rows["kd"]  # chosen trials
    assert "`fitnet` cannot run this pair: needs a hint layer" in text
    assert "| 93.10 |" in text  # the teacher's number, from its run directory
    # K ablation: k=1 (83, 84, 85) beats k=5 (the final topkd runs, 83.83)
    assert "best k = 1 (84.00 ± 1.00)" in text
    assert "![K ablation](plots/k_ablation_toy.png)" in text
    assert (tmp_path / "plots" / "k_ablation_toy.png").read_bytes()[:4] == b"\x89PNG"
    # control vs the tuned original, paired: +0.5, +2.5, +1.5
    assert "KD on the GT-corrected teacher: +1.50 ± 1.00 (3/3) vs `kd` as in its table row" in text
    assert "`topkd` is #1 of 4, +0.83 ± 0.29 (3/3) vs kd" in text
    assert "top-1 is wrong on 15.0% of the training views" in text  # mean of 0.1 and 0.2


def test_report_cli_renders_a_study(root, tmp_path, capsys):
    from topkd.cli import main

    template = tmp_path / "t.md"
    template.write_text("# R\n\n{{report}}\n\nEnd.\n")
    out = tmp_path / "r.md"
    assert main(["report", str(root), "--template", str(template), "--output", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# R\n\n## Findings") and text.rstrip().endswith("End.")
    assert f"topkd report {root} --template {template} --output {out}" in text
    template.write_text("no placeholder\n")
    assert main(["report", str(root), "--template", str(template)]) == 2
    assert "no '{{report}}' line" in capsys.readouterr().err
    assert main(["report", str(root), str(tmp_path)]) == 2  # a study is reported alone


def test_setup_says_which_entries_were_tuned_and_how(root, tmp_path):
    # read from the entries' trials (number, and epochs from their run directories), not from
    # the study's budget: entries tuned by different invocations may differ
    m = json.loads((root / "study.json").read_text())
    m["budget"]["trials"] = 7  # ignored
    (root / "study.json").write_text(json.dumps(m))
    text = study.render(root, md_dir=tmp_path, plots=tmp_path)
    assert "Tuning: 2 trials per method (the reference configuration and 1 random change " \
        "of one or two parameters by x0.5 / x2) of 3 epochs, seed 0" in text
    del m["datasets"]["toy"]["methods"]["dkd"]["trials"]  # dkd ran its reference config
    (root / "study.json").write_text(json.dumps(m))
    text = study.render(root, md_dir=tmp_path, plots=tmp_path)
    assert "of 3 epochs, seed 0, chosen on validation top-1 only for `kd`, `topkd`; none " \
        "(the reference configuration, nothing to choose) for `dkd`." in text
    row = next(line for line in text.splitlines() if line.startswith("| ") and "| dkd |" in line)
    assert "| not tuned |" in row
    for k in ("kd", "topkd"):
        del m["datasets"]["toy"]["methods"][k]["trials"]
    (root / "study.json").write_text(json.dumps(m))
    text = study.render(root, md_dir=tmp_path, plots=tmp_path)
    assert "Tuning: none: every method runs its reference configuration" in text
    assert "trials per method" not in text


def test_each_dataset_reports_its_own_budget(root, tmp_path):
    m = json.loads((root / "study.json").read_text())
    toy = m["datasets"]["toy"]
    toy["budget"] = {**m["budget"], "epochs": 5}
    (root / "study.json").write_text(json.dumps(m))
    text = study.render(root, md_dir=tmp_path, plots=tmp_path)
    assert "5 epochs on a fixed subset" in text and "8 epochs on a fixed subset" not in text
    m["datasets"]["toy2"] = {**json.loads(json.dumps(toy)), "label": "Toy two",
                             "budget": {**m["budget"], "epochs": 7}}
    (root / "study.json").write_text(json.dumps(m))
    text = study.render(root, md_dir=tmp_path, plots=tmp_path)
    assert "Toy two: Every student run: the dataset recipe (SGD, cosine, batch 128), 7 epochs" \
        in text
    assert ": Every student run: the dataset recipe (SGD, cosine, batch 128), 5 epochs" in text


def test_an_entry_with_unfinished_seeds_says_so(root, tmp_path):
    """A run still training (no summary.json yet) leaves a mean of fewer seeds: the cell says
    how many of the planned seeds it holds."""
    (root / "toy/final/dkd/seed_2/summary.json").unlink()
    text = study.render(root, md_dir=tmp_path, plots=tmp_path)
    row = next(ln for ln in text.splitlines() if ln.startswith("| ") and " dkd " in ln)
    assert "82.50 ± 0.71 (2 of 3 seeds)" in row
    assert "(2 of 3 seeds)" not in next(ln for ln in text.splitlines()
                                        if ln.startswith("| ") and " kd " in ln)


def test_entries_without_a_finished_run_are_listed_as_not_run(root, tmp_path):
    m = json.loads((root / "study.json").read_text())
    methods = m["datasets"]["toy"]["methods"]
    methods["vid"] = {"role": "baseline", "trials": []}  # listed, never run
    methods["sp"] = {"role": "baseline", "status": "pending", "reason": "not finished (...)",
                     "trials": [{"status": "pending", "dir": f"toy/tune/sp/trial_{i}"}
                                for i in range(2)],
                     "final": [{"status": "pending", "dir": "toy/final/sp/seed_0"}]}
    (root / "study.json").write_text(json.dumps(m))
    text = study.render(root, md_dir=tmp_path, plots=tmp_path)
    assert "* `vid` not run yet: no finished run in this study" in text
    # its pending trials, which have no run directory yet, say nothing about its tuning
    assert "None epochs" not in text and "`sp`" not in text.split("Commands")[0]
    assert "* `sp` not run yet: not finished (...)" in text
    assert "`fitnet` cannot run this pair: needs a hint layer" in text
    assert not any(ln.startswith("| ") and (" vid " in ln or " sp " in ln)
                   for ln in text.splitlines())


def test_collapsed_runs_are_flagged_under_the_table(root, tmp_path):
    """Runs the engine flagged as collapsed (summary.json ``warnings``) stay in the table (their
    number is what the method gave) and are named under it, with their seeds."""
    assert "Collapsed" not in study.render(root, md_dir=tmp_path, plots=tmp_path)
    for s in (0, 2):
        p = root / f"toy/final/dkd/seed_{s}/summary.json"
        p.write_text(json.dumps({**json.loads(p.read_text()),
                                 "warnings": ["collapsed: every epoch at chance level"]}))
    text = study.render(root, md_dir=tmp_path, plots=tmp_path)
    assert "learned nothing; `warnings` in its summary.json): `dkd` seeds 0, 2." in text
    assert any(ln.startswith("| ") and " dkd " in ln for ln in text.splitlines())
