"""Folder trees with a `multiply.txt` per folder: the anime screenshot pipeline and EveryDream2 layouts.

Every folder under `root` that holds images is read; its `multiply.txt` (one float, e.g. `3.27`; not
inherited by subfolders, as EveryDream) sets the repeat of its images; fractions are kept: each epoch an
image gets floor(m) copies plus one more with probability frac(m) (the sampler draws it).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

from .sources import ImageRecord, ImageSource, SourceError, expand, list_images, read_caption_file


def read_multiply(folder: Path, file_name: str = "multiply.txt") -> float:
    path = folder / file_name
    if not path.is_file():
        return 1.0
    text = path.read_text(encoding="utf-8-sig").strip().splitlines()
    try:
        value = float(text[0]) if text else float("nan")
    except ValueError:
        value = float("nan")
    if not value >= 0:
        raise SourceError(f"{path}: expected one non-negative number, got {' '.join(text)!r}")
    return value


def filename_caption(image: Path) -> str:
    """EveryDream's file-name caption: the stem up to the first `_` (`a man_(1).png` -> `a man`)."""
    return image.stem.split("_")[0].strip()


class FolderTreeSource(ImageSource):
    """All images below `root` (any depth, hidden entries skipped), with sidecar captions
    (`caption_ext`, first one found; list allowed) and the folder's `multiply.txt` as repeat."""

    filename_captions = False

    def __init__(self, root: str, caption_ext: Union[str, Sequence[str]] = (".txt", ".caption"),
                 multiply_file: str = "multiply.txt", **common):
        super().__init__(**common)
        self.root = expand(root)
        exts = [caption_ext] if isinstance(caption_ext, str) else list(caption_ext)
        self.caption_exts = [e if e.startswith(".") else "." + e for e in exts]
        self.multiply_file = multiply_file
        self.name = self.name or self.root.name
        self.folders: dict[Path, float] = {}

    def location(self) -> str:
        return str(self.root)

    def caption_for(self, image: Path) -> str:
        for ext in self.caption_exts:
            sidecar = image.with_suffix(ext)
            if sidecar.is_file():
                text = read_caption_file(sidecar)
                if text:
                    return text
        return filename_caption(image) if self.filename_captions else ""

    def records(self) -> list[ImageRecord]:
        if not self.root.is_dir():
            raise SourceError(f"data source {self.name!r}: folder {self.root} does not exist")
        records, self.folders = [], {}
        for image in list_images(self.root, recursive=True):
            folder = image.parent
            if folder not in self.folders:
                self.folders[folder] = read_multiply(folder, self.multiply_file)
            multiply = self.folders[folder]
            if multiply > 0:
                records.append(self.make_record(image, self.caption_for(image), multiply))
        return records


class EveryDreamSource(FolderTreeSource):
    """EveryDream2's data root: like FolderTreeSource, and an image without a `.txt`/`.caption` sidecar is
    captioned by its file name (text before the first `_`)."""

    filename_captions = True
