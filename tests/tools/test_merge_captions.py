"""merge_captions: sidecar captions + tags -> kohya metadata JSON that the data pipeline's metadata source reads."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hcpdiff_like.data.demo import make_demo_dataset
from hcpdiff_like.data.kohya_sources import KohyaMetadataSource
from hcpdiff_like.tools.merge_captions import main


@pytest.fixture()
def folder(tmp_path):
    """4 demo images: .txt tag files for all, .caption files for two (one of them two lines long)."""
    images = make_demo_dataset(tmp_path / "images", count=4)
    stems = sorted(p.stem for p in images.glob("*.png"))
    (images / f"{stems[0]}.caption").write_text("a red circle\nalternative caption\n", encoding="utf-8")
    (images / f"{stems[1]}.caption").write_text("a green circle", encoding="utf-8")
    return images


def prompts(metadata_file, image_dir=None) -> dict:
    source = KohyaMetadataSource(metadata_file=str(metadata_file), image_dir=str(image_dir) if image_dir else None)
    return {r.image_path.stem: r.caption for r in source.records()}


def test_stem_keys_round_trip_through_the_metadata_source(tmp_path, folder, capsys):
    out = tmp_path / "meta.json"
    assert main([str(folder), str(out)]) == 0
    metadata = json.loads(out.read_text(encoding="utf-8"))
    stems = sorted(p.stem for p in folder.glob("*.png"))
    assert sorted(metadata) == stems
    first = metadata[stems[0]]
    assert first["caption"] == "a red circle\nalternative caption"  # multi-line kept, kohya-style
    assert first["tags"] == (folder / f"{stems[0]}.txt").read_text()
    assert "caption" not in metadata[stems[2]]
    got = prompts(out, folder)
    assert got[stems[0]] == f"a red circle, {first['tags']}"  # first caption line, then the tags
    assert got[stems[2]] == metadata[stems[2]]["tags"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary file left behind"
    assert "4 entries" in capsys.readouterr().out


def test_full_and_relative_keys_with_sub_folders(tmp_path, folder, capsys):
    nested = make_demo_dataset(folder / "more", count=2)  # same stems as two top-level images
    assert main([str(folder), str(tmp_path / "stems.json"), "--recursive"]) == 2
    assert "--relative_path" in capsys.readouterr().err
    assert not (tmp_path / "stems.json").exists()

    assert main([str(folder), str(tmp_path / "rel.json"), "--recursive", "--relative_path"]) == 0
    relative = json.loads((tmp_path / "rel.json").read_text())
    assert len(relative) == 6 and all(not k.startswith("/") for k in relative)
    source = KohyaMetadataSource(metadata_file=str(tmp_path / "rel.json"), image_dir=str(folder))
    assert len(source.records()) == 6 and not source.problems

    assert main([str(nested), str(tmp_path / "full.json"), "--full_path", "--no_captions"]) == 0
    full = json.loads((tmp_path / "full.json").read_text())
    assert all(k.startswith(str(nested.resolve())) for k in full)
    assert len(prompts(tmp_path / "full.json")) == 2  # absolute keys need no image_dir


def test_in_json_is_kept_and_updated_and_nothing_is_overwritten_silently(tmp_path, folder, capsys):
    stems = sorted(p.stem for p in folder.glob("*.png"))
    previous = tmp_path / "old.json"
    previous.write_text(json.dumps({stems[0]: {"caption": "old", "train_resolution": [512, 512]},
                                    "gone": {"caption": "kept"}}))
    out = tmp_path / "meta.json"
    assert main([str(folder), str(out), "--in_json", str(previous), "--no_tags"]) == 0
    metadata = json.loads(out.read_text())
    assert metadata[stems[0]] == {"caption": "a red circle\nalternative caption", "train_resolution": [512, 512]}
    assert metadata["gone"] == {"caption": "kept"} and stems[2] not in metadata  # no caption file: left out
    assert "without a caption or tag file" in capsys.readouterr().err

    before = out.read_text()
    assert main([str(folder), str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_text() == before
    assert main([str(folder), str(out), "--overwrite"]) == 0 and out.read_text() != before


def test_clear_errors(tmp_path, folder, capsys):
    assert main([str(tmp_path / "missing"), str(tmp_path / "a.json")]) == 2
    assert str(tmp_path / "missing") in capsys.readouterr().err
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert main([str(folder), str(tmp_path / "b.json"), "--in_json", str(broken)]) == 2
    assert "broken.json is not valid JSON" in capsys.readouterr().err
    assert main([str(folder), str(tmp_path / "c.json"), "--caption_extension", ".txt"]) == 2
    assert "both use .txt" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--full_path", "--relative_path", str(folder), str(tmp_path / "d.json")])
    assert exit_info.value.code == 2


def test_help_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "hcpdiff_like.tools.merge_captions", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--relative_path" in result.stdout and "kohya" in result.stdout
