"""Start-up time: seconds from the command to the first training step of the tiny demo model.

    python tools/bench/startup.py                  # 3 runs of `python -m hcpdiff_like.train cfg=demo ...` + stages
    python tools/bench/startup.py --repeats 1 --no-stages          # smoke run
    python tools/bench/startup.py --importtime     # + the slowest imports (python -X importtime)

Each run is a subprocess of the real entry point; the first step is detected in its output (the console
log line `step 1:`; the progress bar's `1/N` as a fallback). The tiny model and demo images are written
to the cache first, so the figures are for a warm cache. `--stages` (on by default) splits the time in a
separate child process (wall and CPU time): imports, config compose, Trainer.setup() (data, model build,
plugins, optimizer), first step. Goal: under 10 s on the 2-core CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

FIRST_STEP = re.compile(rb"\| step 1: |train:[^\r\n]*?\|\s*1/\d+ ")
LOOP_START = re.compile(rb"train:\s+0%")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the entry point (median)")
    parser.add_argument("--stages", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the stages in a child process")
    parser.add_argument("--importtime", action="store_true", help="also list the slowest imports")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before a run is given up")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    parser.add_argument("overrides", nargs="*", help="extra config overrides for the runs")
    return parser


def train_command(exp_root: str, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "hcpdiff_like.train", "cfg=demo", "train.train_steps=2",
            "train.save_step=1000000", f"exp_root={exp_root}", "logger.console.log_step=1", *overrides]


def process_cpu_seconds(pid: int):
    """CPU time (user + system) a live process has used so far, from /proc (Linux); None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def time_entry_point(overrides: list[str], timeout: float) -> dict:
    """Run the entry point once; seconds from spawn to the loop start, the first step and the exit, and
    the CPU seconds the run had used at its first step (steadier than wall time on a busy machine)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with tempfile.TemporaryDirectory(prefix="hcp-startup-") as exp_root:
        started = time.perf_counter()
        process = subprocess.Popen(train_command(exp_root, overrides), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, env=env, cwd=str(common.REPO_ROOT))
        output, times = b"", {}
        while True:
            chunk = os.read(process.stdout.fileno(), 65536)
            now = time.perf_counter() - started
            if not chunk:
                break
            output += chunk
            if "loop_start" not in times and LOOP_START.search(output):
                times["loop_start"] = now
            if "first_step" not in times and FIRST_STEP.search(output):
                times["first_step"] = now
                times["first_step_cpu"] = process_cpu_seconds(process.pid)
            if now > timeout:
                process.kill()
                break
        process.wait()
        times["exit"] = time.perf_counter() - started
    if process.returncode != 0 or "first_step" not in times:
        tail = output.decode(errors="replace")[-2000:]
        raise RuntimeError(f"the training run failed (exit code {process.returncode}) or printed no first "
                           f"step; its output ended with:\n{tail}")
    return times


STAGES_CHILD = r"""
import json, os, sys, tempfile, time
spawned = float(os.environ["HCP_BENCH_SPAWNED"])
marks = {"interpreter": time.time() - spawned}
cpu = {"interpreter": time.process_time()}
t, c = time.perf_counter(), time.process_time()
def done(name):
    global t, c
    marks[name], cpu[name] = time.perf_counter() - t, time.process_time() - c
    t, c = time.perf_counter(), time.process_time()
import torch
done("import torch")
from hcpdiff_like.config.launcher import compose_config
from hcpdiff_like.training.trainer import Trainer
import hcpdiff_like.train
done("import hcpdiff_like (hydra, omegaconf, accelerate)")
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel
import peft
done("import diffusers, transformers, peft model classes (lazy modules)")
exp_root = tempfile.mkdtemp(prefix="hcp-stages-")
cfg = compose_config(["cfg=demo", "train.train_steps=1", "train.save_step=1000000", f"exp_root={exp_root}",
                      *json.loads(os.environ["HCP_BENCH_OVERRIDES"])])
done("config compose")
trainer = Trainer(cfg, exp_dir=exp_root + "/run").setup()
done("Trainer.setup (data, model build, plugins, optimizer)")
streams = [iter(d.forever()) for d in trainer.datasets]
trainer.train_step([next(s) for s in streams])
done("first train_step")
trainer.cleanup()
print("STAGES " + json.dumps({"wall": marks, "cpu": cpu}))
"""


def time_stages(overrides: list[str], timeout: float) -> dict:
    env = dict(os.environ, HCP_BENCH_SPAWNED=repr(time.time()), HCP_BENCH_OVERRIDES=json.dumps(overrides))
    done = subprocess.run([sys.executable, "-c", STAGES_CHILD], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=str(common.REPO_ROOT))
    line = next((x for x in done.stdout.splitlines() if x.startswith("STAGES ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"the stage timing child failed:\n{done.stderr[-2000:]}")
    return json.loads(line[len("STAGES "):])


def slowest_imports(count: int = 15) -> list[tuple[float, str]]:
    """`python -X importtime`: the modules with the largest cumulative import time (seconds)."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-c",
                           "import hcpdiff_like.train, hcpdiff_like.training.trainer"],
                          capture_output=True, text=True, cwd=str(common.REPO_ROOT))
    rows = []
    for line in done.stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \|(\s*)(\S+)", line)
        if match and len(match.group(2)) <= 3:  # top-level and first-level imports only
            rows.append((int(match.group(1)) / 1e6, match.group(3)))
    return sorted(rows, reverse=True)[:count]


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    common.prepare_environment()
    from hcpdiff_like.data.demo import demo_data_dir
    from hcpdiff_like.models.tiny import tiny_model_path

    tiny_model_path("sd1"), demo_data_dir()  # warm cache: writing the tiny model is a one-off
    machine = common.machine_summary()
    common.print_machine(machine)
    runs = []
    for repeat in range(args.repeats):
        times = time_entry_point(args.overrides, args.timeout)
        runs.append(times)
        cpu = times.get("first_step_cpu")
        print(f"run {repeat + 1}: loop start {times.get('loop_start', float('nan')):.2f} s, first step "
              f"{times['first_step']:.2f} s (CPU time {'n/a' if cpu is None else f'{cpu:.2f} s'}), "
              f"exit {times['exit']:.2f} s")
    first_step = common.median([r["first_step"] for r in runs])
    print(f"startup: {first_step:.2f} s from command to first training step (median of {args.repeats}; "
          f"goal < 10 s)")
    cpu_times = [r["first_step_cpu"] for r in runs if r.get("first_step_cpu") is not None]
    if cpu_times:
        print(f"startup CPU time: {common.median(cpu_times):.2f} s used by the run up to its first step")
    report = {"machine": machine, "runs": runs, "first_step_seconds": first_step,
              "first_step_cpu_seconds": common.median(cpu_times) if cpu_times else None}
    if args.stages:
        stages = time_stages(args.overrides, args.timeout)
        report["stages"] = stages
        print("stages (one child process): wall, CPU time")
        for name, seconds in stages["wall"].items():
            print(f"  {seconds:7.2f} s  {stages['cpu'][name]:7.2f} s  {name}")
    if args.importtime:
        report["slowest_imports"] = slowest_imports()
        print("slowest imports (cumulative, python -X importtime):")
        for seconds, module in report["slowest_imports"]:
            print(f"  {seconds:7.2f} s  {module}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
