"""Write a ready training config for a dataset tree (the anime screenshot pipeline's `prepare_hcp` step).

    python -m hcpdiff_like.tools.prepare_config --dataset_dir /data/pipeline/training --config_dst_dir runs/aoba \\
        --model /models/animefull [--pivotal --trigger_word_file /data/pipeline/training/emb_init.json]
    accelerate launch -m hcpdiff_like.train cfg=runs/aoba/prepared.yaml

Every folder below `--dataset_dir` that directly holds images becomes one data source (`ImageCaptionSource`,
same-name .txt captions, `repeat` = its multiply.txt, 1 without one; `--round_repeats` rounds like prepare_hcp).
The config builds on a shipped experiment (`--base_config`; default `lora_anime_character` with --pivotal,
`lora_conventional` without). With `--pivotal` every name in the trigger word file (emb_init.json:
{name: [init tags]}, or a CSV `name[,init text]`) becomes an embedding in `--emb_dir`, initialised from its
tags plus random vectors, and is trained with the LoRA. Paths in the config are absolute.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

import yaml

from .flatten_folder import IMAGE_SUFFIXES, LayoutError, read_multiply


class PrepareError(ValueError):
    """Bad dataset, trigger word file or output location; the message names it."""


def find_image_folders(dataset_dir: Path, round_repeats: bool = False) -> list[tuple[Path, float]]:
    """(folder, repeat) for every folder under dataset_dir (itself included) that directly holds images.

    repeat = the folder's multiply.txt (1 without one); our sources take fractions (2.6 = two copies plus a
    60% chance of a third per epoch). `round_repeats` rounds like the pipeline's prepare_hcp (0.4 -> 0)."""
    found = []
    for folder, subdirs, files in os.walk(dataset_dir):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        if any(Path(f).suffix.lower() in IMAGE_SUFFIXES for f in files):
            multiply = read_multiply(Path(folder))
            repeat = 1 if multiply is None else (round(multiply) if round_repeats else round(multiply, 4))
            found.append((Path(folder), repeat))
    return sorted(found)


def read_trigger_words(path: Path) -> dict[str, list[str] | str]:
    """emb_init.json {name: [tags]} or a CSV with rows `name[,init text]`."""
    if not path.is_file():
        raise PrepareError(f"--trigger_word_file {path} does not exist")
    if path.suffix == ".json":
        try:
            words = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise PrepareError(f"{path}: not valid JSON ({error})") from error
        if not isinstance(words, dict) or not all(isinstance(v, list) for v in words.values()):
            raise PrepareError(f"{path}: expected an object mapping each name to a list of init tags")
        return {str(k): [str(t) for t in v] for k, v in words.items()}
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            return {row[0].strip(): (row[1].strip() if len(row) > 1 else "") for row in csv.reader(handle)
                    if row and row[0].strip()}
    raise PrepareError(f"--trigger_word_file {path}: expected a .json or .csv file")


def init_text(tags: list[str] | str, std: float, n_random: int) -> str:
    """The pipeline's init: the tags' token embeddings, then `n_random` random N(0, std^2) vectors."""
    text = tags if isinstance(tags, str) else " ".join(tags)
    random_part = f"*[{std}, {n_random}]" if n_random > 0 else ""
    return f"{text} {random_part}".strip()


def build_config_text(args, folders: list[tuple[Path, int]], words: list[str], emb_dir: Path) -> str:
    dataset_dir = Path(args.dataset_dir).resolve()
    sources = {}
    for index, (folder, repeat) in enumerate(folders, start=1):
        # `source1` also replaces the base config's template source of that name, key by key
        sources[f"source{index}"] = {
            "_target_": "hcpdiff_like.data.sources.ImageCaptionSource",
            "name": folder.relative_to(dataset_dir).as_posix() if folder != dataset_dir else dataset_dir.name,
            "img_dir": str(folder), "caption_ext": ".txt", "repeat": repeat,
            "prompt_template": "{caption}", "word_names": {},
        }
    body: dict = {"dataset_dir": str(dataset_dir), "exp_root": str(Path(args.exp_dir).resolve())}
    if words:
        body["character_name"] = words[0]
    if args.model:
        model = args.model if str(args.model).startswith("tiny") else str(Path(args.model).expanduser().resolve())
        body["model"] = {"pretrained_model_name_or_path": model}
        if args.single_file_config:
            body["model"]["single_file_config"] = str(Path(args.single_file_config).expanduser().resolve())
    if words:
        body["embeddings"] = {"emb_dir": str(emb_dir), "train": [{"name": w, "lr": "${train.emb_lr}"} for w in words]}
    body["data"] = {"dataset1": {"sources": sources}}
    path = Path(args.config_dst_dir).resolve() / f"{args.config_name}.yaml"
    header = [
        "# @package _global_",
        f"# Written by hcpdiff_like.tools.prepare_config for {dataset_dir}: {len(folders)} image folders, one",
        "# data source each (repeat = multiply.txt)" + (f"; trained words: {', '.join(words)}" if words else ""),
        "# Paths are absolute: run prepare_config again after moving the dataset. Train with",
        f"#   accelerate launch -m hcpdiff_like.train cfg={path}",
        f"defaults:\n  - {args.base_config}   # the shipped recipe this run builds on (cfgs/train/)\n  - _self_\n",
    ]
    return "\n".join(header) + yaml.safe_dump(body, sort_keys=False, allow_unicode=True, width=120)


def prepare(args) -> Path:
    from ..config.launcher import shipped_cfg_dir
    from ..training.checkpoints import atomic_write

    dataset_dir = Path(args.dataset_dir).expanduser()
    if not dataset_dir.is_dir():
        raise PrepareError(f"--dataset_dir {dataset_dir} is not a folder")
    args.base_config = args.base_config or ("lora_anime_character" if args.pivotal else "lora_conventional")
    if not (shipped_cfg_dir() / "train" / f"{args.base_config}.yaml").is_file():
        raise PrepareError(f"--base_config {args.base_config}: no such shipped experiment in cfgs/train/")
    if args.config_name == args.base_config:
        raise PrepareError("--config_name must differ from --base_config (the file would include itself)")
    dst = Path(args.config_dst_dir).expanduser()
    target = dst / f"{args.config_name}.yaml"
    if target.exists() and not args.overwrite:
        raise FileExistsError(f"{target} exists; pass --overwrite to replace it")
    try:
        found = find_image_folders(dataset_dir.resolve(), args.round_repeats)
    except LayoutError as error:
        raise PrepareError(str(error)) from error
    folders = [(folder, repeat) for folder, repeat in found if repeat > 0]
    for folder, _ in sorted(set(found) - set(folders)):
        print(f"prepare_config: warning: {folder} has repeat 0 (multiply.txt); left out", file=sys.stderr)
    if not folders:
        raise PrepareError(f"--dataset_dir {dataset_dir}: no folder with images ({', '.join(IMAGE_SUFFIXES)})")

    words: dict = {}
    emb_dir = Path(args.emb_dir or dst / "embs").expanduser().resolve()
    if args.pivotal:
        if not args.trigger_word_file:
            raise PrepareError("--pivotal needs --trigger_word_file (emb_init.json or .csv)")
        if not args.model:
            raise PrepareError("--pivotal needs --model: the embeddings are created from its text encoder(s)")
        words = read_trigger_words(Path(args.trigger_word_file).expanduser())
        if not words:
            raise PrepareError(f"{args.trigger_word_file}: no trigger words")
        existing = [emb_dir / f"{name}.pt" for name in words if (emb_dir / f"{name}.pt").exists()]
        if existing and not args.overwrite:
            raise FileExistsError(f"{existing[0]} exists; pass --overwrite to replace the embeddings")
        create_embeddings(args.model, words, emb_dir, args)
    args.exp_dir = args.exp_dir or str(dst / "exps")
    text = build_config_text(args, folders, list(words), emb_dir)
    atomic_write(target, lambda temp: Path(temp).write_text(text, encoding="utf-8"))
    return target


def create_embeddings(model: str, words: dict, emb_dir: Path, args) -> None:
    from ..plugins.embedding_files import WordExistsError, create_embedding

    for name, tags in words.items():
        try:
            create_embedding(model, name, args.n_vectors, init_text=init_text(tags, args.std, args.n_random),
                             out_dir=emb_dir, std=args.std, seed=args.seed, replace=args.overwrite,
                             single_file_config=args.single_file_config)
        except WordExistsError as error:
            raise PrepareError(f"trigger word file: {error}") from error
        print(f"created embedding {emb_dir / (name + '.pt')} ({args.n_vectors} vectors)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hcpdiff_like.tools.prepare_config", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", required=True, help="dataset root; every image folder below is a source")
    parser.add_argument("--config_dst_dir", required=True, help="folder for the config (and embs/, exps/)")
    parser.add_argument("--config_name", default="prepared", help="file name of the config (default prepared)")
    parser.add_argument("--base_config", default=None, help="shipped experiment to build on (cfgs/train/<name>)")
    parser.add_argument("--model", default=None, help="base model: diffusers folder or single file (or tiny:sd1)")
    parser.add_argument("--single_file_config", default=None,
                        help="for a single-file --model: a folder holding its tokenizer(s) (model.single_file_config)")
    parser.add_argument("--pivotal", action="store_true", help="also create and train the trigger-word embeddings")
    parser.add_argument("--trigger_word_file", default=None, help="emb_init.json {name: [tags]} or .csv")
    parser.add_argument("--emb_dir", default=None, help="where the embeddings go (default <config_dst_dir>/embs)")
    parser.add_argument("--exp_dir", default=None, help="experiment root (default <config_dst_dir>/exps)")
    parser.add_argument("--n_vectors", "--n_max_tokens", type=int, default=8, help="vectors per embedding (8)")
    parser.add_argument("--n_random", "--n_rand_tokens", type=int, default=10,
                        help="random vectors after the init tags (10)")
    parser.add_argument("--std", type=float, default=0.1, help="std of the random vectors (0.1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random vectors")
    parser.add_argument("--round_repeats", action="store_true",
                        help="round multiply.txt to whole repeats like the pipeline's prepare_hcp (0.4 -> 0: left out)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing config / embeddings")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from ..models.loading import ModelLoadError

    try:
        path = prepare(args)
    except (PrepareError, FileExistsError, ModelLoadError) as error:
        print(f"prepare_config: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path}\ntrain with: accelerate launch -m hcpdiff_like.train cfg={path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
