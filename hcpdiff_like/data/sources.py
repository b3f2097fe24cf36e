"""Data sources: each lists its images once, as records with a caption, a repeat count and a loss weight.

Every source takes the same common arguments (see `ImageSource`); a dataset may combine several.
Other layouts: `kohya_sources.py` (DreamBooth folders, fine-tune metadata JSON) and `tree_sources.py`
(EveryDream / anime-pipeline folder trees with `multiply.txt`).
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .captions import CaptionProcessor

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tiff", ".tif", ".jfif")


@dataclass
class ImageRecord:
    """One image. `caption` is the prompt with the template filled and no random ops (what evaluation
    sees); `prompt(rng)` gives the training prompt with shuffle/dropout drawn from `rng`."""

    image_path: Path
    caption: str
    loss_weight: float = 1.0
    extras: dict = field(default_factory=dict)
    repeat: float = 1.0                        # copies per epoch; a fraction is drawn at random each epoch
    raw_caption: str = ""
    fields: dict = field(default_factory=dict)  # extra template fields, e.g. kohya's {identifier} {class}
    processor: Optional[CaptionProcessor] = None
    mask_path: Optional[Path] = None
    source: str = ""
    is_reg: bool = False
    size: Optional[tuple[int, int]] = None     # (width, height) after EXIF rotation, filled by the scan

    def prompt(self, rng: Optional[random.Random] = None) -> str:
        if self.processor is None:
            return self.caption
        return self.processor.process(self.raw_caption, self.fields, rng)


class SourceError(ValueError):
    pass


def expand(path) -> Path:
    return Path(os.path.expanduser(str(path)))


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in `folder` (sorted), skipping hidden entries (`.name`) as EveryDream does."""
    pattern = "**/*" if recursive else "*"
    found = []
    for path in folder.glob(pattern):
        relative = path.relative_to(folder).parts
        if any(part.startswith(".") for part in relative):
            continue
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
            found.append(path)
    return sorted(found)


def read_caption_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise SourceError(f"caption file {path} cannot be read as UTF-8 text: {error}") from None


class ImageSource:
    """Common arguments of every source.

    repeat: copies per epoch (float; 2.5 = twice plus a 50% chance of a third); loss_weight: multiplies
    the loss of these images; prompt_template / word_names: `{caption}` and `{<word>}` placeholders;
    shuffle_tags, keep_tokens, tag_dropout, caption_dropout, tag_separator: caption ops (captions.py);
    mask_dir: optional folder of loss masks with the image's stem (white = counts, black = ignored);
    is_reg: regularisation images (never held out for validation).
    """

    def __init__(self, repeat: float = 1.0, loss_weight: float = 1.0, prompt_template: str = "{caption}",
                 word_names: Optional[dict] = None, shuffle_tags: bool = False, keep_tokens: int = 0,
                 tag_dropout: float = 0.0, caption_dropout: float = 0.0, tag_separator: str = ",",
                 mask_dir: Optional[str] = None, name: str = "", is_reg: bool = False):
        self.repeat = float(repeat)
        if self.repeat <= 0:
            raise SourceError(f"data source {name!r}: repeat must be > 0, got {repeat}")
        self.loss_weight = float(loss_weight)
        self.prompt_template = prompt_template
        self.word_names = dict(word_names or {})
        self.processor = CaptionProcessor(prompt_template, self.word_names, shuffle_tags, keep_tokens,
                                          tag_dropout, caption_dropout, tag_separator)
        self.mask_dir = expand(mask_dir) if mask_dir else None
        if self.mask_dir is not None and not self.mask_dir.is_dir():
            raise SourceError(f"data source {name!r}: mask_dir {self.mask_dir} does not exist")
        self.name = name
        self.is_reg = bool(is_reg)
        self.problems: list[tuple[Path, str]] = []   # files referenced but missing, reported with bad images
        self._masks: Optional[dict[str, Path]] = None

    def location(self) -> str:
        return ""

    def describe(self) -> str:
        return f"{type(self).__name__} {self.location()}".strip()

    def fill_template(self, caption: str) -> str:
        return self.processor.fill(caption)

    def mask_for(self, image: Path) -> Optional[Path]:
        if self.mask_dir is None:
            return None
        if self._masks is None:
            self._masks = {p.stem: p for p in list_images(self.mask_dir)}
        return self._masks.get(image.stem)

    def make_record(self, image: Path, raw_caption: str, repeat: float = 1.0,
                    fields: Optional[dict] = None) -> ImageRecord:
        fields = dict(fields or {})
        return ImageRecord(image, self.processor.process(raw_caption, fields), self.loss_weight, {},
                           repeat * self.repeat, raw_caption, fields, self.processor, self.mask_for(image),
                           self.name, self.is_reg)

    def records(self) -> list[ImageRecord]:
        raise NotImplementedError


class ImageCaptionSource(ImageSource):
    """Images in a folder, each with a same-name caption file (`img.png` + `img.txt`; HCP-Diffusion, kohya
    DreamBooth-caption and anime-pipeline style). A missing caption file gives an empty caption."""

    def __init__(self, img_dir: str, caption_ext: str = ".txt", recursive: bool = False, **common):
        super().__init__(**common)
        self.img_dir = expand(img_dir)
        self.caption_ext = caption_ext if caption_ext.startswith(".") else "." + caption_ext
        self.recursive = recursive
        self.name = self.name or self.img_dir.name

    def location(self) -> str:
        return str(self.img_dir)

    def records(self) -> list[ImageRecord]:
        if not self.img_dir.is_dir():
            raise SourceError(f"data source {self.name!r}: image folder {self.img_dir} does not exist")
        records = []
        for image in list_images(self.img_dir, self.recursive):
            caption_file = image.with_suffix(self.caption_ext)
            caption = read_caption_file(caption_file) if caption_file.exists() else ""
            records.append(self.make_record(image, caption))
        return records


class ClassImageSource(ImageSource):
    """Regularisation / prior-preservation images: every image gets the fixed `class_prompt`
    (`loss_weight` is kohya's prior_loss_weight). Put it in its own dataset to get one class batch per step."""

    def __init__(self, img_dir: str, class_prompt: str, recursive: bool = False, is_reg: bool = True, **common):
        super().__init__(is_reg=is_reg, **common)
        self.img_dir = expand(img_dir)
        self.class_prompt = str(class_prompt)
        self.recursive = recursive
        self.name = self.name or self.img_dir.name

    def location(self) -> str:
        return f"{self.img_dir} (class prompt {self.class_prompt!r})"

    def records(self) -> list[ImageRecord]:
        if not self.img_dir.is_dir():
            raise SourceError(f"data source {self.name!r}: class image folder {self.img_dir} does not exist")
        return [self.make_record(image, self.class_prompt) for image in list_images(self.img_dir, self.recursive)]
