"""Bake LoRAs (ours or kohya/webui, each with a weight) and embeddings into a base model.

LoRA: every adapted layer gets W += weight * (alpha / rank) * up @ down (PEFT's own merge, so LoRA,
LoCon, DoRA, LoHa and LoKr files all bake). Fully trained weights in our checkpoints (`base.<param>`)
become base + weight * (trained - base). Embeddings: each word of n vectors becomes the tokens
`word`, `word_1`, ... `word_<n-1>` (diffusers' textual-inversion convention, so diffusers pipelines expand
`word` in prompts by themselves) with their vectors as new rows of the token embedding.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..models.loading import bundle_to_pipeline
from ..plugins.lora import load_lora_into
from ..training.checkpoints import BASE_PREFIX, atomic_folder
from .kohya_lora import (LoraFormatError, OurLora, kohya_to_ours, looks_like_kohya, model_module_names,
                         parse_our_lora, read_lora_safetensors)
from .kohya_names import UnetLayout

TARGET_ATTRS = {"unet": "unet", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2"}


def _models(bundle) -> dict[str, torch.nn.Module]:
    return {t: getattr(bundle, a) for t, a in TARGET_ATTRS.items() if getattr(bundle, a, None) is not None}


def read_any_lora(path: str | os.PathLike, bundle) -> list[OurLora]:
    """Our per-model file or a kohya/webui file (converted in memory), checked against `bundle`."""
    state, metadata = read_lora_safetensors(path)
    if looks_like_kohya(state):
        sgm = UnetLayout.from_config(bundle.unet.config) if bundle.family == "sdxl" else None
        loras = list(kohya_to_ours(state, metadata, family=bundle.family, sgm_layout=sgm, source=str(path),
                                   known_modules=model_module_names(_models(bundle))).values())
    else:
        loras = [parse_our_lora(state, metadata, str(path))]
    for lora in loras:
        if lora.family and lora.family != bundle.family:
            raise LoraFormatError(f"{path} is a LoRA for {lora.family}, but the base model is {bundle.family}")
        if lora.target not in _models(bundle):
            raise LoraFormatError(f"{path} holds a {lora.target} LoRA; the {bundle.family} model has none")
    return loras


def bake_adapters(model: torch.nn.Module) -> int:
    """Merge every PEFT adapter layer into its base layer and put the plain layer back; returns the count."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = [(name, module) for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    for name, module in wrapped:
        module.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
    if "peft_config" in vars(model):  # PEFT's record of the injected adapters, all merged now
        del model.peft_config
    return len(wrapped)


def _merge_base_weights(model: torch.nn.Module, state: dict, weight: float, source: str) -> int:
    params = dict(model.named_parameters())
    count = 0
    for key, tuned in state.items():
        if not key.startswith(BASE_PREFIX):
            continue
        name = key[len(BASE_PREFIX):]
        if name not in params or params[name].shape != tuned.shape:
            raise LoraFormatError(f"{source}: {key} does not fit the base model's parameter {name}")
        with torch.no_grad():
            base = params[name]
            base.add_((tuned.to(base.dtype) - base) * weight)
        count += 1
    return count


def merge_lora_into_bundle(bundle, lora_files_with_weights: Sequence[tuple[str | os.PathLike, float]]) -> list[str]:
    """Bake each (file, weight) into the bundle in order; returns one summary line per model part baked."""
    parsed = [(path, float(weight), read_any_lora(path, bundle)) for path, weight in lora_files_with_weights]
    models, summary = _models(bundle), []
    for path, weight, loras in tqdm(parsed, desc="baking LoRA", disable=len(parsed) < 2):
        for lora in loras:
            model = models[lora.target]
            lora_part = {k: v for k, v in lora.state.items() if not k.startswith(BASE_PREFIX)}
            layers = 0
            if lora.info.get("blocks") and lora_part:
                dtype = next(model.parameters()).dtype
                load_lora_into(model, {k: v.to(dtype) for k, v in lora_part.items()}, lora.metadata, scale=weight)
                layers = bake_adapters(model)
            full = _merge_base_weights(model, lora.state, weight, str(path))
            summary.append(f"{path}: {lora.target} x{weight:g}: {layers} LoRA layers"
                           + (f", {full} trained weights" if full else ""))
    return summary


def merge_embeddings_into_bundle(bundle, embedding_files: Sequence) -> list[str]:
    """Add each embedding (path or EmbeddingFile) as new tokens to every tokenizer/text encoder pair."""
    from ..plugins.embedding_files import EmbeddingFile, check_new_word, read_embedding, split_for_encoders

    files = [f if isinstance(f, EmbeddingFile) else read_embedding(f) for f in embedding_files]
    encoders = bundle.text_encoders
    widths = [enc.get_input_embeddings().weight.shape[1] for enc in encoders]
    plans = []
    for emb in files:  # check everything before changing anything
        vectors = split_for_encoders(emb, widths, source=emb.name)
        for tokenizer in bundle.tokenizers:
            check_new_word(tokenizer, emb.name)
        plans.append((emb, vectors))
    for emb, vectors in plans:
        tokens = [emb.name] + [f"{emb.name}_{i}" for i in range(1, emb.n_vectors)]
        for tokenizer, encoder, rows in zip(bundle.tokenizers, encoders, vectors):
            tokenizer.add_tokens(tokens)
            encoder.resize_token_embeddings(len(tokenizer))
            ids = tokenizer.convert_tokens_to_ids(tokens)
            with torch.no_grad():
                table = encoder.get_input_embeddings().weight
                table[ids] = rows.to(table.dtype)
    return [f"{emb.name}: {emb.n_vectors} vectors -> tokens {emb.name}" + (
        f", {emb.name}_1 .. {emb.name}_{emb.n_vectors - 1}" if emb.n_vectors > 1 else "") for emb, _ in plans]


def save_bundle_as_diffusers(bundle, folder: str | os.PathLike, dtype=None, overwrite: bool = False,
                             scheduler=None) -> Path:
    """Write a diffusers folder under a temporary name, then move it into place (an old one only with overwrite)."""
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} already exists (pass --overwrite to replace it)")
    pipe = bundle_to_pipeline(bundle, scheduler)
    if dtype is not None:
        pipe.to(dtype=dtype)
    return atomic_folder(folder, lambda temp: pipe.save_pretrained(str(temp), safe_serialization=True))
