"""kohya DreamBooth `<repeats>_<identifier> <class>` folders and fine-tune metadata JSON."""
from __future__ import annotations

import json

import pytest

from hcpdiff_like.data.kohya_sources import KohyaDreamBoothSource, KohyaMetadataSource, parse_repeat_folder
from hcpdiff_like.data.sources import SourceError


def test_parse_folder_names():
    assert parse_repeat_folder("20_sls frog") == (20, "sls", "frog")
    assert parse_repeat_folder("1_girl") == (1, "", "girl")
    assert parse_repeat_folder("3_shs 1girl red") == (3, "shs", "1girl red")
    assert parse_repeat_folder("frog") is None and parse_repeat_folder("x_frog") is None


def test_dreambooth_folders(tmp_path, write_image):
    write_image(tmp_path / "20_sls frog" / "a.png")
    write_image(tmp_path / "20_sls frog" / "b.png")
    (tmp_path / "20_sls frog" / "b.caption").write_text("sls frog sitting\nsecond line", encoding="utf-8")
    write_image(tmp_path / "5_zzz dog" / "c.jpg")
    write_image(tmp_path / "not_counted" / "d.png")
    write_image(tmp_path / "0_skip me" / "e.png")
    source = KohyaDreamBoothSource(str(tmp_path), repeat=2, prompt_template="{caption}, {class} picture")
    records = {r.image_path.name: r for r in source.records()}
    assert set(records) == {"a.png", "b.png", "c.jpg"}
    assert records["a.png"].caption == "sls frog, frog picture" and records["a.png"].repeat == 40
    assert records["b.png"].raw_caption == "sls frog sitting"   # kohya: first line only
    assert records["c.jpg"].repeat == 10 and records["c.jpg"].fields == {"identifier": "zzz", "class": "dog"}
    assert sorted(p.name for p in source.ignored) == ["0_skip me", "not_counted"]
    assert KohyaDreamBoothSource(str(tmp_path), class_tokens="tok").records()[0].caption == "tok"


def test_metadata_json(tmp_path, write_image):
    images = tmp_path / "imgs"
    write_image(images / "001.png")
    write_image(images / "002.webp")
    absolute = write_image(tmp_path / "elsewhere" / "003.jpg")
    meta = {"001": {"caption": "a frog\nalt caption", "tags": "open mouth, frog", "train_resolution": [512, 512]},
            "002.webp": {"tags": "dog"}, str(absolute): {"caption": "a cat"}, "missing": {"caption": "x"}}
    (tmp_path / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    source = KohyaMetadataSource(str(tmp_path / "meta.json"), image_dir=str(images))
    records = {r.image_path.name: r.caption for r in source.records()}
    assert records == {"001.png": "a frog, open mouth, frog", "002.webp": "dog", "003.jpg": "a cat"}
    assert [p.name for p, _ in source.problems] == ["missing"]
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(SourceError, match="bad.json"):
        KohyaMetadataSource(str(tmp_path / "bad.json")).records()
