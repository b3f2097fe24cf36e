"""Gather sidecar caption and tag files of an image folder into one kohya fine-tune metadata JSON.

    python -m hcpdiff_like.tools.merge_captions TRAIN_DIR OUT_JSON [--in_json IN] [--full_path | --relative_path]

For every image in TRAIN_DIR, `<stem>.caption` becomes the entry's "caption" and `<stem>.txt` its "tags"
(kohya's merge_captions_to_metadata.py + merge_dd_tags_to_metadata.py in one step; change the extensions with
--caption_extension / --tags_extension, skip one with --no_captions / --no_tags). Multi-line captions keep
their line breaks. Keys are image stems (kohya's default), --relative_path (path inside TRAIN_DIR, needed
with --recursive when stems repeat) or --full_path (absolute). With --in_json, its entries are kept and
updated. Train from the result with `dataset=kohya_finetune` (docs/data.md); clean tags first with
`python -m hcpdiff_like.tools.clean_captions`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from ..data.metadata_json import MetadataError, check_writable, read_metadata, write_metadata

KEY_STYLES = ("stem", "relative", "full")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hcpdiff_like.tools.merge_captions", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("train_dir", help="folder of images with sidecar caption / tag files")
    parser.add_argument("out_json", help="metadata JSON to write")
    parser.add_argument("--in_json", default=None, help="existing metadata to start from (kept and updated)")
    keys = parser.add_mutually_exclusive_group()
    keys.add_argument("--full_path", action="store_true", help="key = absolute image path")
    keys.add_argument("--relative_path", action="store_true", help="key = image path relative to train_dir")
    parser.add_argument("--caption_extension", default=".caption", help="caption files (default .caption)")
    parser.add_argument("--tags_extension", default=".txt", help="tag files (default .txt)")
    parser.add_argument("--no_captions", action="store_true", help="do not read caption files")
    parser.add_argument("--no_tags", action="store_true", help="do not read tag files")
    parser.add_argument("--recursive", action="store_true", help="also images in sub-folders")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_JSON if it exists")
    return parser


def _extension(value: str) -> str:
    return value if value.startswith(".") else "." + value


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise MetadataError(f"{path} cannot be read as UTF-8 text: {error}") from None


def image_key(image: Path, train_dir: Path, key_style: str) -> str:
    if key_style == "full":
        return str(image.resolve())
    if key_style == "relative":
        return image.relative_to(train_dir).as_posix()
    return image.stem


def merge_captions(train_dir: str | Path, metadata: Optional[dict] = None, key_style: str = "stem",
                   caption_extension: Optional[str] = ".caption", tags_extension: Optional[str] = ".txt",
                   recursive: bool = False) -> tuple[dict, list[Path]]:
    """Metadata updated with every image's caption / tag file; also returns the images that had neither."""
    from tqdm.auto import tqdm

    from ..data.sources import list_images

    train_dir = Path(train_dir)
    if key_style not in KEY_STYLES:
        raise ValueError(f"key_style={key_style!r}: expected one of {KEY_STYLES}")
    if not train_dir.is_dir():
        raise MetadataError(f"image folder {train_dir} does not exist")
    images = list_images(train_dir, recursive)
    if not images:
        raise MetadataError(f"no images found in {train_dir}" + ("" if recursive else " (sub-folders: --recursive)"))
    metadata = dict(metadata or {})
    seen: dict[str, Path] = {}
    without_text = []
    for image in tqdm(images, desc="merge captions", unit="image", disable=len(images) < 500):
        key = image_key(image, train_dir, key_style)
        if key in seen:
            raise MetadataError(f"{image} and {seen[key]} both give the key {key!r}; use --relative_path")
        seen[key] = image
        entry = dict(metadata.get(key) or {})
        found = False
        for field, extension in (("caption", caption_extension), ("tags", tags_extension)):
            if extension:
                text_file = image.with_suffix(_extension(extension))
                if text_file.is_file():
                    entry[field] = _read_text(text_file)
                    found = True
        if found or key in metadata:
            metadata[key] = entry
        else:
            without_text.append(image)
    return metadata, without_text


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.no_captions and args.no_tags:
        print("error: --no_captions and --no_tags together leave nothing to merge", file=sys.stderr)
        return 2
    caption_ext, tags_ext = (None if args.no_captions else args.caption_extension,
                             None if args.no_tags else args.tags_extension)
    if caption_ext and tags_ext and _extension(caption_ext) == _extension(tags_ext):
        print(f"error: captions and tags both use {caption_ext}; change one extension or pass --no_captions / "
              "--no_tags", file=sys.stderr)
        return 2
    key_style = "full" if args.full_path else "relative" if args.relative_path else "stem"
    try:
        check_writable(args.out_json, args.overwrite)
        existing = read_metadata(args.in_json) if args.in_json else {}
        metadata, without_text = merge_captions(args.train_dir, existing, key_style, caption_ext, tags_ext,
                                                args.recursive)
        write_metadata(metadata, args.out_json, overwrite=args.overwrite)
    except (MetadataError, FileExistsError, IsADirectoryError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if without_text:
        shown = ", ".join(p.name for p in without_text[:5]) + (" ..." if len(without_text) > 5 else "")
        print(f"warning: {len(without_text)} image(s) without a caption or tag file were left out: {shown}",
              file=sys.stderr)
    print(f"wrote {args.out_json}: {len(metadata)} entries ({key_style} keys)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
