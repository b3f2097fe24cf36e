"""Smoke run of tools/bench/step_overhead.py (2 steps of each loop) and the clock arithmetic it relies on."""
from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[2] / "tools" / "bench"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_step_marks_leave_out_warmup_and_measure_gaps():
    sys.path.insert(0, str(BENCH_DIR))
    import common

    clock = common.StepMarks()
    clock.marks = [10.0, 11.0, 13.0, 16.0]
    assert clock.steady_seconds(warmup=0) == [1.0, 2.0, 3.0]
    assert clock.steady_seconds(warmup=1) == [2.0, 3.0]
    assert common.median([3.0, 1.0, 2.0]) == 2.0 and math.isnan(common.median([]))


def test_paired_ratio_interval_and_verdict():
    sys.path.insert(0, str(BENCH_DIR))
    import common

    same = common.paired_ratio([2.0, 4.0, 6.0], [2.0, 4.0, 6.0])
    assert same["ratios"] == [1.0, 1.0, 1.0] and same["median"] == same["low"] == same["high"] == 1.0
    # drift shared by both loops of a repeat cancels: every pair is 1.1 though the runs range 1..10 s/step
    drifting = common.paired_ratio([1.1, 5.5, 11.0, 2.2], [1.0, 5.0, 10.0, 2.0])
    assert drifting["low"] == pytest.approx(1.1) and drifting["high"] == pytest.approx(1.1)
    spread = common.paired_ratio([0.9, 1.0, 1.0, 1.1, 1.5], [1.0] * 5)
    assert spread["median"] == pytest.approx(1.0)
    assert 0.9 <= spread["low"] <= spread["median"] <= spread["high"] <= 1.5 and spread["low"] < spread["high"]
    assert common.verdict({"low": 0.95, "high": 1.02}, 1.03) == "met"
    assert common.verdict({"low": 1.04, "high": 1.2}, 1.03) == "missed"
    assert common.verdict({"low": 0.99, "high": 1.05}, 1.03).startswith("undecided")


def test_smoke_run_prints_both_loops_their_ratio_and_a_profile(tmp_path, tiny_sd1, capsys):
    out = tmp_path / "overhead.json"
    report = load_script("step_overhead").main(["--repeats", "1", "--warmup", "0", "--steps", "2", "--threads", "1",
                                                "--profile", "--json", str(out)])
    printed = capsys.readouterr().out
    seconds = {name: float(re.search(rf"^{name}: ([0-9.]+) s/step wall, ([0-9.]+) s/step CPU", printed, re.M).group(1))
               for name in ("framework", "reference")}
    ratio = float(re.search(r"^ratio framework/reference: ([0-9.]+) wall", printed, re.M).group(1))
    assert all(value > 0 for value in seconds.values())
    assert ratio == pytest.approx(seconds["framework"] / seconds["reference"], rel=0.02)
    # a fair comparison: both loops train exactly the same LoRA parameters
    trainable = re.search(r"^trainable parameters: framework (\d+), reference (\d+)", printed, re.M)
    assert trainable.group(1) == trainable.group(2) and int(trainable.group(1)) > 0
    assert re.search(r"^paired ratio \(wall\): median [0-9.]+, 95% CI \[[0-9.]+, [0-9.]+\] over 1 repeats -> goal ",
                     printed, re.M)
    saved = json.loads(out.read_text())
    assert saved["paired_ratio"]["median"] == pytest.approx(report["ratio"])  # one repeat: the same figure
    assert saved["ratio"] == pytest.approx(report["ratio"])
    assert len(saved["per_repeat"]["framework"]) == len(saved["per_repeat"]["reference"]) == 1
    # the profile splits the loop: the step itself, the data fetch, the progress bar and the loggers
    assert re.search(r"^cProfile of the train loop \(3 steps\): [0-9.]+ ms/step", printed, re.M)
    profile = saved["profile_seconds_per_step"]
    assert profile["train_step (model, loss, backward, optimizer)"] > profile["progress bar: update"] > 0
    assert profile["data: next batch (decode, collate)"] > 0 and "loggers: scalars" in profile
