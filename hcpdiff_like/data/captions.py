"""Caption processing: template filling, tag shuffle (keep_tokens), tag dropout, whole-caption dropout.

Order (kohya's `process_caption`, then HCP-Diffusion's TemplateFill last):
  caption dropout -> split tags -> keep the first `keep_tokens` fixed -> shuffle the rest -> tag dropout
  -> join with ", " -> fill `prompt_template` (`{caption}` + `word_names` fields).
Randomness comes only from the `rng` passed in; the dataset seeds it from (seed, epoch, index), so a
resumed run sees the same captions.
"""
from __future__ import annotations

import random
import string
from pathlib import Path
from typing import Optional


class SafeTemplate:
    """str.format where unknown `{fields}` become empty strings (HCP-Diffusion's TemplateFill rule);
    empty comma-separated parts are removed afterwards (`a photo of {name}, {caption}` with no caption
    gives `a photo of <name>`)."""

    def __init__(self, template: str):
        self.template = template
        list(string.Formatter().parse(template))  # a broken template fails here, at start-up

    def format(self, fields: dict) -> str:
        out = []
        for literal, field_name, spec, _ in string.Formatter().parse(self.template):
            out.append(literal)
            if field_name is not None:
                value = fields.get(field_name, "")
                out.append(format(value, spec) if spec else str(value))
        text = "".join(out)
        return ", ".join(part.strip() for part in text.split(",") if part.strip()) if "," in text else text.strip()


def read_templates(prompt_template: str) -> list[str]:
    """A template string, or a path to a .txt file with one template per line (one picked per sample)."""
    if prompt_template.endswith(".txt") and "{" not in prompt_template:
        path = Path(prompt_template).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"prompt_template file {path} does not exist")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"prompt_template file {path} is empty")
        return lines
    return [prompt_template]


class CaptionProcessor:
    """Turns a source's raw caption into the training prompt.

    shuffle_tags: shuffle comma-separated tags; keep_tokens: the first N tags stay in place and are never
    dropped; tag_dropout: drop each other tag with this probability; caption_dropout: the whole prompt
    becomes "" with this probability (unconditional training).
    """

    def __init__(self, prompt_template: str = "{caption}", word_names: Optional[dict] = None,
                 shuffle_tags: bool = False, keep_tokens: int = 0, tag_dropout: float = 0.0,
                 caption_dropout: float = 0.0, tag_separator: str = ","):
        for key, value in (("tag_dropout", tag_dropout), ("caption_dropout", caption_dropout)):
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"{key} must be within [0, 1], got {value}")
        if int(keep_tokens) < 0:
            raise ValueError(f"keep_tokens must be >= 0, got {keep_tokens}")
        self.templates = [SafeTemplate(t) for t in read_templates(str(prompt_template))]
        self.word_names = {str(k): str(v) for k, v in dict(word_names or {}).items()}
        self.shuffle_tags, self.keep_tokens = bool(shuffle_tags), int(keep_tokens)
        self.tag_dropout, self.caption_dropout = float(tag_dropout), float(caption_dropout)
        self.tag_separator = tag_separator

    @property
    def is_random(self) -> bool:
        return bool(self.shuffle_tags or self.tag_dropout or self.caption_dropout or len(self.templates) > 1)

    def fill(self, caption: str, fields: Optional[dict] = None, template_index: int = 0) -> str:
        values = dict(self.word_names)
        values.update(fields or {})
        values["caption"] = caption
        return self.templates[template_index].format(values)

    def split_tags(self, caption: str) -> list[str]:
        return [t.strip() for t in caption.split(self.tag_separator) if t.strip()]

    def process(self, caption: str, fields: Optional[dict] = None, rng: Optional[random.Random] = None) -> str:
        """The prompt for one sample; without `rng` the deterministic one (no shuffle/dropout)."""
        if rng is None:
            return self.fill(caption, fields)
        if self.caption_dropout and rng.random() < self.caption_dropout:
            return ""
        if self.shuffle_tags or self.tag_dropout:
            tags = self.split_tags(caption)
            fixed, flexible = tags[:self.keep_tokens], tags[self.keep_tokens:]
            if self.shuffle_tags:
                rng.shuffle(flexible)
            if self.tag_dropout:
                flexible = [t for t in flexible if rng.random() >= self.tag_dropout]
            caption = ", ".join(fixed + flexible)
        index = rng.randrange(len(self.templates)) if len(self.templates) > 1 else 0
        return self.fill(caption, fields, index)
