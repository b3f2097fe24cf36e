"""Speed and memory switches under `model:` (attention, channels_last, compile, full_bf16).

    model:
      attention: sdpa            # sdpa = torch scaled_dot_product_attention (diffusers AttnProcessor2_0)
                                 # default = diffusers' plain AttnProcessor (explicit softmax(QK^T)V)
      channels_last: false       # UNet weights/activations in NHWC memory format (faster convs on recent GPUs)
      compile: false             # torch.compile the UNet forward in place (true, or a mode: reduce-overhead)
      full_bf16: false           # keep even the trained weights in bf16 (needs mixed_precision=bf16)
      gradient_checkpointing     # (trainer) recompute activations in the backward pass
"""
from __future__ import annotations

import torch

ATTENTION = ("sdpa", "default")


class SpeedOptionError(ValueError):
    """A bad `model.*` speed/memory option; the message names the key."""


def check_speed_options(model_cfg, mixed_precision: str) -> None:
    """Cheap checks, run before the model loads."""
    attention = model_cfg.get("attention") or "sdpa"
    if attention not in ATTENTION:
        raise SpeedOptionError(f"model.attention={attention!r}: expected one of {ATTENTION}")
    if model_cfg.get("full_bf16") and mixed_precision != "bf16":
        raise SpeedOptionError(f"model.full_bf16=true needs mixed_precision=bf16 (got {mixed_precision!r})")


def apply_speed_options(unet: torch.nn.Module, model_cfg) -> list[str]:
    """Set the UNet's attention processor, memory format and compilation; return what was applied."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    attention = model_cfg.get("attention") or "sdpa"
    unet.set_attn_processor(AttnProcessor2_0() if attention == "sdpa" else AttnProcessor())
    applied = [f"attention={attention}"]
    if model_cfg.get("channels_last"):
        unet.to(memory_format=torch.channels_last)
        applied.append("channels_last")
    mode = model_cfg.get("compile")
    if mode:
        unet.compile(**({} if mode is True else {"mode": str(mode)}))  # in place: parameter names unchanged
        applied.append(f"compile={mode}")
    return applied


def apply_tf32(enabled: bool) -> None:
    """`allow_tf32` (HCP-Diffusion's top-level key): TF32 tensor cores for fp32 matmuls and convolutions on
    Ampere and newer GPUs (about 10 bits of mantissa instead of 23); no effect on the CPU."""
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)


def weight_dtype(mixed_precision: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)
