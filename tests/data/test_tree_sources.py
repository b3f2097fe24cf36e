"""EveryDream filename captions and hierarchical folders with multiply.txt (fractions kept)."""
from __future__ import annotations

import pytest

from hcpdiff_like.data.sources import SourceError
from hcpdiff_like.data.tree_sources import EveryDreamSource, FolderTreeSource, filename_caption


def test_filename_caption_rule(tmp_path, write_image):
    assert filename_caption(tmp_path / "john sitting on a bench_(1).png") == "john sitting on a bench"
    assert filename_caption(tmp_path / "a close up of a person_.jpg") == "a close up of a person"
    assert filename_caption(tmp_path / "plain.png") == "plain"


def test_everydream_root(tmp_path, write_image):
    write_image(tmp_path / "man" / "a man in a park_(1).jpg")
    write_image(tmp_path / "man" / "a man in a park_(2).jpg")
    write_image(tmp_path / "man_laion" / "deep" / "x_1.png")
    (tmp_path / "man_laion" / "deep" / "x_1.txt").write_text("a photo of a man, smiling", encoding="utf-8")
    (tmp_path / "man" / "multiply.txt").write_text("2.5\n", encoding="utf-8")
    write_image(tmp_path / ".cache" / "skip.png")
    records = {r.image_path.name: r for r in EveryDreamSource(str(tmp_path)).records()}
    assert set(records) == {"a man in a park_(1).jpg", "a man in a park_(2).jpg", "x_1.png"}
    assert records["a man in a park_(1).jpg"].caption == "a man in a park"
    assert records["a man in a park_(1).jpg"].repeat == 2.5
    assert records["x_1.png"].caption == "a photo of a man, smiling" and records["x_1.png"].repeat == 1.0


def test_multiply_tree_not_inherited_and_errors(tmp_path, write_image):
    root = tmp_path / "training"
    write_image(root / "screenshots" / "1_character" / "Aoba" / "1.png")
    write_image(root / "screenshots" / "1_character" / "img.png")
    (root / "screenshots" / "1_character" / "multiply.txt").write_text("3.27", encoding="utf-8")
    (root / "screenshots" / "1_character" / "Aoba" / "multiply.txt").write_text("0.5", encoding="utf-8")
    write_image(root / "booru" / "dropped" / "z.png")
    (root / "booru" / "dropped" / "multiply.txt").write_text("0", encoding="utf-8")
    records = {r.image_path.name: r for r in FolderTreeSource(str(root), caption_ext=".txt", repeat=2).records()}
    assert records["img.png"].repeat == pytest.approx(6.54) and records["1.png"].repeat == pytest.approx(1.0)
    assert "z.png" not in records
    assert records["img.png"].caption == ""  # no sidecar, no filename captions outside EveryDream
    (root / "booru" / "dropped" / "multiply.txt").write_text("lots", encoding="utf-8")
    with pytest.raises(SourceError, match="multiply.txt"):
        FolderTreeSource(str(root)).records()
