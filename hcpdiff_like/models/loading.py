"""Load a base model (local diffusers folder or a tiny built-in one) into a `ModelBundle`.

Everything loads offline: `local_files_only=True` always, so a missing path fails fast with a
message naming it instead of trying a model hub.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from .tiny import FAMILIES, tiny_model_path


@dataclass
class ModelBundle:
    """The components of one Stable-Diffusion-family model, plus its family name."""

    family: str
    unet: Any
    vae: Any
    noise_scheduler: Any
    tokenizer: Any
    text_encoder: Any
    tokenizer_2: Any = None
    text_encoder_2: Any = None
    source: str = ""
    extras: dict = field(default_factory=dict)

    @property
    def tokenizers(self) -> list:
        return [t for t in (self.tokenizer, self.tokenizer_2) if t is not None]

    @property
    def text_encoders(self) -> list:
        return [t for t in (self.text_encoder, self.text_encoder_2) if t is not None]


class ModelLoadError(ValueError):
    """A base model path or file cannot be used; the message names it."""


def resolve_model_path(pretrained_model_name_or_path: Optional[str], tiny: Optional[str] = None) -> Path:
    """Turn the config's model location into a local folder (tiny models are written on demand)."""
    if pretrained_model_name_or_path in (None, "", "tiny") or str(pretrained_model_name_or_path).startswith("tiny:"):
        family = tiny or (str(pretrained_model_name_or_path).split(":", 1)[1]
                          if str(pretrained_model_name_or_path).startswith("tiny:") else "sd1")
        return tiny_model_path(family)
    path = Path(os.path.expanduser(str(pretrained_model_name_or_path)))
    if not path.exists():
        raise ModelLoadError(
            f"model.pretrained_model_name_or_path: {path} does not exist. This framework loads models offline "
            "only: give a local diffusers folder (with model_index.json) or a single-file .safetensors checkpoint.")
    return path


def detect_family(model_dir: Path) -> str:
    """SDXL has a second text encoder; SD2 uses an OpenCLIP (gelu) text encoder; otherwise SD1."""
    if (model_dir / "text_encoder_2").is_dir():
        return "sdxl"
    te_config = model_dir / "text_encoder" / "config.json"
    if te_config.exists():
        config = json.loads(te_config.read_text())
        if config.get("hidden_act") == "gelu" or config.get("hidden_size") == 1024:
            return "sd2"
    return "sd1"


def load_model_bundle(pretrained_model_name_or_path: Optional[str] = None, family: Optional[str] = None,
                      tiny: Optional[str] = None, revision: Optional[str] = None,
                      single_file_config: Optional[str] = None) -> ModelBundle:
    """Load every component from a local folder (or single file); `family` forces detection."""
    path = resolve_model_path(pretrained_model_name_or_path, tiny)
    if path.is_file():
        from .single_file import load_single_file_bundle

        return load_single_file_bundle(path, family=family, config_dir=single_file_config)
    if not (path / "model_index.json").exists() and not (path / "unet").is_dir():
        raise ModelLoadError(f"{path} is not a diffusers model folder (no model_index.json and no unet/ folder)")
    detected = detect_family(path)
    family = family or detected
    if family not in FAMILIES:
        raise ModelLoadError(f"model.family={family!r} is not one of {FAMILIES}")
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    common = dict(local_files_only=True)
    if revision:
        common["revision"] = revision

    def _need(sub: str) -> str:
        if not (path / sub).exists():
            raise ModelLoadError(f"{path} has no '{sub}' folder, required for family {family}")
        return str(path / sub)

    bundle = ModelBundle(
        family=family,
        unet=UNet2DConditionModel.from_pretrained(_need("unet"), **common),
        vae=AutoencoderKL.from_pretrained(_need("vae"), **common),
        noise_scheduler=DDPMScheduler.from_pretrained(_need("scheduler"), **common),
        tokenizer=CLIPTokenizer.from_pretrained(_need("tokenizer"), model_max_length=77, **common),
        text_encoder=CLIPTextModel.from_pretrained(_need("text_encoder"), **common),
        source=str(path),
    )
    if family == "sdxl":
        bundle.tokenizer_2 = CLIPTokenizer.from_pretrained(_need("tokenizer_2"), model_max_length=77, **common)
        bundle.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(_need("text_encoder_2"), **common)
    return bundle


def bundle_to_pipeline(bundle: ModelBundle, scheduler=None):
    """A diffusers pipeline sharing the bundle's modules (nothing is copied); `scheduler` replaces the noise
    scheduler (inference samplers)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    common = dict(vae=bundle.vae, text_encoder=bundle.text_encoder, tokenizer=bundle.tokenizer, unet=bundle.unet,
                  scheduler=scheduler or bundle.noise_scheduler)
    if bundle.family == "sdxl":
        return StableDiffusionXLPipeline(text_encoder_2=bundle.text_encoder_2, tokenizer_2=bundle.tokenizer_2,
                                         **common)
    return StableDiffusionPipeline(safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                                   **common)


def load_text_components(pretrained_model_name_or_path: str,
                         single_file_config: Optional[str] = None) -> tuple[list, list]:
    """Only the tokenizer(s) and text encoder(s) of a model (tools that never touch the UNet).
    A single-file checkpoint needs `single_file_config` (a folder with its tokenizer(s))."""
    path = resolve_model_path(pretrained_model_name_or_path)
    if path.is_file() or not (path / "text_encoder").is_dir():
        bundle = load_model_bundle(str(path), single_file_config=single_file_config)
        return bundle.tokenizers, bundle.text_encoders
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tokenizers = [CLIPTokenizer.from_pretrained(str(path / "tokenizer"), model_max_length=77, local_files_only=True)]
    encoders = [CLIPTextModel.from_pretrained(str(path / "text_encoder"), local_files_only=True)]
    if (path / "text_encoder_2").is_dir():
        tokenizers.append(CLIPTokenizer.from_pretrained(str(path / "tokenizer_2"), model_max_length=77,
                                                        local_files_only=True))
        encoders.append(CLIPTextModelWithProjection.from_pretrained(str(path / "text_encoder_2"),
                                                                    local_files_only=True))
    return tokenizers, encoders


def set_requires_grad(module: torch.nn.Module, flag: bool) -> None:
    for parameter in module.parameters():
        parameter.requires_grad_(flag)
