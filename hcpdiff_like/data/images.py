"""Reading images safely: every odd file a user's folder may hold is converted to RGB or reported.

`scan_images` checks each file once before training (fully decoded, so truncated files are found
before the model loads) and returns its size after EXIF rotation; `load_rgb` reads it for training.
Handled: zero-byte, unreadable, truncated (skipped); CMYK, 16-bit, palette/alpha, EXIF rotation
(converted); images over `max_pixels` (skipped, they would exhaust memory).
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 8192 * 8192
ALPHA_BACKGROUND = (255, 255, 255)


class BadImageError(OSError):
    """An image that cannot be used for training; the message says why."""


@dataclass
class ImageInfo:
    path: Path
    size: Optional[tuple[int, int]] = None   # (width, height) after EXIF rotation; None when unusable
    problem: Optional[str] = None            # why the file is skipped
    converted: Optional[str] = None          # what was done to make it RGB (CMYK -> RGB, ...)


def _allow_pixels(max_pixels: int) -> None:
    """PIL refuses images above 2x MAX_IMAGE_PIXELS at open time; we apply our own limit instead."""
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    array = np.asarray(image, dtype=np.float64)
    peak = 1.0 if image.mode == "F" and array.max(initial=0) <= 1.0 else (255.0 if image.mode == "F" else 65535.0)
    return Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")


def to_rgb(image: Image.Image) -> tuple[Image.Image, Optional[str]]:
    """Any PIL mode -> RGB; returns (image, description of the conversion or None when plain)."""
    notes = []
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        image, notes = _sixteen_bit_to_l(image), [f"{mode} (16/32-bit) scaled to 8-bit"]
    elif mode == "CMYK":
        image, notes = image.convert("RGB"), ["CMYK -> RGB"]
    elif mode == "P" and "transparency" in image.info or mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        notes = ["palette + alpha composited on white" if mode == "P" else f"{mode} alpha composited on white"]
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        image = Image.alpha_composite(background, rgba)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image, ("; ".join(notes) or None)


def open_image(path: os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, Optional[str]]:
    """Decode `path` fully, EXIF-rotated and in RGB. Raises BadImageError naming the problem."""
    path = Path(path)
    _allow_pixels(max_pixels)
    try:
        if path.stat().st_size == 0:
            raise BadImageError("zero-byte file")
        with Image.open(path) as handle:
            width, height = handle.size
            if width * height > max_pixels:
                raise BadImageError(f"huge: {width}x{height} is over max_pixels={max_pixels}")
            handle.load()
            notes = []
            orientation = handle.getexif().get(0x0112, 1)
            image = ImageOps.exif_transpose(handle)
            if orientation not in (1, None):
                notes.append(f"EXIF orientation {orientation} applied")
            image, conversion = to_rgb(image)
    except BadImageError:
        raise
    except UnidentifiedImageError:
        raise BadImageError("not a readable image") from None
    except Image.DecompressionBombError as error:
        raise BadImageError(f"huge: {error}") from None
    except (OSError, SyntaxError, ValueError) as error:  # truncated data, broken headers
        raise BadImageError(f"truncated or corrupt ({error})") from None
    if conversion:
        notes.append(conversion)
    return image, ("; ".join(notes) or None)


def load_rgb(path: os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The training image in RGB (conversions applied); BadImageError names the file when it fails."""
    try:
        return open_image(path, max_pixels)[0]
    except BadImageError as error:
        raise BadImageError(f"{path}: {error}") from None


def inspect_image(path: os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image, conversion = open_image(path, max_pixels)
        return ImageInfo(Path(path), image.size, None, conversion)
    except BadImageError as error:
        return ImageInfo(Path(path), None, str(error))


_SCAN_MEMO: dict[tuple, ImageInfo] = {}


def scan_images(paths: Iterable[os.PathLike], max_pixels: int = DEFAULT_MAX_PIXELS, threads: int = 0,
                progress: bool = True) -> dict[Path, ImageInfo]:
    """Inspect every file (in threads; PIL decodes without the GIL). Results are memoised per process
    by (path, size, mtime), so building a dataset twice does not decode twice."""
    from tqdm.auto import tqdm

    paths = [Path(p) for p in paths]

    def memo_key(path: Path):
        try:
            stat = path.stat()
            return (str(path), stat.st_size, stat.st_mtime_ns, max_pixels)
        except OSError:
            return (str(path), None, None, max_pixels)

    def one(path: Path) -> ImageInfo:
        key = memo_key(path)
        if key[1] is not None and key in _SCAN_MEMO:
            return _SCAN_MEMO[key]
        info = inspect_image(path, max_pixels)
        if key[1] is not None:
            _SCAN_MEMO[key] = info
        return info

    threads = threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = list(tqdm(pool.map(one, paths), total=len(paths), desc="checking images", unit="img",
                            disable=not progress or len(paths) < 200, leave=False))
    return {info.path: info for info in results}


def describe_problems(infos: Iterable[ImageInfo]) -> Optional[str]:
    """One message naming every skipped and every converted file, or None when all are plain RGB."""
    infos = list(infos)
    skipped = [i for i in infos if i.problem]
    converted = [i for i in infos if i.converted and not i.problem]
    if not skipped and not converted:
        return None
    parts = []
    if skipped:
        parts.append(f"skipped {len(skipped)} unusable image(s):\n" +
                     "\n".join(f"  {i.path}: {i.problem}" for i in skipped))
    if converted:
        parts.append(f"converted {len(converted)} image(s):\n" +
                     "\n".join(f"  {i.path}: {i.converted}" for i in converted))
    return "\n".join(parts)
