"""Helpers for tests that run the real entry point (`python -m hcpdiff_like.train`) in child processes.

One thread per process: CPU kernels then reduce in the same order in every run, so runs compare bit
for bit, and parallel children do not fight over the two cores.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

# The real entry point, with steps after $SLOW_AFTER_STEP slowed down (so a test can interrupt the run
# mid-training) and $READY_FILE written once that step is reached. Nothing else changes.
SLOW_ENTRY = """
import os, sys, time
from pathlib import Path
from hcpdiff_like.training.trainer import Trainer

original_step = Trainer.train_step

def slow_step(self, batches):
    if self.global_step >= int(os.environ["SLOW_AFTER_STEP"]):
        if os.environ.get("READY_FILE"):
            Path(os.environ["READY_FILE"]).touch()
        time.sleep(float(os.environ.get("SLOW_SECONDS", "1")))
    return original_step(self, batches)

Trainer.train_step = slow_step
from hcpdiff_like.train import main
sys.argv = ["hcpdiff_like.train", *sys.argv[1:]]
main()
"""


def child_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
                "TOKENIZERS_PARALLELISM": "false"})
    env.pop("HCPDIFF_LIKE_LAUNCH_TIME", None)
    env.update(extra)
    return env


def train_command(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "hcpdiff_like.train", *overrides]


def slow_train_command(*overrides: str) -> list[str]:
    return [sys.executable, "-c", SLOW_ENTRY, *overrides]


def start(command: list[str], log: Path, **env: str) -> subprocess.Popen:
    handle = open(log, "w")
    return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=child_env(**env))


def finish(process: subprocess.Popen, log: Path, timeout: float = 300) -> str:
    process.wait(timeout=timeout)
    return log.read_text()


def wait_for(condition: Callable[[], bool], process: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    """Poll until `condition()`; fail if the process ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"process ended (rc {process.returncode}) before the condition:\n"
                                 + log.read_text()[-3000:])
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out waiting:\n" + log.read_text()[-3000:])
        time.sleep(0.05)


def only_dir(root: Path) -> Path:
    dirs = [p for p in root.iterdir() if p.is_dir()]
    assert len(dirs) == 1, f"expected one experiment dir in {root}, found {dirs}"
    return dirs[0]
