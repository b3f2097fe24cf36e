"""Extract a LoRA from a fine-tuned model: a truncated SVD of (tuned - base) for each Linear/Conv2d layer.

delta = U S V^T is cut to `rank` singular values; lora_B (up) = U sqrt(S), lora_A (down) = sqrt(S) V^T,
alpha = rank (scale 1), so up @ down is the best rank-r approximation of delta. Conv layers flatten to
[out, in*kh*kw]; down keeps the conv's kernel/stride/padding and up is a 1x1 conv, like LoCon. 3x3 convs
are only extracted with `conv_rank > 0`; 1x1 convs count as linear layers. The result is written in our
format (one file per model, with `hcpdiff_like.lora` metadata) so `load_lora_into` reloads it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..plugins.lora import LoraBlockSpec, lora_metadata
from ..plugins.matching import select_layers


class ExtractError(ValueError):
    pass


@dataclass
class ExtractedLora:
    target: str
    state: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)  # module -> relative error ||delta - up@down|| / ||delta||
    skipped_other: list = field(default_factory=list)  # changed parameters no LoRA can carry (norms, embeddings)


def low_rank_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(down [r, in...], up [out, r(,1,1)], relative error) of the best rank-r approximation of delta."""
    flat = delta.reshape(delta.shape[0], -1).float()
    rank = max(1, min(rank, *flat.shape))
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    root = s[:rank].sqrt()
    up, down = u[:, :rank] * root, root[:, None] * vh[:rank]
    error = float(torch.linalg.norm(flat - up @ down) / torch.linalg.norm(flat).clamp_min(1e-30))
    if delta.ndim == 4:
        down, up = down.reshape(rank, *delta.shape[1:]), up.reshape(*up.shape, 1, 1)
    return down.contiguous(), up.contiguous(), error


def _layers(model: torch.nn.Module, layers: Optional[Sequence[str]]) -> list[str]:
    if layers:
        return select_layers(model, list(layers), conv=True)
    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


@torch.no_grad()
def extract_lora(base: torch.nn.Module, tuned: torch.nn.Module, target: str, family: str, rank: int,
                 conv_rank: int = 0, min_diff: float = 1e-5, layers: Optional[Sequence[str]] = None,
                 dtype: torch.dtype = torch.float32) -> ExtractedLora:
    """LoRA tensors for every layer whose weight changed by more than `min_diff` (max abs)."""
    base_modules, tuned_modules = dict(base.named_modules()), dict(tuned.named_modules())
    base_params, tuned_params = dict(base.named_parameters()), dict(tuned.named_parameters())
    if set(base_params) != set(tuned_params):
        odd = sorted(set(base_params) ^ set(tuned_params))[0]
        raise ExtractError(f"the {target} of the base and the tuned model differ in architecture (e.g. {odd})")
    for name, param in base_params.items():
        if param.shape != tuned_params[name].shape:
            raise ExtractError(f"{target} parameter {name}: base {tuple(param.shape)} vs tuned "
                               f"{tuple(tuned_params[name].shape)}; not the same architecture")
    result, groups = ExtractedLora(target), {}
    covered = set()
    names = _layers(base, layers)
    for name in tqdm(names, desc=f"extracting {target}", leave=False):
        layer = base_modules[name]
        covered.add(f"{name}.weight")
        delta = tuned_modules[name].weight.detach().float() - layer.weight.detach().float()
        if float(delta.abs().max()) <= min_diff:
            continue
        is_wide_conv = isinstance(layer, torch.nn.Conv2d) and tuple(layer.kernel_size) != (1, 1)
        layer_rank = conv_rank if is_wide_conv else rank
        if layer_rank <= 0:
            result.skipped_other.append(f"{name}.weight")
            continue
        down, up, error = low_rank_factors(delta, layer_rank)
        result.state[f"{name}.lora_A.weight"] = down.to(dtype)
        result.state[f"{name}.lora_B.weight"] = up.to(dtype)
        result.errors[name] = error
        groups.setdefault(int(down.shape[0]), []).append(name)
    for pname, param in base_params.items():
        if pname not in covered and not torch.equal(param, tuned_params[pname]):
            if float((param.float() - tuned_params[pname].float()).abs().max()) > min_diff:
                result.skipped_other.append(pname)
    specs = [LoraBlockSpec(layers=mods, rank=r, alpha=float(r), modules=mods, adapter=f"{target}_g{i}")
             for i, (r, mods) in enumerate(sorted(groups.items()))]
    if specs:
        result.metadata = lora_metadata(specs, target, family)
        result.metadata["hcpdiff_like.family"] = family
    return result
