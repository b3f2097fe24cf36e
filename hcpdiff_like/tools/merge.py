"""Bake LoRAs (each with a weight) and embeddings into a base model; save a diffusers folder or a single file.

    python -m hcpdiff_like.tools.merge --model /models/animefull \\
        --lora exps/<run>/ckpts/unet-1000.safetensors 0.85 --lora exps/<run>/ckpts/text_encoder-1000.safetensors 0.85 \\
        --embedding exps/<run>/ckpts/surtr_arknights-1000.pt --dump_path /models/animefull-surtr
    # a single-file checkpoint for webui / ComfyUI (no embeddings: publish the .pt next to it)
    python -m hcpdiff_like.tools.merge --model /models/animefull --lora lora-1000.safetensors 0.8 \\
        --dump_path animefull-surtr.safetensors --dtype fp16

--lora takes our per-model files (unet-<step>, text_encoder-<step>, ...) or kohya/webui files, in any
mix; the weight (default 1.0) multiplies each LoRA's delta: W = W_base + weight * alpha/rank * up @ down.
Embedding words become tokens `word`, `word_1`, ... in the saved tokenizer(s) (diffusers' convention).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hcpdiff_like.tools.merge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="base model: diffusers folder or single-file checkpoint")
    parser.add_argument("--lora", nargs="+", action="append", default=[], metavar=("PATH", "WEIGHT"),
                        help="a LoRA file and its weight (default 1.0); repeat for several")
    parser.add_argument("--embedding", action="append", default=[], help="embedding file to bake in; repeatable")
    parser.add_argument("--dump_path", required=True,
                        help="output: a folder (diffusers) or a .safetensors file (single-file checkpoint)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="save in this precision")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return parser


def parse_lora_args(values: list[list[str]]) -> list[tuple[Path, float]]:
    pairs = []
    for item in values:
        if len(item) > 2:
            raise ValueError(f"--lora {' '.join(item)}: give one file and at most one weight per --lora")
        try:
            weight = float(item[1]) if len(item) == 2 else 1.0
        except ValueError:
            raise ValueError(f"--lora {item[0]} {item[1]}: the weight must be a number") from None
        path = Path(item[0])
        if not path.is_file():
            raise FileNotFoundError(f"--lora {path} does not exist")
        pairs.append((path, weight))
    return pairs


def run(args) -> Path:
    import torch

    from ..convert.merge import merge_embeddings_into_bundle, merge_lora_into_bundle, save_bundle_as_diffusers
    from ..models.loading import load_model_bundle

    loras = parse_lora_args(args.lora)
    embeddings = [Path(p) for p in args.embedding]
    for path in embeddings:
        if not path.is_file():
            raise FileNotFoundError(f"--embedding {path} does not exist")
    dump = Path(args.dump_path)
    single_file = dump.suffix in SINGLE_FILE_SUFFIXES
    if dump.exists() and not args.overwrite:
        raise FileExistsError(f"{dump} already exists (pass --overwrite to replace it)")
    if single_file and embeddings:
        raise ValueError("embeddings cannot be baked into a single-file checkpoint (its tokenizer vocabulary is "
                         "fixed); save a diffusers folder, or publish the embedding files next to the checkpoint")
    if dump.suffix == ".ckpt":
        raise ValueError(f"--dump_path {dump}: pickled .ckpt files are not written; use .safetensors")
    if not loras and not embeddings:
        raise ValueError("nothing to merge: give --lora and/or --embedding")
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None

    bundle = load_model_bundle(args.model)
    for line in merge_lora_into_bundle(bundle, loras):
        print(line)
    if embeddings:
        for line in merge_embeddings_into_bundle(bundle, embeddings):
            print(line)
    if single_file:
        try:
            from ..convert.sd_checkpoint import write_single_file
        except ImportError as error:
            raise ValueError(f"single-file output needs hcpdiff_like.convert.sd_checkpoint: {error}") from error
        write_single_file(bundle, dump, dtype=dtype, overwrite=args.overwrite)
    else:
        save_bundle_as_diffusers(bundle, dump, dtype=dtype, overwrite=args.overwrite)
    print(f"wrote {dump}")
    return dump


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ..convert.kohya_lora import LoraFormatError
    from ..models.loading import ModelLoadError

    try:
        run(args)
    except (LoraFormatError, ModelLoadError, FileExistsError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
