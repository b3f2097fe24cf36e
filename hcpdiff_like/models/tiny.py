"""Tiny Stable-Diffusion-architecture models built from config (random weights, fixed seed).

They exist so that the demo, the tests and the benchmarks run offline on a CPU. Each family
(SD1.x, SD2.x, SDXL) keeps the real component classes and wiring, only the widths shrink.
`save_tiny_model(family, path)` writes an ordinary diffusers folder that the real loader reads.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

FAMILIES = ("sd1", "sd2", "sdxl")

# A byte-level CLIP vocabulary: 256 byte symbols, each also with the end-of-word suffix,
# plus the two special tokens (514 entries). No merges: every word is spelled byte by byte.
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


def write_byte_level_tokenizer(folder: str | os.PathLike) -> Path:
    """Write vocab.json/merges.txt/tokenizer_config.json for a CLIPTokenizer that needs no download."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    vocab_tokens = symbols + [s + "</w>" for s in symbols] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(vocab_tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer_config = {
        "model_max_length": 77,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "tokenizer_class": "CLIPTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
    return folder


def _text_encoder_config(hidden_size: int, hidden_act: str, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=514,
        hidden_size=hidden_size,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        projection_dim=projection_dim or hidden_size,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
    )


def build_tiny_components(family: str = "sd1", seed: int = 0) -> dict:
    """Return a dict of diffusers/transformers components for a tiny model of `family`."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")
    torch.manual_seed(seed)
    unet_kwargs = dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8,
    )
    if family == "sd1":
        unet_kwargs.update(cross_attention_dim=32, attention_head_dim=4)
    elif family == "sd2":
        unet_kwargs.update(cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True)
    else:  # sdxl: two text encoders (32 + 32 wide), pooled text + micro-conditioning through add_embedding
        unet_kwargs.update(
            cross_attention_dim=64,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8,
            transformer_layers_per_block=(1, 2),
        )
    unet = UNet2DConditionModel(**unet_kwargs)
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    scheduler_kwargs = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                            num_train_timesteps=1000, clip_sample=False, steps_offset=1)
    if family == "sd2":
        scheduler_kwargs["prediction_type"] = "v_prediction"
    components = {
        "unet": unet,
        "vae": vae,
        "scheduler": DDPMScheduler(**scheduler_kwargs),
    }
    if family == "sdxl":
        components["text_encoder"] = CLIPTextModel(_text_encoder_config(32, "quick_gelu"))
        components["text_encoder_2"] = CLIPTextModelWithProjection(_text_encoder_config(32, "gelu", 32))
    else:
        act = "quick_gelu" if family == "sd1" else "gelu"
        components["text_encoder"] = CLIPTextModel(_text_encoder_config(32, act))
    return components


def save_tiny_model(family: str, path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a complete tiny diffusers folder (model_index.json + components + tokenizer(s))."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    path = Path(path)
    components = build_tiny_components(family, seed)
    tokenizer_dir = write_byte_level_tokenizer(path / "_tokenizer_src")
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=77)
    if family == "sdxl":
        pipe = StableDiffusionXLPipeline(tokenizer=tokenizer, tokenizer_2=tokenizer, **components)
    else:
        pipe = StableDiffusionPipeline(tokenizer=tokenizer, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False, **components)
    pipe.save_pretrained(path, safe_serialization=True)
    for leftover in (path / "_tokenizer_src").iterdir():
        leftover.unlink()
    (path / "_tokenizer_src").rmdir()
    return path


def tiny_model_path(family: str = "sd1", cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the tiny model of `family` in the local cache, written once on first use."""
    root = Path(cache_dir or os.environ.get("HCPDIFF_LIKE_CACHE", Path.home() / ".cache" / "hcpdiff_like"))
    folder = root / f"tiny-{family}"
    if not (folder / "model_index.json").exists():
        temp = root / f".tiny-{family}.{os.getpid()}.tmp"
        if temp.exists():
            import shutil

            shutil.rmtree(temp)
        save_tiny_model(family, temp)
        try:
            os.replace(temp, folder)  # atomic: concurrent writers leave one complete folder
        except OSError:
            import shutil

            shutil.rmtree(temp, ignore_errors=True)
    return folder
