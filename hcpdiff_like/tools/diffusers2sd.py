"""Diffusers model folder -> one original-layout .safetensors checkpoint (A1111 webui / ComfyUI), offline.

    python -m hcpdiff_like.tools.diffusers2sd --model_path /models/my-finetune --save_path my-finetune.safetensors \\
        [--half | --dtype bf16] [--overwrite]

SD1.x, SD2.x and SDXL folders (family detected from the folder, `--family` forces it). The file holds the
UNet, VAE and text encoder(s); tokenizers and scheduler settings are not part of the single-file format.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hcpdiff_like.tools.diffusers2sd", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", required=True, help="local diffusers folder (model_index.json, unet/, ...)")
    parser.add_argument("--save_path", required=True, help="output .safetensors file")
    parser.add_argument("--family", choices=("sd1", "sd2", "sdxl"), default=None, help="force the model family")
    parser.add_argument("--half", action="store_true", help="save fp16 weights (same as --dtype fp16)")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None, help="weight dtype of the file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --save_path")
    return parser


def convert(model_path, save_path, family=None, dtype=None, overwrite=False) -> Path:
    from ..convert.sd_checkpoint import ConversionError, write_single_file
    from ..models.loading import ModelLoadError, load_model_bundle

    model_path, save_path = Path(model_path), Path(save_path)
    if save_path.suffix != ".safetensors":
        raise ConversionError(f"--save_path {save_path}: write a .safetensors file (pickled .ckpt is not written)")
    if save_path.exists() and not overwrite:
        raise FileExistsError(f"{save_path} exists; pass --overwrite to replace it")
    if not model_path.is_dir():
        raise ModelLoadError(f"--model_path {model_path} is not a diffusers folder")
    bundle = load_model_bundle(str(model_path), family=family)
    return write_single_file(bundle, save_path, dtype=dtype, overwrite=overwrite)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from ..convert.sd_checkpoint import ConversionError
    from ..models.loading import ModelLoadError

    if args.half and args.dtype not in (None, "fp16"):
        print("diffusers2sd: error: --half and --dtype disagree", file=sys.stderr)
        return 2
    try:
        out = convert(args.model_path, args.save_path, args.family, "fp16" if args.half else args.dtype,
                      args.overwrite)
    except (ModelLoadError, ConversionError, FileExistsError, FileNotFoundError) as error:
        print(f"diffusers2sd: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote single-file checkpoint {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
