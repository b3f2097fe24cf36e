"""The model to generate with: a base bundle, a run's checkpoints of one step merged in, embeddings attached.

From an experiment dir and a step (HCP-Diffusion's layout, see training/checkpoints.py):
    ckpts/unet-<step>.safetensors, text_encoder-<step>.safetensors, text_encoder_2-<step>.safetensors
        LoRA blocks are rebuilt from the file's metadata with their scale x `merge_alpha`, then baked into
        the weights; fully trained weights (`base.<param>`) are blended in at `part_alpha`
    ckpts/<word>-<step>.pt
        trained words, usable in prompts as `<word>-<step>` (e.g. `{surtr_arknights-1000:1.2}`)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..convert.merge import bake_adapters
from ..models.conditioning import TextConditioner
from ..models.loading import ModelBundle, load_model_bundle, set_requires_grad
from ..plugins.attach import TEXT_ENCODER_TARGETS
from ..plugins.lora import METADATA_KEY, load_lora_into
from ..training.checkpoints import BASE_PREFIX, checkpoint_steps, load_safetensors

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class InferenceModelError(ValueError):
    """A checkpoint/step/embedding problem; the message names the file or key."""


@dataclass
class InferenceModel:
    bundle: ModelBundle
    conditioner: TextConditioner
    device: torch.device
    dtype: torch.dtype
    loaded: list  # the checkpoint files merged in, for the record


def merge_checkpoint_file(module: torch.nn.Module, path: Path, alpha: float, part_alpha: float = 1.0) -> None:
    """Merge one of our checkpoint files (LoRA blocks and/or `base.` weights) into `module`."""
    state, metadata = load_safetensors(path)
    lora_state = {k: v for k, v in state.items() if not k.startswith(BASE_PREFIX)}
    if lora_state:
        if METADATA_KEY not in metadata:
            raise InferenceModelError(f"{path}: LoRA tensors without '{METADATA_KEY}' metadata (not written by "
                                      "hcpdiff_like; convert it with python -m hcpdiff_like.tools.lora_convert)")
        load_lora_into(module, lora_state, metadata, scale=alpha)
        bake_adapters(module)
    params = dict(module.named_parameters())
    for key, tensor in state.items():
        if not key.startswith(BASE_PREFIX):
            continue
        name = key[len(BASE_PREFIX):]
        if name not in params:
            raise InferenceModelError(f"{path}: weight {name} does not exist in the model")
        target = params[name]
        with torch.no_grad():
            blended = target.float() * (1 - part_alpha) + tensor.float() * part_alpha
            target.copy_(blended.to(target.dtype))


def step_files(ckpt_dir: Path, step: int) -> dict[str, Path]:
    """Checkpoint files of one step by target name (unet, text_encoder, text_encoder_2)."""
    return {target: ckpt_dir / f"{target}-{step}.safetensors" for target in ("unet",) + TEXT_ENCODER_TARGETS
            if (ckpt_dir / f"{target}-{step}.safetensors").is_file()}


def run_steps(ckpt_dir: Path) -> list[int]:
    """Every step with a checkpoint file or a trained word in `ckpt_dir`."""
    steps = set()
    for target in ("unet",) + TEXT_ENCODER_TARGETS:
        steps.update(checkpoint_steps(ckpt_dir, target))
    for entry in ckpt_dir.glob("*-*.pt"):
        tail = entry.stem.rsplit("-", 1)[1]
        if tail.isdigit():
            steps.add(int(tail))
    return sorted(steps)


def _load_embeddings(bundle, conditioner, emb_dir: Optional[str], ckpt_dir: Optional[Path],
                     step: Optional[int]) -> list[str]:
    from ..plugins.embeddings import attach_embeddings, load_embedding_dir

    files = []
    if emb_dir and Path(os.path.expanduser(str(emb_dir))).is_dir():
        files.extend(load_embedding_dir(emb_dir))
    if ckpt_dir is not None and step is not None:
        names = {f.name for f in files}  # emb_dir may be the ckpts folder itself
        files.extend(f for f in load_embedding_dir(ckpt_dir, steps=[step]) if f.name not in names)
    if files:
        attach_embeddings(bundle, conditioner, files)
    return [f.name for f in files]


def load_inference_model(pretrained_model: Optional[str], family: Optional[str] = None,
                         exp_dir: Optional[str] = None, step: Optional[int] = None, merge_alpha: float = 0.85,
                         part_alpha: float = 1.0, extra_lora: Sequence[dict] = (), emb_dir: Optional[str] = None,
                         clip_skip: int = 0, clip_final_norm: bool = True, n_repeats: int = 1,
                         dtype: str = "fp32", device: Optional[str] = None) -> InferenceModel:
    """Base model + (optionally) a run's step merged at `merge_alpha`; everything checked before loading."""
    if dtype not in DTYPES:
        raise InferenceModelError(f"dtype={dtype!r} is not one of {sorted(DTYPES)}")
    ckpt_dir, files = None, {}
    if exp_dir:
        ckpt_dir = Path(os.path.expanduser(str(exp_dir))) / "ckpts"
        if not ckpt_dir.is_dir():
            raise InferenceModelError(f"exp_dir={exp_dir}: no ckpts/ folder in it (is it an experiment dir?)")
        available = run_steps(ckpt_dir)
        if step is None:
            raise InferenceModelError(f"exp_dir is set but model_steps is not; steps saved in {ckpt_dir}: "
                                      f"{available}")
        files = step_files(ckpt_dir, int(step))
        if not files and int(step) not in available:
            raise InferenceModelError(f"model_steps={step}: nothing saved for that step in {ckpt_dir}; "
                                      f"saved steps: {available}")
    extra = []
    for index, item in enumerate(extra_lora or []):
        path = Path(os.path.expanduser(str(item.get("path", ""))))
        if not path.is_file():
            raise InferenceModelError(f"merge.lora[{index}].path: {path} does not exist")
        extra.append((path, float(item.get("alpha", 1.0))))

    bundle = load_model_bundle(pretrained_model, family=family)
    for module in [bundle.unet, bundle.vae, *bundle.text_encoders]:
        set_requires_grad(module, False)
        module.eval()
    modules = {"unet": bundle.unet, **dict(zip(TEXT_ENCODER_TARGETS, bundle.text_encoders))}
    loaded = []
    for target, path in files.items():
        if target not in modules:
            raise InferenceModelError(f"{path}: the base model ({bundle.family}) has no {target}")
        merge_checkpoint_file(modules[target], path, merge_alpha, part_alpha)
        loaded.append(str(path))
    for path, alpha in extra:
        target = _target_of(path)
        if target not in modules:
            raise InferenceModelError(f"{path}: LoRA for {target}, which the base model ({bundle.family}) lacks")
        merge_checkpoint_file(modules[target], path, alpha, part_alpha)
        loaded.append(str(path))
    conditioner = TextConditioner(bundle, clip_skip=clip_skip, max_chunks=n_repeats,
                                  clip_final_norm=clip_final_norm)
    words = _load_embeddings(bundle, conditioner, emb_dir, ckpt_dir, None if step is None else int(step))
    loaded.extend(f"word:{w}" for w in words)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = DTYPES[dtype] if device.type != "cpu" or dtype != "fp16" else torch.float32
    for module in [bundle.unet, bundle.vae, *bundle.text_encoders]:  # diffusers upcasts the SDXL VAE itself
        module.to(device)
        if torch_dtype != torch.float32:
            module.to(torch_dtype)
    return InferenceModel(bundle, conditioner, device, torch_dtype, loaded)


def _target_of(path: Path) -> str:
    import json

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if METADATA_KEY not in metadata:
        raise InferenceModelError(f"{path}: no '{METADATA_KEY}' metadata; convert kohya/webui LoRA files with "
                                  "python -m hcpdiff_like.tools.lora_convert first")
    return json.loads(metadata[METADATA_KEY])["target"]
