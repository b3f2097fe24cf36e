"""Convert LoRA files between ours and the kohya/webui format (A1111 webui, ComfyUI, diffusers).

    # ours -> one webui file (UNet + text encoder; SDXL: also --lora_path_TE2)
    python -m hcpdiff_like.tools.lora_convert --to_webui --lora_path ckpts/unet-1000.safetensors \\
        --lora_path_TE ckpts/text_encoder-1000.safetensors --dump_path lora-1000.safetensors
    # webui/kohya -> ours: writes unet-<name>, text_encoder-<name> (, text_encoder_2-<name>) into --dump_path
    python -m hcpdiff_like.tools.lora_convert --from_webui --lora_path lora.safetensors --dump_path converted/

Both sides use scale = alpha / rank, so LoRA/LoCon tensors are copied unchanged and ours -> webui -> ours
is bit-exact. --auto_scale_alpha folds alpha/rank into the tensors and writes alpha = rank (same effect).
LoHa and LoKr blocks are written in the LyCORIS layout webui and ComfyUI read (hada_* / lokr_* keys), with
alpha/rank folded into the first factor (docs/formats.md says why); LyCORIS files convert back to ours.
SDXL UNet keys are written in kohya's own SGM names (input_blocks_*) unless --unet_names diffusers;
the SGM numbering needs the UNet layout: pass --model (the base model) for models that are not SDXL-base
shaped. --model also checks, for --from_webui, that every layer of the file exists in that model.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hcpdiff_like.tools.lora_convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--to_webui", action="store_true", help="ours -> kohya/webui (one file)")
    direction.add_argument("--from_webui", action="store_true", help="kohya/webui -> ours (one file per model)")
    parser.add_argument("--lora_path", default=None,
                        help="--to_webui: our UNet LoRA file; --from_webui: the kohya/webui file (required)")
    parser.add_argument("--lora_path_TE", default=None, help="--to_webui: our (first) text-encoder LoRA file")
    parser.add_argument("--lora_path_TE2", default=None, help="--to_webui: our SDXL second text-encoder LoRA file")
    parser.add_argument("--dump_path", required=True,
                        help="--to_webui: output .safetensors file; --from_webui: output folder")
    parser.add_argument("--auto_scale_alpha", action="store_true",
                        help="fold alpha/rank into the tensors and write alpha = rank")
    parser.add_argument("--sdxl", action="store_true", help="expect an SDXL LoRA (error if it is not one)")
    parser.add_argument("--model", default=None, help="base model folder/file: exact UNet layout + layer check")
    parser.add_argument("--unet_names", choices=("sgm", "diffusers"), default="sgm",
                        help="SDXL UNet key names in --to_webui output (SD1/SD2 always use diffusers names)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    return parser


def _model_info(model_path):
    """(family, UnetLayout, {target: layer names}) of a base model, or Nones."""
    if model_path is None:
        return None, None, None
    from ..convert.kohya_lora import model_module_names
    from ..convert.kohya_names import UnetLayout
    from ..models.loading import load_model_bundle

    bundle = load_model_bundle(model_path)
    models = {"unet": bundle.unet, "text_encoder": bundle.text_encoder}
    if bundle.text_encoder_2 is not None:
        models["text_encoder_2"] = bundle.text_encoder_2
    return bundle.family, UnetLayout.from_config(bundle.unet.config), model_module_names(models)


def to_webui(args) -> list[Path]:
    from ..convert.kohya_lora import LoraFormatError, ours_to_kohya, read_our_lora
    from ..convert.kohya_names import UnetLayout
    from ..training.checkpoints import save_safetensors

    dump = Path(args.dump_path)
    if dump.suffix != ".safetensors":
        raise LoraFormatError(f"--dump_path {dump}: a webui LoRA file ends in .safetensors")
    if dump.exists() and not args.overwrite:
        raise FileExistsError(f"{dump} already exists (pass --overwrite to replace it)")
    slots = [("--lora_path", args.lora_path, "unet"), ("--lora_path_TE", args.lora_path_TE, "text_encoder"),
             ("--lora_path_TE2", args.lora_path_TE2, "text_encoder_2")]
    if not any(path for _, path, _ in slots):
        raise LoraFormatError("--to_webui needs at least one of --lora_path, --lora_path_TE, --lora_path_TE2")
    loras = []
    for flag, path, target in slots:
        if path is None:
            continue
        lora = read_our_lora(path)
        if lora.target != target:
            raise LoraFormatError(f"{flag} {path} holds the {lora.target} LoRA, but {flag} takes the {target} one")
        loras.append(lora)
    family = loras[0].family
    if args.sdxl and family != "sdxl":
        raise LoraFormatError(f"--sdxl given, but {loras[0].source} is a {family} LoRA")
    model_family, layout, _ = _model_info(args.model)
    if model_family and model_family != family:
        raise LoraFormatError(f"--model {args.model} is {model_family}, the LoRA is for {family}")
    sgm = None
    if family == "sdxl" and args.unet_names == "sgm":
        unet = [l for l in loras if l.target == "unet"]
        sgm = layout or UnetLayout.guess(m for l in unet for b in l.info["blocks"] for m in b["modules"])
    state, metadata = ours_to_kohya(loras, sgm_layout=sgm, auto_scale_alpha=args.auto_scale_alpha)
    metadata["ss_output_name"] = dump.stem
    metadata["modelspec.title"] = dump.stem
    save_safetensors(state, dump, metadata)
    print(f"wrote {dump}: {sum(k.endswith('.alpha') for k in state)} LoRA modules ({family})")
    return [dump]


def from_webui(args) -> list[Path]:
    from ..convert.kohya_lora import LoraFormatError, kohya_family, kohya_to_ours, read_kohya_lora
    from ..training.checkpoints import save_safetensors

    if not args.lora_path:
        raise LoraFormatError("--from_webui needs --lora_path (the kohya/webui file)")
    state, metadata = read_kohya_lora(args.lora_path)
    model_family, layout, known = _model_info(args.model)
    found = kohya_family(state, metadata)
    if args.sdxl and found != "sdxl":
        raise LoraFormatError(f"--sdxl given, but {args.lora_path} is a {found} LoRA")
    if model_family and (model_family == "sdxl") != (found == "sdxl"):
        raise LoraFormatError(f"--model {args.model} is {model_family}, but {args.lora_path} is a {found} LoRA")
    ours = kohya_to_ours(state, metadata, family=model_family, sgm_layout=layout, known_modules=known,
                         auto_scale_alpha=args.auto_scale_alpha, source=args.lora_path)
    folder = Path(args.dump_path)
    if folder.suffix == ".safetensors":
        raise LoraFormatError(f"--dump_path {folder}: --from_webui writes one file per model into a folder")
    outputs = {target: folder / f"{target}-{Path(args.lora_path).name}" for target in ours}
    existing = [p for p in outputs.values() if p.exists()]
    if existing and not args.overwrite:
        raise FileExistsError(f"{existing[0]} already exists (pass --overwrite to replace it)")
    for target, lora in ours.items():
        save_safetensors(lora.state, outputs[target], lora.metadata)
        print(f"wrote {outputs[target]}: {len(lora.state) // 2} {target} LoRA modules ({lora.family})")
    return list(outputs.values())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ..convert.kohya_lora import LoraFormatError
    from ..models.loading import ModelLoadError

    try:
        (to_webui if args.to_webui else from_webui)(args)
    except (LoraFormatError, ModelLoadError, FileExistsError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
