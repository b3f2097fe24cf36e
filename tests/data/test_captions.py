"""Caption ops: templates, shuffle with keep_tokens, tag dropout, caption dropout, determinism."""
from __future__ import annotations

import random

import pytest

from hcpdiff_like.data.captions import CaptionProcessor

CAPTION = "surtr, 1girl, red hair, horns, sword, fire, night"


def test_template_fields_and_empty_parts():
    processor = CaptionProcessor("a photo of {name}, {caption}", {"name": "surtr_arknights"})
    assert processor.process("red hair") == "a photo of surtr_arknights, red hair"
    assert processor.process("") == "a photo of surtr_arknights"
    assert CaptionProcessor("{unknown} {caption}").process("x") == "x"
    assert processor.process("x", {"name": "override"}) == "a photo of override, x"


def test_template_file_picks_a_line(tmp_path):
    templates = tmp_path / "caption.txt"
    templates.write_text("a photo of {caption}\na picture of {caption}\n", encoding="utf-8")
    processor = CaptionProcessor(str(templates))
    assert processor.process("cat") == "a photo of cat"
    seen = {processor.process("cat", rng=random.Random(i)) for i in range(30)}
    assert seen == {"a photo of cat", "a picture of cat"}


def test_shuffle_keeps_first_tokens_and_the_multiset():
    processor = CaptionProcessor(shuffle_tags=True, keep_tokens=2)
    tags = [t.strip() for t in CAPTION.split(",")]
    orders = set()
    for seed in range(40):
        out = processor.process(CAPTION, rng=random.Random(seed)).split(", ")
        assert out[:2] == tags[:2] and sorted(out) == sorted(tags)
        orders.add(tuple(out))
    assert len(orders) > 10


def test_tag_dropout_rate_and_kept_tokens():
    processor = CaptionProcessor(tag_dropout=0.3, keep_tokens=1)
    rng = random.Random(0)
    dropped = total = 0
    for _ in range(2000):
        out = processor.process(CAPTION, rng=rng).split(", ")
        assert out[0] == "surtr"
        dropped += 6 - (len(out) - 1)
        total += 6
    assert 0.27 < dropped / total < 0.33
    assert processor.process(CAPTION) == CAPTION  # no rng: deterministic, nothing dropped


def test_caption_dropout_blanks_whole_prompt():
    processor = CaptionProcessor("a photo of {name}, {caption}", {"name": "sks"}, caption_dropout=0.25)
    outs = [processor.process("dog", rng=random.Random(i)) for i in range(2000)]
    rate = outs.count("") / len(outs)
    assert 0.21 < rate < 0.29 and set(outs) == {"", "a photo of sks, dog"}


def test_same_seed_same_caption():
    processor = CaptionProcessor(shuffle_tags=True, tag_dropout=0.2, caption_dropout=0.1)
    first = [processor.process(CAPTION, rng=random.Random(f"7:{i}")) for i in range(50)]
    again = [processor.process(CAPTION, rng=random.Random(f"7:{i}")) for i in range(50)]
    assert first == again


@pytest.mark.parametrize("kwargs", [{"tag_dropout": 1.5}, {"caption_dropout": -0.1}, {"keep_tokens": -1}])
def test_bad_values(kwargs):
    with pytest.raises(ValueError):
        CaptionProcessor(**kwargs)
