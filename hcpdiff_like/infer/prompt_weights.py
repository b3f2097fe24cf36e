"""Prompt weighting syntax -> (text, weight) segments.

Both conventions are understood at once:

* HCP-Diffusion: `{text}` = x1.1, `{text:1.3}` = x1.3
* A1111 webui:   `(text)` = x1.1, `(text:1.3)` = x1.3, `[text]` = /1.1

Brackets nest and multiply (`{in the {city}:1.2}` -> city x1.32). `\\(`, `\\)`, `\\{`, `\\}`, `\\[`, `\\]`,
`\\:` and `\\\\` are literal characters. A closing bracket with no matching opener is literal text; an opener
that is never closed weights everything after it (webui's behaviour). Each bracket kind has its own nesting,
so `(a [b) c]` weights `a b` x1.1 and `b c` /1.1. The weights later scale the text encoder's output at the
tokens of each segment (see prompt_encoding.py).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

EMPHASIS = 1.1
OPENERS = {"(": ")", "{": "}", "[": "]"}
CLOSERS = {close: open_ for open_, close in OPENERS.items()}
ESCAPABLE = set("(){}[]:\\")
# `:<number>` followed by the closer of a round or curly bracket, e.g. `:1.2)` or `: .5 }`
EXPLICIT_WEIGHT = re.compile(r":\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*([)}])")


@dataclass(frozen=True)
class Segment:
    text: str
    weight: float = 1.0


def parse_prompt_weights(prompt: str) -> list[Segment]:
    """Split `prompt` into segments of equal weight (adjacent equal weights merged, empty text dropped)."""
    pieces: list[list] = []        # [text, weight], mutable while parsing
    open_at: dict[str, list[int]] = {opener: [] for opener in OPENERS}  # piece index where each opener began
    literal: list[str] = []

    def flush() -> None:
        if literal:
            pieces.append(["".join(literal), 1.0])
            literal.clear()

    def scale_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    index = 0
    while index < len(prompt):
        char = prompt[index]
        if char == "\\" and index + 1 < len(prompt) and prompt[index + 1] in ESCAPABLE:
            literal.append(prompt[index + 1])
            index += 2
            continue
        if char in OPENERS:
            flush()
            open_at[char].append(len(pieces))
        elif char == ":":
            match = EXPLICIT_WEIGHT.match(prompt, index)
            opener = CLOSERS[match.group(2)] if match else None
            if match and open_at[opener]:
                flush()
                scale_from(open_at[opener].pop(), float(match.group(1)))
                index = match.end()
                continue
            literal.append(char)
        elif char in CLOSERS and open_at[CLOSERS[char]]:
            flush()
            factor = 1 / EMPHASIS if char == "]" else EMPHASIS
            scale_from(open_at[CLOSERS[char]].pop(), factor)
        else:
            literal.append(char)
        index += 1
    flush()
    for opener, starts in open_at.items():  # never closed: weight to the end
        for start in starts:
            scale_from(start, 1 / EMPHASIS if opener == "[" else EMPHASIS)
    merged: list[Segment] = []
    for text, weight in pieces:
        if not text:
            continue
        if merged and abs(merged[-1].weight - weight) < 1e-9:
            merged[-1] = Segment(merged[-1].text + text, merged[-1].weight)
        else:
            merged.append(Segment(text, weight))
    return merged


def plain_text(prompt: str) -> str:
    """The prompt without weighting syntax (for CLIP scoring, file names and logs)."""
    return "".join(segment.text for segment in parse_prompt_weights(prompt))


def has_weights(prompt: str) -> bool:
    return any(abs(segment.weight - 1.0) > 1e-9 for segment in parse_prompt_weights(prompt))
