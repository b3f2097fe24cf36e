"""clean_captions: tag normalisation, rules files, and the cleaned JSON read back by the metadata source."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hcpdiff_like.data.kohya_sources import KohyaMetadataSource
from hcpdiff_like.tools.clean_captions import CleanRules, RulesError, clean_tags, load_rules, main
from hcpdiff_like.tools.merge_captions import main as merge_main

TAGS = "1girl, long_hair, ^_^, rating:safe, rating_explicit, questionable, solo, long hair, blue_eyes, solo"


def test_default_cleaning():
    assert clean_tags(TAGS, CleanRules()) == "1girl, long hair, ^_^, solo, blue eyes"
    keep_all = CleanRules(underscores=False, ratings=False, duplicates=False)
    assert clean_tags(TAGS, keep_all) == ", ".join(t.strip() for t in TAGS.split(","))


def test_rules_file_yaml_and_json(tmp_path):
    yaml_rules = tmp_path / "rules.yaml"
    yaml_rules.write_text(
        "replace: {1girl: 'solo female', long_hair: ''}\n"
        "remove: [simple background]\n"
        "regex:\n  - ['^(\\w+) eyes$', 'eyes of \\1']\n"
        "rating_tags: [nsfw]\n"
        "keep_underscore: ['blue_eyes']\n", encoding="utf-8")
    rules = load_rules(yaml_rules)
    got = clean_tags("1girl, long_hair, blue_eyes, red eyes, simple_background, nsfw, explicit, a, solo female", rules)
    # 1girl -> "solo female" (then a duplicate of the last tag), long hair dropped, blue_eyes kept with its
    # underscore, regex rewrote "red eyes", nsfw is a rating tag here while "explicit" no longer is
    assert got == "solo female, blue_eyes, eyes of red, explicit, a"
    json_rules = tmp_path / "rules.json"
    json_rules.write_text(json.dumps({"replace": {"1girls": "1girl, solo"}}))
    assert clean_tags("1girls, solo", load_rules(json_rules)) == "1girl, solo"


@pytest.mark.parametrize("text, message", [
    ("replce: {a: b}\n", "unknown key"),
    ("regex: [['(unclosed', 'x']]\n", "not a valid regex"),
    ("remove: simple background\n", "'remove' must be a list"),
    ("- just a list\n", "expected a mapping"),
])
def test_bad_rules_name_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    with pytest.raises(RulesError, match=message) as error:
        load_rules(path)
    assert str(path) in str(error.value)


def test_merge_clean_round_trip_through_the_metadata_source(tmp_path, capsys):
    from hcpdiff_like.data.demo import make_demo_dataset

    images = make_demo_dataset(tmp_path / "images", count=3)
    stems = sorted(p.stem for p in images.glob("*.png"))
    (images / f"{stems[0]}.txt").write_text("red_circle, rating:general, red_circle, simple_background")
    (images / f"{stems[0]}.caption").write_text("a  red   circle\nsecond line")
    merged, cleaned = tmp_path / "meta.json", tmp_path / "meta_clean.json"
    assert merge_main([str(images), str(merged)]) == 0
    rules = tmp_path / "rules.yaml"
    rules.write_text("caption_regex: [['circle', 'disc']]\n")
    assert main([str(merged), str(cleaned), "--rules", str(rules)]) == 0
    assert "3 entries, 1 changed" in capsys.readouterr().out
    metadata = json.loads(cleaned.read_text())
    assert metadata[stems[0]] == {"caption": "a red disc\nsecond line", "tags": "red circle, simple background"}
    source = KohyaMetadataSource(metadata_file=str(cleaned), image_dir=str(images))
    prompts = {r.image_path.stem: r.caption for r in source.records()}
    assert prompts[stems[0]] == "a red disc, red circle, simple background"
    assert prompts[stems[1]] == (images / f"{stems[1]}.txt").read_text()  # already clean: unchanged

    # no silent overwrite; cleaning in place needs --overwrite
    before = merged.read_text()
    assert main([str(merged), str(merged)]) == 2
    assert "--overwrite" in capsys.readouterr().err and merged.read_text() == before
    assert main([str(merged), str(merged), "--overwrite", "--caption_as_tags"]) == 0
    assert json.loads(merged.read_text())[stems[0]]["caption"] == "a red circle\nsecond line"
    assert main([str(tmp_path / "none.json"), str(tmp_path / "x.json")]) == 2
    assert "none.json does not exist" in capsys.readouterr().err


def test_help_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "hcpdiff_like.tools.clean_captions", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--rules" in result.stdout and "underscores" in result.stdout
