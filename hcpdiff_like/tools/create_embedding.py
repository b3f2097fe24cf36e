"""Create a trigger-word embedding for textual inversion / pivotal tuning.

    python -m hcpdiff_like.tools.create_embedding <model_path> <word_name> <n_vectors> [--init_text TEXT]

Writes `embs/<word_name>.pt` (A1111 webui format; SDXL: clip_l + clip_g). `--init_text` takes the token
embeddings of a text, `*[std, n]` random rows, or a mix (`"1girl, *[0.017, 2]"`); none = N(0, std^2).
"""
from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hcpdiff_like.tools.create_embedding", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_path", help="local diffusers folder or single-file checkpoint (tokenizer + text encoder)")
    parser.add_argument("word_name", help="the new word, e.g. surtr_arknights (must not already be one token)")
    parser.add_argument("n_vectors", type=int, help="number of vectors (tokens) the word stands for, e.g. 4")
    parser.add_argument("--init_text", default=None, help="initialise from this text's tokens (default: random)")
    parser.add_argument("--std", type=float, default=0.017, help="std of random rows (default 0.017)")
    parser.add_argument("--root", default="embs", help="output folder (default embs/)")
    parser.add_argument("--out", default=None, help="explicit output path (.pt or .safetensors)")
    parser.add_argument("--seed", type=int, default=None, help="seed for the random rows")
    parser.add_argument("--replace", action="store_true", help="overwrite an existing file")
    parser.add_argument("--single_file_config", default=None,
                        help="for a single-file checkpoint: a folder holding its tokenizer(s) (a diffusers folder)")
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    from ..models.loading import ModelLoadError
    from ..plugins.embedding_files import EmbeddingFormatError, WordExistsError, create_embedding

    try:
        path = create_embedding(args.model_path, args.word_name, args.n_vectors, init_text=args.init_text,
                                out_dir=args.root, std=args.std, seed=args.seed, replace=args.replace,
                                out_path=args.out, single_file_config=args.single_file_config)
    except (WordExistsError, FileExistsError, ModelLoadError, EmbeddingFormatError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({args.n_vectors} vectors for '{args.word_name}')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
