"""Convert trigger-word embeddings between our files and the formats webui / kohya / diffusers use.

    python -m hcpdiff_like.tools.embedding_convert --src ckpts/surtr_arknights-1000.pt --dst surtr.safetensors

The output format follows the destination suffix: `.pt` = A1111 `string_to_param` (SDXL: clip_l + clip_g),
`.safetensors` = kohya `emb_params` (SDXL: clip_l + clip_g). Readable inputs: those, HCP-Diffusion's `.pt`
(an SDXL word as one [n, 768+1280] tensor: pass `--sdxl_widths 768,1280` to split it) and diffusers concepts.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hcpdiff_like.tools.embedding_convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="embedding file to read")
    parser.add_argument("--dst", required=True, help="file to write (.pt or .safetensors)")
    parser.add_argument("--name", default=None, help="word name stored in the file (default: dst stem)")
    parser.add_argument("--sdxl_widths", default=None,
                        help="split a concatenated SDXL tensor into clip_l/clip_g of these widths, e.g. 768,1280")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dst")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ..plugins.embedding_files import EmbeddingFile, EmbeddingFormatError, read_embedding, split_for_encoders, \
        write_embedding

    dst = Path(args.dst)
    try:
        if dst.exists() and not args.overwrite:
            raise FileExistsError(f"{dst} already exists (pass --overwrite to replace it)")
        if dst.suffix not in (".pt", ".safetensors"):
            raise EmbeddingFormatError(f"--dst {dst}: the suffix must be .pt or .safetensors")
        emb = read_embedding(args.src)
        vectors = emb.vectors
        if args.sdxl_widths:
            widths = [int(w) for w in args.sdxl_widths.split(",")]
            vectors = split_for_encoders(emb, widths, source=args.src)
        write_embedding(EmbeddingFile(args.name or dst.stem, vectors, step=emb.step), dst)
    except (EmbeddingFormatError, FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {dst} ({emb.n_vectors} vectors, {len(vectors)} text encoder(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
