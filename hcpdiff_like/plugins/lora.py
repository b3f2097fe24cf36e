"""LoRA-family adapters on UNet / text-encoder modules, built with PEFT.

A config group (`plugin.lora_unet`, `plugin.lora_text_encoder`) is a list of blocks:

    - layers: ['re:.*\\.attn.?$', 're:.*\\.ff$']   # exact module paths or re: patterns
      rank: 8          # int, or a float in (0, 1) = fraction of each layer's out-features
      alpha: 4         # scale = alpha / rank (kohya/webui convention)
      dropout: 0.0
      lr: 1e-4
      type: lora       # lora | dora | loha | lokr  (LoCon = lora on Conv2d layers, included by default)
      options: {}      # PEFT options of the type: loha {use_effective_conv2d}, lokr {decompose_factor,
                       # decompose_both, use_effective_conv2d} (LyCORIS's factor / decompose_both / use_tucker)

Each block becomes one PEFT adapter (`<target>_g<i>`) on the matched Linear/Conv2d layers, and one
optimizer parameter group with its own lr. Base weights stay frozen.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import torch

from .matching import select_layers

LORA_TYPES = ("lora", "dora", "loha", "lokr")
# per type, the PEFT config options a block may set under `options:` (and the type each must have)
TYPE_OPTIONS = {"lora": {}, "dora": {}, "loha": {"use_effective_conv2d": bool},
                "lokr": {"decompose_factor": int, "decompose_both": bool, "use_effective_conv2d": bool}}
METADATA_KEY = "hcpdiff_like.lora"


@dataclass
class LoraBlockSpec:
    layers: list
    rank: float = 4
    alpha: Optional[float] = None
    dropout: float = 0.0
    lr: float = 1e-4
    type: str = "lora"
    conv: bool = True  # also adapt Conv2d layers inside matched modules (LoCon)
    options: dict = field(default_factory=dict)  # PEFT options of the type (TYPE_OPTIONS)
    modules: list = field(default_factory=list)  # filled in when attached
    adapter: str = ""

    def resolved_alpha(self, rank: int) -> float:
        return float(rank if self.alpha is None else self.alpha)


class LoraBlockError(ValueError):
    pass


def _checked_options(spec: LoraBlockSpec, where: str) -> dict:
    allowed = TYPE_OPTIONS.get(spec.type)
    if allowed is None:
        raise LoraBlockError(f"{where}: LoRA block type {spec.type!r} is not one of {LORA_TYPES}")
    options = dict(spec.options or {})
    for key, value in options.items():
        if key not in allowed:
            raise LoraBlockError(f"{where}.options.{key}: not an option of type {spec.type} "
                                 f"(allowed: {sorted(allowed) or 'none'})")
        if type(value) is not allowed[key]:
            raise LoraBlockError(f"{where}.options.{key}: must be {allowed[key].__name__}, got {value!r}")
    return options


def _peft_config(spec: LoraBlockSpec, modules: list[str], rank: int, model: torch.nn.Module):
    alpha = spec.resolved_alpha(rank)
    options = dict(spec.options or {})
    if spec.type in ("lora", "dora"):
        from peft import LoraConfig

        return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=spec.dropout, target_modules=modules,
                          use_dora=spec.type == "dora", init_lora_weights=True)
    if spec.type == "loha":
        from peft import LoHaConfig

        return LoHaConfig(r=rank, alpha=alpha, module_dropout=spec.dropout, target_modules=modules, **options)
    if spec.type == "lokr":
        from peft import LoKrConfig

        return LoKrConfig(r=rank, alpha=alpha, module_dropout=spec.dropout, target_modules=modules, **options)
    raise LoraBlockError(f"LoRA block type {spec.type!r} is not one of {LORA_TYPES}")


def _rank_for(spec: LoraBlockSpec, model: torch.nn.Module, modules: list[str]) -> int:
    rank = spec.rank
    if isinstance(rank, float) and 0 < rank < 1:
        named = dict(model.named_modules())
        widths = [getattr(named[m], "out_features", None) or getattr(named[m], "out_channels") for m in modules]
        return max(1, round(min(widths) * rank))
    return int(rank)


def activate_all_adapters(model: torch.nn.Module) -> None:
    """PEFT activates only the last injected adapter; each layer must run every adapter it holds."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            names = sorted({name for layer_name in module.adapter_layer_names
                            for name in getattr(module, layer_name).keys()})
            module.set_adapter(names)


def attach_lora_blocks(model: torch.nn.Module, blocks: Sequence[dict | LoraBlockSpec], target: str,
                       defaults: Optional[dict] = None) -> list[LoraBlockSpec]:
    """Inject one adapter per block into `model`; return the specs with matched modules filled in."""
    from peft import inject_adapter_in_model

    defaults = {k: v for k, v in (defaults or {}).items() if v is not None}
    specs, taken = [], {}
    for index, block in enumerate(blocks):
        values = dict(defaults)
        values.update(block if isinstance(block, dict) else asdict(block))
        unknown = sorted(set(values) - set(LoraBlockSpec.__dataclass_fields__))
        if unknown:
            raise LoraBlockError(f"plugin.lora_{target}[{index}].{unknown[0]}: unknown LoRA block key (known: "
                                 "layers, rank, alpha, dropout, lr, type, conv, options)")
        if "layers" not in values:
            raise LoraBlockError(f"plugin.lora_{target}[{index}]: 'layers' is required")
        spec = LoraBlockSpec(**values)
        spec.options = _checked_options(spec, f"plugin.lora_{target}[{index}]")
        modules = select_layers(model, list(spec.layers), conv=spec.conv)
        if not modules:
            raise LoraBlockError(f"plugin.lora_{target}[{index}]: layers {list(spec.layers)} match no "
                                 f"Linear/Conv2d module of the {target}")
        clash = [m for m in modules if m in taken]
        if clash:
            raise LoraBlockError(f"plugin.lora_{target}[{index}] selects {clash[0]}, already taken by block "
                                 f"{taken[clash[0]]}; make the layer patterns of LoRA blocks disjoint")
        for m in modules:
            taken[m] = index
        rank = _rank_for(spec, model, modules)
        spec.rank, spec.modules, spec.adapter = rank, modules, f"{target}_g{index}"
        with warnings.catch_warnings():  # several adapters in one model is what we want here
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")
            inject_adapter_in_model(_peft_config(spec, modules, rank, model), model, adapter_name=spec.adapter)
        specs.append(spec)
    activate_all_adapters(model)
    return specs


def adapter_parameters(model: torch.nn.Module, adapter: str) -> list[torch.nn.Parameter]:
    """The trainable tensors of one adapter (PEFT names them `...lora_A.<adapter>.weight` etc.)."""
    marker = f".{adapter}."
    params = [p for n, p in model.named_parameters() if marker in n or n.endswith(f".{adapter}")]
    for p in params:
        p.requires_grad_(True)
    return params


def lora_state_dict(model: torch.nn.Module, specs: Sequence[LoraBlockSpec]) -> dict[str, torch.Tensor]:
    """All blocks' tensors with PEFT/diffusers key names (no adapter name): `<module>.lora_A.weight`."""
    from peft import get_peft_model_state_dict

    state = {}
    for spec in specs:
        part = get_peft_model_state_dict(model, adapter_name=spec.adapter)
        state.update({k: v.detach().cpu().contiguous() for k, v in part.items()})
    return state


def lora_metadata(specs: Sequence[LoraBlockSpec], target: str, family: str) -> dict[str, str]:
    blocks = [{"adapter": s.adapter, "type": s.type, "rank": int(s.rank), "alpha": s.resolved_alpha(int(s.rank)),
               "dropout": s.dropout, "conv": s.conv, "modules": list(s.modules),
               **({"options": dict(s.options)} if s.options else {})} for s in specs]
    return {METADATA_KEY: json.dumps({"version": 1, "target": target, "family": family, "blocks": blocks})}


def load_lora_into(model: torch.nn.Module, state: dict[str, torch.Tensor], metadata: dict[str, str],
                   scale: float = 1.0) -> list[LoraBlockSpec]:
    """Rebuild the adapters described by a checkpoint's metadata in `model` and load their tensors."""
    from peft import set_peft_model_state_dict

    if METADATA_KEY not in (metadata or {}):
        raise LoraBlockError(f"checkpoint has no '{METADATA_KEY}' metadata: not written by hcpdiff_like "
                             "(convert kohya/webui files with python -m hcpdiff_like.tools.lora_convert)")
    info = json.loads(metadata[METADATA_KEY])
    blocks = [{"layers": b["modules"], "rank": b["rank"], "alpha": b["alpha"] * scale, "dropout": 0.0,
               "type": b["type"], "conv": b.get("conv", True), "options": b.get("options", {})}
              for b in info["blocks"]]
    specs = attach_lora_blocks(model, blocks, info["target"])
    for spec in specs:
        prefixes = tuple(m + "." for m in spec.modules)
        part = {k: v for k, v in state.items() if k.startswith(prefixes)}
        result = set_peft_model_state_dict(model, part, adapter_name=spec.adapter)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise LoraBlockError(f"unexpected LoRA keys for {spec.adapter}: {unexpected[:3]}")
    for p in model.parameters():
        p.requires_grad_(False)
    return specs
