"""Hydra multirun: one experiment dir per job and a sweep summary (CSV + markdown) at the sweep root."""
from __future__ import annotations

import csv
import json

from hcpdiff_like.training.sweep import table, write_sweep_summary


def test_multirun_writes_one_dir_per_job_and_a_summary(run_train, tmp_path):
    results, runs = run_train("-m", "cfg=demo", "logger=[console]", "train.lr=1e-4,2e-4", "train.train_steps=2",
                              "train.save_step=1000")
    assert len(results) == 2 and len(runs) == 2
    sweep_root = runs[0].parent
    assert runs[1].parent == sweep_root and sorted(p.name for p in runs) == ["0", "1"]

    with open(sweep_root / "sweep_summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(row["train.lr"]) for row in rows] == [1e-4, 2e-4]
    for row, result, run in zip(rows, results, runs):
        assert float(row["final_loss"]) == float(f"{result['final_loss']:.6g}")
        assert float(row["mean_loss"]) == float(f"{result['mean_loss']:.6g}")
        assert row["steps"] == "2" and row["exp_dir"] == run.name
        assert json.loads((run / "summary.json").read_text())["final_loss"] == result["final_loss"]
    markdown = (sweep_root / "sweep_summary.md").read_text().splitlines()
    assert markdown[0].startswith("| job | train.lr | final_loss | mean_loss |")
    assert len(markdown) == 4  # header, rule, two jobs


def test_table_columns_are_the_swept_keys(tmp_path):
    for job, (lr, rank) in enumerate([("1e-4", "4"), ("1e-4", "8"), ("2e-4", "4")]):
        (tmp_path / str(job)).mkdir()
        (tmp_path / str(job) / "summary.json").write_text(json.dumps(
            {"job": job, "overrides": ["train=demo", f"train.lr={lr}", f"plugin.rank={rank}"],
             "final_loss": 0.5 + job, "mean_loss": 0.7, "steps": 10}))
    header, body = table([json.loads((tmp_path / str(j) / "summary.json").read_text()) | {"exp_dir": str(j)}
                          for j in range(3)])
    assert header[:3] == ["job", "plugin.rank", "train.lr"]  # train=demo is the same everywhere
    assert [line[:3] for line in body] == [[0, "4", "1e-4"], [1, "8", "1e-4"], [2, "4", "2e-4"]]
    assert write_sweep_summary(tmp_path).read_text().count("\n") == 4
    assert write_sweep_summary(tmp_path / "0") is None  # no jobs below: nothing written
