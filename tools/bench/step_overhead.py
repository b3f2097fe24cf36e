"""Framework overhead per training step: the same tiny-model LoRA training run through the full framework
(compose_config + Trainer, loggers and progress bar included) and through a minimal hand-written
diffusers + PEFT + torch loop. Same images, batch, rank, precision, lr schedule, steps and seed.

    python tools/bench/step_overhead.py                      # 11 interleaved repeats of 5 warm-up + 20 steps
    python tools/bench/step_overhead.py --repeats 1 --warmup 1 --steps 2     # smoke run
    python tools/bench/step_overhead.py --profile            # + where the framework's loop time goes (cProfile)

Prints steady-state seconds/step of each (median over repeats; warm-up steps left out) and their ratio
(goal: <= 1.03), plus the median of the per-repeat (paired) ratios with a bootstrap 95 % interval and a
verdict (met / missed / undecided), by wall clock and by process CPU time (the CPU-time ratio is the steadier one on a
machine shared with other jobs; use --threads 1 there). Checkpoints are left out of the timed steps (save_step beyond the last step).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

GOAL = 1.03  # the bound on framework / reference seconds per step


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=11, help="interleaved framework/reference runs (median)")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out at the start of each run")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--family", default="sd1", choices=["sd1", "sd2", "sdxl"], help="tiny model family")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (both loops)")
    parser.add_argument("--seed", type=int, default=114514)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--profile", action="store_true", help="also cProfile one framework run's loop")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    return parser


def framework_overrides(args) -> list[str]:
    return ["cfg=demo", "cpu=true", f"seed={args.seed}", f"mixed_precision={args.mixed_precision}",
            f"model.pretrained_model_name_or_path=tiny:{args.family}", f"train.lr={args.lr}",
            f"plugin.rank={args.rank}", f"data.dataset1.batch_size={args.batch_size}",
            "data.dataset1.resolution=64", f"train.workers={args.workers}"]


def reference_options(args) -> common.ReferenceOptions:
    from hcpdiff_like.data.demo import demo_data_dir

    return common.ReferenceOptions(images=demo_data_dir(), resolution=64, batch_size=args.batch_size,
                                   rank=args.rank, lr=args.lr, seed=args.seed,
                                   mixed_precision=args.mixed_precision, workers=args.workers)


# (file name ending, function name) -> label: the framework's own per-step work outside the model
PROFILE_PARTS = {("trainer.py", "train_step"): "train_step (model, loss, backward, optimizer)",
                 ("builder.py", "forever"): "data: next batch (decode, collate)",
                 ("std.py", "set_postfix"): "progress bar: set_postfix", ("std.py", "update"): "progress bar: update",
                 ("loggers.py", "scalars"): "loggers: scalars", ("validation.py", "maybe_validate"): "validation hook",
                 ("signals.py", "should_stop"): "stop-signal check",
                 ("trainer.py", "save_checkpoint"): "checkpoint save (once, after the last step)",
                 ("conditioning.py", "text_to_ids"): "tokenize captions (inside train_step)"}


def profile_framework(args) -> dict:
    """cProfile one framework run's train loop; print where each step's time goes (ms/step, upper bounds:
    cProfile slows Python-heavy code more than the torch kernels)."""
    import cProfile
    import pstats

    from hcpdiff_like.training.trainer import Trainer

    profiler = cProfile.Profile()
    train = Trainer.train

    def profiled_train(self):
        profiler.enable()
        try:
            return train(self)
        finally:
            profiler.disable()

    Trainer.train = profiled_train
    try:
        common.run_framework(framework_overrides(args), args.warmup, args.steps)
    finally:
        Trainer.train = train
    steps = args.warmup + args.steps + 1
    stats = pstats.Stats(profiler).stats
    parts, loop_total = {}, 0.0
    for (filename, _, function), (_, _, _, cumulative, _) in stats.items():
        if filename.endswith("trainer.py") and function == "train":
            loop_total = cumulative
        for (suffix, name), label in PROFILE_PARTS.items():
            if filename.endswith(suffix) and function == name:
                parts[label] = max(parts.get(label, 0.0), cumulative)  # outermost of same-named functions
    print(f"cProfile of the train loop ({steps} steps): {1000 * loop_total / steps:.2f} ms/step in all")
    for label, seconds in sorted(parts.items(), key=lambda item: -item[1]):
        print(f"  {1000 * seconds / steps:9.2f} ms/step  {label}")
    rest = loop_total - sum(v for k, v in parts.items() if "inside train_step" not in k)
    print(f"  {1000 * rest / steps:9.2f} ms/step  the rest of the loop body")
    return {label: seconds / steps for label, seconds in parts.items()}


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    common.prepare_environment()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    machine = common.machine_summary()
    common.print_machine(machine)
    print(f"setup: tiny {args.family}, LoRA rank {args.rank} on UNet attention + feed-forward, batch "
          f"{args.batch_size}, 64 px, precision {args.mixed_precision}, {args.repeats} repeats x "
          f"({args.warmup} warm-up + {args.steps} timed steps), CPU")
    per_repeat = {"framework": [], "reference": []}
    per_repeat_cpu = {"framework": [], "reference": []}
    trainable = {}
    for repeat in range(args.repeats):
        runs = {}
        # alternate which loop goes first, so that neither always runs on a warmer (or more fragmented) process
        for name in (("framework", "reference") if repeat % 2 == 0 else ("reference", "framework")):
            runs[name] = (common.run_framework(framework_overrides(args), args.warmup, args.steps)
                          if name == "framework" else
                          common.run_reference(common.load_tiny_components(args.family), reference_options(args),
                                               args.warmup, args.steps))
        framework, reference = runs["framework"], runs["reference"]
        for result in (framework, reference):
            per_repeat[result.name].append(result.seconds_per_step)
            per_repeat_cpu[result.name].append(result.cpu_seconds_per_step)
            trainable[result.name] = result.trainable_parameters
        print(f"repeat {repeat + 1}: framework {framework.seconds_per_step:.4f} s/step "
              f"(CPU {framework.cpu_seconds_per_step:.4f}), reference {reference.seconds_per_step:.4f} s/step "
              f"(CPU {reference.cpu_seconds_per_step:.4f}), ratio {framework.seconds_per_step / reference.seconds_per_step:.3f}")
    if trainable["framework"] != trainable["reference"]:
        print(f"warning: trainable parameters differ: {trainable}")
    figures = {name: common.median(values) for name, values in per_repeat.items()}
    cpu_figures = {name: common.median(values) for name, values in per_repeat_cpu.items()}
    ratio = figures["framework"] / figures["reference"]
    cpu_ratio = cpu_figures["framework"] / cpu_figures["reference"]
    paired = common.paired_ratio(per_repeat["framework"], per_repeat["reference"])
    paired_cpu = common.paired_ratio(per_repeat_cpu["framework"], per_repeat_cpu["reference"])
    print(f"trainable parameters: framework {trainable['framework']}, reference {trainable['reference']}")
    for name in ("framework", "reference"):
        print(f"{name}: {figures[name]:.4f} s/step wall, {cpu_figures[name]:.4f} s/step CPU time "
              f"(median of {args.repeats}; wall per repeat {common.format_seconds(per_repeat[name])})")
    print(f"ratio framework/reference: {ratio:.3f} wall, {cpu_ratio:.3f} CPU time (goal <= {GOAL})")
    for label, interval in (("wall", paired), ("CPU time", paired_cpu)):
        print(f"paired ratio ({label}): median {interval['median']:.3f}, 95% CI [{interval['low']:.3f}, "
              f"{interval['high']:.3f}] over {args.repeats} repeats -> goal {common.verdict(interval, GOAL)}")
    report = {"machine": machine, "args": {k: str(v) for k, v in vars(args).items()}, "per_repeat": per_repeat,
              "per_repeat_cpu": per_repeat_cpu, "seconds_per_step": figures, "cpu_seconds_per_step": cpu_figures,
              "ratio": ratio, "cpu_ratio": cpu_ratio, "paired_ratio": paired, "paired_cpu_ratio": paired_cpu,
              "verdict": common.verdict(paired, GOAL), "trainable_parameters": trainable}
    if args.profile:
        report["profile_seconds_per_step"] = profile_framework(args)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
