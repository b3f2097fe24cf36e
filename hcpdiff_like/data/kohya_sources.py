"""kohya sd-scripts layouts: DreamBooth `<repeats>_<identifier> <class>` folders and fine-tune metadata JSON."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

from .sources import (IMAGE_EXTENSIONS, ImageRecord, ImageSource, SourceError, expand, list_images,
                      read_caption_file)

REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")


def parse_repeat_folder(name: str) -> Optional[tuple[int, str, str]]:
    """`20_sls frog` -> (20, 'sls', 'frog'); `1_girl` (a reg folder) -> (1, '', 'girl'); else None."""
    match = REPEAT_FOLDER.match(name)
    if not match:
        return None
    words = match.group(2).strip()
    identifier, _, class_word = words.partition(" ")
    if not class_word:
        identifier, class_word = "", identifier
    return int(match.group(1)), identifier.strip(), class_word.strip()


class KohyaDreamBoothSource(ImageSource):
    """kohya's folder naming (`--train_data_dir` / `--reg_data_dir`): `parent_dir` holds folders
    `<repeats>_<identifier> <class>` (e.g. `20_sls frog`); repeats come from the name (times `repeat`).

    Caption: the image's `<stem><caption_ext>` file (`.caption` by default, as kohya), else
    `class_tokens`, else the folder's words (`sls frog`). Template fields: `{identifier}` and `{class}`.
    Folders without a `<repeats>_` prefix or with 0 repeats are ignored, as kohya does (listed in `ignored`).
    """

    def __init__(self, parent_dir: str, caption_ext: str = ".caption", class_tokens: Optional[str] = None,
                 **common):
        super().__init__(**common)
        self.parent_dir = expand(parent_dir)
        self.caption_ext = caption_ext if caption_ext.startswith(".") else "." + caption_ext
        self.class_tokens = class_tokens
        self.name = self.name or self.parent_dir.name
        self.ignored: list[Path] = []
        self.folders: list[tuple[Path, int]] = []

    def location(self) -> str:
        return str(self.parent_dir)

    def records(self) -> list[ImageRecord]:
        if not self.parent_dir.is_dir():
            raise SourceError(f"data source {self.name!r}: kohya parent folder {self.parent_dir} does not exist")
        records, self.ignored, self.folders = [], [], []
        for folder in sorted(p for p in self.parent_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            parsed = parse_repeat_folder(folder.name)
            if parsed is None or parsed[0] < 1:
                self.ignored.append(folder)
                continue
            repeats, identifier, class_word = parsed
            self.folders.append((folder, repeats))
            words = " ".join(w for w in (identifier, class_word) if w)
            fields = {"identifier": identifier, "class": class_word}
            for image in list_images(folder):
                caption_file = image.with_suffix(self.caption_ext)
                if caption_file.exists():
                    caption = read_caption_file(caption_file).splitlines()[0:1]
                    caption = caption[0].strip() if caption else ""
                else:
                    caption = self.class_tokens if self.class_tokens is not None else words
                records.append(self.make_record(image, caption, repeats, fields))
        return records


def _find_image(key: str, image_dir: Optional[Path]) -> Optional[Path]:
    path = expand(key)
    if path.is_absolute() and path.is_file():
        return path
    if image_dir is not None:
        candidate = image_dir / key
        if candidate.is_file():
            return candidate
        for ext in IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS):
            candidate = image_dir / f"{key}{ext}"
            if candidate.is_file():
                return candidate
    return path if path.is_file() else None


class KohyaMetadataSource(ImageSource):
    """kohya's fine-tune metadata JSON (`merge_captions_to_metadata.py` / `merge_dd_tags_to_metadata.py`):
    `{"<image path or stem>": {"caption": "...", "tags": "...", ...}}`. The prompt is the caption's first
    line, then the tags (`caption, tags`). A key without an image file is reported and skipped."""

    def __init__(self, metadata_file: str, image_dir: Optional[str] = None, **common):
        super().__init__(**common)
        self.metadata_file = expand(metadata_file)
        self.image_dir = expand(image_dir) if image_dir else None
        self.name = self.name or self.metadata_file.stem

    def location(self) -> str:
        return str(self.metadata_file) + (f" (images in {self.image_dir})" if self.image_dir else "")

    def records(self) -> list[ImageRecord]:
        if not self.metadata_file.is_file():
            raise SourceError(f"data source {self.name!r}: metadata file {self.metadata_file} does not exist")
        try:
            metadata = json.loads(self.metadata_file.read_text(encoding="utf-8-sig"))
        except (OSError, ValueError) as error:
            raise SourceError(f"metadata file {self.metadata_file} is not valid JSON: {error}") from None
        if not isinstance(metadata, dict):
            raise SourceError(f"metadata file {self.metadata_file}: expected an object of image -> entry")
        records, self.problems = [], []
        for key, entry in metadata.items():
            if not isinstance(entry, dict):
                raise SourceError(f"metadata file {self.metadata_file}: entry {key!r} is not an object")
            image = _find_image(str(key), self.image_dir)
            if image is None:
                self.problems.append((Path(str(key)), f"listed in {self.metadata_file.name} but no image found"))
                continue
            caption_lines = str(entry.get("caption") or "").strip().splitlines()
            parts = [caption_lines[0].strip()] if caption_lines else []
            tags = str(entry.get("tags") or "").strip()
            if tags:
                parts.append(tags)
            records.append(self.make_record(image, ", ".join(p for p in parts if p)))
        return sorted(records, key=lambda r: str(r.image_path))
