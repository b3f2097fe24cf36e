"""A small generated dataset for the demo and tests: coloured shapes with matching captions."""
from __future__ import annotations

import os
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")


def draw_shape(shape: str, colour: tuple, size: tuple[int, int], seed: int) -> Image.Image:
    rng = random.Random(seed)
    width, height = size
    image = Image.new("RGB", size, (245, 245, 240))
    draw = ImageDraw.Draw(image)
    side = int(min(width, height) * rng.uniform(0.45, 0.7))
    left, top = rng.randint(0, width - side), rng.randint(0, height - side)
    box = (left, top, left + side, top + side)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(left + side // 2, top), (left, top + side), (left + side, top + side)], fill=colour)
    return image


def make_demo_dataset(folder: str | os.PathLike, count: int = 8, size: tuple[int, int] = (64, 64),
                      trigger: str = "", seed: int = 0) -> Path:
    """Write `count` PNG images with same-name .txt captions (`<trigger>, red circle, simple background`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    combos = [(c, s) for s in SHAPES for c in COLOURS]
    for index in range(count):
        colour, shape = combos[index % len(combos)]
        image = draw_shape(shape, COLOURS[colour], size, seed + index)
        stem = f"{index:04d}_{colour}_{shape}"
        image.save(folder / f"{stem}.png")
        caption = ", ".join(t for t in (trigger, f"{colour} {shape}", "simple background") if t)
        (folder / f"{stem}.txt").write_text(caption, encoding="utf-8")
    return folder


def demo_data_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The demo dataset in the local cache, generated once."""
    root = Path(cache_dir or os.environ.get("HCPDIFF_LIKE_CACHE", Path.home() / ".cache" / "hcpdiff_like"))
    folder = root / "demo-shapes"
    if not (folder / ".complete").exists():
        make_demo_dataset(folder)
        (folder / ".complete").write_text("ok")
    return folder
