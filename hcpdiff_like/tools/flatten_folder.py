"""Hierarchical dataset folders <-> kohya's flat `N_name` folders (the anime screenshot pipeline's layout tool).

    python -m hcpdiff_like.tools.flatten_folder --src_dir /data/pipeline/training [--separator ~] [--dry_run]
    python -m hcpdiff_like.tools.flatten_folder --src_dir /data/pipeline/training --revert

Forward: every leaf folder (one without subfolders) moves to `src_dir/<repeat>_<a~b~c>`, where a/b/c is its path
below `src_dir` and repeat = round(first line of its multiply.txt), 1 without one. `multiply.txt` travels inside
the folder, so `--revert` (drop the `N_` prefix, split at the separator) restores the tree exactly.
Refused before anything moves: a folder name that already holds the separator, images in a folder that also
has subfolders (kohya could not see them), a target that already exists, an unreadable multiply.txt.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from tqdm import tqdm

MULTIPLY_FILE = "multiply.txt"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
FLAT_NAME = re.compile(r"^(\d+)_(.+)$")


class LayoutError(ValueError):
    """The folder tree cannot be flattened or restored safely; the message names the folder."""


def read_multiply(folder: Path) -> float | None:
    """The float in the first line of the folder's multiply.txt, None when the file is absent."""
    file = folder / MULTIPLY_FILE
    if not file.is_file():
        return None
    text = file.read_text(encoding="utf-8").strip().splitlines()
    try:
        value = float(text[0])
    except (IndexError, ValueError) as error:
        raise LayoutError(f"{file}: first line is not a number ({text[:1]})") from error
    if value < 0:
        raise LayoutError(f"{file}: negative multiply {value}")
    return value


def read_repeat(folder: Path) -> int:
    """round(multiply.txt) like the pipeline (Python rounds half to even); 1 when the file is absent."""
    value = read_multiply(folder)
    return 1 if value is None else round(value)


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _has_images(folder: Path) -> bool:
    return any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir())


def plan_flatten(src_dir: Path, separator: str) -> list[tuple[Path, Path]]:
    """(source leaf, flat target) pairs; raises before any move if the tree cannot round-trip."""
    leaves, problems = [], []
    for folder, subdirs, _ in os.walk(src_dir):
        folder = Path(folder)
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        if folder != src_dir and separator in folder.name:
            problems.append(f"folder name '{folder.relative_to(src_dir)}' already holds the separator "
                            f"'{separator}' (choose another --separator)")
        if subdirs and _has_images(folder):
            problems.append(f"{folder} holds images and subfolders; kohya's flat layout cannot keep those images")
        if not subdirs and folder != src_dir:
            leaves.append(folder)
    if problems:
        raise LayoutError("cannot flatten:\n  " + "\n  ".join(problems))
    plan = []
    for leaf in leaves:
        relative = leaf.relative_to(src_dir)
        target = src_dir / f"{read_repeat(leaf)}_{separator.join(relative.parts)}"
        if target.exists() and target != leaf:
            raise LayoutError(f"cannot flatten {leaf}: {target} already exists")
        plan.append((leaf, target))
    if len({target for _, target in plan}) != len(plan):
        raise LayoutError("cannot flatten: two folders would get the same flat name")
    return plan


def plan_revert(src_dir: Path, separator: str) -> list[tuple[Path, Path]]:
    plan = []
    for folder in _subfolders(src_dir):
        match = FLAT_NAME.match(folder.name)
        if not match or _subfolders(folder):
            raise LayoutError(f"cannot revert: {folder} is not a flat kohya folder '<repeat>_<a{separator}b>' "
                              "(was this tree flattened?)")
        target = src_dir.joinpath(*match.group(2).split(separator))
        if target.exists():
            raise LayoutError(f"cannot revert {folder}: {target} already exists")
        plan.append((folder, target))
    if len({target for _, target in plan}) != len(plan):
        raise LayoutError("cannot revert: two flat folders map to the same path")
    return plan


def _remove_empty_parents(folder: Path, stop: Path) -> None:
    while folder != stop and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent


def apply_plan(plan: list[tuple[Path, Path]], src_dir: Path, revert: bool) -> None:
    for source, target in tqdm(plan, desc="revert" if revert else "flatten", unit="folder",
                               disable=len(plan) < 20):
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)  # a rename: never copies, never overwrites (targets were checked)
        _remove_empty_parents(source.parent, src_dir)


def run(src_dir: str | os.PathLike, separator: str = "~", revert: bool = False, dry_run: bool = False) -> list:
    src_dir = Path(src_dir).expanduser().resolve()
    if not src_dir.is_dir():
        raise LayoutError(f"--src_dir {src_dir} is not a folder")
    if not separator or os.sep in separator or "_" in separator:
        raise LayoutError(f"--separator {separator!r}: use a non-empty string without '/' or '_'")
    plan = plan_revert(src_dir, separator) if revert else plan_flatten(src_dir, separator)
    if not dry_run:
        apply_plan(plan, src_dir, revert)
    return plan


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hcpdiff_like.tools.flatten_folder", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src_dir", required=True, help="dataset root (the pipeline's training/ folder)")
    parser.add_argument("--separator", default="~", help="joins path parts in flat names (default ~)")
    parser.add_argument("--revert", action="store_true", help="flat N_a~b~c folders back into the tree")
    parser.add_argument("--dry_run", action="store_true", help="print the moves, change nothing")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        plan = run(args.src_dir, args.separator, args.revert, args.dry_run)
    except LayoutError as error:
        print(f"flatten_folder: error: {error}", file=sys.stderr)
        return 2
    root = Path(args.src_dir).expanduser().resolve()
    for source, target in plan:
        print(f"{'would move' if args.dry_run else 'moved'} {source.relative_to(root)} -> {target.relative_to(root)}")
    if not plan:
        print(f"nothing to {'revert' if args.revert else 'flatten'} in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
