"""Smoke run of tools/bench/startup.py: one real `python -m hcpdiff_like.train cfg=demo` run, timed to its first step."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "tools" / "bench" / "startup.py"


@pytest.fixture(scope="module")
def startup():
    spec = importlib.util.spec_from_file_location("bench_startup", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_first_step_is_recognised_in_log_and_progress_output(startup):
    assert startup.FIRST_STEP.search(b"2026-12-01 21:11:41 | step 1: loss=0.5, lr=1e-05")
    assert startup.FIRST_STEP.search(b"\rtrain:  50%|#####     | 1/2 [00:00<00:00,  2.81step/s]")
    assert not startup.FIRST_STEP.search(b"\rtrain:   0%|          | 0/2 [00:00<?, ?step/s]")
    assert not startup.FIRST_STEP.search(b"2026-12-01 21:11:41 | step 10: loss=0.5")


def test_smoke_run_times_the_entry_point_to_its_first_step(startup, tiny_sd1, capsys):
    report = startup.main(["--repeats", "1", "--no-stages"])
    printed = capsys.readouterr().out
    seconds = float(re.search(r"^startup: ([0-9.]+) s from command to first training step", printed, re.M).group(1))
    run = report["runs"][0]
    assert seconds == pytest.approx(run["first_step"], abs=0.01)
    assert 0 < run["loop_start"] <= run["first_step"] <= run["exit"]


def test_a_failing_run_is_reported_with_its_output(startup, tiny_sd1):
    with pytest.raises(RuntimeError, match="trian"):
        startup.time_entry_point(["train.trian_steps=3"], timeout=120)
