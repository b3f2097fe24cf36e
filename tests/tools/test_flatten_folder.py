"""tools.flatten_folder: pipeline tree -> kohya N_a~b~c folders -> the same tree, byte for byte."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hcpdiff_like.tools import flatten_folder


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture()
def tree(tmp_path):
    root = tmp_path / "training"
    folders = {"screenshots/1_character/AobaKokona": "3.27", "screenshots/1_character/Hoshino Hinata": "2.5",
               "screenshots/2_characters/AobaKokona HoshinoHinata": None, "booru/AobaKokona": "1.6",
               "regularization": "0.4"}
    for relative, multiply in folders.items():
        folder = root / relative
        folder.mkdir(parents=True)
        (folder / "0001.png").write_bytes(b"png:" + relative.encode())
        (folder / "0001.txt").write_text(f"caption of {relative}")
        if multiply is not None:
            (folder / "multiply.txt").write_text(multiply + "\n")
    (root / "emb_init.json").write_text("{}")
    return root


def test_flatten_then_revert_restores_the_tree(tree):
    before = _snapshot(tree)
    assert flatten_folder.main(["--src_dir", str(tree)]) == 0
    flat = sorted(p.name for p in tree.iterdir() if p.is_dir())
    # repeat = round(multiply) with Python's half-to-even rounding (2.5 -> 2, 0.4 -> 0); no file -> 1
    assert flat == ["0_regularization", "1_screenshots~2_characters~AobaKokona HoshinoHinata",
                    "2_booru~AobaKokona", "2_screenshots~1_character~Hoshino Hinata",
                    "3_screenshots~1_character~AobaKokona"]
    assert (tree / "3_screenshots~1_character~AobaKokona" / "multiply.txt").read_text() == "3.27\n"
    assert not (tree / "screenshots").exists() and (tree / "emb_init.json").is_file()
    assert flatten_folder.main(["--src_dir", str(tree), "--revert"]) == 0
    assert _snapshot(tree) == before


def test_refusals_leave_everything_in_place(tree, capsys):
    (tree / "booru" / "Aoba~Kokona").mkdir()
    (tree / "booru" / "Aoba~Kokona" / "x.png").write_bytes(b"x")
    (tree / "screenshots" / "stray.png").write_bytes(b"y")  # images beside subfolders
    before = _snapshot(tree)
    assert flatten_folder.main(["--src_dir", str(tree)]) == 2
    err = capsys.readouterr().err
    assert "'booru/Aoba~Kokona' already holds the separator '~'" in err
    assert "screenshots holds images and subfolders" in err
    assert _snapshot(tree) == before
    assert flatten_folder.main(["--src_dir", str(tree), "--revert"]) == 2  # not a flattened tree
    assert "not a flat kohya folder" in capsys.readouterr().err
    assert flatten_folder.main(["--src_dir", str(tree / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_unreadable_multiply_is_refused(tree, capsys):
    (tree / "booru" / "AobaKokona" / "multiply.txt").write_text("lots")
    before = _snapshot(tree)
    assert flatten_folder.main(["--src_dir", str(tree)]) == 2
    assert "multiply.txt: first line is not a number" in capsys.readouterr().err
    assert _snapshot(tree) == before


def test_existing_target_is_never_overwritten_and_dry_run_changes_nothing(tree, capsys):
    (tree / "0_regularization").mkdir()  # where regularization/ (multiply 0.4) would go
    assert flatten_folder.main(["--src_dir", str(tree)]) == 2
    assert "0_regularization already exists" in capsys.readouterr().err
    (tree / "0_regularization").rmdir()
    before = _snapshot(tree)
    assert flatten_folder.main(["--src_dir", str(tree), "--dry_run", "--separator", "+"]) == 0
    assert "would move booru/AobaKokona -> 2_booru+AobaKokona" in capsys.readouterr().out
    assert _snapshot(tree) == before and (tree / "booru").is_dir()


def test_help():
    result = subprocess.run([sys.executable, "-m", "hcpdiff_like.tools.flatten_folder", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--revert" in result.stdout
