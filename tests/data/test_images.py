"""Every bad-image kind, generated with PIL: converted, or skipped with one warning naming each file."""
from __future__ import annotations

import logging

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from hcpdiff_like.data.builder import DataConfigError, build_datasets
from hcpdiff_like.data.images import BadImageError, inspect_image, load_rgb


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_images")
    Image.new("RGB", (48, 32), (10, 200, 30)).save(folder / "good.png")
    (folder / "zero.png").write_bytes(b"")
    (folder / "notimage.jpg").write_text("this is not a picture", encoding="utf-8")
    Image.effect_noise((64, 64), 40).convert("RGB").save(folder / "full.jpg", quality=95)
    data = (folder / "full.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "full.jpg").unlink()
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    ramp = np.tile(np.array([0, 32768, 65535], dtype=np.uint16), (8, 4))
    Image.fromarray(ramp).save(folder / "sixteen.png")
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(1, (8, 0, 16, 16))
    palette.save(folder / "palette_alpha.png", transparency=0)
    rotated = Image.new("RGB", (40, 20), (200, 0, 0))
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    rotated.save(folder / "rotated.jpg", exif=exif)
    Image.new("RGB", (300, 300)).save(folder / "huge.png")
    for path in folder.iterdir():
        path.with_suffix(".txt").write_text(path.stem, encoding="utf-8")
    return folder


def test_conversions(bad_folder):
    cmyk = load_rgb(bad_folder / "cmyk.jpg")
    assert cmyk.mode == "RGB" and cmyk.getpixel((5, 5))[0] > 200 and cmyk.getpixel((5, 5))[1] < 60
    sixteen = np.asarray(load_rgb(bad_folder / "sixteen.png"))
    assert sixteen.shape == (8, 12, 3) and list(sixteen[0, :3, 0]) == [0, 128, 255]
    palette = load_rgb(bad_folder / "palette_alpha.png")
    assert palette.getpixel((2, 2)) == (255, 255, 255) and palette.getpixel((12, 2)) == (255, 0, 0)
    rotated = inspect_image(bad_folder / "rotated.jpg")
    assert rotated.size == (20, 40) and "EXIF" in rotated.converted
    assert load_rgb(bad_folder / "rotated.jpg").size == (20, 40)


@pytest.mark.parametrize("name,reason", [("zero.png", "zero-byte"), ("notimage.jpg", "not a readable image"),
                                         ("truncated.jpg", "truncated"), ("huge.png", "huge")])
def test_skipped_kinds(bad_folder, name, reason):
    info = inspect_image(bad_folder / name, max_pixels=200 * 200)
    assert info.problem and reason in info.problem and info.size is None
    with pytest.raises(BadImageError, match=name):
        load_rgb(bad_folder / name, max_pixels=200 * 200)


def test_build_warns_once_naming_each_file(bad_folder, caplog):
    data = OmegaConf.create({"ds": {"batch_size": 2, "resolution": 32, "max_image_pixels": 200 * 200, "sources": {
        "s": {"_target_": "hcpdiff_like.data.sources.ImageCaptionSource", "img_dir": str(bad_folder)}}}})
    with caplog.at_level(logging.WARNING, logger="hcpdiff_like.data"):
        handle = build_datasets(data, show_progress=False)[0]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    for name in ("zero.png", "notimage.jpg", "truncated.jpg", "huge.png", "cmyk.jpg", "sixteen.png",
                 "palette_alpha.png", "rotated.jpg"):
        assert name in text, name
    kept = sorted(r.image_path.name for r in handle.dataset.records)
    assert kept == ["cmyk.jpg", "good.png", "palette_alpha.png", "rotated.jpg", "sixteen.png"]
    batch = next(iter(handle.loader))  # every kept file loads and batches
    assert batch["pixel_values"].shape[1:] == (3, 32, 32)


def test_all_bad_is_a_clear_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    data = OmegaConf.create({"ds": {"sources": {"s": {"_target_": "hcpdiff_like.data.sources.ImageCaptionSource",
                                                      "img_dir": str(tmp_path)}}}})
    with pytest.raises(DataConfigError, match="no usable images"):
        build_datasets(data, show_progress=False)
