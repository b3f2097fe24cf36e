"""Checkpoint files: written to a temporary name and renamed, so a kill never leaves a broken file.

Layout inside the experiment dir (HCP-Diffusion's names):
    ckpts/unet-<step>.safetensors            LoRA tensors `<module>.lora_A.weight` (PEFT/diffusers names)
                                             + fully trained weights as `base.<param>`
    ckpts/text_encoder-<step>.safetensors    the same for the (first) text encoder
    ckpts/text_encoder_2-<step>.safetensors  SDXL's second text encoder
    ckpts/<word>-<step>.pt                   trained embeddings (see plugins/embeddings.py)
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

BASE_PREFIX = "base."


def atomic_write(path: str | os.PathLike, write_fn) -> Path:
    """Call `write_fn(temp_path)` then rename onto `path` (same folder, so the rename is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write_fn(str(temp))
        os.replace(temp, path)
    finally:
        if temp.exists():
            temp.unlink()
    return path


def save_safetensors(state: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Optional[dict[str, str]] = None) -> Path:
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
    return atomic_write(path, lambda temp: save_file(state, temp, metadata=metadata))


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        state = {key: handle.get_tensor(key) for key in handle.keys()}
    return state, metadata


def torch_save_atomic(obj, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda temp: torch.save(obj, temp))


def checkpoint_steps(ckpt_dir: str | os.PathLike, prefix: str = "unet") -> list[int]:
    """Steps for which `<prefix>-<step>.safetensors` exists, sorted."""
    pattern = re.compile(rf"^{re.escape(prefix)}-(\d+)\.safetensors$")
    steps = []
    for entry in Path(ckpt_dir).glob(f"{prefix}-*.safetensors"):
        match = pattern.match(entry.name)
        if match:
            steps.append(int(match.group(1)))
    return sorted(steps)
