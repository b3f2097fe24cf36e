"""Select modules by name: an exact path from `named_modules()` or `re:<regex>` (anchored at the start,
as `re.match`). A matched container module expands to every Linear/Conv2d inside it, so matching
`...attn1` puts LoRA on `to_q`, `to_k`, `to_v` and `to_out.0` (the HCP-Diffusion convention)."""
from __future__ import annotations

import re
from typing import Iterable, Sequence

import torch

ADAPTABLE_TYPES = (torch.nn.Linear, torch.nn.Conv2d)


def _adapter_layers(model: torch.nn.Module) -> set[str]:
    """Names of layers already wrapped by an adapter (PEFT tuner layers): treated as leaves."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}


def _visible_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """named_modules() without the insides of adapter-wrapped layers (base_layer, lora_A, ...)."""
    wrapped = _adapter_layers(model)
    return [(name, module) for name, module in model.named_modules()
            if not any(name.startswith(w + ".") for w in wrapped)]


def match_module_names(model: torch.nn.Module, patterns: Sequence[str]) -> list[str]:
    """Names of the modules that `patterns` select, in model order, without duplicates."""
    if isinstance(patterns, str):
        patterns = [patterns]
    names = [name for name, _ in _visible_modules(model)]
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
    from peft.tuners.tuners_utils import BaseTunerLayer

    visible = dict(_visible_modules(model))
    leaves: dict[str, None] = {}
    types = ADAPTABLE_TYPES if conv else (torch.nn.Linear,)
    for name in module_names:
        prefix = f"{name}." if name else ""
        for full_name, sub in visible.items():
            if full_name == name or full_name.startswith(prefix):
                base = sub.get_base_layer() if isinstance(sub, BaseTunerLayer) else sub
                if isinstance(base, types):
                    leaves[full_name] = None
    return list(leaves)


def select_layers(model: torch.nn.Module, patterns: Sequence[str], conv: bool = True) -> list[str]:
    return expand_to_adaptable(model, match_module_names(model, patterns), conv=conv)
