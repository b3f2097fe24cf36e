"""Single-file checkpoint (A1111 / ComfyUI layout) -> diffusers model folder, offline.

    python -m hcpdiff_like.tools.sd2diffusers --checkpoint_path anything-v5.safetensors \\
        --config_dir /models/sd15-diffusers --dump_path /models/anything-v5 [--half] [--overwrite]

`--config_dir` is a local diffusers folder of the same family: its tokenizer(s) are copied into the new
folder (a single file holds none) and its component configs give the architecture; components it lacks
fall back to the published configs shipped with the package (`--family` forces SD1/SD2/SDXL detection).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hcpdiff_like.tools.sd2diffusers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_path", required=True, help="single-file .safetensors (or weights-only .ckpt)")
    parser.add_argument("--dump_path", required=True, help="diffusers folder to write")
    parser.add_argument("--config_dir", required=True,
                        help="local diffusers folder of the same family (tokenizers + component configs)")
    parser.add_argument("--family", choices=("sd1", "sd2", "sdxl"), default=None, help="force the model family")
    parser.add_argument("--half", action="store_true", help="save fp16 weights")
    parser.add_argument("--extract_ema", action="store_true",
                        help="use the UNet's EMA weights (model_ema.*) of a file that holds both")
    for flag in ("--from_safetensors", "--to_safetensors"):  # HCP-Diffusion's flags: always the case here
        parser.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --dump_path")
    return parser


def scheduler_for_saving(bundle, config_dir: Path):
    """The scheduler class and settings the model was published with (config_dir's, else the shipped one)."""
    import diffusers

    from ..models.configs import FAMILY_CONFIG, published_config_dir

    root = config_dir if (config_dir / "scheduler").is_dir() else published_config_dir(FAMILY_CONFIG[bundle.family])
    config = diffusers.DDPMScheduler.load_config(str(root), subfolder="scheduler", local_files_only=True)
    scheduler_class = getattr(diffusers, config.get("_class_name", "DDPMScheduler"), diffusers.DDPMScheduler)
    return scheduler_class.from_config(config)


def convert(checkpoint_path, dump_path, config_dir, family=None, half=False, overwrite=False,
            extract_ema=False) -> Path:
    import torch

    from ..models.single_file import load_single_file_bundle

    dump_path, config_dir = Path(dump_path), Path(config_dir)
    if dump_path.exists() and not overwrite:
        raise FileExistsError(f"{dump_path} exists; pass --overwrite to replace it")
    from ..convert.merge import save_bundle_as_diffusers

    bundle = load_single_file_bundle(checkpoint_path, family=family, config_dir=config_dir, extract_ema=extract_ema)
    return save_bundle_as_diffusers(bundle, dump_path, dtype=torch.float16 if half else None, overwrite=overwrite,
                                    scheduler=scheduler_for_saving(bundle, config_dir))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from ..models.loading import ModelLoadError

    try:
        out = convert(args.checkpoint_path, args.dump_path, args.config_dir, args.family, args.half, args.overwrite,
                      args.extract_ema)
    except (ModelLoadError, FileExistsError, FileNotFoundError) as error:
        print(f"sd2diffusers: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote diffusers folder {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
