"""Diffusers components -> one original-layout checkpoint (CompVis ldm for SD1.x/2.x, Stability sgm for SDXL).

The single file is what A1111 webui and ComfyUI load. Key prefixes:
    model.diffusion_model.*                 UNet (input_blocks / middle_block / output_blocks)
    first_stage_model.*                     VAE (encoder.down.N.block.M, mid.block_1, mid.attn_1, ...)
    cond_stage_model.transformer.*          SD1.x CLIP ViT-L text encoder (Hugging Face names)
    cond_stage_model.model.*                SD2.x OpenCLIP text encoder (resblocks, fused in_proj)
    conditioner.embedders.0.transformer.*   SDXL first text encoder (CLIP ViT-L, Hugging Face names)
    conditioner.embedders.1.model.*         SDXL second text encoder (OpenCLIP bigG, fused in_proj, text_projection)

The reverse direction is diffusers' own loader (`from_single_file`), see `hcpdiff_like.models.single_file`.
The UNet mapping follows the block structure in the UNet's config, so any number of blocks/layers works.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIXES = {
    "sd1": ["cond_stage_model.transformer."],
    "sd2": ["cond_stage_model.model."],
    "sdxl": ["conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."],
}
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


class ConversionError(ValueError):
    """A model cannot be written in the original layout; the message names the key or component."""


_ADAPTER_KEY = re.compile(r"\.(base_layer|lora_\w+|hada_\w+|lokr_\w+|oft_\w+)\.")


def plain_state_dict(module, what: str) -> dict[str, torch.Tensor]:
    """The module's tensors, refusing adapter-wrapped modules (their weights are not the model's yet)."""
    state = module.state_dict()
    wrapped = next((key for key in state if _ADAPTER_KEY.search(key + ".")), None)
    if wrapped:
        raise ConversionError(f"{what} parameter '{wrapped}' belongs to an adapter: a LoRA-wrapped model must be "
                              "merged first (e.g. with tools.merge) before it is written as a single file")
    return state


# ---------------------------------------------------------------------------------------------- UNet
_RESNET_RENAMES = (("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("time_emb_proj.", "emb_layers.1."),
                   ("norm2.", "out_layers.0."), ("conv2.", "out_layers.3."), ("conv_shortcut.", "skip_connection."))
_UNET_TOP_LEVEL = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
                   "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2.",
                   "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}


def _rename_resnet(rest: str) -> str:
    for old, new in _RESNET_RENAMES:
        if rest.startswith(old):
            return new + rest[len(old):]
    raise ConversionError(f"unexpected UNet resnet parameter '{rest}'")


def _per_block(value, count: int) -> list[int]:
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)] * count


def _unet_key_function(config):
    """Return diffusers-key -> ldm-key for a UNet2DConditionModel config."""
    down_layers = _per_block(config["layers_per_block"], len(config["down_block_types"]))
    up_layers = [n + 1 for n in reversed(down_layers)]  # each up block has one resnet more
    down_start = [1 + sum(n + 1 for n in down_layers[:b]) for b in range(len(down_layers))]
    up_start = [sum(up_layers[:b]) for b in range(len(up_layers))]
    up_has_attention = ["CrossAttn" in name for name in config["up_block_types"]]
    patterns = [
        (re.compile(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)"),
         lambda b, l, rest: f"input_blocks.{down_start[b] + l}.0.{_rename_resnet(rest)}"),
        (re.compile(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)"),
         lambda b, l, rest: f"input_blocks.{down_start[b] + l}.1.{rest}"),
        (re.compile(r"down_blocks\.(\d+)\.downsamplers\.(0)\.conv\.(.+)"),
         lambda b, _, rest: f"input_blocks.{down_start[b] + down_layers[b]}.0.op.{rest}"),
        (re.compile(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)"),
         lambda b, l, rest: f"output_blocks.{up_start[b] + l}.0.{_rename_resnet(rest)}"),
        (re.compile(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)"),
         lambda b, l, rest: f"output_blocks.{up_start[b] + l}.1.{rest}"),
        (re.compile(r"up_blocks\.(\d+)\.upsamplers\.(0)\.conv\.(.+)"),
         lambda b, _, rest: f"output_blocks.{up_start[b] + up_layers[b] - 1}."
                            f"{2 if up_has_attention[b] else 1}.conv.{rest}"),
        (re.compile(r"mid_block\.()resnets\.(\d+)\.(.+)"),
         lambda _, j, rest: f"middle_block.{2 * j}.{_rename_resnet(rest)}"),
        (re.compile(r"mid_block\.()attentions\.(0)\.(.+)"),
         lambda _, __, rest: f"middle_block.1.{rest}"),
    ]

    def convert(key: str) -> str:
        for old, new in _UNET_TOP_LEVEL.items():
            if key.startswith(old):
                return new + key[len(old):]
        for pattern, build in patterns:
            match = pattern.fullmatch(key)
            if match:
                block, layer, rest = match.groups()
                return build(int(block) if block else 0, int(layer), rest)
        raise ConversionError(f"UNet parameter '{key}' has no place in the original layout "
                              "(a LoRA-wrapped UNet must be merged first, e.g. with tools.merge)")

    return convert


def unet_to_original(unet) -> dict[str, torch.Tensor]:
    convert = _unet_key_function(unet.config)
    return {UNET_PREFIX + convert(key): value for key, value in plain_state_dict(unet, "UNet").items()}


# ----------------------------------------------------------------------------------------------- VAE
_VAE_BLOCK = re.compile(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)")
_VAE_ATTENTION_RENAMES = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}


def vae_to_original(vae) -> dict[str, torch.Tensor]:
    num_up = len(vae.config.up_block_types)
    out = {}
    for key, value in plain_state_dict(vae, "VAE").items():
        new = key.replace("conv_norm_out.", "norm_out.")
        match = _VAE_BLOCK.fullmatch(new)
        if match:
            side, direction, block, kind, index, rest = match.groups()
            level = int(block) if direction == "down" else num_up - 1 - int(block)  # ldm counts decoder levels upward
            if kind == "resnets":
                new = f"{side}.{direction}.{level}.block.{index}.{rest.replace('conv_shortcut.', 'nin_shortcut.')}"
            else:
                new = f"{side}.{direction}.{level}.{'downsample' if direction == 'down' else 'upsample'}.{rest}"
        match = re.fullmatch(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)", new)
        if match:
            side, kind, index, rest = match.groups()
            if kind == "resnets":
                new = f"{side}.mid.block_{int(index) + 1}.{rest.replace('conv_shortcut.', 'nin_shortcut.')}"
            else:
                for old, replacement in _VAE_ATTENTION_RENAMES.items():
                    if rest.startswith(old):
                        rest = replacement + rest[len(old):]
                        break
                new = f"{side}.mid.attn_1.{rest}"
                if rest.endswith(".weight") and not rest.startswith("norm.") and value.ndim == 2:
                    value = value[:, :, None, None]  # ldm uses 1x1 convolutions for the attention projections
        if re.search(r"(_blocks|mid_block)\.", new):
            raise ConversionError(f"VAE parameter '{key}' has no place in the original layout")
        out[VAE_PREFIX + new] = value
    return out


# ------------------------------------------------------------------------------------- text encoders
def _hf_text_state(text_encoder) -> dict[str, torch.Tensor]:
    """Hugging Face CLIP names with the `text_model.` prefix (newer transformers drop it on CLIPTextModel)."""
    state = {}
    for key, value in plain_state_dict(text_encoder, "text encoder").items():
        if key.endswith("position_ids"):
            continue
        if not key.startswith(("text_model.", "text_projection.")):
            key = "text_model." + key
        state[key] = value
    return state


def clip_to_original(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    """CLIP ViT-L (SD1.x, SDXL encoder 0): the original files keep the Hugging Face names."""
    return {prefix + key: value for key, value in _hf_text_state(text_encoder).items()
            if not key.startswith("text_projection.")}


_OPENCLIP_LAYER_RENAMES = (("self_attn.out_proj.", "attn.out_proj."), ("layer_norm1.", "ln_1."),
                           ("layer_norm2.", "ln_2."), ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj."))


def openclip_to_original(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    """OpenCLIP (SD2.x, SDXL encoder 1): resblocks with one fused q/k/v projection, transposed text_projection."""
    state = _hf_text_state(text_encoder)
    out = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key == "text_model.embeddings.token_embedding.weight":
            out[prefix + "token_embedding.weight"] = value
        elif key == "text_model.embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = value
        elif key.startswith("text_model.final_layer_norm."):
            out[prefix + "ln_final." + key.rsplit(".", 1)[1]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        else:
            match = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", key)
            if not match:
                raise ConversionError(f"text encoder parameter '{key}' has no place in the OpenCLIP layout")
            layer, rest = match.groups()
            block = f"{prefix}transformer.resblocks.{layer}."
            qkv = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
            if qkv:
                fused.setdefault(f"{block}attn.in_proj_{qkv.group(2)}", {})[qkv.group(1)] = value
                continue
            for old, new in _OPENCLIP_LAYER_RENAMES:
                if rest.startswith(old):
                    out[block + new + rest[len(old):]] = value
                    break
            else:
                raise ConversionError(f"text encoder parameter '{key}' has no place in the OpenCLIP layout")
    for key, parts in fused.items():
        if set(parts) != {"q", "k", "v"}:
            raise ConversionError(f"text encoder attention '{key}' lacks one of q/k/v")
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


# ------------------------------------------------------------------------------------------- bundle
def bundle_to_original_state_dict(bundle) -> dict[str, torch.Tensor]:
    """All weights of a `ModelBundle` under their original single-file names."""
    family = bundle.family
    if family not in TEXT_ENCODER_PREFIXES:
        raise ConversionError(f"family {family!r} has no original single-file layout here (sd1, sd2, sdxl)")
    state = {}
    state.update(unet_to_original(bundle.unet))
    state.update(vae_to_original(bundle.vae))
    if family == "sd1":
        state.update(clip_to_original(bundle.text_encoder, TEXT_ENCODER_PREFIXES["sd1"][0]))
    elif family == "sd2":
        state.update(openclip_to_original(bundle.text_encoder, TEXT_ENCODER_PREFIXES["sd2"][0]))
    else:
        if bundle.text_encoder_2 is None:
            raise ConversionError("an SDXL model needs text_encoder_2 for the single-file layout")
        state.update(clip_to_original(bundle.text_encoder, TEXT_ENCODER_PREFIXES["sdxl"][0]))
        state.update(openclip_to_original(bundle.text_encoder_2, TEXT_ENCODER_PREFIXES["sdxl"][1]))
    return state


def resolve_dtype(dtype) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).lower() not in DTYPES:
        raise ConversionError(f"dtype {dtype!r} is not one of {sorted(set(DTYPES))}")
    return DTYPES[str(dtype).lower()]


def write_single_file(bundle, path: str | os.PathLike, dtype=None, overwrite: bool = True) -> Path:
    """Write the bundle as one original-layout `.safetensors` file (atomically); `dtype` e.g. 'fp16'."""
    from ..training.checkpoints import save_safetensors

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConversionError(f"{path}: single-file checkpoints are written as .safetensors only")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    target = resolve_dtype(dtype)
    state = bundle_to_original_state_dict(bundle)
    if target is not None:
        state = {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}
    metadata = {"format": "pt", "hcpdiff_like.family": bundle.family}
    return save_safetensors(state, path, metadata=metadata)
