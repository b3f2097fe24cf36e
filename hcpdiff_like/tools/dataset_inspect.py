"""Look at a training config's datasets without loading any model: sources, image counts, repeats,
bucket histogram and the files that would be skipped or converted.

    python -m hcpdiff_like.tools.dataset_inspect cfg=lora_anime_character dataset_dir=/data/surtr
    python -m hcpdiff_like.tools.dataset_inspect cfg=demo dataset=bucketed +dataset_dir=/data/x --histogram b.png
    python -m hcpdiff_like.tools.dataset_inspect cfg=demo --processes 2      # what each DDP process would see

Overrides are the training command's (`key=value`, `+key=value`); exit status 2 on a data/config error.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m hcpdiff_like.tools.dataset_inspect",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("overrides", nargs="*", help="cfg=<experiment or path.yaml> and key=value overrides")
    parser.add_argument("--histogram", metavar="PNG", help="also save a bucket-histogram picture here")
    parser.add_argument("--dataset", action="append", help="only this dataset (repeatable)")
    parser.add_argument("--processes", type=int, default=1, help="number of DDP processes to plan for")
    parser.add_argument("--quiet", action="store_true", help="no progress bar while checking images")
    return parser.parse_args(argv)


def bar_chart(handle, width: int = 40) -> list[str]:
    from ..data.stats import bucket_counts

    images, samples = bucket_counts(handle)
    peak = max(samples.values(), default=1) or 1
    return [f"  {w:>5}x{h:<5} {'#' * max(1, round(width * samples[(w, h)] / peak)):<{width}} "
            f"{samples[(w, h)]:g} samples ({images[(w, h)]} images)" for (w, h) in samples]


def inspect(argv: Optional[list[str]] = None, out=sys.stdout) -> int:
    args = parse_args(argv)
    from ..config.launcher import compose_config
    from ..config.validation import ConfigError
    from ..data.builder import DataConfigError, build_datasets
    from ..data.images import BadImageError, describe_problems
    from ..data.sources import SourceError

    logging.getLogger("hcpdiff_like.data").setLevel(logging.ERROR)  # we print the problems ourselves
    try:
        cfg = compose_config(args.overrides)
        data_cfg = cfg.get("data")
        if data_cfg is not None and args.dataset:
            missing = [name for name in args.dataset if name not in data_cfg]
            if missing:
                raise DataConfigError(f"no dataset {missing[0]!r} in data (have: {', '.join(data_cfg.keys())})")
            from omegaconf import OmegaConf

            data_cfg = OmegaConf.create({k: cfg.data[k] for k in args.dataset})
        handles = build_datasets(data_cfg, seed=int(cfg.get("seed", 0)), num_processes=args.processes,
                                 show_progress=not args.quiet)
    except (DataConfigError, SourceError, ConfigError, BadImageError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for handle in handles:
        print(handle.summary(), file=out)
        print("  histogram (samples per epoch):", file=out)
        for line in bar_chart(handle):
            print(line, file=out)
        if args.processes > 1:
            print(f"  with {args.processes} processes: {len(handle.sampler.batches(0))} batches each per epoch",
                  file=out)
        report = describe_problems(handle.image_problems)
        print("  files: " + ("all usable as they are" if not report else ""), file=out)
        if report:
            print("\n".join("    " + line for line in report.splitlines()), file=out)
    if args.histogram:
        from ..data.stats import save_bucket_histogram

        path = save_bucket_histogram(handles, args.histogram)
        print(f"bucket histogram written to {path}", file=out)
    return 0


def main() -> None:
    sys.exit(inspect())


if __name__ == "__main__":
    main()
