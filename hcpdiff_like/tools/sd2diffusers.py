"""Single-file checkpoint (A1111 / ComfyUI layout) -> diffusers model folder, offline.

    python -m hcpdiff_like.tools.sd2diffusers --checkpoint_path anything-v5.safetensors \\
        --config_dir /models/sd15-diffusers --dump_path /models/anything-v5 [--half] [--overwrite]

`--config_dir` is a local diffusers folder of the same family: its tokenizer(s) are copied into the new
folder (a single file holds none) and its component configs give the architecture; components it lacks
fall back to the published configs shipped with the package (`--family` forces SD1/SD2/SDXL detection).
"""
from __future__ import annotations

import argparse
import os
import shutil
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


def bundle_to_pipeline(bundle, scheduler=None):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    common = dict(vae=bundle.vae, text_encoder=bundle.text_encoder, tokenizer=bundle.tokenizer, unet=bundle.unet,
                  scheduler=scheduler or bundle.noise_scheduler)
    if bundle.family == "sdxl":
        return StableDiffusionXLPipeline(text_encoder_2=bundle.text_encoder_2, tokenizer_2=bundle.tokenizer_2, **common)
    return StableDiffusionPipeline(safety_checker=None, feature_extractor=None, requires_safety_checker=False, **common)


def save_folder_atomically(pipeline, dump_path: Path, overwrite: bool) -> Path:
    """save_pretrained into a sibling temp folder, then rename it into place (the old one goes last)."""
    temp = dump_path.with_name(f".{dump_path.name}.tmp{os.getpid()}")
    old = dump_path.with_name(f".{dump_path.name}.old{os.getpid()}")
    shutil.rmtree(temp, ignore_errors=True)
    try:
        pipeline.save_pretrained(str(temp), safe_serialization=True)
        if dump_path.exists():
            if not overwrite:
                raise FileExistsError(f"{dump_path} exists; pass --overwrite to replace it")
            os.replace(dump_path, old)
        os.replace(temp, dump_path)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return dump_path


def convert(checkpoint_path, dump_path, config_dir, family=None, half=False, overwrite=False,
            extract_ema=False) -> Path:
    import torch

    from ..models.single_file import load_single_file_bundle

    dump_path, config_dir = Path(dump_path), Path(config_dir)
    if dump_path.exists() and not overwrite:
        raise FileExistsError(f"{dump_path} exists; pass --overwrite to replace it")
    bundle = load_single_file_bundle(checkpoint_path, family=family, config_dir=config_dir, extract_ema=extract_ema)
    pipeline = bundle_to_pipeline(bundle, scheduler_for_saving(bundle, config_dir))
    if half:
        pipeline.to(torch.float16)
    return save_folder_atomically(pipeline, dump_path, overwrite)


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
