"""The weighting parser on a table of prompts (HCP `{}` and A1111 `()`/`[]` syntax)."""
from __future__ import annotations

import pytest

from hcpdiff_like.infer.prompt_weights import has_weights, parse_prompt_weights, plain_text

E = 1.1
CASES = [
    ("a cat", [("a cat", 1.0)]),
    ("", []),
    ("{cat}", [("cat", E)]),
    ("{cat:1.2}", [("cat", 1.2)]),
    ("(cat)", [("cat", E)]),
    ("(cat:1.5)", [("cat", 1.5)]),
    ("[cat]", [("cat", 1 / E)]),
    ("((cat))", [("cat", E * E)]),
    ("[[cat]]", [("cat", 1 / E / E)]),
    ("a {in the {city}:1.2} b", [("a ", 1.0), ("in the ", 1.2), ("city", 1.2 * E), (" b", 1.0)]),
    ("masterpiece, 1girl, {surtr_arknights-1000:1.2}",
     [("masterpiece, 1girl, ", 1.0), ("surtr_arknights-1000", 1.2)]),
    ("(red hair:0.5), [blue]", [("red hair", 0.5), (", ", 1.0), ("blue", 1 / E)]),
    ("( spaced : 1.3 )", [(" spaced ", 1.3)]),
    ("(cat:.5)", [("cat", 0.5)]),
    ("(a:b)", [("a:b", E)]),                       # a colon without a number is text
    ("time 12:30", [("time 12:30", 1.0)]),
    (r"\(literal\) \{x\}", [("(literal) {x}", 1.0)]),
    (r"a\:1.2", [("a:1.2", 1.0)]),
    ("unclosed (cat", [("unclosed ", 1.0), ("cat", E)]),   # never closed: weights to the end
    ("stray) and }", [("stray) and }", 1.0)]),              # closer without opener is text
    ("(a [b) c]", [("a ", E), ("b", E / E), (" c", 1 / E)]),  # each bracket kind nests on its own
    ("{(cat):2}", [("cat", 2 * E)]),
    ("(a)(b)", [("ab", E)]),                       # adjacent equal weights merge
    ("()x", [("x", 1.0)]),
    ("(a:1.2) (b:1.2)", [("a", 1.2), (" ", 1.0), ("b", 1.2)]),
]


@pytest.mark.parametrize("prompt, expected", CASES)
def test_parser_table(prompt, expected):
    segments = parse_prompt_weights(prompt)
    assert [s.text for s in segments] == [text for text, _ in expected]
    assert [s.weight for s in segments] == pytest.approx([w for _, w in expected])


def test_plain_text_and_has_weights():
    assert plain_text("masterpiece, {surtr-1000:1.2}, (red:0.8)") == "masterpiece, surtr-1000, red"
    assert has_weights("a (b)") and not has_weights("a b") and not has_weights("(b:1.0)")
