"""Attach every configured plugin to the loaded model and collect what trains.

Reads the `plugin` config section:

    plugin:
      rank: 8                    # defaults for LoRA blocks that do not set their own
      alpha: null                # null = rank (scale 1)
      dropout: 0.0
      lora_unet: [ {layers: [...], lr: ...}, ... ]
      lora_text_encoder: [ ... ] # applied to each text encoder (SDXL: both)
      finetune_unet: [ {layers: [...], lr: ...} ]          # train base weights of matched modules
      finetune_text_encoder: [ ... ]

Everything starts frozen; only the matched plugin/base parameters get requires_grad.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf

from ..models.loading import ModelBundle, set_requires_grad
from .lora import LoraBlockSpec, adapter_parameters, attach_lora_blocks
from .matching import match_module_names

TEXT_ENCODER_TARGETS = ("text_encoder", "text_encoder_2")


@dataclass
class TrainedTarget:
    """What trains on one model (unet / text_encoder / text_encoder_2)."""

    name: str
    module: torch.nn.Module
    lora_specs: list = field(default_factory=list)
    finetuned: list = field(default_factory=list)  # parameter names trained in full
    param_groups: list = field(default_factory=list)

    @property
    def trains(self) -> bool:
        return bool(self.lora_specs or self.finetuned)


def _as_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, (DictConfig,)) or OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    return list(value)


def _finetune(target: TrainedTarget, groups: list, default_lr: float, section: str) -> None:
    """Train the base weights of the matched modules, one param group (own lr) per config entry. LoRA tensors
    inside a matched module stay with their LoRA block; two entries may not select the same weight."""
    named_params = dict(target.module.named_parameters())
    named_modules = dict(target.module.named_modules())
    owner = {id(p): g["name"] for g in target.param_groups for p in g["params"]}  # LoRA blocks so far
    lora_ids = set(owner)
    for index, group in enumerate(groups):
        if "layers" not in group:
            raise ValueError(f"plugin.{section}[{index}]: 'layers' is required")
        modules = match_module_names(target.module, group["layers"])
        if not modules:
            raise ValueError(f"plugin.{section}[{index}]: layers {group['layers']} match no module")
        names = sorted({f"{m}.{p}" if m else p for m in modules for p, _ in named_modules[m].named_parameters()})
        names = [n for n in names if n in named_params and id(named_params[n]) not in lora_ids]
        for name in names:
            if id(named_params[name]) in owner:
                raise ValueError(f"plugin.{section}[{index}] selects {name}, already trained by "
                                 f"{owner[id(named_params[name])]}; make the layer patterns disjoint")
            owner[id(named_params[name])] = f"{section}[{index}]"
        params = [named_params[n] for n in names]
        for p in params:
            p.requires_grad_(True)
        target.finetuned.extend(names)
        lr = default_lr if group.get("lr") is None else group["lr"]
        target.param_groups.append({"params": params, "lr": float(lr), "name": f"{section}[{index}]"})


def attach_plugins(bundle: ModelBundle, plugin_cfg: Optional[DictConfig], lr: float,
                   text_encoder_lr: float) -> dict[str, TrainedTarget]:
    """Freeze the model, attach LoRA / fine-tune groups; return the trained targets by name."""
    for module in [bundle.unet, bundle.vae, *bundle.text_encoders]:
        set_requires_grad(module, False)
    plugin_cfg = plugin_cfg if plugin_cfg is not None else OmegaConf.create({})
    defaults = {key: plugin_cfg.get(key) for key in ("rank", "alpha", "dropout", "type")}
    targets = {"unet": TrainedTarget("unet", bundle.unet)}
    for name, encoder in zip(TEXT_ENCODER_TARGETS, bundle.text_encoders):
        targets[name] = TrainedTarget(name, encoder)

    def add_lora(target: TrainedTarget, blocks: list, default_lr: float, section: str):
        if not blocks:
            return
        block_defaults = dict(defaults, lr=default_lr)
        specs = attach_lora_blocks(target.module, blocks, target.name, block_defaults)
        target.lora_specs.extend(specs)
        for spec in specs:
            target.param_groups.append({"params": adapter_parameters(target.module, spec.adapter),
                                        "lr": float(spec.lr), "name": f"{section}:{spec.adapter}"})

    add_lora(targets["unet"], _as_list(plugin_cfg.get("lora_unet")), lr, "lora_unet")
    _finetune(targets["unet"], _as_list(plugin_cfg.get("finetune_unet")), lr, "finetune_unet")
    for name in TEXT_ENCODER_TARGETS:
        if name in targets:
            add_lora(targets[name], _as_list(plugin_cfg.get("lora_text_encoder")), text_encoder_lr,
                     "lora_text_encoder")
            _finetune(targets[name], _as_list(plugin_cfg.get("finetune_text_encoder")), text_encoder_lr,
                      "finetune_text_encoder")
    return targets
