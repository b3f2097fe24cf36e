"""Same-name caption files (configurable extension), class images with a fixed prompt, masks."""
from __future__ import annotations

import pytest
from hcpdiff_like.data.sources import ClassImageSource, ImageCaptionSource, SourceError



def test_same_name_captions_any_extension(tmp_path, write_image):
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "b.jpg")
    write_image(tmp_path / ".hidden.png")
    (tmp_path / "a.caption").write_text("\ufeffred hair, sword\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("wrong file", encoding="utf-8")
    source = ImageCaptionSource(str(tmp_path), caption_ext="caption", repeat=3, loss_weight=0.5,
                                prompt_template="{name}, {caption}", word_names={"name": "surtr"})
    records = source.records()
    assert [r.image_path.name for r in records] == ["a.png", "b.jpg"]
    assert [r.caption for r in records] == ["surtr, red hair, sword", "surtr"]
    assert all(r.repeat == 3 and r.loss_weight == 0.5 for r in records)
    assert records[0].raw_caption == "red hair, sword"


def test_recursive_and_missing_folder(tmp_path, write_image):
    write_image(tmp_path / "sub" / "deep" / "x.png")
    assert ImageCaptionSource(str(tmp_path)).records() == []
    assert len(ImageCaptionSource(str(tmp_path), recursive=True).records()) == 1
    with pytest.raises(SourceError, match="nope"):
        ImageCaptionSource(str(tmp_path / "nope")).records()
    with pytest.raises(SourceError, match="repeat"):
        ImageCaptionSource(str(tmp_path), repeat=0)


def test_class_images_fixed_prompt_and_masks(tmp_path, write_image):
    write_image(tmp_path / "cls" / "1.png")
    write_image(tmp_path / "cls" / "2.png")
    (tmp_path / "cls" / "1.txt").write_text("ignored caption", encoding="utf-8")
    write_image(tmp_path / "masks" / "1.png", colour=(255, 255, 255))
    source = ClassImageSource(str(tmp_path / "cls"), class_prompt="a photo of a dog", loss_weight=0.7,
                              mask_dir=str(tmp_path / "masks"))
    records = source.records()
    assert [r.caption for r in records] == ["a photo of a dog"] * 2
    assert all(r.is_reg and r.loss_weight == 0.7 for r in records)
    assert records[0].mask_path == tmp_path / "masks" / "1.png" and records[1].mask_path is None
