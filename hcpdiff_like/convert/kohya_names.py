"""Module paths <-> kohya/webui LoRA names.

A kohya name is `<prefix>_<module path with "." replaced by "_">`, e.g. the UNet layer
`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q` is `lora_unet_down_blocks_0_attentions_0_...`.
Prefixes: `lora_unet`, `lora_te` (SD1/SD2 text encoder), `lora_te1` / `lora_te2` (SDXL's two encoders).

SDXL LoRAs trained by kohya use the original (SGM/LDM) UNet names: `input_blocks_4_1_transformer_blocks_0_...`,
`middle_block_1_...`, `output_blocks_...`. `diffusers_to_sgm` / `sgm_to_diffusers` translate these; they need
the UNet's `layers_per_block` (2 for every published SDXL model) and which up blocks hold attention.
Going back from "_" to "." is ambiguous, so `underscored_to_dotted` rejoins the multi-word names that the
diffusers / transformers / SGM module names use.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Optional

# multi-word module names (diffusers UNet, transformers CLIP, SGM UNet), longest first when matching
_COMPOUNDS = sorted({tuple(word.split("_")) for word in (
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
    "add_k_proj", "add_v_proj", "proj_in", "proj_out", "conv_in", "conv_out", "conv_norm_out", "conv_shortcut",
    "time_emb_proj", "time_embedding", "add_embedding", "linear_1", "linear_2", "encoder_hid_proj",
    "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "final_layer_norm", "layer_norm1",
    "layer_norm2", "text_projection", "token_embedding", "position_embedding",
    "input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "in_layers", "out_layers",
    "emb_layers", "skip_connection")}, key=len, reverse=True)

TARGET_PREFIXES = (("lora_unet_", "unet"), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"),
                   ("lora_te_", "text_encoder"))


class KohyaNameError(ValueError):
    pass


def target_prefix(target: str, family: str) -> str:
    if target == "unet":
        return "lora_unet"
    if family == "sdxl":
        return {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}[target]
    if target == "text_encoder":
        return "lora_te"
    raise KohyaNameError(f"family {family} has no {target}")


def split_kohya_name(name: str) -> tuple[str, str, str]:
    """`lora_te1_text_model_...` -> (target, prefix, rest)."""
    for prefix, target in TARGET_PREFIXES:
        if name.startswith(prefix):
            return target, prefix[:-1], name[len(prefix):]
    raise KohyaNameError(f"{name!r} does not start with lora_unet_, lora_te_, lora_te1_ or lora_te2_")


def underscored_to_dotted(rest: str) -> str:
    tokens, out, index = rest.split("_"), [], 0
    while index < len(tokens):
        for compound in _COMPOUNDS:
            if tuple(tokens[index:index + len(compound)]) == compound:
                out.append("_".join(compound))
                index += len(compound)
                break
        else:
            out.append(tokens[index])
            index += 1
    return ".".join(out)


# -- SGM (original SDXL) UNet names -----------------------------------------------------------------------
_RESNET_TO_SGM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                  "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP_TO_SGM = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
               "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
               "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
_SGM_TO_RESNET = {v: k for k, v in _RESNET_TO_SGM.items()}
_SGM_TO_TOP = {v: k for k, v in _TOP_TO_SGM.items()}
SGM_ROOTS = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "label_emb.", "out.")


@dataclass
class UnetLayout:
    """What the SGM numbering depends on (defaults: published SDXL base)."""

    layers_per_block: int = 2
    up_blocks_with_attention: tuple = (0, 1)

    @classmethod
    def from_config(cls, config) -> "UnetLayout":
        up_types = list(config["up_block_types"] if isinstance(config, dict) else config.up_block_types)
        lpb = config["layers_per_block"] if isinstance(config, dict) else config.layers_per_block
        if not isinstance(lpb, int):
            raise KohyaNameError("UNets with a different layers_per_block per block have no SGM naming here")
        return cls(lpb, tuple(i for i, t in enumerate(up_types) if "CrossAttn" in t))

    @classmethod
    def guess(cls, module_paths: Iterable[str]) -> "UnetLayout":
        """Infer from the adapted module names (used when no model is given); SDXL base when unsure."""
        down, up, attn_up = -1, -1, set()
        for path in module_paths:
            if m := re.match(r"down_blocks\.\d+\.(?:resnets|attentions)\.(\d+)\.", path):
                down = max(down, int(m.group(1)))
            if m := re.match(r"up_blocks\.(\d+)\.(?:resnets|attentions)\.(\d+)\.", path):
                up = max(up, int(m.group(2)))
                if ".attentions." in path:
                    attn_up.add(int(m.group(1)))
        lpb = max(down + 1, up)
        if lpb <= 0:
            return cls()
        return cls(lpb, tuple(sorted(attn_up)) if attn_up else cls.up_blocks_with_attention)


def diffusers_to_sgm(path: str, layout: UnetLayout) -> str:
    """`down_blocks.1.attentions.0.proj_in` -> `input_blocks.4.1.proj_in` (layers_per_block=2)."""
    if path in _TOP_TO_SGM:
        return _TOP_TO_SGM[path]
    step = layout.layers_per_block + 1

    def resnet(inner: str) -> str:
        if inner not in _RESNET_TO_SGM:
            raise KohyaNameError(f"UNet layer {path}: no SGM name for resnet part {inner!r}")
        return _RESNET_TO_SGM[inner]

    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)", path):
        block, kind, layer, inner = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
        if kind == "downsamplers":
            return f"input_blocks.{1 + block * step + layout.layers_per_block}.0.op"
        index = 1 + block * step + layer
        return f"input_blocks.{index}.0.{resnet(inner)}" if kind == "resnets" else f"input_blocks.{index}.1.{inner}"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", path):
        kind, layer, inner = m.group(1), int(m.group(2)), m.group(3)
        if kind == "attentions":
            return f"middle_block.1.{inner}"
        return f"middle_block.{2 * layer}.{resnet(inner)}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)", path):
        block, kind, layer, inner = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
        if kind == "upsamplers":
            slot = 2 if block in layout.up_blocks_with_attention else 1
            return f"output_blocks.{block * step + layout.layers_per_block}.{slot}.conv"
        index = block * step + layer
        return f"output_blocks.{index}.0.{resnet(inner)}" if kind == "resnets" else f"output_blocks.{index}.1.{inner}"
    raise KohyaNameError(f"UNet layer {path} has no SGM (original SDXL) name")


def sgm_to_diffusers(path: str, layout: UnetLayout) -> str:
    if path in _SGM_TO_TOP:
        return _SGM_TO_TOP[path]
    step = layout.layers_per_block + 1

    def resnet(inner: str) -> str:
        if inner not in _SGM_TO_RESNET:
            raise KohyaNameError(f"SGM UNet layer {path}: unknown resnet part {inner!r}")
        return _SGM_TO_RESNET[inner]

    if m := re.fullmatch(r"input_blocks\.(\d+)\.(\d)\.(.+)", path):
        index, slot, inner = int(m.group(1)), int(m.group(2)), m.group(3)
        block, layer = (index - 1) // step, (index - 1) % step
        if inner == "op":
            return f"down_blocks.{block}.downsamplers.0.conv"
        return (f"down_blocks.{block}.resnets.{layer}.{resnet(inner)}" if slot == 0
                else f"down_blocks.{block}.attentions.{layer}.{inner}")
    if m := re.fullmatch(r"middle_block\.(\d)\.(.+)", path):
        slot, inner = int(m.group(1)), m.group(2)
        return f"mid_block.attentions.0.{inner}" if slot == 1 else f"mid_block.resnets.{slot // 2}.{resnet(inner)}"
    if m := re.fullmatch(r"output_blocks\.(\d+)\.(\d)\.(.+)", path):
        index, slot, inner = int(m.group(1)), int(m.group(2)), m.group(3)
        block, layer = index // step, index % step
        if slot > 0 and inner == "conv":
            return f"up_blocks.{block}.upsamplers.0.conv"
        return (f"up_blocks.{block}.resnets.{layer}.{resnet(inner)}" if slot == 0
                else f"up_blocks.{block}.attentions.{layer}.{inner}")
    raise KohyaNameError(f"{path!r} is not an SGM UNet layer name")


# -- text encoders: kohya names always say text_model.<...>; transformers >= 5 dropped that level from
# CLIPTextModel (CLIPTextModelWithProjection keeps it), so the module paths of our models may lack it
_CLIP_INNER = ("encoder.", "embeddings.", "final_layer_norm")


@lru_cache(maxsize=None)
def clip_has_text_model(target: str) -> bool:
    """Whether the installed transformers' text-encoder class for `target` nests layers under text_model."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                            num_attention_heads=1, max_position_embeddings=4, projection_dim=8)
    model = (CLIPTextModelWithProjection if target == "text_encoder_2" else CLIPTextModel)(config)
    return any(name == "text_model" for name, _ in model.named_modules())


def module_to_kohya(path: str, target: str, family: str, sgm_layout: Optional[UnetLayout] = None) -> str:
    """Our module path -> kohya name (SGM UNet names when `sgm_layout` is given)."""
    if target == "unet" and sgm_layout is not None:
        path = diffusers_to_sgm(path, sgm_layout)
    elif target != "unet" and path.startswith(_CLIP_INNER):
        path = "text_model." + path
    return f"{target_prefix(target, family)}_{path.replace('.', '_')}"


def kohya_to_module(name: str, sgm_layout: Optional[UnetLayout] = None,
                    known: Optional[set] = None) -> tuple[str, str]:
    """kohya name -> (target, our module path); SGM UNet names are recognised and translated.
    `known` (the model's layer names, if at hand) decides the text_model level; else the installed classes."""
    target, _, rest = split_kohya_name(name)
    dotted = underscored_to_dotted(rest)
    if target == "unet" and dotted.startswith(SGM_ROOTS):
        dotted = sgm_to_diffusers(dotted, sgm_layout or UnetLayout())
    elif target != "unet" and dotted.startswith("text_model."):
        short = dotted[len("text_model."):]
        if known is not None:
            dotted = short if short in known and dotted not in known else dotted
        elif not clip_has_text_model(target):
            dotted = short
    return target, dotted
