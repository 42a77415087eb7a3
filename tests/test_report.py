"""``topkd report`` on fabricated run directories with known numbers."""

from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path

import pytest
import yaml

from topkd import cli, report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(
    d: Path,
    name: str,
    seed: int,
    best_val: float | None,
    at_best_val: float | None,
    last: float,
    best_test: float,
    loss: dict | None = None,
    epochs: int = 3,
) -> Path:
    """A finished run directory as the engine writes it (summary.json, metrics.csv, config)."""
    d.mkdir(parents=True)
    (d / "summary.json").write_text(
        json.dumps(
            {
                "seed": seed,
                "epochs": epochs,
                "best_val_acc1": best_val,
                "best_val_epoch": 2,
                "test_acc1_at_best_val": at_best_val,
                "last_test_acc1": last,
                "best_test_acc1": best_test,
                "best_test_epoch": 2,
                "name": name,
            }
        )
    )
    cfg = {
        "name": name,
        "seed": seed,
        "data": {"name": "cifar100", "val_fraction": 0.1 if best_val is not None else 0.0},
        "model": {"name": "resnet8x4", "kwargs": {}},
        "teacher": {"name": "resnet32x4", "checkpoint": "t.pth", "kwargs": {}},
        "method": loss or {"name": "kd", "ce": 0.1, "kd_weight": 0.9, "temperature": 4.0},
    }
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    cols = [
        "epoch",
        "lr",
        "train_loss",
        "train_ce",
        "train_acc1",
        "val_acc1",
        "test_acc1",
        "test_acc5",
        "test_loss",
        "epoch_time_s",
        "images_per_s",
    ]
    with (d / "metrics.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for e in range(1, epochs + 1):
            acc = best_test - (epochs - e) * 5.0 + seed
            val = "" if best_val is None else f"{acc - 1:.2f}"
            w.writerow(
                [
                    e,
                    0.05,
                    3.0 / e + seed * 0.1,
                    2.0 / e,
                    acc,
                    val,
                    acc,
                    acc + 20,
                    2.0 / e,
                    1.5,
                    1000.0,
                ]
            )
    return d


@pytest.fixture()
def runs(tmp_path: Path) -> dict[str, Path]:
    kd = tmp_path / "runs" / "cifar100_res32x4_res8x4_kd"
    for seed, (v, bv, last, bt) in enumerate(
        [(71.0, 70.0, 69.0, 71.0), (73.0, 72.0, 71.0, 73.0), (75.0, 74.0, 73.0, 75.0)]
    ):
        make_run(kd / f"seed_{seed}", kd.name, seed, v, bv, last, bt)
    (kd / "summary.md").write_text("written by the engine; ignored\n")
    topkd_loss = {"name": "topkd", "ce": 1.0, "k": 5, "warmup": 20,
                  "tsm": {"gamma": 1.0, "lam": 0.5}}
    single = make_run(
        tmp_path / "runs" / "cifar100_res32x4_res8x4_topkd",
        "cifar100_res32x4_res8x4_topkd",
        0,
        None,
        None,
        76.5,
        77.25,
        topkd_loss,
    )
    return {"kd": kd, "topkd": single, "root": tmp_path / "runs"}


def _ns(**kw) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    args = parser.parse_args([str(p) for p in kw.pop("run_dirs")])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def test_find_run_dirs_expands_seed_groups_and_parents(runs):
    found = report.find_run_dirs([runs["root"]])
    assert [p.name for p in found] == ["seed_0", "seed_1", "seed_2", runs["topkd"].name]
    assert report.find_run_dirs([runs["kd"], runs["kd"] / "seed_1"]) == found[:3]


def test_markdown_table_means_and_stds(runs):
    rows = report.build_rows([report.read_run(d) for d in report.find_run_dirs([runs["root"]])])
    assert [r["name"] for r in rows] == [runs["kd"].name, runs["topkd"].name]
    kd, top = rows
    assert kd["n"] == 3 and kd["epochs"] == "3" and kd["method"] == "kd"
    assert kd["pair"] == "resnet32x4 -> resnet8x4" and kd["dataset"] == "cifar100"
    assert kd["test_acc1_at_best_val_mean"] == pytest.approx(72.0)
    assert kd["test_acc1_at_best_val_std"] == pytest.approx(2.0)  # sample std (ddof=1)
    assert kd["last_test_acc1_mean"] == pytest.approx(71.0)
    assert kd["best_test_acc1_mean"] == pytest.approx(73.0)
    assert top["method"] == "topkd" and top["test_acc1_at_best_val_mean"] is None
    md = report.format_markdown(rows)
    lines = md.splitlines()
    assert "test acc@1 at best val" in lines[0] and "oracle" in lines[0]
    kd_line = next(line for line in lines if line.startswith(f"| {runs['kd'].name} |"))
    cells = [c.strip() for c in kd_line.strip("|").split("|")]
    assert cells[4:] == ["3", "3", "73.00 ± 2.00", "72.00 ± 2.00", "71.00 ± 2.00", "73.00 ± 2.00"]
    top_line = next(line for line in lines if line.startswith(f"| {runs['topkd'].name} |"))
    cells = [c.strip() for c in top_line.strip("|").split("|")]
    assert cells[4:] == ["1", "3", "n/a", "n/a", "76.50", "77.25"]
    assert "Collapsed" not in md and kd["collapsed"] == []


def test_markdown_names_collapsed_runs(runs):
    """Runs the engine flagged as collapsed (summary.json warnings) are named under the table."""
    p = runs["kd"] / "seed_1" / "summary.json"
    p.write_text(json.dumps({**json.loads(p.read_text()),
                             "warnings": ["collapsed: every epoch at chance level"]}))
    rows = report.build_rows([report.read_run(d) for d in report.find_run_dirs([runs["root"]])])
    assert rows[0]["collapsed"] == [1] and rows[1]["collapsed"] == []
    md = report.format_markdown(rows)
    assert (f"Collapsed at chance level (every epoch; `warnings` in summary.json): "
            f"{runs['kd'].name} (seed 1).") in md


def test_cli_writes_markdown_csv_and_plots(runs, tmp_path, capsys):
    out = tmp_path / "out" / "report.md"
    plots = tmp_path / "plots"
    assert report.run(_ns(run_dirs=[runs["kd"], runs["topkd"]], output=out, plots=plots)) == 0
    assert "72.00 ± 2.00" in out.read_text()
    rows = list(csv.DictReader(io.StringIO(out.with_suffix(".csv").read_text())))
    assert [r["name"] for r in rows] == [runs["kd"].name, runs["topkd"].name]
    assert float(rows[0]["last_test_acc1_mean"]) == pytest.approx(71.0)
    assert float(rows[0]["last_test_acc1_std"]) == pytest.approx(2.0)
    assert rows[0]["last_test_acc1_values"] == "69 71 73" and rows[0]["seeds"] == "0 1 2"
    assert rows[1]["test_acc1_at_best_val_mean"] == ""
    pngs = sorted(p.name for p in plots.iterdir())
    assert pngs == sorted(
        ["test_acc1.png", "train_loss.png", f"{runs['kd'].name}.png", f"{runs['topkd'].name}.png"]
    )
    from PIL import Image

    for name in pngs:
        data = (plots / name).read_bytes()
        assert data.startswith(PNG_MAGIC)
        with Image.open(plots / name) as im:
            im.verify()
            assert im.size[0] > 100 and im.size[1] > 100


def test_cli_csv_to_stdout(runs, capsys):
    assert report.run(_ns(run_dirs=[runs["kd"]], format="csv")) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 1 and float(rows[0]["best_test_acc1_mean"]) == pytest.approx(73.0)


def test_missing_run_is_a_clean_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty")]) == 2
    assert "no finished run found" in capsys.readouterr().err
    assert report.main([str(tmp_path / "nope")]) == 2


@pytest.mark.parametrize(
    ("loss", "label"),
    [
        ({"name": "ce", "ce": 1.0}, "ce"),
        ({"name": "kd", "ls": True, "tsm": None, "tdl": None}, "kd+ls"),
        ({"name": "dkd", "tsm": {"gamma": 1.0}, "tdl": {"weight": 1.0}}, "dkd+tsm+tdl"),
        ({"name": "topkd", "tsm": {"gamma": 1.0}}, "topkd"),
        ({"name": "topkd", "tsm": None}, "topkd+no-tsm"),
        ({"name": "fitnet"}, "fitnet"),
        (None, "?"),
    ],
)
def test_method_label(loss, label):
    assert report.method_label(loss) == label


def test_topkd_cli_dispatches_to_report(runs, capsys):
    assert cli.main(["report", str(runs["kd"]), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert rows[0]["name"] == runs["kd"].name and rows[0]["n"] == "3"


def test_pivot_table_rows_methods_columns_pairs(tmp_path, capsys):
    root = tmp_path / "runs"
    kd = {"name": "kd", "ce": 0.1, "kd_weight": 0.9}
    top = {"name": "topkd", "ce": 1.0, "tsm": {}}
    for pair, base in (("a", 70.0), ("b", 60.0)):
        for method, loss, bonus in (("kd", kd, 0.0), ("topkd", top, 2.0)):
            for seed in (0, 1):
                d = make_run(root / f"{pair}_{method}" / f"seed_{seed}", f"{pair}_{method}", seed,
                             None, None, base + bonus + seed, base + bonus + seed, loss)
                cfg = yaml.safe_load((d / "config.yaml").read_text())
                cfg["model"]["name"] = f"student_{pair}"
                (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert report.main([str(root), "--pivot", "last_test_acc1"]) == 0
    out = capsys.readouterr().out
    pivot = out[out.index("last test acc@1, mean"):].splitlines()
    assert pivot[2] == ("| method | cifar100: resnet32x4 -> student_a | "
                        "cifar100: resnet32x4 -> student_b |")
    assert pivot[4] == "| kd | 70.50 ± 0.71 | 60.50 ± 0.71 |"
    assert pivot[5] == "| topkd | 72.50 ± 0.71 | 62.50 ± 0.71 |"
    with pytest.raises(ValueError, match="unknown metric"):
        report.format_pivot([], "nope")


def test_plots_show_single_epoch_runs_with_integer_epoch_ticks(tmp_path, monkeypatch):
    """A one-epoch run is a single point: it needs a marker to be visible, and the epoch axis
    must not get fractional ticks (0.96, 0.98, 1.00, ...)."""
    from matplotlib.figure import Figure

    run = make_run(tmp_path / "one", "one", 0, 70.0, 69.0, 69.0, 70.0, epochs=1)
    figures: list[Figure] = []
    real = Figure.savefig

    def keep(fig, *a, **k):
        figures.append(fig)
        return real(fig, *a, **k)

    monkeypatch.setattr(Figure, "savefig", keep)
    report.write_plots([report.read_run(run)], tmp_path / "plots")
    assert len(figures) == 3
    for fig in figures:
        for ax in fig.axes:
            lines = ax.get_lines()
            assert lines
            for line in lines:
                assert len(line.get_xdata()) == 1 and line.get_marker() not in (None, "", "None")
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert ticks and all(float(t).is_integer() for t in ticks), ticks
