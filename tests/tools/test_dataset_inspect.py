"""dataset_inspect: sources, counts, repeats, bucket histogram (text + PNG), bad files; no model loaded."""
from __future__ import annotations

import io

import pytest
from PIL import Image

from hcpdiff_like.tools.dataset_inspect import inspect


@pytest.fixture()
def kohya_tree(tmp_path):
    for folder, sizes in (("10_sls frog", [(96, 64), (96, 64), (64, 64)]), ("2_zzz dog", [(64, 128)])):
        (tmp_path / "train" / folder).mkdir(parents=True)
        for index, size in enumerate(sizes):
            Image.new("RGB", size, (index * 40, 90, 90)).save(tmp_path / "train" / folder / f"{index}.png")
    (tmp_path / "train" / "2_zzz dog" / "broken.png").write_bytes(b"")
    (tmp_path / "reg" / "1_frog").mkdir(parents=True)
    Image.new("CMYK", (64, 64)).save(tmp_path / "reg" / "1_frog" / "c.jpg")
    return tmp_path


def test_inspect_kohya_layout(kohya_tree, monkeypatch):
    import hcpdiff_like.models.loading as loading

    monkeypatch.setattr(loading, "load_model_bundle", lambda *a, **k: pytest.fail("a model was loaded"))
    out = io.StringIO()
    png = kohya_tree / "hist.png"
    code = inspect(["cfg=demo", "dataset=kohya_dreambooth", f"+train_data_dir={kohya_tree / 'train'}",
                    f"+reg_data_dir={kohya_tree / 'reg'}", "data.train.resolution=64", "data.reg.resolution=64",
                    "data.train.min_bucket_reso=32", "data.train.max_bucket_reso=128",
                    "+data.reg.min_bucket_reso=32", "+data.reg.max_bucket_reso=128",
                    "data.train.bucket_reso_steps=16", "+data.reg.bucket_reso_steps=16",
                    "--histogram", str(png), "--quiet"], out=out)
    text = out.getvalue()
    assert code == 0, text
    assert "dataset train: 4 images, 32 samples per epoch" in text     # 3 x 10 + 1 x 2 repeats
    assert "source dreambooth: KohyaDreamBoothSource" in text
    assert "dataset reg: 1 images" in text
    assert "broken.png: zero-byte file" in text and "c.jpg: CMYK -> RGB" in text
    assert "80x48: 2 / 20" in text and "#" in text  # 96x64 images -> the 80x48 bucket of a 64x64 area
    with Image.open(png) as picture:
        assert picture.format == "PNG" and picture.width > 300


def test_inspect_errors_name_the_problem(tmp_path, capsys):
    assert inspect(["cfg=demo", f"data.dataset1.sources.shapes.img_dir={tmp_path / 'missing'}", "--quiet"]) == 2
    assert str(tmp_path / "missing") in capsys.readouterr().err
    assert inspect(["cfg=demo", "--dataset", "nope", "--quiet"]) == 2
    assert "no dataset 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        inspect(["--help"])
    assert exit_info.value.code == 0
