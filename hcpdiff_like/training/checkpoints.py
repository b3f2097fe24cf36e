"""Checkpoint files: written to a temporary name and renamed, so a kill never leaves a broken file.

Layout inside the experiment dir (HCP-Diffusion's names):
    ckpts/unet-<step>.safetensors            LoRA tensors `<module>.lora_A.weight` (PEFT/diffusers names)
                                             + fully trained weights as `base.<param>`
    ckpts/text_encoder-<step>.safetensors    the same for the (first) text encoder
    ckpts/text_encoder_2-<step>.safetensors  SDXL's second text encoder
    ckpts/<word>-<step>.pt                   trained embeddings (see plugins/embeddings.py)
    ckpts/state-<step>/                      full training state for exact resume (training/resume.py)
"""
from __future__ import annotations

import os
import re
import shutil
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


def atomic_folder(path: str | os.PathLike, write_fn) -> Path:
    """Call `write_fn(temp_dir)` to fill a temporary folder, then rename it onto `path`.

    A kill at any point leaves either the old folder or the new one, never a half-written one
    (temporary folders start with '.' and are ignored by readers). An existing `path` is replaced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    old = path.with_name(f".{path.name}.old{os.getpid()}")
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir()
    try:
        write_fn(temp)
        for entry in temp.rglob("*"):  # the files are on disk before the folder gets its final name
            if entry.is_file():
                with open(entry, "rb") as handle:
                    os.fsync(handle.fileno())
        if path.exists():
            os.replace(path, old)
        os.replace(temp, path)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return path


_STEP_FILE = re.compile(r"^(?P<name>.+)-(?P<step>\d+)\.(safetensors|pt)$")
_STATE_DIR = re.compile(r"^state-(?P<step>\d+)$")


def saved_steps(ckpt_dir: str | os.PathLike) -> dict[int, list[Path]]:
    """Every step that has files in `ckpt_dir`: `<name>-<step>.safetensors|.pt`, `state-<step>/`, and the
    step files one folder down (`ema/unet-<step>.safetensors`). Temporary names (leading '.') are skipped."""
    found: dict[int, list[Path]] = {}
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return found
    entries = list(folder.iterdir())
    entries += [e for sub in entries if sub.is_dir() and not _STATE_DIR.match(sub.name)
                and not sub.name.startswith(".") for e in sub.iterdir() if e.is_file()]
    for entry in entries:
        if entry.name.startswith("."):
            continue
        match = _STATE_DIR.match(entry.name) if entry.is_dir() else _STEP_FILE.match(entry.name)
        if match:
            found.setdefault(int(match.group("step")), []).append(entry)
    return found


def prune_checkpoints(ckpt_dir: str | os.PathLike, keep_last_n: Optional[int]) -> list[int]:
    """Delete the files of every step but the last `keep_last_n` (checkpoints and states alike).

    Returns the pruned steps. `None` or 0 keeps everything.
    """
    if not keep_last_n or keep_last_n < 0:
        return []
    steps = saved_steps(ckpt_dir)
    pruned = sorted(steps)[:-int(keep_last_n)]
    for step in pruned:
        for entry in steps[step]:
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
    return pruned
