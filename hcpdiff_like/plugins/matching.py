"""Select modules by name: an exact path from `named_modules()` or `re:<regex>` (anchored at the start,
as `re.match`). A matched container module expands to every Linear/Conv2d inside it, so matching
`...attn1` puts LoRA on `to_q`, `to_k`, `to_v` and `to_out.0` (the HCP-Diffusion convention)."""
from __future__ import annotations

import re
from typing import Iterable, Sequence

import torch

ADAPTABLE_TYPES = (torch.nn.Linear, torch.nn.Conv2d)


def match_module_names(model: torch.nn.Module, patterns: Sequence[str]) -> list[str]:
    """Names of the modules that `patterns` select, in model order, without duplicates."""
    if isinstance(patterns, str):
        patterns = [patterns]
    names = [name for name, _ in model.named_modules()]
    selected: dict[str, None] = {}
    for pattern in patterns:
        pattern = str(pattern)
        if pattern.startswith("re:"):
            regex = re.compile(pattern[3:])
            hits = [name for name in names if regex.match(name)]
        else:
            hits = [name for name in names if name == pattern]
        for name in hits:
            selected[name] = None
    return list(selected)


def expand_to_adaptable(model: torch.nn.Module, module_names: Iterable[str],
                        conv: bool = True) -> list[str]:
    """Expand each selected module to the Linear (and Conv2d when `conv`) layers inside it."""
    modules = dict(model.named_modules())
    leaves: dict[str, None] = {}
    types = ADAPTABLE_TYPES if conv else (torch.nn.Linear,)
    for name in module_names:
        root = modules[name]
        for sub_name, sub in root.named_modules():
            if isinstance(sub, types):
                leaves[f"{name}.{sub_name}" if name and sub_name else (name or sub_name)] = None
    return list(leaves)


def select_layers(model: torch.nn.Module, patterns: Sequence[str], conv: bool = True) -> list[str]:
    return expand_to_adaptable(model, match_module_names(model, patterns), conv=conv)
