"""Extract a LoRA from a fine-tuned model by SVD of (tuned - base), layer by layer.

    python -m hcpdiff_like.tools.extract_lora --base /models/sd15 --tuned /models/my-finetune \\
        --rank 16 --conv_rank 8 --dump_path extracted/ [--name finetune] [--to_webui finetune-lora.safetensors]

Writes our files `<dump_path>/unet-<name>.safetensors` and `text_encoder-<name>.safetensors` (SDXL also
`text_encoder_2-...`) for each model part that changed; load them like trained checkpoints, or convert
with tools.lora_convert (or pass --to_webui). 3x3 convs are extracted only with --conv_rank > 0 (LoCon).
Changed parameters no LoRA can hold (norms, embeddings, biases) are listed, not extracted.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

TARGETS = ("unet", "text_encoder", "text_encoder_2")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hcpdiff_like.tools.extract_lora", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="base model (diffusers folder or single file)")
    parser.add_argument("--tuned", required=True, help="fine-tuned model of the same architecture")
    parser.add_argument("--dump_path", required=True, help="output folder")
    parser.add_argument("--name", default="extracted", help="file name part: unet-<name>.safetensors ...")
    parser.add_argument("--rank", type=int, default=8, help="rank for Linear and 1x1 conv layers")
    parser.add_argument("--conv_rank", type=int, default=0, help="rank for 3x3 convs (0 = leave them out)")
    parser.add_argument("--min_diff", type=float, default=1e-5,
                        help="layers whose weights changed by at most this (max abs) are skipped")
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS),
                        help="model parts to extract (default: all the model has)")
    parser.add_argument("--layers", nargs="+", default=None,
                        help="only these layers (exact names or re: patterns, as in plugin configs)")
    parser.add_argument("--to_webui", default=None, help="also write one kohya/webui .safetensors file here")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    return parser


def run(args) -> list[Path]:
    from ..convert.extract import extract_lora
    from ..convert.kohya_lora import LoraFormatError, ours_to_kohya, parse_our_lora
    from ..convert.kohya_names import UnetLayout
    from ..models.loading import load_model_bundle
    from ..training.checkpoints import save_safetensors

    if args.rank <= 0 or args.conv_rank < 0:
        raise ValueError("--rank must be > 0 and --conv_rank >= 0")
    if args.to_webui and not args.to_webui.endswith(".safetensors"):
        raise LoraFormatError(f"--to_webui {args.to_webui}: a webui LoRA file ends in .safetensors")
    folder = Path(args.dump_path)
    outputs = {t: folder / f"{t}-{args.name}.safetensors" for t in args.targets}
    planned = [p for p in outputs.values()] + ([Path(args.to_webui)] if args.to_webui else [])
    existing = [p for p in planned if p.exists()]
    if existing and not args.overwrite:
        raise FileExistsError(f"{existing[0]} already exists (pass --overwrite to replace it)")
    base, tuned = load_model_bundle(args.base), load_model_bundle(args.tuned)
    if base.family != tuned.family:
        raise ValueError(f"--base is {base.family} but --tuned is {tuned.family}: not the same model family")
    written, ours = [], []
    for target in args.targets:
        base_model, tuned_model = getattr(base, target, None), getattr(tuned, target, None)
        if base_model is None:
            continue
        result = extract_lora(base_model, tuned_model, target, base.family, args.rank, args.conv_rank,
                              args.min_diff, args.layers)
        if result.skipped_other:
            print(f"{target}: {len(result.skipped_other)} changed parameters are not extracted "
                  f"(e.g. {result.skipped_other[0]})")
        if not result.state:
            print(f"{target}: no layer changed by more than {args.min_diff}; nothing written")
            continue
        save_safetensors(result.state, outputs[target], result.metadata)
        worst = max(result.errors.values())
        print(f"wrote {outputs[target]}: {len(result.errors)} layers, worst relative error {worst:.3g}")
        written.append(outputs[target])
        ours.append(parse_our_lora(result.state, result.metadata, str(outputs[target])))
    if not written:
        raise ValueError(f"{args.tuned} does not differ from {args.base} in any selected layer")
    if args.to_webui:
        layout = UnetLayout.from_config(base.unet.config) if base.family == "sdxl" else None
        state, metadata = ours_to_kohya(ours, sgm_layout=layout)
        written.append(save_safetensors(state, args.to_webui, metadata))
        print(f"wrote {args.to_webui} (kohya/webui format)")
    return written


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ..convert.extract import ExtractError
    from ..convert.kohya_lora import LoraFormatError
    from ..models.loading import ModelLoadError

    try:
        run(args)
    except (ExtractError, LoraFormatError, ModelLoadError, FileExistsError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
