"""Each generated image is a PNG with a YAML record beside it (and the same YAML in the PNG's text chunk).

The record is a complete visualizer config (fully resolved, `# @package _global_`), with `seed` set to the
actual seeds of the image's batch, so `python -m hcpdiff_like.visualizer cfg=<record>.yaml` regenerates the
batch bit for bit on the same machine; `generated.index_in_batch` says which image of it this one is.
The PNG also carries webui's `parameters` text, so A1111's "PNG Info" tab reads prompt, seed and settings.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import yaml

from ..training.checkpoints import atomic_write
from .prompt_weights import plain_text

RECORD_KEY = "hcpdiff_like"
RECORD_HEADER = "# @package _global_\n# Regenerate: python -m hcpdiff_like.visualizer cfg=<this file>\n"


def _slug(text: str, limit: int = 50) -> str:
    slug = re.sub(r"[^\w\-]+", "_", plain_text(text)).strip("_")[:limit]
    return slug or "image"


def next_index(folder: Path) -> int:
    """1 + the largest leading number of files in `folder` (numbering continues across runs)."""
    numbers = [int(m.group(1)) for p in folder.glob("*") if (m := re.match(r"^(\d+)-", p.name))]
    return max(numbers, default=0) + 1


def webui_parameters(prompt: str, negative: str, seed: int, settings: dict) -> str:
    """A1111's PNG-info text: prompt, negative prompt and one line of settings."""
    line = (f"Steps: {settings.get('num_inference_steps')}, Sampler: {settings.get('sampler')}, "
            f"CFG scale: {settings.get('guidance_scale')}, Seed: {seed}, "
            f"Size: {settings.get('width')}x{settings.get('height')}")
    return f"{prompt}\nNegative prompt: {negative}\n{line}"


def save_image_with_record(image, folder: Path, index: int, seed: int, prompt: str, negative: str,
                           record: dict, settings: dict, save_record: bool = True) -> Path:
    """Write `<index>-<seed>-<prompt>.png` (+ `.yaml`); both atomically. Returns the PNG path."""
    from PIL.PngImagePlugin import PngInfo

    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{index:04d}-{seed}-{_slug(prompt)}"
    png_path = folder / f"{stem}.png"
    record = dict(record, generated=dict(record.get("generated") or {}, file=png_path.name, seed=int(seed)))
    text = RECORD_HEADER + yaml.safe_dump(record, sort_keys=False, allow_unicode=True)
    info = PngInfo()
    info.add_text(RECORD_KEY, text)
    info.add_text("parameters", webui_parameters(prompt, negative, seed, settings))
    atomic_write(png_path, lambda temp: image.save(temp, format="PNG", pnginfo=info))
    if save_record:
        atomic_write(folder / f"{stem}.yaml", lambda temp: Path(temp).write_text(text, encoding="utf-8"))
    return png_path


def read_record(png_path: str | Path) -> Optional[dict]:
    """The YAML record stored in a PNG written by `save_image_with_record` (None if there is none)."""
    from PIL import Image

    with Image.open(png_path) as image:
        text = image.text.get(RECORD_KEY) if hasattr(image, "text") else None
    return yaml.safe_load(text) if text else None
