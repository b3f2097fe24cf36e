"""Data sources: each lists (image path, caption) records with a repeat count and loss weight."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tiff", ".tif")


@dataclass
class ImageRecord:
    image_path: Path
    caption: str
    loss_weight: float = 1.0
    extras: dict = field(default_factory=dict)


class SourceError(ValueError):
    pass


class ImageCaptionSource:
    """Images in a folder, each with a same-name caption file (`img.png` + `img.txt`).

    `prompt_template` formats each caption: `{caption}` is the file's text, other `{key}` fields come
    from `word_names` (e.g. `{name}` -> the trigger word). `repeat` repeats the folder per epoch.
    """

    def __init__(self, img_dir: str, caption_ext: str = ".txt", repeat: int = 1, loss_weight: float = 1.0,
                 prompt_template: str = "{caption}", word_names: Optional[dict] = None, recursive: bool = False,
                 name: str = ""):
        self.img_dir = Path(os.path.expanduser(str(img_dir)))
        self.caption_ext = caption_ext if caption_ext.startswith(".") else "." + caption_ext
        self.repeat = int(repeat)
        self.loss_weight = float(loss_weight)
        self.prompt_template = prompt_template
        self.word_names = dict(word_names or {})
        self.recursive = recursive
        self.name = name or self.img_dir.name

    def fill_template(self, caption: str) -> str:
        fields = dict(self.word_names)
        fields["caption"] = caption
        return _SafeFormat(self.prompt_template).format(fields)

    def records(self) -> list[ImageRecord]:
        if not self.img_dir.is_dir():
            raise SourceError(f"data source {self.name!r}: image folder {self.img_dir} does not exist")
        pattern = "**/*" if self.recursive else "*"
        images = sorted(p for p in self.img_dir.glob(pattern) if p.suffix.lower() in IMAGE_EXTENSIONS)
        records = []
        for image in images:
            caption_file = image.with_suffix(self.caption_ext)
            caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.exists() else ""
            records.append(ImageRecord(image, self.fill_template(caption), self.loss_weight))
        return records * self.repeat


class _SafeFormat:
    """str.format where unknown `{fields}` become empty strings (HCP-Diffusion's TemplateFill rule)."""

    def __init__(self, template: str):
        self.template = template

    def format(self, fields: dict) -> str:
        import string

        out = []
        for literal, field_name, spec, conversion in string.Formatter().parse(self.template):
            out.append(literal)
            if field_name is not None:
                value = fields.get(field_name, "")
                out.append(format(value, spec) if spec else str(value))
        text = "".join(out)
        return ", ".join(part.strip() for part in text.split(",") if part.strip()) if "," in text else text.strip()
